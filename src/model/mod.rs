//! Causal LMs: load from a Hugging Face folder or a GGUF file, build at random, save as a folder.
pub mod config;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod tokenizer;

use crate::io::{self, read_to_string};
use crate::{Error, Result};
pub use config::{Arch, LlamaConfig, RopeScaling};
use gguf::{GgufFile, Value as GValue};
pub use llama::{ForwardOutput, KvCache, Llama};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};
pub use tokenizer::{Message, Tokenizer};

/// A model with its weights, tokenizer and where it came from.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub model: Llama,
    pub tokenizer: Option<Tokenizer>,
    pub generation_config: Option<Value>,
    pub source: PathBuf,
    /// "hf" or "gguf"
    pub format: &'static str,
    /// stored tensor types and how many tensors have each (e.g. {"Q4_1": 210, "F32": 61})
    pub weight_types: BTreeMap<String, usize>,
}

impl LoadedModel {
    /// Save as a Hugging Face folder.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        hf::save(
            dir,
            &self.vs,
            &self.model.config,
            self.tokenizer.as_ref(),
            self.generation_config.as_ref(),
        )
    }
}

/// A randomly initialised model (std 0.02), seeded.
pub fn random(config: &LlamaConfig, device: Device, seed: i64) -> Result<LoadedModel> {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(device);
    let model = Llama::new(&vs.root(), config)?;
    Ok(LoadedModel {
        vs,
        model,
        tokenizer: None,
        generation_config: None,
        source: PathBuf::from("<random>"),
        format: "random",
        weight_types: BTreeMap::from([("F32".to_string(), 0)]),
    })
}

/// Load a model from a Hugging Face folder or a `.gguf` file.
pub fn load(path: &Path, device: Device) -> Result<LoadedModel> {
    match io::metadata(path)? {
        Some(m) if m.is_dir() => load_hf(path, device),
        Some(m) if m.is_file() => load_gguf(path, device),
        Some(_) => Err(Error::format(
            path,
            "not a file or folder: expected a Hugging Face folder or a .gguf file",
        )),
        None => Err(Error::format(
            path,
            "no such model: expected a Hugging Face folder or a .gguf file",
        )),
    }
}

fn load_hf(dir: &Path, device: Device) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    if !io::exists(&cfg_path)? {
        return Err(Error::format(
            dir,
            "not a Hugging Face model folder: no config.json",
        ));
    }
    let config = LlamaConfig::from_hf_json(&read_to_string(&cfg_path)?, &cfg_path)?;
    let (tensors, weight_types) = hf::read_weights(dir)?;
    let vs = nn::VarStore::new(device);
    let model = Llama::new(&vs.root(), &config)?;
    hf::load_into(&vs, &tensors, dir)?;
    let tokenizer = tokenizer::Tokenizer::from_hf_dir(dir)?;
    let gen_path = dir.join("generation_config.json");
    let generation_config = if io::exists(&gen_path)? {
        Some(
            serde_json::from_str(&read_to_string(&gen_path)?)
                .map_err(|e| Error::format(&gen_path, format!("not valid JSON: {e}")))?,
        )
    } else {
        None
    };
    Ok(LoadedModel {
        vs,
        model,
        tokenizer,
        generation_config,
        source: dir.to_path_buf(),
        format: "hf",
        weight_types,
    })
}

/// The checkpoint name of a GGUF tensor (llama.cpp's names), or None for tensors we do not use.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's rotary permutation of q/k rows: (R, …) viewed as (n, R/n/2, 2, …), axes 1 and 2
/// swapped back to (n, 2, R/n/2, …).
pub fn unpermute_qk(t: &Tensor, n_heads: i64) -> Result<Tensor> {
    let shape = t.size();
    let rows = shape[0];
    if rows % (2 * n_heads) != 0 {
        return Err(Error::Shape(format!(
            "unpermute_qk: {rows} rows do not split into {n_heads} heads"
        )));
    }
    let mut s = vec![n_heads, rows / n_heads / 2, 2];
    s.extend_from_slice(&shape[1..]);
    Ok(t.f_reshape(&s)?.f_transpose(1, 2)?.f_reshape(&shape)?)
}

