//! The safetensors reader: the header checked whole, then every tensor made as f32.
#![no_main]
use distill::model::hf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hf::parse_safetensors(data, std::path::Path::new("fuzz.safetensors"));
});
