//! DisWOT ranking (`distill::student::diswot`, `distill rank-students`): the scores against the
//! formula written plainly here in f64 on the models' own hidden states and logits, students of
//! other depths and widths included; the identities the formula implies (the teacher against
//! itself scores exactly 0; a copy of the teacher with its hidden channels permuted scores 0 up to
//! rounding; the windows' order and the features' scale change nothing); the command's ranking
//! against the library; and bad candidates refused in one line that names them.
mod common;
use common::*;
use distill::model::{self, Llama, LlamaConfig, LoadedModel, Tokenizer};
use distill::prune_width::{self, WidthSpec};
use distill::student::{self, diswot, Calibration};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const VOCAB: usize = 259;

/// A tiny random teacher: 4 layers, hidden 32, a byte-level tokenizer; norm weights away from 1.
fn teacher() -> LoadedModel {
    let mut cfg = LlamaConfig::tiny(VOCAB, 32, 4, 4, 2);
    cfg.eos_token_ids = vec![256];
    let mut m = model::random(&cfg, Device::Cpu, 41).unwrap();
    tch::manual_seed(42);
    tch::no_grad(|| {
        for (name, mut v) in m.vs.variables() {
            if name.ends_with("norm.weight") {
                v.copy_(&(Tensor::rand(v.size(), (Kind::Float, Device::Cpu)) + 0.5));
            }
        }
    });
    m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
    m
}

/// Deterministic pseudo-text.
fn text(words: usize) -> String {
    let vocab = [
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "in", "rain",
    ];
    let mut x: u64 = 99;
    let mut t = String::new();
    for i in 0..words {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        t += vocab[(x >> 33) as usize % vocab.len()];
        t += if i % 9 == 8 { ".\n" } else { " " };
    }
    t
}

/// 6 windows of 16 tokens of the pseudo-text.
fn windows() -> Vec<Vec<u32>> {
    let tok = Tokenizer::byte_level(SPECIALS).unwrap();
    let ids = tok.encode(&text(60), false).unwrap();
    let w: Vec<Vec<u32>> = ids.chunks(16).take(6).map(<[u32]>::to_vec).collect();
    assert!(w.iter().all(|x| x.len() == 16) && w.len() == 6);
    w
}

/// A model of another width, at random, with the teacher's tokenizer.
fn stranger(hidden: usize, seed: i64) -> LoadedModel {
    let mut m = model::random(
        &LlamaConfig::tiny(VOCAB, hidden, 2, 4, 2),
        Device::Cpu,
        seed,
    )
    .unwrap();
    m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
    m
}

// ---------------------------------------------------------------- the reference, plainly

/// A model's hidden states (the head's input) and logits on each window, as f64 from the model's
/// f32: the same calls on the same windows as `measure` makes (one window at a time).
struct Raw {
    h: Vec<Vec<Vec<f64>>>,
    logits: Vec<Vec<Vec<f64>>>,
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_kind(Kind::Double);
    let (n, m) = (t.size()[0], t.size()[1]);
    let flat = Vec::<f64>::try_from(t.flatten(0, -1)).unwrap();
    (0..n as usize)
        .map(|i| flat[i * m as usize..(i + 1) * m as usize].to_vec())
        .collect()
}

fn raw(m: &Llama, windows: &[Vec<u32>]) -> Raw {
    let (mut h, mut logits) = (vec![], vec![]);
    tch::no_grad(|| {
        for w in windows {
            let ids: Vec<i64> = w.iter().map(|&x| x as i64).collect();
            let x = m
                .forward_hidden(&Tensor::from_slice(&ids).unsqueeze(0))
                .unwrap();
            logits.push(rows(&m.head(&x).unwrap().squeeze_dim(0)));
            h.push(rows(&x.squeeze_dim(0)));
        }
    });
    Raw { h, logits }
}

/// rownorm(X·Xᵀ)
fn gram(x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let q: Vec<Vec<f64>> = x
        .iter()
        .map(|a| {
            x.iter()
                .map(|b| a.iter().zip(b).map(|(u, v)| u * v).sum())
                .collect()
        })
        .collect();
    q.iter()
        .map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            r.iter().map(|v| v / n).collect()
        })
        .collect()
}

