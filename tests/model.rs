//! The model on tiny random configs: trainable end to end, and the KV cache gives the same logits
//! as a full forward.
use distill::model::{self, LlamaConfig};
use tch::{Device, Kind, Tensor};

fn ids(b: i64, t: i64, vocab: i64) -> Tensor {
    Tensor::randint(vocab, [b, t], (Kind::Int64, Device::Cpu))
}

#[test]
fn every_parameter_receives_a_gradient() {
    for tied in [true, false] {
        let mut cfg = LlamaConfig::tiny(64, 32, 2, 4, 2);
        cfg.tie_word_embeddings = tied;
        cfg.qkv_bias = true;
        cfg.o_bias = true;
        cfg.mlp_bias = true;
        let m = model::random(&cfg, Device::Cpu, 1).unwrap();
        tch::manual_seed(2);
        let x = ids(2, 12, 64);
        let logits = m.model.forward(&x).unwrap();
        assert_eq!(logits.size(), vec![2, 12, 64]);
        // a loss over all positions
        let loss = logits.log_softmax(-1, Kind::Float).mean(Kind::Float)
            + logits.pow_tensor_scalar(2).mean(Kind::Float);
        loss.backward();
        let vars = m.vs.variables();
        assert_eq!(vars.len(), cfg_var_count(&cfg));
        for (name, v) in vars {
            let g = v.grad();
            assert!(g.defined(), "{name}: no gradient");
            assert!(
                g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name}: zero gradient"
            );
        }
    }
}

fn cfg_var_count(c: &LlamaConfig) -> usize {
    let per_layer = 2
        + 7
        + if c.qkv_bias { 3 } else { 0 }
        + usize::from(c.o_bias)
        + if c.mlp_bias { 3 } else { 0 };
    1 + c.num_hidden_layers * per_layer + 1 + usize::from(!c.tie_word_embeddings)
}

#[test]
fn kv_cache_matches_full_forward() {
    let cfg = LlamaConfig::tiny(64, 32, 2, 4, 1);
    let m = model::random(&cfg, Device::Cpu, 3).unwrap();
    let x = ids(1, 10, 64);
    tch::no_grad(|| {
        let full = m.model.forward(&x).unwrap();
        let mut cache = m.model.new_cache();
        let a = m
            .model
            .forward_cached(&x.narrow(1, 0, 4), &mut cache)
            .unwrap(); // prefix
        let b = m
            .model
            .forward_cached(&x.narrow(1, 4, 3), &mut cache)
            .unwrap(); // several at once
        let c: Vec<Tensor> = (7..10)
            .map(|i| {
                m.model
                    .forward_cached(&x.narrow(1, i, 1), &mut cache)
                    .unwrap()
            })
            .collect();
        assert_eq!(cache.len(), 10);
        let mut parts = vec![a, b];
        parts.extend(c);
        let inc = Tensor::cat(&parts, 1);
        let diff = (&inc - &full).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "incremental logits differ by {diff}");
    });
}

#[test]
fn sliding_window_limits_attention() {
    let mut cfg = LlamaConfig::tiny(64, 32, 1, 4, 4);
    cfg.sliding_window = Some(4);
    let m = model::random(&cfg, Device::Cpu, 4).unwrap();
    let x = ids(1, 12, 64);
    // change the first two tokens, far outside the last position's window
    let y = Tensor::cat(
        &[(x.narrow(1, 0, 2) + 1).remainder(64), x.narrow(1, 2, 10)],
        1,
    );
    tch::no_grad(|| {
        let (a, b) = (m.model.forward(&x).unwrap(), m.model.forward(&y).unwrap());
        let last = (a.select(1, 11) - b.select(1, 11))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(
            last, 0.0,
            "the last position sees tokens outside its window"
        );
        let first = (a.select(1, 2) - b.select(1, 2))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            first > 0.0,
            "a position inside the window does not see the change"
        );
    });
}

#[test]
fn context_overflow_is_an_error() {
    let mut cfg = LlamaConfig::tiny(64, 32, 1, 4, 4);
    cfg.max_position_embeddings = 8;
    let m = model::random(&cfg, Device::Cpu, 5).unwrap();
    let err = m.model.forward(&ids(1, 9, 64)).unwrap_err().to_string();
    assert!(err.contains("exceeds the model's context of 8"), "{err}");
}
