//! Several processes on PyTorch's c10d (Gloo, on this CPU machine), on tiny models:
//!   - the collectives (all-reduce sum/max/min, broadcast, barrier, bucketed gradients) between two
//!     ranks against the values computed here, and a rank that is gone makes the other fail with
//!     one error within the timeout, never hang;
//!   - 2 processes × micro-batch 2 end with the weights of 1 process × micro-batch 4 (1e-5), with
//!     the same logged losses and evaluations;
//!   - a killed rank stops the other with a clear error, and the run resumes from its checkpoint to
//!     the uninterrupted run's weights; a run saved at world size 1 resumes at 2 and the reverse;
//!   - torchrun's variables (RANK, WORLD_SIZE, …) and its agent store: `torchrun --no-python`
//!     starts a run that equals `distill launch`'s;
//!   - what a run over several processes refuses, before any rendezvous.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::dist::{data_parallel, Backend, ProcessGroup, ReduceOp, Rendezvous};
use distill::model::{self, LlamaConfig, Tokenizer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

fn rendezvous(port: u16, rank: usize, world: usize, timeout: Duration) -> Rendezvous {
    Rendezvous {
        host: "127.0.0.1".into(),
        port,
        rank,
        world,
        timeout,
        agent_store: false,
        prefix: String::new(),
        backend: Backend::Gloo,
        device: Device::Cpu,
    }
}

/// Rank 1 in a thread, rank 0 here; each runs `f(group)` and returns its result.
fn two_ranks<T: Send + 'static>(timeout: Duration, f: fn(&ProcessGroup) -> T) -> (T, T) {
    let port = free_port();
    let other = std::thread::spawn(move || {
        let pg = ProcessGroup::new(&rendezvous(port, 1, 2, timeout)).unwrap();
        f(&pg)
    });
    let pg = ProcessGroup::new(&rendezvous(port, 0, 2, timeout)).unwrap();
    let mine = f(&pg);
    (mine, other.join().unwrap())
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn collectives_give_the_values_computed_here() {
    let (a, b) = two_ranks(Duration::from_secs(60), |pg| {
        let r = pg.rank as f64;
        // three tensors of two kinds, each reduced on its own
        let mut t = vec![
            Tensor::from_slice(&[1.0f32 + r as f32, -2.0, 0.5 * r as f32]),
            Tensor::from_slice(&[10.0f64 * (r + 1.0)]),
            Tensor::from_slice(&[3.0f32 - r as f32; 5]),
        ];
        pg.all_reduce(&mut t, ReduceOp::Sum, "test").unwrap();
        let sum: Vec<Vec<f64>> = t.iter().map(values).collect();
        let max = pg
            .all_reduce_f64(&[r, -r, 7.0], ReduceOp::Max, "test")
            .unwrap();
        let min = pg
            .all_reduce_f64(&[r, -r, 7.0], ReduceOp::Min, "test")
            .unwrap();
        let mut b = vec![Tensor::from_slice(&[r + 5.0, r * r])];
        pg.broadcast(&mut b, 0, "test").unwrap();
        pg.barrier("test").unwrap();
        // gradients through the buckets: parameters whose grads are rank-dependent
        let p1 = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let p2 = Tensor::from_slice(&[4.0f32, 5.0]).set_requires_grad(true);
        ((&p1 * (r + 1.0)).sum(Kind::Float) + (&p2 * &p2).sum(Kind::Float) * r).backward();
        data_parallel::all_reduce_gradients(pg, &[p1.shallow_clone(), p2.shallow_clone()]).unwrap();
        let grads = vec![values(&p1.grad()), values(&p2.grad())];
        (sum, max, min, values(&b[0]), grads)
    });
    for (rank, got) in [a, b].into_iter().enumerate() {
        assert_eq!(
            got.0,
            vec![vec![3.0, -4.0, 0.5], vec![30.0], vec![5.0; 5]],
            "rank {rank}"
        );
        assert_eq!(got.1, vec![1.0, 0.0, 7.0]);
        assert_eq!(got.2, vec![0.0, -1.0, 7.0]);
        assert_eq!(got.3, vec![5.0, 0.0], "rank 0's values everywhere");
        // d/dp1 = (r + 1) summed: 1 + 2; d/dp2 = 2·p2·r summed: 0 + 2·p2
        assert_eq!(got.4, vec![vec![3.0; 3], vec![8.0, 10.0]]);
    }
}

#[test]
fn a_rank_that_is_gone_fails_the_other_within_the_timeout() {
    let port = free_port();
    let timeout = Duration::from_secs(20);
    let other = std::thread::spawn(move || {
        let pg = ProcessGroup::new(&rendezvous(port, 1, 2, timeout)).unwrap();
        pg.barrier("meet").unwrap();
        drop(pg); // gone: its connections close
    });
    let pg = ProcessGroup::new(&rendezvous(port, 0, 2, timeout)).unwrap();
    pg.barrier("meet").unwrap();
    other.join().unwrap();
    let t0 = Instant::now();
    let mut t = [Tensor::from_slice(&[1.0f32])];
    let err = pg
        .all_reduce(&mut t, ReduceOp::Sum, "the gradients")
        .unwrap_err()
        .to_string();
    assert!(
        t0.elapsed() < timeout + Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        err.starts_with("rank 0: all-reduce of the gradients: "),
        "{err}"
    );
    // a rendezvous nobody joins: an error after the timeout
    let t0 = Instant::now();
    let r = ProcessGroup::new(&rendezvous(free_port(), 0, 2, Duration::from_secs(2)));
    let err = r.err().expect("nobody joins").to_string();
    assert!(err.contains("rendezvous at 127.0.0.1"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

#[test]
fn nccl_without_a_gpu_is_an_error_not_an_abort() {
    if tch::Cuda::is_available() {
        return; // scripts/gpu-check.sh runs NCCL where there are GPUs
    }
    let mut r = rendezvous(free_port(), 0, 1, Duration::from_secs(10));
    r.backend = Backend::Nccl;
    r.device = Device::Cuda(0);
    let err = ProcessGroup::new(&r)
        .err()
        .expect("no GPU here")
        .to_string();
    assert!(err.starts_with("rank 0: rendezvous at 127.0.0.1"), "{err}");
    if !distill::dist::c10d::has_nccl() {
        assert!(err.contains("built without NCCL"), "{err}");
    }
}

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
            tch::no_grad(|| {
                let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
                let _ = e.f_mul_scalar_(scale).unwrap();
            });
            m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
            m.save_hf(&dir.path().join(name)).unwrap();
        };
        save(7, 150.0, "teacher");
        save(8, 1.0, "student");
        let words = [
            "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "12", "plus",
        ];
        std::fs::write(dir.path().join("a.txt"), text(&words, 3000, 99)).unwrap();
        let nums = ["7", "905", "minus", "is", "zero", "x", "y", "3"];
        std::fs::write(dir.path().join("b.txt"), text(&nums, 1500, 5)).unwrap();
        Setup { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A run file: `micro_batch` rows per process, 2 micro-batches a step, `extra` appended.
    fn run_file(&self, name: &str, output: &str, micro_batch: usize, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[teacher]
path = "teacher"

[student]
path = "student"

[data]
train = "a.txt"
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 5

[[loss]]
kind = "forward_kl"

[[loss]]
kind = "cross_entropy"
weight = 0.5

[optim]
lr = 3e-3
warmup_steps = 2
micro_batch = {micro_batch}
grad_accum = 2
loss_chunk = 24

[run]
steps = 8
log_every = 1
eval_every = 4
checkpoint_every = 2
threads = 2
seed = 5
output = "{output}"

{extra}
"#
        );
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn launch(nproc: usize, run: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.args(["--threads", "1", "launch", "--nproc"])
        .arg(nproc.to_string())
        .args(["--timeout", "30"])
        .arg(run)
        .args(extra);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The largest |a − b| over every weight of two model folders.
fn weight_distance(a: &Path, b: &Path) -> f64 {
    let read = |p: &Path| {
        let mut t = tch::Tensor::read_safetensors(p.join("model.safetensors")).unwrap();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    let (ta, tb) = (read(a), read(b));
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0.0f64;
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        worst = worst.max((x - y).abs().max().double_value(&[]));
    }
    worst
}

/// The train losses and eval KLs of a run, by step.
fn curve(metrics: &Path) -> (Vec<f64>, Vec<f64>) {
    let recs = records(metrics);
    let get = |kind: &str, key: &str| -> Vec<f64> {
        recs.iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r[key].as_f64().unwrap())
            .collect()
    };
    (get("train", "loss"), get("eval", "kl"))
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1e-3),
            "{what}: {a:?} vs {b:?}"
        );
    }
}

/// "The same weights" (the issue's 1e-5, as the largest difference of any weight): the runs differ
/// only in the order of floating-point sums (two ranks' partial gradients added, other chunks,
/// other thread counts), relative errors of a few 2⁻²⁴ per sum. 8 AdamW steps of lr 3e-3 move a
/// weight by at most about 8·lr = 0.024 (AdamW's step is about lr whatever the gradient's scale);
/// rounding changes those steps by far less than a relative 1e-4 even carried through the forward
/// passes, i.e. by less than 2.4e-6 — under 1e-5. The same bound, relative, for the logged losses
/// and KLs (f64 sums of f32 values).
const SAME: f64 = 1e-5;

#[test]
fn two_processes_of_two_rows_equal_one_of_four() {
    let s = Setup::new();
    let one = s.run_file("one.toml", "one", 4, "");
    let two = s.run_file("two.toml", "two", 2, "");
    train_ok(&["--threads", "1", "train", one.to_str().unwrap()]);
    let out = launch(2, &two, &[], &[]);
    ok(&out, "launch --nproc 2");
    let d = weight_distance(&s.path("one/student"), &s.path("two/student"));
    assert!(d < SAME, "weights differ by {d:e}");
    let (l1, k1) = curve(&s.path("one/metrics.jsonl"));
    let (l2, k2) = curve(&s.path("two/metrics.jsonl"));
    assert_eq!(l1.len(), 8);
    close(&l1, &l2, SAME, "train losses");
    close(&k1, &k2, SAME, "eval KLs");
    // rank 0 alone wrote: one record per step, the global micro-batch and the processes in run.json
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("two/run.json")).unwrap()).unwrap();
    assert_eq!(info["processes"], 2);
    assert_eq!(info["optim"]["micro_batch"], 4);
    // a different global batch is a different run: the step with 2 × 1 rows trains otherwise
    let half = s.run_file("half.toml", "half", 1, "");
    ok(
        &launch(2, &half, &[], &[]),
        "launch --nproc 2, micro_batch 1",
    );
    let d = weight_distance(&s.path("one/student"), &s.path("half/student"));
    assert!(d > 1e-3, "a run on half the rows should differ: {d:e}");
}

