//! Several data sources (`[[data.source]]`) and DDK (`[data.ddk]`) on tiny models: DDK's weight
//! update against its formula computed here in f64; the mixing draws each source in proportion to
//! its weight (a bound from the binomial) and reproducibly by seed, and a run's rows are exactly
//! those draws; the per-source metrics add up to the whole; a run killed with sources and DDK on
//! resumes bit-identically; the run file's refusals name the key and line.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::data::ddk::Ddk;
use distill::data::mixture::{draw_source, Mixture};
use distill::model::{self, LlamaConfig, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::Device;

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const SEED: u64 = 3;

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
        let cats = [
            "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far",
        ];
        let nums = ["12", "7", "plus", "minus", "is", "zero", "905", "x", "y"];
        std::fs::write(dir.path().join("a.txt"), text(&cats, 2000, 99)).unwrap();
        std::fs::write(dir.path().join("b.txt"), text(&nums, 1500, 5)).unwrap();
        Setup { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A run file of `steps` steps with two sources (weights 1 and 3); `extra` is appended.
    fn run_file(&self, name: &str, output: &str, steps: usize, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[teacher]
path = "teacher"

[student]
path = "student"

[data]
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 4

[[data.source]]
name = "cats"
train = "a.txt"

[[data.source]]
name = "numbers"
train = "b.txt"
weight = 3

[[loss]]
kind = "forward_kl"

[optim]
lr = 3e-3
warmup_steps = 2
micro_batch = 4
grad_accum = 2

[run]
steps = {steps}
log_every = 1
eval_every = 5
checkpoint_every = 4
threads = 2
seed = {SEED}
output = "{output}"

{extra}
"#
        );
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

const DDK: &str = "[data.ddk]\ninterval = 3\nalpha = 0.5\n";

fn of_kind<'a>(recs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["kind"] == kind).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// DDK's update written plainly: r̂ = softmax(PPL_s / PPL_t), ψ = w·exp(r̂),
/// w' = α·ψ/Σψ + (1 − α)/N.
fn ddk_reference(w: &[f64], ppl_s: &[f64], ppl_t: &[f64], alpha: f64) -> Vec<f64> {
    let n = w.len();
    let ratio: Vec<f64> = (0..n).map(|i| ppl_s[i] / ppl_t[i]).collect();
    let z: f64 = ratio.iter().map(|r| r.exp()).sum();
    let r_hat: Vec<f64> = ratio.iter().map(|r| r.exp() / z).collect();
    let psi: Vec<f64> = (0..n).map(|i| w[i] * r_hat[i].exp()).collect();
    let sum: f64 = psi.iter().sum();
    (0..n)
        .map(|i| alpha * psi[i] / sum + (1.0 - alpha) / n as f64)
        .collect()
}

/// Both computations are a handful of f64 operations on values of order 1 (the library subtracts
/// the largest exponent first): they agree to a few ulp; 1e-12 leaves a wide margin.
const F64_TOL: f64 = 1e-12;

#[test]
fn ddk_weight_update_follows_its_formula() {
    // (weights, student ppl, teacher ppl, α)
    type Case<'a> = (&'a [f64], &'a [f64], &'a [f64], f64);
    let cases: [Case; 4] = [
        (&[0.25, 0.75], &[12.0, 3.0], &[4.0, 2.5], 0.5),
        (&[0.2, 0.5, 0.3], &[40.0, 9.0, 11.0], &[10.0, 8.0, 2.0], 0.8),
        (&[0.6, 0.4], &[5.0, 5.0], &[5.0, 5.0], 1.0),
        (&[0.1, 0.1, 0.8], &[300.0, 2.0, 2.0], &[1.5, 2.0, 1.9], 0.3),
    ];
    for (w, s, t, alpha) in cases {
        let d = Ddk { interval: 1, alpha };
        let ppl: Vec<(f64, f64)> = s.iter().zip(t).map(|(a, b)| (*a, *b)).collect();
        let got = d.update(w, &ppl).unwrap();
        let want = ddk_reference(w, s, t, alpha);
        for (g, x) in got.iter().zip(&want) {
            assert!((g - x).abs() <= F64_TOL, "{got:?} vs {want:?}");
        }
        assert!((got.iter().sum::<f64>() - 1.0).abs() <= F64_TOL);
    }
    // equal ratios and α = 1 keep the weights; the domain with the larger gap gains weight
    let d = Ddk {
        interval: 1,
        alpha: 1.0,
    };
    let same = d.update(&[0.6, 0.4], &[(5.0, 5.0), (2.0, 2.0)]).unwrap();
    assert!((same[0] - 0.6).abs() <= F64_TOL && (same[1] - 0.4).abs() <= F64_TOL);
    let d = Ddk {
        interval: 1,
        alpha: 0.5,
    };
    let up = d.update(&[0.5, 0.5], &[(8.0, 2.0), (2.0, 2.0)]).unwrap();
    assert!(up[0] > 0.5 && up[1] < 0.5, "{up:?}");
    // a non-finite perplexity leaves the weights alone
    assert!(d
        .update(&[0.5, 0.5], &[(f64::INFINITY, 2.0), (2.0, 2.0)])
        .is_none());
    // due before step 1 and every `interval` steps, once
    let d = Ddk {
        interval: 3,
        alpha: 0.5,
    };
    assert!(d.due(0, None) && !d.due(0, Some(0)) && !d.due(1, Some(0)) && d.due(3, Some(0)));
}

#[test]
fn mixing_draws_each_source_in_proportion_and_by_seed() {
    let weights = [1.0, 2.0, 5.0];
    let total: f64 = weights.iter().sum();
    let (steps, micros, rows) = (2000usize, 3usize, 5usize);
    let n = (steps * micros * rows) as f64;
    let mut counts = [0f64; 3];
    for step in 1..=steps {
        for micro in 0..micros {
            for row in 0..rows {
                counts[draw_source(&weights, SEED, step, micro, row)] += 1.0;
            }
        }
    }
    // each count is Binomial(n, p_i): within 5 standard deviations (a two-sided miss has
    // probability < 6e-7 per source for independent draws)
    let mut chi2 = 0.0;
    for (c, w) in counts.iter().zip(weights) {
        let p = w / total;
        let sd = (n * p * (1.0 - p)).sqrt();
        assert!(
            (c - n * p).abs() <= 5.0 * sd,
            "{counts:?}: source of p = {p}"
        );
        chi2 += (c - n * p).powi(2) / (n * p);
    }
    // Pearson's χ² with 2 degrees of freedom: P(χ² > 30) = e^{−15} ≈ 3e-7
    assert!(chi2 < 30.0, "χ² = {chi2}, counts {counts:?}");
    // a function of (seed, step, micro, row): the same seed draws the same, another seed not
    let draws = |seed: u64| -> Vec<usize> {
        (1..=200)
            .flat_map(|s| (0..4).map(move |r| draw_source(&weights, seed, s, 0, r)))
            .collect()
    };
    assert_eq!(draws(SEED), draws(SEED));
    assert_ne!(draws(SEED), draws(SEED + 1));
    // rows come from each source's own range, and one epoch of a source visits each of its
    // sequences once; a restored mixture continues the same rows
    let sizes = [3usize, 5, 7];
    let mut m = Mixture::new(&sizes, &weights, SEED);
    let mut seen: Vec<Vec<usize>> = vec![vec![]; 3];
    let mut first = vec![];
    for step in 1..=40 {
        let rows = m.next_batch(4, SEED, step, 0);
        for (row, &r) in rows.iter().enumerate() {
            let i = draw_source(&m.weights, SEED, step, 0, row);
            let lo: usize = sizes[..i].iter().sum();
            assert!(
                (lo..lo + sizes[i]).contains(&r),
                "row {r} outside source {i}"
            );
            seen[i].push(r - lo);
        }
        first.extend(rows);
        if step == 20 {
            let st = m.state();
            let mut again = Mixture::new(&sizes, &weights, SEED);
            again.restore(&st).unwrap();
            let a: Vec<usize> = (21..=40)
                .flat_map(|s| again.next_batch(4, SEED, s, 0))
                .collect();
            let mut m2 = Mixture::new(&sizes, &weights, SEED);
            m2.restore(&st).unwrap();
            let b: Vec<usize> = (21..=40)
                .flat_map(|s| m2.next_batch(4, SEED, s, 0))
                .collect();
            assert_eq!(a, b);
        }
    }
    for (i, s) in seen.iter().enumerate() {
        for epoch in s.chunks_exact(sizes[i]) {
            let mut e = epoch.to_vec();
            e.sort();
            assert_eq!(e, (0..sizes[i]).collect::<Vec<_>>(), "source {i}");
        }
    }
}

/// A run with sources and DDK: the rows of each step are the draws by the weights in force; each
/// DDK record is its formula applied to the previous weights and the per-source perplexities it
/// measured (which equal the evaluation's at step 0); the per-source metrics add up to the whole.
#[test]
fn a_run_mixes_by_its_weights_and_ddk_updates_them_by_its_formula() {
    let s = Setup::new();
    let run = s.run_file("run.toml", "out", 7, DDK);
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("out/metrics.jsonl"));
    let ddk = of_kind(&recs, "ddk");
    // before step 1 and after steps 3 and 6
    let firsts: Vec<u64> = ddk.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(firsts, vec![1, 4, 7]);
    let mut w = vec![0.25, 0.75];
    for r in &ddk {
        assert_eq!(
            floats(&r["previous"]),
            w,
            "the weights in use before the update"
        );
        let (ps, pt) = (floats(&r["student_ppl"]), floats(&r["teacher_ppl"]));
        let want = ddk_reference(&w, &ps, &pt, 0.5);
        let got = floats(&r["weights"]);
        for (g, x) in got.iter().zip(&want) {
            assert!(
                (g - x).abs() <= F64_TOL,
                "step {}: {got:?} vs {want:?}",
                r["step"]
            );
        }
        w = got;
    }
    // the first update measures what the evaluation at step 0 measured, source by source
    let eval0 = of_kind(&recs, "eval")
        .into_iter()
        .find(|r| r["step"] == 0)
        .unwrap();
    for (i, name) in ["cats", "numbers"].iter().enumerate() {
        let e = &eval0["sources"][name];
        let (a, b) = (
            floats(&ddk[0]["student_ppl"])[i],
            e["student_ppl"].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= F64_TOL * b, "{name}: {a} vs {b}");
    }
    // each step's rows per source are exactly the draws by the weights in force
    for t in of_kind(&recs, "train") {
        let step = t["step"].as_u64().unwrap();
        let w = floats(
            &ddk.iter()
                .rev()
                .find(|r| r["step"].as_u64().unwrap() <= step)
                .unwrap()["weights"],
        );
        let mut want = [0u64; 2];
        for micro in 0..2 {
            for row in 0..4 {
                want[draw_source(&w, SEED, step as usize, micro, row)] += 1;
            }
        }
        let got: Vec<u64> = t["source_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "step {step}");
    }
    // the report has the per-source table and the weights
    let md = std::fs::read_to_string(s.path("out/report.md")).unwrap();
    assert!(
        md.contains("| cats |") && md.contains("DDK source weights"),
        "{md}"
    );
    assert!(s.path("out/sources.png").exists());
}

/// Each source's validation data has 4 sequences and the micro-batch is 4, so the whole
/// evaluation's batches are the sources' batches: the per-token values are the same numbers, and
/// the split differs from the whole only by the order of the f64 additions over batches (a
/// relative difference of a few ulp; 1e-12 allows for it). Top-1 agreement and tokens are counts:
/// exact.
#[test]
fn per_source_metrics_add_up_to_the_whole() {
    let s = Setup::new();
    let run = s.run_file("run.toml", "out", 2, "");
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("out/metrics.jsonl"));
    let evals = of_kind(&recs, "eval");
    assert_eq!(evals.len(), 2);
    for e in evals {
        let per = e["sources"].as_object().unwrap();
        assert_eq!(per.len(), 2);
        let n = e["tokens"].as_f64().unwrap();
        let sum = |f: &dyn Fn(&Value) -> f64| -> f64 {
            per.values()
                .map(|m| m["tokens"].as_f64().unwrap() * f(m))
                .sum()
        };
        assert_eq!(sum(&|_| 1.0), n, "tokens");
        let close = |what: &str, split: f64, whole: f64| {
            assert!(
                (split - whole).abs() <= 1e-12 * whole.abs().max(1.0),
                "{what}: Σ n_i·x_i = {split}, n·x = {whole}"
            );
        };
        let num = |m: &Value, k: &str| m[k].as_f64().unwrap();
        close("KL", sum(&|m| num(m, "kl")), n * e["kl"].as_f64().unwrap());
        close(
            "log student ppl",
            sum(&|m| num(m, "student_ppl").ln()),
            n * e["student_ppl"].as_f64().unwrap().ln(),
        );
        close(
            "log teacher ppl",
            sum(&|m| num(m, "teacher_ppl").ln()),
            n * e["teacher_ppl"].as_f64().unwrap().ln(),
        );
        let agree = sum(&|m| num(m, "top1"));
        let whole = n * e["top1"].as_f64().unwrap();
        assert!(
            (agree.round() - whole.round()).abs() < 0.5,
            "{agree} vs {whole}"
        );
        // the sources differ (the split is not one number repeated)
        let kls: Vec<f64> = per.values().map(|m| num(m, "kl")).collect();
        assert_ne!(kls[0], kls[1]);
    }
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection`
#[cfg(feature = "fault-injection")]
#[test]
fn a_run_killed_with_sources_and_ddk_resumes_bit_identically() {
    killed_and_resumed("");
}

/// With a teacher-query budget too (its unselected rows trained with cross-entropy): the chosen
/// set spans the sources, and the teacher is asked for the chosen rows only.
#[cfg(feature = "fault-injection")]
#[test]
fn a_budgeted_run_with_sources_and_ddk_resumes_bit_identically() {
    let recs = killed_and_resumed("budget = 0.5\nselection = \"uncertainty\"\n");
    let budget = of_kind(&recs, "budget");
    assert_eq!(budget.len(), 1, "one selection record");
    let mut asked = 0;
    for r in of_kind(&recs, "train") {
        let rows: u64 = r["source_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        let t = r["teacher_rows"].as_u64().unwrap();
        assert!(t <= rows, "{r}");
        asked += t;
        assert_eq!(r["teacher_rows_total"].as_u64().unwrap(), asked);
    }
    assert!(
        asked > 0 && asked < 16 * 8,
        "the teacher was asked for some rows only: {asked}"
    );
}

/// A run with two sources and DDK (and `teacher` keys added to `[teacher]`), killed mid-way and
/// resumed, equals the uninterrupted run: weights and every record. Returns the records.
#[cfg(feature = "fault-injection")]
fn killed_and_resumed(teacher: &str) -> Vec<Value> {
    let s = Setup::new();
    let with = |p: PathBuf| {
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replacen(
            "path = \"teacher\"\n",
            &format!("path = \"teacher\"\n{teacher}"),
            1,
        );
        std::fs::write(&p, text).unwrap();
        p
    };
    let full = with(s.run_file("full.toml", "full", 16, DDK));
    train_ok(&["train", full.to_str().unwrap()]);
    let run = with(s.run_file("killed.toml", "killed", 16, DDK));
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
    let weights = |d: &str| std::fs::read(s.path(d).join("student/model.safetensors")).unwrap();
    assert_eq!(
        weights("killed"),
        weights("full"),
        "killed at step {reached}: weights differ"
    );
    let (a, b) = (records(&s.path("full/metrics.jsonl")), records(&metrics));
    for kind in ["train", "ddk", "eval"] {
        let strip = |r: &&Value| {
            let mut r = (*r).clone();
            for k in ["tokens_per_s", "seconds", "peak_rss_mib"] {
                r.as_object_mut().unwrap().remove(k);
            }
            r
        };
        let x: Vec<Value> = of_kind(&a, kind).iter().map(strip).collect();
        let y: Vec<Value> = of_kind(&b, kind).iter().map(strip).collect();
        assert_eq!(x.len(), y.len(), "{kind} records");
        for (p, q) in x.iter().zip(&y) {
            assert_eq!(p, q, "{kind}");
        }
    }
    assert_eq!(of_kind(&a, "ddk").len(), 6); // before steps 1, 4, 7, 10, 13, 16
    a
}

#[test]
fn the_run_file_refuses_bad_sources() {
    let s = Setup::new();
    let head = "[teacher]\npath = \"teacher\"\n\n[student]\npath = \"student\"\n\n[[loss]]\nkind = \"forward_kl\"\n\n[run]\nsteps = 2\noutput = \"out\"\n\n";
    let src = |name: &str, weight: &str| {
        format!("[[data.source]]\nname = \"{name}\"\ntrain = \"a.txt\"\n{weight}\n")
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("[data]\ntrain = \"b.txt\"\n\n{}", src("cats", "")),
            "train = \"b.txt\"",
            "data.train",
        ),
        (
            format!("{}{}", src("cats", ""), src("cats", "")),
            "name = \"cats\"",
            "data.source.1.name",
        ),
        (
            format!("{}{}", src("cats", ""), src("dogs", "weight = 0")),
            "weight = 0",
            "data.source.1.weight",
        ),
        (
            format!("{}{}", src("cats", "weight = -2.5"), src("dogs", "")),
            "weight = -2.5",
            "data.source.0.weight",
        ),
        (
            format!("{}\n[data.ddk]\ninterval = 5\n", src("cats", "")),
            "[data.ddk]",
            "data.ddk",
        ),
        (
            format!(
                "{}{}\n[data.ddk]\ninterval = 0\n",
                src("cats", ""),
                src("dogs", "")
            ),
            "interval = 0",
            "data.ddk.interval",
        ),
        (
            format!(
                "{}{}\n[data.ddk]\ninterval = 2\nalpha = 0\n",
                src("cats", ""),
                src("dogs", "")
            ),
            "alpha = 0",
            "data.ddk.alpha",
        ),
    ];
    for (k, (data, line_text, key)) in cases.iter().enumerate() {
        let text = format!("{head}{data}");
        // the line of the offending key: the last occurrence for a repeated name
        let line = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim() == *line_text)
            .map(|(i, _)| i + 1)
            .last()
            .unwrap();
        let p = s.path(&format!("bad{k}.toml"));
        std::fs::write(&p, &text).unwrap();
        let out = distill(&["train", p.to_str().unwrap()]);
        assert_clean_failure(&out, &[&format!("bad{k}.toml:{line}"), key]);
    }
}
