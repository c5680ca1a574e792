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
        let (rope_theta, rope_scaling) = read_rope(obj, path)?;
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
            rope_theta,
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

    /// The `config.json` that `transformers` (4 and 5) loads for this model.
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
                // an integer where it is one: transformers warns about a float here
                let omp = original_max_position_embeddings;
                let omp = if omp.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(omp) {
                    json!(*omp as u64)
                } else {
                    json!(omp)
                };
                json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": omp})
            }
        };
        // Both layouts, saying the same (read_rope accepts that): transformers 5 reads
        // `rope_parameters` (and takes a non-null `rope_scaling` in its place, with the top-level
        // `rope_theta`), transformers 4 and other readers the top-level keys.
        let mut params = match &rope {
            Value::Object(o) => o.clone(),
            _ => Map::from_iter([("rope_type".to_string(), json!("default"))]),
        };
        params.insert("rope_theta".into(), json!(self.rope_theta));
        m.insert("rope_scaling".into(), rope);
        m.insert("rope_parameters".into(), Value::Object(params));
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

/// transformers' `default_theta`: the RoPE base when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10000.0;

/// The RoPE base and scaling of a `config.json`, in either of its two layouts:
/// - older (transformers 4): top-level `rope_theta`, and `rope_scaling` = null or
///   {`rope_type` (or `type`), `factor`, ...};
/// - transformers 5 (what its `save_pretrained` writes): `rope_parameters` = {`rope_type`,
///   `rope_theta`, `factor`, ...}, and no top-level `rope_theta` or `rope_scaling`.
///
/// transformers 5 reads both (`convert_rope_params_to_dict`): a non-null `rope_scaling` takes the
/// place of `rope_parameters`, and a `rope_theta` missing from that object comes from the top level,
/// else 10000. We read the same. When both layouts are present, every key of the older one that is
/// present must say what `rope_parameters` says (an older and a newer reader would otherwise build
/// different models); if not, the file is refused, naming the key.
fn read_rope(obj: &Map<String, Value>, path: &Path) -> Result<(f64, RopeScaling)> {
    let object = |key: &str| -> Result<Option<&Map<String, Value>>> {
        match obj.get(key) {
            // transformers treats an empty object as absent (`rope_scaling or rope_parameters`)
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) if m.is_empty() => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(Error::config(
                path,
                key,
                format!("expected an object or null, got {v}"),
            )),
        }
    };
    let f = Fields { obj, path };
    check_partial_rotary_factor(
        obj.get("partial_rotary_factor"),
        "partial_rotary_factor",
        path,
    )?;
    let top_theta = f.opt_f64("rope_theta")?;
    let rope_scaling = object("rope_scaling")?;
    let older = rope_scaling
        .map(|m| rope_object(m, "rope_scaling", path))
        .transpose()?;
    // the older layout's base: the top-level key, or one inside rope_scaling (which transformers 5
    // prefers); when both are there they must agree
    let older_theta = match (top_theta, older.as_ref().and_then(|o| o.0)) {
        (Some(top), Some(inner)) if top != inner => {
            return Err(Error::config(
                path,
                "rope_scaling.rope_theta",
                format!("{inner} disagrees with rope_theta = {top}; keep one of the two"),
            ))
        }
        (top, inner) => top.or(inner),
    };
    // `"rope_scaling": null` says "no scaling"; an absent key says nothing
    let older_scaling = obj
        .contains_key("rope_scaling")
        .then(|| older.map_or(RopeScaling::None, |o| o.1));
    let Some(params) = object("rope_parameters")? else {
        return Ok((
            older_theta.unwrap_or(DEFAULT_ROPE_THETA),
            older_scaling.unwrap_or(RopeScaling::None),
        ));
    };
    let (inner_theta, scaling) = rope_object(params, "rope_parameters", path)?;
    let theta = inner_theta.or(top_theta).unwrap_or(DEFAULT_ROPE_THETA);
    // a non-null rope_scaling replaces rope_parameters in transformers 5, base included
    let older_theta = match rope_scaling {
        Some(_) => Some(older_theta.unwrap_or(DEFAULT_ROPE_THETA)),
        None => older_theta,
    };
    if let Some(older) = older_theta.filter(|&t| t != theta) {
        return Err(Error::config(
            path,
            "rope_parameters.rope_theta",
            format!(
                "the base is {theta} here but {older} in the older layout (rope_theta, \
                 rope_scaling); the two layouts disagree: keep one"
            ),
        ));
    }
    if let Some(older) = older_scaling.filter(|s| *s != scaling) {
        return Err(Error::config(
            path,
            "rope_parameters",
            format!(
                "the scaling is {} here but {} in rope_scaling; the two layouts disagree: keep one",
                describe_scaling(&scaling),
                describe_scaling(&older)
            ),
        ));
    }
    Ok((theta, scaling))
}

/// One RoPE object (`rope_scaling` or `rope_parameters`, named `key` in errors): the base it holds,
/// if any, and its scaling.
fn rope_object(
    m: &Map<String, Value>,
    key: &str,
    path: &Path,
) -> Result<(Option<f64>, RopeScaling)> {
    let named = |e: Error| match e {
        Error::Config { path, key: k, msg } => Error::Config {
            path,
            key: format!("{key}.{k}"),
            msg,
        },
        e => e,
    };
    if let Some((k, _)) = m.iter().find(|(_, v)| v.is_object()) {
        return Err(Error::config(
            path,
            format!("{key}.{k}"),
            "RoPE parameters per layer type are not supported",
        ));
    }
    let f = Fields { obj: m, path };
    check_partial_rotary_factor(
        m.get("partial_rotary_factor"),
        &format!("{key}.partial_rotary_factor"),
        path,
    )?;
    let theta = f.opt_f64("rope_theta").map_err(named)?;
    let kind_key = if m.contains_key("rope_type") {
        "rope_type"
    } else {
        "type"
    };
    let kind = match f.get(kind_key) {
        None => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(Error::config(
                path,
                format!("{key}.{kind_key}"),
                format!("expected a string, got {v}"),
            ))
        }
    };
    let req = |k: &str| f.req_f64(k).map_err(named);
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: req("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: req("factor")?,
            low_freq_factor: req("low_freq_factor")?,
            high_freq_factor: req("high_freq_factor")?,
            original_max_position_embeddings: req("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::config(
                path,
                format!("{key}.{kind_key}"),
                format!("'{other}' is not supported (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

/// transformers rotates only the fraction `partial_rotary_factor` of each head; we rotate all of
/// it, so any other value is refused rather than read as 1. `key` names the value in errors.
fn check_partial_rotary_factor(v: Option<&Value>, key: &str, path: &Path) -> Result<()> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.as_f64() == Some(1.0) => Ok(()),
        Some(v) => Err(Error::config(
            path,
            key,
            format!("{v} is not supported (only 1: RoPE on the whole head)"),
        )),
    }
}

fn describe_scaling(s: &RopeScaling) -> String {
    match s {
        RopeScaling::None => "none (rope_type default)".into(),
        RopeScaling::Linear { factor } => format!("linear, factor {factor}"),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => format!(
            "llama3, factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor \
             {high_freq_factor}, original_max_position_embeddings {original_max_position_embeddings}"
        ),
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