/// ‖G − G'‖²_F / n²
fn dist(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let n = a.len() as f64;
    let mut s = 0.0;
    for (x, y) in a.iter().zip(b) {
        for (u, v) in x.iter().zip(y) {
            s += (u - v) * (u - v);
        }
    }
    s / (n * n)
}

/// log softmax over the first `width` entries.
fn log_softmax(x: &[f64], width: usize) -> Vec<f64> {
    let x = &x[..width];
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

/// (relation matrix over windows, semantic matrix over classes, Σ CE, positions), from the
/// module comment's formula.
fn reference_matrices(
    r: &Raw,
    windows: &[Vec<u32>],
    classes: &[i64],
    width: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>, f64, usize) {
    let a: Vec<Vec<f64>> = r.h.iter().map(|w| w.concat()).collect();
    let d = r.h[0][0].len();
    let mut e = vec![vec![0.0; d]; classes.len()];
    let (mut nll, mut n) = (0.0, 0);
    for (b, w) in windows.iter().enumerate() {
        for t in 0..w.len() - 1 {
            let y = w[t + 1] as usize;
            let lp = log_softmax(&r.logits[b][t], width);
            nll -= lp[y];
            n += 1;
            for (k, &c) in classes.iter().enumerate() {
                let resid = lp[c as usize].exp() - if c as usize == y { 1.0 } else { 0.0 };
                for (ei, hi) in e[k].iter_mut().zip(&r.h[b][t]) {
                    *ei += resid * hi;
                }
            }
        }
    }
    (gram(&a), gram(&e), nll, n)
}

/// (d_sem, d_rel, the student's calibration perplexity)
fn reference(
    t: &Raw,
    s: &Raw,
    windows: &[Vec<u32>],
    classes: &[i64],
    width: usize,
) -> (f64, f64, f64) {
    let (rt, st, _, _) = reference_matrices(t, windows, classes, width);
    let (rs, ss, nll, n) = reference_matrices(s, windows, classes, width);
    (dist(&st, &ss), dist(&rt, &rs), (nll / n as f64).exp())
}

/// Ours and the reference compute in f64 from the same f32 hidden states and logits; they differ
/// only by f64 summation order: a Gram entry sums T·d ≤ 16·32 = 512 products (relative error
/// ≤ 512·1.1e-16 of the sum of magnitudes, which the row normalisation maps to ≤ 1 — allow 1e3 for
/// cancellation: 6e-11 per entry), and d, a mean of squared differences of entries within [−1, 1],
/// moves by at most 4·that. 1e-9 is above it and far below any difference between students.
const TOL: f64 = 1e-9;

// ---------------------------------------------------------------- tests

#[test]
fn classes_are_the_most_frequent_labels() {
    // labels (positions 1..): 5×3, 7×3, 2×2, 9×1, 4×1; the first token of each window is no label
    let w = vec![vec![1, 5, 7, 5, 2], vec![8, 7, 9, 5, 7], vec![6, 2, 4]];
    assert_eq!(diswot::classes(&w, 2), vec![5, 7]);
    // a tie at the cut: the lower id (4 over 9)
    assert_eq!(diswot::classes(&w, 4), vec![2, 4, 5, 7]);
    assert_eq!(diswot::classes(&w, 99), vec![2, 4, 5, 7, 9]);
    // against a plain count on the test windows
    let w = windows();
    let mut count: HashMap<u32, usize> = HashMap::new();
    for x in &w {
        for &y in &x[1..] {
            *count.entry(y).or_default() += 1;
        }
    }
    let c = diswot::classes(&w, 8);
    assert_eq!(c.len(), 8);
    let least_in = c.iter().map(|&i| count[&(i as u32)]).min().unwrap();
    for (&id, &n) in &count {
        if !c.contains(&(id as i64)) {
            // left out: seen less often than every chosen label, or as often and of a higher id
            // than each chosen label seen that often
            let tied_lower = c.iter().all(|&i| count[&(i as u32)] > n || (i as u32) < id);
            assert!(
                n < least_in || (n == least_in && tied_lower),
                "label {id} ({n}×)"
            );
        }
    }
}

#[test]
fn scores_match_a_plain_f64_reference() {
    let t = teacher();
    let w = windows();
    let classes = diswot::classes(&w, 8);
    let narrow = {
        let c = &t.model.config;
        let spec = WidthSpec::resolve(c, Some(16), None, None, None).unwrap();
        let ids: Vec<Vec<i64>> = w
            .iter()
            .map(|x| x.iter().map(|&i| i as i64).collect())
            .collect();
        prune_width::prune(&t, &spec, &prune_width::importance(&t.model, &ids).unwrap()).unwrap()
    };
    let students: Vec<(&str, LoadedModel)> = vec![
        (
            "layers 0, 3",
            student::from_teacher_layers(&t, &[0, 3], Device::Cpu).unwrap(),
        ),
        (
            "layers 1, 2, 3",
            student::from_teacher_layers(&t, &[1, 2, 3], Device::Cpu).unwrap(),
        ),
        ("hidden 16 by importance", narrow),
        ("random, hidden 24", stranger(24, 7)),
    ];
    let rt = raw(&t.model, &w);
    for width in [VOCAB, 200] {
        let mt = diswot::measure(&t.model, &w, &classes, width).unwrap();
        for (name, s) in &students {
            let ms = diswot::measure(&s.model, &w, &classes, width).unwrap();
            let got = diswot::score(&mt, &ms).unwrap();
            let (sem, rel, ppl) = reference(&rt, &raw(&s.model, &w), &w, &classes, width);
            assert!(
                (got.semantic - sem).abs() < TOL,
                "{name}, width {width}: d_sem {} vs {sem}",
                got.semantic
            );
            assert!(
                (got.relation - rel).abs() < TOL,
                "{name}, width {width}: d_rel {} vs {rel}",
                got.relation
            );
            assert!(
                (got.ppl / ppl - 1.0).abs() < TOL,
                "{name}: ppl {} vs {ppl}",
                got.ppl
            );
            assert_eq!(got.score, -(got.semantic + got.relation));
            // the differences are real, far above the tolerance
            assert!(sem > 1e-4 && rel > 1e-6, "{name}: d_sem {sem}, d_rel {rel}");
        }
    }
}

#[test]
fn the_teacher_against_itself_scores_zero() {
    let t = teacher();
    let w = windows();
    let classes = diswot::classes(&w, 8);
    let mt = diswot::measure(&t.model, &w, &classes, VOCAB).unwrap();
    let again = diswot::measure(&t.model, &w, &classes, VOCAB).unwrap();
    let s = diswot::score(&mt, &again).unwrap();
    assert_eq!((s.score, s.semantic, s.relation), (0.0, 0.0, 0.0));
    assert_eq!(s.ppl, mt.ppl());
    // a copy made of all its layers is the teacher
    let all = student::from_teacher_layers(&t, &[0, 1, 2, 3], Device::Cpu).unwrap();
    let m = diswot::measure(&all.model, &w, &classes, VOCAB).unwrap();
    assert_eq!(diswot::score(&mt, &m).unwrap().score, 0.0);
    // the matrices: rows of unit length, symmetric Gram before the row scaling
    for g in [&mt.relation, &mt.semantic] {
        let norms = g
            .square()
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-12);
    }
    assert_eq!(mt.relation.size(), vec![6, 6]);
    assert_eq!(mt.semantic.size(), vec![8, 8]);
}

