//! A teacher-query budget (`[teacher] budget, selection, unselected`) end to end on tiny models:
//! the set is exactly ⌈budget·N⌉ sequences, the same for the same seed and another for another
//! seed (`random`); `uncertainty`, `rad` and `kd3` choose the top sequences by their scores,
//! recomputed here in f64 from the models' logits; with `skip` the teacher sees only chosen rows,
//! with `cross_entropy` the rows drawn decide the teacher-row count and an unselected row's loss is
//! its cross-entropy; budget = 1 is the plain run bit for bit; a killed budget run resumes
//! bit-identically; `distill capture --budget` stores the chosen sequences and a store-only run
//! reads them; bad keys are refused naming key and line.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::config::RunConfig;
use distill::data::{self, Sampler, Sequence, IGNORE_INDEX};
use distill::model::{self, LlamaConfig, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const V: usize = 259;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LlamaConfig::tiny(V, 48, 2, 4, 2);
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
        // a teacher sharp enough that its confidence varies between sequences
        save(7, 8.0, "teacher");
        save(8, 12.0, "student");
        let words = [
            "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "zebra", "quixotic",
        ];
        let mut x: u64 = 99;
        let mut text = String::new();
        for i in 0..1200 {
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

    /// A run file; `teacher` extends `[teacher]`, `extra` is appended.
    fn run_file(
        &self,
        name: &str,
        output: &str,
        steps: usize,
        teacher: &str,
        extra: &str,
    ) -> PathBuf {
        let text = format!(
            r#"
[teacher]
path = "teacher"
{teacher}

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
eval_every = 0
checkpoint_every = 4
threads = 2
seed = 3
output = "{output}"

[capture]
coverage = 0.9
max_k = 16
tail_samples = 0
{extra}
"#
        );
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn budget_record(recs: &[Value]) -> Value {
    recs.iter().find(|x| x["kind"] == "budget").unwrap().clone()
}

fn indices(rec: &Value) -> Vec<usize> {
    rec["indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The run's training sequences, read as the run reads them (the student's tokenizer).
fn train_sequences(run: &Path) -> (RunConfig, Vec<Sequence>) {
    let cfg = RunConfig::load(run, &[]).unwrap();
    let student = model::load(&cfg.student_path(), Device::Cpu).unwrap();
    let ds = data::load(&cfg.data, student.tokenizer.as_ref().unwrap(), Some(256)).unwrap();
    (cfg, ds.train)
}

trait StudentPath {
    fn student_path(&self) -> PathBuf;
}
impl StudentPath for RunConfig {
    fn student_path(&self) -> PathBuf {
        match &self.student.init {
            distill::student::StudentInit::Path(p) => p.clone(),
            _ => unreachable!("these runs name a student folder"),
        }
    }
}

/// A model's logits on one sequence, (T, V) as f64 rows, and the largest |logit|.
fn logits_f64(m: &model::LoadedModel, s: &Sequence) -> (Vec<Vec<f64>>, f64) {
    let ids = Tensor::from_slice(&s.ids.iter().map(|&x| x as i64).collect::<Vec<_>>()).unsqueeze(0);
    let l = tch::no_grad(|| m.model.forward(&ids))
        .unwrap()
        .squeeze_dim(0);
    let flat: Vec<f64> = Vec::<f64>::try_from(l.to_kind(Kind::Double).flatten(0, 1)).unwrap();
    let big = flat.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    (flat.chunks(V).map(|c| c.to_vec()).collect(), big)
}

/// softmax in f64.
fn probs(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|a| (a - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// A rule's per-sequence score, written from the formulas in teacher/budget.rs (token weights
/// are 1 on plain text): the mean over target positions.
fn score(rule: &str, s: &[Vec<f64>], t: &[Vec<f64>], labels: &[i64]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (pos, &y) in labels.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        let q = probs(&s[pos]);
        let p = probs(&t[pos]);
        let x = match rule {
            "uncertainty" => -q
                .iter()
                .map(|&a| if a > 0.0 { a * a.ln() } else { 0.0 })
                .sum::<f64>(),
            "rad" => {
                let mut sorted = q.clone();
                sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
                (1.0 - (sorted[0] - sorted[1])) * p[y as usize]
            }
            "kd3" => (0..V).map(|v| 0.5 * (p[v] + q[v])).fold(0.0, f64::max),
            _ => unreachable!(),
        };
        sum += x;
        n += 1;
    }
    sum / n as f64
}

#[test]
fn random_chooses_exactly_its_share_reproducibly_by_seed() {
    let s = Setup::new();
    let budget = "budget = 0.3\nselection = \"random\"";
    let a = s.run_file("a.toml", "a", 1, budget, "");
    let b = s.run_file("b.toml", "b", 1, budget, "");
    let c = s.run_file("c.toml", "c", 1, budget, "");
    let text = std::fs::read_to_string(&c).unwrap();
    std::fs::write(&c, text.replace("seed = 3", "seed = 4")).unwrap();
    for r in [&a, &b, &c] {
        train_ok(&["train", r.to_str().unwrap()]);
    }
    let (_, train) = train_sequences(&a);
    let n = train.len();
    let want = (0.3 * n as f64).ceil() as usize;
    let ra = budget_record(&records(&s.path("a/metrics.jsonl")));
    let rb = budget_record(&records(&s.path("b/metrics.jsonl")));
    let rc = budget_record(&records(&s.path("c/metrics.jsonl")));
    assert_eq!(ra["sequences"], n);
    for r in [&ra, &rb, &rc] {
        let i = indices(r);
        assert_eq!(i.len(), want, "{r}");
        assert!(
            i.windows(2).all(|w| w[0] < w[1]) && i[want - 1] < n,
            "{i:?}"
        );
    }
    assert_eq!(indices(&ra), indices(&rb), "same seed, same set");
    assert_ne!(indices(&ra), indices(&rc), "another seed, another set");
    // the library's count at the edges
    let b = distill::teacher::budget::Budget::resolve(Some(0.3), None, None)
        .unwrap()
        .unwrap();
    assert_eq!(b.count(10), 3);
    assert_eq!(b.count(11), 4);
    assert_eq!(b.count(1), 1);
}

#[test]
fn scored_rules_choose_the_top_sequences_by_their_scores() {
    let s = Setup::new();
    for rule in ["uncertainty", "rad", "kd3"] {
        let run = s.run_file(
            &format!("{rule}.toml"),
            rule,
            1,
            &format!("budget = 0.25\nselection = \"{rule}\""),
            "",
        );
        train_ok(&["train", run.to_str().unwrap()]);
        let rec = budget_record(&records(&s.path(&format!("{rule}/metrics.jsonl"))));
        let (cfg, train) = train_sequences(&run);
        let student = model::load(&cfg.student_path(), Device::Cpu).unwrap();
        let teacher = model::load(cfg.teacher.path.as_ref().unwrap(), Device::Cpu).unwrap();
        let (mut want, mut big, mut max_label_p) = (Vec::new(), 0.0f64, 0.0f64);
        for seq in &train {
            let (sl, bs) = logits_f64(&student, seq);
            let (tl, bt) = logits_f64(&teacher, seq);
            big = big.max(bs).max(bt);
            want.push(score(rule, &sl, &tl, &seq.labels));
            for (pos, &y) in seq.labels.iter().enumerate() {
                if y != IGNORE_INDEX {
                    max_label_p = max_label_p.max(probs(&tl[pos])[y as usize]);
                }
            }
        }
        let logged: Vec<f64> = rec["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        // the run's logits come from batches of 4 in f32: each logit off by a few ε·|z|; a
        // probability moves by at most 2|Δz| of itself, the entropy by |Δz|·(2 + ln V), the
        // products and maxima here by at most 4|Δz|; 64 ε·(|z| + ln V) bounds all of them
        let mut tol = 64.0 * f32::EPSILON as f64 * (big + (V as f64).ln());
        if rule == "rad" {
            // g·c with c = p(y): both errors are multiplied by c (|Δg|·c + g·|Δc|, |Δc| ≤ 2|Δz|·c)
            tol *= max_label_p;
        }
        for (i, (a, b)) in logged.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= tol,
                "{rule}: sequence {i}: {a} vs {b} (tol {tol})"
            );
        }
        let k = (0.25 * train.len() as f64).ceil() as usize;
        let got = indices(&rec);
        assert_eq!(got.len(), k, "{rule}");
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].partial_cmp(&want[a]).unwrap());
        // the chosen are the top k up to scores within the tolerance of the k-th (a near tie
        // may fall either way): every chosen one scores at least the k-th, every other at most
        let kth = want[order[k - 1]];
        for (i, w) in want.iter().enumerate() {
            if got.contains(&i) {
                assert!(
                    *w >= kth - 2.0 * tol,
                    "{rule}: chosen {i} scores {w} < {kth}"
                );
            } else {
                assert!(
                    *w <= kth + 2.0 * tol,
                    "{rule}: left out {i} scores {w} > {kth}"
                );
            }
        }
        let spread = want.iter().fold(0.0f64, |a, x| a.max((x - want[0]).abs()));
        assert!(
            spread > 10.0 * tol,
            "{rule}: spread {spread}, tol {tol}, big {big}"
        );
    }
}

#[test]
fn skip_sends_only_chosen_rows_to_the_teacher() {
    let s = Setup::new();
    let run = s.run_file(
        "skip.toml",
        "skip",
        6,
        "budget = 0.2\nselection = \"random\"\nunselected = \"skip\"",
        "",
    );
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("skip/metrics.jsonl"));
    for step in 1..=6u64 {
        let r = train_record(&recs, step);
        assert_eq!(r["teacher_rows"], 4, "step {step}: {r}");
        assert_eq!(r["teacher_rows_total"], 4 * step, "step {step}");
        assert_eq!(r["unselected_ce"], 0.0);
    }
}

#[test]
fn cross_entropy_asks_the_teacher_for_the_chosen_rows_drawn() {
    let s = Setup::new();
    let run = s.run_file(
        "ce.toml",
        "ce",
        6,
        "budget = 0.3\nselection = \"random\"",
        "",
    );
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("ce/metrics.jsonl"));
    let chosen = indices(&budget_record(&recs));
    let (cfg, train) = train_sequences(&run);
    let mut sampler = Sampler::new(train.len(), cfg.run.seed);
    let (mut total, mut mixed) = (0u64, 0);
    for step in 1..=6u64 {
        let rows = sampler.next_batch(4);
        let asked = rows.iter().filter(|r| chosen.contains(r)).count() as u64;
        total += asked;
        let r = train_record(&recs, step);
        assert_eq!(r["teacher_rows"], asked, "step {step}: {r}");
        assert_eq!(r["teacher_rows_total"], total, "step {step}");
        assert_eq!(
            r["unselected_ce"].as_f64().unwrap() > 0.0,
            asked < 4,
            "step {step}: {r}"
        );
        mixed += usize::from(asked > 0 && asked < 4);
    }
    assert!(mixed > 0, "no micro-batch mixed chosen and unselected rows");
}

#[test]
fn an_unselected_rows_loss_is_its_cross_entropy() {
    let s = Setup::new();
    let run = s.run_file(
        "one.toml",
        "one",
        1,
        "budget = 0.1\nselection = \"random\"",
        "",
    );
    let text = std::fs::read_to_string(&run).unwrap();
    std::fs::write(&run, text.replace("micro_batch = 4", "micro_batch = 1")).unwrap();
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("one/metrics.jsonl"));
    let chosen = indices(&budget_record(&recs));
    let (cfg, train) = train_sequences(&run);
    let row = Sampler::new(train.len(), cfg.run.seed).next_batch(1)[0];
    assert!(
        !chosen.contains(&row),
        "step 1's row {row} is chosen: pick another seed"
    );
    let r = train_record(&recs, 1);
    assert_eq!(r["teacher_rows"], 0);
    let student = model::load(&cfg.student_path(), Device::Cpu).unwrap();
    let seq = &train[row];
    let (sl, big) = logits_f64(&student, seq);
    let (mut sum, mut n) = (0.0, 0usize);
    for (pos, &y) in seq.labels.iter().enumerate() {
        if y != IGNORE_INDEX {
            sum -= probs(&sl[pos])[y as usize].ln();
            n += 1;
        }
    }
    let want = sum / n as f64;
    let logged = r["loss"].as_f64().unwrap();
    // f32 log-softmax: each log-probability off by a few ε·(|z| + ln V)
    let tol = 16.0 * f32::EPSILON as f64 * (big + (V as f64).ln());
    assert!(
        (logged - want).abs() <= tol,
        "{logged} vs {want} (tol {tol})"
    );
    assert_eq!(r["unselected_ce"], r["loss"]);
    // the objective's own term saw nothing
    assert_eq!(r["forward_kl"], 0.0);
}

