//! The objective computed over the vocabulary in chunks of positions gives the same value and the
//! same gradients as the whole-tensor computation, with 0/1 and with fractional per-token weights.
//! Tolerance 1e-5 relative: the two differ only in how f32 sums over ≤ 33 positions are grouped and
//! scaled (each chunk's mean times its share), a difference bounded by a few times 33·2^-24 ≈ 2e-6.
use distill::data::Batch;
use distill::model::{self, LlamaConfig};
use distill::objective::{LossTerm, Objective};
use distill::teacher::Live;
use distill::train::step::{micro_step, StepOptions};
use tch::{Device, Kind, Tensor};

fn grads(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.grad().copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn chunked_objective_equals_unchunked() {
    chunked_equals_unchunked(false);
}

/// A tied student's head weight is its embedding: the chunks' ∂L/∂W (added by hand, in place) and
/// the trunk's embedding gradient (autograd's) meet in one buffer, which the first chunked step of
/// a fresh student has not yet allocated.
#[test]
fn chunked_objective_equals_unchunked_with_a_tied_head() {
    chunked_equals_unchunked(true);
}

fn chunked_equals_unchunked(tied: bool) {
    let mut cfg = LlamaConfig::tiny(97, 32, 2, 4, 2);
    cfg.tie_word_embeddings = true;
    let teacher = model::random(&cfg, Device::Cpu, 1).unwrap();
    // an opinionated teacher (large logits), so that every divergence is well above rounding
    tch::no_grad(|| {
        let mut e = teacher.vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = e.f_mul_scalar_(100.0).unwrap();
    });
    let mut s_cfg = cfg.clone();
    s_cfg.num_hidden_layers = 1;
    s_cfg.tie_word_embeddings = tied;
    let student = model::random(&s_cfg, Device::Cpu, 2).unwrap();
    tch::manual_seed(3);
    let ids = Tensor::randint(97, [3, 11], (Kind::Int64, Device::Cpu));
    let labels = ids.roll([-1], [1]);
    let _ = labels.narrow(1, 10, 1).fill_(-100);
    let _ = labels.narrow(0, 1, 1).narrow(1, 0, 4).fill_(-100); // a prompt that does not count
    let t = |k: &str, p: &[(&str, f64)], w: f64| LossTerm::new(k, p, w).unwrap();
    let objectives = [
        vec![t("forward_kl", &[("temperature", 2.0)], 1.0)],
        vec![t("reverse_kl", &[], 1.0), t("cross_entropy", &[], 0.3)],
        vec![t("jsd", &[("beta", 0.3), ("temperature", 1.5)], 1.0)],
        vec![t("skew_kl", &[("alpha", 0.1)], 0.5), t("tvd", &[], 0.5)],
        vec![t("adaptive_kl", &[("mu", 0.5)], 1.0)],
        vec![t("hinton", &[("alpha", 0.6), ("temperature", 2.0)], 1.0)],
        vec![t("pld", &[("tau", 1.0)], 1.0)],
        vec![t("taid", &[], 1.0)],
    ];
    // the same positions with 0/1 weights, and with fractional ones (a per-token weighting)
    let plain = Batch::from_ids_labels(&ids, &labels).unwrap();
    let mut fractional = Batch::from_ids_labels(&ids, &labels).unwrap();
    let w: Vec<f32> = plain
        .host_weights()
        .iter()
        .enumerate()
        .map(|(i, &w)| w * (0.25 + (i % 4) as f32 * 0.5))
        .collect();
    fractional.set_weights(&w).unwrap();
    let teacher = Live::new(&teacher.model);
    for (terms, batch) in objectives
        .iter()
        .flat_map(|t| [(t, &plain), (t, &fractional)])
    {
        let obj = Objective::new(terms, 10).unwrap();
        assert!(obj.chunkable());
        for (_, mut v) in student.vs.variables() {
            v.zero_grad();
        }
        let whole = micro_step(
            &student.model,
            Some(&teacher),
            &obj,
            batch,
            &StepOptions::new(None, 0.5),
        )
        .unwrap();
        let g_whole = grads(&student.vs);
        for chunk in [1usize, 5, 7, 64] {
            // a fresh student (no gradient buffers yet) with the same weights (copied: the tests
            // of this file run in parallel and tch's seed is global)
            let mut fresh = model::random(&s_cfg, Device::Cpu, 2).unwrap();
            fresh.vs.copy(&student.vs).unwrap();
            let part = micro_step(
                &fresh.model,
                Some(&teacher),
                &obj,
                batch,
                &StepOptions::new(Some(chunk), 0.5),
            )
            .unwrap();
            let rel = (part.loss - whole.loss).abs() / whole.loss.abs().max(1e-12);
            assert!(
                rel < 1e-5,
                "{:?} chunk {chunk}: loss {} vs {}",
                terms[0].spec.name,
                part.loss,
                whole.loss
            );
            for (a, b) in part.parts.iter().zip(&whole.parts) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1e-6),
                    "{:?}: part {a} vs {b}",
                    terms[0].spec.name
                );
            }
            for ((name, g), (_, h)) in grads(&fresh.vs).iter().zip(&g_whole) {
                let scale = h.abs().max().double_value(&[]).max(1e-12);
                let diff = (g - h).abs().max().double_value(&[]);
                assert!(
                    diff / scale < 1e-5,
                    "{:?} chunk {chunk}: gradient of {name} differs by {diff} (scale {scale})",
                    terms[0].spec.name
                );
            }
        }
        for (_, mut v) in student.vs.variables() {
            v.zero_grad();
        }
    }
}

