//! Bad model inputs: each gives exit code 2 and one line naming the file (and the key).
mod common;
use common::*;
use distill::model::{self, LlamaConfig};

fn tiny_folder() -> tempfile::TempDir {
    let m = model::random(&LlamaConfig::tiny(64, 32, 2, 4, 2), tch::Device::Cpu, 0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    m.save_hf(tmp.path()).unwrap();
    tmp
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_folder();
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let out = distill(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(&out, &[f.to_str().unwrap()]);
}

#[test]
fn config_missing_a_required_key() {
    let dir = tiny_folder();
    let f = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&f, v.to_string()).unwrap();
    let out = distill(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(&out, &[f.to_str().unwrap(), "hidden_size", "missing"]);
}

#[test]
fn config_with_a_wrong_type() {
    let dir = tiny_folder();
    let f = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    v["num_hidden_layers"] = serde_json::json!("two");
    std::fs::write(&f, v.to_string()).unwrap();
    let out = distill(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(&out, &[f.to_str().unwrap(), "num_hidden_layers"]);
}

#[test]
fn unknown_architecture() {
    let dir = tiny_folder();
    let f = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    v["model_type"] = serde_json::json!("gpt_neox");
    std::fs::write(&f, v.to_string()).unwrap();
    let out = distill(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(
        &out,
        &[
            f.to_str().unwrap(),
            "model_type",
            "unknown architecture 'gpt_neox'",
        ],
    );
}

#[test]
fn weights_that_do_not_fit_the_config() {
    let dir = tiny_folder();
    let f = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    v["intermediate_size"] = serde_json::json!(65);
    std::fs::write(&f, v.to_string()).unwrap();
    let out = distill(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(
        &out,
        &[dir.path().to_str().unwrap(), "_proj.weight", "has shape"],
    );
}

#[test]
fn missing_model_path() {
    let out = distill(&["inspect", "/nonexistent/model"]);
    assert_clean_failure(&out, &["/nonexistent/model"]);
}

#[test]
fn eval_on_missing_data_file() {
    let dir = tiny_folder();
    let out = distill(&[
        "eval",
        dir.path().to_str().unwrap(),
        "--data",
        "/nonexistent/data.txt",
    ]);
    assert_clean_failure(&out, &[]);
}

#[test]
fn sharded_safetensors_with_an_index_load_like_one_file() {
    let dir = tiny_folder();
    let whole = model::load(dir.path(), tch::Device::Cpu).unwrap();
    // split model.safetensors into two shards listed by model.safetensors.index.json
    let tensors =
        distill::model::hf::read_safetensors(&dir.path().join("model.safetensors")).unwrap();
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let list: Vec<(String, tch::Tensor)> = part
            .iter()
            .map(|n| (n.clone(), tensors[n].shallow_clone()))
            .collect();
        distill::model::hf::write_safetensors(&dir.path().join(shard), &list).unwrap();
        for n in part {
            map.insert(n.clone(), serde_json::json!(shard));
        }
    }
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = model::load(dir.path(), tch::Device::Cpu).unwrap();
    for (name, t) in whole.vs.variables() {
        assert!(t.equal(&sharded.vs.variables()[&name]), "{name}");
    }
    // a shard that is missing is named
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let out = distill(&["inspect", dir.path().to_str().unwrap()]);
    assert_clean_failure(&out, &["model-00002-of-00002.safetensors"]);
}

#[test]
fn a_tokenizer_larger_than_the_model_is_one_clear_line() {
    // a 64-row model saved with a 259-token tokenizer: text ids run past the embedding
    let m = model::random(&LlamaConfig::tiny(64, 32, 2, 4, 2), tch::Device::Cpu, 0).unwrap();
    let mut m = m;
    m.tokenizer = Some(distill::model::Tokenizer::byte_level(&["<|endoftext|>"]).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    m.save_hf(tmp.path()).unwrap();
    let data = tmp.path().join("text.txt");
    std::fs::write(&data, "zzzz zzzz zzzz").unwrap();
    let out = distill(&[
        "eval",
        tmp.path().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert_clean_failure(
        &out,
        &["token id 122 is outside the model's vocabulary of 64"],
    );
}

#[path = "common/tiny_gguf.rs"]
mod tiny_gguf;
use distill::model::gguf::Value as GValue;
use std::path::{Path, PathBuf};
use tiny_gguf::TinyGguf;

/// A tiny folder whose config.json has `key` set to `value`; the folder and the config's path.
fn folder_with(key: &str, value: serde_json::Value) -> (tempfile::TempDir, PathBuf) {
    let dir = tiny_folder();
    let f = dir.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    v[key] = value;
    if key.starts_with("rope_") {
        // our config.json writes both rope layouts; the older one alone must be refused by its key
        v.as_object_mut().unwrap().remove("rope_parameters");
    }
    std::fs::write(&f, v.to_string()).unwrap();
    (dir, f)
}

fn inspect(path: &Path) -> std::process::Output {
    distill(&["inspect", path.to_str().unwrap()])
}

#[test]
fn config_sizes_the_weights_do_not_hold_are_refused_by_key_before_allocating() {
    // Each would allocate far beyond this machine (vocab 2^40 × 32 f32 = 140 TB; 10^6 layers
    // one by one until memory runs out) were the config not checked against the weights first.
    for (key, value) in [
        ("vocab_size", 1u64 << 40),
        ("intermediate_size", 1 << 36),
        ("num_hidden_layers", 1_000_000),
        ("hidden_size", 1 << 33),
        ("num_attention_heads", 1 << 20),
        ("head_dim", 1 << 30),
        // the parameter count would not fit libtorch's i64 sizes at all
        ("vocab_size", 1 << 62),
    ] {
        let (_dir, cfg) = folder_with(key, value.into());
        let out = inspect(cfg.parent().unwrap());
        assert_clean_failure(&out, &[cfg.to_str().unwrap(), &format!("key '{key}'")]);
    }
}

#[test]
fn config_values_out_of_range_are_refused_by_key() {
    for (key, value) in [
        ("max_position_embeddings", serde_json::json!(0)),
        ("rms_norm_eps", serde_json::json!(0.0)),
        ("rms_norm_eps", serde_json::json!(-1e-6)),
        ("rope_theta", serde_json::json!(0.0)),
        ("rope_theta", serde_json::json!(-10000.0)),
        ("sliding_window", serde_json::json!(0)),
    ] {
        let (_dir, cfg) = folder_with(key, value.clone());
        let out = inspect(cfg.parent().unwrap());
        assert_clean_failure(
            &out,
            &[cfg.to_str().unwrap(), &format!("key '{key}'"), "must be"],
        );
    }
    let (_dir, cfg) = folder_with(
        "rope_scaling",
        serde_json::json!({"rope_type": "linear", "factor": -2.0}),
    );
    let out = inspect(cfg.parent().unwrap());
    assert_clean_failure(&out, &["key 'rope_scaling.factor'", "must be"]);
}

#[test]
fn the_shapes_the_loader_checks_are_the_shapes_the_model_builds() {
    // `llama::variables` (checked against the files before allocating) must list exactly the
    // variables `Llama::new` creates, for every combination of optional tensors.
    let mut configs = vec![LlamaConfig::tiny(64, 32, 2, 4, 2)];
    let mut c = LlamaConfig::tiny(40, 24, 3, 6, 3);
    (c.tie_word_embeddings, c.qkv_bias, c.o_bias, c.mlp_bias) = (false, true, true, true);
    c.intermediate_size = 50;
    c.head_dim = 8; // not hidden / heads
    configs.push(c);
    for c in configs {
        let m = model::random(&c, tch::Device::Cpu, 0).unwrap();
        let mut built: Vec<(String, Vec<i64>)> =
            m.vs.variables()
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
        let mut listed: Vec<(String, Vec<i64>)> = std::iter::once(None)
            .chain((0..c.num_hidden_layers).map(Some))
            .flat_map(|l| model::llama::variables(&c, l))
            .map(|s| (s.name, s.shape))
            .collect();
        built.sort();
        listed.sort();
        assert_eq!(built, listed, "{c:?}");
    }
}

#[test]
fn the_tiny_gguf_of_these_tests_loads_as_the_model_it_was_written_from() {
    // the corrupt-GGUF cases below fail for their own reason, not because the base file is bad
    let g = TinyGguf::new();
    let dir = tempfile::tempdir().unwrap();
    let p = g.write(dir.path(), "tiny.gguf");
    let loaded = model::load(&p, tch::Device::Cpu).unwrap();
    assert_eq!(loaded.model.config.num_hidden_layers, 2);
    assert_eq!(loaded.model.config.vocab_size, 64);
    let original = g.model.vs.variables();
    let read = loaded.vs.variables();
    assert_eq!(read.len(), original.len());
    for (name, t) in original {
        assert!(t.equal(&read[&name]), "{name} differs after the round trip");
    }
}

#[test]
fn gguf_sizes_the_file_does_not_hold_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("llama.embedding_length", GValue::U64(1 << 31)),
        ("llama.block_count", GValue::U64(1 << 31)),
        ("llama.feed_forward_length", GValue::U64(1 << 36)),
        ("llama.vocab_size", GValue::U64(1 << 40)),
        ("llama.attention.head_count", GValue::U32(1 << 20)),
        ("llama.attention.key_length", GValue::U32(1 << 30)),
    ] {
        let mut g = TinyGguf::new();
        g.set(key, value);
        let p = g.write(dir.path(), "sizes.gguf");
        let out = inspect(&p);
        assert_clean_failure(&out, &[p.to_str().unwrap(), &format!("key '{key}'")]);
    }
}

#[test]
fn gguf_tensor_dims_whose_product_overflows_are_refused_by_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for dims in [
        vec![1u64 << 32, 1 << 32],
        vec![1 << 63, 0],
        vec![u64::MAX, 1],
    ] {
        let mut g = TinyGguf::new();
        let t = g
            .tensors
            .iter_mut()
            .find(|t| t.0 == "token_embd.weight")
            .unwrap();
        t.1 = dims.clone();
        let p = g.write(dir.path(), "dims.gguf");
        let out = inspect(&p);
        assert_clean_failure(
            &out,
            &[p.to_str().unwrap(), "tensor 'token_embd.weight'", "2^63"],
        );
    }
}

#[test]
fn gguf_values_out_of_range_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("llama.context_length", GValue::U32(0)),
        ("llama.attention.layer_norm_rms_epsilon", GValue::F32(0.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GValue::F32(f32::NAN),
        ),
        ("llama.rope.freq_base", GValue::F32(-1.0)),
        ("llama.rope.freq_base", GValue::F32(f32::NAN)),
        ("llama.rope.freq_base", GValue::F32(f32::INFINITY)),
    ] {
        let mut g = TinyGguf::new();
        g.set(key, value);
        let p = g.write(dir.path(), "values.gguf");
        let out = inspect(&p);
        assert_clean_failure(
            &out,
            &[p.to_str().unwrap(), &format!("key '{key}'"), "must be"],
        );
    }
}

#[test]
fn a_gguf_array_longer_than_the_file_is_refused_without_allocating_it() {
    // 2^40 u32 items would be 32 TB of values: the count is checked against the bytes left
    let mut g = TinyGguf::new();
    g.set("extra.array", GValue::Array(vec![GValue::U32(7); 3]));
    let mut bytes = g.bytes();
    // the array's count follows its key, its value type (9) and its item type (4)
    let mut pat = b"extra.array".to_vec();
    pat.extend(9u32.to_le_bytes());
    pat.extend(4u32.to_le_bytes());
    let at = bytes.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len();
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("array.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let out = inspect(&p);
    assert_clean_failure(
        &out,
        &[p.to_str().unwrap(), "extra.array", "exceeds the file"],
    );
}

#[test]
fn weight_files_that_are_folders_or_broken_links_are_named() {
    use std::os::unix::fs::symlink;
    // model.safetensors a folder: mmap would say "No such device (os error 19)"
    let dir = tiny_folder();
    let st = dir.path().join("model.safetensors");
    std::fs::remove_file(&st).unwrap();
    std::fs::create_dir(&st).unwrap();
    assert_clean_failure(
        &inspect(dir.path()),
        &[st.to_str().unwrap(), "is a folder, expected a file"],
    );
    // a link to itself: "Too many levels of symbolic links" without a name, or "no
    // model.safetensors in this folder" although there is one
    std::fs::remove_dir(&st).unwrap();
    symlink(&st, &st).unwrap();
    assert_clean_failure(
        &inspect(dir.path()),
        &[st.to_str().unwrap(), "symbolic link loop"],
    );
    // a link to nothing
    std::fs::remove_file(&st).unwrap();
    symlink(dir.path().join("gone.safetensors"), &st).unwrap();
    assert_clean_failure(
        &inspect(dir.path()),
        &[st.to_str().unwrap(), "gone.safetensors", "does not exist"],
    );
    // config.json a folder
    let dir = tiny_folder();
    let cfg = dir.path().join("config.json");
    std::fs::remove_file(&cfg).unwrap();
    std::fs::create_dir(&cfg).unwrap();
    assert_clean_failure(
        &inspect(dir.path()),
        &[cfg.to_str().unwrap(), "is a folder, expected a file"],
    );
    // the model path itself a pair of links to each other
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    symlink(&b, &a).unwrap();
    symlink(&a, &b).unwrap();
    assert_clean_failure(&inspect(&a), &[a.to_str().unwrap(), "symbolic link loop"]);
}

#[test]
fn data_files_that_start_with_a_byte_order_mark_read_as_without_it() {
    let tok = distill::model::Tokenizer::byte_level(&["<|endoftext|>"]).unwrap();
    let eos = Some(256);
    let dir = tempfile::tempdir().unwrap();
    type Reader = fn(
        &Path,
        &distill::model::Tokenizer,
        Option<u32>,
    ) -> distill::Result<Vec<distill::data::Example>>;
    let cases: [(&str, &str, Reader); 2] = [
        (
            "data.jsonl",
            "{\"text\": \"hello\"}\n{\"prompt\": \"a\", \"response\": \"b\"}\n",
            distill::data::jsonl::read,
        ),
        ("data.txt", "hello\nworld\n", distill::data::text::read),
    ];
    for (name, body, read) in cases {
        let plain = dir.path().join(name);
        std::fs::write(&plain, body).unwrap();
        let marked = dir.path().join(format!("bom-{name}"));
        std::fs::write(&marked, format!("\u{feff}{body}")).unwrap();
        let want = read(&plain, &tok, eos).unwrap();
        let got = read(&marked, &tok, eos).unwrap();
        assert!(!want.is_empty());
        assert_eq!(got, want, "{name}");
        // and the first example starts with the text itself, not with a mark
        let hello = tok.encode("hello", false).unwrap();
        assert_eq!(&got[0].ids[..hello.len()], hello.as_slice(), "{name}");
    }
}
