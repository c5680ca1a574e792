//! The GGUF reader: header, metadata, tensor table, and every tensor dequantised.
#![no_main]
use distill::model::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.gguf");
    if let Ok(f) = GgufFile::from_bytes(data.to_vec(), path) {
        for t in &f.tensors {
            let _ = f.dequantize(t);
        }
    }
});
