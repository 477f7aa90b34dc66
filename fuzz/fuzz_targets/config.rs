//! The config parser on arbitrary text: a bad file is an error naming the field, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Config::parse(text) {
            assert!(!format!("{e:#}").is_empty());
        }
    }
});
