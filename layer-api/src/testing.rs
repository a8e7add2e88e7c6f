//! Running a layer in a plain `cargo test`, with no host: ndarray inputs and
//! parameters in, ndarray outputs out.
//!
//! The harness goes through the same functions the host calls in a built
//! plugin (config parsing, signature, plan, prepare, forward, with panics
//! caught), so a unit test exercises the layer as the host will, only
//! without loading a library.
//!
//! ```
//! use layer_api::ndarray::{array, ArrayD};
//! use layer_api::{testing, ArrayViewD, ArrayViewMutD, Layer, NoConfig, Params};
//!
//! struct Double;
//! impl Layer for Double {
//!     const DESCRIPTION: &'static str = "y = 2x";
//!     type Config = NoConfig;
//!     fn new(_: NoConfig) -> Result<Self, String> { Ok(Double) }
//!     fn output_shape(&self, s: &[usize]) -> Result<Vec<usize>, String> { Ok(s.to_vec()) }
//!     fn batch_independent(&self) -> bool { true }
//!     fn forward(&self, x: ArrayViewD<f32>, _: &Params, mut y: ArrayViewMutD<f32>) -> Result<(), String> {
//!         y.zip_mut_with(&x, |y, &x| *y = 2.0 * x);
//!         Ok(())
//!     }
//! }
//!
//! let y = testing::forward::<Double>("{}", array![1.0f32, -2.0].into_dyn(), &[]).unwrap();
//! assert_eq!(y, array![2.0f32, -4.0].into_dyn());
//! ```

use abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr};
use ndarray::ArrayD;

use crate::abi::{DType, LayerHandle, ParamRef, PreparedHandle, TensorDesc, TensorMut, TensorRef};
use crate::adapter::plugin_table;
use crate::authoring::{Element, MultiLayer, INPUT, OUTPUT};
use crate::{abi, Layer};

/// Runs `f` as the host runs a call it lends its threads to: every
/// `forward` and `backward` that `f` makes on this thread sees `threads`
/// lent threads ([`parallel::threads`](crate::parallel::threads)), and
/// [`parallel::for_each`](crate::parallel::for_each) runs each of their
/// tasks on a thread of its own. How a layer's author tests that its
/// results do not depend on the threads.
pub fn with_lent_threads<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    let pool = abi::HostPool {
        threads: threads.max(1),
        context: std::ptr::null(),
        run: run_on_scoped_threads,
    };
    crate::parallel::lend_pool(Some(&pool));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    crate::parallel::lend_pool(None);
    result.unwrap_or_else(|payload| std::panic::resume_unwind(payload))
}

/// [`abi::HostPool::run`] for [`with_lent_threads`]: each task on a scoped
/// thread of its own (on this one, if a thread cannot be started).
extern "C" fn run_on_scoped_threads(
    _context: *const std::ffi::c_void,
    tasks: usize,
    task: abi::PoolTask,
    data: *const std::ffi::c_void,
) {
    struct Data(*const std::ffi::c_void);
    // SAFETY: `data` is only passed back to `task`, which the caller of
    // `run` made to be called from any thread.
    unsafe impl Sync for Data {}
    let data = Data(data);
    let data = &data;
    std::thread::scope(|scope| {
        for index in 0..tasks {
            let started =
                std::thread::Builder::new().spawn_scoped(scope, move || task(data.0, index));
            if started.is_err() {
                task(data.0, index);
            }
        }
    });
}

