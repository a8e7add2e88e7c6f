//! Any text given as a model file: a model or an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

/// The budget in force while fuzzing: small, so that a huge declared size
/// is refused by the budget rather than allocated.
const BUDGET: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| assert!(host::budget::set_limit(BUDGET)));
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = host::model::ModelSpec::parse(text, Path::new("fuzz/m.json")) {
            assert!(!spec.layers.is_empty());
        }
    }
});
