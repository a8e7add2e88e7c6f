//! The core types of interface 1.0 as the first layer-api 1.0 defined
//! them, when the binary interface still lived in this crate (before it
//! moved to `layer-abi`). abi_stable ties each type's layout to the name of
//! the package that defines it, so a plugin built against that layer-api
//! 1.0 describes its `CoreTable` as `layer_api`'s; the host checks such a
//! plugin against this description, which is the same layout under the
//! same package name. Layout only: the host calls every plugin through
//! `layer_abi::abi::CoreTable`, which these types match field for field.
//! Never change this module.

#![allow(dead_code, missing_debug_implementations)]

use std::ffi::c_void;

use abi_stable::{
    std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    type_layout::TypeLayout,
    StableAbi,
};

#[repr(transparent)]
#[derive(StableAbi)]
pub struct DType(pub u32);

#[repr(C)]
#[derive(StableAbi)]
pub struct TensorDesc<'a> {
    pub dtype: DType,
    pub shape: RSlice<'a, usize>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct TensorSpec {
    pub dtype: DType,
    pub shape: RVec<usize>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct TensorRef<'a> {
    pub dtype: DType,
    pub shape: RSlice<'a, usize>,
    pub data: RSlice<'a, u8>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct TensorMut<'a> {
    pub dtype: DType,
    pub shape: RSlice<'a, usize>,
    pub data: RSliceMut<'a, u8>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct ParamRef<'a> {
    pub name: RStr<'a>,
    pub tensor: TensorRef<'a>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct ParamDecl {
    /// The name within the layer (`weight`); the host prefixes the layer name.
    pub name: RString,
    /// The element type (hosts of 1.x keep `float32` parameters and refuse
    /// others with a message).
    pub dtype: DType,
    pub shape: RVec<usize>,
    /// Fan-in and fan-out, for the Xavier and Kaiming initializers.
    pub fan_in: usize,
    pub fan_out: usize,
    /// The default initializer, as the JSON form of [`crate::Init`]
    /// (the same text a model file uses to override it).
    pub init: RString,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct PortDecl {
    pub name: RString,
    /// Inputs only: the layer runs without it.
    pub optional: bool,
    /// Inputs: the element types accepted, in order of preference (the host
    /// converts a model input to the first). Outputs: empty; the dtype comes
    /// with the plan.
    pub dtypes: RVec<DType>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct Signature {
    pub inputs: RVec<PortDecl>,
    pub outputs: RVec<PortDecl>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct LayerPlan {
    pub outputs: RVec<TensorSpec>,
    pub params: RVec<ParamDecl>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct ProbeInput {
    pub shape: RVec<usize>,
    pub dtype: DType,
    pub low: i64,
    pub high: i64,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct ProbeCase {
    pub inputs: RVec<ROption<ProbeInput>>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct LayerError {
    /// True when the plugin panicked; the panic was caught at the boundary.
    pub panicked: bool,
    pub message: RString,
}

#[repr(transparent)]
#[derive(StableAbi)]
pub struct LayerHandle(pub *mut c_void);

#[repr(transparent)]
#[derive(StableAbi)]
pub struct PreparedHandle(pub *const c_void);

#[repr(C)]
#[derive(StableAbi)]
pub struct CoreTable {
    /// Creates a layer from its config, given as a JSON object.
    pub create: extern "C" fn(config_json: RStr<'_>) -> RResult<LayerHandle, LayerError>,
    /// Destroys a layer; a panic in its `Drop` comes back as an error.
    pub drop_layer: extern "C" fn(layer: LayerHandle) -> RResult<(), LayerError>,
    /// The layer's inputs and outputs.
    pub signature: extern "C" fn(layer: &LayerHandle) -> RResult<Signature, LayerError>,
    /// Outputs and parameters for inputs described by `inputs` (one per
    /// declared input, in order), or why those inputs are not valid.
    pub plan: extern "C" fn(
        layer: &LayerHandle,
        inputs: RSlice<'_, TensorDesc<'_>>,
    ) -> RResult<LayerPlan, LayerError>,
    /// Whether output row `i` of every output depends only on row `i` of
    /// every input (axis 0), so that a batch may be split into pieces.
    pub batch_independent: extern "C" fn(layer: &LayerHandle) -> RResult<bool, LayerError>,
    /// Inputs for `host check-plugin` to try; empty: let the checker guess
    /// (one-input float layers only).
    pub probes: extern "C" fn(layer: &LayerHandle) -> RResult<RVec<ProbeCase>, LayerError>,
    /// Computes every output from the inputs (as the plan described them)
    /// and the parameters (in the plan's order). `prepared` is what
    /// `prepare` returned for these parameters, or null.
    pub forward: extern "C" fn(
        layer: &LayerHandle,
        prepared: PreparedHandle,
        inputs: RSlice<'_, TensorRef<'_>>,
        params: RSlice<'_, ParamRef<'_>>,
        outputs: RSliceMut<'_, TensorMut<'_>>,
    ) -> RResult<(), LayerError>,
}

/// The layout a plugin built against layer-api 1.0 gives for its core
/// table.
pub const CORE_LAYOUT: &TypeLayout = <CoreTable as StableAbi>::LAYOUT;
