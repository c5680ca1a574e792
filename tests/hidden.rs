//! Hidden-state distillation (`[[loss]] kind = "hidden"`, losses/hidden.rs, train/hidden.rs):
//! each metric against an f64 reference written here from the doc formula, the gradients (student
//! states and projection) against central differences, the identities, the default layer map, the
//! step's wiring (chunked = unchunked; equal to the loss on `forward_with_hidden`'s states), the run
//! file, and `distill train` between models of different widths: learning, the projection beside
//! `student/` and never inside it, exact resume after SIGKILL, and a teacher store refusing it.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]
mod common;
use common::*;
use distill::config::RunConfig;
use distill::data::Batch;
use distill::losses::hidden::{hidden, Metric, LAYER_NORM_EPS};
use distill::model::{self, LlamaConfig, Tokenizer};
use distill::objective::{HiddenWiring, LossTerm, Objective};
use distill::teacher::Live;
use distill::train::hidden::default_layer_map;
use distill::train::step::{micro_step, StepOptions};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const METRICS: [Metric; 3] = [Metric::Mse, Metric::Cosine, Metric::NormalizedMse];

// ---------------------------------------------------------------- the f64 reference

type Rows = Vec<Vec<f64>>;

fn rows(t: &Tensor) -> Rows {
    let (n, d) = (t.size()[0] as usize, t.size()[1] as usize);
    let flat = Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    (0..n).map(|i| flat[i * d..(i + 1) * d].to_vec()).collect()
}

