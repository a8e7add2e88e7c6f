// The reference is written as index loops on purpose: the formulas as they
// read, so that it shares nothing with the layer's matrix code.
#![allow(clippy::needless_range_loop)]

use super::*;
use layer_api::ndarray::{ArrayD, IxDyn};
use layer_api::testing::{gradcheck, Gradients, Harness, Tensor, Tolerance};

const E: usize = 8;
const HEADS: usize = 2;
const B: usize = 2;
const L: usize = 3;
const S: usize = 4;

/// Deterministic values in [-1, 1) (`scale` 8) or [-0.5, 0.5) (16), a
/// different sequence for each seed.
fn filled(shape: &[usize], seed: usize, scale: f32) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let values = (0..n)
        .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / scale)
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
}

#[derive(Clone)]
struct Weights {
    in_proj_weight: ArrayD<f32>,
    in_proj_bias: Option<ArrayD<f32>>,
    out_proj_weight: ArrayD<f32>,
    out_proj_bias: Option<ArrayD<f32>>,
}

impl Weights {
    fn new(e: usize, bias: bool) -> Weights {
        Weights {
            in_proj_weight: filled(&[3 * e, e], 1, 16.0),
            in_proj_bias: bias.then(|| filled(&[3 * e], 5, 16.0)),
            out_proj_weight: filled(&[e, e], 11, 16.0),
            out_proj_bias: bias.then(|| filled(&[e], 13, 16.0)),
        }
    }

    fn params(&self) -> Vec<(&'static str, ArrayD<f32>)> {
        let mut params = vec![
            (IN_PROJ_WEIGHT, self.in_proj_weight.clone()),
            (OUT_PROJ_WEIGHT, self.out_proj_weight.clone()),
        ];
        if let Some(b) = &self.in_proj_bias {
            params.push((IN_PROJ_BIAS, b.clone()));
        }
        if let Some(b) = &self.out_proj_bias {
            params.push((OUT_PROJ_BIAS, b.clone()));
        }
        params
    }
}

#[derive(Clone)]
struct Case {
    query: ArrayD<f32>,
    key: ArrayD<f32>,
    value: ArrayD<f32>,
    mask: Option<ArrayD<bool>>,
}

impl Case {
    fn new(mask: Option<ArrayD<bool>>) -> Case {
        Case {
            query: filled(&[B, L, E], 0, 8.0),
            key: filled(&[B, S, E], 3, 8.0),
            value: filled(&[B, S, E], 7, 8.0),
            mask,
        }
    }

    fn inputs(&self) -> Vec<(&'static str, Tensor)> {
        let mut inputs = vec![
            (QUERY, self.query.clone().into()),
            (KEY, self.key.clone().into()),
            (VALUE, self.value.clone().into()),
        ];
        if let Some(mask) = &self.mask {
            inputs.push((KEY_PADDING_MASK, mask.clone().into()));
        }
        inputs
    }
}

/// Batch row 0 ignores keys 1 and 3, batch row 1 key 0.
fn some_keys_masked() -> ArrayD<bool> {
    let flags = [false, true, false, true, true, false, false, false];
    ArrayD::from_shape_vec(IxDyn(&[B, S]), flags.to_vec()).unwrap()
}

