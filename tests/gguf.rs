//! GGUF: every supported type dequantises as gguf-py (llama.cpp's own reader) does; corrupt files
//! give one clear error.
mod common;
use common::*;
use distill::model::gguf::GgufFile;

#[test]
fn dequantization_matches_gguf_py_for_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let (g, e) = (
        dir.path().join("q.gguf"),
        dir.path().join("expected.safetensors"),
    );
    reference(&["gguf_quant_file", g.to_str().unwrap(), e.to_str().unwrap()]);
    let file = GgufFile::open(&g).unwrap();
    let types = [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "F32", "BF16",
    ];
    assert_eq!(file.tensors.len(), types.len());
    for ty in types {
        let info = file.tensor(&format!("t.{ty}")).unwrap();
        assert_eq!(info.ggml_type.name(), ty);
        let ours = tch::Tensor::from_slice(&file.dequantize(info).unwrap()).reshape(info.shape());
        let expected = read_tensor(&e, &format!("t.{ty}"));
        assert_eq!(ours.size(), expected.size(), "{ty}");
        let diff = (&ours - &expected).abs().max().double_value(&[]);
        assert!(diff == 0.0, "{ty}: max difference {diff} from gguf-py");
        assert!(
            expected.abs().max().double_value(&[]) > 0.0,
            "{ty}: degenerate test data"
        );
    }
}

#[test]
fn demo_teacher_metadata_and_tensor_table() {
    let g = GgufFile::open(&demo_teacher()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(
        g.get("llama.block_count").and_then(|v| v.as_u64()),
        Some(30)
    );
    assert_eq!(
        g.tensor("token_embd.weight").unwrap().shape(),
        vec![49152, 576]
    );
    assert_eq!(g.tensors.len(), 272);
}

fn corrupt(bytes: &[u8], name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    (dir, p)
}

#[test]
fn bad_magic_is_a_clear_error() {
    let mut bytes = std::fs::read(demo_teacher()).unwrap();
    bytes.truncate(1 << 20);
    bytes[..4].copy_from_slice(b"GGUX");
    let (_d, p) = corrupt(&bytes, "bad.gguf");
    let out = distill(&["inspect", p.to_str().unwrap()]);
    assert_clean_failure(&out, &[p.to_str().unwrap(), "bad magic"]);
}

#[test]
fn truncated_tensor_data_is_a_clear_error() {
    let bytes = std::fs::read(demo_teacher()).unwrap();
    let (_d, p) = corrupt(&bytes[..bytes.len() - 1000], "short.gguf");
    let out = distill(&["inspect", p.to_str().unwrap()]);
    assert_clean_failure(&out, &[p.to_str().unwrap(), "truncated"]);
}

#[test]
fn truncated_header_is_a_clear_error() {
    let bytes = std::fs::read(demo_teacher()).unwrap();
    let (_d, p) = corrupt(&bytes[..5000], "header.gguf");
    let out = distill(&["inspect", p.to_str().unwrap()]);
    assert_clean_failure(&out, &[p.to_str().unwrap(), "truncated"]);
}

#[test]
fn version_2_files_read_like_version_3() {
    // v2 and v3 share the layout (v3 added big-endian files); patch the version field of a copy
    let mut bytes = std::fs::read(demo_teacher()).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let (_d, p) = corrupt(&bytes, "v2.gguf");
    let v2 = GgufFile::open(&p).unwrap();
    let v3 = GgufFile::open(&demo_teacher()).unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.metadata, v3.metadata);
    let info = v2.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        v2.dequantize(info).unwrap(),
        v3.dequantize(v3.tensor("blk.0.attn_q.weight").unwrap())
            .unwrap()
    );
    // and version 1 (32-bit counts) is refused by name
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    let (_d1, p1) = corrupt(&bytes, "v1.gguf");
    let err = GgufFile::open(&p1).err().unwrap().to_string();
    assert!(err.contains("GGUF version 1 is not supported"), "{err}");
}