/// An owned tensor of any element type.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<half::f16>),
    BF16(ArrayD<half::bf16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

macro_rules! each_variant {
    ($value:expr, $a:ident => $body:expr) => {
        match $value {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::F16($a) => $body,
            Tensor::BF16($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}

macro_rules! conversions {
    ($($t:ty => $v:ident / $d:ident),*) => {$(
        impl From<ArrayD<$t>> for Tensor {
            fn from(a: ArrayD<$t>) -> Tensor {
                Tensor::$v(a)
            }
        }
        impl TryFrom<Tensor> for ArrayD<$t> {
            type Error = String;
            fn try_from(t: Tensor) -> Result<ArrayD<$t>, String> {
                match t {
                    Tensor::$v(a) => Ok(a),
                    other => Err(format!("the tensor is {}, not {}", other.dtype(), DType::$d)),
                }
            }
        }
    )*};
}

conversions!(f32 => F32 / F32, f64 => F64 / F64, half::f16 => F16 / F16,
    half::bf16 => BF16 / BF16, i64 => I64 / I64, i32 => I32 / I32, u8 => U8 / U8,
    bool => Bool / BOOL);

impl Tensor {
    pub fn dtype(&self) -> DType {
        fn of<T: Element>(_: &ArrayD<T>) -> DType {
            T::DTYPE
        }
        each_variant!(self, a => of(a))
    }

    pub fn shape(&self) -> &[usize] {
        each_variant!(self, a => a.shape())
    }

    /// The element type `T` array, or an error naming both types.
    pub fn into_array<T: Element>(self) -> Result<ArrayD<T>, String>
    where
        ArrayD<T>: TryFrom<Tensor, Error = String>,
    {
        ArrayD::<T>::try_from(self)
    }

    fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor, String> {
        let s = ndarray::IxDyn(shape);
        Ok(match dtype {
            DType::F32 => Tensor::F32(ArrayD::zeros(s)),
            DType::F64 => Tensor::F64(ArrayD::zeros(s)),
            DType::F16 => Tensor::F16(ArrayD::from_elem(s, half::f16::ZERO)),
            DType::BF16 => Tensor::BF16(ArrayD::from_elem(s, half::bf16::ZERO)),
            DType::I64 => Tensor::I64(ArrayD::zeros(s)),
            DType::I32 => Tensor::I32(ArrayD::zeros(s)),
            DType::U8 => Tensor::U8(ArrayD::zeros(s)),
            DType::BOOL => Tensor::Bool(ArrayD::from_elem(s, false)),
            other => return Err(format!("the plan names an unknown element type {other}")),
        })
    }

    fn standard(self) -> Tensor {
        each_variant!(self, a => {
            if a.is_standard_layout() {
                a.into()
            } else {
                a.as_standard_layout().into_owned().into()
            }
        })
    }

    fn bytes(&self) -> &[u8] {
        fn of<T: Element>(a: &ArrayD<T>) -> &[u8] {
            let s = a.as_slice().expect("standard layout");
            // SAFETY: every element type is plain data without padding.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
        }
        each_variant!(self, a => of(a))
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        fn of<T: Element>(a: &mut ArrayD<T>) -> &mut [u8] {
            let s = a.as_slice_mut().expect("owned arrays are contiguous");
            // SAFETY: as in `bytes`; the layer's view writes only valid `T`s.
            unsafe {
                std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s))
            }
        }
        each_variant!(self, a => of(a))
    }
}

/// A layer created from a config, run through the plugin table's functions.
pub struct Harness {
    table: abi::PluginTable,
    handle: Option<LayerHandle>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

fn result<T>(r: RResult<T, abi::LayerError>) -> Result<T, String> {
    r.into_result().map_err(|e| {
        if e.panicked {
            format!("panicked: {}", e.message)
        } else {
            e.message.into_string()
        }
    })
}

impl Harness {
    /// Creates layer `L` from `config` (JSON text, `{}` for none).
    pub fn new<L: MultiLayer>(config: &str) -> Result<Harness, String> {
        let table = plugin_table::<L>();
        let handle = result((table.core.create)(RStr::from_str(config)))?;
        let mut harness = Harness {
            table,
            handle: Some(handle),
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        let signature = result((table.core.signature)(harness.handle()))?;
        harness.inputs = signature
            .inputs
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        harness.outputs = signature
            .outputs
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        Ok(harness)
    }

    fn handle(&self) -> &LayerHandle {
        self.handle.as_ref().expect("alive until dropped")
    }

    /// Runs the layer on `inputs` (by name; optional ones may be left out)
    /// with `params` (by the names the layer declares), and returns every
    /// output by name, in the signature's order.
    pub fn run(
        &self,
        inputs: Vec<(&str, Tensor)>,
        params: &[(&str, ArrayD<f32>)],
    ) -> Result<Vec<(String, Tensor)>, String> {
        let bound = self.bind(inputs, params)?;
        let param_refs = bound.param_refs();
        let prepared = self.prepare(&bound, &param_refs)?;
        let outputs = self.forward(&bound, &param_refs, prepared);
        self.drop_prepared(prepared)?;
        Ok(self.outputs.iter().cloned().zip(outputs?).collect())
    }

    /// Runs the layer forward, then `backward` with `grad_outputs` (by
    /// output name; a float output left out gets a gradient of zeros), and
    /// returns the outputs and the gradient of every float input (`None`
    /// for others and for inputs left out) and every parameter.
    pub fn gradients(
        &self,
        inputs: Vec<(&str, Tensor)>,
        params: &[(&str, ArrayD<f32>)],
        grad_outputs: Vec<(&str, Tensor)>,
    ) -> Result<Gradients, String> {
        let backward = self
            .table
            .backward
            .ok_or("the layer does not offer `backward` (set `BACKWARD = true`)")?;
        let bound = self.bind(inputs, params)?;
        let param_refs = bound.param_refs();
        let prepared = self.prepare(&bound, &param_refs)?;
        let outputs = match self.forward(&bound, &param_refs, prepared) {
            Ok(outputs) => outputs,
            Err(e) => {
                self.drop_prepared(prepared)?;
                return Err(e);
            }
        };
        let mut given: Vec<Option<Tensor>> = self.outputs.iter().map(|_| None).collect();
        for (name, t) in grad_outputs {
            let i = self.outputs.iter().position(|n| n == name).ok_or_else(|| {
                format!(
                    "the layer has no output `{name}`; its outputs are: {}",
                    self.outputs.join(", ")
                )
            })?;
            if t.shape() != outputs[i].shape() || t.dtype() != outputs[i].dtype() {
                return Err(format!(
                    "the gradient of output `{name}` is {} {:?}, but the output is {} {:?}",
                    t.dtype(),
                    t.shape(),
                    outputs[i].dtype(),
                    outputs[i].shape()
                ));
            }
            given[i] = Some(t.standard());
        }
        let output_grads: Vec<Option<Tensor>> = given
            .into_iter()
            .zip(&outputs)
            .map(|(g, out)| match g {
                Some(g) => Ok(Some(g)),
                None if is_float(out.dtype()) => Tensor::zeros(out.dtype(), out.shape()).map(Some),
                None => Ok(None),
            })
            .collect::<Result<_, String>>()?;
        let mut input_grads: Vec<Option<Tensor>> = bound
            .inputs
            .iter()
            .map(|t| match t {
                Some(t) if is_float(t.dtype()) => Tensor::zeros(t.dtype(), t.shape()).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_, String>>()?;
        let mut param_grads: Vec<Tensor> = bound
            .params
            .iter()
            .map(|p| Tensor::zeros(DType::F32, p.shape()))
            .collect::<Result<_, String>>()?;
        let called = {
            let input_refs: Vec<TensorRef<'_>> = bound
                .inputs
                .iter()
                .map(|t| tensor_ref(t.as_ref()))
                .collect();
            let output_refs: Vec<TensorRef<'_>> =
                outputs.iter().map(|t| tensor_ref(Some(t))).collect();
            let grad_refs: Vec<TensorRef<'_>> = output_grads
                .iter()
                .map(|t| tensor_ref(t.as_ref()))
                .collect();
            let input_shapes: Vec<Vec<usize>> = input_grads
                .iter()
                .map(|t| t.as_ref().map_or(Vec::new(), |t| t.shape().to_vec()))
                .collect();
            let param_shapes: Vec<Vec<usize>> =
                param_grads.iter().map(|t| t.shape().to_vec()).collect();
            let mut input_muts: Vec<TensorMut<'_>> = input_grads
                .iter_mut()
                .zip(&input_shapes)
                .map(|(t, shape)| tensor_mut(shape, t.as_mut()))
                .collect();
            let mut param_muts: Vec<TensorMut<'_>> = param_grads
                .iter_mut()
                .zip(&param_shapes)
                .map(|(t, shape)| tensor_mut(shape, Some(t)))
                .collect();
            result(backward(
                self.handle(),
                prepared,
                RSlice::from_slice(&input_refs),
                RSlice::from_slice(&param_refs),
                RSlice::from_slice(&output_refs),
                RSlice::from_slice(&grad_refs),
                RSliceMut::from_mut_slice(&mut input_muts),
                RSliceMut::from_mut_slice(&mut param_muts),
            ))
        };
        self.drop_prepared(prepared)?;
        called?;
        Ok(Gradients {
            outputs: self.outputs.iter().cloned().zip(outputs).collect(),
            inputs: self.inputs.iter().cloned().zip(input_grads).collect(),
            params: bound
                .plan
                .params
                .iter()
                .map(|d| d.name.to_string())
                .zip(param_grads.into_iter().map(|g| match g {
                    Tensor::F32(a) => a,
                    _ => unreachable!("parameter gradients are float32"),
                }))
                .collect(),
        })
    }

    /// Checks `inputs` against the signature, plans, and checks `params`
    /// against the plan.
    fn bind(
        &self,
        inputs: Vec<(&str, Tensor)>,
        params: &[(&str, ArrayD<f32>)],
    ) -> Result<Bound, String> {
        for (name, _) in &inputs {
            if !self.inputs.iter().any(|n| n == name) {
                return Err(format!(
                    "the layer has no input `{name}`; its inputs are: {}",
                    self.inputs.join(", ")
                ));
            }
        }
        let mut by_position: Vec<Option<Tensor>> = self.inputs.iter().map(|_| None).collect();
        for (name, t) in inputs {
            let i = self.inputs.iter().position(|n| n == name).expect("checked");
            by_position[i] = Some(t.standard());
        }
        let plan = result((self.table.core.plan)(
            self.handle(),
            RSlice::from_slice(&descs(&by_position)),
        ))?;
        let params: Vec<Tensor> = plan
            .params
            .iter()
            .map(|decl| {
                let (_, value) = params
                    .iter()
                    .find(|(n, _)| *n == decl.name.as_str())
                    .ok_or_else(|| {
                        format!(
                            "no value given for parameter `{}` of shape {:?}",
                            decl.name,
                            decl.shape.as_slice()
                        )
                    })?;
                if value.shape() != decl.shape.as_slice() {
                    return Err(format!(
                        "parameter `{}` is declared {:?}, but the value given is {:?}",
                        decl.name,
                        decl.shape.as_slice(),
                        value.shape()
                    ));
                }
                Ok(Tensor::F32(value.as_standard_layout().into_owned()))
            })
            .collect::<Result<_, String>>()?;
        Ok(Bound {
            inputs: by_position,
            plan,
            params,
        })
    }

    fn prepare(&self, bound: &Bound, params: &[ParamRef<'_>]) -> Result<PreparedHandle, String> {
        Ok(match (self.table.prepare, self.table.drop_prepared) {
            (Some(prepare), Some(_)) => result(prepare(
                self.handle(),
                RSlice::from_slice(&descs(&bound.inputs)),
                RSlice::from_slice(params),
            ))?,
            _ => PreparedHandle::NONE,
        })
    }

    fn drop_prepared(&self, prepared: PreparedHandle) -> Result<(), String> {
        match self.table.drop_prepared {
            Some(drop_prepared) if !prepared.0.is_null() => {
                result(drop_prepared(self.handle(), prepared))
            }
            _ => Ok(()),
        }
    }

    fn forward(
        &self,
        bound: &Bound,
        params: &[ParamRef<'_>],
        prepared: PreparedHandle,
    ) -> Result<Vec<Tensor>, String> {
        let mut outputs = bound
            .plan
            .outputs
            .iter()
            .map(|spec| Tensor::zeros(spec.dtype, &spec.shape))
            .collect::<Result<Vec<_>, String>>()?;
        let input_refs: Vec<TensorRef<'_>> = bound
            .inputs
            .iter()
            .map(|t| tensor_ref(t.as_ref()))
            .collect();
        let mut output_muts: Vec<TensorMut<'_>> = outputs
            .iter_mut()
            .zip(&bound.plan.outputs)
            .map(|(t, spec)| tensor_mut(&spec.shape, Some(t)))
            .collect();
        result((self.table.core.forward)(
            self.handle(),
            prepared,
            RSlice::from_slice(&input_refs),
            RSlice::from_slice(params),
            RSliceMut::from_mut_slice(&mut output_muts),
        ))?;
        Ok(outputs)
    }

    /// Destroys the layer, reporting a panic in its `Drop`.
    pub fn close(mut self) -> Result<(), String> {
        let handle = self.handle.take().expect("alive until dropped");
        result((self.table.core.drop_layer)(handle))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // A panic in the layer's `Drop` is caught; `close` reports it.
            let _ = (self.table.core.drop_layer)(handle);
        }
    }
}

/// How [`gradcheck`] compares: the central-difference step, and the
/// tolerance of `|analytic - numeric| <= atol + rtol * |numeric|`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub step: f64,
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// For `float32` layers: step 1e-2, atol 1e-2, rtol 1e-2 (central
    /// differences of an `f32` forward lose about 1e-7 / 1e-2 relative).
    pub const F32: Tolerance = Tolerance {
        step: 1e-2,
        atol: 1e-2,
        rtol: 1e-2,
    };
    /// For `float64` inputs (torch's `gradcheck` defaults, with step 1e-6).
    pub const F64: Tolerance = Tolerance {
        step: 1e-6,
        atol: 1e-5,
        rtol: 1e-3,
    };
}

/// Compares the layer's `backward` with central finite differences of its
/// `forward`, for the scalar loss `sum(w * y)` over every float output `y`
/// with fixed pseudo-random weights `w` in [-1, 1]: the gradient of every
/// float input (with `tolerance`) and every parameter (always float32, so
/// with [`Tolerance::F32`]), element by element. An error names the tensor
/// and its worst element.
pub fn gradcheck(
    harness: &Harness,
    inputs: Vec<(&str, Tensor)>,
    params: &[(&str, ArrayD<f32>)],
    tolerance: Tolerance,
) -> Result<(), String> {
    let first = harness.run(inputs.clone(), params)?;
    let weights: Vec<(String, Option<Vec<f64>>)> = first
        .iter()
        .enumerate()
        .map(|(k, (name, y))| {
            let n = y.shape().iter().product::<usize>();
            let w = is_float(y.dtype()).then(|| {
                (0..n)
                    .map(|i| {
                        let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64);
                        ((h >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
                    })
                    .collect()
            });
            (name.clone(), w)
        })
        .collect();
    let loss = |outputs: &[(String, Tensor)]| -> Result<f64, String> {
        let mut total = 0.0;
        for ((_, y), (_, w)) in outputs.iter().zip(&weights) {
            if let Some(w) = w {
                total += to_f64(y)?.iter().zip(w).map(|(y, w)| y * w).sum::<f64>();
            }
        }
        Ok(total)
    };
    let grad_outputs: Vec<(&str, Tensor)> = first
        .iter()
        .zip(&weights)
        .filter_map(|((name, y), (_, w))| {
            w.as_ref()
                .map(|w| (name.as_str(), from_f64(y.dtype(), y.shape(), w)))
        })
        .collect();
    let analytic = harness.gradients(inputs.clone(), params, grad_outputs)?;
    let h = tolerance.step;
    let mut worst: Option<(f64, String)> = None;
    let mut compare = |what: String, numeric: f64, analytic: f64, tolerance: Tolerance| {
        let excess = (analytic - numeric).abs() - (tolerance.atol + tolerance.rtol * numeric.abs());
        if excess > 0.0 && worst.as_ref().is_none_or(|(e, _)| excess > *e) {
            worst = Some((
                excess,
                format!("{what}: backward gives {analytic:.6e}, finite differences {numeric:.6e}"),
            ));
        }
    };
    for (name, grad) in &analytic.inputs {
        let Some(grad) = grad else { continue };
        let grad = to_f64(grad)?;
        let x = inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .ok_or("a gradient for an input that was not given")?;
        let base = to_f64(&x)?;
        for i in 0..base.len() {
            let at = |delta: f64| -> Result<f64, String> {
                let mut v = base.clone();
                v[i] += delta;
                let mut moved = inputs.clone();
                let slot = moved.iter().position(|(n, _)| n == name).expect("found");
                moved[slot].1 = from_f64(x.dtype(), x.shape(), &v);
                loss(&harness.run(moved, params)?)
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            compare(
                format!("input `{name}` element {}", index_text(x.shape(), i)),
                numeric,
                grad[i],
                tolerance,
            );
        }
    }
    // Parameters are float32 whatever the inputs are: a float64 step would
    // vanish in their rounding.
    let param_tolerance = Tolerance::F32;
    let h = param_tolerance.step;
    for (name, grad) in &analytic.params {
        let (_, value) = params
            .iter()
            .find(|(n, _)| n == name)
            .ok_or("a gradient for a parameter that was not given")?;
        let base: Vec<f32> = value.iter().copied().collect();
        for (i, g) in grad.iter().enumerate() {
            let at = |delta: f64| -> Result<f64, String> {
                let mut v = base.clone();
                v[i] = (v[i] as f64 + delta) as f32;
                let moved =
                    ArrayD::from_shape_vec(value.raw_dim(), v).map_err(|e| e.to_string())?;
                let changed: Vec<(&str, ArrayD<f32>)> = params
                    .iter()
                    .map(|(n, a)| (*n, if n == name { moved.clone() } else { a.clone() }))
                    .collect();
                loss(&harness.run(inputs.clone(), &changed)?)
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            compare(
                format!(
                    "parameter `{name}` element {}",
                    index_text(value.shape(), i)
                ),
                numeric,
                *g as f64,
                param_tolerance,
            );
        }
    }
    match worst {
        None => Ok(()),
        Some((_, text)) => Err(format!(
            "the gradient is wrong: {text} (inputs: step {:e}, tolerance {:e} + {:e} x \
             |numeric|; parameters: as Tolerance::F32)",
            tolerance.step, tolerance.atol, tolerance.rtol
        )),
    }
}

/// `[i, j, k]`: flat index `flat` of a tensor of `shape`, as an index.
fn index_text(shape: &[usize], mut flat: usize) -> String {
    let mut index = vec![0; shape.len()];
    for (axis, &n) in shape.iter().enumerate().rev() {
        if n > 0 {
            index[axis] = flat % n;
            flat /= n;
        }
    }
    format!("{index:?}")
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>, String> {
    Ok(match t {
        Tensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
        Tensor::F64(a) => a.iter().copied().collect(),
        Tensor::F16(a) => a.iter().map(|v| v.to_f64()).collect(),
        Tensor::BF16(a) => a.iter().map(|v| v.to_f64()).collect(),
        other => return Err(format!("{} is not a float type", other.dtype())),
    })
}

fn from_f64(dtype: DType, shape: &[usize], v: &[f64]) -> Tensor {
    let s = ndarray::IxDyn(shape);
    match dtype {
        DType::F64 => Tensor::F64(ArrayD::from_shape_vec(s, v.to_vec()).expect("same size")),
        DType::F16 => Tensor::F16(
            ArrayD::from_shape_vec(s, v.iter().map(|&x| half::f16::from_f64(x)).collect())
                .expect("same size"),
        ),
        DType::BF16 => Tensor::BF16(
            ArrayD::from_shape_vec(s, v.iter().map(|&x| half::bf16::from_f64(x)).collect())
                .expect("same size"),
        ),
        _ => Tensor::F32(
            ArrayD::from_shape_vec(s, v.iter().map(|&x| x as f32).collect()).expect("same size"),
        ),
    }
}

/// What [`Harness::gradients`] returns.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// Every output by name, as `forward` wrote it.
    pub outputs: Vec<(String, Tensor)>,
    /// The gradient of every input by name (`None`: not a float, or left out).
    pub inputs: Vec<(String, Option<Tensor>)>,
    /// The gradient of every parameter by name, in the plan's order.
    pub params: Vec<(String, ArrayD<f32>)>,
}

/// Inputs bound to a layer: in the signature's order, the layer's plan for
/// them, and the parameters in the plan's order.
struct Bound {
    inputs: Vec<Option<Tensor>>,
    plan: abi::LayerPlan,
    params: Vec<Tensor>,
}

impl Bound {
    fn param_refs(&self) -> Vec<ParamRef<'_>> {
        self.plan
            .params
            .iter()
            .zip(&self.params)
            .map(|(decl, t)| ParamRef {
                name: decl.name.as_rstr(),
                tensor: tensor_ref(Some(t)),
            })
            .collect()
    }
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

fn descs(inputs: &[Option<Tensor>]) -> Vec<TensorDesc<'_>> {
    inputs
        .iter()
        .map(|t| match t {
            Some(t) => TensorDesc {
                dtype: t.dtype(),
                shape: RSlice::from_slice(t.shape()),
            },
            None => TensorDesc {
                dtype: DType::ABSENT,
                shape: RSlice::from_slice(&[]),
            },
        })
        .collect()
}

/// A tensor of `shape` lent for writing (`None`: not wanted,
/// [`DType::ABSENT`]).
fn tensor_mut<'a>(shape: &'a [usize], t: Option<&'a mut Tensor>) -> TensorMut<'a> {
    match t {
        Some(t) => TensorMut {
            dtype: t.dtype(),
            shape: RSlice::from_slice(shape),
            data: RSliceMut::from_mut_slice(t.bytes_mut()),
        },
        None => TensorMut {
            dtype: DType::ABSENT,
            shape: RSlice::from_slice(&[]),
            data: RSliceMut::from_mut_slice(&mut []),
        },
    }
}

fn tensor_ref(t: Option<&Tensor>) -> TensorRef<'_> {
    match t {
        Some(t) => TensorRef {
            dtype: t.dtype(),
            shape: RSlice::from_slice(t.shape()),
            data: RSlice::from_slice(t.bytes()),
        },
        None => TensorRef {
            dtype: DType::ABSENT,
            shape: RSlice::from_slice(&[]),
            data: RSlice::from_slice(&[]),
        },
    }
}

/// Runs a one-input, one-output layer `L` created from `config` on `input`
/// with `params` (by the names the layer declares).
pub fn forward<L: Layer>(
    config: &str,
    input: ArrayD<f32>,
    params: &[(&str, ArrayD<f32>)],
) -> Result<ArrayD<f32>, String> {
    let harness = Harness::new::<L>(config)?;
    let mut outputs = harness.run(vec![(INPUT, input.into())], params)?;
    let (name, output) = outputs.pop().ok_or("the layer returned no output")?;
    debug_assert_eq!(name, OUTPUT);
    harness.close()?;
    output.into_array::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authoring::{Grads, ParamSpec, Params};
    use crate::{ArrayViewD, ArrayViewMutD, Init, NoConfig};
    use ndarray::{array, Ix0};

    /// `y = x + (the number of lent threads)`, computed in one task per
    /// element; an element of 13 makes its task panic.
    struct Spread;
    impl Layer for Spread {
        const DESCRIPTION: &'static str = "y = x + threads";
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, String> {
            Ok(Spread)
        }
        fn output_shape(&self, s: &[usize]) -> Result<Vec<usize>, String> {
            Ok(s.to_vec())
        }
        fn batch_independent(&self) -> bool {
            true
        }
        fn forward(
            &self,
            x: ArrayViewD<f32>,
            _: &Params,
            mut y: ArrayViewMutD<f32>,
        ) -> Result<(), String> {
            let threads = crate::parallel::threads() as f32;
            let x = x.as_slice().ok_or("not contiguous")?;
            let y = y.as_slice_mut().ok_or("not contiguous")?;
            let caller = std::thread::current().id();
            let elsewhere = std::sync::atomic::AtomicBool::new(false);
            crate::parallel::for_each_part(y.iter_mut().collect(), |i, y| {
                assert!(x[i] != 13.0, "unlucky element {i}");
                if std::thread::current().id() != caller {
                    elsewhere.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                *y = x[i] + threads;
            });
            // Lent threads: every task but the first ran on another thread.
            if threads > 1.0 && x.len() > 1 && !elsewhere.into_inner() {
                return Err("no task ran on a lent thread".into());
            }
            Ok(())
        }
    }

    #[test]
    fn lent_threads_run_the_tasks_of_one_call() {
        let x = array![1.0f32, 2.0, 3.0, 4.0].into_dyn();
        let alone = forward::<Spread>("{}", x.clone(), &[]).unwrap();
        assert_eq!(alone, array![2.0f32, 3.0, 4.0, 5.0].into_dyn());
        let lent = with_lent_threads(3, || forward::<Spread>("{}", x.clone(), &[])).unwrap();
        assert_eq!(lent, array![4.0f32, 5.0, 6.0, 7.0].into_dyn());
        // The loan ended with the closure.
        assert_eq!(crate::parallel::threads(), 1);
    }

    #[test]
    fn a_panic_in_a_lent_thread_is_the_calls_error() {
        let x = array![1.0f32, 13.0, 3.0].into_dyn();
        for threads in [1, 2] {
            let e =
                with_lent_threads(threads, || forward::<Spread>("{}", x.clone(), &[])).unwrap_err();
            assert!(e.contains("unlucky element 1"), "{threads} threads: {e}");
        }
    }

    /// `y = a · x` with a scalar parameter `a`.
    struct Scale;

    impl Layer for Scale {
        const DESCRIPTION: &'static str = "y = a x";
        type Config = NoConfig;
        fn new(_: NoConfig) -> Result<Self, String> {
            Ok(Scale)
        }
        fn output_shape(&self, s: &[usize]) -> Result<Vec<usize>, String> {
            Ok(s.to_vec())
        }
        fn params(&self, _: &[usize]) -> Result<Vec<ParamSpec>, String> {
            Ok(vec![ParamSpec::new("a", [], Init::Ones)])
        }
        fn batch_independent(&self) -> bool {
            true
        }
        fn forward(
            &self,
            x: ArrayViewD<f32>,
            p: &Params,
            mut y: ArrayViewMutD<f32>,
        ) -> Result<(), String> {
            let a = p.get::<Ix0>("a")?[()];
            y.zip_mut_with(&x, |y, &x| *y = a * x);
            Ok(())
        }
        const BACKWARD: bool = true;
        fn backward(
            &self,
            x: ArrayViewD<f32>,
            _y: ArrayViewD<f32>,
            p: &Params,
            g: ArrayViewD<f32>,
            grads: &mut Grads,
        ) -> Result<(), String> {
            let a = p.get::<Ix0>("a")?[()];
            if let Some(mut dx) = grads.input::<f32>(INPUT)? {
                dx.zip_mut_with(&g, |d, &g| *d = a * g);
            }
            if let Some(mut da) = grads.param("a")? {
                da[[]] = (&x * &g).sum();
            }
            Ok(())
        }
    }

    #[test]
    fn gradients_reach_the_layer_and_come_back_by_name() {
        let h = Harness::new::<Scale>("{}").unwrap();
        let x = array![1.0f32, -2.0, 3.0].into_dyn();
        let g = array![0.5f32, 1.0, -1.0].into_dyn();
        let a = ndarray::arr0(2.0f32).into_dyn();
        let got = h
            .gradients(
                vec![(INPUT, x.into())],
                &[("a", a)],
                vec![(OUTPUT, g.into())],
            )
            .unwrap();
        // dy/dx = a = 2; dL/da = sum(g x) = 0.5 - 2 - 3 = -4.5.
        let dx = got.inputs[0]
            .1
            .clone()
            .unwrap()
            .into_array::<f32>()
            .unwrap();
        assert_eq!(dx, array![1.0f32, 2.0, -2.0].into_dyn());
        assert_eq!(got.params[0].0, "a");
        assert_eq!(got.params[0].1[[]], -4.5);
        let y = got.outputs[0].1.clone().into_array::<f32>().unwrap();
        assert_eq!(y, array![2.0f32, -4.0, 6.0].into_dyn());
    }

    #[test]
    fn gradcheck_passes_a_right_gradient_and_names_a_wrong_one() {
        let h = Harness::new::<Scale>("{}").unwrap();
        let x = array![[1.0f32, -2.0], [0.5, 3.0]].into_dyn();
        let a = ndarray::arr0(1.5f32).into_dyn();
        gradcheck(
            &h,
            vec![(INPUT, x.clone().into())],
            &[("a", a.clone())],
            Tolerance::F32,
        )
        .unwrap();
        let h = Harness::new::<OffByOne>("{}").unwrap();
        let err = gradcheck(&h, vec![(INPUT, x.into())], &[("a", a)], Tolerance::F32).unwrap_err();
        assert!(err.contains("input `input` element [1, 0]"), "{err}");
    }

    /// `Scale` whose input gradient is wrong in one element.
    struct OffByOne(Scale);

    impl Layer for OffByOne {
        const DESCRIPTION: &'static str = "y = a x, wrong gradient";
        type Config = NoConfig;
        fn new(c: NoConfig) -> Result<Self, String> {
            <Scale as Layer>::new(c).map(OffByOne)
        }
        fn output_shape(&self, s: &[usize]) -> Result<Vec<usize>, String> {
            Layer::output_shape(&self.0, s)
        }
        fn params(&self, s: &[usize]) -> Result<Vec<ParamSpec>, String> {
            Layer::params(&self.0, s)
        }
        fn batch_independent(&self) -> bool {
            true
        }
        fn forward(
            &self,
            x: ArrayViewD<f32>,
            p: &Params,
            y: ArrayViewMutD<f32>,
        ) -> Result<(), String> {
            Layer::forward(&self.0, x, p, y)
        }
        const BACKWARD: bool = true;
        fn backward(
            &self,
            x: ArrayViewD<f32>,
            y: ArrayViewD<f32>,
            p: &Params,
            g: ArrayViewD<f32>,
            grads: &mut Grads,
        ) -> Result<(), String> {
            let mut g = g.to_owned();
            g[[1, 0]] += 0.5;
            Layer::backward(&self.0, x, y, p, g.view(), grads)
        }
    }

    #[test]
    fn a_layer_without_backward_says_so() {
        struct Plain;
        impl Layer for Plain {
            const DESCRIPTION: &'static str = "y = x";
            type Config = NoConfig;
            fn new(_: NoConfig) -> Result<Self, String> {
                Ok(Plain)
            }
            fn output_shape(&self, s: &[usize]) -> Result<Vec<usize>, String> {
                Ok(s.to_vec())
            }
            fn batch_independent(&self) -> bool {
                true
            }
            fn forward(
                &self,
                x: ArrayViewD<f32>,
                _: &Params,
                mut y: ArrayViewMutD<f32>,
            ) -> Result<(), String> {
                y.assign(&x);
                Ok(())
            }
        }
        assert_eq!(
            crate::__private::offers::<Plain>(),
            ["flops", "prepare", "lend-pool"]
        );
        assert_eq!(
            crate::__private::offers::<Scale>(),
            ["flops", "prepare", "backward", "lend-pool"]
        );
        let err = Harness::new::<Plain>("{}")
            .unwrap()
            .gradients(vec![(INPUT, array![1.0f32].into_dyn().into())], &[], vec![])
            .unwrap_err();
        assert!(err.contains("does not offer `backward`"), "{err}");
    }
}
