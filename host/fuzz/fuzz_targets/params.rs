//! Any bytes given as a parameter file (safetensors or `.npz`, told apart by
//! their first bytes): its tensors or an error, never a panic, and never
//! more memory than the (low) budget allows, whatever sizes the file declares.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

/// The budget in force while fuzzing: small, so that a tensor declaring a
/// huge size is refused by the budget rather than allocated.
const BUDGET: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| assert!(host::budget::set_limit(BUDGET)));
    if let Ok(file) = host::param_file::ParamFile::from_bytes(Path::new("fuzz/p"), data.to_vec())
    {
        let mut bytes = 0u64;
        for tensor in file.tensors.values() {
            if let Ok(values) = &tensor.values {
                let elements = host::budget::elements(&tensor.shape);
                assert_eq!(elements, Some(values.len() as u128));
                bytes += values.len() as u64 * 4;
            }
        }
        assert!(bytes <= BUDGET);
    }
});
