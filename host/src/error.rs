//! The host's one error type. Each variant carries where the problem is
//! (file, layer, plugin, parameter) so that the message alone tells the user
//! what to fix; only `main` turns it into text and an exit status.

use std::path::PathBuf;

use thiserror::Error;

use crate::npy::NpyError;
use crate::registry::PluginError;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", .path.display())]
    ModelSyntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {message}", .path.display())]
    Model { path: PathBuf, message: String },
    #[error("layer '{layer}': {source}")]
    Plugin {
        layer: String,
        #[source]
        source: Box<PluginError>,
    },
    #[error("layer '{layer}' (plugin '{plugin}'){}: {message}", if *.panicked { " panicked" } else { "" })]
    Layer {
        layer: String,
        plugin: String,
        message: String,
        panicked: bool,
    },
    /// An isolated layer whose worker process died, hung or was killed.
    #[error("layer '{layer}' (plugin '{plugin}') {message}")]
    Worker {
        layer: String,
        plugin: String,
        message: String,
        /// The end of the worker's stderr, shown with `--verbose`.
        stderr: String,
    },
    #[error("{}: {source}", .path.display())]
    Npy {
        path: PathBuf,
        #[source]
        source: NpyError,
    },
    #[error("{}: {message}", .path.display())]
    Params { path: PathBuf, message: String },
    #[error("parameter '{name}': {message}")]
    Param { name: String, message: String },
    #[error("the forward pass was prepared for input shape {expected:?}, not {found:?}")]
    InputShape {
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("the forward pass was prepared for {expected} input, not {found}")]
    InputDtype {
        expected: layer_api::DType,
        found: layer_api::DType,
    },
    #[error("cannot start worker threads: {0}")]
    Threads(String),
    /// A plugin asked for by name, outside any model.
    #[error(transparent)]
    PluginLookup(Box<PluginError>),
    /// A command line that names things the model does not have.
    #[error("{0}")]
    Usage(String),
    #[error("--config '{text}': {message}")]
    ConfigArgument { text: String, message: String },
    #[error("plugin '{plugin}' failed {failed} of {total} conformance checks")]
    Conformance {
        plugin: String,
        failed: usize,
        total: usize,
    },
}

impl Error {
    /// The long form behind a short message, shown with `--verbose`.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Error::Plugin { source, .. } => source.detail(),
            Error::Worker { stderr, .. } if !stderr.trim().is_empty() => Some(stderr),
            _ => None,
        }
    }
}