#[test]
fn two_processes_with_sources_and_ddk_equal_one() {
    let s = Setup::new();
    // two sources (weights 1 and 3) instead of one file, DDK every 3 steps
    let sources = |name: &str, out: &str, micro: usize| {
        let p = s.run_file(name, out, micro, "[data.ddk]\ninterval = 3\nalpha = 0.5\n");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replacen("train = \"a.txt\"\n", "", 1);
        let text = text.replacen(
            "[[loss]]",
            "[[data.source]]\nname = \"words\"\ntrain = \"a.txt\"\n\n[[data.source]]\nname = \"numbers\"\ntrain = \"b.txt\"\nweight = 3\n\n[[loss]]",
            1,
        );
        std::fs::write(&p, text).unwrap();
        p
    };
    let one = sources("one.toml", "one", 4);
    let two = sources("two.toml", "two", 2);
    train_ok(&["--threads", "1", "train", one.to_str().unwrap()]);
    ok(
        &launch(2, &two, &[], &[]),
        "launch --nproc 2 with sources and DDK",
    );
    let d = weight_distance(&s.path("one/student"), &s.path("two/student"));
    assert!(d < SAME, "weights differ by {d:e}");
    let (a, b) = (
        records(&s.path("one/metrics.jsonl")),
        records(&s.path("two/metrics.jsonl")),
    );
    let of = |r: &[serde_json::Value], kind: &str, key: &str| -> Vec<f64> {
        r.iter()
            .filter(|x| x["kind"] == kind)
            .flat_map(|x| match &x[key] {
                serde_json::Value::Array(v) => v.iter().map(|y| y.as_f64().unwrap()).collect(),
                v => vec![v.as_f64().unwrap()],
            })
            .collect()
    };
    // the same DDK weights at the same steps (from the sharded per-source evaluations), the same
    // rows per source, the same losses
    assert_eq!(of(&a, "ddk", "weights").len(), 3 * 2);
    close(
        &of(&a, "ddk", "weights"),
        &of(&b, "ddk", "weights"),
        SAME,
        "DDK weights",
    );
    assert_eq!(
        of(&a, "train", "source_rows"),
        of(&b, "train", "source_rows")
    );
    close(
        &of(&a, "train", "loss"),
        &of(&b, "train", "loss"),
        SAME,
        "losses",
    );
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_rank_stops_the_other_and_the_run_resumes() {
    let s = Setup::new();
    let reference = s.run_file("ref.toml", "ref", 4, "");
    train_ok(&["--threads", "1", "train", reference.to_str().unwrap()]);
    let run = s.run_file("run.toml", "run", 2, "");
    let port = free_port().to_string();
    let spawn = |rank: &str, env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
        c.args(["--threads", "1", "train"])
            .arg(&run)
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
    let t0 = Instant::now();
    let r0 = spawn("0", &[]);
    let r1 = spawn("1", &[("DISTILL_FAULT_DIE_AFTER_STEP", "5")]);
    killed_rank_stops_the_other(r0, r1, 20);
    assert!(t0.elapsed() < Duration::from_secs(300));
    // the last checkpoint is step 4 (every 2; rank 0 may have logged step 5 or 6 before it
    // stopped, not checkpointed 6 unless rank 1 all-reduced it)
    let out = launch(2, &run, &["--resume"], &[]);
    ok(&out, "launch --resume");
    let d = weight_distance(&s.path("ref/student"), &s.path("run/student"));
    assert!(d < SAME, "resumed weights differ by {d:e}");
    let (l1, _) = curve(&s.path("ref/metrics.jsonl"));
    let (l2, _) = curve(&s.path("run/metrics.jsonl"));
    close(&l1, &l2, SAME, "train losses, one record per step");
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_run_resumes_at_another_world_size() {
    let s = Setup::new();
    let reference = s.run_file("ref.toml", "ref", 4, "");
    train_ok(&["--threads", "1", "train", reference.to_str().unwrap()]);
    // saved at world size 1 (killed after step 4, its checkpoint), resumed at 2
    let one = s.run_file("a.toml", "a", 4, "");
    let mut c = spawn_train(&one, &[("DISTILL_FAULT_DIE_AFTER_STEP", "4")]);
    c.wait().unwrap();
    assert_eq!(last_step(&s.path("a/metrics.jsonl")), 4);
    let two = s.run_file("a2.toml", "a", 2, "");
    ok(&launch(2, &two, &["--resume"], &[]), "resume at 2");
    let d = weight_distance(&s.path("ref/student"), &s.path("a/student"));
    assert!(d < SAME, "1 → 2: weights differ by {d:e}");
    // saved at world size 2 (both ranks killed after step 6), resumed at 1
    let two = s.run_file("b2.toml", "b", 2, "");
    let out = launch(2, &two, &[], &[("DISTILL_FAULT_DIE_AFTER_STEP", "6")]);
    assert!(!out.status.success());
    assert_eq!(last_step(&s.path("b/metrics.jsonl")), 6);
    let one = s.run_file("b.toml", "b", 4, "");
    train_ok(&["--threads", "1", "train", one.to_str().unwrap(), "--resume"]);
    let d = weight_distance(&s.path("ref/student"), &s.path("b/student"));
    assert!(d < SAME, "2 → 1: weights differ by {d:e}");
    // another global batch is refused by the fingerprint, naming the key
    let three = s.run_file("b3.toml", "b", 3, "");
    let out = distill(&["train", three.to_str().unwrap(), "--resume"]);
    assert_clean_failure(&out, &["optim.micro_batch"]);
}

#[test]
fn torchrun_starts_the_same_run() {
    let torchrun = python().parent().unwrap().join("torchrun");
    assert!(
        torchrun.exists(),
        "{} (the test command's set-up installs torch)",
        torchrun.display()
    );
    let s = Setup::new();
    let a = s.run_file("a.toml", "a", 2, "");
    ok(&launch(2, &a, &[], &[]), "launch");
    let b = s.run_file("b.toml", "b", 2, "");
    let out = Command::new(&torchrun)
        .args(["--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .args([
            "--no-python",
            env!("CARGO_BIN_EXE_distill"),
            "--threads",
            "1",
            "train",
        ])
        .arg(&b)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    ok(&out, "torchrun");
    let d = weight_distance(&s.path("a/student"), &s.path("b/student"));
    assert!(d < SAME, "torchrun vs launch: {d:e}");
}

#[test]
fn what_several_processes_cannot_do_is_refused() {
    let s = Setup::new();
    let run = s.run_file("r.toml", "r", 2, "");
    // no rank 1 and no rendezvous: the refusal comes first, at once
    let rank0 = |set: &[&str], var: Option<(&str, &str)>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
        c.arg("train")
            .arg(&run)
            .args(set)
            .env("WORLD_SIZE", "2")
            .env("RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", free_port().to_string());
        if let Some((k, v)) = var {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = rank0(&["--set", "teacher.budget=0.5"], None);
    assert_clean_failure(&out, &["2 processes", "[teacher] budget"]);
    for (var, value) in [
        ("RANK", "2"),
        ("MASTER_PORT", "x"),
        ("DISTILL_DIST_TIMEOUT", "0"),
    ] {
        let out = rank0(&[], Some((var, value)));
        assert_clean_failure(&out, &[var]);
    }
    assert!(!s.path("r").exists(), "nothing written");
    // an objective that couples a micro-batch's rows (SinKD) is refused by every rank
    let sink = s.run_file("k.toml", "k", 2, "[[loss]]\nkind = \"sinkhorn\"\n");
    let out = launch(2, &sink, &[], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("couples the rows"), "{stderr}");
    assert!(!s.path("k").exists(), "nothing written");
}