/// `nn.MultiheadAttention`'s math written out plainly, in f64: returns
/// `output` (b, L, E) and the head-averaged `weights` (b, L, S), flat.
fn reference(case: &Case, w: &Weights, heads: usize) -> (Vec<f64>, Vec<f64>) {
    let (b, l, e) = (
        case.query.shape()[0],
        case.query.shape()[1],
        case.query.shape()[2],
    );
    let s = case.key.shape()[1];
    let d = e / heads;
    let f = |x: f32| f64::from(x);
    let in_bias = |o: usize| w.in_proj_bias.as_ref().map_or(0.0, |bias| f(bias[[o]]));
    let out_bias = |o: usize| w.out_proj_bias.as_ref().map_or(0.0, |bias| f(bias[[o]]));
    // Rows `block * E ..` of in_proj_weight: q for block 0, k 1, v 2.
    let project = |x: &ArrayD<f32>, batch: usize, n: usize, block: usize| {
        let mut y = vec![vec![0.0f64; e]; n];
        for (t, y_t) in y.iter_mut().enumerate() {
            for (o, y_to) in y_t.iter_mut().enumerate() {
                let row = block * e + o;
                let mut sum = in_bias(row);
                for i in 0..e {
                    sum += f(x[[batch, t, i]]) * f(w.in_proj_weight[[row, i]]);
                }
                *y_to = sum;
            }
        }
        y
    };
    let mut output = Vec::new();
    let mut weights = Vec::new();
    for batch in 0..b {
        let q = project(&case.query, batch, l, 0);
        let k = project(&case.key, batch, s, 1);
        let v = project(&case.value, batch, s, 2);
        let visible = |j: usize| case.mask.as_ref().is_none_or(|m| !m[[batch, j]]);
        let mut context = vec![vec![0.0f64; e]; l];
        let mut averaged = vec![vec![0.0f64; s]; l];
        for h in 0..heads {
            for i in 0..l {
                let mut scores = vec![f64::NEG_INFINITY; s];
                for (j, score) in scores.iter_mut().enumerate() {
                    if visible(j) {
                        let mut dot = 0.0;
                        for c in h * d..(h + 1) * d {
                            dot += q[i][c] * k[j][c];
                        }
                        *score = dot / (d as f64).sqrt();
                    }
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|&x| (x - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for j in 0..s {
                    let p = exps[j] / total;
                    averaged[i][j] += p / heads as f64;
                    for c in h * d..(h + 1) * d {
                        context[i][c] += p * v[j][c];
                    }
                }
            }
        }
        for i in 0..l {
            for o in 0..e {
                let mut sum = out_bias(o);
                for c in 0..e {
                    sum += context[i][c] * f(w.out_proj_weight[[o, c]]);
                }
                output.push(sum);
            }
            weights.extend(&averaged[i]);
        }
    }
    (output, weights)
}

fn assert_close(name: &str, got: &Tensor, shape: &[usize], want: &[f64]) {
    assert_eq!(got.shape(), shape, "{name}");
    let got = got.clone().into_array::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() < 1e-5,
            "{name}[{i}]: {g} instead of {w}"
        );
    }
}

fn run(config: &str, case: &Case, w: &Weights) -> Result<Vec<(String, Tensor)>, String> {
    Harness::new::<MultiheadAttention>(config)?.run(case.inputs(), &w.params())
}

const WITH_WEIGHTS: &str = r#"{"embed_dim": 8, "num_heads": 2, "need_weights": true}"#;

#[test]
fn matches_the_reference_with_some_keys_masked() {
    let case = Case::new(Some(some_keys_masked()));
    let w = Weights::new(E, true);
    let out = run(WITH_WEIGHTS, &case, &w).unwrap();
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [OUTPUT, WEIGHTS]);
    let (output, weights) = reference(&case, &w, HEADS);
    assert_close(OUTPUT, &out[0].1, &[B, L, E], &output);
    assert_close(WEIGHTS, &out[1].1, &[B, L, S], &weights);

    // Masked keys get weight exactly 0, and each query's weights sum to 1.
    let got = out[1].1.clone().into_array::<f32>().unwrap();
    let mask = some_keys_masked();
    for ((batch, i, j), &p) in got
        .view()
        .into_dimensionality::<Ix3>()
        .unwrap()
        .indexed_iter()
    {
        if mask[[batch, j]] {
            assert_eq!(p, 0.0, "weights[{batch}, {i}, {j}]");
        }
    }
    for row in got.to_shape((B * L, S)).unwrap().rows() {
        assert!((row.sum() - 1.0).abs() < 1e-6, "{row}");
    }
}

