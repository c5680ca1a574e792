//! `distill plan` and `[run] max_memory` on tiny models: a run that would not fit is refused with
//! one line and writes nothing (no output folder, an existing run's folder unchanged); the chunk
//! chosen fits the budget by the formula of train/plan.rs, recomputed here in f64 from the probe's
//! numbers, and no larger chunk would; the counted terms equal counts made here from the
//! safetensors files (gradients = the student's tensor bytes, AdamW's m and v twice that, the
//! checkpoint four times, the optimizer's temporaries twice the largest tensor); the table lists
//! the fields; a run that fits records its chunk in run.json. No timing is asserted.
mod common;
use common::*;
use distill::model::{self, LlamaConfig, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Device;

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// vocabulary rows: wide enough that the logits' chunk is a visible share of the step's memory
const V: usize = 16384;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LlamaConfig::tiny(V, 48, 2, 4, 2);
        cfg.eos_token_ids = vec![256];
        let save = |seed: i64, name: &str| {
            let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
            m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
            m.save_hf(&dir.path().join(name)).unwrap();
        };
        save(7, "teacher");
        save(8, "student");
        let words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"];
        let mut text = String::new();
        for i in 0..800 {
            text += words[(i * 7 + i / 3) % words.len()];
            text += if i % 11 == 10 { ".\n" } else { " " };
        }
        std::fs::write(dir.path().join("train.txt"), text).unwrap();
        let run = r#"
[teacher]
path = "teacher"

[student]
path = "student"

[data]
train = "train.txt"
seq_len = 64
validation_fraction = 0.1
max_validation_sequences = 4

[[loss]]
kind = "forward_kl"

[optim]
lr = 1e-3
micro_batch = 4
loss_chunk = 0

[run]
steps = 2
log_every = 1
eval_every = 0
checkpoint_every = 2
threads = 1
seed = 3
output = "out"
"#;
        std::fs::write(dir.path().join("run.toml"), run).unwrap();
        Setup { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn run_file(&self) -> String {
        self.path("run.toml").display().to_string()
    }

    /// `distill plan --json` with `set` overrides: (exit success, the prediction, stderr).
    fn plan(&self, set: &[&str]) -> (bool, Value, String) {
        let run = self.run_file();
        let mut args = vec!["plan", run.as_str(), "--json"];
        for s in set {
            args.extend(["--set", s]);
        }
        let out = distill(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let v = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
        (
            out.status.success(),
            v,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// The formula of train/plan.rs, written again: the predicted peak at chunk c.
fn peak_at(p: &Value, c: f64) -> f64 {
    let (pr, n, sh) = (&p["probe"], &p["counts"], &p["shape"]);
    let tokens = f(&sh["tokens"]);
    let c = if sh["chunkable"].as_bool().unwrap() {
        c.clamp(1.0, tokens)
    } else {
        tokens
    };
    let trainable = f(&n["trainable"]);
    let base = f(&pr["resident"]) + 4.0 * trainable;
    let step = (f(&pr["s0"]) + f(&pr["s_tok"]) * tokens + f(&pr["s_chunk"]) * c).max(0.0);
    let opt = 8.0 * f(&n["largest"]);
    let eval = (f(&pr["e0"]) + f(&pr["e_tok"]) * tokens).max(0.0);
    let ckpt = if sh["checkpoints"].as_bool().unwrap() {
        16.0 * trainable
    } else {
        0.0
    };
    let write = 8.0 * f(&n["student"]);
    f(&pr["setup_peak"]).max(base + step.max(opt).max(eval).max(ckpt.max(write)))
}

/// (tensor bytes, largest tensor's elements) of an f32 safetensors file, from its header.
fn safetensors_counts(path: &Path) -> (f64, f64) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let largest = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_f64().unwrap())
                .product::<f64>()
        })
        .fold(0.0, f64::max);
    ((bytes.len() - 8 - n) as f64, largest)
}

fn term(p: &Value, name: &str) -> f64 {
    let t = p["terms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().trim() == name)
        .unwrap_or_else(|| panic!("no term '{name}' in {p}"));
    f(&t["bytes"])
}

#[test]
fn a_run_that_would_not_fit_is_refused_and_writes_nothing() {
    let s = Setup::new();
    let run = s.run_file();
    let out = distill(&["train", &run, "--set", "run.max_memory=1MiB"]);
    assert_clean_failure(&out, &["run.max_memory", "nothing was written"]);
    assert!(!s.path("out").exists(), "a refused run created its folder");
    // a run in the folder: a refused --overwrite leaves it byte for byte
    train_ok(&["train", &run]);
    let before = snapshot(&s.path("out"));
    let out = distill(&["train", &run, "--overwrite", "--set", "run.max_memory=1MiB"]);
    assert_clean_failure(&out, &["run.max_memory"]);
    assert_eq!(snapshot(&s.path("out")), before);
    // `distill plan` says the same, with the table, and exits 2
    let (ok, p, err) = s.plan(&["run.max_memory=1MiB"]);
    assert!(!ok && err.contains("run.max_memory"), "{err}");
    assert!(peak_at(&p, 1.0) > 1024.0 * 1024.0);
}

#[test]
fn the_chunk_chosen_fits_the_budget_by_the_formula() {
    let s = Setup::new();
    let (ok, free, err) = s.plan(&[]);
    assert!(ok, "{err}");
    let tokens = f(&free["shape"]["tokens"]);
    assert_eq!(tokens, 4.0 * 64.0);
    // without a budget: the configured chunk (0 = every position), its peak by the formula
    assert_eq!(f(&free["chunk"]), tokens);
    let peak = f(&free["peak"]);
    assert!((peak - peak_at(&free, tokens)).abs() <= 1e-6 * peak);
    // a budget between the step's peak at a chunk of 1 (or the other phases' peak) and at the whole
    // micro-batch: by the formula (with the second probe's own numbers) the chosen chunk fits, and
    // the next larger one (a multiple of 64 above 64) would not
    // (name, peak) of each phase
    let phases: Vec<(String, f64)> = free["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x[0].as_str().unwrap().to_string(), f(&x[1])))
        .collect();
    let step = phases.iter().find(|x| x.0 == "step").unwrap().1;
    let others = phases
        .iter()
        .filter(|x| x.0 != "step")
        .map(|x| x.1)
        .fold(0.0, f64::max);
    let low = others.max(step - f(&free["probe"]["s_chunk"]) * (tokens - 1.0));
    let budget = (0.5 * (low + step)).floor();
    let set = format!("run.max_memory={budget}");
    let (ok, p, err) = s.plan(&[&set]);
    assert_eq!(f(&p["max_memory"]), budget);
    if ok {
        let c = f(&p["chunk"]);
        eprintln!("budget {budget}: chunk {c} of {tokens}");
        assert!(c >= 1.0 && c <= tokens);
        assert!(peak_at(&p, c) <= budget, "chunk {c} does not fit: {p}");
        if c < tokens {
            let next = if c >= 64.0 { c + 64.0 } else { c + 1.0 };
            assert!(
                peak_at(&p, next.min(tokens)) > budget,
                "chunk {c} is not the largest: {p}"
            );
        }
    } else {
        assert!(err.contains("run.max_memory"), "{err}");
        assert!(peak_at(&p, 1.0) > budget);
    }
    // a budget that fits: train uses and records a chunk that fits by its own prediction
    let roomy = format!("run.max_memory={}", (2.0 * peak).ceil());
    train_ok(&["train", &s.run_file(), "--set", &roomy]);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("out/run.json")).unwrap()).unwrap();
    let plan = &info["plan"];
    assert!(f(&plan["chunk"]) >= 1.0 && f(&plan["chunk"]) <= tokens);
    assert!(f(&plan["predicted_peak_bytes"]) <= f(&plan["max_memory"]));
}

#[test]
fn the_counted_terms_equal_counts_from_the_files() {
    let s = Setup::new();
    let (ok, p, err) = s.plan(&[]);
    assert!(ok, "{err}");
    let (student, largest) = safetensors_counts(&s.path("student/model.safetensors"));
    let (teacher, _) = safetensors_counts(&s.path("teacher/model.safetensors"));
    // every student tensor is trained (no projections): P = file bytes / 4
    assert_eq!(f(&p["counts"]["trainable"]) * 4.0, student);
    assert_eq!(term(&p, "of which student weights"), student);
    assert_eq!(term(&p, "gradients G"), student);
    assert_eq!(term(&p, "of which AdamW m, v"), 2.0 * student);
    assert_eq!(term(&p, "of which teacher weights"), teacher);
    assert_eq!(term(&p, "optimizer temporaries O"), 2.0 * 4.0 * largest);
    // checkpoint_every > 0: the optimizer file (m and v) held twice
    assert_eq!(term(&p, "checkpoint / write-out C"), 2.0 * 2.0 * student);
    // the resident memory after set-up holds at least the counted weights and moments
    assert!(f(&p["probe"]["resident"]) >= 3.0 * student + teacher);
}

#[test]
fn the_table_lists_the_fields() {
    let s = Setup::new();
    let run = s.run_file();
    let out = distill(&["plan", &run, "--set", "run.max_memory=64GiB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for field in [
        "resident after set-up",
        "of which student weights",
        "of which AdamW m, v",
        "of which teacher weights",
        "gradients G",
        "step: fixed s0",
        "step: activations s_tok*N",
        "step: logits chunk s_chunk*c",
        "optimizer temporaries O",
        "evaluation E",
        "checkpoint / write-out C",
        "set-up",
        "predicted peak memory",
        "predicted step time",
        "tokens/s",
        "chunk",
        "max_memory             64.00 GiB (fits)",
    ] {
        assert!(table.contains(field), "'{field}' missing from:\n{table}");
    }
    // nothing was written
    assert!(!s.path("out").exists());
}

#[test]
fn a_bad_max_memory_is_refused_by_key() {
    let s = Setup::new();
    let run = s.run_file();
    let out = distill(&["train", &run, "--set", "run.max_memory=8 parsecs"]);
    assert_clean_failure(&out, &["run.max_memory", "unknown unit"]);
    assert!(!s.path("out").exists());
}