/// The teacher with its hidden channels permuted (every weight's hidden side, the norms, the
/// embedding and head columns): the same function in another basis.
fn permuted(t: &LoadedModel) -> LoadedModel {
    let c = &t.model.config;
    let d = c.hidden_size as i64;
    let perm = Tensor::randperm(d, (Kind::Int64, Device::Cpu));
    let p = model::random(c, Device::Cpu, 0).unwrap();
    let src = t.vs.variables();
    tch::no_grad(|| {
        for (name, mut v) in p.vs.variables() {
            let x = &src[&name];
            // norms (d), o_proj and down_proj (d, ·): the hidden side is the rows
            let rows = ["norm.weight", "o_proj.weight", "down_proj.weight"];
            let y = if rows.iter().any(|r| name.ends_with(r)) {
                x.index_select(0, &perm)
            } else {
                // embed_tokens, q/k/v, gate/up: the hidden side is the columns
                assert_eq!(x.size()[1], d, "{name}");
                x.index_select(1, &perm)
            };
            v.copy_(&y);
        }
    });
    LoadedModel {
        tokenizer: t.tokenizer.clone(),
        ..p
    }
}

#[test]
fn permuted_hidden_channels_score_as_the_teacher() {
    tch::manual_seed(5);
    let t = teacher();
    let p = permuted(&t);
    let w = windows();
    let classes = diswot::classes(&w, 8);
    let mt = diswot::measure(&t.model, &w, &classes, VOCAB).unwrap();
    let s = diswot::score(
        &mt,
        &diswot::measure(&p.model, &w, &classes, VOCAB).unwrap(),
    )
    .unwrap();
    // the forward differs by f32 rounding only (sums in another order): hidden states and
    // probabilities within ~1e-5 relative; allowing even 1e-3 per matrix entry (cancellation in
    // the class sums), each d is a mean of squares ≤ (1e-3)² = 1e-6
    assert!(s.semantic < 1e-6 && s.relation < 1e-6, "{s:?}");
    assert!((s.ppl / mt.ppl() - 1.0).abs() < 1e-4, "{s:?}");
    // while a real difference scores far below
    let cut = student::from_teacher_layers(&t, &[0, 3], Device::Cpu).unwrap();
    let c = diswot::score(
        &mt,
        &diswot::measure(&cut.model, &w, &classes, VOCAB).unwrap(),
    )
    .unwrap();
    assert!(c.score < -1e-3, "{c:?}");
}

