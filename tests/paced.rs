//! PACED (`[paced]`, train/paced.rs) and the loss terms' step windows, end to end on tiny models:
//! the weights against w(p) = p^α (1 − p)^β written here in f64; the recorded pass counts against
//! rollouts regenerated here with the same seeds and checked here; a weighted micro-batch's value
//! against Σ_e w_e · Σ_{t∈e} KL_t / Σ_e n_e computed here in f64; terms that switch at the step
//! their window gives; a SIGKILL'd PACED run resumes bit-identically; the run file's refusals.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::config::RunConfig;
use distill::data::{self, Batch, Example, IGNORE_INDEX};
use distill::generate::{generate_batch, GenerateOptions};
use distill::model::{self, LlamaConfig, Tokenizer};
use distill::objective::{LossTerm, Objective};
use distill::train::paced::{self, PacedFile, PacedRun, PacedState};
use distill::train::step::{micro_step, StepOptions};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// passes when the sample's first character is ASCII: about half of a random byte-level
/// student's rollouts, so that pass rates spread over (0, 1)
const CHECK: &str = r"regex:^[\x00-\x7F]()";
const PACED: &str = "[paced]\nrollouts = 4\nrefresh_every = 3\nmax_new_tokens = 4\ncheck = 'regex:^[\\x00-\\x7F]()'\n";

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
        let mut x: u64 = 5;
        let mut rows = String::new();
        let mut plain = String::new();
        for i in 0..40 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (a, b) = ((x >> 33) % 50, (x >> 45) % 50);
            rows += &format!(
                "{{\"prompt\": \"Q: {a} + {b} = ?\\nA:\", \"response\": \" {}\", \"answer\": \"\"}}\n",
                a + b
            );
            plain += &format!(
                "{{\"prompt\": \"Q{i}: {a} + {b}\", \"response\": \" {}\"}}\n",
                a + b
            );
        }
        std::fs::write(dir.path().join("train.jsonl"), rows).unwrap();
        std::fs::write(dir.path().join("plain.jsonl"), plain).unwrap();
        Setup { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A run file of `steps` steps on `data`, with `losses` ([[loss]] tables) and `extra`.
    fn run_file(
        &self,
        name: &str,
        output: &str,
        steps: usize,
        losses: &str,
        extra: &str,
    ) -> PathBuf {
        let text = format!(
            r#"
[teacher]
path = "teacher"

[student]
path = "student"

[data]
train = "train.jsonl"
seq_len = 24
packing = false
validation_fraction = 0.1

{losses}

[optim]
lr = 3e-3
warmup_steps = 2
micro_batch = 4

[run]
steps = {steps}
log_every = 1
eval_every = 0
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

const FKL: &str = "[[loss]]\nkind = \"forward_kl\"\n";

/// w(p) = p^α (1 − p)^β, floored, then scaled to mean 1 (all 1 when every value is 0): written
/// here from the definition.
fn reference_weights(passes: &[u32], n: u32, alpha: f64, beta: f64, floor: f64) -> Vec<f64> {
    let raw: Vec<f64> = passes
        .iter()
        .map(|&k| {
            let p = k as f64 / n as f64;
            // 0^0 = 1: α = 0 leaves p = 0 its weight (1 − 0)^β
            let w = if (p == 0.0 && alpha > 0.0) || (p == 1.0 && beta > 0.0) {
                0.0
            } else {
                p.powf(alpha) * (1.0 - p).powf(beta)
            };
            w.max(floor)
        })
        .collect();
    let mean = raw.iter().sum::<f64>() / raw.len() as f64;
    if mean == 0.0 {
        return vec![1.0; raw.len()];
    }
    raw.iter().map(|w| w / mean).collect()
}

/// A few {prompt, response, answer} rows, tokenised byte-level with EOS 256 and padded to 16.
fn rows(answers: &[Option<&str>]) -> (Vec<data::Sequence>, Vec<Option<String>>) {
    let examples: Vec<Example> = (0..answers.len())
        .map(|i| {
            let mut e = Example {
                ids: vec![],
                target: vec![],
                weight: 1.0,
            };
            e.push(&[81, 58, 32, 49 + i as u32], false); // "Q: 1"…
            e.push(&[32, 50 + i as u32, 51, 256], true);
            e
        })
        .collect();
    (
        data::pad_each(&examples, 16, 256),
        answers.iter().map(|a| a.map(String::from)).collect(),
    )
}

#[test]
fn the_weights_follow_the_beta_kernel_normalised_to_mean_one() {
    let (train, answers) = rows(&[Some("a"), None, Some("b"), Some("c"), Some("d"), Some("e")]);
    let problems = paced::problems(&train, &answers);
    assert_eq!(
        problems.iter().map(|p| p.row).collect::<Vec<_>>(),
        vec![0, 2, 3, 4, 5],
        "the rows with an answer"
    );
    assert_eq!(
        problems[0].prompt,
        vec![81, 58, 32, 49],
        "the record's prompt"
    );
    let cases: &[(u32, &[u32], f64, f64, f64)] = &[
        (8, &[0, 2, 4, 6, 8], 1.0, 1.0, 0.0),
        (8, &[1, 3, 3, 7, 5], 0.5, 2.0, 0.0),
        (4, &[0, 1, 2, 3, 4], 0.0, 1.0, 0.0), // α = 0: p = 0 weighs most
        (4, &[0, 4, 4, 0, 2], 1.0, 1.0, 0.05),
        (4, &[0, 4, 4, 0, 4], 1.0, 1.0, 0.0), // every w = 0: uniform
    ];
    for &(n, passes, alpha, beta, floor) in cases {
        let file: PacedFile = toml::from_str(&format!(
            "rollouts = {n}\nalpha = {alpha}\nbeta = {beta}\nfloor = {floor}\n"
        ))
        .unwrap();
        let mut run = PacedRun::new(file.resolve().unwrap(), &train, &answers, &[], &[]).unwrap();
        let uniform = run
            .apply(&PacedState {
                at: 0,
                rollouts: n as usize,
                passes: passes.to_vec(),
            })
            .unwrap();
        let want = reference_weights(passes, n, alpha, beta, floor);
        let all_zero = floor == 0.0
            && passes
                .iter()
                .all(|&k| (k == 0 && alpha > 0.0) || (k == n && beta > 0.0));
        assert_eq!(uniform, all_zero, "{passes:?}");
        let got: Vec<f64> = [0, 2, 3, 4, 5]
            .iter()
            .map(|&r| run.row_weights[r] as f64)
            .collect();
        for (g, w) in got.iter().zip(&want) {
            // f64 → f32: half an ulp of the weight
            assert!(
                (g - w).abs() <= w.abs() * f32::EPSILON as f64,
                "{passes:?}: {got:?} vs {want:?}"
            );
        }
        assert_eq!(
            run.row_weights[1], 1.0,
            "a row without an answer keeps weight 1"
        );
    }
}

#[test]
fn a_weighted_batch_is_the_sum_of_weighted_per_example_objectives() {
    let cfg = LlamaConfig::tiny(259, 48, 2, 4, 2);
    let student = model::random(&cfg, Device::Cpu, 1).unwrap();
    let teacher = model::random(&cfg, Device::Cpu, 2).unwrap();
    let (train, answers) = rows(&[Some("a"), Some("b"), None]);
    let file: PacedFile = toml::from_str("rollouts = 4\n").unwrap();
    let mut run = PacedRun::new(file.resolve().unwrap(), &train, &answers, &[], &[]).unwrap();
    run.row_weights = vec![1.75, 0.5, 1.0];
    let objective = Objective::new(&[LossTerm::new("forward_kl", &[], 1.0).unwrap()], 1).unwrap();
    let mut batch = Batch::new(&train, &[0, 1, 2], Device::Cpu).unwrap();
    let factor = run.weigh(&mut batch).unwrap();
    let live = distill::teacher::Live::new(&teacher.model);
    let m = micro_step(
        &student.model,
        Some(&live as &dyn distill::teacher::TeacherSignal),
        &objective,
        &batch,
        &StepOptions::new(None, factor),
    )
    .unwrap();
    // reference: Σ_e w_e Σ_{t ∈ e} KL_t / Σ_e n_e, in f64 from the two models' logits
    let (mut num, mut den, mut big) = (0.0, 0.0, 0.0f64);
    for (r, s) in train.iter().enumerate() {
        let ids =
            Tensor::from_slice(&s.ids.iter().map(|&x| x as i64).collect::<Vec<_>>()).unsqueeze(0);
        let host =
            |x: Tensor| Vec::<f64>::try_from(&x.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let (sl, tl) = tch::no_grad(|| {
            (
                host(student.model.forward(&ids).unwrap()),
                host(teacher.model.forward(&ids).unwrap()),
            )
        });
        for t in (0..16).filter(|&t| s.labels[t] != IGNORE_INDEX) {
            let ls = |x: &[f64]| {
                let mx = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z = mx + x.iter().map(|a| (a - mx).exp()).sum::<f64>().ln();
                x.iter().map(|a| a - z).collect::<Vec<_>>()
            };
            let (lq, lp) = (
                ls(&sl[t * 259..(t + 1) * 259]),
                ls(&tl[t * 259..(t + 1) * 259]),
            );
            let kl: f64 = (0..259).map(|i| lp[i].exp() * (lp[i] - lq[i])).sum();
            num += run.row_weights[r] as f64 * kl;
            den += 1.0;
            big = sl[t * 259..(t + 1) * 259]
                .iter()
                .chain(&tl[t * 259..(t + 1) * 259])
                .fold(big, |a, x| a.max(x.abs()));
        }
    }
    let want = num / den;
    // f32 log-softmax: each log-probability off by a few ε·(|logit| + ln V), the KL by that much
    // times the largest weight
    let tol = 16.0 * 1.75 * f32::EPSILON as f64 * (big + 259f64.ln());
    assert!(
        (m.loss - want).abs() <= tol,
        "{} vs {want} (tol {tol})",
        m.loss
    );
    // and not the mean re-normalised by the weights
    assert!(factor != 1.0);
}

#[test]
fn the_recorded_pass_counts_are_the_rollouts_regenerated_and_checked_here() {
    let s = Setup::new();
    let run = s.run_file("p.toml", "p", 4, FKL, PACED);
    train_ok(&["train", run.to_str().unwrap()]);
    let last = std::fs::read_dir(s.path("p/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("state.json")).unwrap()).unwrap();
    // refreshes after 0 and 3 steps; the checkpoint at step 4 holds the second table
    assert_eq!(state["paced"]["at"], 3);
    let recs = records(&s.path("p/metrics.jsonl"));
    let tables: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "paced").collect();
    assert_eq!(tables.len(), 2);
    assert_eq!(
        (tables[0]["step"].as_u64(), tables[1]["step"].as_u64()),
        (Some(1), Some(4))
    );

    // the first table, regenerated here from the untrained student with the same seeds
    let cfg = RunConfig::load(&run, &[]).unwrap();
    let student = model::load(&s.path("student"), Device::Cpu).unwrap();
    let tok = student.tokenizer.as_ref().unwrap();
    let ds = data::load(&cfg.data, tok, Some(256)).unwrap();
    let mut passes = Vec::new();
    let mut k = 0;
    for seq in &ds.train {
        let answer = match &ds.answers[seq.spans[0].example] {
            Some(a) => a,
            None => continue,
        };
        assert_eq!(answer, "");
        let first = seq.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap() + 1;
        let prompt = seq.ids[..first].to_vec();
        let seeds: Vec<u64> = (0..4).map(|j| paced::rollout_seed(3, 0, k, j)).collect();
        let opts = GenerateOptions {
            max_new_tokens: 4,
            temperature: 1.0,
            top_p: 1.0,
            seed: 3,
            stop_ids: vec![256],
        };
        let out = generate_batch(&student.model, &vec![prompt; 4], &seeds, &opts, |_, _| {
            Ok(())
        })
        .unwrap();
        // the check, written here: the first character of the decoded sample is ASCII
        let n = out
            .iter()
            .filter(|g| {
                tok.decode(&g.tokens, false)
                    .unwrap()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii())
            })
            .count();
        passes.push(n as u64);
        k += 1;
    }
    let mut histogram = vec![0u64; 5];
    for &p in &passes {
        histogram[p as usize] += 1;
    }
    let recorded: Vec<u64> = tables[0]["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(recorded, histogram);
    assert!(
        histogram[1..4].iter().sum::<u64>() > 0,
        "some pass rates strictly inside (0, 1): {histogram:?}"
    );
    let mean = passes.iter().sum::<u64>() as f64 / (4.0 * passes.len() as f64);
    assert_eq!(tables[0]["mean_p"].as_f64().unwrap(), mean);
    let zero = passes.iter().filter(|&&p| p == 0 || p == 4).count() as f64 / passes.len() as f64;
    assert_eq!(tables[0]["zero_weight_share"].as_f64().unwrap(), zero);
    let report = std::fs::read_to_string(s.path("p/report.md")).unwrap();
    assert!(report.contains("PACED pass rates"), "{report}");
    // the per-problem table of the first refresh, via the library on the same student
    let mut r =
        PacedRun::new(cfg.paced.clone().unwrap(), &ds.train, &ds.answers, &[], &[]).unwrap();
    let table = r
        .measure(&student.model, tok, 3, 0, &[256, 256], 64)
        .unwrap();
    assert_eq!(
        table.passes.iter().map(|&p| p as u64).collect::<Vec<_>>(),
        passes
    );
    let _ = r.apply(&table).unwrap();
    assert_eq!(CHECK, cfg.paced.as_ref().unwrap().check.name());
}

#[test]
fn loss_terms_switch_at_the_step_their_window_gives() {
    let s = Setup::new();
    let two = "[[loss]]\nkind = \"forward_kl\"\nsteps = [1, 3]\n\n[[loss]]\nkind = \"reverse_kl\"\nsteps = [4, 6]\n";
    let staged = s.run_file("w.toml", "w", 6, two, "");
    let plain = s.run_file("f.toml", "f", 6, FKL, "");
    train_ok(&["train", staged.to_str().unwrap()]);
    train_ok(&["train", plain.to_str().unwrap()]);
    let (a, b) = (
        records(&s.path("w/metrics.jsonl")),
        records(&s.path("f/metrics.jsonl")),
    );
    for step in 1..=6u64 {
        let (x, y) = (train_record(&a, step), train_record(&b, step));
        if step <= 3 {
            assert!(x["reverse_kl"].is_null(), "step {step}: {x}");
            assert_eq!(x["loss"], x["forward_kl"], "step {step}");
            // the same steps as a forward-KL-only run
            assert_eq!(x["loss"], y["loss"], "step {step}");
        } else {
            assert!(x["forward_kl"].is_null(), "step {step}: {x}");
            assert_eq!(x["loss"], x["reverse_kl"], "step {step}");
            assert_ne!(x["loss"], y["loss"], "step {step}");
        }
    }
    let run = std::fs::read_to_string(s.path("w/run.json")).unwrap();
    assert!(run.contains("steps=[4, 6]"), "{run}");
}

#[test]
fn the_run_file_refuses_bad_paced_settings() {
    let s = Setup::new();
    let bad = |losses: &str, extra: &str, needles: &[&str]| {
        let run = s.run_file("bad.toml", "bad", 4, losses, extra);
        let out = distill(&["train", run.to_str().unwrap()]);
        assert_clean_failure(&out, needles);
    };
    bad(
        FKL,
        "[paced]\nalpha = -1\n",
        &["bad.toml:", "paced.alpha", "≥ 0"],
    );
    bad(
        FKL,
        "[paced]\ncheck = 'regex:(['\n",
        &["bad.toml:", "paced.check", "invalid regular expression"],
    );
    bad(
        FKL,
        "[paced]\ncheck = 'fuzzy'\n",
        &["paced.check", "exact, numeric, regex:PATTERN"],
    );
    bad(FKL, "[paced]\nrollouts = 0\n", &["paced.rollouts"]);
    bad(
        FKL,
        "[paced]\nrefresh_every = 0\n",
        &["paced.refresh_every"],
    );
    bad(FKL, "[paced]\nrollout = 4\n", &["rollout"]);
    // packing joins records into rows: refused
    let run = s.run_file("bad.toml", "bad", 4, FKL, "[paced]\n");
    let text = std::fs::read_to_string(&run)
        .unwrap()
        .replace("packing = false", "packing = true");
    std::fs::write(&run, text).unwrap();
    assert_clean_failure(
        &distill(&["train", run.to_str().unwrap()]),
        &["bad.toml:", "data.packing", "[paced]"],
    );
    // data without answers
    let run = s.run_file("bad.toml", "bad", 4, FKL, "[paced]\n");
    let text = std::fs::read_to_string(&run)
        .unwrap()
        .replace("train.jsonl", "plain.jsonl");
    std::fs::write(&run, text).unwrap();
    assert_clean_failure(
        &distill(&["train", run.to_str().unwrap()]),
        &["plain.jsonl", "\"answer\""],
    );
    // a step window: out of order, beyond the run, a step with no term, not a pair
    bad(
        "[[loss]]\nkind = \"forward_kl\"\nsteps = [3, 2]\n",
        "",
        &["bad.toml:", "loss.0.steps", "first ≤ last"],
    );
    bad(
        "[[loss]]\nkind = \"forward_kl\"\nsteps = [1, 9]\n",
        "",
        &["loss.0.steps", "after the run's 4 steps"],
    );
    bad(
        "[[loss]]\nkind = \"forward_kl\"\nsteps = [2, 4]\n",
        "",
        &["no [[loss]] term counts at step 1"],
    );
    bad(
        "[[loss]]\nkind = \"forward_kl\"\nsteps = 3\n",
        "",
        &["loss.0.steps", "[first, last]"],
    );
    // an answer on a record without a prompt
    std::fs::write(
        s.path("text.jsonl"),
        "{\"text\": \"abc\", \"answer\": \"1\"}\n",
    )
    .unwrap();
    let run = s.run_file("bad.toml", "bad", 4, FKL, "");
    let text = std::fs::read_to_string(&run)
        .unwrap()
        .replace("train.jsonl", "text.jsonl");
    std::fs::write(&run, text).unwrap();
    assert_clean_failure(
        &distill(&["train", run.to_str().unwrap()]),
        &["text.jsonl:1:", "'answer'"],
    );
    assert!(!s.path("bad").exists(), "nothing written");
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_paced_run_resumes_bit_identically() {
    let s = Setup::new();
    let two = "[[loss]]\nkind = \"forward_kl\"\nsteps = [1, 6]\n\n[[loss]]\nkind = \"reverse_kl\"\nsteps = [7, 12]\n";
    let full = s.run_file("full.toml", "full", 12, two, PACED);
    train_ok(&["train", full.to_str().unwrap()]);
    let a = records(&s.path("full/metrics.jsonl"));
    let run = s.run_file("killed.toml", "killed", 12, two, PACED);
    let metrics = s.path("killed/metrics.jsonl");
    // killed once step 5 is done (its checkpoint is step 4's, two refreshes back is step 3's)
    let mut child = spawn_train(&run, &[("DISTILL_FAULT_DIE_AFTER_STEP", "5")]);
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reached = last_step(&metrics);
    assert!(reached < 12, "the run finished before the kill");
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    assert_eq!(
        weights(&s.path("killed/student")),
        weights(&s.path("full/student")),
        "killed at step {reached}: weights differ"
    );
    let b = records(&metrics);
    for step in 1..=12 {
        let (x, y) = (train_record(&a, step), train_record(&b, step));
        assert_eq!(x["loss"], y["loss"], "step {step}");
    }
    let tables = |r: &[Value]| -> Vec<Value> {
        r.iter()
            .filter(|x| x["kind"] == "paced")
            .map(|x| {
                let mut x = x.clone();
                x["seconds"] = Value::Null;
                x
            })
            .collect()
    };
    assert_eq!(tables(&a), tables(&b));
    assert_eq!(tables(&a).len(), 4, "refreshes after 0, 3, 6 and 9 steps");
}
