//! On-policy steps (GKD, `[onpolicy]`) end to end on tiny models: λ = 0 is the off-policy run step
//! for step; an on-policy step's loss is the divergence over the student's own sampled tokens
//! (recomputed here in f64 from the same samples); a run killed with on-policy steps resumes
//! bit-identically; the run file's refusals.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::config::RunConfig;
use distill::data::{self, Sampler, IGNORE_INDEX};
use distill::model::{self, LlamaConfig, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

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
            "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far",
        ];
        let mut x: u64 = 99;
        let mut text = String::new();
        for i in 0..3000 {
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

    /// A run file of `steps` steps; `extra` is appended (e.g. an [onpolicy] section).
    fn run_file(&self, name: &str, output: &str, steps: usize, extra: &str) -> PathBuf {
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
max_validation_sequences = 4

[[loss]]
kind = "forward_kl"

[optim]
lr = 3e-3
warmup_steps = 2
micro_batch = 4

[run]
steps = {steps}
log_every = 1
eval_every = 10
checkpoint_every = 4
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

const ONPOLICY: &str = "[onpolicy]\nfraction = 0.5\nprompt_tokens = 8\nmax_new_tokens = 16\n";

#[test]
fn lambda_zero_is_the_off_policy_run_step_for_step() {
    let s = Setup::new();
    let off = s.run_file("off.toml", "off", 8, "");
    let zero = s.run_file(
        "zero.toml",
        "zero",
        8,
        "[onpolicy]\nfraction = 0.0\nmax_new_tokens = 8\n",
    );
    train_ok(&["train", off.to_str().unwrap()]);
    train_ok(&["train", zero.to_str().unwrap()]);
    assert_eq!(
        weights(&s.path("off/student")),
        weights(&s.path("zero/student"))
    );
    let (a, b) = (
        records(&s.path("off/metrics.jsonl")),
        records(&s.path("zero/metrics.jsonl")),
    );
    for step in 1..=8 {
        let (x, y) = (train_record(&a, step), train_record(&b, step));
        assert_eq!(x["loss"], y["loss"], "step {step}");
        assert_eq!(y["on_policy"], false);
    }
    // the fingerprint as before DistiLLM, PACED and budgets existed: older checkpoints resume
    let fp = |run: &str| -> Value {
        let ck = s.path(run).join("checkpoints/step-00000008/state.json");
        serde_json::from_str::<Value>(&std::fs::read_to_string(ck).unwrap()).unwrap()["fingerprint"]
            .clone()
    };
    for run in ["off", "zero"] {
        let f = fp(run);
        for absent in ["paced", "teacher.budget", "data.source", "data.ddk"] {
            assert!(f.get(absent).is_none(), "{run}: {absent} in {f}");
        }
    }
    assert_eq!(fp("off")["onpolicy"], "None");
    assert_eq!(
        fp("zero")["onpolicy"],
        "Some(OnPolicy { fraction: 0.0, temperature: 1.0, top_p: 1.0, max_new_tokens: 8, prompt_tokens: 16 })"
    );
    // the evaluation adds the student's own samples, judged by the teacher
    let last = b.iter().rev().find(|r| r["kind"] == "eval").unwrap();
    assert!(last["onpolicy"]["kl"].as_f64().unwrap() > 0.0, "{last}");
    assert_eq!(last["samples"].as_array().unwrap().len(), 2);
    let report = std::fs::read_to_string(s.path("zero/report.md")).unwrap();
    assert!(report.contains("own continuations") && report.contains("⟨student⟩"));
}

/// KL(p‖q) at T = 1 per position in f64, and the largest |logit| seen.
fn forward_kl_f64(s: &[f64], t: &[f64], v: usize) -> (f64, f64) {
    let ls = |x: &[f64]| {
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z = m + x.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
        x.iter().map(|a| a - z).collect::<Vec<_>>()
    };
    let (lq, lp) = (ls(&s[..v]), ls(&t[..v]));
    let kl = (0..v).map(|i| lp[i].exp() * (lp[i] - lq[i])).sum();
    let big = s.iter().chain(t).fold(0.0f64, |a, x| a.max(x.abs()));
    (kl, big)
}

#[test]
fn an_on_policy_step_trains_on_the_students_samples_only() {
    let s = Setup::new();
    let run = s.run_file(
        "on.toml",
        "on",
        1,
        "[onpolicy]\nfraction = 1.0\nprompt_tokens = 8\nmax_new_tokens = 16\n",
    );
    train_ok(&["train", run.to_str().unwrap()]);
    let rec = train_record(&records(&s.path("on/metrics.jsonl")), 1);
    assert_eq!(rec["on_policy"], true);
    let logged = rec["forward_kl"].as_f64().unwrap();

    // the same samples, drawn here from the untrained student with the run's seed and step
    let cfg = RunConfig::load(&run, &[]).unwrap();
    let o = cfg.onpolicy.clone().unwrap();
    let student = model::load(&s.path("student"), Device::Cpu).unwrap();
    let teacher = model::load(&s.path("teacher"), Device::Cpu).unwrap();
    let ds = data::load(&cfg.data, student.tokenizer.as_ref().unwrap(), Some(256)).unwrap();
    let rows = Sampler::new(ds.train.len(), cfg.run.seed).next_batch(4);
    let samples = o
        .samples(&student.model, &ds.train, &rows, cfg.run.seed, 1, 0, &[256])
        .unwrap();
    let (mut sum, mut n, mut big, mut differs) = (0.0, 0usize, 0.0f64, false);
    for (q, &r) in samples.iter().zip(&rows) {
        let data_row = &ds.train[r];
        let p = o.prompt_len(data_row);
        assert_eq!(p, 8, "plain text: the prompt is prompt_tokens long");
        assert_eq!(
            &q.ids[..p],
            &data_row.ids[..p],
            "the prompt is the row's start"
        );
        differs |= q.ids[p..] != data_row.ids[p..];
        // targets: the sampled tokens only (position t predicts token t + 1)
        let sampled = q.counted();
        assert!((1..=16).contains(&sampled));
        for t in 0..32 {
            let target = t + 1 >= p && t + 1 < p + sampled;
            assert_eq!(q.labels[t] != IGNORE_INDEX, target, "position {t}");
            if target {
                assert_eq!(q.labels[t], q.ids[t + 1] as i64);
            }
        }
        let ids =
            Tensor::from_slice(&q.ids.iter().map(|&x| x as i64).collect::<Vec<_>>()).unsqueeze(0);
        let host =
            |x: Tensor| Vec::<f64>::try_from(&x.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let (sl, tl) = tch::no_grad(|| {
            (
                host(student.model.forward(&ids).unwrap()),
                host(teacher.model.forward(&ids).unwrap()),
            )
        });
        for t in (0..32).filter(|&t| q.labels[t] != IGNORE_INDEX) {
            let (kl, b) = forward_kl_f64(
                &sl[t * 259..(t + 1) * 259],
                &tl[t * 259..(t + 1) * 259],
                259,
            );
            sum += kl;
            n += 1;
            big = big.max(b);
        }
    }
    assert!(differs, "the student's samples are not the data");
    let want = sum / n as f64;
    // f32 log-softmax: each log-probability off by a few ε·(|logit| + ln V); the KL by that much
    let tol = 16.0 * f32::EPSILON as f64 * (big + 259f64.ln());
    assert!(
        (logged - want).abs() <= tol,
        "{logged} vs {want} (tol {tol})"
    );
}

#[test]
fn the_run_file_refuses_bad_on_policy_settings() {
    let s = Setup::new();
    let bad = |extra: &str, needles: &[&str]| {
        let run = s.run_file("bad.toml", "bad", 4, extra);
        let out = distill(&["train", run.to_str().unwrap()]);
        assert_clean_failure(&out, needles);
    };
    bad(
        "[onpolicy]\nfraction = 1.5\n",
        &["onpolicy.fraction", "[0, 1]"],
    );
    bad("[onpolicy]\ntop_p = 0\n", &["onpolicy.top_p"]);
    bad(
        "[onpolicy]\nmax_new_tokens = 0\n",
        &["onpolicy.max_new_tokens"],
    );
    bad("[onpolicy]\nlambda = 0.5\n", &["lambda"]);
    bad(
        "[onpolicy]\nreplay_capacity = 8\n",
        &["onpolicy.replay_capacity", "distillm"],
    );
    bad(
        "[onpolicy]\nmode = \"minillm\"\n",
        &["onpolicy.mode", "minillm"],
    );
    bad(
        "[onpolicy]\nmode = \"distillm\"\nreplay_ratio = \"up\"\n",
        &["onpolicy.replay_ratio", "increasing"],
    );
    bad(
        "[onpolicy]\nmode = \"distillm\"\nreplay_capacity = 0\n",
        &["onpolicy.replay_capacity"],
    );
    assert!(!s.path("bad").exists(), "nothing written");
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn a_run_killed_with_on_policy_steps_resumes_bit_identically() {
    let s = Setup::new();
    let full = s.run_file("full.toml", "full", 16, ONPOLICY);
    train_ok(&["train", full.to_str().unwrap()]);
    let a = records(&s.path("full/metrics.jsonl"));
    let on: Vec<bool> = (1..=16)
        .map(|k| train_record(&a, k)["on_policy"].as_bool().unwrap())
        .collect();
    assert!(on.iter().any(|&x| x) && on.iter().any(|&x| !x), "{on:?}");
    let run = s.run_file("killed.toml", "killed", 16, ONPOLICY);
    let metrics = s.path("killed/metrics.jsonl");
    let mut child = spawn_train(&run, &[("DISTILL_FAULT_STEP_DELAY_MS", "60")]);
    let t = Instant::now();
    while last_step(&metrics) < 6 {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let reached = last_step(&metrics);
    assert!(reached < 16, "the run finished before the kill");
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    assert_eq!(
        weights(&s.path("killed/student")),
        weights(&s.path("full/student")),
        "killed at step {reached}: weights differ"
    );
    let b = records(&metrics);
    for step in 1..=16 {
        let (x, y) = (train_record(&a, step), train_record(&b, step));
        assert_eq!(x["loss"], y["loss"], "step {step}");
        assert_eq!(x["on_policy"], y["on_policy"], "step {step}");
    }
}

/// DistiLLM's adaptive mode: φ starts at `fraction`; `capacity` samples (micro-batches of 4).
fn distillm(fraction: f64, loss_eps: f64, capacity: usize, ratio: &str) -> String {
    format!(
        "[onpolicy]\nmode = \"distillm\"\nfraction = {fraction}\nloss_eps = {loss_eps}\nreplay_capacity = {capacity}\nreplay_ratio = \"{ratio}\"\nprompt_tokens = 8\nmax_new_tokens = 8\n"
    )
}

#[test]
fn distillm_that_never_raises_phi_from_zero_is_the_off_policy_run() {
    let s = Setup::new();
    let off = s.run_file("off.toml", "off", 6, "");
    let zero = s.run_file("zero.toml", "zero", 6, &distillm(0.0, 1e9, 6, "decreasing"));
    train_ok(&["train", off.to_str().unwrap()]);
    train_ok(&["train", zero.to_str().unwrap()]);
    assert_eq!(
        weights(&s.path("off/student")),
        weights(&s.path("zero/student"))
    );
    let b = records(&s.path("zero/metrics.jsonl"));
    for step in 1..=6 {
        let r = train_record(&b, step);
        assert_eq!(r["sources"]["data"], 1, "step {step}: {r}");
        assert_eq!(r["sgo_probability"], 0.0);
    }
}

/// Two micro-batches per step in run file `run`.
fn accumulate_two(run: &Path) {
    let text = std::fs::read_to_string(run).unwrap();
    let patched = text.replace("micro_batch = 4", "micro_batch = 4\ngrad_accum = 2");
    assert_ne!(text, patched);
    std::fs::write(run, patched).unwrap();
}

/// The sources and buffer sizes a DistiLLM run logged, checked against the rules: every step's
/// micro-batches are counted once; the buffer grows by a micro-batch per fresh one, up to its
/// capacity; a replay needs a full buffer; φ is the one of the evaluations before.
fn check_distillm_log(
    recs: &[Value],
    steps: u64,
    accum: u64,
    capacity: u64,
    phis: &[(u64, f64)],
) -> [u64; 3] {
    let (mut buffered, mut totals) = (0u64, [0u64; 3]);
    for step in 1..=steps {
        let r = train_record(recs, step);
        let n: Vec<u64> = ["fresh", "replay", "data"]
            .iter()
            .map(|k| r["sources"][k].as_u64().unwrap())
            .collect();
        assert_eq!(n.iter().sum::<u64>(), accum, "step {step}: {r}");
        if n[1] > 0 {
            assert_eq!(
                buffered, capacity,
                "step {step}: a replay before the buffer filled"
            );
        }
        buffered = (buffered + 4 * n[0]).min(capacity);
        assert_eq!(r["replay_buffer"], buffered, "step {step}");
        let phi = phis.iter().rev().find(|(from, _)| step > *from).unwrap().1;
        assert!(
            (r["sgo_probability"].as_f64().unwrap() - phi).abs() < 1e-12,
            "step {step}: {r}"
        );
        for k in 0..3 {
            totals[k] += n[k];
        }
    }
    totals
}

#[test]
fn distillm_raises_phi_after_each_evaluation_and_replays_its_samples() {
    let s = Setup::new();
    // ε = −1000: every evaluation after the first raises φ by 0.1 (evaluations at 0, 10, 16)
    let run = s.run_file("d.toml", "d", 16, &distillm(0.5, -1000.0, 6, "decreasing"));
    accumulate_two(&run);
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("d/metrics.jsonl"));
    let totals = check_distillm_log(&recs, 16, 2, 6, &[(0, 0.5), (10, 0.6)]);
    assert!(
        totals.iter().all(|&n| n > 0),
        "fresh, replay, data: {totals:?}"
    );
    let evals: Vec<f64> = recs
        .iter()
        .filter(|r| r["kind"] == "eval" && r["step"] != 0)
        .map(|r| r["sgo_probability"].as_f64().unwrap())
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(
        (evals[0] - 0.6).abs() < 1e-12 && (evals[1] - 0.7).abs() < 1e-12,
        "{evals:?}"
    );
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn a_distillm_run_killed_with_a_full_replay_buffer_resumes_bit_identically() {
    let s = Setup::new();
    // two micro-batches fill the buffer; "increasing": replays are likely early, fresh samples late
    let extra = distillm(0.7, -1000.0, 8, "increasing");
    let full = s.run_file("full.toml", "full", 16, &extra);
    accumulate_two(&full);
    train_ok(&["train", full.to_str().unwrap()]);
    let a = records(&s.path("full/metrics.jsonl"));
    check_distillm_log(&a, 16, 2, 8, &[(0, 0.7), (10, 0.8)]);
    // after each checkpoint the run could resume from, a replay comes before two fresh
    // micro-batches could refill the buffer: a resume that lost the buffer would differ
    for ck in [8, 12] {
        assert_eq!(train_record(&a, ck)["replay_buffer"], 8);
        let mut fresh = 0;
        let replayed = (ck + 1..=16).any(|k| {
            let r = train_record(&a, k);
            let hit = r["sources"]["replay"] != 0 && fresh < 2;
            fresh += r["sources"]["fresh"].as_u64().unwrap();
            hit
        });
        assert!(replayed, "no replay from the buffer of checkpoint {ck}");
    }
    let run = s.run_file("killed.toml", "killed", 16, &extra);
    let metrics = s.path("killed/metrics.jsonl");
    accumulate_two(&run);
    let mut child = spawn_train(&run, &[("DISTILL_FAULT_STEP_DELAY_MS", "60")]);
    let t = Instant::now();
    while last_step(&metrics) < 9 {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let reached = last_step(&metrics);
    assert!(
        (9..16).contains(&reached),
        "killed at {reached}: it resumes from checkpoint 8 or 12"
    );
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    assert_eq!(
        weights(&s.path("killed/student")),
        weights(&s.path("full/student")),
        "killed at step {reached}: weights differ"
    );
    let b = records(&metrics);
    for step in 1..=16 {
        let (x, y) = (train_record(&a, step), train_record(&b, step));
        for k in ["loss", "sources", "replay_buffer", "sgo_probability"] {
            assert_eq!(x[k], y[k], "step {step}: {k}");
        }
    }
}
