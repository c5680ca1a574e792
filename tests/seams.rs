//! The core's seams: the loss registry and the objective's dispatch, per-token weights, model
//! outputs with chosen hidden states, dtypes and devices, the run file's errors, and a run that
//! leaves the teacher untouched.
mod common;
use common::*;
use distill::config::RunConfig;
use distill::losses::registry::{self, BuildContext, LossInput};
use distill::model::{self, LlamaConfig, Tokenizer};
use distill::objective::Objective;
use distill::teacher::TeacherDist;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A folder with a tiny teacher and student (same byte-level tokenizer) and training text.
fn tiny_run_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = LlamaConfig::tiny(259, 48, 2, 4, 2);
    cfg.eos_token_ids = vec![256];
    for (seed, scale, name) in [(7, 150.0, "teacher"), (8, 1.0, "student")] {
        let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
        tch::no_grad(|| {
            let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
            let _ = e.f_mul_scalar_(scale).unwrap();
        });
        m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
        m.save_hf(&dir.path().join(name)).unwrap();
    }
    let words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"];
    let text: String = (0..3000)
        .map(|i| format!("{} ", words[(i * 7 + i / 5) % words.len()]))
        .collect();
    std::fs::write(dir.path().join("train.txt"), text).unwrap();
    dir
}

fn run_text(loss: &str, extra: &str) -> String {
    format!(
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

{loss}

[optim]
lr = 3e-3
micro_batch = 4

[run]
steps = 6
seed = 1
output = "out"
{extra}
"#
    )
}

/// Every kind with parameters unlike its defaults and unlike each other, so that a parameter read
/// into the wrong place (α for β, say) changes the value.
const ALL_KINDS: &str = r#"
[[loss]]
kind = "cross_entropy"
weight = 0.5
[[loss]]
kind = "forward_kl"
temperature = 1.7
[[loss]]
kind = "reverse_kl"
temperature = 0.6
[[loss]]
kind = "jsd"
beta = 0.2
temperature = 1.3
[[loss]]
kind = "skew_kl"
alpha = 0.35
temperature = 0.8
[[loss]]
kind = "skew_reverse_kl"
alpha = 0.65
temperature = 1.2
[[loss]]
kind = "tvd"
temperature = 2.5
[[loss]]
kind = "adaptive_kl"
mu = 0.3
temperature = 1.1
[[loss]]
kind = "hinton"
alpha = 0.25
temperature = 3.0
[[loss]]
kind = "pld"
tau = 0.7
[[loss]]
kind = "taid"
t_start = 0.2
t_end = 0.9
alpha = 0.01
beta = 0.5
[[loss]]
kind = "token_selective"
beta = 0.7
top_k = 3
entropy_quantile = 0.3
w_jsd = 0.9
w_entropy = 0.4
w_rank = 0.2
temperature = 1.4
[[loss]]
kind = "sinkhorn"
temperature = 1.5
epsilon = 0.3
iters = 4
[[loss]]
kind = "hidden"
metric = "cosine"
layers = [[0, 1], [1, 0]]
"#;

#[test]
fn the_registry_is_the_only_list_of_kinds() {
    // every kind the README documents is in the registry, and the run file accepts each of them
    let names: Vec<&str> = registry::REGISTRY.iter().map(|s| s.name).collect();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for n in &names {
        assert!(
            readme.contains(&format!("`{n}`")),
            "README lacks the kind {n}"
        );
    }
    let dir = tiny_run_dir();
    let cfg = RunConfig::from_str(&run_text(ALL_KINDS, ""), &dir.path().join("run.toml")).unwrap();
    let used: Vec<&str> = cfg.losses.iter().map(|l| l.spec.name).collect();
    assert_eq!(used, names);
}

