//! `multihead_attention`: `torch.nn.MultiheadAttention(embed_dim, num_heads,
//! batch_first=True)` in eval mode (no dropout), in float32.
//!
//! Inputs, batch first:
//!
//! | input | type | shape |
//! | --- | --- | --- |
//! | `query` | float32 | `(b, L, E)` |
//! | `key` | float32 | `(b, S, E)` |
//! | `value` | float32 | `(b, S, E)` |
//! | `key_padding_mask` (optional) | bool | `(b, S)`; `true` means "ignore this key", torch's bool convention |
//!
//! Outputs: `output`, float32 `(b, L, E)`; with `"need_weights": true` also
//! `weights`, float32 `(b, L, S)`: the attention weights averaged over the
//! heads, as torch's `average_attn_weights=True` returns them.
//!
//! Config: `embed_dim` (E) and `num_heads` (H), both at least 1, E divisible
//! by H (each head gets `d = E / H` features); `bias` (default true, as in
//! torch); `need_weights` (default false: an encoder layer does not ask for
//! them, and leaving them out saves the averaging). Unknown fields are
//! refused. torch's `kdim`, `vdim`, `add_bias_kv`, `add_zero_attn` and
//! `dropout` are not supported: `key` and `value` must have E features too.
//!
//! What it computes, for each batch row: `q = query · Wqᵀ + bq`, `k`, `v`
//! likewise (`Wq`, `Wk`, `Wv` the three row blocks of `in_proj_weight`,
//! `bq`, `bk`, `bv` those of `in_proj_bias`); per head `h`, on features
//! `h·d .. (h+1)·d`: `scores = (q_h / √d) · k_hᵀ`, masked keys set to `-inf`,
//! a softmax over the keys (the row maximum subtracted first), then
//! `attn · v_h`; the heads' results concatenated, then
//! `output = context · Woutᵀ + bout`.
//!
//! How: `prepare` stores the projection weights transposed, as the matrix
//! kernels ([`layer_kernels::matmul`]) read them in place, with `1/√d`
//! folded into the q block. Each projection is one product over the
//! positions of a block of batch rows (about 512 positions); the scores,
//! softmax and `attn · v` then run per batch row and head, the softmax a
//! float32 one ([`layer_kernels::attention::masked_softmax`], as torch's
//! CPU softmax is float32 too).
//!
//! Parameters, named and laid out as torch's `state_dict`, so a saved
//! `nn.MultiheadAttention` loads as it is; defaults as torch's
//! `_reset_parameters` (a model file may override them with `"init"`):
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `in_proj_weight` | `(3E, E)` | `xavier_uniform` (gain 1): uniform on `±√(6 / 4E)` | in E, out 3E (torch's, for a `(3E, E)` matrix) |
//! | `in_proj_bias` (unless `"bias": false`) | `(3E,)` | `zeros` | in and out 3E |
//! | `out_proj.weight` | `(E, E)` | `kaiming_uniform` (fan in, gain `√(1/3)`): uniform on `±1/√E`, as `nn.Linear`'s `kaiming_uniform_(a = √5)` | in E, out E |
//! | `out_proj.bias` (unless `"bias": false`) | `(E,)` | `zeros` | in and out E |
//!
//! Decisions where torch is no guide or no good one:
//!
//! * Unbatched inputs (`query` of rank 2, `(L, E)`), which torch accepts,
//!   are refused with a message saying to add a batch axis of 1. The layer
//!   is batch-independent along axis 0, so the host may split axis 0 across
//!   threads; for an unbatched input that axis would be the sequence, whose
//!   rows are not independent.
//! * A batch row whose `key_padding_mask` masks every key is an error naming
//!   the row (`key_padding_mask masks every key of batch row 3; at least one
//!   key must be visible`). torch's math path returns NaN for every query of
//!   that row (a softmax over nothing but `-inf`): no answer a caller can
//!   use, and a NaN is found far from its cause.
//! * `key` and `value` with no positions (S = 0) are refused for the same
//!   reason: there is no key to attend to. `b = 0` and `L = 0` are fine and
//!   give empty outputs.
//! * Only a bool `key_padding_mask` is accepted, not torch's additive float
//!   mask; `attn_mask` and `is_causal` are not supported.
//!
//! Backward (the layer offers it, so it can be trained through): the
//! gradient of `query`, `key` and `value` (each on its own: where one
//! tensor feeds several of them, as in self-attention, the host sums) and
//! of every parameter, from the gradient of `output` and, with
//! `need_weights`, of `weights` (each head's attention gets `1/H` of it).
//! `backward` keeps nothing from `forward`: it recomputes q, k, v and each
//! head's attention from the inputs and parameters, then goes back through
//! the out-projection (`d context = d output · Wout`, `d Wout += d outputᵀ ·
//! context`, `d bout += Σ d output`), each head (`d attn = d context_h ·
//! v_hᵀ`, `d v_h = attnᵀ · d context_h`; the softmax's
//! `d scores = attn ⊙ (d attn − Σ_keys attn ⊙ d attn)`; `d q_h = d scores ·
//! k_h`, `d k_h = d scoresᵀ · q_h`), the scaling by `1/√d`, and the
//! in-projections (`d x = d q · Wq`, `d Wq += d qᵀ · x`, `d bq += Σ d q`,
//! likewise for k and v, except that `d bk` is written as exactly 0: the
//! key bias adds the same `q · bk` to every score of a query, which the
//! softmax ignores, so summing `d k` would give only rounding noise, and
//! Adam would turn that noise into steps of size lr). A masked key has attention exactly 0, so it, its
//! value and their inputs' rows get no gradient from it (exactly zero).
//! The same inputs are refused as by `forward` (a row with every key masked
//! included). With `L = 0` nothing depends on anything: every gradient is
//! zero. The bool `key_padding_mask` has no gradient.
//!
//! Batch-independent: each batch row is computed on its own (its own
//! heads and mask; a projection's rows do not depend on which other rows
//! share the product, and no product has a single row unless the batch
//! does), so a batch split into pieces of two rows or more gives the same
//! bits as the whole.
//!
//! Floating-point operations (`flops`), per batch row, multiply-add as two:
//! the four projections `2·(2L + 2S)·E²` (plus `(2L + 2S)·E` bias additions
//! when `bias`; q's scaling by `1/√d` is folded into the prepared weights),
//! scores and `attn · v` `2·L·S·E` each, the
//! softmax `5·H·L·S` (maximum, subtraction, exponential, sum, division: an
//! exponential counts as one), and with `need_weights` the head average
//! `H·L·S`.

use layer_api::{
    export_layer, DType, FanMode, Grads, Init, Inputs, MultiLayer, Outputs, ParamSpec, Params,
    Plan, Probe, ProbeInput, Signature, TensorInfo,
};
use layer_kernels::attention::masked_softmax;
use layer_kernels::dense::{self, Epilogue, PackedWeights};
use layer_kernels::matmul;
use ndarray::{
    s, Array1, Array2, ArrayView, ArrayView1, ArrayView2, ArrayView3, ArrayViewD, ArrayViewMut,
    ArrayViewMut2, ArrayViewMut3, ArrayViewMutD, Axis, Dimension, Ix1, Ix2, Ix3,
};
use serde::Deserialize;
use std::borrow::Cow;
use std::ops::Range;

/// Input and output names.
pub const QUERY: &str = "query";
pub const KEY: &str = "key";
pub const VALUE: &str = "value";
pub const KEY_PADDING_MASK: &str = "key_padding_mask";
pub const OUTPUT: &str = "output";
pub const WEIGHTS: &str = "weights";

/// Parameter names, as torch's `state_dict` spells them.
pub const IN_PROJ_WEIGHT: &str = "in_proj_weight";
pub const IN_PROJ_BIAS: &str = "in_proj_bias";
pub const OUT_PROJ_WEIGHT: &str = "out_proj.weight";
pub const OUT_PROJ_BIAS: &str = "out_proj.bias";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiheadAttentionConfig {
    /// E: features of query, key, value and output.
    pub embed_dim: usize,
    /// H: number of heads; must divide `embed_dim`.
    pub num_heads: usize,
    /// Whether the projections add biases (default true, as in torch).
    #[serde(default = "yes")]
    pub bias: bool,
    /// Whether to output `weights`, the attention averaged over heads.
    #[serde(default)]
    pub need_weights: bool,
}

fn yes() -> bool {
    true
}

pub struct MultiheadAttention {
    embed_dim: usize,
    num_heads: usize,
    bias: bool,
    need_weights: bool,
}

/// The sizes a set of inputs gives: batch rows b, queries L, keys S.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sizes {
    batch: usize,
    target: usize,
    source: usize,
}

