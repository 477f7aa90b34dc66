//! Catalog files on arbitrary text: parsing Kubernetes manifests and joining them into a catalog must report bad
//! input as errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::catalog::Objects;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(objects) = Objects::parse(text) {
            let _ = objects.to_catalog();
        }
    }
});
