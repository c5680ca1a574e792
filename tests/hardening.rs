//! Nothing lost, every bad input named: resume without a checkpoint, an output folder that is an
//! input, validation before --overwrite deletes, the output lock, a resume with other settings or
//! data, bad values in the run file and state.json, and the command line's own errors.
mod common;
use common::*;
use distill::model::{self, LlamaConfig, Tokenizer};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::Device;

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// Tiny teacher and student, training text, and a finished run in out/ (checkpoints every
    /// 2 steps).
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LlamaConfig::tiny(259, 32, 2, 4, 2);
        cfg.eos_token_ids = vec![256];
        for (seed, name) in [(7, "teacher"), (8, "student")] {
            let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
            m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
            m.save_hf(&dir.path().join(name)).unwrap();
        }
        let text: String = (0..2000).map(|i| format!("w{} ", i % 37)).collect();
        std::fs::write(dir.path().join("train.txt"), &text).unwrap();
        std::fs::write(dir.path().join("other.txt"), text.replace('3', "4")).unwrap();
        let e = Env { dir };
        e.write("run.toml", &e.run("out", ""));
        let out = distill(&["train", e.p("run.toml").to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        e
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn run(&self, output: &str, extra_optim: &str) -> String {
        format!(
            "[teacher]\npath = \"teacher\"\n[student]\npath = \"student\"\n[data]\ntrain = \"train.txt\"\nseq_len = 16\nvalidation_fraction = 0.1\nmax_validation_sequences = 2\n[[loss]]\nkind = \"forward_kl\"\n[optim]\nlr = 1e-3\nmicro_batch = 2\n{extra_optim}\n[run]\nsteps = 4\ncheckpoint_every = 2\noutput = \"{output}\"\n"
        )
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.p(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Every file under `rel` with its bytes.
    fn snapshot(&self, rel: &str) -> BTreeMap<PathBuf, Vec<u8>> {
        snapshot(&self.p(rel))
    }

    /// `distill ARGS` fails with one line naming `needles`, and out/ is unchanged.
    fn refuses(&self, args: &[&str], needles: &[&str]) {
        let before = self.snapshot("out");
        let out = distill(args);
        assert_clean_failure(&out, needles);
        assert_eq!(before, self.snapshot("out"), "out/ changed");
    }
}

#[test]
fn resume_without_a_complete_checkpoint_is_refused_and_nothing_is_lost() {
    let e = Env::new();
    let run = e.p("run.toml");
    let run = run.to_str().unwrap();
    // state.json missing from every checkpoint
    for ck in std::fs::read_dir(e.p("out/checkpoints")).unwrap() {
        std::fs::remove_file(ck.unwrap().path().join("state.json")).unwrap();
    }
    e.refuses(
        &["train", run, "--resume"],
        &["cannot resume", "state.json", "--overwrite"],
    );
    // no checkpoints at all
    std::fs::remove_dir_all(e.p("out/checkpoints")).unwrap();
    e.refuses(
        &["train", run, "--resume"],
        &["cannot resume", "no checkpoint"],
    );
}

#[test]
fn an_output_folder_that_is_holds_or_lies_inside_an_input_is_refused() {
    let e = Env::new();
    for (output, needle) in [
        (".", "contains teacher.path"),
        ("student", "is student.path"),
        ("teacher/sub", "lies inside teacher.path"),
    ] {
        let run = e.write("bad.toml", &e.run(output, ""));
        let before = e.snapshot("");
        let out = distill(&["train", run.to_str().unwrap(), "--overwrite"]);
        assert_clean_failure(&out, &[needle, "apart from every input"]);
        assert_eq!(before, e.snapshot(""), "{output}: something changed");
    }
}

#[test]
fn overwrite_deletes_nothing_until_every_check_passed() {
    let e = Env::new();
    // accepted by the old reader, then failed after deleting the run
    let bad = e.write(
        "bad.toml",
        &e.run("out", "loss_chunk = 9223372036854775807"),
    );
    e.refuses(
        &["train", bad.to_str().unwrap(), "--overwrite"],
        &["optim.loss_chunk", "bad.toml:"],
    );
    // a model that fails to load
    let missing = e.write(
        "bad2.toml",
        &e.run("out", "").replace("\"student\"", "\"nowhere\""),
    );
    e.refuses(
        &["train", missing.to_str().unwrap(), "--overwrite"],
        &["nowhere"],
    );
}

#[test]
fn a_second_run_into_a_locked_output_folder_is_refused() {
    let e = Env::new();
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(e.p("out/.lock"))
        .unwrap();
    lock.try_lock().unwrap(); // as a running run holds it
    e.refuses(
        &["train", e.p("run.toml").to_str().unwrap(), "--overwrite"],
        &["another run is writing"],
    );
    drop(lock);
    let out = distill(&["train", e.p("run.toml").to_str().unwrap(), "--overwrite"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn resume_with_other_settings_or_data_is_refused_naming_what_differs() {
    let e = Env::new();
    let run = e.p("run.toml");
    let run = run.to_str().unwrap();
    // the newest checkpoint is the last step: drop it so that there is something left to do
    std::fs::remove_dir_all(e.p("out/checkpoints/step-00000004")).unwrap();
    e.refuses(
        &["train", run, "--resume", "--set", "optim.lr=0.5"],
        &["optim.lr: 0.001 → 0.5"],
    );
    e.refuses(
        &[
            "train",
            run,
            "--resume",
            "--set",
            "data.train=\"other.txt\"",
        ],
        &["data.train", "data tokens"],
    );
    e.refuses(
        &["train", run, "--resume", "--set", "optim.micro_batch=1"],
        &["optim.micro_batch: 2 → 1"],
    );
    // a larger step count changes the schedule: refused too
    e.refuses(
        &["train", run, "--resume", "--set", "run.steps=9"],
        &["total steps"],
    );
    // logging cadence does not change the result: accepted
    let out = distill(&["train", run, "--resume", "--set", "run.log_every=3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_hand_edited_state_is_refused_naming_the_file() {
    let e = Env::new();
    let run = e.p("run.toml");
    let run = run.to_str().unwrap();
    std::fs::remove_dir_all(e.p("out/checkpoints/step-00000004")).unwrap();
    let state = e.p("out/checkpoints/step-00000002/state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sampler"]["cursor"] = 100000.into();
    std::fs::write(&state, v.to_string()).unwrap();
    e.refuses(&["train", run, "--resume"], &["state.json", "beyond"]);
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["step"] = 99.into();
    std::fs::write(&state, v.to_string()).unwrap();
    e.refuses(&["train", run, "--resume"], &["state.json", "step 99"]);
}

#[test]
fn values_the_run_file_must_refuse() {
    let e = Env::new();
    for (extra, needle) in [
        ("eps = 0", "optim.eps"),
        ("weight_decay = -0.1", "optim.weight_decay"),
        ("min_lr_ratio = 4.0", "optim.min_lr_ratio"),
        ("grad_clip = -1.0", "optim.grad_clip"),
    ] {
        let bad = e.write("bad.toml", &e.run("out", extra));
        let line = std::fs::read_to_string(&bad)
            .unwrap()
            .lines()
            .position(|l| l == extra)
            .unwrap()
            + 1;
        e.refuses(
            &["train", bad.to_str().unwrap(), "--overwrite"],
            &[needle, &format!("bad.toml:{line}:")],
        );
    }
    for (from, to, needle) in [
        ("steps = 4", "steps = 4\nthreads = 0", "run.threads"),
        (
            "max_validation_sequences = 2",
            "max_train_tokens = 0",
            "data.max_train_tokens",
        ),
        (
            "kind = \"forward_kl\"",
            "kind = \"forward_kl\"\nweight = -1",
            "weight must be positive",
        ),
    ] {
        let bad = e.write("bad.toml", &e.run("out", "").replace(from, to));
        e.refuses(&["train", bad.to_str().unwrap(), "--overwrite"], &[needle]);
    }
}

#[test]
fn generate_refuses_bad_sampling_and_prompts_longer_than_the_context() {
    let e = Env::new();
    let m = e.p("teacher");
    let m = m.to_str().unwrap();
    for t in ["-1", "NaN"] {
        let out = distill(&["generate", m, "--prompt", "hi", "--temperature", t]);
        assert_clean_failure(&out, &["temperature"]);
    }
    let long = "x ".repeat(600); // 1200 byte tokens; the tiny model's context is 512
    let out = distill(&["generate", m, "--prompt", &long]);
    assert_clean_failure(&out, &["context", "no room"]);
}

#[test]
fn command_line_errors_are_one_line_and_a_closed_stdout_is_quiet() {
    let e = Env::new();
    let out = distill(&["generate", "x", "--prompt", "p", "--max-new-tokens", "-1"]);
    assert_clean_failure(&out, &["--max-new-tokens"]);
    let out = distill(&["no-such-command"]);
    assert_clean_failure(&out, &["no-such-command"]);
    // `distill inspect M | head -1`
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["inspect", e.p("teacher").to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before the first line
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(stderr.trim().is_empty(), "{stderr}");
    assert!(status.success(), "{status:?}");
}