impl MultiheadAttention {
    fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// `(b, n)` of a `(b, n, E)` input, or why its shape is wrong.
    fn sequence(&self, name: &str, shape: &[usize]) -> Result<(usize, usize), String> {
        let e = self.embed_dim;
        match *shape {
            [b, n, features] if features == e => Ok((b, n)),
            [_, _, features] => Err(format!(
                "`{name}` has {features} features on its last axis (shape {shape:?}), but \
                 `embed_dim` is {e}; query, key and value must all have embed_dim features"
            )),
            [n, features] => Err(format!(
                "`{name}` has shape {shape:?}: unbatched (L, E) inputs are not supported; add a \
                 batch axis of 1, ({}) (axis 0 must be the batch: the host may split it \
                 across threads)",
                [1, n, features].map(|d| d.to_string()).join(", ")
            )),
            _ => Err(format!(
                "`{name}` must have shape (b, n, {e}), batch first; got {shape:?}"
            )),
        }
    }

    /// Checks the inputs agree with each other and the config.
    fn sizes(&self, inputs: &[Option<TensorInfo>]) -> Result<Sizes, String> {
        let [Some(query), Some(key), Some(value), mask] = inputs else {
            return Err(format!(
                "takes `{QUERY}`, `{KEY}` and `{VALUE}`, and optionally \
                 `{KEY_PADDING_MASK}`; the host passed {} inputs",
                inputs.len()
            ));
        };
        let (batch, target) = self.sequence(QUERY, &query.shape)?;
        let (key_batch, source) = self.sequence(KEY, &key.shape)?;
        let (value_batch, value_source) = self.sequence(VALUE, &value.shape)?;
        for (name, rows, shape) in [
            (KEY, key_batch, &key.shape),
            (VALUE, value_batch, &value.shape),
        ] {
            if rows != batch {
                return Err(format!(
                    "`{name}` has {rows} batch rows (shape {shape:?}), but `{QUERY}` has {batch} \
                     (shape {:?}); query, key and value must have the same batch size",
                    query.shape
                ));
            }
        }
        if value_source != source {
            return Err(format!(
                "`{VALUE}` has {value_source} positions (shape {:?}), but `{KEY}` has {source} \
                 (shape {:?}); key and value must have the same length S",
                value.shape, key.shape
            ));
        }
        if source == 0 {
            return Err(format!(
                "`{KEY}` and `{VALUE}` have no positions (S = 0, shape {:?}): every query \
                 needs at least one key to attend to",
                key.shape
            ));
        }
        if let Some(mask) = mask {
            if mask.shape != [batch, source] {
                return Err(format!(
                    "`{KEY_PADDING_MASK}` has shape {:?}, but must be (b, S) = ({batch}, \
                     {source}), one flag per key of each batch row",
                    mask.shape
                ));
            }
        }
        Ok(Sizes {
            batch,
            target,
            source,
        })
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let e = self.embed_dim;
        let mut specs = vec![ParamSpec::new(
            IN_PROJ_WEIGHT,
            [3 * e, e],
            Init::XavierUniform { gain: 1.0 },
        )
        .fans(e, 3 * e)];
        if self.bias {
            specs.push(ParamSpec::new(IN_PROJ_BIAS, [3 * e], Init::Zeros));
        }
        specs.push(
            ParamSpec::new(
                OUT_PROJ_WEIGHT,
                [e, e],
                Init::KaimingUniform {
                    mode: FanMode::FanIn,
                    gain: (1.0f32 / 3.0).sqrt(),
                },
            )
            .fans(e, e),
        );
        if self.bias {
            specs.push(ParamSpec::new(OUT_PROJ_BIAS, [e], Init::Zeros));
        }
        specs
    }