/// y = P·h (P given as d_t rows of d_s), or h itself.
fn project(p: Option<&Rows>, h: &[f64]) -> Vec<f64> {
    match p {
        Some(p) => p
            .iter()
            .map(|row| row.iter().zip(h).map(|(a, b)| a * b).sum())
            .collect(),
        None => h.to_vec(),
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// The doc formula, position by position: mse, 1 − cos, mse of layer-normed vectors; then
/// Σ w·d / Σ w over positions (0 when Σ w = 0).
fn reference(metric: Metric, hs: &Rows, ht: &Rows, p: Option<&Rows>, w: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for n in 0..hs.len() {
        if w[n] == 0.0 {
            continue;
        }
        let y = project(p, &hs[n]);
        let x = &ht[n];
        let sq = |a: &[f64], b: &[f64]| {
            mean(
                &a.iter()
                    .zip(b)
                    .map(|(u, v)| (u - v) * (u - v))
                    .collect::<Vec<_>>(),
            )
        };
        let d = match metric {
            Metric::Mse => sq(&y, x),
            Metric::Cosine => {
                let dot: f64 = y.iter().zip(x).map(|(a, b)| a * b).sum();
                let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-8);
                1.0 - dot / (norm(&y) * norm(x))
            }
            Metric::NormalizedMse => {
                let ln = |v: &[f64]| {
                    let m = mean(v);
                    let var = mean(&v.iter().map(|a| (a - m) * (a - m)).collect::<Vec<_>>());
                    v.iter()
                        .map(|a| (a - m) / (var + LAYER_NORM_EPS).sqrt())
                        .collect::<Vec<_>>()
                };
                sq(&ln(&y), &ln(x))
            }
        };
        num += w[n] * d;
        den += w[n];
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Student states (n, d_s), teacher states (n, d_t), a projection (d_t, d_s) and fractional
/// weights with zeros, in f64.
struct Problem {
    hs: Tensor,
    ht: Tensor,
    p: Tensor,
    w: Tensor,
}

fn problem(seed: i64, n: i64, d_s: i64, d_t: i64) -> Problem {
    tch::manual_seed(seed);
    let opts = (Kind::Double, Device::Cpu);
    let w: Vec<f64> = (0..n)
        .map(|i| [0.5, 0.0, 1.5, 0.25, 2.0, 1.0][i as usize % 6])
        .collect();
    Problem {
        hs: Tensor::randn([n, d_s], opts) * 1.5 + 0.3,
        ht: Tensor::randn([n, d_t], opts) * 2.0 - 0.5,
        p: Tensor::randn([d_t, d_s], opts) / (d_s as f64).sqrt(),
        w: Tensor::from_slice(&w),
    }
}

fn value(metric: Metric, hs: &Tensor, ht: &Tensor, p: Option<&Tensor>, w: &Tensor) -> f64 {
    hidden(metric, hs, ht, p, Some(w))
        .unwrap()
        .double_value(&[])
}

#[test]
fn each_metric_equals_the_f64_reference() {
    for (d_s, d_t) in [(5, 7), (6, 6)] {
        let pr = problem(1 + d_s, 9, d_s, d_t);
        let p = (d_s != d_t).then(|| pr.p.shallow_clone());
        let p_rows = p.as_ref().map(rows);
        let w = Vec::<f64>::try_from(&pr.w).unwrap();
        for metric in METRICS {
            let want = reference(metric, &rows(&pr.hs), &rows(&pr.ht), p_rows.as_ref(), &w);
            assert!(
                want > 0.1,
                "{metric:?}: a value well above rounding ({want})"
            );
            // f64: the same sums in another order, a few ulps
            let got = value(metric, &pr.hs, &pr.ht, p.as_ref(), &pr.w);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "{metric:?} ({d_s}→{d_t}) f64: {got} vs {want}"
            );
            // f32: each of the ≤ 3·d + 10 roundings on the way is ≤ 2^-24 of quantities of the
            // value's order (inputs of order 1): 1e-5 relative bounds them with room
            let f = |x: &Tensor| x.to_kind(Kind::Float);
            let got = value(
                metric,
                &f(&pr.hs),
                &f(&pr.ht),
                p.as_ref().map(f).as_ref(),
                &f(&pr.w),
            );
            assert!(
                (got - want).abs() <= 1e-5 * want.max(1.0),
                "{metric:?} ({d_s}→{d_t}) f32: {got} vs {want}"
            );
        }
    }
}

#[test]
fn gradients_of_the_student_states_and_the_projection_match_central_differences() {
    let pr = problem(3, 5, 3, 4);
    let h = 1e-6;
    for metric in METRICS {
        let hs = pr.hs.detach().set_requires_grad(true);
        let p = pr.p.detach().set_requires_grad(true);
        let ht = pr.ht.detach().set_requires_grad(true);
        hidden(metric, &hs, &ht, Some(&p), Some(&pr.w))
            .unwrap()
            .backward();
        // the teacher is a constant
        assert!(
            !ht.grad().defined(),
            "{metric:?}: a gradient reached the teacher"
        );
        for (name, x, g) in [
            ("student", &pr.hs, hs.grad()),
            ("projection", &pr.p, p.grad()),
        ] {
            let n = x.numel() as i64;
            let g = g.flatten(0, -1);
            for i in 0..n {
                let at = |delta: f64| {
                    let y = x.copy();
                    let _ = y.view([-1]).get(i).f_add_scalar_(delta).unwrap();
                    let (hs, p) = if name == "student" {
                        (y, pr.p.shallow_clone())
                    } else {
                        (pr.hs.shallow_clone(), y)
                    };
                    value(metric, &hs, &pr.ht, Some(&p), &pr.w)
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let ad = g.double_value(&[i]);
                // central differences: truncation h²·f'''/6 ≈ 1e-12, rounding ≈ 1e-16·|f|/h ≈ 1e-10
                assert!(
                    (fd - ad).abs() <= 1e-7 * ad.abs().max(1.0),
                    "{metric:?}: d/d{name}[{i}]: autograd {ad} vs differences {fd}"
                );
            }
        }
    }
}

#[test]
fn identities_zero_at_equal_states_scale_invariance_and_masking() {
    let pr = problem(5, 8, 6, 6);
    let x = &pr.ht;
    let eye = Tensor::eye(6, (Kind::Double, Device::Cpu));
    for metric in METRICS {
        // equal states, no projection and P = I: exactly 0 for the squared distances; 1 − cos
        // within a few ulps (the norms go through a square root)
        for p in [None, Some(&eye)] {
            let v = value(metric, x, x, p, &pr.w);
            match metric {
                Metric::Cosine => assert!(v.abs() <= 1e-14, "{v}"),
                _ => assert_eq!(v, 0.0, "{metric:?}"),
            }
        }
        // all weights 0: exactly 0
        let zero = pr.w.zeros_like();
        assert_eq!(value(metric, &pr.hs, x, None, &zero), 0.0);
        // a NaN at a position of weight 0 does not leak in
        let poisoned = pr.hs.copy();
        let _ = poisoned.get(1).get(2).fill_(f64::NAN); // weight of position 1 is 0
        assert_eq!(
            value(metric, &poisoned, x, None, &pr.w),
            value(metric, &pr.hs, x, None, &pr.w)
        );
        // non-negative
        assert!(value(metric, &pr.hs, x, Some(&pr.p), &pr.w) >= 0.0);
    }
    // cosine: invariant to the scale of either side (and of P); opposite vectors are at 2
    let base = value(Metric::Cosine, &pr.hs, x, Some(&pr.p), &pr.w);
    let scaled = value(
        Metric::Cosine,
        &(&pr.hs * 3.7),
        &(x * 0.2),
        Some(&(&pr.p * 5.0)),
        &pr.w,
    );
    assert!((scaled - base).abs() <= 1e-14, "{scaled} vs {base}");
    let v = value(Metric::Cosine, &(-x), x, None, &pr.w);
    assert!((v - 2.0).abs() <= 1e-14, "{v}");
    // mse against a zero teacher is the weighted mean of mean(y²)
    let w = Vec::<f64>::try_from(&pr.w).unwrap();
    let want = reference(Metric::Mse, &rows(&pr.hs), &rows(&(x * 0.0)), None, &w);
    let got = value(Metric::Mse, &pr.hs, &(x * 0.0), None, &pr.w);
    assert!((got - want).abs() <= 1e-12 * want);
    // normalized_mse: a per-position shift of either side changes nothing (to rounding); a scale a
    // changes each layer-normed vector's length by a factor within ε/(2·var) of 1, so the value
    // by at most about 2·δ·√(d·value) with δ = ε/(2·smallest var): the bound checked here
    let nm = |a: &Tensor, b: &Tensor| value(Metric::NormalizedMse, a, b, None, &pr.w);
    let base = nm(&pr.hs, x);
    assert!((nm(&(&pr.hs + 4.0), &(x - 2.5)) - base).abs() <= 1e-12 * base);
    let var_min = pr
        .hs
        .var_dim(-1, false, false)
        .min()
        .double_value(&[])
        .min(x.var_dim(-1, false, false).min().double_value(&[]));
    let delta = LAYER_NORM_EPS / (2.0 * var_min);
    let bound = 2.0 * delta * (6.0 * base.max(1.0)).sqrt() + delta * delta * 6.0;
    let scaled = nm(&(&pr.hs * 10.0), x);
    assert!(
        (scaled - base).abs() <= bound,
        "{scaled} vs {base} (bound {bound})"
    );
}

#[test]
fn shapes_that_do_not_fit_are_refused_by_name() {
    let pr = problem(9, 4, 3, 5);
    let e = hidden(Metric::Mse, &pr.hs, &pr.ht, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("width 3 differs from the teacher's 5"), "{e}");
    let e = hidden(Metric::Mse, &pr.hs, &pr.ht, Some(&pr.p.tr()), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'projection' has shape [3, 5], expected [5, 3]"),
        "{e}"
    );
    let e = hidden(
        Metric::Mse,
        &pr.hs.narrow(0, 0, 3),
        &pr.ht,
        Some(&pr.p),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("same positions"), "{e}");
}

#[test]
fn the_default_layer_map_is_the_copied_layers_else_uniform() {
    // copied from the teacher: student layer k ↔ the teacher layer it was copied from
    assert_eq!(
        default_layer_map(3, 30, Some(&[0, 14, 29])),
        vec![(0, 0), (1, 14), (2, 29)]
    );
    // uniform: k ↔ ⌊(k + 1)·n_t/n_s⌋ − 1, the last facing the last
    assert_eq!(default_layer_map(2, 4, None), vec![(0, 1), (1, 3)]);
    assert_eq!(
        default_layer_map(3, 30, None),
        vec![(0, 9), (1, 19), (2, 29)]
    );
    assert_eq!(default_layer_map(3, 3, None), vec![(0, 0), (1, 1), (2, 2)]);
    // a deeper student than teacher: several student layers share a teacher layer
    assert_eq!(
        default_layer_map(4, 2, None),
        vec![(0, 0), (1, 0), (2, 0), (3, 1)]
    );
}

#[test]
fn the_objective_averages_its_pairs_and_names_each_state_by_layer() {
    // student layers 0 and 2 against teacher layers 3 and 1: compute_hidden takes the states in
    // the order hidden_layers() gives, and pairs them by layer
    let term = LossTerm::new("hidden", &[("metric", 1.0)], 0.5)
        .unwrap()
        .with_layers(vec![(2, 1), (0, 3)])
        .unwrap();
    assert_eq!(
        term.describe(),
        "hidden(metric=cosine, layers=[[2, 1], [0, 3]])"
    );
    let kl = LossTerm::new("forward_kl", &[], 1.0).unwrap();
    let mut obj = Objective::new(&[kl, term], 10).unwrap();
    assert_eq!(obj.hidden_terms(), vec![1]);
    let pr = problem(11, 6, 4, 5);
    obj.wire_hidden(
        1,
        HiddenWiring {
            pairs: vec![(2, 1), (0, 3)],
            projection: Some(pr.p.shallow_clone()),
        },
    )
    .unwrap();
    assert!(obj
        .wire_hidden(
            0,
            HiddenWiring {
                pairs: vec![],
                projection: None
            }
        )
        .is_err());
    assert_eq!(obj.hidden_layers(), (vec![0, 2], vec![1, 3]));
    let (s0, s2) = (&pr.hs, &(&pr.hs * -0.7 + 1.0));
    let (t1, t3) = (&pr.ht, &(&pr.ht * 1.3 - 0.2));
    let v = obj
        .compute_hidden(
            &[s0.shallow_clone(), s2.shallow_clone()],
            &[t1.shallow_clone(), t3.shallow_clone()],
            &pr.w,
        )
        .unwrap();
    let w = Vec::<f64>::try_from(&pr.w).unwrap();
    let p = rows(&pr.p);
    let want = 0.5
        * (reference(Metric::Cosine, &rows(s2), &rows(t1), Some(&p), &w)
            + reference(Metric::Cosine, &rows(s0), &rows(t3), Some(&p), &w));
    let got = v.parts[1].double_value(&[]);
    // f64 states, the term reported in f32
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    assert_eq!(
        v.parts[0].double_value(&[]),
        0.0,
        "the logit term is not evaluated here"
    );
    assert!((v.total.double_value(&[]) - 0.5 * want).abs() <= 1e-6 * want);
    // and `compute` leaves the hidden term at 0
    let s = Tensor::randn([6, 9], (Kind::Float, Device::Cpu));
    let t = Tensor::randn([6, 9], (Kind::Float, Device::Cpu));
    let labels = Tensor::zeros([6], (Kind::Int64, Device::Cpu));
    let c = obj
        .compute(
            &s,
            Some(&distill::teacher::TeacherDist::Dense(t)),
            &labels,
            &pr.w.to_kind(Kind::Float),
        )
        .unwrap();
    assert_eq!(c.parts[1].double_value(&[]), 0.0);
    assert!(c.parts[0].double_value(&[]) > 0.0);
}

// ---------------------------------------------------------------- the step

fn grads(vs: &tch::nn::VarStore, p: &Tensor) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, grad_or_zero(&t)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.push(("projection".into(), grad_or_zero(p)));
    v
}

/// A variable's gradient, zeros when it has none (the final norm gets none from a hidden term).
fn grad_or_zero(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g.copy()
    } else {
        t.zeros_like()
    }
}

fn zero(vs: &tch::nn::VarStore, p: &mut Tensor) {
    for (_, mut v) in vs.variables() {
        v.zero_grad();
    }
    p.zero_grad();
}

#[test]
fn the_step_takes_the_states_from_its_forward_passes_chunked_or_not() {
    let mut t_cfg = LlamaConfig::tiny(97, 48, 3, 4, 2);
    t_cfg.tie_word_embeddings = true;
    let teacher = model::random(&t_cfg, Device::Cpu, 1).unwrap();
    let s_cfg = LlamaConfig::tiny(97, 32, 2, 4, 2);
    let student = model::random(&s_cfg, Device::Cpu, 2).unwrap();
    tch::manual_seed(3);
    let ids = Tensor::randint(97, [3, 11], (Kind::Int64, Device::Cpu));
    let labels = ids.roll([-1], [1]);
    let _ = labels.narrow(1, 10, 1).fill_(-100);
    let _ = labels.narrow(0, 1, 1).narrow(1, 0, 4).fill_(-100); // a prompt that does not count
    let mut batch = Batch::from_ids_labels(&ids, &labels).unwrap();
    let w: Vec<f32> = batch
        .host_weights()
        .iter()
        .enumerate()
        .map(|(i, &w)| w * (0.25 + (i % 4) as f32 * 0.5))
        .collect();
    batch.set_weights(&w).unwrap();
    let mut p = (Tensor::randn([48, 32], (Kind::Float, Device::Cpu)) * 0.2).set_requires_grad(true);
    let pairs = vec![(0, 1), (1, 2)];
    let hidden_term = |metric: f64| {
        LossTerm::new("hidden", &[("metric", metric)], 0.7)
            .unwrap()
            .with_layers(pairs.clone())
            .unwrap()
    };
    let live = Live::new(&teacher.model);
    // the states `forward_with_hidden` gives, compared directly
    let s_out = student.model.forward_with_hidden(&ids).unwrap();
    let t_out = tch::no_grad(|| teacher.model.forward_with_hidden(&ids)).unwrap();
    let (_, wf) = batch.flat_targets().unwrap();
    for metric in [0.0, 1.0, 2.0] {
        let m = METRICS[metric as usize];
        let direct: f64 = pairs
            .iter()
            .map(|&(s, t)| {
                value(
                    m,
                    &s_out.hidden_states[s].flatten(0, 1).detach(),
                    &t_out.hidden_states[t].flatten(0, 1),
                    Some(&p.detach()),
                    &wf,
                )
            })
            .sum::<f64>()
            / 2.0;
        for with_kl in [false, true] {
            let mut terms = vec![hidden_term(metric)];
            if with_kl {
                terms.insert(0, LossTerm::new("forward_kl", &[], 1.0).unwrap());
            }
            let mut obj = Objective::new(&terms, 10).unwrap();
            let at = obj.hidden_terms()[0];
            obj.wire_hidden(
                at,
                HiddenWiring {
                    pairs: pairs.clone(),
                    projection: Some(p.shallow_clone()),
                },
            )
            .unwrap();
            zero(&student.vs, &mut p);
            let whole = micro_step(
                &student.model,
                Some(&live),
                &obj,
                &batch,
                &StepOptions::new(None, 0.5),
            )
            .unwrap();
            let g_whole = grads(&student.vs, &p);
            // the hidden part is the loss on forward_with_hidden's states (times the step's scale);
            // f32 sums over 33 positions of d ≤ 48: 1e-5 relative
            let part = whole.parts[at] / 0.5;
            assert!(
                (part - direct).abs() <= 1e-5 * direct,
                "{m:?}: step {part} vs direct {direct}"
            );
            assert!(
                g_whole
                    .last()
                    .unwrap()
                    .1
                    .abs()
                    .sum(Kind::Double)
                    .double_value(&[])
                    > 0.0
            );
            for chunk in [1usize, 5, 64] {
                zero(&student.vs, &mut p);
                let c = micro_step(
                    &student.model,
                    Some(&live),
                    &obj,
                    &batch,
                    &StepOptions::new(Some(chunk), 0.5),
                )
                .unwrap();
                assert!(
                    (c.loss - whole.loss).abs() <= 1e-5 * whole.loss.abs(),
                    "{m:?} chunk {chunk}: {} vs {}",
                    c.loss,
                    whole.loss
                );
                for ((name, g), (_, h)) in grads(&student.vs, &p).iter().zip(&g_whole) {
                    let scale = h.abs().max().double_value(&[]).max(1e-12);
                    let diff = (g - h).abs().max().double_value(&[]);
                    assert!(
                        diff / scale < 1e-5,
                        "{m:?} chunk {chunk}: gradient of {name} differs by {diff} (scale {scale})"
                    );
                }
            }
            // the gradients of a hidden-only objective are those of the direct computation
            if !with_kl {
                zero(&student.vs, &mut p);
                let s_out = student.model.forward_with_hidden(&ids).unwrap();
                let direct: Tensor = pairs
                    .iter()
                    .map(|&(s, t)| {
                        hidden(
                            m,
                            &s_out.hidden_states[s].flatten(0, 1),
                            &t_out.hidden_states[t].flatten(0, 1),
                            Some(&p),
                            Some(&wf),
                        )
                        .unwrap()
                    })
                    .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b)
                    * (0.7 * 0.5 / 2.0);
                direct.backward();
                for ((name, g), (_, h)) in grads(&student.vs, &p).iter().zip(&g_whole) {
                    let scale = g.abs().max().double_value(&[]).max(1e-12);
                    let diff = (g - h).abs().max().double_value(&[]);
                    assert!(
                        diff / scale < 1e-5,
                        "{m:?}: gradient of {name}: step vs direct differ by {diff} (scale {scale})"
                    );
                }
            }
        }
    }
    // no teacher: refused, never silently 0
    let mut obj = Objective::new(&[hidden_term(0.0)], 10).unwrap();
    obj.wire_hidden(
        0,
        HiddenWiring {
            pairs: pairs.clone(),
            projection: Some(p.shallow_clone()),
        },
    )
    .unwrap();
    let e = micro_step(
        &student.model,
        None,
        &obj,
        &batch,
        &StepOptions::new(None, 1.0),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("hidden states"), "{e}");
    // an unwired term: refused by name, never silently 0
    let obj = Objective::new(&[hidden_term(0.0)], 10).unwrap();
    assert_eq!(obj.hidden_layers(), (vec![], vec![]));
    let e = micro_step(
        &student.model,
        Some(&live),
        &obj,
        &batch,
        &StepOptions::new(None, 1.0),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        e.contains("loss term 'hidden': its layer map was not settled"),
        "{e}"
    );
}

