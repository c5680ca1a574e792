//! A tiny GGUF model written by the tests (llama architecture, F32 tensors of a random 2-layer model,
//! a 64-token GPT-2-style vocabulary without merges): small enough to corrupt by the thousand.
//! Include with `#[path = "common/tiny_gguf.rs"] mod tiny_gguf;`.
#![allow(dead_code)]
use distill::model::gguf::{encode, GgmlType, Value};
use distill::model::{self, LlamaConfig};

pub struct TinyGguf {
    pub metadata: Vec<(String, Value)>,
    /// (GGUF name, dims innermost first, type, stored bytes)
    pub tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    /// the model the tensors come from
    pub model: model::LoadedModel,
}

/// llama.cpp's tensor name for a checkpoint name (the inverse of `model::gguf_to_hf_name`).
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer variable");
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, suffix) = rest.rsplit_once('.').unwrap();
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{part}.{suffix}")
}

impl TinyGguf {
    /// vocab 64, hidden 32, 2 layers, 4 heads, 2 kv heads, tied embeddings (`LlamaConfig::tiny`).
    pub fn new() -> Self {
        let c = LlamaConfig::tiny(64, 32, 2, 4, 2);
        let m = model::random(&c, tch::Device::Cpu, 0).unwrap();
        let mut vars: Vec<(String, tch::Tensor)> = m.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let tensors = vars
            .into_iter()
            .map(|(name, t)| {
                // llama.cpp's converter permutes q/k rows per head (the reader undoes it)
                let heads = if name.contains("q_proj.weight") {
                    c.num_attention_heads as i64
                } else {
                    c.num_key_value_heads as i64
                };
                let t = if name.contains("q_proj.weight") || name.contains("k_proj.weight") {
                    let (rows, cols) = t.size2().unwrap();
                    t.reshape([heads, 2, rows / heads / 2, cols])
                        .transpose(1, 2)
                        .reshape([rows, cols])
                } else {
                    t
                };
                let dims: Vec<u64> = t.size().iter().rev().map(|&d| d as u64).collect();
                let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
                let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                (gguf_name(&name), dims, GgmlType::F32, bytes)
            })
            .collect();
        // 64 printable one-byte tokens ('!' to '`'): a byte-level BPE vocabulary without merges
        let tokens = (b'!'..=b'`')
            .map(|b| Value::String((b as char).to_string()))
            .collect();
        let u = |x: u32| Value::U32(x);
        let metadata = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.context_length", u(64)),
            ("llama.embedding_length", u(c.hidden_size as u32)),
            ("llama.block_count", u(c.num_hidden_layers as u32)),
            ("llama.feed_forward_length", u(c.intermediate_size as u32)),
            (
                "llama.attention.head_count",
                u(c.num_attention_heads as u32),
            ),
            (
                "llama.attention.head_count_kv",
                u(c.num_key_value_heads as u32),
            ),
            ("llama.attention.key_length", u(c.head_dim as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.merges", Value::Array(vec![])),
            ("tokenizer.ggml.eos_token_id", u(0)),
        ];
        TinyGguf {
            metadata: metadata
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            tensors,
            model: m,
        }
    }

    /// Set (or add) a metadata value.
    pub fn set(&mut self, key: &str, v: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.metadata.push((key.to_string(), v)),
        }
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let meta: Vec<(&str, Value)> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let tensors: Vec<(&str, &[u64], GgmlType, &[u8])> = self
            .tensors
            .iter()
            .map(|(n, d, t, b)| (n.as_str(), d.as_slice(), *t, b.as_slice()))
            .collect();
        encode(&meta, &tensors)
    }

    /// Write the file as `name` in `dir`; its path.
    pub fn write(&self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}