    /// The inputs as views, checked against each other and the config
    /// (every batch row must keep a key visible).
    fn operands<'a>(&self, inputs: &Inputs<'a>) -> Result<Operands<'a>, String> {
        let input3 = |name: &str| {
            inputs
                .get::<f32>(name)?
                .into_dimensionality::<Ix3>()
                .map_err(|e| format!("`{name}`: {e}"))
        };
        let (query, key, value) = (input3(QUERY)?, input3(KEY)?, input3(VALUE)?);
        let mask = inputs
            .optional::<bool>(KEY_PADDING_MASK)?
            .map(|m| m.into_dimensionality::<Ix2>())
            .transpose()
            .map_err(|e| format!("`{KEY_PADDING_MASK}`: {e}"))?;
        let sizes = self.sizes(&[
            Some(TensorInfo::new(DType::F32, query.shape())),
            Some(TensorInfo::new(DType::F32, key.shape())),
            Some(TensorInfo::new(DType::F32, value.shape())),
            mask.as_ref()
                .map(|m| TensorInfo::new(DType::BOOL, m.shape())),
        ])?;
        if let Some(mask) = &mask {
            if let Some(row) = mask.outer_iter().position(|keys| keys.iter().all(|&m| m)) {
                return Err(format!(
                    "{KEY_PADDING_MASK} masks every key of batch row {row}; at least one key \
                     must be visible"
                ));
            }
        }
        Ok(Operands {
            query,
            key,
            value,
            mask,
            sizes,
        })
    }

    /// The raw weights, `in_proj_weight` split into its q, k and v row
    /// blocks, checked against the config.
    fn projections<'a>(&self, params: &Params<'a>) -> Result<Projections<'a>, String> {
        let e = self.embed_dim;
        let w_in = params.get::<Ix2>(IN_PROJ_WEIGHT)?;
        if w_in.dim() != (3 * e, e) {
            return Err(format!(
                "parameter `{IN_PROJ_WEIGHT}` has shape {:?}, not (3E, E) = ({}, {e})",
                w_in.shape(),
                3 * e
            ));
        }
        let w_out = params.get::<Ix2>(OUT_PROJ_WEIGHT)?;
        if w_out.dim() != (e, e) {
            return Err(format!(
                "parameter `{OUT_PROJ_WEIGHT}` has shape {:?}, not (E, E) = ({e}, {e})",
                w_out.shape()
            ));
        }
        let w_block = |i: usize| w_in.slice_move(s![block(e, i), ..]);
        Ok(Projections {
            wq: w_block(0),
            wk: w_block(1),
            wv: w_block(2),
            w_out,
        })
    }

    /// A bias parameter when the config has biases, checked to have `len`
    /// elements.
    fn bias<'a>(
        &self,
        params: &Params<'a>,
        name: &str,
        len: usize,
    ) -> Result<Option<ArrayView1<'a, f32>>, String> {
        if !self.bias {
            return Ok(None);
        }
        let b = params.get::<Ix1>(name)?;
        if b.len() != len {
            return Err(format!(
                "parameter `{name}` has shape {:?}, not ({len},)",
                b.shape()
            ));
        }
        Ok(Some(b))
    }

    /// The weights as the products read them (see [`PreparedWeights`]).
    fn prepared_weights(&self, params: &Params<'_>) -> Result<PreparedWeights, String> {
        let (e, d) = (self.embed_dim, self.head_dim());
        let Projections { w_out, .. } = self.projections(params)?;
        let w_in = params.get::<Ix2>(IN_PROJ_WEIGHT)?;
        // torch scales q by √(1/d), computed in double, after adding bq.
        let scale = (1.0 / d as f64).sqrt() as f32;
        let mut w_in_t = w_in.t().as_standard_layout().into_owned();
        w_in_t
            .slice_mut(s![.., block(e, 0)])
            .mapv_inplace(|w| w * scale);
        let b_in = self.bias(params, IN_PROJ_BIAS, 3 * e)?.map(|b| {
            let mut b = b.to_owned();
            b.slice_mut(s![block(e, 0)]).mapv_inplace(|b| b * scale);
            b
        });
        let pack = |i: usize| PackedWeights::pack(w_in_t.slice(s![.., block(e, i)]));
        Ok(PreparedWeights {
            w_in: [pack(0)?, pack(1)?, pack(2)?],
            b_in,
            w_out: PackedWeights::pack(w_out.t())?,
            b_out: self.bias(params, OUT_PROJ_BIAS, e)?.map(|b| b.to_owned()),
        })
    }
}

