//! Choosing a student's layers by similarity (`distill prune`, `from_teacher = { keep = … }`): the
//! angular distances against transformers' hidden states, each strategy's choice against the
//! reference scores, a pruned student's logits against transformers' model cut to the same layers,
//! the run-file form (chosen layers in run.json and in the fingerprint), and the errors.
mod common;
use common::*;
use distill::model::{self, LlamaConfig, LoadedModel, Tokenizer};
use distill::student::{self, prune, PruneOptions, Strategy};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const LAYERS: usize = 6;

/// A tiny random teacher of 6 layers with a byte-level tokenizer, in which layers 2 and 3 barely
/// touch the residual stream (their output projections scaled by 1e-3), so that the run {2, 3} is
/// the clear choice of two layers to remove.
fn teacher() -> LoadedModel {
    let mut cfg = LlamaConfig::tiny(259, 32, LAYERS, 4, 2);
    cfg.eos_token_ids = vec![256];
    let mut m = model::random(&cfg, Device::Cpu, 31).unwrap();
    tch::no_grad(|| {
        for (name, mut v) in m.vs.variables() {
            let quiet = ["model.layers.2.", "model.layers.3."]
                .iter()
                .any(|p| name.starts_with(p));
            if quiet && (name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight")) {
                let _ = v.f_mul_scalar_(1e-3).unwrap();
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
    let mut x: u64 = 777;
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

/// Windows of token ids, the last one shorter (as calibration text gives them).
fn windows() -> Vec<Vec<u32>> {
    [16usize, 16, 7]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| ((11 * i + 5 * k + 3) % 259) as u32)
                .collect()
        })
        .collect()
}

/// transformers' d(i, j), i, j ≤ L, on `windows`, for the model saved in `dir`.
fn reference_distances(dir: &Path, windows: &[Vec<u32>]) -> Vec<Vec<f64>> {
    let w = dir.join("windows.json");
    std::fs::write(&w, serde_json::to_string(windows).unwrap()).unwrap();
    serde_json::from_str(&reference(&[
        "angular_distances",
        dir.to_str().unwrap(),
        w.to_str().unwrap(),
    ]))
    .unwrap()
}

/// How far our d may be from transformers': the angle between two vectors is a metric on the
/// sphere, so moving each vector by an angle of at most ε moves their angle by at most 2ε; a
/// hidden state off by a relative δ (per token, ‖Δh‖ ≤ δ‖h‖) is off in angle by at most asin(δ).
/// With δ = 1e-5 (the f32 bound the logits tests hold): |Δd| ≤ 2·asin(1e-5)/π ≈ 6.4e-6, for any
/// angle (no loss of precision near cos = ±1: it is the angle that is bounded, not the cosine).
const D_TOL: f64 = 6.4e-6;

#[test]
fn angular_distances_match_transformers() {
    let t = teacher();
    let tmp = tempfile::tempdir().unwrap();
    t.save_hf(tmp.path()).unwrap();
    let theirs = reference_distances(tmp.path(), &windows());
    let all: Vec<usize> = (0..LAYERS).collect();
    let ours = prune::distances(&t.model, &all, &windows()).unwrap();
    assert_eq!(ours.tokens, 39);
    assert_eq!(theirs.len(), LAYERS + 1);
    let mut worst = 0.0f64;
    for (i, row) in theirs.iter().enumerate() {
        for (j, &d) in row.iter().enumerate() {
            worst = worst.max((ours.d(i, j) - d).abs());
        }
    }
    assert!(worst < D_TOL, "largest |d_ours − d_transformers| = {worst}");
    // the quiet layers are the most redundant pair, the others are not near-identities
    assert!(theirs[2][4] < 0.01, "d(2, 4) = {}", theirs[2][4]);
    assert!(theirs[1][2] > 0.05 && theirs[4][5] > 0.05, "{theirs:?}");
}

/// Each strategy's choice, from the reference scores by the rule written plainly here (up to ties
/// within the tolerance).
#[test]
fn choices_follow_the_reference_scores() {
    let t = teacher();
    let tmp = tempfile::tempdir().unwrap();
    t.save_hf(tmp.path()).unwrap();
    let d = reference_distances(tmp.path(), &windows());
    let choose = |keep: usize, strategy: Strategy, keep_ends: bool| {
        let o = PruneOptions {
            keep,
            strategy,
            keep_ends,
        };
        prune::prune(&t.model, &windows(), &o).unwrap()
    };
    for keep in 1..LAYERS {
        let n = LAYERS - keep;
        for keep_ends in [true, false] {
            let ends = usize::from(keep_ends && keep >= 2);
            // one-shot: the run l..l+n with the smallest d(l, l+n), sparing the ends; ours must
            // be that run, or one whose reference score is within the tolerance of it
            let starts: Vec<usize> = (ends..=LAYERS - n - ends).collect();
            let best = starts
                .iter()
                .map(|&l| d[l][l + n])
                .fold(f64::INFINITY, f64::min);
            let p = choose(keep, Strategy::OneShot, keep_ends);
            assert_eq!(p.rounds.len(), 1);
            let removed = &p.rounds[0].removed;
            let s = removed[0];
            assert!(
                starts.contains(&s),
                "keep {keep} ends {keep_ends}: start {s}"
            );
            assert_eq!(*removed, (s..s + n).collect::<Vec<_>>());
            assert!(
                d[s][s + n] <= best + 2.0 * D_TOL,
                "keep {keep} ends {keep_ends}"
            );
            let want: Vec<usize> = (0..LAYERS).filter(|&l| l < s || l >= s + n).collect();
            assert_eq!(p.kept, want);
            let cands: Vec<usize> = p.rounds[0].candidates.iter().map(|c| c.layers[0]).collect();
            assert_eq!(cands, starts);
            for c in &p.rounds[0].candidates {
                let l = c.layers[0];
                assert!((c.d - d[l][l + n]).abs() < D_TOL);
            }
            // independent: the n single layers with the smallest d(l, l+1): every removed one
            // scores no more than every kept candidate (up to the tolerance)
            let p = choose(keep, Strategy::Independent, keep_ends);
            let removed = &p.rounds[0].removed;
            assert_eq!(removed.len(), n);
            for l in ends..LAYERS - ends {
                if removed.contains(&l) {
                    continue;
                }
                for &r in removed {
                    assert!(r >= ends && r < LAYERS - ends);
                    assert!(
                        d[r][r + 1] <= d[l][l + 1] + 2.0 * D_TOL,
                        "keep {keep}: {r} vs {l}"
                    );
                }
            }
        }
    }
    // keep 4: the quiet pair goes, whichever strategy
    for s in [
        Strategy::OneShot,
        Strategy::Iterative { block: 1 },
        Strategy::Iterative { block: 2 },
        Strategy::Independent,
    ] {
        assert_eq!(choose(4, s, true).kept, vec![0, 1, 4, 5], "{s:?}");
    }
}

/// Iterative: each round measures the model the earlier rounds left, i.e. the student made of
/// those layers; its first round is the teacher's one-layer table.
#[test]
fn iterative_rounds_measure_the_shortened_model() {
    let t = teacher();
    let w = windows();
    let o = PruneOptions {
        keep: 2,
        strategy: Strategy::Iterative { block: 1 },
        keep_ends: true,
    };
    let p = prune::prune(&t.model, &w, &o).unwrap();
    assert_eq!(p.rounds.len(), LAYERS - 2);
    assert_eq!(p.kept, vec![0, LAYERS - 1]);
    for (r, round) in p.rounds.iter().enumerate() {
        assert_eq!(round.layers.len(), LAYERS - r);
        assert_eq!(round.removed.len(), 1);
        let s = student::from_teacher_layers(&t, &round.layers, Device::Cpu).unwrap();
        let all: Vec<usize> = (0..round.layers.len()).collect();
        let ds = prune::distances(&s.model, &all, &w).unwrap();
        // candidates: every layer but the first and last, scored on the student of this round
        assert_eq!(round.candidates.len(), round.layers.len() - 2);
        for (k, c) in round.candidates.iter().enumerate() {
            assert_eq!(c.layers, vec![round.layers[k + 1]]);
            assert_eq!(c.d, ds.d(k + 1, k + 2), "round {r} candidate {k}");
        }
        let best = round
            .candidates
            .iter()
            .min_by(|a, b| a.d.total_cmp(&b.d))
            .unwrap();
        assert_eq!(round.removed, best.layers);
    }
}

/// The residual stream through some layers is what the student made of them computes, and through
/// all of them it is forward_with_hidden's, with the embeddings first.
#[test]
fn residual_stream_through_some_layers_is_the_students() {
    let t = teacher();
    let ids = Tensor::from_slice(&[3i64, 40, 7, 250, 9, 9, 1]).unsqueeze(0);
    let all: Vec<usize> = (0..LAYERS).collect();
    tch::no_grad(|| {
        let hs = t.model.residual_stream(&ids, &all).unwrap();
        let fw = t.model.forward_with_hidden(&ids).unwrap();
        assert_eq!(hs.len(), LAYERS + 1);
        for (a, b) in hs[1..].iter().zip(&fw.hidden_states) {
            assert!(a.equal(b));
        }
        let embed =
            t.vs.variables()["model.embed_tokens.weight"].index_select(0, &ids.squeeze_dim(0));
        assert!(hs[0].squeeze_dim(0).equal(&embed));
        let kept = [0usize, 4, 5];
        let s = student::from_teacher_layers(&t, &kept, Device::Cpu).unwrap();
        let through = t.model.residual_stream(&ids, &kept).unwrap();
        let theirs = s.model.residual_stream(&ids, &[0, 1, 2]).unwrap();
        for (a, b) in through.iter().zip(&theirs) {
            assert!(a.equal(b));
        }
        assert!(t.model.residual_stream(&ids, &[LAYERS]).is_err());
    });
}

/// A folder with the teacher (HF) and calibration text.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        teacher().save_hf(&dir.path().join("teacher")).unwrap();
        std::fs::write(dir.path().join("calib.txt"), text(600)).unwrap();
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
fn pruned_student_logits_equal_transformers_on_the_same_layers() {
    let d = Dir::new();
    let out = distill(&[
        "prune",
        &d.s("teacher"),
        "--keep",
        "3",
        "--data",
        &d.s("calib.txt"),
        "--sequences",
        "4",
        "--seq-len",
        "32",
        "--out",
        &d.s("student"),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kept: Vec<usize> = serde_json::from_value(p["kept"].clone()).unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!((kept[0], kept[2]), (0, LAYERS - 1), "the ends are kept");
    assert_eq!(p["tokens"], 4 * 32);
    // the printed scores are the library's on the same windows
    let t = model::load(&d.p("teacher"), Device::Cpu).unwrap();
    let cal = student::Calibration {
        path: d.p("calib.txt"),
        sequences: 4,
        seq_len: 32,
    };
    let o = PruneOptions {
        keep: 3,
        strategy: prune::DEFAULT_STRATEGY,
        keep_ends: true,
    };
    let lib = student::choose_layers(&t, &o, &cal).unwrap();
    assert_eq!(lib.kept, kept);
    assert_eq!(
        serde_json::to_value(&lib.rounds).unwrap(),
        p["rounds"],
        "CLI and library differ"
    );
    // the student: transformers' teacher cut to the kept layers gives its logits
    let s = model::load(&d.p("student"), Device::Cpu).unwrap();
    assert_eq!(s.model.config.num_hidden_layers, 3);
    let lj = d.p("layers.json");
    std::fs::write(&lj, serde_json::to_string(&kept).unwrap()).unwrap();
    let refp = d.p("ref.safetensors");
    reference(&[
        "pruned_logits",
        &d.s("teacher"),
        lj.to_str().unwrap(),
        refp.to_str().unwrap(),
    ]);
    let ids: Vec<i64> = (0..16).map(|i| (7 * i + 3) % 259).collect();
    let ours = tch::no_grad(|| {
        s.model
            .forward(&Tensor::from_slice(&ids).unsqueeze(0))
            .unwrap()
    })
    .squeeze_dim(0);
    let err = max_rel_err(&ours, &read_tensor(&refp, "logits"));
    assert!(err < 1e-5, "max relative error {err}");
    // the table form names the candidates and marks the removed run; the default (iterative)
    // adds a line a round
    let table = |strategy: &str| {
        let out = distill(&[
            "prune",
            &d.s("teacher"),
            "--keep",
            "4",
            "--data",
            &d.s("calib.txt"),
            "--sequences",
            "4",
            "--seq-len",
            "32",
            "--strategy",
            strategy,
        ]);
        let table = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{table}");
        assert!(table.contains("kept layers: [0, 1, 4, 5]"), "{table}");
        table
    };
    let t = table("one-shot");
    assert!(t.contains("  2-3 ") && t.contains("removed"), "{t}");
    let t = table("iterative");
    assert!(t.contains("round 2, 5 layers: removed "), "{t}");
}

fn run_file(d: &Dir, name: &str, student: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[teacher]
path = "teacher"

[student]
{student}

[data]
train = "calib.txt"
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 4

[[loss]]
kind = "forward_kl"

[optim]
lr = 1e-3
micro_batch = 2

[run]
steps = 4
eval_every = 2
checkpoint_every = 2
threads = 2
seed = 1
output = "out"
{extra}
"#
    );
    let p = d.p(name);
    std::fs::write(&p, text).unwrap();
    p
}

const SIMILARITY: &str = r#"from_teacher = { keep = 3, method = "similarity", calibration = "calib.txt", calibration_sequences = 4, calibration_seq_len = 32 }"#;

#[test]
fn run_file_chooses_the_layers_and_resume_checks_them() {
    let d = Dir::new();
    let run = run_file(&d, "run.toml", SIMILARITY, "");
    let out = distill(&["train", run.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kept layers: ["),
        "the table is shown: {stderr}"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.p("out/run.json")).unwrap()).unwrap();
    let kept: Vec<usize> = serde_json::from_value(info["pruning"]["kept"].clone()).unwrap();
    // the same choice as `distill prune` with the same text and windows
    let t = model::load(&d.p("teacher"), Device::Cpu).unwrap();
    let cal = student::Calibration {
        path: d.p("calib.txt"),
        sequences: 4,
        seq_len: 32,
    };
    let o = PruneOptions {
        keep: 3,
        strategy: prune::DEFAULT_STRATEGY,
        keep_ends: prune::DEFAULT_KEEP_ENDS,
    };
    assert_eq!(student::choose_layers(&t, &o, &cal).unwrap().kept, kept);
    assert_eq!(info["student"]["layers"], 3);
    let source = info["student"]["source"].as_str().unwrap();
    assert!(
        source.contains(&format!("teacher layers {kept:?}")),
        "{source}"
    );
    assert_eq!(
        info["fingerprint"]["student"],
        format!("teacher layers {kept:?}"),
        "the fingerprint holds the chosen layers"
    );
    // the student's first layer is the teacher's layer kept[0], and so on
    let s = model::load(&d.p("out/student"), Device::Cpu).unwrap();
    assert_eq!(s.model.config.num_hidden_layers, 3);
    // the same listed as layers: the same fingerprint, so it resumes
    let listed = run_file(
        &d,
        "listed.toml",
        &format!("from_teacher = {{ layers = {kept:?} }}"),
        "",
    );
    let out = distill(&["train", listed.to_str().unwrap(), "--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // other layers chosen (keep 2): the checkpoint refuses them by name
    let two = run_file(
        &d,
        "two.toml",
        &SIMILARITY.replace("keep = 3", "keep = 2"),
        "",
    );
    let out = distill(&["train", two.to_str().unwrap(), "--resume"]);
    assert_clean_failure(&out, &["differing", "student"]);
}

#[test]
fn run_file_errors_name_the_key_and_line() {
    let d = Dir::new();
    let cases: &[(&str, &[&str])] = &[
        (
            r#"from_teacher = { layers = [0, 1], keep = 1 }"#,
            &[
                "run.toml:6",
                "student.from_teacher",
                "exactly one of 'layers'",
            ],
        ),
        (
            r#"from_teacher = { keep = 2, calibration = "calib.txt" }"#,
            &["run.toml:6", "student.from_teacher.method", "missing"],
        ),
        (
            r#"from_teacher = { keep = 2, method = "magic", calibration = "calib.txt" }"#,
            &["student.from_teacher.method", "unknown method 'magic'"],
        ),
        (
            r#"from_teacher = { keep = 2, method = "similarity" }"#,
            &["student.from_teacher.calibration", "missing"],
        ),
        (
            r#"from_teacher = { keep = 0, method = "similarity", calibration = "calib.txt" }"#,
            &["student.from_teacher.keep", "at least 1"],
        ),
        (
            r#"from_teacher = { layers = [0, 1], method = "similarity" }"#,
            &["student.from_teacher.method", "goes with 'keep'"],
        ),
        (
            r#"from_teacher = { keep = 2, method = "similarity", calibration = "calib.txt", strategy = "greedy" }"#,
            &["student.from_teacher.strategy", "unknown strategy 'greedy'"],
        ),
        (
            r#"from_teacher = { keep = 2, method = "similarity", calibration = "calib.txt", calibration_seq_len = 0 }"#,
            &["student.from_teacher.calibration_seq_len", "at least 1"],
        ),
        // found at set-up, when the teacher is known
        (
            r#"from_teacher = { keep = 6, method = "similarity", calibration = "calib.txt" }"#,
            &["student.from_teacher.keep = 6", "the teacher has 6 layers"],
        ),
        (
            r#"from_teacher = { keep = 2, method = "similarity", calibration = "nowhere.txt" }"#,
            &["student.from_teacher.calibration", "nowhere.txt", "no such"],
        ),
    ];
    for (student, needles) in cases {
        let run = run_file(&d, "run.toml", student, "");
        let out = distill(&["train", run.to_str().unwrap()]);
        assert_clean_failure(&out, needles);
        assert!(!d.p("out").exists(), "{student}: the output was touched");
    }
}

#[test]
fn cli_errors_are_one_line() {
    let d = Dir::new();
    std::fs::write(d.p("bad.txt"), [0x66u8, 0xff, 0xfe, 0x00]).unwrap();
    std::fs::write(d.p("empty.txt"), "  \n").unwrap();
    let teacher = d.s("teacher");
    let calib = d.s("calib.txt");
    let args = |keep: &str, data: &str| -> Vec<String> {
        ["prune", &teacher, "--keep", keep, "--data", data]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |a: Vec<String>| distill(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_clean_failure(&run(args("0", &calib)), &["--keep 0"]);
    assert_clean_failure(
        &run(args("6", &calib)),
        &["--keep 6", "the teacher has 6 layers"],
    );
    assert_clean_failure(&run(args("9", &calib)), &["--keep 9"]);
    assert_clean_failure(
        &run(args("2", &d.s("nowhere.txt"))),
        &["--data", "nowhere.txt", "no such"],
    );
    assert_clean_failure(&run(args("2", &d.s("bad.txt"))), &["bad.txt", "UTF-8"]);
    assert_clean_failure(
        &run(args("2", &d.s("empty.txt"))),
        &["empty.txt", "no text"],
    );
    let mut a = args("2", &calib);
    a.extend(["--strategy".into(), "greedy".into()]);
    assert_clean_failure(&run(a), &["--strategy", "greedy"]);
    let mut a = args("2", &calib);
    a.extend(["--out".into(), teacher.clone()]);
    assert_clean_failure(&run(a), &["already holds a model"]);
    let mut a = args("2", &calib);
    a.extend(["--seq-len".into(), "100000".into()]);
    assert_clean_failure(&run(a), &["context"]);
}

#[test]
fn strategies_parse_and_name_themselves() {
    for s in [
        "one-shot",
        "iterative",
        "iterative:3",
        "independent",
        "perplexity",
        "perplexity:2",
    ] {
        assert_eq!(Strategy::parse(s).unwrap().name(), s);
    }
    assert_eq!(
        Strategy::parse("perplexity:4").unwrap(),
        Strategy::Perplexity { candidates: 4 }
    );
    assert!(Strategy::parse("perplexity:0").is_err());
    assert_eq!(
        Strategy::parse("iterative:1").unwrap(),
        Strategy::Iterative { block: 1 }
    );
    for bad in ["iterative:0", "iterative:x", "", "One-shot"] {
        assert!(Strategy::parse(bad).is_err(), "{bad}");
    }
}

/// exp(mean NLL) in f64 of every token after the first of each window, from a model's own
/// full forward pass (the student copied from the teacher's layers, not the teacher run through
/// some of them).
fn perplexity_f64(m: &LoadedModel, windows: &[Vec<u32>]) -> f64 {
    let (mut nll, mut n) = (0.0, 0usize);
    for w in windows {
        let ids = Tensor::from_slice(&w.iter().map(|&x| x as i64).collect::<Vec<_>>()).unsqueeze(0);
        let logits = tch::no_grad(|| m.model.forward(&ids).unwrap());
        let l = Vec::<f64>::try_from(&logits.to_kind(tch::Kind::Double).flatten(0, -1)).unwrap();
        let v = l.len() / w.len();
        for t in 0..w.len() - 1 {
            let row = &l[t * v..(t + 1) * v];
            let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            nll += lse - row[w[t + 1] as usize];
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn the_perplexity_strategy_judges_the_closest_runs_and_keeps_the_best() {
    let t = teacher();
    let w = windows();
    // 6 → 3 layers, ends kept: the runs 1-3, 2-4 (removing layers 1..=3 or 2..=4)
    let o = PruneOptions {
        keep: 3,
        strategy: Strategy::Perplexity { candidates: 2 },
        keep_ends: true,
    };
    let p = prune::prune(&t.model, &w, &o).unwrap();
    let c = &p.rounds[0].candidates;
    assert_eq!(c.len(), 2, "{c:?}");
    // the judged ones are the two smallest d (here: every candidate), each with the perplexity
    // of the student copied from the layers left
    let mut best = (f64::INFINITY, vec![]);
    for cand in c {
        let left: Vec<usize> = (0..LAYERS).filter(|l| !cand.layers.contains(l)).collect();
        let s = student::from_teacher_layers(&t, &left, Device::Cpu).unwrap();
        let want = perplexity_f64(&s, &w);
        let got = cand.ppl.expect("judged");
        // f32 logits: each log-softmax term off by a few ε·(|logit| + ln V), relative to the NLL
        let tol = 64.0 * f32::EPSILON as f64 * (want.ln() + 259f64.ln() + 10.0);
        assert!((got.ln() - want.ln()).abs() <= tol, "{got} vs {want}");
        if want < best.0 {
            best = (want, left);
        }
    }
    assert_eq!(p.kept, best.1, "{}", p.table());
    assert!(p.table().contains("calibration ppl"));
    // with one candidate it is one-shot's choice
    let one = prune::prune(
        &t.model,
        &w,
        &PruneOptions {
            strategy: Strategy::Perplexity { candidates: 1 },
            ..o
        },
    )
    .unwrap();
    let shot = prune::prune(
        &t.model,
        &w,
        &PruneOptions {
            strategy: Strategy::OneShot,
            ..o
        },
    )
    .unwrap();
    assert_eq!(one.kept, shot.kept);
}