#[test]
fn a_mixed_micro_batch_is_the_token_weighted_sum_of_its_parts() {
    let s = Setup::new();
    let run = s.run_file(
        "mix.toml",
        "mix",
        1,
        "budget = 0.5\nselection = \"random\"",
        "",
    );
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("mix/metrics.jsonl"));
    let chosen = indices(&budget_record(&recs));
    let (cfg, train) = train_sequences(&run);
    let rows = Sampler::new(train.len(), cfg.run.seed).next_batch(4);
    let sel: Vec<usize> = rows
        .iter()
        .copied()
        .filter(|r| chosen.contains(r))
        .collect();
    assert!(
        !sel.is_empty() && sel.len() < 4,
        "step 1's rows {rows:?} are not mixed: pick another seed"
    );
    let student = model::load(&cfg.student_path(), Device::Cpu).unwrap();
    let teacher = model::load(cfg.teacher.path.as_ref().unwrap(), Device::Cpu).unwrap();
    // Σ over each part's tokens of KL(p‖q) (chosen rows) or −log q(y) (the others), in f64
    let (mut kl, mut n_sel, mut ce, mut n_un, mut big) = (0.0, 0usize, 0.0, 0usize, 0.0f64);
    for &r in &rows {
        let seq = &train[r];
        let (sl, bs) = logits_f64(&student, seq);
        let (tl, bt) = logits_f64(&teacher, seq);
        big = big.max(bs).max(bt);
        for (pos, &y) in seq.labels.iter().enumerate() {
            if y == IGNORE_INDEX {
                continue;
            }
            let q = probs(&sl[pos]);
            if chosen.contains(&r) {
                let p = probs(&tl[pos]);
                kl += (0..V).map(|v| p[v] * (p[v].ln() - q[v].ln())).sum::<f64>();
                n_sel += 1;
            } else {
                ce -= q[y as usize].ln();
                n_un += 1;
            }
        }
    }
    let n = (n_sel + n_un) as f64;
    // each part's mean times its share of the micro-batch's tokens: the sums over all tokens
    let (want_kl, want_ce) = (kl / n, ce / n);
    let r = train_record(&recs, 1);
    assert_eq!(r["teacher_rows"], sel.len());
    let tol = 16.0 * f32::EPSILON as f64 * (big + (V as f64).ln());
    let got_kl = r["forward_kl"].as_f64().unwrap();
    let got_ce = r["unselected_ce"].as_f64().unwrap();
    let got = r["loss"].as_f64().unwrap();
    assert!(
        (got_kl - want_kl).abs() <= tol,
        "KL part {got_kl} vs {want_kl} (tol {tol})"
    );
    assert!(
        (got_ce - want_ce).abs() <= tol,
        "CE part {got_ce} vs {want_ce} (tol {tol})"
    );
    assert!(
        (got - want_kl - want_ce).abs() <= 2.0 * tol,
        "{got} vs {}",
        want_kl + want_ce
    );
}