#[test]
fn the_objective_dispatch_equals_each_loss_called_directly() {
    let dir = tiny_run_dir();
    let cfg = RunConfig::from_str(&run_text(ALL_KINDS, ""), &dir.path().join("run.toml")).unwrap();
    let objective = Objective::new(&cfg.losses, 10).unwrap();
    tch::manual_seed(11);
    let (n, v) = (6, 17);
    let s = Tensor::randn([n, v], (Kind::Double, Device::Cpu)) * 2.0;
    let t = Tensor::randn([n, v], (Kind::Double, Device::Cpu)) * 3.0;
    let labels = Tensor::from_slice(&[3i64, -100, 16, 0, 5, 9]);
    let w = Tensor::from_slice(&[1.0f32, 0.0, 0.5, 2.0, 1.0, 0.25]);
    let got = objective
        .compute(
            &s,
            Some(&TeacherDist::Dense(t.shallow_clone())),
            &labels,
            &w,
        )
        .unwrap();
    let wd = w.to_kind(Kind::Double);
    let taid_at = {
        let mut taid = distill::losses::Taid::new(0.2, 0.9, 0.01, 0.5, 10).unwrap();
        taid.restore(distill::losses::taid::TaidState {
            lambda: 0.2,
            momentum: 0.0,
            prev_loss: None,
        });
        taid
    };
    let tsd = distill::losses::token_selective::TokenSelectiveConfig {
        beta: 0.7,
        entropy_quantile: 0.3,
        top_k: 3,
        temperature: 1.4,
        w_jsd: 0.9,
        w_entropy: 0.4,
        w_rank: 0.2,
    };
    let m = Some(&wd);
    use distill::losses as l;
    // sinkhorn: rows are the positions of weight > 0
    let keep = Tensor::from_slice(&[0i64, 2, 3, 4, 5]);
    let direct = [
        l::hinton::cross_entropy(&s, &labels, m).unwrap(),
        l::forward_kl(&s, &t, 1.7, m).unwrap(),
        l::reverse_kl(&s, &t, 0.6, m).unwrap(),
        l::jsd(&s, &t, 0.2, 1.3, m).unwrap(),
        l::skew_kl(&s, &t, 0.35, 0.8, m).unwrap(),
        l::skew_reverse_kl(&s, &t, 0.65, 1.2, m).unwrap(),
        l::tvd(&s, &t, 2.5, m).unwrap(),
        l::adaptive_kl(&s, &t, 0.3, 1.1, m).unwrap(),
        l::hinton(&s, &t, &labels, 0.25, 3.0, m).unwrap(),
        l::pld(&s, &t, &labels, 0.7, m).unwrap(),
        taid_at.loss(&s, &t, m).unwrap(),
        l::token_selective::token_selective(&s, &t, &tsd, m).unwrap(),
        l::sinkhorn(
            &s.index_select(0, &keep),
            &t.index_select(0, &keep),
            1.5,
            0.3,
            4,
        )
        .unwrap(),
        // a hidden-state term is evaluated by compute_hidden, once per micro-batch: 0 here
        Tensor::from(0.0f64),
    ];
    assert_eq!(got.parts.len(), direct.len());
    let mut total = 0.0;
    for ((name, part), (d, term)) in objective
        .names()
        .iter()
        .zip(&got.parts)
        .zip(direct.iter().zip(&cfg.losses))
    {
        let (a, b) = (part.double_value(&[]), d.double_value(&[]));
        // f64 inputs; the objective reports each term in f32: equal to f32 rounding (2^-24 relative)
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
            "{name}: objective {a} vs direct {b}"
        );
        total += term.weight * b;
    }
    let t_obj = got.total.double_value(&[]);
    assert!(
        (t_obj - total).abs() <= 1e-5 * total.abs(),
        "{t_obj} vs {total}"
    );
}

