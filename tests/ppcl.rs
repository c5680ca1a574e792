//! Progressive pruning in one run (`[[student.stage]]`): the run file's form and refusals; each
//! stage removes what the angular distances of transformers' hidden states choose on the student
//! as it is at the boundary; the cut keeps the kept layers' weights and optimizer moments; the final
//! student loads in transformers with equal logits; a run killed inside a stage, at a boundary, or
//! while entering a stage resumes bit-identically.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::model::{self, LlamaConfig, LoadedModel, Tokenizer};
use distill::student;
use distill::train::optim::{AdamW, OptimFile};
use distill::train::stages;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const LAYERS: usize = 6;

/// A tiny random teacher of 6 layers with a byte-level tokenizer, in which layers 2 and 3 barely
/// touch the residual stream (their output projections scaled by 1e-3): the run {2, 3} is the
/// clear first cut.
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

/// A folder with the teacher (HF) and text (training data and calibration).
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        teacher().save_hf(&dir.path().join("teacher")).unwrap();
        std::fs::write(dir.path().join("text.txt"), text(1500)).unwrap();
        Dir { dir }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.p(name).to_str().unwrap().to_string()
    }
}

const CALIBRATION: &str =
    r#"calibration = "text.txt", calibration_sequences = 4, calibration_seq_len = 32"#;
/// From the whole teacher: 6 → 4 layers (6 steps) → 3 layers (6 steps).
const STAGES: &str =
    "[[student.stage]]\nremove = 2\nsteps = 6\n\n[[student.stage]]\nkeep = 3\nsteps = 6\n";
const KL_AND_HIDDEN: &str = "[[loss]]\nkind = \"forward_kl\"\n\n[[loss]]\nkind = \"hidden\"\nmetric = \"normalized_mse\"\nweight = 0.5\n";