#[test]
fn window_order_and_feature_scale_change_nothing() {
    let t = teacher();
    let s = stranger(24, 9);
    let w = windows();
    let classes = diswot::classes(&w, 8);
    let score = |w: &[Vec<u32>]| {
        let mt = diswot::measure(&t.model, w, &classes, VOCAB).unwrap();
        diswot::score(&mt, &diswot::measure(&s.model, w, &classes, VOCAB).unwrap()).unwrap()
    };
    // the windows in another order: the relation matrices permuted alike on both sides, the class
    // sums taken in another order (each window's forward is the same: one at a time)
    let a = score(&w);
    let mut rev = w.clone();
    rev.reverse();
    rev.swap(0, 2);
    let b = score(&rev);
    assert!((a.semantic - b.semantic).abs() < TOL && (a.relation - b.relation).abs() < TOL);
    assert!((a.ppl / b.ppl - 1.0).abs() < TOL);
    // features scaled: the row normalisation removes it
    tch::manual_seed(3);
    let x = Tensor::randn([5, 40], (Kind::Double, Device::Cpu));
    let g = diswot::relation_matrix(&x).unwrap();
    let g3 = diswot::relation_matrix(&(&x * 3.5)).unwrap();
    assert!((&g - &g3).abs().max().double_value(&[]) < 1e-14);
    // rotated features (an orthogonal Q: what a permuted or rotated hidden basis gives) and the
    // samples permuted on both sides
    let (q, _) = Tensor::linalg_qr(
        &Tensor::randn([40, 40], (Kind::Double, Device::Cpu)),
        "reduced",
    );
    let gq = diswot::relation_matrix(&x.matmul(&q)).unwrap();
    assert!((&g - &gq).abs().max().double_value(&[]) < 1e-13);
    let y = Tensor::randn([5, 7], (Kind::Double, Device::Cpu));
    let h = diswot::relation_matrix(&y).unwrap();
    let perm = Tensor::from_slice(&[3i64, 0, 4, 1, 2]);
    let pp = |m: &Tensor| m.index_select(0, &perm).index_select(1, &perm);
    let d = diswot::distance(&g, &h).unwrap();
    assert!((diswot::distance(&pp(&g), &pp(&h)).unwrap() - d).abs() < 1e-15);
    assert!(d > 0.0);
    assert_eq!(diswot::distance(&g, &g).unwrap(), 0.0);
    assert!(diswot::distance(&g, &Tensor::zeros([4, 4], (Kind::Double, Device::Cpu))).is_err());
}