#[test]
fn weights_of_zero_and_one_equal_a_boolean_mask_and_fractional_weights_match_a_weighted_mean() {
    tch::manual_seed(5);
    let (n, v) = (7, 23);
    let s = Tensor::randn([n, v], (Kind::Double, Device::Cpu)) * 2.0;
    let t = Tensor::randn([n, v], (Kind::Double, Device::Cpu)) * 2.0;
    let labels = Tensor::from_slice(&[1i64, 4, -100, 22, 0, 7, 13]);
    let mask = Tensor::from_slice(&[true, false, true, true, false, true, true]);
    let frac = [0.5f64, 0.0, 1.5, 0.25, 3.0, 1.0, 0.75];
    let wf = Tensor::from_slice(&frac);
    for spec in registry::REGISTRY
        .iter()
        .filter(|s| !["token_selective", "sinkhorn", "hidden"].contains(&s.name))
    {
        let loss = registry::build(spec.name, &[], &BuildContext { total_steps: 5 }).unwrap();
        let value = |w: &Tensor, s: &Tensor, t: &Tensor, l: &Tensor| {
            loss.compute(&LossInput {
                student: s,
                teacher: Some(t),
                reduced: None,
                labels: l,
                weights: w,
            })
            .unwrap()
            .double_value(&[])
        };
        // 0/1 weights give exactly what the boolean mask gives
        let as_bool = value(&mask, &s, &t, &labels);
        let as_float = value(&mask.to_kind(Kind::Float), &s, &t, &labels);
        assert_eq!(as_bool, as_float, "{}", spec.name);
        // fractional weights: Σ w·ℓ / Σ w over positions that count (label not ignored for the
        // label-based kinds), each ℓ the loss of that position alone, all in f64
        let one = Tensor::ones([1], (Kind::Double, Device::Cpu));
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..n {
            let row = |x: &Tensor| x.narrow(0, i, 1);
            let li = row(&labels);
            let labelled = li.int64_value(&[0]) != -100;
            let uses_labels = ["cross_entropy", "hinton", "pld"].contains(&spec.name);
            if uses_labels && !labelled {
                continue;
            }
            let ell = value(&one, &row(&s), &row(&t), &li);
            num += frac[i as usize] * ell;
            den += frac[i as usize];
        }
        let reference = num / den;
        let got = value(&wf, &s, &t, &labels);
        // hinton mixes two means whose weights differ (labelled positions only in its CE part)
        if spec.name == "hinton" {
            continue;
        }
        assert!(
            (got - reference).abs() <= 1e-12 * reference.abs().max(1.0),
            "{}: {got} vs {reference}",
            spec.name
        );
    }
}

#[test]
fn forward_trunk_returns_the_chosen_layers_from_the_same_pass() {
    let cfg = LlamaConfig::tiny(64, 32, 3, 4, 2);
    let m = model::random(&cfg, Device::Cpu, 3).unwrap();
    let ids = Tensor::from_slice(&[1i64, 5, 9, 63, 2, 0]).view([2, 3]);
    let all = m.model.forward_with_hidden(&ids).unwrap();
    let out = m.model.forward_trunk(&ids, &[2, 0]).unwrap();
    assert_eq!(out.layers.len(), 2);
    assert!(out.layers[0].equal(&all.hidden_states[2]));
    assert!(out.layers[1].equal(&all.hidden_states[0]));
    assert!(m.model.head(&out.last).unwrap().equal(&all.logits));
    assert!(m.model.forward_trunk(&ids, &[]).unwrap().layers.is_empty());
    let e = m.model.forward_trunk(&ids, &[3]).unwrap_err().to_string();
    assert!(e.contains("layer 3"), "{e}");
}