/// The inputs of one call, as views, and the sizes they give.
struct Operands<'a> {
    query: ArrayView3<'a, f32>,
    key: ArrayView3<'a, f32>,
    value: ArrayView3<'a, f32>,
    mask: Option<ArrayView2<'a, bool>>,
    sizes: Sizes,
}

/// The raw parameters backward reads: `Wq`, `Wk`, `Wv` (each `(E, E)`),
/// the row blocks of `in_proj_weight`, and `out_proj.weight`, laid out
/// `(out, in)` as torch's.
struct Projections<'a> {
    wq: ArrayView2<'a, f32>,
    wk: ArrayView2<'a, f32>,
    wv: ArrayView2<'a, f32>,
    w_out: ArrayView2<'a, f32>,
}

/// What `prepare` derives from one parameter set: the projection weights
/// transposed to `(in, out)` and packed for the kernels' dense product
/// (`layer_kernels::dense`), which adds each bias while the output is in
/// registers, with torch's scaling of q by `1/√d` folded into the q
/// block's weights and bias (for `d` a power of 4, as the usual 16 or 64,
/// the scaling is by a power of 2 and the bits are those of scaling q
/// afterwards). About 4E² + 4E floats: 64 KiB for E = 64.
struct PreparedWeights {
    /// `s·Wqᵀ`, `Wkᵀ`, `Wvᵀ`, each `(E, E)`.
    w_in: [PackedWeights; 3],
    /// `(3E,)`: `[s·bq, bk, bv]`.
    b_in: Option<Array1<f32>>,
    /// `(E, E)`: `Woutᵀ`.
    w_out: PackedWeights,
    b_out: Option<Array1<f32>>,
}

impl PreparedWeights {
    /// Block `i` of the in-projection (q 0, k 1, v 2): `y = x · Wᵢᵀ + bᵢ`,
    /// q scaled by `1/√d`.
    fn project_in(
        &self,
        i: usize,
        x: ArrayView2<'_, f32>,
        y: ArrayViewMut2<'_, f32>,
    ) -> Result<(), String> {
        let e = self.w_out.dim().0;
        let b = self.b_in.as_ref().map(|b| b.slice(s![block(e, i)]));
        project(x, &self.w_in[i], b, y)
    }

    /// `output = context · Woutᵀ + bout`.
    fn project_out(
        &self,
        context: ArrayView2<'_, f32>,
        output: ArrayViewMut2<'_, f32>,
    ) -> Result<(), String> {
        project(
            context,
            &self.w_out,
            self.b_out.as_ref().map(|b| b.view()),
            output,
        )
    }
}

/// Rows (or elements) of block `i` (q 0, k 1, v 2) of the in-projection.
fn block(e: usize, i: usize) -> std::ops::Range<usize> {
    i * e..(i + 1) * e
}

