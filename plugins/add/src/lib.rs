//! `add`: `output = a + b` element by element with NumPy broadcasting, as
//! `torch.add(a, b)` (or `a + b`) on `float32` tensors.
//!
//! * inputs: `a` and `b`, `float32`, any shapes that broadcast: aligned
//!   from the last axis, each pair of sizes equal or one of them 1, the
//!   shorter shape padded with 1s in front; so `(b, n, d) + (d,)` adds one
//!   vector to every row and `(4, 3, 5) + (4, 1, 5)` one row of `b` to
//!   three of `a`.
//! * output: `output`, `float32`, of the broadcast shape.
//!
//! Inputs of the same shape are added in one vectorized pass
//! (`layer_kernels::elementwise::add`). Shapes that do not broadcast are an
//! error naming both. Config: none
//! (`{}`). Parameters: none.
//!
//! Backward: each input's gradient is the output's, summed (in `f64`) over
//! the axes that input was broadcast along.
//!
//! Batch independence is claimed: when `a` and `b` both have the batch
//! axis (a residual `x + f(x)`), row `i` of the output is `a[i] + b[i]`.
//! An input without it, such as a `(d,)` vector or a scalar, is shared by
//! every row instead. `host check-plugin` cuts every input along axis 0 and
//! refuses inputs with different numbers of rows, so the declared probes
//! broadcast within rows (`(4, 3, 5) + (4, 1, 5)`) or against a scalar
//! (which it does not cut); `(b, n, d) + (d,)` is in the unit tests.

use layer_api::ndarray::{ArrayViewD, Axis, IxDyn, Zip};
use layer_api::{
    export_layer, DType, Grads, Inputs, MultiLayer, NoConfig, Outputs, Params, Plan, Probe,
    ProbeInput, Signature, TensorInfo,
};
use layer_kernels::elementwise::add;

pub struct Add;

/// The NumPy broadcast of two shapes, or an error naming both.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    // Size of axis `i` (counted in the output) of a shape padded with 1s.
    let size = |s: &[usize], i: usize| (i + s.len()).checked_sub(rank).map_or(1, |j| s[j]);
    (0..rank)
        .map(|i| match (size(a, i), size(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => Err(format!(
                "`a` of shape {a:?} and `b` of shape {b:?} do not broadcast: axis {} has \
                 sizes {x} and {y} (sizes must be equal or one of them 1, aligned from \
                 the last axis)",
                i as isize - rank as isize
            )),
        })
        .collect()
}

/// The gradient of an input of `shape` broadcast to `grad`'s shape: `grad`
/// summed over the leading axes the input lacks and over the axes where it
/// has size 1 and the output does not.
fn unbroadcast(grad: &ArrayViewD<'_, f32>, shape: &[usize]) -> Result<Vec<f64>, String> {
    let rank = grad.ndim();
    let lacking = rank
        .checked_sub(shape.len())
        .ok_or("an input has more axes than the output")?;
    let mut sum = grad.mapv(f64::from);
    // From the last axis back, so that removing one keeps the others' numbers.
    for axis in (0..rank).rev() {
        let size = axis.checked_sub(lacking).map_or(1, |i| shape[i]);
        if size == 1 && grad.len_of(Axis(axis)) != 1 {
            sum = sum.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        }
    }
    if sum.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "an input of shape {shape:?} does not broadcast to the output's {:?}",
            grad.shape()
        ));
    }
    // In logical C order: the input's own order, since the axes it lacks
    // are all of size 1 here.
    Ok(sum.iter().copied().collect())
}

