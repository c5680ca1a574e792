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

use std::path::Path;

fn inspect(path: &Path) -> std::process::Output {
    distill(&["inspect", path.to_str().unwrap()])
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
