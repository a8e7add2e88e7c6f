//! What a layer is and will do, as plain data: its signature (named inputs
//! and outputs), and its plan for given inputs (each output's element type
//! and shape, and its parameters). The stages after loading (wiring,
//! binding, running) share these types; nothing here calls a plugin.

use abi_stable::std_types::RSlice;
use layer_api::abi::TensorDesc;
use layer_api::DType;

use crate::params::ParamInfo;

/// One input of a layer, as its signature declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct InputPort {
    pub name: String,
    pub optional: bool,
    /// Accepted element types, preferred first.
    pub dtypes: Vec<DType>,
}

/// A layer's named inputs and outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub inputs: Vec<InputPort>,
    pub outputs: Vec<String>,
}

/// A tensor's element type and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(dtype: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            dtype,
            shape: shape.to_vec(),
        }
    }

    pub(crate) fn desc(&self) -> TensorDesc<'_> {
        TensorDesc {
            dtype: self.dtype,
            shape: RSlice::from_slice(&self.shape),
        }
    }
}

/// What one layer will do for given inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// One per declared input; `None` for an optional input left out.
    pub inputs: Vec<Option<TensorSpec>>,
    /// One per declared output.
    pub outputs: Vec<TensorSpec>,
    /// The first input's and first output's shapes: a chain's.
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    pub params: Vec<ParamInfo>,
}

impl LayerPlan {
    pub(crate) fn descs(&self) -> Vec<TensorDesc<'_>> {
        self.inputs
            .iter()
            .map(|i| match i {
                Some(spec) => spec.desc(),
                None => TensorDesc {
                    dtype: DType::ABSENT,
                    shape: RSlice::from_slice(&[]),
                },
            })
            .collect()
    }
}
