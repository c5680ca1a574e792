//! A teacher store captured by several processes (Gloo, on this CPU machine), on tiny models:
//!   - 2 processes (`distill launch --nproc 2 capture`) write a store whose every sequence's record
//!     equals the one-process capture's, bit for bit (the ranks run the batches one process would,
//!     so each row meets the same batch-mates); store.json lists every shard, no part file remains,
//!     `distill store verify` passes, and a run trained from it equals the run from the
//!     one-process store, weight for weight;
//!   - a rank killed mid-capture makes the other stop with one clear error within the timeout, and
//!     the capture run again (2 processes, or 1) holds every sequence exactly once, equal to the
//!     one-process capture's;
//!   - `torchrun --no-python distill capture` makes the same store;
//!   - what a capture over several processes refuses, and launch's check of capture's options.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::model::{self, LlamaConfig, Tokenizer};
use distill::teacher::Store;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use tch::Device;

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

fn tiny(dir: &Path, name: &str, seed: i64, scale: f64) {
    let mut cfg = LlamaConfig::tiny(259, 48, 2, 4, 2);
    cfg.eos_token_ids = vec![256];
    let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
    tch::no_grad(|| {
        let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = e.f_mul_scalar_(scale).unwrap();
    });
    m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
    m.save_hf(&dir.join(name)).unwrap();
}

/// `n` words drawn by a linear congruential generator from `seed` (no two sequences alike).
fn words(n: usize, seed: u64) -> String {
    let w = [
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far",
    ];
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{} ", w[(x >> 33) as usize % w.len()])
        })
        .collect()
}

fn env() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tiny(d, "teacher", 7, 120.0);
    tiny(d, "student", 8, 1.0);
    std::fs::write(d.join("a.txt"), words(600, 1)).unwrap();
    dir
}

/// A run file whose `[teacher]` is `teacher`; tail draws on (seeded by each sequence's key).
fn run_file(d: &Path, name: &str, teacher: &str) -> String {
    let text = format!(
        r#"
[teacher]
{teacher}

[student]
path = "student"

[data]
train = "a.txt"
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 3

[[loss]]
kind = "forward_kl"

[optim]
lr = 3e-3
micro_batch = 2

[run]
steps = 3
eval_every = 0
checkpoint_every = 0
seed = 5
output = "out-{name}"
threads = 1

[capture]
coverage = 0.9
max_k = 16
shard_sequences = 5
tail_samples = 8
"#
    );
    let p = d.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `distill --threads 1 launch --nproc N capture RUN extra…`
fn launch_capture(nproc: usize, run: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["--threads", "1", "launch", "--nproc"])
        .arg(nproc.to_string())
        .args(["--timeout", "60", "capture", run])
        .args(extra)
        .output()
        .unwrap()
}

/// A record as stored: (tokens, positions, ids, log-probabilities, log tail, log Z).
type Rec = (Vec<u32>, Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// Every record of a store by key, each key found once (a second is a failure).
fn records(dir: &Path) -> BTreeMap<u64, Rec> {
    let store = Store::open(dir).unwrap();
    let mut out = BTreeMap::new();
    for s in 0..store.header.shards.len() {
        let sh = store.shard(s).unwrap();
        for row in 0..sh.len() {
            let pos = sh.positions(row);
            let e = sh.entry_at[pos.start]..sh.entry_at[pos.end];
            let prev = out.insert(
                sh.keys[row],
                (
                    sh.tokens_of(row).to_vec(),
                    sh.at[pos.clone()].to_vec(),
                    sh.ids[e.clone()].to_vec(),
                    sh.logprobs[e].to_vec(),
                    sh.log_tail[pos.clone()].to_vec(),
                    sh.log_z[pos].to_vec(),
                ),
            );
            assert!(prev.is_none(), "key {:x} stored twice", sh.keys[row]);
        }
    }
    out
}

/// The store's folder holds store.json, the shards it lists (with their sizes) and nothing
/// else but orphans of a killed rank; no part file.
fn check_files(dir: &Path) -> Vec<String> {
    let h = Store::open(dir).unwrap().header;
    for s in &h.shards {
        let len = std::fs::metadata(dir.join(&s.file)).unwrap().len();
        assert_eq!(len, s.bytes, "{}", s.file);
    }
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("part-")),
        "no part file remains: {names:?}"
    );
    h.shards.iter().map(|s| s.file.clone()).collect()
}

fn verify(dir: &Path) {
    let out = distill(&[
        "--threads",
        "1",
        "store",
        "verify",
        &dir.display().to_string(),
    ]);
    ok(&out, "store verify");
}

