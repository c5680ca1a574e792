//! Causal LMs: load from a Hugging Face folder or a GGUF file, build at random, save as a folder.
pub mod config;
pub mod gguf;
pub mod gguf_quant;
pub mod gguf_write;
pub mod hf;
pub mod llama;
pub mod tokenizer;

use crate::io::{self, read_to_string};
use crate::{Error, Result};
pub use config::{Arch, LlamaConfig, RopeScaling};
use gguf::{GgufFile, Value as GValue};
pub use llama::{ForwardOutput, KvCache, Llama, TrunkOutput};
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

    /// Save as a GGUF file for llama.cpp, weights stored as `out` asks (`gguf_write`).
    pub fn save_gguf(&self, path: &Path, out: gguf_write::OutType) -> Result<gguf_write::Written> {
        gguf_write::write(self, path, out)
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
/// The end-of-sequence id: the config's first, else the tokenizer's eos token.
pub fn eos_id(m: &LoadedModel) -> Option<u32> {
    m.model.config.eos_token_ids.first().copied().or_else(|| {
        let tok = m.tokenizer.as_ref()?;
        tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e))
    })
}

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
    let present: Present = tensors
        .iter()
        .map(|(name, t)| (name.clone(), (t.size(), name.clone())))
        .collect();
    check_weights(&config, &present, &cfg_path, dir, &|k| k.to_string())?;
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

/// The weights present, by checkpoint name: their shape and the name they have in the file.
type Present = HashMap<String, (Vec<i64>, String)>;

/// Check that the weights hold every variable the config implies, with the shape it implies,
/// before `Llama::new` allocates anything: what a model built from the config allocates is then
/// bounded by what the files hold (a `vocab_size` of 2^40 or 10^6 layers is refused here, by key,
/// instead of running out of memory). `config_path` and `key` (the file's name for a config key)
/// locate the key in errors; `weights` names the weights for a missing tensor. Extra tensors are
/// ignored, as `hf::load_into` ignores them.
fn check_weights(
    config: &LlamaConfig,
    present: &Present,
    config_path: &Path,
    weights: &Path,
    key: &dyn Fn(&str) -> String,
) -> Result<()> {
    let mut layers_held = std::collections::BTreeSet::new();
    for name in present.keys() {
        if let Some((i, _)) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
        {
            if let Ok(i) = i.parse::<usize>() {
                layers_held.insert(i);
            }
        }
    }
    let n = config.num_hidden_layers;
    if let Some(missing) = (0..n).find(|i| !layers_held.contains(i)) {
        return Err(Error::config(
            config_path,
            key("num_hidden_layers"),
            format!(
                "{n} layers, but the weights hold {} (none of layer {missing})",
                layers_held.len()
            ),
        ));
    }
    // n ≤ the number of layers held, so this loop is bounded by the files too
    let specs = std::iter::once(None)
        .chain((0..n).map(Some))
        .flat_map(|layer| llama::variables(config, layer));
    for spec in specs {
        let Some((shape, stored)) = present.get(&spec.name) else {
            if spec.name == "lm_head.weight" {
                return Err(Error::config(
                    config_path,
                    key("tie_word_embeddings"),
                    "false, but the weights have no 'lm_head.weight'",
                ));
            }
            return Err(Error::format(
                weights,
                format!("missing tensor '{}'", spec.name),
            ));
        };
        if *shape == spec.shape {
            continue;
        }
        // name the key of the first dimension that differs (or of the first, for a wrong rank);
        // of a product of keys, the one whose change alone could give the size the file has
        let dim = (0..spec.shape.len())
            .find(|&i| shape.get(i) != Some(&spec.shape[i]))
            .unwrap_or(0);
        let keys = spec.keys[dim];
        let values: Vec<i64> = keys.iter().map(|k| config_dim(config, k)).collect();
        let held = shape.get(dim).copied().unwrap_or(0);
        let blamed = (0..keys.len())
            .find(|&j| {
                let others: i64 = (0..keys.len())
                    .filter(|&o| o != j)
                    .map(|o| values[o])
                    .product();
                held > 0 && held % others == 0
            })
            .unwrap_or(0);
        let names: Vec<String> = keys.iter().map(|k| key(k)).collect();
        let how = if keys.len() == 1 {
            format!("{} = {}", names[0], values[0])
        } else {
            let vals: Vec<String> = values.iter().map(i64::to_string).collect();
            format!(
                "{} = {} = {}",
                names.join(" × "),
                vals.join(" × "),
                spec.shape[dim]
            )
        };
        return Err(Error::config(
            config_path,
            &names[blamed],
            format!(
                "tensor '{stored}' has shape {shape:?} in the weights, the config needs {:?} ({how})",
                spec.shape
            ),
        ));
    }
    Ok(())
}

/// The value of a size key of the config (one of those `llama::variables` names).
fn config_dim(c: &LlamaConfig, key: &str) -> i64 {
    (match key {
        "vocab_size" => c.vocab_size,
        "hidden_size" => c.hidden_size,
        "intermediate_size" => c.intermediate_size,
        "num_attention_heads" => c.num_attention_heads,
        "num_key_value_heads" => c.num_key_value_heads,
        "head_dim" => c.head_dim,
        other => unreachable!("llama::variables names no size key '{other}'"),
    }) as i64
}

/// The GGUF metadata key that holds a config key of `config.json` (for errors that name it).
fn gguf_key(arch: &str, hf_key: &str) -> String {
    let k = match hf_key {
        "vocab_size" => "vocab_size",
        "hidden_size" => "embedding_length",
        "intermediate_size" => "feed_forward_length",
        "num_hidden_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "num_key_value_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
        "rope_theta" => "rope.freq_base",
        "rope_scaling.factor" => "rope.scaling.factor",
        "max_position_embeddings" => "context_length",
        "tie_word_embeddings" => return "output.weight".into(),
        other => return other.to_string(),
    };
    format!("{arch}.{k}")
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
    let rows = shape.first().copied().unwrap_or(0);
    if n_heads <= 0 || rows == 0 || rows % (2 * n_heads) != 0 {
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
        None => embd.shape().first().map_or(0, |&v| v as usize),
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
    // errors name the GGUF key, not config.json's
    cfg.validate(path).map_err(|e| match e {
        Error::Config { path, key, msg } => Error::Config {
            path,
            key: gguf_key(arch_name, &key),
            msg,
        },
        e => e,
    })?;
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
    let arch = g
        .get("general.architecture")
        .and_then(GValue::as_str)
        .unwrap_or("llama");
    let present: Present = g
        .tensors
        .iter()
        .filter_map(|t| Some((gguf_to_hf_name(&t.name)?, (t.shape(), t.name.clone()))))
        .collect();
    check_weights(&config, &present, path, path, &|k| gguf_key(arch, k))?;
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