// ---------------------------------------------------------------- the command

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        teacher().save_hf(&dir.path().join("teacher")).unwrap();
        std::fs::write(dir.path().join("calib.txt"), text(300)).unwrap();
        Dir { dir }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_string()
    }
}

#[test]
fn command_ranks_best_first_as_the_library_scores() {
    let d = Dir::new();
    stranger(24, 3).save_hf(&d.p("narrow")).unwrap();
    let cands = [
        "layers:0,3",
        "keep:2",
        "width:16",
        "narrow_PATH",
        "teacher_PATH",
        "layers:3,2,1",
    ];
    let args = |json: bool| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--threads".into(),
            "1".into(),
            "rank-students".into(),
            d.s("teacher"),
        ];
        a.extend(cands.iter().map(|c| match *c {
            "narrow_PATH" => d.s("narrow"),
            "teacher_PATH" => d.s("teacher"),
            c => c.to_string(),
        }));
        a.extend(
            [
                "--data",
                &d.s("calib.txt"),
                "--sequences",
                "5",
                "--seq-len",
                "16",
                "--classes",
                "6",
            ]
            .map(String::from),
        );
        if json {
            a.push("--json".into());
        }
        a
    };
    let run = |a: Vec<String>| distill(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(args(true));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = r["candidates"].as_array().unwrap();
    assert_eq!(rows.len(), cands.len());
    assert_eq!(r["sequences"], 5);
    assert_eq!(r["classes"].as_array().unwrap().len(), 6);
    // best first, ranks 1..; the teacher itself first with 0
    let scores: Vec<f64> = rows.iter().map(|x| x["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|p| p[0] >= p[1]), "{scores:?}");
    assert_eq!(rows[0]["candidate"], d.s("teacher"));
    assert_eq!(scores[0], 0.0);
    for (i, x) in rows.iter().enumerate() {
        assert_eq!(x["rank"], i + 1);
    }
    // the library on the same windows
    tch::set_num_threads(1);
    let t = model::load(&d.p("teacher"), Device::Cpu).unwrap();
    let cal = Calibration {
        path: d.p("calib.txt"),
        sequences: 5,
        seq_len: 16,
    };
    let w = cal
        .windows(t.tokenizer.as_ref().unwrap(), model::eos_id(&t))
        .unwrap();
    let w = diswot::full_windows(w, 16).unwrap();
    let classes = diswot::classes(&w, 6);
    assert_eq!(serde_json::to_value(&classes).unwrap(), r["classes"]);
    let mt = diswot::measure(&t.model, &w, &classes, VOCAB).unwrap();
    assert!((r["teacher_ppl"].as_f64().unwrap() / mt.ppl() - 1.0).abs() < 1e-12);
    let keep = student::prune::prune(
        &t.model,
        &w,
        &student::PruneOptions {
            keep: 2,
            strategy: student::prune::DEFAULT_STRATEGY,
            keep_ends: true,
        },
    )
    .unwrap()
    .kept;
    let row = |name: &str| rows.iter().find(|x| x["candidate"] == name).unwrap();
    assert_eq!(row("keep:2")["layers"], serde_json::json!(keep));
    assert_eq!(row("layers:3,2,1")["layers"], serde_json::json!([3, 2, 1]));
    assert_eq!(row("width:16")["hidden_size"], 16);
    assert_eq!(row(&d.s("narrow"))["hidden_size"], 24);
    for (name, layers) in [
        ("layers:0,3", vec![0, 3]),
        ("keep:2", keep.clone()),
        ("layers:3,2,1", vec![3, 2, 1]),
    ] {
        let s = student::from_teacher_layers(&t, &layers, Device::Cpu).unwrap();
        let want = diswot::score(
            &mt,
            &diswot::measure(&s.model, &w, &classes, VOCAB).unwrap(),
        )
        .unwrap();
        let got = row(name);
        assert!(
            (got["score"].as_f64().unwrap() - want.score).abs() < 1e-12,
            "{name}: {got} vs {want:?}"
        );
        assert!(
            (got["semantic"].as_f64().unwrap() - want.semantic).abs() < 1e-12,
            "{name}"
        );
        assert_eq!(got["num_layers"], layers.len());
    }
    // the table: one line per candidate, in the same order
    let out = run(args(false));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{table}");
    let lines: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_start().starts_with(char::is_numeric))
        .collect();
    assert_eq!(lines.len(), cands.len(), "{table}");
    for (l, x) in lines.iter().zip(rows) {
        assert!(l.contains(x["candidate"].as_str().unwrap()), "{table}");
    }
    assert!(
        table.contains(&format!("keep:2 = layers {keep:?}")),
        "{table}"
    );
}

#[test]
fn bad_candidates_are_named() {
    let d = Dir::new();
    // a student whose tokenizer has other special tokens
    let mut other = stranger(32, 4);
    other.tokenizer = Some(Tokenizer::byte_level(&["<s>", "</s>", "<pad>"]).unwrap());
    other.save_hf(&d.p("other-tokens")).unwrap();
    let rank = |cands: &[&str], extra: &[&str]| {
        let mut a = vec!["rank-students".to_string(), d.s("teacher")];
        a.extend(cands.iter().map(|s| s.to_string()));
        a.extend(
            [
                "--data",
                &d.s("calib.txt"),
                "--sequences",
                "4",
                "--seq-len",
                "16",
            ]
            .map(String::from),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        distill(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let missing = d.s("no-such-student");
    assert_clean_failure(
        &rank(&["layers:0", &missing], &[]),
        &[&format!("candidate '{missing}'"), "no such"],
    );
    let other_s = d.s("other-tokens");
    assert_clean_failure(
        &rank(&["layers:0", &other_s], &[]),
        &[&format!("candidate '{other_s}'"), "tokenizer", "differs"],
    );
    assert_clean_failure(
        &rank(&["layers:0,9"], &[]),
        &["candidate 'layers:0,9'", "layer 9", "0..3"],
    );
    assert_clean_failure(
        &rank(&["layers:0,x"], &[]),
        &["candidate 'layers:0,x'", "'x'"],
    );
    assert_clean_failure(&rank(&["layers:"], &[]), &["candidate 'layers:'"]);
    assert_clean_failure(
        &rank(&["keep:0"], &[]),
        &["candidate 'keep:0'", "at least one layer"],
    );
    assert_clean_failure(&rank(&["keep:4"], &[]), &["candidate 'keep:4'", "4 layers"]);
    assert_clean_failure(
        &rank(&["width:64"], &[]),
        &["candidate 'width:64'", "1..=32"],
    );
    // the run's own inputs
    assert_clean_failure(
        &rank(&["layers:0"], &["--sequences", "1"]),
        &["--sequences"],
    );
    std::fs::write(d.p("short.txt"), "the cat").unwrap();
    let mut a = vec![
        "rank-students".to_string(),
        d.s("teacher"),
        "layers:0".into(),
    ];
    a.extend(["--data", &d.s("short.txt")].map(String::from));
    assert_clean_failure(
        &distill(&a.iter().map(String::as_str).collect::<Vec<_>>()),
        &["--data", "at least 2"],
    );
    let mut a = vec![
        "rank-students".to_string(),
        d.s("teacher"),
        "layers:0".into(),
    ];
    a.extend(["--data", &d.s("calib.txt"), "--seq-len", "100000"].map(String::from));
    assert_clean_failure(
        &distill(&a.iter().map(String::as_str).collect::<Vec<_>>()),
        &["--seq-len", "context"],
    );
    let out = distill(&[
        "rank-students",
        &d.s("teacher"),
        "--data",
        &d.s("calib.txt"),
    ]);
    assert_clean_failure(&out, &["no candidates"]);
}