#[test]
fn matches_the_reference_without_a_mask_and_without_weights() {
    let case = Case::new(None);
    let w = Weights::new(E, true);
    let out = run(r#"{"embed_dim": 8, "num_heads": 2}"#, &case, &w).unwrap();
    assert_eq!(out.len(), 1, "need_weights defaults to false");
    assert_eq!(out[0].0, OUTPUT);
    assert_close(
        OUTPUT,
        &out[0].1,
        &[B, L, E],
        &reference(&case, &w, HEADS).0,
    );
}

#[test]
fn one_four_and_eight_heads_with_and_without_bias_match_the_reference() {
    let case = Case::new(Some(some_keys_masked()));
    for (heads, bias) in [(1, true), (4, false), (8, true)] {
        let w = Weights::new(E, bias);
        let config = format!(
            r#"{{"embed_dim": 8, "num_heads": {heads}, "bias": {bias}, "need_weights": true}}"#
        );
        // Without biases only the two weights are given: a declared bias
        // would fail for want of a value.
        let out = run(&config, &case, &w).unwrap();
        let (output, weights) = reference(&case, &w, heads);
        assert_close(OUTPUT, &out[0].1, &[B, L, E], &output);
        assert_close(WEIGHTS, &out[1].1, &[B, L, S], &weights);
    }
}

#[test]
fn masked_keys_and_values_do_not_change_the_output() {
    let w = Weights::new(E, true);
    let mut case = Case::new(Some(some_keys_masked()));
    let before = run(WITH_WEIGHTS, &case, &w).unwrap();
    // Batch row 0 ignores key 3: whatever it and its value hold.
    for x in [&mut case.key, &mut case.value] {
        x.slice_mut(s![0, 3, ..]).fill(100.0);
    }
    let after = run(WITH_WEIGHTS, &case, &w).unwrap();
    assert_eq!(before, after);
}

#[test]
fn a_row_with_every_key_masked_is_an_error_naming_it() {
    let mut mask = some_keys_masked();
    mask.slice_mut(s![1, ..]).fill(true);
    let err = run(WITH_WEIGHTS, &Case::new(Some(mask)), &Weights::new(E, true)).unwrap_err();
    assert_eq!(
        err,
        "key_padding_mask masks every key of batch row 1; at least one key must be visible"
    );
}

#[test]
fn declares_torch_parameters_with_torch_initializers() {
    let layer = MultiheadAttention::new(MultiheadAttentionConfig {
        embed_dim: E,
        num_heads: HEADS,
        bias: true,
        need_weights: false,
    })
    .unwrap();
    let inputs = [
        Some(TensorInfo::new(DType::F32, [B, L, E])),
        Some(TensorInfo::new(DType::F32, [B, S, E])),
        Some(TensorInfo::new(DType::F32, [B, S, E])),
        None,
    ];
    let plan = layer.plan(&inputs).unwrap();
    let kaiming = Init::KaimingUniform {
        mode: FanMode::FanIn,
        gain: (1.0f32 / 3.0).sqrt(),
    };
    assert_eq!(
        plan.params,
        [
            ParamSpec::new(
                IN_PROJ_WEIGHT,
                [3 * E, E],
                Init::XavierUniform { gain: 1.0 }
            )
            .fans(E, 3 * E),
            ParamSpec::new(IN_PROJ_BIAS, [3 * E], Init::Zeros),
            ParamSpec::new(OUT_PROJ_WEIGHT, [E, E], kaiming).fans(E, E),
            ParamSpec::new(OUT_PROJ_BIAS, [E], Init::Zeros),
        ]
    );
    assert_eq!(plan.outputs, [TensorInfo::new(DType::F32, [B, L, E])]);
    // Projections 2·(2·3 + 2·4)·64 + 14·8 biases, scores and attn·v
    // 2·2·3·4·8, softmax 5·2·3·4; per batch row (q's scaling is folded
    // into the prepared weights).
    assert_eq!(
        layer.flops(&inputs),
        2 * (2 * 14 * 64 + 14 * 8 + 2 * 2 * 3 * 4 * 8 + 5 * 2 * 3 * 4)
    );
}

#[test]
fn bad_configs_are_refused() {
    let err = |config: &str| Harness::new::<MultiheadAttention>(config).err().unwrap();
    assert_eq!(
        err(r#"{"embed_dim": 10, "num_heads": 3}"#),
        "`embed_dim` (10) must be divisible by `num_heads` (3): each head gets \
         embed_dim / num_heads features"
    );
    assert_eq!(
        err(r#"{"embed_dim": 8, "num_heads": 0}"#),
        "`num_heads` must be at least 1"
    );
    assert_eq!(
        err(r#"{"embed_dim": 0, "num_heads": 1}"#),
        "`embed_dim` must be at least 1"
    );
    let e = err(r#"{"embed_dim": 8, "num_heads": 2, "dropout": 0.1}"#);
    assert!(e.contains("unknown field `dropout`"), "{e}");
    let e = err(r#"{"embed_dim": 8}"#);
    assert!(e.contains("missing field `num_heads`"), "{e}");
}

#[test]
fn inputs_that_do_not_agree_are_refused_by_name() {
    let w = Weights::new(E, true);
    let err = |change: &dyn Fn(&mut Case)| {
        let mut case = Case::new(Some(some_keys_masked()));
        change(&mut case);
        run(WITH_WEIGHTS, &case, &w).unwrap_err()
    };
    assert_eq!(
        err(&|c| c.value = filled(&[B, S + 1, E], 7, 8.0)),
        "`value` has 5 positions (shape [2, 5, 8]), but `key` has 4 (shape [2, 4, 8]); \
         key and value must have the same length S"
    );
    assert_eq!(
        err(&|c| c.key = filled(&[B + 1, S, E], 3, 8.0)),
        "`key` has 3 batch rows (shape [3, 4, 8]), but `query` has 2 (shape [2, 3, 8]); \
         query, key and value must have the same batch size"
    );
    assert_eq!(
        err(&|c| c.query = filled(&[B, L, E - 2], 0, 8.0)),
        "`query` has 6 features on its last axis (shape [2, 3, 6]), but `embed_dim` is 8; \
         query, key and value must all have embed_dim features"
    );
    assert_eq!(
        err(&|c| c.query = filled(&[L, E], 0, 8.0)),
        "`query` has shape [3, 8]: unbatched (L, E) inputs are not supported; add a batch \
         axis of 1, (1, 3, 8) (axis 0 must be the batch: the host may split it across threads)"
    );
    assert_eq!(
        err(&|c| c.mask = Some(ArrayD::from_elem(IxDyn(&[B, S + 1]), false))),
        "`key_padding_mask` has shape [2, 5], but must be (b, S) = (2, 4), one flag per key \
         of each batch row"
    );
    assert!(err(&|c| {
        c.key = filled(&[B, 0, E], 3, 8.0);
        c.value = filled(&[B, 0, E], 7, 8.0);
        c.mask = None;
    })
    .starts_with("`key` and `value` have no positions (S = 0"));
}

#[test]
fn empty_batches_and_queries_give_empty_outputs() {
    let w = Weights::new(E, true);
    for (b, l) in [(0, L), (B, 0)] {
        let case = Case {
            query: filled(&[b, l, E], 0, 8.0),
            key: filled(&[b, S, E], 3, 8.0),
            value: filled(&[b, S, E], 7, 8.0),
            mask: None,
        };
        let out = run(WITH_WEIGHTS, &case, &w).unwrap();
        assert_eq!(out[0].1.shape(), [b, l, E]);
        assert_eq!(out[1].1.shape(), [b, l, S]);
    }
}

/// Values in [-0.5, 0.5) with many significant bits, so that sums round
/// differently when their order changes (`filled`'s multiples of 1/16 sum
/// exactly in any order).
fn irregular(shape: &[usize], seed: usize) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let values = (0..n)
        .map(|i| ((i * 131 + seed * 71) % 997) as f32 / 997.0 - 0.5)
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
}

#[test]
fn pieces_of_a_batch_give_the_bits_of_the_whole_across_blocks() {
    // Forward projects blocks of batch rows (about 512 positions each) in
    // one product: 1025 rows of one position make two blocks, the second
    // of 513 rows (never a row alone, which would take the kernels'
    // matrix-vector path and round differently), and 8 rows of 130
    // positions two (3 and 5). The host's pieces (two rows or more) cut
    // across them; each must give the bits of the whole.
    let e = 64;
    let w = Weights {
        in_proj_weight: irregular(&[3 * e, e], 1),
        in_proj_bias: Some(irregular(&[3 * e], 2)),
        out_proj_weight: irregular(&[e, e], 3),
        out_proj_bias: Some(irregular(&[e], 4)),
    };
    let config = r#"{"embed_dim": 64, "num_heads": 4, "need_weights": true}"#;
    for (b, l, s, cuts) in [
        (1025, 1, 1, &[0, 2, 511, 514, 1023, 1025][..]),
        (8, 130, 130, &[0, 2, 5, 8][..]),
        (8, 3, 130, &[0, 4, 6, 8][..]),
    ] {
        let mask = ArrayD::from_shape_fn(IxDyn(&[b, s]), |i| s > 1 && (i[0] + i[1]) % 5 == 2);
        let case = Case {
            query: irregular(&[b, l, e], 5),
            key: irregular(&[b, s, e], 6),
            value: irregular(&[b, s, e], 7),
            mask: Some(mask),
        };
        let harness = Harness::new::<MultiheadAttention>(config).unwrap();
        let whole = harness.run(case.inputs(), &w.params()).unwrap();
        for pair in cuts.windows(2) {
            let rows = pair[0]..pair[1];
            let cut = |x: &ArrayD<f32>| x.slice(s![rows.clone(), .., ..]).to_owned().into_dyn();
            let piece = Case {
                query: cut(&case.query),
                key: cut(&case.key),
                value: cut(&case.value),
                mask: case
                    .mask
                    .as_ref()
                    .map(|m| m.slice(s![rows.clone(), ..]).to_owned().into_dyn()),
            };
            let got = harness.run(piece.inputs(), &w.params()).unwrap();
            for ((name, whole), (_, got)) in whole.iter().zip(&got) {
                let whole = whole.clone().into_array::<f32>().unwrap();
                let got = got.clone().into_array::<f32>().unwrap();
                let expected = whole.slice_axis(Axis(0), (rows.start..rows.end).into());
                assert!(
                    got.iter()
                        .zip(expected.iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "({b}, {l}, {s}): {name} of rows {rows:?} differs from the whole batch's"
                );
            }
        }
    }
}

// Backward.

/// A case of the given sizes, with the same kind of values as `Case::new`.
fn sized_case(b: usize, l: usize, s: usize, e: usize, mask: Option<ArrayD<bool>>) -> Case {
    Case {
        query: filled(&[b, l, e], 0, 8.0),
        key: filled(&[b, s, e], 3, 8.0),
        value: filled(&[b, s, e], 7, 8.0),
        mask,
    }
}

#[test]
fn gradcheck_with_and_without_a_mask_weights_and_biases() {
    // Batch 2, 3 queries, 4 keys, E = 4 in 2 heads (and 1 and 4 heads).
    for (heads, bias, need_weights, mask) in [
        (2, true, false, None),
        (2, true, false, Some(some_keys_masked())),
        (2, true, true, Some(some_keys_masked())),
        (2, false, true, None),
        (1, true, true, Some(some_keys_masked())),
        (4, false, false, Some(some_keys_masked())),
    ] {
        let config = format!(
            r#"{{"embed_dim": 4, "num_heads": {heads}, "bias": {bias}, "need_weights": {need_weights}}}"#
        );
        let harness = Harness::new::<MultiheadAttention>(&config).unwrap();
        let case = sized_case(B, 3, 4, 4, mask);
        let w = Weights::new(4, bias);
        gradcheck(&harness, case.inputs(), &w.params(), Tolerance::F32)
            .unwrap_or_else(|e| panic!("{config}, mask {}: {e}", case.mask.is_some()));
    }
}

/// `Σ g_out · output + Σ g_weights · weights` of the plain f64 reference.
fn reference_loss(case: &Case, w: &Weights, heads: usize, g_out: &[f64], g_w: &[f64]) -> f64 {
    let (output, weights) = reference(case, w, heads);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
    dot(&output, g_out) + dot(&weights, g_w)
}

/// Which tensor of a case or its weights to move.
type At = for<'a> fn(&'a mut Case, &'a mut Weights) -> &'a mut ArrayD<f32>;

/// Central differences of `loss` for each element of the f32 tensor
/// `at(case, w)`: f32 steps of about 1e-3, divided by the step the f32
/// values actually took, the loss computed in f64.
fn numeric_gradient(
    case: &Case,
    w: &Weights,
    at: At,
    loss: &dyn Fn(&Case, &Weights) -> f64,
) -> Vec<f64> {
    let (mut case, mut w) = (case.clone(), w.clone());
    let n = at(&mut case, &mut w).len();
    (0..n)
        .map(|i| {
            let x = at(&mut case, &mut w).as_slice_mut().unwrap()[i];
            let moved = |case: &mut Case, w: &mut Weights, to: f32| {
                at(case, w).as_slice_mut().unwrap()[i] = to;
                loss(case, w)
            };
            let (up, down) = (x + 1e-3, x - 1e-3);
            let difference = moved(&mut case, &mut w, up) - moved(&mut case, &mut w, down);
            at(&mut case, &mut w).as_slice_mut().unwrap()[i] = x;
            difference / (f64::from(up) - f64::from(down))
        })
        .collect()
}

fn assert_gradient(name: &str, got: &ArrayD<f32>, want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = f64::from(*g);
        assert!(
            (g - w).abs() <= 2e-5 + 1e-3 * w.abs(),
            "{name}[{i}]: backward {g}, differences of the reference {w}"
        );
    }
}

fn input_gradient(got: &Gradients, name: &str) -> ArrayD<f32> {
    let (_, g) = got.inputs.iter().find(|(n, _)| n == name).unwrap();
    g.clone().unwrap().into_array::<f32>().unwrap()
}

fn param_gradient<'a>(got: &'a Gradients, name: &str) -> &'a ArrayD<f32> {
    &got.params.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn gradients_match_differences_of_the_plain_reference_closely() {
    // A tighter check than gradcheck's: the reference shares no code with
    // the layer and runs in f64, so its differences are good to ~1e-6.
    let case = Case::new(Some(some_keys_masked()));
    let w = Weights::new(E, true);
    let g_out = filled(&[B, L, E], 2, 8.0);
    let g_w = filled(&[B, L, S], 9, 4.0);
    let got = Harness::new::<MultiheadAttention>(WITH_WEIGHTS)
        .unwrap()
        .gradients(
            case.inputs(),
            &w.params(),
            vec![
                (OUTPUT, g_out.clone().into()),
                (WEIGHTS, g_w.clone().into()),
            ],
        )
        .unwrap();
    let (g_out, g_w): (Vec<f64>, Vec<f64>) = (
        g_out.iter().map(|&x| x.into()).collect(),
        g_w.iter().map(|&x| x.into()).collect(),
    );
    let loss = |c: &Case, w: &Weights| reference_loss(c, w, HEADS, &g_out, &g_w);
    let inputs: [(&str, At); 3] = [
        (QUERY, |c, _| &mut c.query),
        (KEY, |c, _| &mut c.key),
        (VALUE, |c, _| &mut c.value),
    ];
    for (name, at) in inputs {
        let want = numeric_gradient(&case, &w, at, &loss);
        assert_gradient(name, &input_gradient(&got, name), &want);
    }
    let params: [(&str, At); 4] = [
        (IN_PROJ_WEIGHT, |_, w| &mut w.in_proj_weight),
        (IN_PROJ_BIAS, |_, w| w.in_proj_bias.as_mut().unwrap()),
        (OUT_PROJ_WEIGHT, |_, w| &mut w.out_proj_weight),
        (OUT_PROJ_BIAS, |_, w| w.out_proj_bias.as_mut().unwrap()),
    ];
    for (name, at) in params {
        let want = numeric_gradient(&case, &w, at, &loss);
        assert_gradient(name, param_gradient(&got, name), &want);
    }
}

#[test]
fn masked_keys_and_values_get_exactly_zero_gradient() {
    let mask = some_keys_masked();
    let case = Case::new(Some(mask.clone()));
    let got = Harness::new::<MultiheadAttention>(WITH_WEIGHTS)
        .unwrap()
        .gradients(
            case.inputs(),
            &Weights::new(E, true).params(),
            vec![
                (OUTPUT, filled(&[B, L, E], 2, 8.0).into()),
                (WEIGHTS, filled(&[B, L, S], 9, 4.0).into()),
            ],
        )
        .unwrap();
    for name in [KEY, VALUE] {
        let g = input_gradient(&got, name);
        for ((batch, j), &masked) in mask
            .view()
            .into_dimensionality::<Ix2>()
            .unwrap()
            .indexed_iter()
        {
            let row = g.slice(s![batch, j, ..]);
            if masked {
                assert!(row.iter().all(|&x| x == 0.0), "{name}[{batch}, {j}]: {row}");
            } else {
                assert!(row.iter().any(|&x| x != 0.0), "{name}[{batch}, {j}]: {row}");
            }
        }
    }
    // The mask input is bool: no gradient.
    let (_, g) = got
        .inputs
        .iter()
        .find(|(n, _)| n == KEY_PADDING_MASK)
        .unwrap();
    assert!(g.is_none());
}

#[test]
fn self_attention_gradient_is_the_sum_of_the_three_inputs() {
    // One tensor x as query, key and value (an encoder layer): the host
    // sums the three gradients; that sum must be the derivative with
    // respect to x, here from differences of the reference with x moved in
    // all three places at once.
    let mut case = Case::new(None);
    case.key = case.query.clone();
    case.value = case.query.clone();
    let w = Weights::new(E, true);
    let g_out = filled(&[B, L, E], 2, 8.0);
    let got = Harness::new::<MultiheadAttention>(r#"{"embed_dim": 8, "num_heads": 2}"#)
        .unwrap()
        .gradients(
            case.inputs(),
            &w.params(),
            vec![(OUTPUT, g_out.clone().into())],
        )
        .unwrap();
    let summed =
        input_gradient(&got, QUERY) + input_gradient(&got, KEY) + input_gradient(&got, VALUE);
    let g_out: Vec<f64> = g_out.iter().map(|&x| x.into()).collect();
    let loss = |c: &Case, w: &Weights| {
        let mut tied = c.clone();
        tied.key = c.query.clone();
        tied.value = c.query.clone();
        reference_loss(&tied, w, HEADS, &g_out, &[])
    };
    let want = numeric_gradient(&case, &w, |c, _| &mut c.query, &loss);
    assert_gradient("query + key + value", &summed, &want);
}

#[test]
fn empty_batches_and_queries_give_zero_gradients() {
    let w = Weights::new(E, true);
    let harness = Harness::new::<MultiheadAttention>(WITH_WEIGHTS).unwrap();
    for (b, l) in [(0, L), (B, 0)] {
        let case = sized_case(b, l, S, E, None);
        let got = harness
            .gradients(case.inputs(), &w.params(), vec![])
            .unwrap();
        assert_eq!(input_gradient(&got, KEY).shape(), [b, S, E]);
        assert!(input_gradient(&got, KEY).iter().all(|&x| x == 0.0));
        for (name, g) in &got.params {
            assert!(g.iter().all(|&x| x == 0.0), "{name}");
        }
    }
}

#[test]
fn gradients_refuse_a_row_with_every_key_masked() {
    // The harness runs forward first, which refuses the row; backward checks
    // the inputs with the same code (`operands`), so either says which row.
    let mut mask = some_keys_masked();
    mask.slice_mut(s![1, ..]).fill(true);
    let case = Case::new(Some(mask));
    let err = Harness::new::<MultiheadAttention>(WITH_WEIGHTS)
        .unwrap()
        .gradients(case.inputs(), &Weights::new(E, true).params(), vec![])
        .unwrap_err();
    assert!(err.contains("masks every key of batch row 1"), "{err}");
}