/// A run file: `student` and `stages` go in [student], `loss` and `run` are TOML snippets.
fn run_file(
    d: &Dir,
    name: &str,
    output: &str,
    student: &str,
    stages: &str,
    extra: &str,
) -> PathBuf {
    let text = format!(
        r#"
[teacher]
path = "teacher"

[student]
{student}

{stages}
[data]
train = "text.txt"
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 4

{KL_AND_HIDDEN}
[optim]
lr = 3e-3
warmup_steps = 2
micro_batch = 2

[run]
eval_every = 3
checkpoint_every = 3
keep_last = 10
log_every = 1
threads = 2
seed = 1
output = "{output}"
{extra}
"#
    );
    let p = d.p(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn whole_teacher() -> String {
    format!("from_teacher = {{ {CALIBRATION} }}")
}

fn records(dir: &Path) -> Vec<Value> {
    distill::report::read_metrics(&dir.join("metrics.jsonl")).unwrap()
}

fn of_kind<'a>(recs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["kind"] == kind).collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn the_run_file_form_and_its_refusals() {
    let d = Dir::new();
    // the stages' steps are the run's length, derived when run.steps is absent
    let run = run_file(&d, "ok.toml", "out", &whole_teacher(), STAGES, "");
    let cfg = distill::config::RunConfig::load(&run, &[]).unwrap();
    assert_eq!(
        cfg.run.length,
        distill::train::options::Length::Steps(12),
        "run.steps derived"
    );
    let st = cfg.student.stages.as_ref().unwrap();
    assert_eq!(cfg.student.init, student::StudentInit::Teacher);
    assert_eq!(st.stages.len(), 2);
    assert_eq!(st.stages[0].cut, student::ppcl::Cut::Remove(2));
    assert_eq!(st.stages[1].cut, student::ppcl::Cut::Keep(3));
    assert_eq!(
        st.stages[0].strategy,
        student::Strategy::OneShot,
        "one contiguous run a stage by default"
    );
    assert_eq!((st.calibration.sequences, st.calibration.seq_len), (4, 32));
    assert_eq!(st.counts(6).unwrap(), vec![4, 3]);
    assert_eq!(
        (
            st.stage_of(0),
            st.stage_of(1),
            st.stage_of(6),
            st.stage_of(7)
        ),
        (0, 1, 1, 2)
    );
    assert_eq!((st.span(1), st.span(2)), ((1, 6), (7, 12)));
    let run = run_file(&d, "ok.toml", "out", &whole_teacher(), STAGES, "steps = 12");
    distill::config::RunConfig::load(&run, &[]).unwrap();

    // refused by the run file's checks, naming the key and line; nothing is written
    let stage = |body: &str| format!("[[student.stage]]\n{body}\n");
    let cases: Vec<(String, String, String, Vec<&str>)> = vec![
        (
            whole_teacher(),
            stage("remove = 0\nsteps = 3"),
            String::new(),
            vec!["run.toml:9", "student.stage.0.remove", "at least 1"],
        ),
        (
            whole_teacher(),
            stage("keep = 0\nsteps = 3"),
            String::new(),
            vec!["student.stage.0.keep", "at least 1"],
        ),
        (
            whole_teacher(),
            stage("remove = 1\nkeep = 3\nsteps = 3"),
            String::new(),
            vec!["student.stage.0", "exactly one of 'remove'"],
        ),
        (
            whole_teacher(),
            stage("steps = 3"),
            String::new(),
            vec!["student.stage.0", "exactly one of 'remove'"],
        ),
        (
            whole_teacher(),
            stage("remove = 1"),
            String::new(),
            vec!["student.stage.0.steps", "missing"],
        ),
        (
            whole_teacher(),
            stage("remove = 1\nsteps = 0"),
            String::new(),
            vec!["student.stage.0.steps", "at least 1"],
        ),
        (
            whole_teacher(),
            stage("remove = 1\nsteps = 3\nstrategy = \"greedy\""),
            String::new(),
            vec!["student.stage.0.strategy", "unknown strategy 'greedy'"],
        ),
        (
            whole_teacher(),
            stage("remove = 1\nsteps = 3\nlayers = 2"),
            String::new(),
            vec!["unknown field 'layers'"],
        ),
        (
            "from_teacher = { layers = [0, 1, 2] }".into(),
            stage("remove = 1\nsteps = 3"),
            String::new(),
            vec!["student.from_teacher.calibration", "missing"],
        ),
        (
            "path = \"teacher\"".into(),
            stage("remove = 1\nsteps = 3"),
            String::new(),
            vec!["student.stage", "from_teacher"],
        ),
        (
            whole_teacher(),
            STAGES.into(),
            "steps = 10".into(),
            vec!["run.steps", "is 10", "add up to 12"],
        ),
        (
            whole_teacher(),
            STAGES.into(),
            "epochs = 1.0".into(),
            vec!["run.epochs", "sum of the stages' steps"],
        ),
        // removing more layers than the student has, found from the listed layers
        (
            format!("from_teacher = {{ layers = [0, 1, 5], {CALIBRATION} }}"),
            stage("remove = 3\nsteps = 3"),
            String::new(),
            vec![
                "student.stage.0.remove",
                "removes 3 layers from a student of 3",
            ],
        ),
        (
            format!("from_teacher = {{ layers = [0, 1, 4, 5], {CALIBRATION} }}"),
            format!(
                "{}{}",
                stage("remove = 1\nsteps = 3"),
                stage("keep = 3\nsteps = 3")
            ),
            String::new(),
            vec!["student.stage.1.keep", "keeps 3 layers of a student of 3"],
        ),
        (
            format!("from_teacher = {{ layers = [0, 1], keep = 1, {CALIBRATION} }}"),
            stage("remove = 1\nsteps = 3"),
            String::new(),
            vec!["student.from_teacher", "at most one of 'layers'"],
        ),
    ];
    for (student, stages, extra, needles) in &cases {
        let run = run_file(&d, "run.toml", "out", student, stages, extra);
        let out = distill(&["train", run.to_str().unwrap()]);
        assert_clean_failure(&out, needles);
        assert!(!d.p("out").exists(), "{student} {stages}: output touched");
    }
    // a hidden term's explicit layer map: the stages change the student's layers under it
    let text = std::fs::read_to_string(run_file(
        &d,
        "run.toml",
        "out",
        &whole_teacher(),
        STAGES,
        "",
    ))
    .unwrap()
    .replace(
        "metric = \"normalized_mse\"",
        "metric = \"normalized_mse\"\nlayers = [[0, 0]]",
    );
    std::fs::write(d.p("run.toml"), text).unwrap();
    assert_clean_failure(
        &distill(&["train", &d.s("run.toml")]),
        &["loss.1.layers", "leave 'layers' out"],
    );
    // found at set-up, when the teacher's layer count is known; calibration read then too
    for (stages, needles) in [
        (
            stage("remove = 6\nsteps = 3"),
            vec![
                "student.stage.0.remove",
                "removes 6 layers from a student of 6",
            ],
        ),
        (
            format!(
                "{}{}",
                stage("remove = 4\nsteps = 3"),
                stage("remove = 2\nsteps = 3")
            ),
            vec![
                "student.stage.1.remove",
                "removes 2 layers from a student of 2",
            ],
        ),
    ] {
        let run = run_file(&d, "run.toml", "out", &whole_teacher(), &stages, "");
        assert_clean_failure(&distill(&["train", run.to_str().unwrap()]), &needles);
        assert!(!d.p("out").exists());
    }
    let run = run_file(
        &d,
        "run.toml",
        "out",
        "from_teacher = { calibration = \"nowhere.txt\" }",
        STAGES,
        "",
    );
    assert_clean_failure(
        &distill(&["train", run.to_str().unwrap()]),
        &["student.from_teacher.calibration", "nowhere.txt"],
    );
    assert!(!d.p("out").exists());
}

/// How far our d may be from transformers' (tests/prune.rs derives it): 2·asin(1e-5)/π.
const D_TOL: f64 = 6.4e-6;

/// transformers' d(i, j) on `windows` for the model saved in `dir`.
fn reference_distances(dir: &Path, windows: &[Vec<u32>], scratch: &Path) -> Vec<Vec<f64>> {
    let w = scratch.join("windows.json");
    std::fs::write(&w, serde_json::to_string(windows).unwrap()).unwrap();
    serde_json::from_str(&reference(&[
        "angular_distances",
        dir.to_str().unwrap(),
        w.to_str().unwrap(),
    ]))
    .unwrap()
}

/// The one-shot rule written plainly: remove the run of n consecutive layers l..l+n−1 (first and
/// last spared) with the smallest d(l, l+n). Returns the candidates' starts and scores.
fn one_shot_scores(d: &[Vec<f64>], n: usize) -> Vec<(usize, f64)> {
    let m = d.len() - 1;
    (1..=m - n - 1).map(|l| (l, d[l][l + n])).collect()
}

/// Every stage of a run from the whole teacher (6 → 4 → 3, kl + hidden): the removed layers are
/// the one-shot choice on transformers' angular distances of the student at the boundary (the
/// teacher for stage 1, the checkpoint at the boundary for stage 2), the hidden map follows the
/// layers, and the final student loads in transformers with the same logits.
#[test]
fn each_stage_removes_what_the_angular_distances_choose_and_the_student_loads() {
    let d = Dir::new();
    let run = run_file(&d, "run.toml", "out", &whole_teacher(), STAGES, "");
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&d.p("out"));
    let stage_recs = of_kind(&recs, "stage");
    assert_eq!(stage_recs.len(), 2, "a record per stage");
    // the calibration windows, as the run reads them (the teacher's tokenizer)
    let t = model::load(&d.p("teacher"), Device::Cpu).unwrap();
    let windows = student::Calibration {
        path: d.p("text.txt"),
        sequences: 4,
        seq_len: 32,
    }
    .windows(t.tokenizer.as_ref().unwrap(), model::eos_id(&t))
    .unwrap();
    assert_eq!(windows.len(), 4);
    // stage k is measured on: the teacher (stage 1), the checkpoint at step 6 (stage 2)
    let measured = [d.p("teacher"), d.p("out/checkpoints/step-00000006")];
    let mut layers: Vec<usize> = (0..LAYERS).collect();
    for (k, (r, dir)) in stage_recs.iter().zip(&measured).enumerate() {
        assert_eq!(r["stage"], k + 1);
        assert_eq!(usizes(&r["layers_before"]), layers, "stage {}", k + 1);
        let dist = reference_distances(dir, &windows, d.dir.path());
        assert_eq!(dist.len(), layers.len() + 1);
        let n = [2, 1][k];
        let scores = one_shot_scores(&dist, n);
        let best = scores.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
        let removed = usizes(&r["removed"]);
        assert_eq!(removed.len(), n);
        // ours, in student indices: a contiguous run, scored within the tolerance of the best
        let start = layers.iter().position(|&l| l == removed[0]).unwrap();
        assert_eq!(
            removed,
            layers[start..start + n].to_vec(),
            "stage {}: contiguous",
            k + 1
        );
        let ours = dist[start][start + n];
        assert!(
            ours <= best + 2.0 * D_TOL,
            "stage {}: removed d {ours}, best {best} ({scores:?})",
            k + 1
        );
        // and exactly what `distill prune`'s code chooses on the same student and windows
        let m = model::load(dir, Device::Cpu).unwrap();
        let o = student::PruneOptions {
            keep: layers.len() - n,
            strategy: student::Strategy::OneShot,
            keep_ends: true,
        };
        let p = student::prune::prune(&m.model, &windows, &o).unwrap();
        let chosen: Vec<usize> = (0..layers.len())
            .filter(|j| !p.kept.contains(j))
            .map(|j| layers[j])
            .collect();
        assert_eq!(
            chosen,
            removed,
            "stage {}: prune.rs on the same student",
            k + 1
        );
        let recorded = r["d"][0].as_f64().unwrap();
        assert!((recorded - ours).abs() < D_TOL, "stage {}: d", k + 1);
        layers.retain(|l| !removed.contains(l));
        assert_eq!(usizes(&r["layers"]), layers);
        // the hidden term maps each student layer to the teacher layer it came from
        let pairs: Vec<(usize, usize)> =
            serde_json::from_value(r["hidden_layers"][0]["pairs"].clone()).unwrap();
        assert_eq!(
            pairs,
            layers.iter().copied().enumerate().collect::<Vec<_>>()
        );
    }
    assert_eq!(
        usizes(&stage_recs[0]["removed"]),
        vec![2, 3],
        "the quiet pair goes first"
    );
    // the steps carry their stage, the stages their spans
    for r in of_kind(&recs, "train") {
        let step = r["step"].as_u64().unwrap();
        assert_eq!(r["stage"], if step <= 6 { 1 } else { 2 }, "step {step}");
    }
    assert_eq!(
        (
            stage_recs[1]["first_step"].clone(),
            stage_recs[1]["last_step"].clone()
        ),
        (7.into(), 12.into())
    );
    // checkpoints hold the stage and the layers
    for (step, stage, count) in [(3, 1, 4), (6, 1, 4), (9, 2, 3), (12, 2, 3)] {
        let ck = d.p(&format!("out/checkpoints/step-{step:08}"));
        let st = distill::train::checkpoint::read_state(&ck).unwrap();
        let rec = st.stages.unwrap();
        assert_eq!((rec.stage, rec.layers.len()), (stage, count), "step {step}");
        let m = model::load(&ck, Device::Cpu).unwrap();
        assert_eq!(m.model.config.num_hidden_layers, count);
    }
    // run.json and the report
    let info: Value = serde_json::from_slice(&std::fs::read(d.p("out/run.json")).unwrap()).unwrap();
    assert_eq!(info["student"]["layers"], 3);
    assert_eq!(info["total_steps"], 12);
    assert_eq!(info["stages"].as_array().unwrap().len(), 2);
    let report = std::fs::read_to_string(d.p("out/report.md")).unwrap();
    assert!(report.contains("## Stages"), "{report}");
    assert!(report.contains("| 1 | 1–6 | 6 → 4 | [2,3] |"), "{report}");
    assert!(report.contains("| 2 | 7–12 | 4 → 3 |"), "{report}");
    // the final student: its layers, and transformers' logits on it
    let s = model::load(&d.p("out/student"), Device::Cpu).unwrap();
    assert_eq!(s.model.config.num_hidden_layers, 3);
    let ids: Vec<i64> = (0..16).map(|i| (7 * i + 3) % 259).collect();
    let ids_json = d.p("ids.json");
    std::fs::write(&ids_json, serde_json::to_string(&ids).unwrap()).unwrap();
    let refp = d.p("ref.safetensors");
    reference(&[
        "logits",
        &d.s("out/student"),
        ids_json.to_str().unwrap(),
        refp.to_str().unwrap(),
    ]);
    let ours = tch::no_grad(|| {
        s.model
            .forward(&Tensor::from_slice(&ids).unsqueeze(0))
            .unwrap()
    })
    .squeeze_dim(0);
    let err = max_rel_err(&ours, &read_tensor(&refp, "logits"));
    assert!(err < 1e-5, "max relative error {err}");
}