/// `y = x · w + b`, `w` packed from `(in, out)`.
fn project(
    x: ArrayView2<'_, f32>,
    w: &PackedWeights,
    b: Option<ArrayView1<'_, f32>>,
    y: ArrayViewMut2<'_, f32>,
) -> Result<(), String> {
    let epilogue = match &b {
        Some(b) => Epilogue::Bias(b.as_slice().ok_or("a bias is not contiguous")?),
        None => Epilogue::None,
    };
    dense::product(x, w, y, epilogue)
}

/// One head of one batch row: `probs = softmax(q_h · k_hᵀ)` over the keys,
/// masked keys getting weight exactly 0 (q already scaled), and `context_h
/// = probs · v_h`. `probs` is a contiguous `(L, S)` buffer.
fn attend(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    masked: Option<&[bool]>,
    mut probs: ArrayViewMut2<'_, f32>,
    context: ArrayViewMut2<'_, f32>,
) -> Result<(), String> {
    matmul(q, k.t(), probs.view_mut())?;
    let keys = probs.ncols();
    let scores = probs
        .as_slice_mut()
        .ok_or("the score buffer is not contiguous")?;
    masked_softmax(scores, keys, masked)?;
    matmul(probs.view(), v, context)
}

/// The mask flags of batch row `row`, one per key (`true`: ignore it).
fn mask_row<'m>(mask: &'m Option<ArrayView2<'_, bool>>, row: usize) -> Option<Cow<'m, [bool]>> {
    mask.as_ref().map(|m| {
        let flags = m.row(row);
        match flags.to_slice() {
            Some(flags) => Cow::Borrowed(flags),
            None => Cow::Owned(flags.to_vec()),
        }
    })
}

/// Rows `rows` of a `(b, n, E)` tensor as one `(rows · n, E)` matrix.
fn batch_rows<'v>(
    name: &str,
    x: &'v ArrayView3<'_, f32>,
    rows: Range<usize>,
) -> Result<ArrayView2<'v, f32>, String> {
    let (n, e) = (x.dim().1, x.dim().2);
    x.slice(s![rows.clone(), .., ..])
        .into_shape_with_order((rows.len() * n, e))
        .map_err(|err| format!("`{name}` is not laid out contiguously: {err}"))
}

/// Projected positions per block of batch rows in `forward`: enough rows
/// for the matrix kernels to run at full speed (512 × 64 by 64 × 64 is as
/// fast as 8192 × 64), few enough that a block's q, k, v and context stay
/// in a 1 MiB L2 cache at E = 64, rather than the whole batch's going
/// through memory.
const BLOCK_POSITIONS: usize = 512;

/// `forward`'s blocks of batch rows: about [`BLOCK_POSITIONS`] positions
/// each, and at least two rows each unless the batch has one. A product
/// of a single row takes the kernels' matrix-vector path, which rounds
/// differently; with sequences of one position a leftover row alone would
/// then not give the bits it gives when the host splits the batch
/// otherwise (pieces of two rows or more).
fn batch_blocks(batch: usize, positions: usize) -> impl Iterator<Item = Range<usize>> {
    let per_block = (BLOCK_POSITIONS / positions.max(1)).max(2);
    let blocks = (batch / per_block).max(1);
    (0..blocks).map(move |i| {
        let end = if i + 1 == blocks {
            batch
        } else {
            (i + 1) * per_block
        };
        i * per_block..end
    })
}

/// Each row of `grad` (the gradient of softmax output `probs`) becomes the
/// gradient of the softmax's input: `p ⊙ (g − Σ p·g)`. Masked keys have
/// `p = 0`, so they get 0.
fn softmax_backward(probs: ArrayView2<'_, f32>, mut grad: ArrayViewMut2<'_, f32>) {
    for (p, mut g) in probs.rows().into_iter().zip(grad.rows_mut()) {
        let dot: f32 = p.iter().zip(g.iter()).map(|(&p, &g)| p * g).sum();
        g.zip_mut_with(&p, |g, &p| *g = p * (*g - dot));
    }
}

/// `t` (`what` of `name`, for messages) as dimension `D`, checked to have
/// `shape`.
fn shaped<'a, D: Dimension>(
    what: &str,
    name: &str,
    t: ArrayViewD<'a, f32>,
    shape: &[usize],
) -> Result<ArrayView<'a, f32, D>, String> {
    if t.shape() != shape {
        return Err(format!(
            "the {what} `{name}` has shape {:?}, not {shape:?}",
            t.shape()
        ));
    }
    t.into_dimensionality::<D>()
        .map_err(|e| format!("the {what} `{name}`: {e}"))
}

/// As [`shaped`], for a gradient buffer.
fn shaped_mut<'a, D: Dimension>(
    name: &str,
    t: ArrayViewMutD<'a, f32>,
    shape: &[usize],
) -> Result<ArrayViewMut<'a, f32, D>, String> {
    if t.shape() != shape {
        return Err(format!(
            "the gradient of `{name}` has shape {:?}, not {shape:?}",
            t.shape()
        ));
    }
    t.into_dimensionality::<D>()
        .map_err(|e| format!("the gradient of `{name}`: {e}"))
}