#[test]
fn budget_one_is_the_plain_run_bit_for_bit() {
    let s = Setup::new();
    let plain = s.run_file("plain.toml", "plain", 5, "", "");
    let all = s.run_file(
        "all.toml",
        "all",
        5,
        "budget = 1\nselection = \"uncertainty\"",
        "",
    );
    train_ok(&["train", plain.to_str().unwrap()]);
    train_ok(&["train", all.to_str().unwrap()]);
    assert_eq!(
        weights(&s.path("plain/student")),
        weights(&s.path("all/student"))
    );
    let (a, b) = (
        records(&s.path("plain/metrics.jsonl")),
        records(&s.path("all/metrics.jsonl")),
    );
    for step in 1..=5 {
        let (x, y) = (train_record(&a, step), train_record(&b, step));
        assert_eq!(x["loss"], y["loss"], "step {step}");
        assert_eq!(y["teacher_rows"], 4);
    }
}

#[test]
fn capture_with_a_budget_stores_the_chosen_sequences_and_a_store_run_reads_them() {
    let s = Setup::new();
    let cap = s.run_file("cap.toml", "cap", 4, "store = \"store\"", "");
    let out = distill(&[
        "capture",
        cap.to_str().unwrap(),
        "--budget",
        "0.3",
        "--selection",
        "kd3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, train) = train_sequences(&cap);
    let k = (0.3 * train.len() as f64).ceil() as usize;
    let store = distill::teacher::Store::open(&s.path("store")).unwrap();
    assert_eq!(
        store.len(),
        4 + k,
        "the validation sequences and the chosen ones"
    );
    // a store-only run with the same budget and rule reads the store's set
    let text = std::fs::read_to_string(&cap).unwrap().replace(
        "path = \"teacher\"\nstore",
        "budget = 0.3\nselection = \"kd3\"\nstore",
    );
    let run = s.path("onstore.toml");
    std::fs::write(&run, text.replace("\"cap\"", "\"onstore\"")).unwrap();
    train_ok(&["train", run.to_str().unwrap()]);
    let rec = budget_record(&records(&s.path("onstore/metrics.jsonl")));
    assert_eq!(rec["from"], "store");
    let set: distill::teacher::budget::BudgetState =
        serde_json::from_slice(&std::fs::read(s.path("store/budget.json")).unwrap()).unwrap();
    assert_eq!(indices(&rec), set.chosen);
    // without the store's set, kd3 needs the teacher model
    let other = std::fs::read_to_string(&run)
        .unwrap()
        .replace("budget = 0.3", "budget = 0.4")
        .replace("\"onstore\"", "\"other\"");
    let run2 = s.path("other.toml");
    std::fs::write(&run2, other).unwrap();
    assert_clean_failure(
        &distill(&["train", run2.to_str().unwrap()]),
        &["teacher.selection", "kd3", "teacher.path"],
    );
}

#[test]
fn the_run_file_refuses_bad_budget_keys() {
    let s = Setup::new();
    let bad = |teacher: &str, extra: &str, needles: &[&str]| {
        let run = s.run_file("bad.toml", "bad", 4, teacher, extra);
        let out = distill(&["train", run.to_str().unwrap()]);
        assert_clean_failure(&out, needles);
    };
    bad(
        "budget = 0",
        "",
        &["bad.toml:4", "teacher.budget", "(0, 1]"],
    );
    bad("budget = 1.5", "", &["bad.toml:4", "teacher.budget"]);
    bad(
        "selection = \"entropy\"",
        "",
        &["bad.toml:4", "teacher.selection", "entropy", "rad"],
    );
    bad(
        "unselected = \"drop\"",
        "",
        &["bad.toml:4", "teacher.unselected", "skip"],
    );
    bad(
        "budget = 0.5",
        "[onpolicy]\nfraction = 0.5\n",
        &["teacher.budget", "onpolicy"],
    );
    assert!(!s.path("bad").exists(), "nothing written");
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection`
#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_budget_run_resumes_bit_identically() {
    let s = Setup::new();
    let budget = "budget = 0.3\nselection = \"rad\"";
    let full = s.run_file("full.toml", "full", 12, budget, "");
    train_ok(&["train", full.to_str().unwrap()]);
    let run = s.run_file("killed.toml", "killed", 12, budget, "");
    let metrics = s.path("killed/metrics.jsonl");
    let mut child = spawn_train(&run, &[("DISTILL_FAULT_STEP_DELAY_MS", "80")]);
    let t = Instant::now();
    while last_step(&metrics) < 6 {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let reached = last_step(&metrics);
    assert!(reached < 12, "the run finished before the kill");
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    assert_eq!(
        weights(&s.path("killed/student")),
        weights(&s.path("full/student")),
        "killed at step {reached}: weights differ"
    );
    let (a, b) = (records(&s.path("full/metrics.jsonl")), records(&metrics));
    for step in 1..=12 {
        let (x, y) = (train_record(&a, step), train_record(&b, step));
        assert_eq!(x["loss"], y["loss"], "step {step}");
        assert_eq!(
            x["teacher_rows_total"], y["teacher_rows_total"],
            "step {step}"
        );
    }
    assert_eq!(
        b.iter().filter(|r| r["kind"] == "budget").count(),
        1,
        "the selection is recorded once"
    );
}
