//! The commands of the `host` binary, each a function composing the stages
//! of the library: model file → plugins → plan → parameters → execution →
//! output.

pub mod run;
