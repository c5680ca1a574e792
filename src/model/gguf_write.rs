//! Writing a model as a GGUF file that llama.cpp loads, as its `convert_hf_to_gguf.py` would:
//! - architecture `llama` (Llama, Mistral) or `qwen2`, with the hyperparameter keys llama.cpp reads
//!   (`{arch}.context_length`, `embedding_length`, `block_count`, `feed_forward_length`,
//!   `attention.head_count(_kv)`, `rope.freq_base`, `attention.layer_norm_rms_epsilon`,
//!   `rope.dimension_count`, `vocab_size`; `attention.key_length`/`value_length` when the head size is
//!   not hidden/heads; linear rope scaling), `general.file_type` and `general.quantization_version`;
//! - the GPT-2-style byte-level BPE tokenizer as `tokenizer.ggml.*` (model `gpt2`, `pre`, tokens padded
//!   to the vocabulary with `[PAD{i}]` of type unused, token types, merges, bos/eos/unk/padding ids,
//!   add_bos/add_eos) and `tokenizer.chat_template`;
//! - tensors under llama.cpp's names (DESIGN.md §4), q/k rows permuted per head for `llama` (the
//!   forward of `unpermute_qk`: (R, …) as (n, 2, R/n/2, …), axes 1 and 2 swapped); tied embeddings
//!   write no `output.weight`;
//! - 1-D tensors (norms, biases) in F32; 2-D ones in the chosen type, or, when a row does not fill
//!   whole blocks, in the type llama.cpp falls back to (Q4_K → Q5_0 for rows of 32k, else F16;
//!   Q8_0 → F16), see [`OutType::tensor_type`]. Q4_K is pure: no Q6_K for the output (llama.cpp's
//!   Q4_K_M/Q4_K_S mixes would use it); `general.file_type` says Q4_K_S, the nearest it has.
//!
//! The file is streamed to a temporary file beside the target (header, then each tensor quantised
//! in turn), synced and renamed: the memory is that of one tensor.
use super::gguf::{encode_header, GgmlType, Value, ALIGN};
use super::gguf_quant::quantize;
use super::{llama, Arch, LlamaConfig, LoadedModel, RopeScaling, Tokenizer};
use crate::{Error, Result};
use half::f16;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The weight type asked for (`distill convert --type`).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    F16,
    Q8_0,
    Q4_K,
}

impl OutType {
    pub const NAMES: [&'static str; 3] = ["f16", "q8_0", "q4_k"];

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Some(OutType::F16),
            "q8_0" => Some(OutType::Q8_0),
            "q4_k" => Some(OutType::Q4_K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// llama.cpp's `general.file_type` (LlamaFileType): MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_K_S.
    fn file_type(self) -> u32 {
        match self {
            OutType::F16 => 1,
            OutType::Q8_0 => 7,
            OutType::Q4_K => 14,
        }
    }

    /// The type a tensor of `dims` (innermost first) is stored as: F32 for 1-D tensors; else the
    /// asked type when the row (dims[0]) fills whole blocks, else llama.cpp's fallback (its
    /// quantiser: Q4_K → Q5_0; its converter: a row that fits no block → F16).
    pub fn tensor_type(self, dims: &[u64]) -> GgmlType {
        if dims.len() < 2 {
            return GgmlType::F32;
        }
        let row = dims[0];
        match self {
            OutType::F16 => GgmlType::F16,
            OutType::Q8_0 if row.is_multiple_of(32) => GgmlType::Q8_0,
            OutType::Q4_K if row.is_multiple_of(256) => GgmlType::Q4_K,
            OutType::Q4_K if row.is_multiple_of(32) => GgmlType::Q5_0,
            _ => GgmlType::F16,
        }
    }
}

/// llama.cpp's tensor name for a checkpoint name (the inverse of `model::gguf_to_hf_name`).
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let g = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// llama.cpp's rotary permutation of q/k rows, HF → GGUF: (R, …) viewed as (n, 2, R/n/2, …), axes
/// 1 and 2 swapped, back to (R, …). `model::unpermute_qk` is its inverse.
pub fn permute_qk(t: &Tensor, n_heads: i64) -> Result<Tensor> {
    let shape = t.size();
    let rows = shape.first().copied().unwrap_or(0);
    if n_heads <= 0 || rows == 0 || rows % (2 * n_heads) != 0 {
        return Err(Error::Shape(format!(
            "permute_qk: {rows} rows do not split into {n_heads} heads"
        )));
    }
    let mut s = vec![n_heads, 2, rows / n_heads / 2];
    s.extend_from_slice(&shape[1..]);
    Ok(t.f_reshape(&s)?.f_transpose(1, 2)?.f_reshape(&shape)?)
}

/// One tensor of the file.
struct Planned {
    gguf: String,
    hf: String,
    /// innermost first
    dims: Vec<u64>,
    ty: GgmlType,
    /// heads to permute the rows over (q/k of the `llama` architecture)
    permute: Option<i64>,
}

/// The GGUF architecture name for a config.
fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
    }
}

