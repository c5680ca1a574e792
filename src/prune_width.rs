//! Width pruning: a student narrower than its teacher (hidden size, MLP size, attention heads),
//! made of the teacher's most important channels (Minitron: Muralidharan et al. 2024, "Compact
//! Language Models via Pruning and Knowledge Distillation", §2.2 activation-based importance):
//!   MLP channel j of layer l:  F(j) = mean_t |silu(gate(x_t))·up(x_t)|_j     (down_proj's input)
//!   head h of layer l:         F(h) = mean_t ‖attn_h(x_t)‖₂                  (before o_proj)
//!   hidden channel i:          F(i) = mean_t Σ_n |RMSNorm_n(h_t)|_i          (every norm's output,
//!                              as the paper ranks embedding channels by LayerNorm outputs)
//! over the tokens of calibration text; the top ones are kept (in their original order), or, for
//! the baseline, channels drawn at random (seeded). Grouped-query attention: a key/value head and
//! its query group are pruned together — groups are ranked by the sum of their query heads'
//! importances, the top `kv_heads` kept, then within each kept group the top `heads / kv_heads`
//! query heads. Every weight is sliced consistently: the embedding's (and an untied lm_head's)
//! columns, every norm weight, q/k/v rows and o_proj columns by kept heads (head_dim stays),
//! gate/up rows and down columns by kept MLP channels, every matrix's hidden side by kept hidden
//! channels. Kept weights are not rescaled; so the RMSNorms of a narrower hidden size normalise by
//! the mean of squares over fewer channels — inherent to pruning the hidden size, and left to
//! distillation to correct. Keeping every channel gives the teacher back exactly.
use crate::model::{Llama, LlamaConfig, LoadedModel};
use crate::{Error, Result};
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};

/// The student's widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidthSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl WidthSpec {
    /// The widths asked for, the teacher's where not given, checked against the teacher `c`: each
    /// in 1..=the teacher's, heads a multiple of kv_heads with at most the teacher's group size per
    /// group. `kv_heads` not given: the teacher's group size kept (heads / group) when it divides
    /// `heads`, else the teacher's kv heads.
    pub fn resolve(
        c: &LlamaConfig,
        hidden: Option<usize>,
        intermediate: Option<usize>,
        heads: Option<usize>,
        kv_heads: Option<usize>,
    ) -> Result<WidthSpec> {
        let bad = |m: String| Err(Error::Invalid(m));
        let group = c.num_attention_heads / c.num_key_value_heads;
        let heads = heads.unwrap_or(c.num_attention_heads);
        let kv_heads = kv_heads.unwrap_or(if heads.is_multiple_of(group) {
            heads / group
        } else {
            c.num_key_value_heads
        });
        let s = WidthSpec {
            hidden_size: hidden.unwrap_or(c.hidden_size),
            intermediate_size: intermediate.unwrap_or(c.intermediate_size),
            heads,
            kv_heads,
        };
        for (flag, v, max) in [
            ("--hidden-size", s.hidden_size, c.hidden_size),
            (
                "--intermediate-size",
                s.intermediate_size,
                c.intermediate_size,
            ),
            ("--heads", s.heads, c.num_attention_heads),
            ("--kv-heads", s.kv_heads, c.num_key_value_heads),
        ] {
            if v == 0 || v > max {
                return bad(format!(
                    "{flag} {v}: must be in 1..={max} (the teacher's); pruning only narrows"
                ));
            }
        }
        if !s.heads.is_multiple_of(s.kv_heads) {
            return bad(format!(
                "--heads {} is not a multiple of --kv-heads {}: every key/value head needs the same number of query heads",
                s.heads, s.kv_heads
            ));
        }
        if s.heads / s.kv_heads > group {
            return bad(format!(
                "--heads {} over --kv-heads {} is {} query heads per key/value head; the teacher has {group} (a group can only lose heads)",
                s.heads,
                s.kv_heads,
                s.heads / s.kv_heads
            ));
        }
        Ok(s)
    }
}

/// Importance scores (higher is kept first), as f64: per layer per MLP channel, per layer per
/// query head, per hidden channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    pub mlp: Vec<Vec<f64>>,
    pub heads: Vec<Vec<f64>>,
    pub hidden: Vec<f64>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?,
    )?)
}