/// The cut itself: the student made of some layers holds exactly their weights (renumbered) and
/// the others; the sliced AdamW holds their moments and step count, so that its next update of
/// the kept parameters equals the full optimizer's (a loss that treats each parameter alone).
#[test]
fn a_cut_keeps_the_kept_layers_weights_and_moments() {
    let t = teacher();
    let cfg = OptimFile::default().resolve().unwrap();
    let mut full = AdamW::new(&t.vs, &cfg).unwrap();
    // Σ θ²/2 + Σ θ³/3 per parameter: gradient θ + θ², each parameter on its own
    let loss = |vs: &tch::nn::VarStore| {
        let mut sum = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (_, p) in vs.variables() {
            sum = sum + (&p * &p * 0.5).sum(Kind::Float) + (&p * &p * &p / 3.0).sum(Kind::Float);
        }
        sum
    };
    for _ in 0..3 {
        full.zero_grad();
        loss(&t.vs).backward();
        full.step(1e-2).unwrap();
    }
    let kept = [0usize, 4, 5];
    let cut = stages::cut(&t, &kept, Device::Cpu).unwrap();
    assert_eq!(cut.model.config.num_hidden_layers, 3);
    let mut sliced = stages::slice_optimizer(&full, &kept, &cut.vs, None, &cfg).unwrap();
    assert_eq!(sliced.t, full.t);
    let rename = |name: &str| -> Option<String> {
        match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (i, tail) = rest.split_once('.').unwrap();
                let i: usize = i.parse().unwrap();
                kept.iter()
                    .position(|&k| k == i)
                    .map(|j| format!("model.layers.{j}.{tail}"))
            }
            None => Some(name.to_string()),
        }
    };
    let (old_vars, new_vars) = (t.vs.variables(), cut.vs.variables());
    let mut mapped = 0;
    for (name, v) in &old_vars {
        if let Some(new) = rename(name) {
            assert!(new_vars[&new].equal(v), "{name} → {new}");
            mapped += 1;
        }
    }
    assert_eq!(
        mapped,
        new_vars.len(),
        "every parameter of the cut comes from one kept"
    );
    let moments = |o: &AdamW| -> std::collections::HashMap<String, Tensor> {
        o.state_tensors().into_iter().collect()
    };
    let (old_m, new_m) = (moments(&full), moments(&sliced));
    assert_eq!(new_m.len(), 2 * new_vars.len());
    for (name, m) in &old_m {
        if let Some(new) = rename(&name[2..]) {
            assert!(new_m[&format!("{}{new}", &name[..2])].equal(m), "{name}");
        }
    }
    // one more update each: the kept parameters move the same way
    for (o, vs) in [(&mut full, &t.vs), (&mut sliced, &cut.vs)] {
        o.zero_grad();
        loss(vs).backward();
        o.step(1e-2).unwrap();
    }
    let new_vars = cut.vs.variables();
    for (name, v) in &t.vs.variables() {
        if let Some(new) = rename(name) {
            assert!(new_vars[&new].equal(v), "after a step: {name} → {new}");
        }
    }
}

