//! Bad inputs to `distill train`: each is one clear line naming the file and key or line, exit code
//! 2, and the output folder — which here already holds a finished run — is left exactly as it was,
//! even with --overwrite.
mod common;
use common::*;
use distill::model::{self, LlamaConfig, Tokenizer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Device;

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

fn tiny(dir: &Path, name: &str, specials: &[&str], seed: i64) {
    let mut cfg = LlamaConfig::tiny(259, 32, 1, 4, 2);
    cfg.eos_token_ids = vec![256];
    cfg.max_position_embeddings = 64;
    let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
    m.tokenizer = Some(Tokenizer::byte_level(specials).unwrap());
    m.save_hf(&dir.join(name)).unwrap();
}

const RUN: &str = r#"[teacher]
path = "teacher"

[student]
path = "student"

[data]
train = "train.txt"
seq_len = 16

[[loss]]
kind = "forward_kl"
temperature = 2.0

[run]
steps = 3
output = "out"
"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// Models, data and a finished run in `out/`.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tiny(dir.path(), "teacher", SPECIALS, 1);
        tiny(dir.path(), "student", SPECIALS, 2);
        tiny(dir.path(), "other", &["<|endoftext|>", "<|a|>", "<|b|>"], 3);
        std::fs::write(
            dir.path().join("train.txt"),
            "to be or not to be, that is the question. ".repeat(40),
        )
        .unwrap();
        std::fs::write(dir.path().join("empty.txt"), "").unwrap();
        std::fs::write(
            dir.path().join("chat.jsonl"),
            "{\"prompt\": \"hi\", \"response\": \"hello\"}\n{\"prompt\": \"hi\", \"response\": 3}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("broken.jsonl"),
            "{\"text\": \"fine\"}\n{\"text\": \"unterminated\n",
        )
        .unwrap();
        let e = Env { dir };
        let ok = distill(&["train", e.write("run.toml", RUN).to_str().unwrap()]);
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        e
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Every file of out/ with its bytes.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        snapshot(&self.dir.path().join("out"))
    }

    /// Run with `text` as the run file (and --overwrite): it must fail cleanly naming `needles`, and
    /// leave out/ untouched.
    fn refuses(&self, text: &str, extra: &[&str], needles: &[&str]) {
        let before = self.snapshot();
        let run = self.write("bad.toml", text);
        let mut args = vec!["train", run.to_str().unwrap(), "--overwrite"];
        args.extend_from_slice(extra);
        let out = distill(&args);
        assert_clean_failure(&out, needles);
        assert_eq!(before, self.snapshot(), "the output folder changed");
    }
}

#[test]
fn bad_run_files_and_data_are_refused_cleanly() {
    let e = Env::new();
    // unknown key, with its line
    e.refuses(
        &RUN.replace("temperature = 2.0", "temprature = 2.0"),
        &[],
        &[
            "bad.toml:13:",
            "unknown field 'temprature'",
            "expected one of",
        ],
    );
    // wrong type, with its line
    e.refuses(
        &RUN.replace("seq_len = 16", "seq_len = \"long\""),
        &[],
        &["bad.toml:9:", "invalid type"],
    );
    // a loss parameter that does not apply
    e.refuses(
        &RUN.replace("temperature = 2.0", "beta = 0.5"),
        &[],
        &["bad.toml:13:", "'beta' does not apply"],
    );
    // unknown loss kind
    e.refuses(
        &RUN.replace("\"forward_kl\"", "\"forward_kll\""),
        &[],
        &["bad.toml:12:", "unknown kind 'forward_kll'"],
    );
    // a bad --set value
    e.refuses(
        RUN,
        &["--set", "data.seq_len=\"x\""],
        &["--set data.seq_len", "invalid type"],
    );
    // missing teacher
    e.refuses(
        &RUN.replace("path = \"teacher\"", "path = \"no-such-teacher\""),
        &[],
        &["teacher", "no-such-teacher"],
    );
    // student and teacher tokenizers differ
    e.refuses(
        &RUN.replace("path = \"student\"", "path = \"other\""),
        &[],
        &["tokenizer", "differs", "other"],
    );
    // sequence length beyond the context
    e.refuses(
        &RUN.replace("seq_len = 16", "seq_len = 100"),
        &[],
        &["data.seq_len = 100", "context of 64"],
    );
    // empty data
    e.refuses(
        &RUN.replace("train.txt", "empty.txt"),
        &[],
        &["empty.txt", "empty data"],
    );
    // malformed JSONL lines, with file and line
    e.refuses(
        &RUN.replace("train.txt", "broken.jsonl"),
        &[],
        &["broken.jsonl:2:", "not valid JSON"],
    );
    e.refuses(
        &RUN.replace("train.txt", "chat.jsonl"),
        &[],
        &["chat.jsonl:2:", "'response' must be a string"],
    );
}

#[test]
fn an_output_folder_holding_another_run_is_refused_without_resume_or_overwrite() {
    let e = Env::new();
    let before = e.snapshot();
    let run = e.dir.path().join("run.toml");
    let out = distill(&["train", run.to_str().unwrap()]);
    assert_clean_failure(
        &out,
        &["out", "holds another run", "--resume", "--overwrite"],
    );
    assert_eq!(before, e.snapshot());
    // --overwrite replaces it; --resume of a finished run changes no weight
    let w = std::fs::read(e.dir.path().join("out/student/model.safetensors")).unwrap();
    let again = distill(&["train", run.to_str().unwrap(), "--resume"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        w,
        std::fs::read(e.dir.path().join("out/student/model.safetensors")).unwrap()
    );
    let fresh = distill(&[
        "train",
        run.to_str().unwrap(),
        "--overwrite",
        "--set",
        "run.seed=9",
    ]);
    assert!(
        fresh.status.success(),
        "{}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    assert_ne!(
        w,
        std::fs::read(e.dir.path().join("out/student/model.safetensors")).unwrap()
    );
}