/// The activation importances of `m` over calibration windows of token ids (each a sequence run
/// alone), means over all their tokens.
pub fn importance(m: &Llama, windows: &[Vec<i64>]) -> Result<Importance> {
    let mut total: Option<crate::model::llama::ActivationSums> = None;
    let mut tokens = 0i64;
    for w in windows.iter().filter(|w| !w.is_empty()) {
        let ids = Tensor::f_from_slice(w)?.f_unsqueeze(0)?;
        let s = m.activation_sums(&ids)?;
        tokens += s.tokens;
        total = Some(match total {
            None => s,
            Some(mut t) => {
                for (a, b) in t.mlp.iter_mut().zip(&s.mlp) {
                    *a += b;
                }
                for (a, b) in t.heads.iter_mut().zip(&s.heads) {
                    *a += b;
                }
                t.hidden += &s.hidden;
                t
            }
        });
    }
    let t = total.ok_or_else(|| Error::Invalid("no calibration tokens".into()))?;
    let n = tokens as f64;
    let mean = |x: &Tensor| -> Result<Vec<f64>> { Ok(to_vec(x)?.iter().map(|v| v / n).collect()) };
    Ok(Importance {
        mlp: t.mlp.iter().map(mean).collect::<Result<_>>()?,
        heads: t.heads.iter().map(mean).collect::<Result<_>>()?,
        hidden: mean(&t.hidden)?,
    })
}

/// Random scores (uniform, seeded): the baseline of pruning without calibration.
pub fn random_importance(c: &LlamaConfig, seed: i64) -> Result<Importance> {
    tch::manual_seed(seed);
    let r = |n: usize| to_vec(&Tensor::rand([n as i64], (Kind::Double, Device::Cpu)));
    let layers = 0..c.num_hidden_layers;
    Ok(Importance {
        mlp: layers
            .clone()
            .map(|_| r(c.intermediate_size))
            .collect::<Result<_>>()?,
        heads: layers
            .map(|_| r(c.num_attention_heads))
            .collect::<Result<_>>()?,
        hidden: r(c.hidden_size)?,
    })
}

/// The indices of the `k` highest scores (ties: the lower index), in ascending order.
pub fn top_k(scores: &[f64], k: usize) -> Vec<i64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<i64> = idx[..k.min(idx.len())].iter().map(|&i| i as i64).collect();
    kept.sort_unstable();
    kept
}

/// The query heads kept in one layer (ascending): the top `kv_heads` groups by summed importance,
/// then the top `heads / kv_heads` heads within each. Returns (query heads, kv heads).
pub fn kept_heads(scores: &[f64], c: &LlamaConfig, s: &WidthSpec) -> (Vec<i64>, Vec<i64>) {
    let group = c.num_attention_heads / c.num_key_value_heads;
    let sums: Vec<f64> = scores.chunks(group).map(|g| g.iter().sum()).collect();
    let groups = top_k(&sums, s.kv_heads);
    let per = s.heads / s.kv_heads;
    let mut q = Vec::new();
    for &g in &groups {
        let base = g as usize * group;
        q.extend(
            top_k(&scores[base..base + group], per)
                .iter()
                .map(|&h| h + base as i64),
        );
    }
    (q, groups)
}

/// Rows of each kept head: head h ↦ h·hd .. (h+1)·hd.
fn head_rows(heads: &[i64], hd: i64) -> Vec<i64> {
    heads
        .iter()
        .flat_map(|&h| (h * hd)..((h + 1) * hd))
        .collect()
}

