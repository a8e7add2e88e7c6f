//! `layer-api` is the one contract between the layer host and its plugins.
//!
//! It has two faces:
//!
//! * [`abi`]: what crosses the shared-library boundary. Built on `abi_stable`:
//!   a root module every plugin exports ([`abi::PluginModule`]), a layer trait
//!   object ([`abi::LayerBox`]) and `#[repr(C)]` tensor views. No `std`
//!   collections, `ndarray` or `serde` types cross the line. The host is the
//!   only user of this face.
//! * The authoring face, re-exported at the crate root: a plain trait
//!   ([`Layer`]) over `ndarray` views with a `serde` config type, and one macro
//!   ([`export_layer!`]) that turns a type implementing it into a plugin. A
//!   plugin is a short file with no `unsafe` and no `abi_stable` names.
//!
//! The host owns all memory. It asks a layer for its output shape and its
//! parameter declarations before any computation, allocates the output and the
//! parameters itself, and lends them to the layer for one `forward` call.
//!
//! A minimal plugin:
//!
//! ```
//! use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, NoConfig, Params};
//!
//! pub struct Negate;
//!
//! impl Layer for Negate {
//!     const NAME: &'static str = "negate";
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

pub mod abi;
mod authoring;
mod init;

pub use authoring::{last_axis_features, Layer, NoConfig, ParamSpec, Params};
pub use init::{FanMode, Init};
pub use ndarray::{ArrayViewD, ArrayViewMutD};

/// The `ndarray` the views are made of. Use it (`layer_api::ndarray::Ix2`)
/// rather than a dependency of your own, which would have to be exactly the
/// same version for the types to match.
pub use ndarray;

/// The version of this interface, as plugins and the host were built against
/// it. Plugins built against an incompatible version are refused at load time.
pub const INTERFACE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the export macro expands to; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::authoring::{lib_header, plugin_module, Export};
    pub use abi_stable::library::LibHeader;
}
