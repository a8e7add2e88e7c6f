//! `layer-abi`: what crosses the boundary between the layer host and a
//! plugin library, interface 1.x: the [`manifest`] the host reads from the
//! file before opening it, and the versioned function table ([`abi`]).
//!
//! It is a crate of its own so that its version is the interface's: the
//! layout checker ties every core type to this crate's name and major
//! version, which stays 1 while interface 1.x lasts. Plugin authors use
//! `layer-api`, which re-exports this crate as `layer_api::abi`; only hosts
//! use it directly.

pub mod abi;
pub mod manifest;