/// `m` narrowed to `s`, keeping the channels `imp` ranks highest.
pub fn prune(m: &LoadedModel, s: &WidthSpec, imp: &Importance) -> Result<LoadedModel> {
    let c = &m.model.config;
    let check = WidthSpec::resolve(
        c,
        Some(s.hidden_size),
        Some(s.intermediate_size),
        Some(s.heads),
        Some(s.kv_heads),
    )?;
    debug_assert_eq!(&check, s);
    if imp.mlp.len() != c.num_hidden_layers || imp.heads.len() != c.num_hidden_layers {
        return Err(Error::Invalid(
            "importance scores do not match the model's layers".into(),
        ));
    }
    let dev = m.vs.device();
    let idx = |v: &[i64]| Tensor::f_from_slice(v).and_then(|t| t.f_to_device(dev));
    let hidden = idx(&top_k(&imp.hidden, s.hidden_size))?;
    let vars = m.vs.variables();
    let get = |name: &str| {
        vars.get(name)
            .ok_or_else(|| Error::Invalid(format!("the model has no variable '{name}'")))
    };
    // (rows kept or None, columns kept or None)
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, rows: Option<&Tensor>, cols: Option<&Tensor>| -> Result<()> {
        let mut t = get(&name)?.f_detach()?;
        if let Some(r) = rows {
            t = t.f_index_select(0, r)?;
        }
        if let Some(k) = cols {
            t = t.f_index_select(1, k)?;
        }
        out.insert(name, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), None, Some(&hidden))?;
    put("model.norm.weight".into(), Some(&hidden), None)?;
    if !c.tie_word_embeddings {
        put("lm_head.weight".into(), None, Some(&hidden))?;
    }
    let hd = c.head_dim as i64;
    for l in 0..c.num_hidden_layers {
        if imp.mlp[l].len() != c.intermediate_size || imp.heads[l].len() != c.num_attention_heads {
            return Err(Error::Invalid(format!(
                "importance scores of layer {l} do not match the model's widths"
            )));
        }
        let p = format!("model.layers.{l}");
        let (q, kv) = kept_heads(&imp.heads[l], c, s);
        let (q, kv) = (idx(&head_rows(&q, hd))?, idx(&head_rows(&kv, hd))?);
        let f = idx(&top_k(&imp.mlp[l], s.intermediate_size))?;
        put(format!("{p}.input_layernorm.weight"), Some(&hidden), None)?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            Some(&hidden),
            None,
        )?;
        for (proj, rows, bias) in [
            ("self_attn.q_proj", &q, c.qkv_bias),
            ("self_attn.k_proj", &kv, c.qkv_bias),
            ("self_attn.v_proj", &kv, c.qkv_bias),
            ("mlp.gate_proj", &f, c.mlp_bias),
            ("mlp.up_proj", &f, c.mlp_bias),
        ] {
            put(format!("{p}.{proj}.weight"), Some(rows), Some(&hidden))?;
            if bias {
                put(format!("{p}.{proj}.bias"), Some(rows), None)?;
            }
        }
        for (proj, cols, bias) in [
            ("self_attn.o_proj", &q, c.o_bias),
            ("mlp.down_proj", &f, c.mlp_bias),
        ] {
            put(format!("{p}.{proj}.weight"), Some(&hidden), Some(cols))?;
            if bias {
                put(format!("{p}.{proj}.bias"), Some(&hidden), None)?;
            }
        }
    }
    let mut config = c.clone();
    config.hidden_size = s.hidden_size;
    config.intermediate_size = s.intermediate_size;
    config.num_attention_heads = s.heads;
    config.num_key_value_heads = s.kv_heads;
    let mut vs = nn::VarStore::new(dev);
    let mut model = Llama::new(&vs.root(), &config)?;
    model.set_compute_kind(m.model.compute_kind());
    let fresh = vs.variables();
    if fresh.len() != out.len() {
        return Err(Error::Invalid(format!(
            "pruned {} variables, the narrower model has {}",
            out.len(),
            fresh.len()
        )));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, v) in fresh.iter() {
            let mut v = v.shallow_clone();
            let src = out
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("no pruned weight for '{name}'")))?;
            if v.size() != src.size() {
                return Err(Error::Shape(format!(
                    "'{name}': pruned to {:?}, the narrower model wants {:?}",
                    src.size(),
                    v.size()
                )));
            }
            v.f_copy_(src)?;
        }
        Ok(())
    })?;
    // the teacher's dtype, as loaded
    if let Some(k) = vars.values().next().map(|t| t.kind()) {
        vs.set_kind(k);
    }
    Ok(LoadedModel {
        vs,
        model,
        tokenizer: m.tokenizer.clone(),
        generation_config: m.generation_config.clone(),
        source: m.source.clone(),
        format: m.format,
        weight_types: m.weight_types.clone(),
    })
}
