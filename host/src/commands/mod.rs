//! The commands of the `host` binary, each a function composing the stages
//! of the library: model file → plugins → plan → parameters → execution →
//! output.

pub mod bench;
pub mod init;
pub mod inputs;
pub mod inspect;
pub mod lock;
pub mod params;
pub mod run;
pub mod train;