fn plan(c: &LlamaConfig, out: OutType) -> Vec<Planned> {
    let permuted = arch_name(c.arch) == "llama";
    std::iter::once(None)
        .chain((0..c.num_hidden_layers).map(Some))
        .flat_map(|layer| llama::variables(c, layer))
        .map(|spec| {
            let dims: Vec<u64> = spec.shape.iter().rev().map(|&d| d as u64).collect();
            let permute = if !permuted {
                None
            } else if spec.name.contains("self_attn.q_proj.") {
                Some(c.num_attention_heads as i64)
            } else if spec.name.contains("self_attn.k_proj.") {
                Some(c.num_key_value_heads as i64)
            } else {
                None
            };
            Planned {
                gguf: hf_to_gguf_name(&spec.name).expect("every model variable has a GGUF name"),
                ty: out.tensor_type(&dims),
                hf: spec.name,
                dims,
                permute,
            }
        })
        .collect()
}

fn u32_of(n: usize, source: &Path, key: &str) -> Result<Value> {
    u32::try_from(n)
        .map(Value::U32)
        .map_err(|_| Error::config(source, key, format!("{n} does not fit GGUF's u32")))
}

/// The metadata of the file for `m` with weights of type `out`: hyperparameters, then the tokenizer.
pub fn metadata(m: &LoadedModel, out: OutType) -> Result<Vec<(String, Value)>> {
    let c = &m.model.config;
    let src = m.source.as_path();
    let arch = arch_name(c.arch);
    if let RopeScaling::Llama3 { .. } = c.rope_scaling {
        return Err(Error::config(
            src,
            "rope_scaling",
            "Llama 3.1-style rope scaling is not supported for GGUF export (llama.cpp stores it as a rope_freqs tensor, which distill does not write or read)",
        ));
    }
    if let Some(w) = c.sliding_window.filter(|&w| w < c.max_position_embeddings) {
        return Err(Error::config(
            src,
            "sliding_window",
            format!("a sliding window of {w} tokens cannot be exported: llama.cpp's {arch} architecture attends to the whole context ({} tokens), so its logits would differ past {w} tokens", c.max_position_embeddings),
        ));
    }
    let name = src
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let k = |key: &str| format!("{arch}.{key}");
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name)),
        (
            "general.quantization_version".into(),
            // ggml's GGML_QNT_VERSION
            Value::U32(2),
        ),
        ("general.file_type".into(), Value::U32(out.file_type())),
    ];
    for (key, n) in [
        ("vocab_size", c.vocab_size),
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("block_count", c.num_hidden_layers),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("rope.dimension_count", c.head_dim),
    ] {
        md.push((k(key), u32_of(n, src, key)?));
    }
    md.push((k("rope.freq_base"), Value::F32(c.rope_theta as f32)));
    md.push((
        k("attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps as f32),
    ));
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        md.push((
            k("attention.key_length"),
            u32_of(c.head_dim, src, "head_dim")?,
        ));
        md.push((
            k("attention.value_length"),
            u32_of(c.head_dim, src, "head_dim")?,
        ));
    }
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        md.push((k("rope.scaling.type"), Value::String("linear".into())));
        md.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    let tok = m.tokenizer.as_ref().ok_or_else(|| {
        Error::format(
            src,
            "the model has no tokenizer, and a GGUF file must hold one for llama.cpp to load it",
        )
    })?;
    md.extend(tokenizer_metadata(tok, c, src)?);
    Ok(md)
}