impl MultiLayer for Add {
    const DESCRIPTION: &'static str = "output = a + b with NumPy broadcasting, as torch.add";
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(Add)
    }

    fn signature(&self) -> Signature {
        Signature::new()
            .input("a", [DType::F32])
            .input("b", [DType::F32])
            .output("output")
    }

    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String> {
        let [Some(a), Some(b)] = inputs else {
            return Err("takes two inputs, `a` and `b`".into());
        };
        let shape = broadcast_shape(&a.shape, &b.shape)?;
        Ok(Plan::new([TensorInfo::new(DType::F32, shape)]))
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn probes(&self) -> Vec<Probe> {
        let f32s = |shape: &[usize]| Some(ProbeInput::new(shape.to_vec()).dtype(DType::F32));
        [
            (&[4, 3, 5][..], &[4, 3, 5][..]),
            (&[4, 3, 5], &[4, 1, 5]),
            (&[4, 1, 5], &[4, 3, 1]),
            (&[6, 8], &[6, 1]),
            (&[4, 3, 5], &[]),
            (&[0, 3], &[0, 3]),
        ]
        .iter()
        .map(|(a, b)| Probe::new([f32s(a), f32s(b)]))
        .collect()
    }

    fn flops(&self, inputs: &[Option<TensorInfo>]) -> u64 {
        match inputs {
            [Some(a), Some(b)] => broadcast_shape(&a.shape, &b.shape)
                .map_or(0, |s| s.iter().product::<usize>() as u64),
            _ => 0,
        }
    }

    fn forward(
        &self,
        inputs: &Inputs<'_>,
        _params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        let a = inputs.get::<f32>("a")?;
        let b = inputs.get::<f32>("b")?;
        let mut output = outputs.take::<f32>("output")?;
        let shape = IxDyn(output.shape());
        let (Some(a), Some(b)) = (a.broadcast(shape.clone()), b.broadcast(shape)) else {
            return Err(broadcast_shape(a.shape(), b.shape())
                .err()
                .unwrap_or_else(|| "the output is not of the broadcast shape".into()));
        };
        // Same shapes (a residual connection): one vectorized pass.
        if let (Some(a), Some(b), Some(y)) = (a.as_slice(), b.as_slice(), output.as_slice_mut()) {
            return add(a, b, y);
        }
        Zip::from(&mut output)
            .and(&a)
            .and(&b)
            .for_each(|y, &a, &b| *y = a + b);
        Ok(())
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        inputs: &Inputs<'_>,
        _outputs: &Inputs<'_>,
        _params: &Params<'_>,
        grad_outputs: &Inputs<'_>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        let g = grad_outputs.get::<f32>("output")?;
        for name in ["a", "b"] {
            let Some(mut dx) = grads.input::<f32>(name)? else {
                continue;
            };
            let shape = inputs.get::<f32>(name)?.shape().to_vec();
            if dx.shape() == g.shape() {
                dx.assign(&g);
                continue;
            }
            let sum = unbroadcast(&g, &shape)?;
            dx.iter_mut().zip(sum).for_each(|(d, s)| *d = s as f32);
        }
        Ok(())
    }
}