/// The gradient buffer of input `name`, if the host wants it.
fn input_grad<'a>(
    grads: &mut Grads<'a>,
    name: &str,
    shape: &[usize],
) -> Result<Option<ArrayViewMut3<'a, f32>>, String> {
    grads
        .input::<f32>(name)?
        .map(|g| shaped_mut(name, g, shape))
        .transpose()
}

/// The gradient buffer of parameter `name`, if the host wants it.
fn param_grad<'a, D: Dimension>(
    grads: &mut Grads<'a>,
    name: &str,
    shape: &[usize],
) -> Result<Option<ArrayViewMut<'a, f32, D>>, String> {
    grads
        .param(name)?
        .map(|g| shaped_mut(name, g, shape))
        .transpose()
}

impl MultiLayer for MultiheadAttention {
    const DESCRIPTION: &'static str =
        "attention of query over key/value in num_heads heads, as torch.nn.MultiheadAttention \
         (batch_first=True, eval)";
    type Config = MultiheadAttentionConfig;

    fn new(config: MultiheadAttentionConfig) -> Result<Self, String> {
        let (e, h) = (config.embed_dim, config.num_heads);
        if e == 0 {
            return Err("`embed_dim` must be at least 1".into());
        }
        if h == 0 {
            return Err("`num_heads` must be at least 1".into());
        }
        if e % h != 0 {
            return Err(format!(
                "`embed_dim` ({e}) must be divisible by `num_heads` ({h}): each head gets \
                 embed_dim / num_heads features"
            ));
        }
        Ok(MultiheadAttention {
            embed_dim: e,
            num_heads: h,
            bias: config.bias,
            need_weights: config.need_weights,
        })
    }

