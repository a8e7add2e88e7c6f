//! Any text given as a model file: a model or an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = host::model::ModelSpec::parse(text, Path::new("fuzz/m.json")) {
            assert!(!spec.layers.is_empty());
        }
    }
});