export_layer!(Add);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD};
    use layer_api::testing::{gradcheck, Harness, Tensor, Tolerance};

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| ((i + seed) * 37 % 17) as f32 - 8.0)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    fn add(a: ArrayD<f32>, b: ArrayD<f32>) -> Result<ArrayD<f32>, String> {
        let harness = Harness::new::<Add>("{}")?;
        let mut out = harness.run(vec![("a", a.into()), ("b", b.into())], &[])?;
        let (name, y) = out.pop().unwrap();
        assert_eq!(name, "output");
        y.into_array::<f32>()
    }

    #[test]
    fn adds_same_shapes_by_hand() {
        let y = add(
            array![[1.0f32, 2.0], [3.0, 4.0]].into_dyn(),
            array![[10.0f32, 20.0], [30.0, -4.0]].into_dyn(),
        )
        .unwrap();
        assert_eq!(y, array![[11.0f32, 22.0], [33.0, 0.0]].into_dyn());
    }

    #[test]
    fn broadcasts_a_vector_over_b_n_d_like_a_loop() {
        let (bn, n, d) = (2, 3, 4);
        let a = filled(&[bn, n, d], 0);
        let b = filled(&[d], 5);
        let y = add(a.clone(), b.clone()).unwrap();
        assert_eq!(y.shape(), &[bn, n, d]);
        for i in 0..bn {
            for j in 0..n {
                for k in 0..d {
                    assert_eq!(y[[i, j, k]], a[[i, j, k]] + b[[k]], "[{i}, {j}, {k}]");
                }
            }
        }
        // The other way round gives the same.
        assert_eq!(add(b, a).unwrap(), y);
    }

    #[test]
    fn broadcasts_ones_on_both_sides_like_a_loop() {
        // (3, 1, 5) + (4, 1): both stretch, to (3, 4, 5).
        let a = filled(&[3, 1, 5], 1);
        let b = filled(&[4, 1], 2);
        let y = add(a.clone(), b.clone()).unwrap();
        assert_eq!(y.shape(), &[3, 4, 5]);
        for i in 0..3 {
            for j in 0..4 {
                for k in 0..5 {
                    assert_eq!(y[[i, j, k]], a[[i, 0, k]] + b[[j, 0]]);
                }
            }
        }
        // A scalar broadcasts to anything; an empty axis stays empty.
        let y = add(a.clone(), ArrayD::from_elem(IxDyn(&[]), 0.5)).unwrap();
        assert_eq!(y, a.mapv(|v| v + 0.5));
        let y = add(ArrayD::zeros(IxDyn(&[0, 3])), filled(&[1, 3], 0)).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
    }

    #[test]
    fn shapes_that_do_not_broadcast_are_an_error_naming_both() {
        let err = add(filled(&[2, 3, 4], 0), filled(&[3], 0)).unwrap_err();
        assert_eq!(
            err,
            "`a` of shape [2, 3, 4] and `b` of shape [3] do not broadcast: axis -1 has sizes \
             4 and 3 (sizes must be equal or one of them 1, aligned from the last axis)"
        );
        let err = add(filled(&[2, 4], 0), filled(&[3, 4], 0)).unwrap_err();
        assert!(err.contains("axis -2 has sizes 2 and 3"), "{err}");
        let err = add(filled(&[0], 0), filled(&[2], 0)).unwrap_err();
        assert!(err.contains("sizes 0 and 2"), "{err}");
    }

    #[test]
    fn inputs_must_be_float32() {
        let harness = Harness::new::<Add>("{}").unwrap();
        let err = harness
            .run(
                vec![
                    ("a", filled(&[2], 0).into()),
                    ("b", Tensor::from(array![1i64, 2].into_dyn())),
                ],
                &[],
            )
            .unwrap_err();
        assert!(err.contains("int64"), "{err}");
    }

    /// The gradients of `a` and `b` for output gradient `g`.
    fn input_gradients(
        a: ArrayD<f32>,
        b: ArrayD<f32>,
        g: ArrayD<f32>,
    ) -> (ArrayD<f32>, ArrayD<f32>) {
        let harness = Harness::new::<Add>("{}").unwrap();
        let got = harness
            .gradients(
                vec![("a", a.into()), ("b", b.into())],
                &[],
                vec![("output", g.into())],
            )
            .unwrap();
        let grad = |i: usize| {
            got.inputs[i]
                .1
                .clone()
                .unwrap()
                .into_array::<f32>()
                .unwrap()
        };
        (grad(0), grad(1))
    }

    #[test]
    fn backward_sums_over_broadcast_axes_by_hand() {
        // (2, 3) + (3,): a's gradient is g, b's the column sums.
        let g = array![[1.0f32, 2.0, 3.0], [10.0, 20.0, 30.0]].into_dyn();
        let (da, db) = input_gradients(filled(&[2, 3], 0), filled(&[3], 1), g.clone());
        assert_eq!(da, g);
        assert_eq!(db, array![11.0f32, 22.0, 33.0].into_dyn());
        // (2, 1) + (1, 3): row sums for a, column sums for b.
        let (da, db) = input_gradients(filled(&[2, 1], 0), filled(&[1, 3], 1), g.clone());
        assert_eq!(da, array![[6.0f32], [60.0]].into_dyn());
        assert_eq!(db, array![[11.0f32, 22.0, 33.0]].into_dyn());
        // A scalar gets the sum of everything.
        let (_, db) = input_gradients(filled(&[2, 3], 0), ArrayD::zeros(IxDyn(&[])), g);
        assert_eq!(db, ArrayD::from_elem(IxDyn(&[]), 66.0f32));
    }

    #[test]
    fn backward_matches_finite_differences_for_each_broadcast() {
        for (a, b) in [
            (&[2, 3, 4][..], &[2, 3, 4][..]),
            (&[2, 3, 4], &[4]),
            (&[2, 1, 4], &[3, 1]),
            (&[2, 3, 4], &[]),
            (&[1, 4], &[2, 3, 1]),
        ] {
            let harness = Harness::new::<Add>("{}").unwrap();
            let inputs = vec![("a", filled(a, 0).into()), ("b", filled(b, 3).into())];
            gradcheck(&harness, inputs, &[], Tolerance::F32)
                .unwrap_or_else(|e| panic!("{a:?} + {b:?}: {e}"));
        }
    }
}
