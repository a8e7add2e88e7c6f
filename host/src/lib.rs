//! The layer host: runs models whose layers are plugins loaded from shared
//! libraries.
//!
//! Data flows one way: a model file ([`model`]) is parsed and validated; each
//! layer's plugin is found and checked ([`registry`]); the layers declare
//! their output shapes and parameters for the input's shape ([`runtime`]),
//! to which the model file's initializer overrides and sharing are applied
//! ([`binding`]); parameters are initialized or loaded from safetensors or
//! `.npz` ([`params`], [`param_file`]); then the forward pass runs layer by
//! layer. [`inspect`] summarizes a model without running it, even without
//! an input shape. Each step fails early with an error ([`error`]) that
//! names the layer, the plugin and the value at fault.

pub mod atomic_file;
pub mod bench;
pub mod binding;
pub mod budget;
pub mod commands;
pub mod conformance;
pub mod embed;
pub mod error;
pub mod gradcheck;
pub mod graph;
pub mod inspect;
pub mod isolate;
pub mod model;
pub mod npy;
pub mod npz;
pub mod param_file;
pub mod params;
pub mod pin;
pub mod plan;
pub mod pool;
pub mod print;
pub mod registry;
pub mod runner;
pub mod runtime;
pub mod sealed;
pub mod stream;
pub mod tensor;
pub mod trace;
pub mod train;

pub use error::Error;