    fn signature(&self) -> Signature {
        let signature = Signature::new()
            .input(QUERY, [DType::F32])
            .input(KEY, [DType::F32])
            .input(VALUE, [DType::F32])
            .optional_input(KEY_PADDING_MASK, [DType::BOOL])
            .output(OUTPUT);
        if self.need_weights {
            signature.output(WEIGHTS)
        } else {
            signature
        }
    }

    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String> {
        let Sizes {
            batch,
            target,
            source,
        } = self.sizes(inputs)?;
        let mut outputs = vec![TensorInfo::new(DType::F32, [batch, target, self.embed_dim])];
        if self.need_weights {
            outputs.push(TensorInfo::new(DType::F32, [batch, target, source]));
        }
        Ok(Plan::new(outputs).params(self.param_specs()))
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn probes(&self) -> Vec<Probe> {
        let e = self.embed_dim;
        let sequence = |b: usize, n: usize| Some(ProbeInput::new([b, n, e]).dtype(DType::F32));
        // A mask drawn from [0, 1) is all false: the checker's values could
        // otherwise mask every key of a row, which this layer refuses.
        // Masking itself is covered by the unit tests.
        let unmasked =
            |b: usize, s: usize| Some(ProbeInput::new([b, s]).dtype(DType::BOOL).range(0, 1));
        // L ≠ S, so that a transposed score matrix would not fit; four batch
        // rows, so that the checker also splits the batch in two pieces.
        vec![
            Probe::new([sequence(4, 3), sequence(4, 5), sequence(4, 5), None]),
            Probe::new([
                sequence(4, 3),
                sequence(4, 5),
                sequence(4, 5),
                unmasked(4, 5),
            ]),
            Probe::new([sequence(2, 1), sequence(2, 1), sequence(2, 1), None]),
            Probe::new([sequence(0, 3), sequence(0, 5), sequence(0, 5), None]),
        ]
    }

    fn prepare(
        &self,
        _inputs: &[Option<TensorInfo>],
        params: &Params<'_>,
    ) -> Result<Option<layer_api::Prepared>, String> {
        Ok(Some(Box::new(self.prepared_weights(params)?)))
    }

    fn forward(
        &self,
        inputs: &Inputs<'_>,
        params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        let Operands {
            query,
            key,
            value,
            mask,
            sizes:
                Sizes {
                    batch,
                    target,
                    source,
                },
        } = self.operands(inputs)?;
        let (e, heads, d) = (self.embed_dim, self.num_heads, self.head_dim());
        let prepared = params.prepared::<PreparedWeights>()?;

        let mut output = outputs
            .take::<f32>(OUTPUT)?
            .into_dimensionality::<Ix3>()
            .map_err(|e| format!("`{OUTPUT}`: {e}"))?;
        let mut weights = if self.need_weights {
            Some(
                outputs
                    .take::<f32>(WEIGHTS)?
                    .into_dimensionality::<Ix3>()
                    .map_err(|e| format!("`{WEIGHTS}`: {e}"))?,
            )
        } else {
            None
        };

        // Each block's projections are one product over all its rows'
        // positions; then each batch row and head on its own.
        let blocks: Vec<_> = batch_blocks(batch, target.max(source)).collect();
        let most = blocks.iter().map(|rows| rows.len()).max().unwrap_or(0);
        let mut q = Array2::<f32>::zeros((most * target, e));
        let mut k = Array2::<f32>::zeros((most * source, e));
        let mut v = Array2::<f32>::zeros((most * source, e));
        let mut context = Array2::<f32>::zeros((most * target, e));
        let mut probs = Array2::<f32>::zeros((target, source));
        for rows in blocks {
            let n = rows.len();
            let (mut q, mut k, mut v, mut context) = (
                q.slice_mut(s![..n * target, ..]),
                k.slice_mut(s![..n * source, ..]),
                v.slice_mut(s![..n * source, ..]),
                context.slice_mut(s![..n * target, ..]),
            );
            prepared.project_in(0, batch_rows(QUERY, &query, rows.clone())?, q.view_mut())?;
            prepared.project_in(1, batch_rows(KEY, &key, rows.clone())?, k.view_mut())?;
            prepared.project_in(2, batch_rows(VALUE, &value, rows.clone())?, v.view_mut())?;
            for (i, row) in rows.clone().enumerate() {
                let keys_masked = mask_row(&mask, row);
                let queries = s![i * target..(i + 1) * target, ..];
                let keys = s![i * source..(i + 1) * source, ..];
                let (q, k, v) = (q.slice(queries), k.slice(keys), v.slice(keys));
                let mut context = context.slice_mut(queries);
                let mut weights = weights.as_mut().map(|w| w.index_axis_mut(Axis(0), row));
                for head in 0..heads {
                    let features = s![.., head * d..(head + 1) * d];
                    attend(
                        q.slice(features),
                        k.slice(features),
                        v.slice(features),
                        keys_masked.as_deref(),
                        probs.view_mut(),
                        context.slice_mut(features),
                    )?;
                    if let Some(weights) = weights.as_mut() {
                        if head == 0 {
                            weights.assign(&probs);
                        } else {
                            *weights += &probs;
                        }
                    }
                }
                if let Some(weights) = weights.as_mut() {
                    let h = heads as f32;
                    weights.mapv_inplace(|total| total / h);
                }
            }
            let output = output
                .slice_mut(s![rows.clone(), .., ..])
                .into_shape_with_order((n * target, e))
                .map_err(|err| format!("`{OUTPUT}` is not laid out contiguously: {err}"))?;
            prepared.project_out(context.view(), output)?;
        }
        Ok(())
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        inputs: &Inputs<'_>,
        _outputs: &Inputs<'_>,
        params: &Params<'_>,
        grad_outputs: &Inputs<'_>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        // What forward computed is recomputed here from the inputs and the
        // parameters: nothing is kept between calls.
        let Operands {
            query,
            key,
            value,
            mask,
            sizes:
                Sizes {
                    batch,
                    target,
                    source,
                },
        } = self.operands(inputs)?;
        let (e, heads, d) = (self.embed_dim, self.num_heads, self.head_dim());
        let Projections { wq, wk, wv, w_out } = self.projections(params)?;
        let prepared = params.prepared::<PreparedWeights>()?;

        let grad_output = shaped::<Ix3>(
            "output gradient",
            OUTPUT,
            grad_outputs.get::<f32>(OUTPUT)?,
            &[batch, target, e],
        )?;
        // Present when the layer outputs the weights (a float output, so the
        // host gives its gradient; left out, it counts as zero).
        let grad_weights = if self.need_weights {
            grad_outputs
                .optional::<f32>(WEIGHTS)?
                .map(|g| shaped::<Ix3>("output gradient", WEIGHTS, g, &[batch, target, source]))
                .transpose()?
        } else {
            None
        };

        let mut grad_query = input_grad(grads, QUERY, &[batch, target, e])?;
        let mut grad_key = input_grad(grads, KEY, &[batch, source, e])?;
        let mut grad_value = input_grad(grads, VALUE, &[batch, source, e])?;
        let mut grad_w_in = param_grad::<Ix2>(grads, IN_PROJ_WEIGHT, &[3 * e, e])?;
        let mut grad_w_out = param_grad::<Ix2>(grads, OUT_PROJ_WEIGHT, &[e, e])?;
        let (mut grad_b_in, mut grad_b_out) = if self.bias {
            (
                param_grad::<Ix1>(grads, IN_PROJ_BIAS, &[3 * e])?,
                param_grad::<Ix1>(grads, OUT_PROJ_BIAS, &[e])?,
            )
        } else {
            (None, None)
        };

        let scale = (1.0 / d as f64).sqrt() as f32;
        let mut q = Array2::<f32>::zeros((target, e));
        let mut k = Array2::<f32>::zeros((source, e));
        let mut v = Array2::<f32>::zeros((source, e));
        let mut context = Array2::<f32>::zeros((target, e));
        let mut probs = Array2::<f32>::zeros((target, source));
        let mut grad_probs = Array2::<f32>::zeros((target, source));
        let mut grad_context = Array2::<f32>::zeros((target, e));
        let mut grad_q = Array2::<f32>::zeros((target, e));
        let mut grad_k = Array2::<f32>::zeros((source, e));
        let mut grad_v = Array2::<f32>::zeros((source, e));
        let mut product = Array2::<f32>::zeros((e, e));
        for row in 0..batch {
            if target == 0 {
                // No output depends on anything: every gradient is zero.
                break;
            }
            let keys_masked = mask_row(&mask, row);
            let (query, key, value) = (
                query.index_axis(Axis(0), row),
                key.index_axis(Axis(0), row),
                value.index_axis(Axis(0), row),
            );
            let grad_out = grad_output.index_axis(Axis(0), row);
            // As forward computes them (q scaled by the prepared weights).
            prepared.project_in(0, query, q.view_mut())?;
            prepared.project_in(1, key, k.view_mut())?;
            prepared.project_in(2, value, v.view_mut())?;

            // output = context · Woutᵀ + bout.
            matmul(grad_out, w_out, grad_context.view_mut())?;
            for head in 0..heads {
                let features = s![.., head * d..(head + 1) * d];
                attend(
                    q.slice(features),
                    k.slice(features),
                    v.slice(features),
                    keys_masked.as_deref(),
                    probs.view_mut(),
                    context.slice_mut(features),
                )?;
                // context_h = probs · v_h.
                matmul(
                    grad_context.slice(features),
                    v.slice(features).t(),
                    grad_probs.view_mut(),
                )?;
                matmul(
                    probs.t(),
                    grad_context.slice(features),
                    grad_v.slice_mut(features),
                )?;
                // weights = the mean of probs over the heads.
                if let Some(g) = &grad_weights {
                    let h = heads as f32;
                    grad_probs.zip_mut_with(&g.index_axis(Axis(0), row), |gp, &gw| *gp += gw / h);
                }
                softmax_backward(probs.view(), grad_probs.view_mut());
                // scores = q_h · k_hᵀ (q already scaled).
                matmul(
                    grad_probs.view(),
                    k.slice(features),
                    grad_q.slice_mut(features),
                )?;
                matmul(
                    grad_probs.t(),
                    q.slice(features),
                    grad_k.slice_mut(features),
                )?;
            }
            // q = (query · Wqᵀ + bq) · scale.
            grad_q.mapv_inplace(|x| x * scale);

            if let Some(g) = grad_w_out.as_mut() {
                matmul(grad_out.t(), context.view(), product.view_mut())?;
                *g += &product;
            }
            if let Some(g) = grad_b_out.as_mut() {
                *g += &grad_out.sum_axis(Axis(0));
            }
            for (i, grad_x, x) in [(0, &grad_q, query), (1, &grad_k, key), (2, &grad_v, value)] {
                if let Some(g) = grad_w_in.as_mut() {
                    matmul(grad_x.t(), x, product.view_mut())?;
                    let mut g = g.slice_mut(s![block(e, i), ..]);
                    g += &product;
                }
                // The key bias adds q·bk to every score of a query, which
                // the softmax ignores: its gradient is exactly zero. Summed
                // up it would be rounding noise, which Adam (dividing by
                // the gradient's own size) would turn into steps of size lr.
                if let (Some(g), true) = (grad_b_in.as_mut(), i != 1) {
                    let mut g = g.slice_mut(s![block(e, i)]);
                    g += &grad_x.sum_axis(Axis(0));
                }
            }
            for (grad_input, grad_x, w) in [
                (&mut grad_query, &grad_q, wq),
                (&mut grad_key, &grad_k, wk),
                (&mut grad_value, &grad_v, wv),
            ] {
                if let Some(g) = grad_input.as_mut() {
                    matmul(grad_x.view(), w, g.index_axis_mut(Axis(0), row))?;
                }
            }
        }
        Ok(())
    }

    fn flops(&self, inputs: &[Option<TensorInfo>]) -> u64 {
        let Ok(sizes) = self.sizes(inputs) else {
            return 0;
        };
        let [b, l, s, e, h] = [
            sizes.batch,
            sizes.target,
            sizes.source,
            self.embed_dim,
            self.num_heads,
        ]
        .map(|n| n as u64);
        let projected_rows = 2 * l + 2 * s; // q and output (L each), k and v (S each)
        let projections = 2 * projected_rows * e * e + u64::from(self.bias) * projected_rows * e;
        let attention = 2 * (2 * l * s * e); // q · kᵀ and attn · v, over all heads
        let softmax = 5 * h * l * s;
        let average = u64::from(self.need_weights) * h * l * s;
        b * (projections + attention + softmax + average)
    }
}

export_layer!(MultiheadAttention);

#[cfg(test)]
mod tests;