#[test]
fn two_processes_capture_what_one_does() {
    let env = env();
    let d = env.path();
    let one = run_file(d, "one", "path = \"teacher\"\nstore = \"one\"");
    let two = run_file(d, "two", "path = \"teacher\"\nstore = \"two\"");
    ok(&distill(&["--threads", "1", "capture", &one]), "capture");
    let out = launch_capture(2, &two, &[]);
    let stdout = ok(&out, "launch --nproc 2 capture");
    let a = records(&d.join("one"));
    let b = records(&d.join("two"));
    assert!(a.len() > 30, "{} sequences", a.len());
    assert_eq!(a.len(), b.len(), "the same sequences");
    for (k, ra) in &a {
        assert!(b.get(k) == Some(ra), "sequence {k:016x} differs");
    }
    // rank 0 alone speaks, with both ranks' counts
    assert_eq!(
        stdout.matches("captured ").count(),
        1,
        "one summary: {stdout}"
    );
    assert!(
        stdout.contains(&format!("captured {} sequences", a.len())),
        "{stdout}"
    );
    // both ranks wrote shards; the header lists them all; no part file is left
    let files = check_files(&d.join("two"));
    for rank in ["shard-r0-", "shard-r1-"] {
        assert!(files.iter().any(|f| f.starts_with(rank)), "{files:?}");
    }
    let h = Store::open(&d.join("two")).unwrap().header;
    let h1 = Store::open(&d.join("one")).unwrap().header;
    assert_eq!(h.captures, h1.captures);
    assert_eq!(h.positions(), h1.positions());
    verify(&d.join("two"));
    // run again: nothing is left to capture
    let again = ok(&launch_capture(2, &two, &[]), "again");
    assert!(again.contains("captured 0 sequences"), "{again}");
    // a run from either store trains alike, weight for weight
    let from_one = run_file(d, "from-one", "store = \"one\"");
    let from_two = run_file(d, "from-two", "store = \"two\"");
    ok(&distill(&["--threads", "1", "train", &from_one]), "train");
    ok(&distill(&["--threads", "1", "train", &from_two]), "train");
    assert!(
        weights(&d.join("out-from-one/student")) == weights(&d.join("out-from-two/student")),
        "the runs from the two stores differ"
    );
}

#[test]
fn torchrun_starts_the_same_capture() {
    let torchrun = python().parent().unwrap().join("torchrun");
    assert!(
        torchrun.exists(),
        "{} (the test command's set-up installs torch)",
        torchrun.display()
    );
    let env = env();
    let d = env.path();
    let one = run_file(d, "one", "path = \"teacher\"\nstore = \"one\"");
    let two = run_file(d, "two", "path = \"teacher\"\nstore = \"two\"");
    ok(&distill(&["--threads", "1", "capture", &one]), "capture");
    let out = Command::new(&torchrun)
        .args(["--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .args([
            "--no-python",
            env!("CARGO_BIN_EXE_distill"),
            "--threads",
            "1",
            "capture",
            &two,
        ])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    ok(&out, "torchrun capture");
    assert!(records(&d.join("one")) == records(&d.join("two")));
    check_files(&d.join("two"));
}

#[test]
fn what_a_parallel_capture_cannot_do_is_refused() {
    let env = env();
    let d = env.path();
    let run = run_file(d, "r", "path = \"teacher\"\nstore = \"s\"");
    // launch checks capture's options before it starts anything
    let out = launch_capture(2, &run, &["--bogus"]);
    assert_clean_failure(&out, &["capture", "--bogus"]);
    // a rank alone (no rendezvous): the refusal comes first, at once
    let rank0 = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_distill"))
            .args(["capture", &run])
            .args(args)
            .env("WORLD_SIZE", "2")
            .env("RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", free_port().to_string())
            .output()
            .unwrap()
    };
    assert_clean_failure(
        &rank0(&["--compare-forward"]),
        &["2 processes", "--compare-forward"],
    );
    assert_clean_failure(&rank0(&["--budget", "0.5"]), &["2 processes", "budget"]);
    assert!(!d.join("s").exists(), "nothing written");
}

/// Ranks 0 and 1 of a capture over 2 processes, rank 1 killed after writing its shard file
/// number `die_after` (before its part file lists it); rank 0 must stop with one clear error
/// within the timeout.
#[cfg(feature = "fault-injection")]
fn kill_rank_1(run: &str, die_after: usize) {
    let port = free_port().to_string();
    let spawn = |rank: &str, env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
        c.args(["--threads", "1", "capture", run])
            .env("RANK", rank)
            .env("LOCAL_RANK", rank)
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("DISTILL_DIST_TIMEOUT", "20")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        c.spawn().unwrap()
    };
    let r0 = spawn("0", &[]);
    let die = die_after.to_string();
    let r1 = spawn("1", &[("DISTILL_FAULT_CAPTURE_DIE_AFTER_SHARD", &die)]);
    let last = killed_rank_stops_the_other(r0, r1, 20);
    assert!(last.contains("run the capture again"), "{last}");
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_rank_stops_the_other_and_the_capture_completes() {
    let env = env();
    let d = env.path();
    let one = run_file(d, "one", "path = \"teacher\"\nstore = \"one\"");
    ok(&distill(&["--threads", "1", "capture", &one]), "capture");
    let whole = records(&d.join("one"));
    for (name, again) in [("at2", 2), ("at1", 1)] {
        let run = run_file(d, name, &format!("path = \"teacher\"\nstore = \"{name}\""));
        kill_rank_1(&run, 1);
        // what was written: rank 1's first shard listed in its part file, its second an orphan;
        // store.json lists nothing yet (rank 0 merges at the end)
        let s = d.join(name);
        assert!(s.join("part-0.json").exists() && s.join("part-1.json").exists());
        assert!(s.join("shard-r1-00001.safetensors.zst").exists());
        assert_eq!(Store::open(&s).unwrap().header.shards.len(), 0);
        // run again: the listed shards are adopted, the rest captured
        let out = if again == 2 {
            launch_capture(2, &run, &[])
        } else {
            distill(&["--threads", "1", "capture", &run])
        };
        let stdout = ok(&out, &format!("capture again in {again}"));
        assert!(stdout.contains("were already in the store"), "{stdout}");
        let got = records(&s);
        assert_eq!(got.len(), whole.len(), "every sequence, once");
        assert!(
            got == whole,
            "{name}: the records differ from one process's"
        );
        let files = check_files(&s);
        assert!(files.contains(&"shard-r1-00000.safetensors.zst".to_string()));
        verify(&s);
    }
}