// ---------------------------------------------------------------- the run file and `distill train`

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A teacher (d = 48, 4 layers, opinionated: large logits) and a narrower random student (d = 32,
/// 2 layers) with the same tokenizer, and training text.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let save = |cfg: &LlamaConfig, seed: i64, scale: f64, name: &str| {
            let mut cfg = cfg.clone();
            cfg.eos_token_ids = vec![256];
            let mut m = model::random(&cfg, Device::Cpu, seed).unwrap();
            tch::no_grad(|| {
                let mut e = m.vs.variables()["model.embed_tokens.weight"].shallow_clone();
                let _ = e.f_mul_scalar_(scale).unwrap();
            });
            m.tokenizer = Some(Tokenizer::byte_level(SPECIALS).unwrap());
            m.save_hf(&dir.path().join(name)).unwrap();
        };
        save(&LlamaConfig::tiny(259, 48, 4, 4, 2), 7, 150.0, "teacher");
        save(&LlamaConfig::tiny(259, 32, 2, 4, 2), 8, 1.0, "student");
        let words = [
            "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "in", "rain",
        ];
        let mut x: u64 = 12345;
        let mut text = String::new();
        for i in 0..4000 {
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

    fn run_file(&self, name: &str, teacher: &str, output: &str, loss: &str) -> PathBuf {
        let text = format!(
            r#"
[teacher]
{teacher}

[student]
path = "student"

[data]
train = "train.txt"
seq_len = 32
validation_fraction = 0.1
max_validation_sequences = 8

{loss}

[optim]
lr = 3e-3
warmup_steps = 2
micro_batch = 4

[run]
steps = 30
log_every = 1
eval_every = 10
checkpoint_every = 5
threads = 2
seed = 3
output = "{output}"
"#
        );
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

const TEACHER: &str = "path = \"teacher\"";
const KL_AND_HIDDEN: &str = "[[loss]]\nkind = \"forward_kl\"\n\n[[loss]]\nkind = \"hidden\"\nmetric = \"cosine\"\nweight = 0.5\n";

fn train_values(recs: &[Value], key: &str) -> Vec<f64> {
    recs.iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r[key].as_f64().unwrap())
        .collect()
}

#[test]
fn the_run_file_reads_metric_and_layers_and_refuses_what_does_not_fit() {
    let s = Setup::new();
    let cfg = |loss: &str| {
        let p = s.run_file("r.toml", TEACHER, "out", loss);
        RunConfig::load(&p, &[])
    };
    let c = cfg(
        "[[loss]]\nkind = \"hidden\"\nmetric = \"normalized_mse\"\nlayers = [[0, 1], [1, 3]]\n",
    )
    .unwrap();
    assert_eq!(c.losses[0].layers, Some(vec![(0, 1), (1, 3)]));
    assert_eq!(
        c.losses[0].describe(),
        "hidden(metric=normalized_mse, layers=[[0, 1], [1, 3]])"
    );
    assert_eq!(
        cfg("[[loss]]\nkind = \"hidden\"\n").unwrap().losses[0].describe(),
        "hidden(metric=mse)"
    );
    let err = |loss: &str| cfg(loss).unwrap_err().to_string();
    let e = err("[[loss]]\nkind = \"hidden\"\nmetric = \"l1\"\n");
    assert!(
        e.contains("r.toml:16: loss.0.metric: 'l1' is not one of mse, cosine, normalized_mse"),
        "{e}"
    );
    let e = err("[[loss]]\nkind = \"hidden\"\nmetric = 1\n");
    assert!(
        e.contains("loss.0.metric: invalid type: integer, expected a string"),
        "{e}"
    );
    let e = err("[[loss]]\nkind = \"forward_kl\"\nlayers = [[0, 1]]\n");
    assert!(
        e.contains("loss.0.layers: 'layers' does not apply to 'forward_kl'"),
        "{e}"
    );
    let e = err("[[loss]]\nkind = \"hidden\"\nlayers = [[0]]\n");
    assert!(
        e.contains("loss.0.layers: expected a list of [student layer, teacher layer] pairs"),
        "{e}"
    );
    let e = err("[[loss]]\nkind = \"hidden\"\nlayers = [[0, -1]]\n");
    assert!(e.contains("loss.0.layers: expected a list"), "{e}");
    let e = err("[[loss]]\nkind = \"hidden\"\nlayers = []\n");
    assert!(e.contains("loss.0.layers: must list at least one"), "{e}");
    let e = err("[[loss]]\nkind = \"hidden\"\ntemperature = 2\n");
    assert!(
        e.contains("'temperature' does not apply to 'hidden' (it takes: metric, layers)"),
        "{e}"
    );
    // a layer the models do not have: refused at set-up, naming the key, before anything is written
    let run = s.run_file(
        "bad.toml",
        TEACHER,
        "bad",
        "[[loss]]\nkind = \"hidden\"\nlayers = [[0, 1], [1, 4]]\n",
    );
    let out = distill(&["train", run.to_str().unwrap()]);
    assert_clean_failure(
        &out,
        &["loss.0.layers: teacher layer 4 does not exist (the teacher has layers 0..3)"],
    );
    assert!(!s.path("bad").exists());
}

#[test]
fn a_run_between_widths_learns_and_writes_the_projection_beside_the_student() {
    let s = Setup::new();
    let run = s.run_file("run.toml", TEACHER, "out", KL_AND_HIDDEN);
    train_ok(&["train", run.to_str().unwrap()]);
    let recs = records(&s.path("out/metrics.jsonl"));
    for key in ["loss", "hidden"] {
        let v = train_values(&recs, key);
        assert_eq!(v.len(), 30);
        let first: f64 = v[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = v[25..].iter().sum::<f64>() / 5.0;
        assert!(
            last < 0.8 * first,
            "{key} did not go down: {first} -> {last}"
        );
    }
    // the default map between 2 and 4 layers is uniform; the widths differ, so P is learned
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("out/run.json")).unwrap()).unwrap();
    assert_eq!(
        info["hidden_layers"],
        serde_json::json!([{"term": "hidden", "pairs": [[0, 1], [1, 3]], "projection": true}])
    );
    // beside student/, never inside it
    let proj = s.path("out/projection.safetensors");
    let p = read_tensor(&proj, "loss.1.projection.weight");
    assert_eq!(p.size(), [48, 32]);
    let student_files: Vec<String> = std::fs::read_dir(s.path("out/student"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        student_files.iter().all(|f| !f.contains("projection")),
        "{student_files:?}"
    );
    let student = model::load(&s.path("out/student"), Device::Cpu).unwrap();
    assert!(student
        .vs
        .variables()
        .keys()
        .all(|k| !k.contains("projection") && !k.starts_with("loss.")));
    assert_eq!(student.model.config.hidden_size, 32);
    // the checkpoints hold it too; it was trained (it moved between them), and the output's is the
    // last checkpoint's
    let at = |step: &str| {
        read_tensor(
            &s.path(&format!("out/checkpoints/{step}/projection.safetensors")),
            "loss.1.projection.weight",
        )
    };
    assert!(at("step-00000030").equal(&p));
    assert!(!at("step-00000025").equal(&p));
    let opt = std::fs::read(s.path("out/checkpoints/step-00000030/optimizer.safetensors")).unwrap();
    let opt = safetensors::SafeTensors::deserialize(&opt).unwrap();
    assert!(
        opt.names().contains(&"m.loss.1.projection.weight"),
        "the projection's moments are in the optimizer state"
    );
}

#[test]
fn a_teacher_store_refuses_the_hidden_term_in_one_line() {
    let s = Setup::new();
    // capture every sequence the run reads
    let cap = s.run_file(
        "cap.toml",
        "path = \"teacher\"\nstore = \"store\"",
        "cap",
        "[[loss]]\nkind = \"forward_kl\"\n",
    );
    train_ok(&["capture", cap.to_str().unwrap()]);
    for (name, teacher) in [
        ("store_only.toml", "store = \"store\""),
        ("hybrid.toml", "path = \"teacher\"\nstore = \"store\""),
    ] {
        let run = s.run_file(name, teacher, "refused", KL_AND_HIDDEN);
        let out = distill(&["train", run.to_str().unwrap()]);
        assert_clean_failure(
            &out,
            &[
                "teacher.store = ",
                "loss term 'hidden' is not defined on a teacher store",
                "a store holds only the teacher's output distribution",
            ],
        );
        assert!(!s.path("refused").exists(), "{name}: nothing written");
    }
}

// uses the DISTILL_FAULT_* hooks: built with `--features fault-injection` (scripts/test.sh)
#[cfg(feature = "fault-injection")]
#[test]
fn a_run_with_a_projection_resumes_exactly_after_sigkill() {
    let s = Setup::new();
    let full = s.run_file("full.toml", TEACHER, "full", KL_AND_HIDDEN);
    train_ok(&["train", full.to_str().unwrap()]);
    // a "random" kill step in 6..=27, from the clock: the resume starts from a checkpoint with a
    // projection and its optimizer moments
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let kill_at = 6 + nanos % 22;
    let run = s.run_file("killed.toml", TEACHER, "killed", KL_AND_HIDDEN);
    let metrics = s.path("killed/metrics.jsonl");
    let mut child = spawn_train(&run, &[("DISTILL_FAULT_STEP_DELAY_MS", "40")]);
    let t = Instant::now();
    while last_step(&metrics) < kill_at {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let reached = last_step(&metrics);
    assert!(
        reached < 30,
        "the run finished before the kill (step {reached})"
    );
    train_ok(&["train", run.to_str().unwrap(), "--resume"]);
    for file in ["student/model.safetensors", "projection.safetensors"] {
        assert_eq!(
            std::fs::read(s.path("killed").join(file)).unwrap(),
            std::fs::read(s.path("full").join(file)).unwrap(),
            "killed at step {reached}: {file} differs"
        );
    }
    let (a, b) = (records(&s.path("full/metrics.jsonl")), records(&metrics));
    for key in ["loss", "hidden", "forward_kl"] {
        assert_eq!(
            train_values(&a, key),
            train_values(&b, key),
            "{key} per step"
        );
    }
}