// ------------------------------------------------------------------ exact resume

#[cfg(feature = "fault-injection")]
fn killed_then_resumed(d: &Dir, name: &str, env: (&str, &str)) {
    let run = run_file(
        d,
        &format!("{name}.toml"),
        name,
        &whole_teacher(),
        STAGES,
        "",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["train", run.to_str().unwrap()])
        .env(env.0, env.1)
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9), "{env:?}: killed by SIGKILL");
    assert!(!d.p(&format!("{name}/student")).exists());
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
}

/// The run's results that must not depend on a kill: the student's bytes, each step's values
/// once, each stage's record once with the same choice and evaluation.
#[cfg(feature = "fault-injection")]
fn assert_same_run(a: &Path, b: &Path, what: &str) {
    assert_eq!(
        std::fs::read(a.join("student/model.safetensors")).unwrap(),
        std::fs::read(b.join("student/model.safetensors")).unwrap(),
        "{what}: the student differs"
    );
    let (ra, rb) = (records(a), records(b));
    let train = |r: &[Value]| -> Vec<(Value, Value, Value, Value)> {
        of_kind(r, "train")
            .iter()
            .map(|x| {
                (
                    x["step"].clone(),
                    x["loss"].clone(),
                    x["hidden"].clone(),
                    x["grad_norm"].clone(),
                )
            })
            .collect()
    };
    assert_eq!(train(&ra).len(), 12, "{what}");
    assert_eq!(train(&ra), train(&rb), "{what}: steps");
    let stage = |r: &[Value]| -> Vec<Value> {
        of_kind(r, "stage")
            .into_iter()
            .map(|x| {
                let mut x = x.clone();
                x["measure_seconds"] = Value::Null;
                x
            })
            .collect()
    };
    assert_eq!(stage(&ra).len(), 2, "{what}");
    assert_eq!(stage(&ra), stage(&rb), "{what}: stage records");
    let evals = |r: &[Value]| -> Vec<Value> { of_kind(r, "eval").into_iter().cloned().collect() };
    assert_eq!(evals(&ra), evals(&rb), "{what}: evaluations");
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn a_run_killed_inside_a_stage_or_at_a_boundary_resumes_bit_identically() {
    let d = Dir::new();
    let run = run_file(&d, "full.toml", "full", &whole_teacher(), STAGES, "");
    train_ok(&["train", run.to_str().unwrap()]);
    // inside stage 2: the newest checkpoint (step 9) holds the 3-layer student
    killed_then_resumed(&d, "inside", ("DISTILL_FAULT_DIE_AFTER_STEP", "10"));
    assert_same_run(&d.p("full"), &d.p("inside"), "killed at step 10");
    // inside stage 1, before any checkpoint of stage 2 exists
    killed_then_resumed(&d, "early", ("DISTILL_FAULT_DIE_AFTER_STEP", "4"));
    assert_same_run(&d.p("full"), &d.p("early"), "killed at step 4");
    // at the boundary: the checkpoint at step 6 written, stage 2's cut not made yet
    killed_then_resumed(&d, "boundary", ("DISTILL_FAULT_DIE_AFTER_STEP", "6"));
    assert_same_run(&d.p("full"), &d.p("boundary"), "killed at step 6");
    // while entering stage 2: cut made and recorded, no step of it taken; the resume cuts again
    // from the checkpoint at step 6 and records the stage once
    killed_then_resumed(&d, "entering", ("DISTILL_FAULT_DIE_ENTERING_STAGE", "2"));
    assert_same_run(&d.p("full"), &d.p("entering"), "killed entering stage 2");
}

/// A checkpoint whose recorded layers do not fit the plan is refused, naming its state.json.
#[test]
fn a_resume_with_a_tampered_stage_record_is_refused() {
    let d = Dir::new();
    let run = run_file(&d, "run.toml", "out", &whole_teacher(), STAGES, "");
    train_ok(&["train", run.to_str().unwrap()]);
    let ck = d.p("out/checkpoints/step-00000012");
    let path = ck.join("state.json");
    let mut st: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (bad, needle) in [
        (
            serde_json::json!({"stage": 2, "layers": [0, 1, 4, 5]}),
            "4 layers recorded for stage 2",
        ),
        (
            serde_json::json!({"stage": 2, "layers": [5, 1, 0]}),
            "not a subsequence",
        ),
        (
            serde_json::json!({"stage": 1, "layers": [0, 1, 5]}),
            "which is in stage 2",
        ),
    ] {
        st["stages"] = bad;
        std::fs::write(&path, serde_json::to_vec(&st).unwrap()).unwrap();
        // the newest checkpoint is the one read: drop the others' influence by resuming
        let out = distill(&["train", run.to_str().unwrap(), "--resume"]);
        assert_clean_failure(&out, &["state.json", needle]);
    }
}