#[test]
fn a_bf16_teacher_agrees_with_f32_within_bf16_rounding() {
    let mut cfg = LlamaConfig::tiny(97, 64, 2, 4, 2);
    cfg.tie_word_embeddings = false;
    let f32m = model::random(&cfg, Device::Cpu, 4).unwrap();
    // the same weights (copied: the global RNG is shared with tests running in parallel)
    let mut bf = model::random(&cfg, Device::Cpu, 5).unwrap();
    bf.vs.copy(&f32m.vs).unwrap();
    bf.vs.set_kind(Kind::BFloat16);
    bf.model.set_compute_kind(Kind::BFloat16);
    let ids = Tensor::from_slice(&[3i64, 14, 15, 92, 65, 35, 89, 79]).view([2, 4]);
    let a = f32m.model.forward(&ids).unwrap();
    let b = bf.model.forward(&ids).unwrap();
    assert_eq!(b.kind(), Kind::BFloat16, "the bf16 model computes in bf16");
    // Bound: bf16 keeps 8 significant bits, unit roundoff u = 2^-8. The logits pass through
    // K = 1 (embedding) + L·9 (2 norms, 4 projections, attention, the MLP's product and residual
    // adds) + 2 (final norm, head) = 21 roundings of values of the logits' magnitude or less; to
    // first order the error is at most K·u·max|logits|, here 21/256 ≈ 0.082 of the largest logit.
    let k = 1.0 + 9.0 * cfg.num_hidden_layers as f64 + 2.0;
    let bound = k * 2f64.powi(-8);
    let err = max_rel_err(&b.to_kind(Kind::Float), &a);
    assert!(err <= bound, "bf16 vs f32: {err} > {bound}");
    assert!(
        err > 0.0,
        "the bf16 logits are not rounded at all: not bf16"
    );
}

fn train_in(dir: &Path, loss: &str, extra: &str) -> distill::train::TrainSummary {
    let cfg = RunConfig::from_str(&run_text(loss, extra), &dir.join("run.toml")).unwrap();
    distill::train::train(&cfg, &distill::train::TrainOptions::default()).unwrap()
}

#[test]
fn a_run_leaves_the_teachers_weights_in_memory_unchanged() {
    let dir = tiny_run_dir();
    let s = train_in(dir.path(), "[[loss]]\nkind = \"forward_kl\"", "");
    let (before, after) = &s.teacher_checksums;
    assert!(!before.is_empty() && before.iter().any(|&x| x != 0.0));
    assert_eq!(before, after);
    assert!(
        s.after.kl < s.before.unwrap().kl,
        "the student learned nothing"
    );
}

#[test]
fn a_bf16_student_trains_with_f32_master_weights() {
    let dir = tiny_run_dir();
    std::fs::write(
        dir.path().join("run.toml"),
        run_text("[[loss]]\nkind = \"forward_kl\"", "")
            .replace("path = \"student\"", "path = \"student\"\ndtype = \"bf16\""),
    )
    .unwrap();
    let cfg = RunConfig::load(&dir.path().join("run.toml"), &[]).unwrap();
    assert_eq!(cfg.student.dtype, distill::device::Dtype::Bf16);
    let s = distill::train::train(&cfg, &distill::train::TrainOptions::default()).unwrap();
    let before = s.before.unwrap();
    assert!(s.after.kl < before.kl, "{} !< {}", s.after.kl, before.kl);
    // saved in f32 (the master weights)
    let w = read_tensor(
        &dir.path().join("out/student/model.safetensors"),
        "model.layers.0.mlp.up_proj.weight",
    );
    assert_eq!(w.kind(), Kind::Float);
}

