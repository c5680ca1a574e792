//! The objective computed over the vocabulary in chunks of positions gives the same value and the
//! same gradients as the whole-tensor computation.
use distill::config::{LossKind, LossTerm};
use distill::model::{self, LlamaConfig};
use distill::objective::Objective;
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
    s_cfg.tie_word_embeddings = false;
    let student = model::random(&s_cfg, Device::Cpu, 2).unwrap();
    tch::manual_seed(3);
    let ids = Tensor::randint(97, [3, 11], (Kind::Int64, Device::Cpu));
    let labels = ids.roll([-1], [1]);
    let _ = labels.narrow(1, 10, 1).fill_(-100);
    let _ = labels.narrow(0, 1, 1).narrow(1, 0, 4).fill_(-100); // a prompt that does not count
    let t = |k: LossKind, w: f64| LossTerm { kind: k, weight: w };
    let objectives = vec![
        vec![t(LossKind::ForwardKl { temperature: 2.0 }, 1.0)],
        vec![
            t(LossKind::ReverseKl { temperature: 1.0 }, 1.0),
            t(LossKind::CrossEntropy, 0.3),
        ],
        vec![t(
            LossKind::Jsd {
                beta: 0.3,
                temperature: 1.5,
            },
            1.0,
        )],
        vec![
            t(
                LossKind::SkewKl {
                    alpha: 0.1,
                    temperature: 1.0,
                },
                0.5,
            ),
            t(LossKind::Tvd { temperature: 1.0 }, 0.5),
        ],
        vec![t(
            LossKind::AdaptiveKl {
                mu: 0.5,
                temperature: 1.0,
            },
            1.0,
        )],
        vec![t(
            LossKind::Hinton {
                alpha: 0.6,
                temperature: 2.0,
            },
            1.0,
        )],
        vec![t(LossKind::Pld { tau: 1.0 }, 1.0)],
        vec![t(
            LossKind::Taid {
                t_start: 0.4,
                t_end: 1.0,
                alpha: 5e-4,
                beta: 0.99,
            },
            1.0,
        )],
    ];
    for terms in objectives {
        let obj = Objective::new(&terms, 10).unwrap();
        assert!(obj.chunkable());
        for (_, mut v) in student.vs.variables() {
            v.zero_grad();
        }
        let whole = obj
            .micro_step(
                &student.model,
                Some(&teacher.model),
                &ids,
                &labels,
                None,
                0.5,
                false,
            )
            .unwrap();
        let g_whole = grads(&student.vs);
        for chunk in [1usize, 5, 7, 64] {
            for (_, mut v) in student.vs.variables() {
                v.zero_grad();
            }
            let part = obj
                .micro_step(
                    &student.model,
                    Some(&teacher.model),
                    &ids,
                    &labels,
                    Some(chunk),
                    0.5,
                    false,
                )
                .unwrap();
            let rel = (part.loss - whole.loss).abs() / whole.loss.abs().max(1e-12);
            assert!(
                rel < 1e-5,
                "{:?} chunk {chunk}: loss {} vs {}",
                terms[0].kind,
                part.loss,
                whole.loss
            );
            for (a, b) in part.parts.iter().zip(&whole.parts) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1e-6),
                    "{:?}: part {a} vs {b}",
                    terms[0].kind
                );
            }
            for ((name, g), (_, h)) in grads(&student.vs).iter().zip(&g_whole) {
                let scale = h.abs().max().double_value(&[]).max(1e-12);
                let diff = (g - h).abs().max().double_value(&[]);
                assert!(
                    diff / scale < 1e-5,
                    "{:?} chunk {chunk}: gradient of {name} differs by {diff} (scale {scale})",
                    terms[0].kind
                );
            }
        }
        for (_, mut v) in student.vs.variables() {
            v.zero_grad();
        }
    }
}