fn gguf_config(g: &GgufFile) -> Result<LlamaConfig> {
    let path = g.path.as_path();
    let arch_name = g
        .get("general.architecture")
        .and_then(GValue::as_str)
        .ok_or_else(|| Error::config(path, "general.architecture", "missing"))?;
    let arch = match arch_name {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::config(
                path,
                "general.architecture",
                format!("unknown architecture '{other}' (supported: llama, mistral, qwen2)"),
            ))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let req = |k: &str| -> Result<u64> {
        g.get(&key(k))
            .and_then(GValue::as_u64)
            .ok_or_else(|| Error::config(path, key(k), "missing or not an integer"))
    };
    let opt_f = |k: &str| g.get(&key(k)).and_then(GValue::as_f64);
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(Error::config(
            path,
            "rope_freqs.weight",
            "Llama 3.1-style rope scaling stored as rope_freqs is not supported for GGUF; load the HF folder instead",
        ));
    }
    let hidden = req("embedding_length")? as usize;
    let heads = req("attention.head_count")? as usize;
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(path, "missing tensor 'token_embd.weight'"))?;
    let vocab = match g.get(&key("vocab_size")).and_then(GValue::as_u64) {
        Some(v) => v as usize,
        None => embd.shape()[0] as usize,
    };
    let tok_id = |k: &str| g.get(k).and_then(GValue::as_u64).map(|x| x as u32);
    let qkv_bias = arch == Arch::Qwen2 || g.tensor("blk.0.attn_q.bias").is_some();
    let cfg = LlamaConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: req("feed_forward_length")? as usize,
        num_hidden_layers: req("block_count")? as usize,
        num_attention_heads: heads,
        num_key_value_heads: g
            .get(&key("attention.head_count_kv"))
            .and_then(GValue::as_u64)
            .map_or(heads, |x| x as usize),
        head_dim: g
            .get(&key("attention.key_length"))
            .and_then(GValue::as_u64)
            .map_or(hidden.checked_div(heads).unwrap_or(0), |x| x as usize),
        rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: opt_f("rope.freq_base").unwrap_or(10000.0),
        rope_scaling: match (
            g.get(&key("rope.scaling.type")).and_then(GValue::as_str),
            opt_f("rope.scaling.factor"),
        ) {
            (Some("linear"), Some(f)) => RopeScaling::Linear { factor: f },
            _ => RopeScaling::None,
        },
        max_position_embeddings: g
            .get(&key("context_length"))
            .and_then(GValue::as_u64)
            .unwrap_or(2048) as usize,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        qkv_bias,
        o_bias: g.tensor("blk.0.attn_output.bias").is_some(),
        mlp_bias: g.tensor("blk.0.ffn_up.bias").is_some(),
        bos_token_id: tok_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: tok_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: tok_id("tokenizer.ggml.padding_token_id"),
        sliding_window: None,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// The GGUF file's tensors, dequantised to f32 and renamed to checkpoint names, q/k rows unpermuted
/// for the llama architecture.
pub fn gguf_tensors(g: &GgufFile, config: &LlamaConfig) -> Result<HashMap<String, Tensor>> {
    let permuted = g.get("general.architecture").and_then(GValue::as_str) != Some("qwen2");
    let mut out = HashMap::new();
    for info in &g.tensors {
        let Some(name) = gguf_to_hf_name(&info.name) else {
            continue;
        };
        let values = g.dequantize(info)?;
        let mut t = Tensor::f_from_slice(&values)?.f_reshape(info.shape())?;
        if permuted {
            if name.contains("self_attn.q_proj.") {
                t = unpermute_qk(&t, config.num_attention_heads as i64)?;
            } else if name.contains("self_attn.k_proj.") {
                t = unpermute_qk(&t, config.num_key_value_heads as i64)?;
            }
        }
        out.insert(name, t.f_to_kind(Kind::Float)?);
    }
    Ok(out)
}

fn load_gguf(path: &Path, device: Device) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let config = gguf_config(&g)?;
    let tensors = gguf_tensors(&g, &config)?;
    let vs = nn::VarStore::new(device);
    let model = Llama::new(&vs.root(), &config)?;
    hf::load_into(&vs, &tensors, path)?;
    let tokenizer = Some(Tokenizer::from_gguf(&g)?);
    let mut weight_types = BTreeMap::new();
    for t in &g.tensors {
        *weight_types.entry(t.ggml_type.name()).or_insert(0) += 1;
    }
    let mut gen = serde_json::Map::new();
    if let Some(b) = config.bos_token_id {
        gen.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = config.eos_token_ids.first() {
        gen.insert("eos_token_id".into(), (*e).into());
    }
    Ok(LoadedModel {
        vs,
        model,
        tokenizer,
        generation_config: Some(Value::Object(gen)),
        source: path.to_path_buf(),
        format: "gguf",
        weight_types,
    })
}