/// The `tokenizer.ggml.pre` name of a `tokenizer.json` pre-tokenizer: the family whose
/// pre-tokenizer `Tokenizer::from_gguf` builds equals it (offset trimming aside, which changes no
/// id).
fn pre_name(pre: &Json) -> Option<&'static str> {
    fn strip(v: &Json) -> Json {
        match v {
            Json::Object(o) => Json::Object(
                o.iter()
                    .filter(|(k, _)| k.as_str() != "trim_offsets")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Json::Array(a) => Json::Array(a.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    let pre = strip(pre);
    ["gpt2", "smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| {
            super::tokenizer::pre_tokenizer_for(name, Path::new("")).is_ok_and(|p| strip(&p) == pre)
        })
}

/// The tokenizer as llama.cpp's `tokenizer.ggml.*` keys and `tokenizer.chat_template`; only
/// GPT-2-style byte-level BPE (what `Tokenizer::from_gguf` reads back) is accepted.
pub fn tokenizer_metadata(
    tok: &Tokenizer,
    c: &LlamaConfig,
    source: &Path,
) -> Result<Vec<(String, Value)>> {
    let refuse = |key: &str, msg: String| Err(Error::config(source, key, msg));
    let tj: Json = serde_json::from_str(tok.json())
        .map_err(|e| Error::format(source, format!("tokenizer.json is not valid JSON: {e}")))?;
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return refuse(
            "tokenizer.json: model",
            format!("a {} tokenizer{} cannot be exported to GGUF: only GPT-2-style byte-level BPE is supported", model["type"].as_str().unwrap_or("unknown"),
                if model["byte_fallback"].as_bool() == Some(true) { " with byte fallback (SentencePiece-style)" } else { "" }),
        );
    }
    let Some(pre) = pre_name(&tj["pre_tokenizer"]) else {
        return refuse(
            "tokenizer.json: pre_tokenizer",
            "this pre-tokenizer has no llama.cpp name that distill knows (supported: gpt2, smollm, llama-bpe, qwen2)".into(),
        );
    };
    let normalizer = &tj["normalizer"];
    if !(normalizer.is_null() || normalizer["type"].as_str() == Some("NFC")) {
        return refuse(
            "tokenizer.json: normalizer",
            "a normalizer other than NFC cannot be exported to GGUF (llama.cpp's BPE does not normalise)".into(),
        );
    }
    // tokens by id, padded to the model's vocabulary as llama.cpp's converter does
    let by_id = tok.id_tokens();
    if by_id.len() > c.vocab_size {
        return refuse(
            "vocab_size",
            format!(
                "the tokenizer has ids up to {}, beyond the model's vocabulary of {}",
                by_id.len() - 1,
                c.vocab_size
            ),
        );
    }
    let added: HashMap<u64, bool> = tj["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t["id"].as_u64()?, t["special"].as_bool() == Some(true))))
                .collect()
        })
        .unwrap_or_default();
    let (mut tokens, mut types) = (Vec::new(), Vec::new());
    for i in 0..c.vocab_size {
        // llama.cpp's TokenType: 1 normal, 3 control, 4 user-defined, 5 unused
        let (t, ty) = match by_id.get(i).cloned().flatten() {
            None => (format!("[PAD{i}]"), 5),
            Some(t) => match added.get(&(i as u64)) {
                Some(true) => (t, 3),
                Some(false) => (t, 4),
                None => (t, 1),
            },
        };
        tokens.push(Value::String(t));
        types.push(Value::I32(ty));
    }
    let merges = match &model["merges"] {
        Json::Array(items) => items
            .iter()
            .map(|m| match m {
                Json::String(s) => Some(s.clone()),
                // the newer [left, right] form; gguf-py writes spaces inside a part as U+0120 + …
                Json::Array(p) if p.len() == 2 => {
                    let part = |v: &Json| {
                        v.as_str().map(|s| {
                            s.chars()
                                .map(|ch| if ch == ' ' { '\u{120}' } else { ch })
                                .collect::<String>()
                        })
                    };
                    Some(format!("{} {}", part(&p[0])?, part(&p[1])?))
                }
                _ => None,
            })
            .collect::<Option<Vec<String>>>(),
        Json::Null => Some(vec![]),
        _ => None,
    };
    let Some(merges) = merges else {
        return refuse(
            "tokenizer.json: model.merges",
            "expected a list of \"a b\" strings or [a, b] pairs".into(),
        );
    };
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_to_id(t));
    let bos = id_of(&tok.bos_token).or(c.bos_token_id);
    let eos = id_of(&tok.eos_token).or(c.eos_token_ids.first().copied());
    let pad = id_of(&tok.pad_token).or(c.pad_token_id);
    let unk = id_of(&tok.unk_token);
    // what encoding adds around a text: nothing, a bos before, an eos after (llama.cpp's flags)
    let (with, without) = (tok.encode_whole("a", true)?, tok.encode_whole("a", false)?);
    let at = (0..=with.len().saturating_sub(without.len()))
        .find(|&k| with.get(k..k + without.len()) == Some(&without[..]));
    let (add_bos, add_eos) = match at.map(|k| (&with[..k], &with[k + without.len()..])) {
        Some((prefix, suffix))
            if (prefix.is_empty() || prefix == bos.as_slice())
                && (suffix.is_empty() || suffix == eos.as_slice()) =>
        {
            (!prefix.is_empty(), !suffix.is_empty())
        }
        _ => {
            return refuse(
                "tokenizer.json: post_processor",
                format!("it adds {with:?} around the ids {without:?} of \"a\"; llama.cpp can only add a bos before and an eos after"),
            )
        }
    };
    let mut md: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
    ];
    for (key, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", eos),
        ("unknown_token_id", unk),
        ("padding_token_id", pad),
    ] {
        if let Some(id) = id {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(t) = &tok.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(md)
}

/// What `write` wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub bytes: u64,
    /// stored tensor types and how many tensors have each
    pub types: BTreeMap<String, usize>,
}

