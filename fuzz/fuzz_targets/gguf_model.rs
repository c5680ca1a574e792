//! A GGUF file through the model loader: the config from its metadata, the shapes checked against
//! the tensors, the model built and filled, the tokenizer built from the vocabulary.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("distill-fuzz-{}.gguf", std::process::id()));
    std::fs::write(&path, data).expect("the temporary folder is writable");
    let _ = distill::model::load(&path, tch::Device::Cpu);
});
