//! The model's runtime configuration, read from a Hugging Face `config.json` (or GGUF metadata) and
//! written back as a `config.json` that `transformers` accepts.
use crate::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// biases on q, k, v projections (Qwen2: always; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// bias on the output projection (Llama's `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// A small Llama-architecture config for tests and random students.
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        LlamaConfig {
            arch: Arch::Llama,
            vocab_size,
            hidden_size,
            intermediate_size: hidden_size * 2,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden_size / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
            sliding_window: None,
        }
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config(path, key, msg));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("num_attention_heads", "must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} must be even and positive", self.head_dim),
            );
        }
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ] {
            if v == 0 {
                return bad(key, "must be positive".into());
            }
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings", "must be positive".into());
        }
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bad(key, format!("must be a positive finite number, got {v}"))
            }
        };
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta)?;
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("rope_scaling.factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("rope_scaling.factor", factor)?;
                positive("rope_scaling.low_freq_factor", low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", high_freq_factor)?;
                positive(
                    "rope_scaling.original_max_position_embeddings",
                    original_max_position_embeddings,
                )?;
                // the smoothing between the two wavelengths divides by their difference
                if high_freq_factor <= low_freq_factor {
                    return bad(
                        "rope_scaling.high_freq_factor",
                        format!(
                            "{high_freq_factor} must exceed low_freq_factor = {low_freq_factor}"
                        ),
                    );
                }
            }
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window", "must be positive (or null)".into());
        }
        // Every weight's element count, and their sum, must fit libtorch's i64 sizes; a config
        // beyond that cannot describe real weights (checked here so that no product overflows later).
        if self
            .checked_num_params()
            .is_none_or(|n| n > i64::MAX as u128)
        {
            let (key, v) = [
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.num_key_value_heads),
                ("head_dim", self.head_dim),
            ]
            .into_iter()
            .max_by_key(|&(_, v)| v)
            .expect("a non-empty list");
            return bad(
                key,
                format!("{v} makes the parameter count exceed 2^63: not a real model"),
            );
        }
        Ok(())
    }

    /// `num_params` in u128 arithmetic, None if even that overflows.
    fn checked_num_params(&self) -> Option<u128> {
        let n = |x: usize| x as u128;
        let (d, f, v, l) = (
            n(self.hidden_size),
            n(self.intermediate_size),
            n(self.vocab_size),
            n(self.num_hidden_layers),
        );
        let q = n(self.num_attention_heads).checked_mul(n(self.head_dim))?;
        let kv = n(self.num_key_value_heads).checked_mul(n(self.head_dim))?;
        // per layer: q, k, v, o projections with biases, three MLP matrices with biases, two norms
        let attn = d.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = d.checked_mul(f)?.checked_mul(3)?;
        let layer = [attn, mlp, q, kv, kv, d, d, d, d, f, f]
            .into_iter()
            .try_fold(0u128, u128::checked_add)?;
        let embed = v.checked_mul(d)?.checked_mul(2)?;
        l.checked_mul(layer)?.checked_add(embed)?.checked_add(d)
    }

    /// Parse a Hugging Face `config.json` (Llama, Mistral or Qwen2).
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::config(
                    path,
                    "model_type",
                    "missing (expected \"llama\", \"mistral\" or \"qwen2\")",
                )
            })?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::config(
                    path,
                    "model_type",
                    format!("unknown architecture '{other}' (supported: llama, mistral, qwen2)"),
                ))
            }
        };
        let f = Fields { obj, path };
        let hidden_size = f.req_usize("hidden_size")?;
        let heads = f.req_usize("num_attention_heads")?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(h) => h,
            None if heads > 0 => hidden_size / heads,
            None => 0,
        };
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let rope_scaling = match obj.get("rope_scaling") {
            None | Some(Value::Null) => RopeScaling::None,
            Some(Value::Object(rs)) => {
                let rf = Fields { obj: rs, path };
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: rf.req_f64("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: rf.req_f64("factor")?,
                        low_freq_factor: rf.req_f64("low_freq_factor")?,
                        high_freq_factor: rf.req_f64("high_freq_factor")?,
                        original_max_position_embeddings: rf
                            .req_f64("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(Error::config(
                            path,
                            "rope_scaling.rope_type",
                            format!(
                                "'{other}' is not supported (supported: default, linear, llama3)"
                            ),
                        ))
                    }
                }
            }
            Some(_) => {
                return Err(Error::config(
                    path,
                    "rope_scaling",
                    "expected an object or null",
                ))
            }
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::config(path, "eos_token_id", "expected integers"))?,
            Some(x) => vec![x
                .as_u64()
                .ok_or_else(|| Error::config(path, "eos_token_id", "expected an integer"))?
                as u32],
        };
        let cfg = LlamaConfig {
            arch,
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_hidden_layers: f.req_usize("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch == Arch::Llama && attention_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: f.opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
            pad_token_id: f.opt_usize("pad_token_id")?.map(|x| x as u32),
            sliding_window: if f.opt_bool("use_sliding_window")? == Some(false) {
                None
            } else {
                f.opt_usize("sliding_window")?
            },
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The `config.json` that `transformers` loads for this model.
    pub fn to_hf_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("architectures".into(), json!([self.arch.hf_class()]));
        m.insert("model_type".into(), json!(self.arch.model_type()));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        m.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        m.insert("rope_theta".into(), json!(self.rope_theta));
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        m.insert("initializer_range".into(), json!(0.02));
        m.insert("use_cache".into(), json!(true));
        m.insert("torch_dtype".into(), json!("float32"));
        m.insert("attention_dropout".into(), json!(0.0));
        match self.arch {
            Arch::Llama => {
                m.insert("attention_bias".into(), json!(self.qkv_bias));
                m.insert("mlp_bias".into(), json!(self.mlp_bias));
            }
            Arch::Qwen2 | Arch::Mistral => {
                m.insert(
                    "use_sliding_window".into(),
                    json!(self.sliding_window.is_some()),
                );
                m.insert("sliding_window".into(), json!(self.sliding_window));
            }
        }
        let rope = match &self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings})
            }
        };
        m.insert("rope_scaling".into(), rope);
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => {
                m.insert("eos_token_id".into(), json!(e));
            }
            many => {
                m.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = self.pad_token_id {
            m.insert("pad_token_id".into(), json!(p));
        }
        Value::Object(m)
    }

    /// Parameter count (embeddings counted once when tied).
    pub fn num_params(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let attn = d * q
            + 2 * d * kv
            + q * d
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { d } else { 0 };
        let mlp = 3 * d * f + if self.mlp_bias { 2 * f + d } else { 0 };
        let layer = attn + mlp + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| Error::config(self.path, key, "missing required key"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    Error::config(
                        self.path,
                        key,
                        format!("expected a non-negative integer, got {v}"),
                    )
                })
            })
            .transpose()
    }
    fn req_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| Error::config(self.path, key, "missing required key"))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    Error::config(self.path, key, format!("expected a number, got {v}"))
                })
            })
            .transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    Error::config(self.path, key, format!("expected true or false, got {v}"))
                })
            })
            .transpose()
    }
}
