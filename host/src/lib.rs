//! The layer host: runs models whose layers are plugins loaded from shared
//! libraries.
//!
//! Data flows one way: a model file ([`model`]) is parsed and validated; each
//! layer's plugin is found and checked ([`registry`]); the layers declare
//! their output shapes and parameters for the input's shape ([`runtime`]);
//! parameters are initialized or loaded ([`params`]); then the forward pass
//! runs layer by layer. Each step fails early with an error ([`error`]) that
//! names the layer, the plugin and the value at fault.

pub mod atomic_write;
pub mod conformance;
pub mod error;
pub mod model;
pub mod npy;
pub mod params;
pub mod pin;
pub mod print;
pub mod registry;
pub mod runtime;

pub use error::Error;
