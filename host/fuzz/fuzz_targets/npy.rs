//! Any bytes given as an `.npy` input: a value or an error, never a panic or
//! an allocation the data does not back.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The budget in force while fuzzing: small, so that a huge declared size
/// is refused by the budget rather than allocated.
const BUDGET: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| assert!(host::budget::set_limit(BUDGET)));
    if let Ok(array) = host::npy::read_f32_bytes(data) {
        assert!(array.len() <= data.len());
    }
});
