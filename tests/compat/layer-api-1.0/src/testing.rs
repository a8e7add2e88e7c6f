//! Running a layer in a plain `cargo test`, with no host: ndarray inputs and
//! parameters in, ndarray outputs out.
//!
//! The harness goes through the same functions the host calls in a built
//! plugin (config parsing, signature, plan, forward, with panics
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
        let descs: Vec<TensorDesc<'_>> = by_position
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
            .collect();
        let plan = result((self.table.core.plan)(
            self.handle(),
            RSlice::from_slice(&descs),
        ))?;

        let params: Vec<ArrayD<f32>> = plan
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
                Ok(value.as_standard_layout().into_owned())
            })
            .collect::<Result<_, String>>()?;
        let param_tensors: Vec<Tensor> = params.into_iter().map(Tensor::F32).collect();
        let param_refs: Vec<ParamRef<'_>> = plan
            .params
            .iter()
            .zip(&param_tensors)
            .map(|(decl, t)| ParamRef {
                name: decl.name.as_rstr(),
                tensor: tensor_ref(Some(t)),
            })
            .collect();

        let mut outputs = plan
            .outputs
            .iter()
            .map(|spec| Tensor::zeros(spec.dtype, &spec.shape))
            .collect::<Result<Vec<_>, String>>()?;
        let forwarded = {
            let input_refs: Vec<TensorRef<'_>> =
                by_position.iter().map(|t| tensor_ref(t.as_ref())).collect();
            let mut output_muts: Vec<TensorMut<'_>> = outputs
                .iter_mut()
                .zip(&plan.outputs)
                .map(|(t, spec)| TensorMut {
                    dtype: spec.dtype,
                    shape: RSlice::from_slice(&spec.shape),
                    data: RSliceMut::from_mut_slice(t.bytes_mut()),
                })
                .collect();
            result((self.table.core.forward)(
                self.handle(),
                PreparedHandle::NONE,
                RSlice::from_slice(&input_refs),
                RSlice::from_slice(&param_refs),
                RSliceMut::from_mut_slice(&mut output_muts),
            ))
        };
        forwarded?;
        Ok(self.outputs.iter().cloned().zip(outputs).collect())
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
