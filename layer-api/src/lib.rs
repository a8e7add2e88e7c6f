//! `layer-api` is the one contract between the layer host and its plugins.
//!
//! It has two faces:
//!
//! * [`abi`]: what crosses the shared-library boundary: interface 1.x, a
//!   manifest the host reads from the file before opening it ([`manifest`])
//!   and a versioned table of functions whose 1.0 core is frozen and whose
//!   later entries are only appended. The host is the only user of this
//!   face.
//! * The authoring face, re-exported at the crate root: a plain trait
//!   ([`Layer`], one `float32` tensor in and out; [`MultiLayer`] for several
//!   named inputs and outputs of any element type) over `ndarray` views with
//!   a `serde` config type, and one macro ([`export_layer!`]) that turns a
//!   type implementing it into a plugin. A plugin is a short file with no
//!   `unsafe` and no `abi_stable` names. [`testing`] runs a layer in a plain
//!   `cargo test`.
//!
//! The host owns all memory. It asks a layer for its outputs and its
//! parameter declarations before any computation, allocates the outputs and
//! the parameters itself, and lends them to the layer for one `forward` call.
//!
//! A minimal plugin (the crate `negate`, so the layer is called `negate`):
//!
//! ```
//! use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, NoConfig, Params};
//!
//! pub struct Negate;
//!
//! impl Layer for Negate {
//!     const DESCRIPTION: &'static str = "y = -x";
//!     type Config = NoConfig;
//!
//!     fn new(_config: NoConfig) -> Result<Self, String> {
//!         Ok(Negate)
//!     }
//!     fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
//!         Ok(input.to_vec())
//!     }
//!     fn batch_independent(&self) -> bool {
//!         true
//!     }
//!     fn forward(&self, x: ArrayViewD<f32>, _p: &Params, mut y: ArrayViewMutD<f32>) -> Result<(), String> {
//!         y.zip_mut_with(&x, |y, &x| *y = -x);
//!         Ok(())
//!     }
//! }
//!
//! export_layer!(Negate);
//! ```

/// The binary interface (the `layer-abi` crate): for hosts.
pub use layer_abi::abi;
mod adapter;
mod authoring;
#[doc(hidden)]
pub mod core_1_0;
mod init;
pub mod parallel;
/// The plugin manifest (the `layer-abi` crate): for hosts.
pub use layer_abi::manifest;
pub mod testing;

pub use abi::DType;
pub use authoring::{
    last_axis_features, Element, Grads, InputPort, Inputs, Layer, MultiLayer, NoConfig, Outputs,
    ParamSpec, Params, Plan, Prepared, Probe, ProbeInput, Signature, TensorInfo, INPUT, OUTPUT,
};
pub use init::{FanMode, Init};
pub use ndarray::{ArrayViewD, ArrayViewMutD};

/// The `ndarray` the views are made of. Use it (`layer_api::ndarray::Ix2`)
/// rather than a dependency of your own, which would have to be exactly the
/// same version for the types to match.
pub use ndarray;

/// The `half` crate, whose `f16` and `bf16` are the element types of
/// `float16` and `bfloat16` tensors.
pub use half;

/// The version of this crate, recorded in each plugin's manifest for
/// information. Compatibility is decided by the interface version
/// ([`abi::ABI_MAJOR`], [`abi::ABI_MINOR`]), which is `layer-abi`'s, not by
/// this.
pub const LAYER_API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the export macro expands to; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::adapter::{offers, plugin_table};
    pub use crate::manifest::{build_manifest, ManifestParts};
}
