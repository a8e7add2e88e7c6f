//! Any bytes given as an `.npz` input: its arrays or an error, never a panic,
//! and never more memory than the (low) budget allows, whatever sizes the
//! archive's members declare or inflate to.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The budget in force while fuzzing: small, so that a member declaring a
/// huge size is refused by the budget rather than allocated.
const BUDGET: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| assert!(host::budget::set_limit(BUDGET)));
    if let Ok(arrays) = host::npz::read(data.to_vec()) {
        let bytes: usize = arrays.iter().map(|(_, t)| t.bytes().len()).sum();
        assert!(bytes as u64 <= BUDGET);
    }
});