#[test]
fn cuda_is_chosen_in_the_run_file_and_refused_clearly_where_absent() {
    let dir = tiny_run_dir();
    let path = dir.path().join("run.toml");
    // a device beyond any machine's: refused on every machine
    let cfg = RunConfig::from_str(
        &run_text("[[loss]]\nkind = \"forward_kl\"", "device = \"cuda:4096\""),
        &path,
    )
    .unwrap();
    assert_eq!(cfg.run.device, Device::Cuda(4096));
    let e = distill::train::train(&cfg, &distill::train::TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda:4096"), "{e}");
    assert!(!dir.path().join("out").exists(), "nothing is written");
    if !tch::Cuda::is_available() {
        let cfg = RunConfig::from_str(
            &run_text("[[loss]]\nkind = \"forward_kl\"", "device = \"cuda\""),
            &path,
        )
        .unwrap();
        let e = distill::train::train(&cfg, &distill::train::TrainOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("CUDA is not available"), "{e}");
    }
    let e = RunConfig::from_str(
        &run_text("[[loss]]\nkind = \"forward_kl\"", "device = \"gpu\""),
        &path,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("run.toml:") && e.contains("run.device"), "{e}");
    // the command line: one line, exit 2
    let out = distill(&[
        "--device",
        "cuda:4096",
        "inspect",
        dir.path().join("teacher").to_str().unwrap(),
    ]);
    assert_clean_failure(&out, &["cuda:4096"]);
}

#[test]
fn ranges_are_checked_when_the_run_file_is_read_with_its_line() {
    let dir = tiny_run_dir();
    let path = dir.path().join("run.toml");
    // (the term, what the error says, the key whose line it cites)
    for (loss, needle, key) in [
        (
            "[[loss]]\nkind = \"adaptive_kl\"\nmu = 0",
            "mu must be in (0, 1]",
            "mu",
        ),
        (
            "[[loss]]\nkind = \"token_selective\"\ntop_k = 0",
            "top_k must be an integer ≥ 1",
            "top_k",
        ),
        (
            "[[loss]]\nkind = \"taid\"\nt_start = 0.9\nt_end = 0.5",
            "t_start 0.9 exceeds t_end",
            "kind",
        ),
        (
            "[[loss]]\nkind = \"forward_kl\"\nweight = 0",
            "weight must be positive",
            "weight",
        ),
        (
            "[[loss]]\nkind = \"sinkhorn\"\niters = 2.5",
            "iters must be an integer",
            "iters",
        ),
    ] {
        let text = run_text(loss, "");
        let e = RunConfig::from_str(&text, &path).unwrap_err().to_string();
        let line = text
            .lines()
            .position(|l| l.starts_with(&format!("{key} =")))
            .unwrap()
            + 1;
        assert!(e.contains(needle), "{e}");
        assert!(
            e.starts_with(&format!("{}:{line}: loss.0.{key}", path.display())),
            "{e}"
        );
    }
}

#[test]
fn errors_after_set_cite_the_users_line_or_the_set() {
    let dir = tiny_run_dir();
    let path: PathBuf = dir.path().join("run.toml");
    let text = run_text("[[loss]]\nkind = \"jsd\"\nbeta = 1.5", "");
    std::fs::write(&path, &text).unwrap();
    let beta_line = text.lines().position(|l| l.starts_with("beta")).unwrap() + 1;
    // an error in the file, with an unrelated --set: the file's own line
    let e = RunConfig::load(&path, &["optim.lr=1e-3".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("{}:{beta_line}: loss.0.beta", path.display())),
        "{e}"
    );
    // an error that the --set made: the --set
    let good = run_text("[[loss]]\nkind = \"jsd\"", "");
    std::fs::write(&path, &good).unwrap();
    let e = RunConfig::load(&path, &["optim.lr=-1".into()])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--set optim.lr=-1: optim.lr"), "{e}");
    // the demo's built-in file: its own name and line
    let out = distill(&["demo", "--set", "optim.min_lr_ratio=4"]);
    assert_clean_failure(&out, &["--set optim.min_lr_ratio=4", "min_lr_ratio"]);
}

#[test]
fn the_command_lines_threads_win_over_the_run_files() {
    let dir = tiny_run_dir();
    let run = dir.path().join("run.toml");
    std::fs::write(
        &run,
        run_text("[[loss]]\nkind = \"forward_kl\"", "threads = 1"),
    )
    .unwrap();
    let out = distill(&["--threads", "2", "train", run.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/run.json")).unwrap())
            .unwrap();
    assert_eq!(info["threads"], 2);
    let out = distill(&["train", run.to_str().unwrap(), "--overwrite"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/run.json")).unwrap())
            .unwrap();
    assert_eq!(info["threads"], 1);
}