/// A student computing in bf16 with f32 weights: the chunks' ∂L/∂W is formed in f32 from the bf16
/// G and h (autograd's whole-tensor backward forms it in bf16 and casts it), so the two agree to
/// bf16's rounding: each gradient entry within a few units of 2^-8 of the largest one.
#[test]
fn a_bf16_student_chunked_equals_unchunked_within_bf16_rounding() {
    let (teacher, s_cfg) = teacher_and_student_config(true);
    let first = model::random(&s_cfg, Device::Cpu, 2).unwrap();
    let bf16 = || {
        let mut m = model::random(&s_cfg, Device::Cpu, 2).unwrap();
        m.vs.copy(&first.vs).unwrap(); // the same weights (the seed is global to parallel tests)
        m.model.set_compute_kind(Kind::BFloat16);
        m
    };
    tch::manual_seed(3);
    let ids = Tensor::randint(97, [3, 11], (Kind::Int64, Device::Cpu));
    let labels = ids.roll([-1], [1]);
    let _ = labels.narrow(1, 10, 1).fill_(-100);
    let batch = Batch::from_ids_labels(&ids, &labels).unwrap();
    let obj = Objective::new(&[LossTerm::new("forward_kl", &[], 1.0).unwrap()], 10).unwrap();
    let teacher = Live::new(&teacher.model);
    let whole = bf16();
    let w = micro_step(
        &whole.model,
        Some(&teacher),
        &obj,
        &batch,
        &StepOptions::new(None, 1.0),
    )
    .unwrap();
    let part = bf16();
    let p = micro_step(
        &part.model,
        Some(&teacher),
        &obj,
        &batch,
        &StepOptions::new(Some(7), 1.0),
    )
    .unwrap();
    assert!(
        (p.loss - w.loss).abs() <= 1e-2 * w.loss.abs(),
        "{} vs {}",
        p.loss,
        w.loss
    );
    for ((name, g), (_, h)) in grads(&part.vs).iter().zip(&grads(&whole.vs)) {
        assert_eq!(g.kind(), Kind::Float, "{name}: f32 master gradient");
        let scale = h.abs().max().double_value(&[]).max(1e-12);
        let diff = (g - h).abs().max().double_value(&[]);
        assert!(
            diff / scale < 4.0 * 2f64.powi(-8),
            "{name}: bf16 gradients differ by {diff} (scale {scale})"
        );
    }
}

/// A chunked step whose positions all have weight 0 does no work over the vocabulary, and leaves an
/// untied head without a gradient (the optimizer then skips it: no weight decay on a head the
/// objective never reached), as the whole-tensor step does.
#[test]
fn a_chunked_step_without_weight_leaves_the_head_without_a_gradient() {
    let (teacher, s_cfg) = teacher_and_student_config(false);
    let student = model::random(&s_cfg, Device::Cpu, 2).unwrap();
    let ids = Tensor::arange(22, (Kind::Int64, Device::Cpu)).view([2, 11]);
    let labels = Tensor::full([2, 11], -100, (Kind::Int64, Device::Cpu));
    let batch = Batch::from_ids_labels(&ids, &labels).unwrap();
    let obj = Objective::new(&[LossTerm::new("forward_kl", &[], 1.0).unwrap()], 10).unwrap();
    let teacher = Live::new(&teacher.model);
    for chunk in [None, Some(4)] {
        let m = micro_step(
            &student.model,
            Some(&teacher),
            &obj,
            &batch,
            &StepOptions::new(chunk, 1.0),
        )
        .unwrap();
        assert_eq!(m.loss, 0.0);
        let head = &student.vs.variables()["lm_head.weight"];
        assert!(
            !head.grad().defined(),
            "chunk {chunk:?}: the head got a gradient"
        );
    }
}

/// A random two-layer teacher (vocabulary 97) and the config of a one-layer student of its shape,
/// its head tied to its embedding or not.
fn teacher_and_student_config(tied: bool) -> (model::LoadedModel, LlamaConfig) {
    let cfg = LlamaConfig::tiny(97, 32, 2, 4, 2);
    let teacher = model::random(&cfg, Device::Cpu, 1).unwrap();
    let mut s_cfg = cfg;
    s_cfg.num_hidden_layers = 1;
    s_cfg.tie_word_embeddings = tied;
    (teacher, s_cfg)
}
