//! Several teachers (`[[teacher]]`, `[teachers] combine`, teacher/ensemble.rs) on tiny models: two
//! identical teachers train exactly as one; the combined distribution (probability and log) and
//! each teacher's share against an f64 reference computed here; per_source gives each row its
//! source's teacher, bit for bit; a run killed with several teachers resumes bit-identically; the
//! refusals name the key.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::data::{Batch, IGNORE_INDEX};
use distill::model::{self, LlamaConfig, LoadedModel, Tokenizer};
use distill::teacher::ensemble::{Combine, Ensemble, Shares};
use distill::teacher::{Live, TeacherSignal};
use serde_json::Value;
use std::cell::RefCell;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

fn tiny() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(259, 48, 2, 4, 2);
    cfg.eos_token_ids = vec![256];
    cfg
}

/// A random tiny model; `scale` sharpens its distributions (larger embeddings).
fn random(seed: i64, scale: f64) -> LoadedModel {
    let mut m = model::random(&tiny(), Device::Cpu, seed).unwrap();
    tch::no_grad(|| {
        let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = e.f_mul_scalar_(scale).unwrap();
    });
    m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
    m
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        random(7, 150.0)
            .save_hf(&dir.path().join("teacher"))
            .unwrap();
        random(9, 60.0)
            .save_hf(&dir.path().join("teacher2"))
            .unwrap();
        random(8, 1.0).save_hf(&dir.path().join("student")).unwrap();
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

    /// A run file: `teachers` is the teacher section(s), `data` the data section's sources (or
    /// `train = …`), `extra` appended.
    fn run_file(
        &self,
        name: &str,
        output: &str,
        steps: usize,
        teachers: &str,
        extra: &str,
    ) -> PathBuf {
        let text = format!(
            r#"
{teachers}

[student]
path = "student"

[data]
train = "a.txt"
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
eval_every = 4
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

const ONE: &str = "[teacher]\npath = \"teacher\"\n";
const TWO_SAME: &str = "[[teacher]]\npath = \"teacher\"\n\n[[teacher]]\npath = \"teacher\"\n";
const TWO: &str = "[[teacher]]\nname = \"a\"\npath = \"teacher\"\n\n[[teacher]]\nname = \"b\"\npath = \"teacher2\"\nweight = 3\n";

fn strip(r: &Value) -> Value {
    let mut r = r.clone();
    for k in [
        "tokens_per_s",
        "seconds",
        "peak_rss_mib",
        "teacher_shares",
        "teachers",
    ] {
        r.as_object_mut().unwrap().remove(k);
    }
    r
}

/// Two copies of one teacher with equal weights: the combined logits are the teacher's own, bit
/// for bit (log: 0.5·z + 0.5·z = z exactly; probability: z + (log ½ + log 2) with log ½ = −log 2
/// exactly in f32, and exp(0) = 1), so the run is the one-teacher run: the same weights and the
/// same logged losses and metrics. Each copy's share is exactly ½ (equal responsibilities).
#[test]
fn two_identical_teachers_train_exactly_as_one() {
    let s = Setup::new();
    let one = s.run_file("one.toml", "one", 6, ONE, "");
    train_ok(&["train", one.to_str().unwrap()]);
    let base = records(&s.path("one/metrics.jsonl"));
    let fp = |run: &str| -> Value {
        let ck = s.path(run).join("checkpoints/step-00000004/state.json");
        serde_json::from_str::<Value>(&std::fs::read_to_string(ck).unwrap()).unwrap()["fingerprint"]
            .clone()
    };
    // one teacher: the fingerprint as before several teachers existed (older checkpoints resume)
    assert!(fp("one").get("teachers").is_none(), "{}", fp("one"));
    for combine in ["probability", "log"] {
        let run = s.run_file(
            &format!("{combine}.toml"),
            combine,
            6,
            TWO_SAME,
            &format!("[teachers]\ncombine = \"{combine}\"\n"),
        );
        train_ok(&["train", run.to_str().unwrap()]);
        assert!(
            weights(&s.path(combine).join("student")) == weights(&s.path("one/student")),
            "{combine}: the student's weights differ from the one-teacher run"
        );
        assert!(fp(combine)["teachers"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{combine}: teacher.0 = ")));
        let recs = records(&s.path(&format!("{combine}/metrics.jsonl")));
        let keep = |r: &&Value| r["kind"] == "train" || r["kind"] == "eval";
        let (a, b): (Vec<&Value>, Vec<&Value>) = (
            base.iter().filter(keep).collect(),
            recs.iter().filter(keep).collect(),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(strip(x), strip(y), "{combine}");
        }
        for r in recs.iter().filter(|r| r["kind"] == "train") {
            assert_eq!(
                r["teacher_shares"],
                serde_json::json!([0.5, 0.5]),
                "{combine}"
            );
        }
        let ev = recs.iter().rfind(|r| r["kind"] == "eval").unwrap();
        let t = ev["teachers"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        for m in t {
            assert_eq!(
                m["ppl"], ev["teacher_ppl"],
                "{combine}: each copy's own ppl"
            );
            assert_eq!(m["share"], 0.5);
        }
    }
}

/// A batch of 2 rows × 9 positions of byte ids, the last label of each row ignored, one
/// position's token weight 0 (not counted).
fn batch() -> Batch {
    let ids: Vec<i64> = (0..18).map(|i| (i * 37 + 11) % 256).collect();
    let mut labels: Vec<i64> = ids.iter().skip(1).copied().chain([0]).collect();
    labels[8] = IGNORE_INDEX;
    labels[17] = IGNORE_INDEX;
    let ids = Tensor::from_slice(&ids).view([2, 9]);
    let labels = Tensor::from_slice(&labels).view([2, 9]);
    let mut b = Batch::from_ids_labels(&ids, &labels).unwrap();
    b.weights = b.labels.ne(IGNORE_INDEX).to_kind(Kind::Float);
    b
}

fn logits(m: &LoadedModel, b: &Batch) -> Tensor {
    let live = Live::new(&m.model);
    let p = live.prepare(b, &[]).unwrap();
    p.positions(0, p.len())
        .unwrap()
        .dense()
        .unwrap()
        .shallow_clone()
}

fn f64s(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_kind(Kind::Double);
    (0..t.size()[0])
        .map(|i| Vec::<f64>::try_from(t.get(i)).unwrap())
        .collect()
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = z.iter().map(|x| (x - m).exp()).sum();
    z.iter().map(|x| x - m - s.ln()).collect()
}

/// Two different teachers, weights 1 and 3 (w = ¼, ¾): the ensemble's log-probabilities against
/// the formulas evaluated here in f64 from each teacher's own logits:
///   probability: log Σ_i w_i p_i;   log: log_softmax(Σ_i w_i log p_i)
/// and the shares against mean_n w_i p_i(y_n) / Σ_j w_j p_j(y_n) over the counted positions.
/// Tolerance: the ensemble computes in f32, a handful (< 16) of operations per value, each
/// rounding at 2^-24 relative to magnitudes up to L = max |log p| (and |z|); 16·2^-24·L bounds the
/// absolute error of a log-probability. The shares are probabilities: 16·2^-24·L relative.
#[test]
fn the_combined_distribution_follows_its_formula() {
    let (a, b) = (random(7, 150.0), random(9, 60.0));
    let batch = batch();
    let (za, zb) = (f64s(&logits(&a, &batch)), f64s(&logits(&b, &batch)));
    let w = [0.25, 0.75];
    let labels = Vec::<i64>::try_from(batch.labels.flatten(0, 1)).unwrap();
    for combine in [Combine::Probability, Combine::Log] {
        let shares = RefCell::new(Shares::default());
        let e = Ensemble::new(
            vec![Live::new(&a.model), Live::new(&b.model)],
            &[1.0, 3.0],
            &combine,
            Some(&shares),
        )
        .unwrap();
        let p = e.prepare(&batch, &[]).unwrap();
        let got = f64s(
            &p.positions(0, p.len())
                .unwrap()
                .dense()
                .unwrap()
                .shallow_clone(),
        );
        let (mut share_ref, mut n) = ([0.0f64; 2], 0.0);
        let mut max_l: f64 = 0.0;
        let mut worst: f64 = 0.0;
        for pos in 0..got.len() {
            let (la, lb) = (log_softmax(&za[pos]), log_softmax(&zb[pos]));
            let want: Vec<f64> = match combine {
                Combine::Probability => la
                    .iter()
                    .zip(&lb)
                    .map(|(x, y)| (w[0] * x.exp() + w[1] * y.exp()).ln())
                    .collect(),
                _ => log_softmax(
                    &la.iter()
                        .zip(&lb)
                        .map(|(x, y)| w[0] * x + w[1] * y)
                        .collect::<Vec<_>>(),
                ),
            };
            let have = log_softmax(&got[pos]);
            for (v, (h, r)) in have.iter().zip(&want).enumerate() {
                max_l = max_l
                    .max(r.abs())
                    .max(za[pos][v].abs())
                    .max(zb[pos][v].abs());
                worst = worst.max((h - r).abs());
            }
            let y = labels[pos];
            if y != IGNORE_INDEX {
                let (pa, pb) = (w[0] * la[y as usize].exp(), w[1] * lb[y as usize].exp());
                share_ref[0] += pa / (pa + pb);
                share_ref[1] += pb / (pa + pb);
                n += 1.0;
            }
        }
        let tol = 16.0 * 2f64.powi(-24) * max_l;
        assert!(worst <= tol, "{combine:?}: |Δ log p| = {worst:e} > {tol:e}");
        let got_shares = shares.borrow_mut().take().unwrap().unwrap();
        for i in 0..2 {
            let r = share_ref[i] / n;
            assert!(
                (got_shares[i] - r).abs() <= tol * r.max(1e-30),
                "{combine:?}: share {i}: {} vs {r}",
                got_shares[i]
            );
        }
        // the two distributions differ: the shares are not the weights
        assert!((share_ref[0] / n - 0.25).abs() > 1e-3);
    }
}

/// Identical teachers with unequal weights (1 and 3) give the teacher's distribution up to the
/// rounding of the weighted sum: ¼·z + ¾·z rounds twice (2·2^-24·|z| with the sum), and the
/// probability form adds log ¼ and log ¾ terms (a few 2^-24 of log 4); 16·2^-24·max(|z|, log 4)
/// bounds the difference of log-probabilities.
#[test]
fn identical_teachers_with_any_weights_give_the_teacher() {
    let a = random(7, 150.0);
    let batch = batch();
    let z = f64s(&logits(&a, &batch));
    for combine in [Combine::Probability, Combine::Log] {
        let e = Ensemble::new(
            vec![Live::new(&a.model), Live::new(&a.model)],
            &[1.0, 3.0],
            &combine,
            None,
        )
        .unwrap();
        let p = e.prepare(&batch, &[]).unwrap();
        let got = f64s(
            &p.positions(0, p.len())
                .unwrap()
                .dense()
                .unwrap()
                .shallow_clone(),
        );
        for (g, r) in got.iter().zip(&z) {
            let (g, r2) = (log_softmax(g), log_softmax(r));
            let l = r.iter().fold(4f64.ln(), |m, x| m.max(x.abs()));
            let tol = 16.0 * 2f64.powi(-24) * l;
            for (x, y) in g.iter().zip(&r2) {
                assert!((x - y).abs() <= tol, "{combine:?}: {x} vs {y}");
            }
        }
    }
}

/// per_source: rows of source 0 get teacher b (index 1), rows of source 1 teacher a, exactly
/// (the same logits bit for bit), and each teacher's share is its rows' share of the counted
/// positions.
#[test]
fn per_source_gives_each_row_its_sources_teacher() {
    let (a, b) = (random(7, 150.0), random(9, 60.0));
    let mut batch = batch();
    batch.domains = Some(vec![0, 1]);
    // each teacher's logits over the same chunks (a head over 5 rows may round otherwise than
    // over 18)
    let chunked = |m: &LoadedModel| {
        let live = Live::new(&m.model);
        let p = live.prepare(&batch, &[]).unwrap();
        let c = |s, n| p.positions(s, n).unwrap().dense().unwrap().shallow_clone();
        Tensor::cat(&[c(0, 5), c(5, 13)], 0)
    };
    let (za, zb) = (chunked(&a), chunked(&b));
    let combine = Combine::PerSource(vec![1, 0]);
    let shares = RefCell::new(Shares::default());
    let e = Ensemble::new(
        vec![Live::new(&a.model), Live::new(&b.model)],
        &[1.0, 1.0],
        &combine,
        Some(&shares),
    )
    .unwrap();
    let p = e.prepare(&batch, &[]).unwrap();
    // in two chunks that split the first row, as the step's loss_chunk may
    let first = p.positions(0, 5).unwrap().dense().unwrap().shallow_clone();
    let rest = p.positions(5, 13).unwrap().dense().unwrap().shallow_clone();
    let got = Tensor::cat(&[first, rest], 0);
    assert!(
        got.narrow(0, 0, 9).equal(&zb.narrow(0, 0, 9)),
        "row 0 → teacher b"
    );
    assert!(
        got.narrow(0, 9, 9).equal(&za.narrow(0, 9, 9)),
        "row 1 → teacher a"
    );
    // 8 counted positions per row
    assert_eq!(shares.borrow_mut().take().unwrap().unwrap(), vec![0.5, 0.5]);
    // a batch without sources is refused
    batch.domains = None;
    let err = e.prepare(&batch, &[]).err().unwrap().to_string();
    assert!(err.contains("per_source"), "{err}");
}

/// A run with two sources, each with its own teacher: trains, logs the shares (each source's share
/// of the step's counted positions, from its rows) and each teacher's perplexity at evaluation.
#[test]
fn a_per_source_run_logs_its_teachers() {
    let s = Setup::new();
    let sources = "[teachers]\ncombine = \"per_source\"\n\n[[data.source]]\nname = \"cats\"\ntrain = \"a.txt\"\nteacher = \"b\"\n\n[[data.source]]\nname = \"nums\"\ntrain = \"b.txt\"\nteacher = \"a\"\n";
    let run = s.run_file("ps.toml", "ps", 3, TWO, sources);
    let text = std::fs::read_to_string(&run)
        .unwrap()
        .replace("train = \"a.txt\"\nseq_len", "seq_len");
    std::fs::write(&run, text).unwrap();
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("ps/metrics.jsonl"));
    for r in recs.iter().filter(|r| r["kind"] == "train") {
        let sh: Vec<f64> = r["teacher_shares"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(sh.len(), 2);
        assert!((sh[0] + sh[1] - 1.0).abs() < 1e-12, "{sh:?}");
        // source_rows: [cats, nums]; cats → b (index 1). Full rows of 32 tokens, the last
        // label of each row ignored only at a document's end: the shares follow the rows
        let rows: Vec<f64> = r["source_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let frac_b = rows[0] / (rows[0] + rows[1]);
        assert!((sh[1] - frac_b).abs() < 0.05, "{sh:?} vs rows {rows:?}");
    }
    let ev = recs.iter().rfind(|r| r["kind"] == "eval").unwrap();
    let t = ev["teachers"].as_array().unwrap();
    assert_eq!(t[0]["name"], "a");
    assert_eq!(t[1]["name"], "b");
    assert!(t[0]["ppl"].as_f64().unwrap() != t[1]["ppl"].as_f64().unwrap());
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("ps/run.json")).unwrap()).unwrap();
    assert_eq!(info["teachers"]["combine"], "per_source");
    let md = std::fs::read_to_string(s.path("ps/report.md")).unwrap();
    assert!(
        md.contains("| teacher | weight | share") && md.contains("| b |"),
        "{md}"
    );
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection`
#[cfg(feature = "fault-injection")]
#[test]
fn a_run_killed_with_several_teachers_resumes_bit_identically() {
    let s = Setup::new();
    let full = s.run_file("full.toml", "full", 14, TWO, "");
    train_ok(&["train", full.to_str().unwrap()]);
    let run = s.run_file("killed.toml", "killed", 14, TWO, "");
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
    assert!(reached < 14, "the run finished before the kill");
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    assert!(
        weights(&s.path("killed/student")) == weights(&s.path("full/student")),
        "killed at step {reached}: weights differ"
    );
    let (a, b) = (records(&s.path("full/metrics.jsonl")), records(&metrics));
    for kind in ["train", "eval"] {
        let pick = |recs: &[Value]| -> Vec<Value> {
            let mut seen = std::collections::BTreeMap::new();
            for r in recs.iter().filter(|r| r["kind"] == kind) {
                let mut r = r.clone();
                for k in ["tokens_per_s", "seconds", "peak_rss_mib"] {
                    r.as_object_mut().unwrap().remove(k);
                }
                seen.insert(r["step"].as_u64().unwrap(), r); // a replayed step: its last record
            }
            seen.into_values().collect()
        };
        let (x, y) = (pick(&a), pick(&b));
        assert_eq!(x.len(), y.len(), "{kind} records");
        for (p, q) in x.iter().zip(&y) {
            assert_eq!(p, q, "{kind}");
        }
    }
    // the shares are logged, and differ from the weights (different teachers)
    let r = train_record(&a, 14);
    let sh = r["teacher_shares"].as_array().unwrap();
    assert_eq!(sh.len(), 2);
    assert!((sh[0].as_f64().unwrap() - 0.25).abs() > 1e-3, "{r}");
}

#[test]
fn the_run_file_refuses_what_several_teachers_cannot_do() {
    let s = Setup::new();
    // a teacher whose tokenizer holds another token
    let mut other = random(11, 1.0);
    other.tokenizer =
        Some(Tokenizer::byte_level(&["<|endoftext|>", "<|im_start|>", "<|other|>"]).unwrap());
    other.save_hf(&s.path("alien")).unwrap();
    let sources = "[[data.source]]\nname = \"cats\"\ntrain = \"b.txt\"\n";
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "store",
            format!("{TWO}store = \"st\"\n"),
            vec!["teacher.1.store", "one-teacher key"],
        ),
        (
            "budget",
            format!("{TWO}budget = 0.5\n"),
            vec!["teacher.1.budget", "one-teacher key"],
        ),
        (
            "weight",
            TWO.replace("weight = 3", "weight = 0"),
            vec!["teacher.1.weight", "> 0"],
        ),
        (
            "combine",
            format!("{TWO}\n[teachers]\ncombine = \"max\"\n"),
            vec!["teachers.combine", "probability, log or per_source"],
        ),
        (
            "teachers with one",
            format!("{ONE}\n[teachers]\ncombine = \"log\"\n"),
            vec!["teachers", "[[teacher]]"],
        ),
        (
            "per_source without sources",
            format!("{TWO}\n[teachers]\ncombine = \"per_source\"\n"),
            vec!["teachers.combine", "[[data.source]]"],
        ),
        (
            "duplicate name",
            TWO.replace("\"b\"", "\"a\""),
            vec!["teacher.1.name", "two teachers"],
        ),
        (
            "hidden",
            format!("{TWO}\n[[loss]]\nkind = \"hidden\"\n"),
            vec!["hidden", "several [[teacher]]"],
        ),
        (
            "vocabulary",
            TWO.replace("teacher2", "alien"),
            vec!["teacher.1 (b, path", "alien"],
        ),
    ];
    for (what, teachers, needles) in cases {
        let run = s.run_file("bad.toml", "bad", 2, &teachers, "");
        let out = distill(&["train", run.to_str().unwrap()]);
        eprintln!("{what}: {}", String::from_utf8_lossy(&out.stderr));
        assert_clean_failure(&out, &needles);
    }
    // per_source: a source without a teacher, and an unknown name; a source's teacher without
    // per_source
    let ps = |src_teacher: &str, combine: &str| {
        let run = s.run_file(
            "bad.toml",
            "bad",
            2,
            TWO,
            &format!("[teachers]\ncombine = \"{combine}\"\n\n{sources}{src_teacher}"),
        );
        let text = std::fs::read_to_string(&run)
            .unwrap()
            .replace("train = \"a.txt\"\nseq_len", "seq_len");
        std::fs::write(&run, text).unwrap();
        distill(&["train", run.to_str().unwrap()])
    };
    assert_clean_failure(
        &ps("", "per_source"),
        &["data.source.0.teacher", "name this source's teacher"],
    );
    assert_clean_failure(
        &ps("teacher = \"c\"\n", "per_source"),
        &[
            "data.source.0.teacher",
            "'c' is not a [[teacher]] name",
            "a, b",
        ],
    );
    assert_clean_failure(
        &ps("teacher = \"a\"\n", "log"),
        &["data.source.0.teacher", "per_source"],
    );
    // a store is captured from one teacher
    let run = s.run_file("cap.toml", "cap", 2, TWO, "");
    assert_clean_failure(
        &distill(&[
            "capture",
            run.to_str().unwrap(),
            "--out",
            s.path("st").to_str().unwrap(),
        ]),
        &["distill capture", "2 [[teacher]] tables"],
    );
}
