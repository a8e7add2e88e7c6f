//! The binary interface between the host and a plugin library.
//!
//! Every type here is `#[repr(C)]` and derives `StableAbi`, so `abi_stable`
//! checks at load time that the host and the plugin agree on its layout. The
//! root module and the layer trait object are prefix types: a later interface
//! version may append fields or methods after the last prefix field, and
//! plugins built before that still load (the host sees the new items as
//! missing).

// `#[sabi_trait]` expands to impls that rustc's `non_local_definitions` lint
// flags; they are sound and local to this module.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    StableAbi,
};

/// A borrowed, contiguous, row-major f32 tensor.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TensorRef<'a> {
    pub shape: RSlice<'a, usize>,
    pub data: RSlice<'a, f32>,
}

/// A mutably borrowed, contiguous, row-major f32 tensor: a layer's output.
#[repr(C)]
#[derive(StableAbi)]
pub struct TensorMut<'a> {
    pub shape: RSlice<'a, usize>,
    pub data: RSliceMut<'a, f32>,
}

/// A parameter lent to a layer for one call, by the name the layer declared.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct ParamRef<'a> {
    pub name: RStr<'a>,
    pub tensor: TensorRef<'a>,
}

/// A parameter a layer needs, declared before any computation.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ParamDecl {
    /// The name within the layer (`weight`); the host prefixes the layer name.
    pub name: RString,
    pub shape: RVec<usize>,
    /// Fan-in and fan-out, for the Xavier and Kaiming initializers.
    pub fan_in: usize,
    pub fan_out: usize,
    /// The default initializer, as the JSON form of [`crate::Init`]
    /// (the same text a model file uses to override it).
    pub init: RString,
}

/// An error returned by a plugin.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct LayerError {
    /// True when the plugin panicked; the panic was caught at the boundary.
    pub panicked: bool,
    pub message: RString,
}

/// A layer instance, created by a plugin from its config.
#[sabi_trait]
pub trait LayerObject: Send + Sync {
    /// The output shape for an input shape, or why that input is not valid.
    fn output_shape(&self, input_shape: RSlice<'_, usize>) -> RResult<RVec<usize>, LayerError>;

    /// The parameters the layer needs for an input shape, in a fixed order.
    fn param_decls(&self, input_shape: RSlice<'_, usize>) -> RResult<RVec<ParamDecl>, LayerError>;

    /// Whether output row `i` depends only on input row `i` (axis 0), so that
    /// a batch may be split into pieces and processed separately.
    fn batch_independent(&self) -> bool;

    /// Computes the output into `output`, whose shape the host took from
    /// `output_shape`. `params` come in the order `param_decls` gave.
    #[sabi(last_prefix_field)]
    fn forward(
        &self,
        input: TensorRef<'_>,
        params: RSlice<'_, ParamRef<'_>>,
        output: TensorMut<'_>,
    ) -> RResult<(), LayerError>;

    /// Floating-point operations one `forward` performs for `input_shape`,
    /// or 0 when the layer does not say. Added after the prefix, with a
    /// default: plugins built without it report 0.
    fn flops(&self, input_shape: RSlice<'_, usize>) -> u64 {
        let _ = input_shape;
        0
    }
}

/// The owned layer trait object the host holds.
pub type LayerBox = LayerObject_TO<'static, RBox<()>>;

/// The root module every plugin library exports: its identity and its layer
/// constructor.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(option))]
pub struct PluginModule {
    /// The name models use to refer to the layer (`mydense`).
    pub name: RStr<'static>,
    /// The plugin crate's own version.
    pub version: RStr<'static>,
    /// One line saying what the layer computes.
    pub description: RStr<'static>,
    /// Creates a layer from its config, given as a JSON object.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(config_json: RStr<'_>) -> RResult<LayerBox, LayerError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "layer_plugin";
    const NAME: &'static str = "layer_plugin";
    // The interface version is this crate's version: a plugin and the host
    // that were built against semver-compatible versions of it can talk.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
