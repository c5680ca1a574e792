//! The run-file reader (TOML, then the typed and checked run configuration).
#![no_main]
use distill::config::RunConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RunConfig::from_str(text, std::path::Path::new("fuzz.toml"));
    }
});