/// Write `m` to `path` as GGUF with weights of type `out` (see the module's comment).
pub fn write(m: &LoadedModel, path: &Path, out: OutType) -> Result<Written> {
    let metadata = metadata(m, out)?;
    let tensors = plan(&m.model.config, out);
    let table: Vec<(&str, &[u64], GgmlType, usize)> = tensors
        .iter()
        .map(|t| {
            let (qk, bs) = t.ty.block().expect("the writer's types have blocks");
            let n: u64 = t.dims.iter().product();
            (
                t.gguf.as_str(),
                t.dims.as_slice(),
                t.ty,
                n as usize / qk * bs,
            )
        })
        .collect();
    let md: Vec<(&str, Value)> = metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let header = encode_header(&md, &table);
    let vars = m.vs.variables();
    let tmp = temp_path(path)?;
    let result = (|| -> Result<u64> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        let mut w = std::io::BufWriter::new(file);
        let io = |e| Error::io(path, e);
        w.write_all(&header).map_err(io)?;
        let mut written = header.len() as u64;
        for (t, (_, _, _, len)) in tensors.iter().zip(&table) {
            let bytes = tensor_bytes(t, &vars, path)?;
            debug_assert_eq!(bytes.len(), *len);
            w.write_all(&bytes).map_err(io)?;
            let pad = bytes.len().div_ceil(ALIGN) * ALIGN - bytes.len();
            w.write_all(&[0u8; ALIGN][..pad]).map_err(io)?;
            written += (bytes.len() + pad) as u64;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(written)
    })();
    let bytes = result.inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    let mut types = BTreeMap::new();
    for t in &tensors {
        *types.entry(t.ty.name()).or_insert(0) += 1;
    }
    Ok(Written { bytes, types })
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// One tensor's stored bytes: its f32 values (q/k rows permuted), quantised.
fn tensor_bytes(t: &Planned, vars: &HashMap<String, Tensor>, path: &Path) -> Result<Vec<u8>> {
    let v = vars
        .get(&t.hf)
        .ok_or_else(|| Error::Invalid(format!("the model has no variable '{}'", t.hf)))?;
    let mut v = v.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
    if let Some(n) = t.permute {
        v = permute_qk(&v, n)?;
    }
    let values = Vec::<f32>::try_from(v.f_contiguous()?.f_view([-1])?)?;
    let bad = |what: &str| Error::format(path, format!("tensor '{}' ({}) {what}", t.gguf, t.hf));
    let amax = values
        .iter()
        .try_fold(0f32, |m, x| x.is_finite().then(|| m.max(x.abs())));
    let Some(amax) = amax else {
        return Err(bad("holds a NaN or infinite value"));
    };
    if t.ty == GgmlType::F16 && !f16::from_f32(amax).is_finite() {
        return Err(bad(&format!(
            "holds {amax}, beyond f16's range (65504): write q8_0 or q4_k instead"
        )));
    }
    quantize(t.ty, &values).ok_or_else(|| bad(&format!("cannot be stored as {}", t.ty.name())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_invert_the_reader_s() {
        let c = LlamaConfig {
            tie_word_embeddings: false,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            ..LlamaConfig::tiny(64, 32, 2, 4, 2)
        };
        for t in plan(&c, OutType::F16) {
            assert_eq!(
                super::super::gguf_to_hf_name(&t.gguf).as_deref(),
                Some(t.hf.as_str())
            );
        }
    }

    #[test]
    fn permute_is_the_inverse_of_unpermute() {
        let t = Tensor::arange(8 * 3, (Kind::Float, Device::Cpu)).reshape([8, 3]);
        for heads in [1, 2, 4] {
            let p = permute_qk(&t, heads).unwrap();
            let back = super::super::unpermute_qk(&p, heads).unwrap();
            assert!(back.equal(&t));
        }
        // head 0's rows of (8, ·) with 2 heads: rotate-half [0 1 | 2 3] → interleaved [0 2 1 3]
        let p = permute_qk(&t, 2).unwrap();
        let first: Vec<f32> = Vec::try_from(p.select(1, 0)).unwrap();
        assert_eq!(first, [0., 6., 3., 9., 12., 18., 15., 21.]);
    }

    #[test]
    fn tensor_types_fall_back_as_llama_cpp_does() {
        use GgmlType::*;
        assert_eq!(OutType::Q4_K.tensor_type(&[576]), F32);
        assert_eq!(OutType::Q4_K.tensor_type(&[512, 8]), Q4_K);
        assert_eq!(OutType::Q4_K.tensor_type(&[576, 8]), Q5_0);
        assert_eq!(OutType::Q4_K.tensor_type(&[100, 8]), F16);
        assert_eq!(OutType::Q8_0.tensor_type(&[576, 8]), Q8_0);
        assert_eq!(OutType::Q8_0.tensor_type(&[100, 8]), F16);
        assert_eq!(OutType::F16.tensor_type(&[100, 8]), F16);
    }
}
