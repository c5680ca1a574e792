//! `distill train` end to end on tiny models made here: learning, KD against CE, exact resume after
//! SIGKILL, a kill in the middle of a save, NaN steps, and bad inputs.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::model::{self, LlamaConfig, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A folder with a tiny teacher (opinionated: large logits), a random student with the same
/// tokenizer, training text and a run file.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LlamaConfig::tiny(259, 48, 2, 4, 2);
        cfg.eos_token_ids = vec![256];
        let save = |seed: i64, scale: f64, name: &str| {
            let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
            if scale != 1.0 {
                tch::no_grad(|| {
                    let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
                    let _ = e.f_mul_scalar_(scale).unwrap();
                });
            }
            m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
            m.save_hf(&dir.path().join(name)).unwrap();
        };
        save(7, 150.0, "teacher");
        save(8, 1.0, "student");
        // deterministic pseudo-text
        let words = [
            "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "in", "rain",
        ];
        let mut x: u64 = 12345;
        let mut text = String::new();
        for i in 0..4000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text += words[(x >> 33) as usize % words.len()];
            text += if i % 11 == 10 { ".\n" } else { " " };
        }
        std::fs::write(dir.path().join("train.txt"), text).unwrap();
        Setup { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Write a run file; `loss` and `extra` are TOML snippets.
    fn run_file(&self, name: &str, output: &str, loss: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[teacher]
path = "teacher"

[student]
path = "student"

[data]
train = "train.txt"
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 8

{loss}

[optim]
lr = 3e-3
warmup_steps = 2
micro_batch = 4

[run]
steps = 30
log_every = 1
eval_every = 10
checkpoint_every = 5
threads = 2
seed = 3
output = "{output}"
{extra}
"#
        );
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

const FKL: &str = "[[loss]]\nkind = \"forward_kl\"\n";

fn train_ok(args: &[&str]) -> String {
    let out = distill(args);
    assert!(
        out.status.success(),
        "distill {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn train_steps(recs: &[Value]) -> Vec<u64> {
    recs.iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

fn final_eval(recs: &[Value]) -> Value {
    recs.iter()
        .rev()
        .find(|r| r["kind"] == "eval")
        .unwrap()
        .clone()
}

#[test]
fn loss_goes_down_and_the_student_loads() {
    let s = Setup::new();
    let run = s.run_file("run.toml", "out", FKL, "");
    let stdout = train_ok(&["train", run.to_str().unwrap()]);
    assert!(
        stdout.contains("before") && stdout.contains("after"),
        "{stdout}"
    );
    let recs = records(&s.path("out/metrics.jsonl"));
    let losses: Vec<f64> = recs
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 30);
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(
        last < 0.7 * first,
        "loss did not go down: {first} -> {last}"
    );
    let evals: Vec<u64> = recs
        .iter()
        .filter(|r| r["kind"] == "eval")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 10, 20, 30]);
    assert!(final_eval(&recs)["kl"].as_f64().unwrap() < recs[0]["kl"].as_f64().unwrap());
    // the student folder and the last checkpoint load, and hold the same weights
    let student = model::load(&s.path("out/student"), Device::Cpu).unwrap();
    let ck = model::load(&s.path("out/checkpoints/step-00000030"), Device::Cpu).unwrap();
    for (name, t) in student.vs.variables() {
        assert!(t.equal(&ck.vs.variables()[&name]), "{name}");
    }
    // keep_last = 2 by default
    let cks: Vec<_> = std::fs::read_dir(s.path("out/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(cks.len(), 2, "{cks:?}");
    for f in ["report.md", "loss.png", "run.json"] {
        assert!(s.path("out").join(f).exists(), "{f} missing");
    }
    let report = std::fs::read_to_string(s.path("out/report.md")).unwrap();
    assert!(
        report.contains("| before |") && report.contains("| after |"),
        "{report}"
    );
}

#[test]
fn kd_student_ends_closer_to_the_teacher_than_a_cross_entropy_student() {
    let s = Setup::new();
    let kd = s.run_file("kd.toml", "kd", FKL, "");
    let ce = s.run_file("ce.toml", "ce", "[[loss]]\nkind = \"cross_entropy\"\n", "");
    train_ok(&["train", kd.to_str().unwrap()]);
    train_ok(&["train", ce.to_str().unwrap()]);
    let kl_kd = final_eval(&records(&s.path("kd/metrics.jsonl")))["kl"]
        .as_f64()
        .unwrap();
    let kl_ce = final_eval(&records(&s.path("ce/metrics.jsonl")))["kl"]
        .as_f64()
        .unwrap();
    assert!(kl_kd < kl_ce, "held-out KL: KD {kl_kd} vs CE {kl_ce}");
}

fn spawn_train(run: &Path, extra_env: &[(&str, &str)], resume: bool) -> std::process::Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.arg("train")
        .arg(run)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if resume {
        c.arg("--resume");
    }
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn last_step(metrics: &Path) -> u64 {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "train")
        .filter_map(|r| r["step"].as_u64())
        .max()
        .unwrap_or(0)
}

fn assert_each_step_once(recs: &[Value], total: u64) {
    assert_eq!(
        train_steps(recs),
        (1..=total).collect::<Vec<_>>(),
        "train steps in metrics.jsonl"
    );
    let evals: Vec<u64> = recs
        .iter()
        .filter(|r| r["kind"] == "eval")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, vec![0, 10, 20, 30], "eval steps in metrics.jsonl");
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn resume_after_sigkill_is_exact() {
    let s = Setup::new();
    let full = s.run_file("full.toml", "full", FKL, "");
    train_ok(&["train", full.to_str().unwrap()]);
    // a "random" kill step in 6..=27, from the clock
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let kill_at = 6 + nanos % 22;
    let run = s.run_file("killed.toml", "killed", FKL, "");
    let metrics = s.path("killed/metrics.jsonl");
    let mut child = spawn_train(&run, &[("DISTILL_FAULT_STEP_DELAY_MS", "40")], false);
    wait_until(Duration::from_secs(120), || last_step(&metrics) >= kill_at);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let reached = last_step(&metrics);
    assert!(
        reached < 30,
        "the run finished before the kill (step {reached})"
    );
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    assert_eq!(
        weights(&s.path("killed/student")),
        weights(&s.path("full/student")),
        "killed at step {reached}: weights differ"
    );
    assert_each_step_once(&records(&metrics), 30);
    // the losses logged after the resume equal the uninterrupted run's
    let a = records(&s.path("full/metrics.jsonl"));
    let b = records(&metrics);
    let loss_of = |r: &[Value], step: u64| {
        r.iter()
            .find(|x| x["kind"] == "train" && x["step"] == step)
            .unwrap()["loss"]
            .clone()
    };
    for step in 1..=30 {
        assert_eq!(loss_of(&a, step), loss_of(&b, step), "loss at step {step}");
    }
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn a_kill_during_a_save_leaves_the_previous_checkpoint_intact() {
    let s = Setup::new();
    let full = s.run_file("full.toml", "full", FKL, "");
    train_ok(&["train", full.to_str().unwrap()]);
    let run = s.run_file("run.toml", "out", FKL, "");
    let mut child = spawn_train(&run, &[("DISTILL_FAULT_SLOW_SAVE_MS", "1500")], false);
    let partial = s.path("out/checkpoints/.partial-step-00000010");
    wait_until(Duration::from_secs(120), || partial.exists());
    std::thread::sleep(Duration::from_millis(300)); // inside the save: model written, state not yet
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !s.path("out/checkpoints/step-00000010").exists(),
        "a half-written checkpoint is visible"
    );
    let prev = s.path("out/checkpoints/step-00000005");
    let st = distill::train::checkpoint::read_state(&prev).unwrap();
    assert_eq!(st.step, 5);
    model::load(&prev, Device::Cpu).unwrap();
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    assert_eq!(
        weights(&s.path("out/student")),
        weights(&s.path("full/student"))
    );
    assert_each_step_once(&records(&s.path("out/metrics.jsonl")), 30);
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn non_finite_steps_are_skipped_counted_and_reported() {
    let s = Setup::new();
    let run = s.run_file("run.toml", "out", FKL, "");
    let out = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["train", run.to_str().unwrap()])
        .env("DISTILL_FAULT_NAN_STEPS", "3,7")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = records(&s.path("out/metrics.jsonl"));
    let skipped: Vec<u64> = recs
        .iter()
        .filter(|r| r["kind"] == "train" && r["skipped"] == true)
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, vec![3, 7]);
    assert_eq!(
        recs.iter().rfind(|r| r["kind"] == "train").unwrap()["skipped_total"],
        2
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(2 skipped)"));
    assert!(std::fs::read_to_string(s.path("out/report.md"))
        .unwrap()
        .contains("gradient): 2."));
    let student = model::load(&s.path("out/student"), Device::Cpu).unwrap();
    for (name, t) in student.vs.variables() {
        assert_eq!(
            t.isfinite().all().int64_value(&[]),
            1,
            "{name} is not finite"
        );
    }
    // a skipped step leaves the weights as they were: checkpoints of steps 2 and 3 are equal
    let short = s.run_file("short.toml", "short", FKL, "");
    let o = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args([
            "train",
            short.to_str().unwrap(),
            "--set",
            "run.steps=5",
            "--set",
            "run.checkpoint_every=1",
            "--set",
            "run.keep_last=10",
        ])
        .env("DISTILL_FAULT_NAN_STEPS", "3")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = |n: u32| weights(&s.path("short/checkpoints").join(format!("step-{n:08}")));
    assert_eq!(w(2), w(3), "the skipped step changed the weights");
    assert_ne!(w(3), w(4), "the step after a skipped one must train again");
}

#[test]
fn teacher_weights_do_not_move() {
    let s = Setup::new();
    let before = std::fs::read(s.path("teacher/model.safetensors")).unwrap();
    let run = s.run_file("run.toml", "out", FKL, "");
    train_ok(&["train", run.to_str().unwrap(), "--set", "run.steps=5"]);
    assert_eq!(
        std::fs::read(s.path("teacher/model.safetensors")).unwrap(),
        before
    );
    // and in-process: a frozen teacher gets no gradient
    let mut t = model::load(&s.path("teacher"), Device::Cpu).unwrap();
    t.vs.freeze();
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).unsqueeze(0);
    let l = t.model.forward(&ids).unwrap().sum(Kind::Float);
    assert!(!l.requires_grad());
}
