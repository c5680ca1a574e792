//! The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2), as `transformers` defines it:
//!   h_0 = embed(ids)
//!   h_{l+1} = h_l' + mlp(rmsnorm(h_l')),  h_l' = h_l + attn(rmsnorm(h_l))
//!   attn: q, k, v projections (optional biases), rotary embedding (rotate-half layout, theta and
//!         optional llama3/linear scaling), grouped-query causal attention, output projection
//!   mlp(x) = down(silu(gate(x)) * up(x))
//!   logits = lm_head(rmsnorm(h_L)), lm_head tied to the embedding when the config says so.
//! Variable paths equal the checkpoint names (`model.layers.{i}.self_attn.q_proj.weight`).
use super::config::{LlamaConfig, RopeScaling};
use crate::{Error, Result};
use tch::nn;
use tch::{Device, Kind, Tensor};

/// x·Wᵀ + b in x's dtype: the weights are cast to it (a no-op when they already have it), so that a
/// model whose variables are f32 computes in bf16 when its input is bf16 (f32 master weights, as
/// `torch.autocast` does), and the gradient flows back to the f32 variables through the cast.
fn lin(l: &nn::Linear, x: &Tensor) -> Tensor {
    let k = x.kind();
    x.linear(
        &l.ws.to_kind(k),
        l.bs.as_ref().map(|b| b.to_kind(k)).as_ref(),
    )
}

const INIT: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// A linear layer `in_dim → out_dim` as tch's `nn::linear` builds it (bias "bias" zero, then weight
/// "weight" (out, in) normal with std 0.02), but returning an error where tch would panic (an
/// allocation libtorch refuses).
fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Result<nn::Linear> {
    let bs = if bias {
        Some(p.f_var("bias", &[out_dim], nn::Init::Const(0.0))?)
    } else {
        None
    };
    Ok(nn::Linear {
        ws: p.f_var("weight", &[out_dim, in_dim], INIT)?,
        bs,
    })
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: p.f_var("weight", &[dim], nn::Init::Const(1.0))?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        // (…, d): x / sqrt(mean(x²) + eps) · w, normalised in f32 as transformers does, then cast
        // back to the input's dtype before the weight (bf16/f16 models stay in their dtype)
        if x.kind() == Kind::Float && self.weight.kind() == Kind::Float {
            // libtorch's rms_norm: the same formula, half the time of the four ops spelled out
            let d = *x.size().last().expect("hidden is (…, d)");
            return x.rms_norm([d], Some(&self.weight), self.eps);
        }
        let h = x.to_kind(Kind::Float);
        let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        (h * (var + self.eps).rsqrt()).to_kind(x.kind()) * self.weight.to_kind(x.kind())
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    n_heads: i64,
    n_kv_heads: i64,
    head_dim: i64,
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

/// Repeat each key/value head `n_rep` times: (B, kv, T, hd) → (B, kv·n_rep, T, hd).
fn repeat_kv(x: Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x;
    }
    let (b, kv, t, hd) = x.size4().expect("kv tensor is 4-d");
    x.unsqueeze(2)
        .expand([b, kv, n_rep, t, hd], false)
        .reshape([b, kv * n_rep, t, hd])
}

impl Attention {
    fn new(p: nn::Path, c: &LlamaConfig) -> Result<Self> {
        let d = c.hidden_size as i64;
        let hd = c.head_dim as i64;
        let (nh, nkv) = (c.num_attention_heads as i64, c.num_key_value_heads as i64);
        Ok(Attention {
            q_proj: linear(&p / "q_proj", d, nh * hd, c.qkv_bias)?,
            k_proj: linear(&p / "k_proj", d, nkv * hd, c.qkv_bias)?,
            v_proj: linear(&p / "v_proj", d, nkv * hd, c.qkv_bias)?,
            o_proj: linear(&p / "o_proj", nh * hd, d, c.o_bias)?,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &AttnMask,
    ) -> Tensor {
        lin(&self.o_proj, &self.heads(x, rope, cache, mask))
    }

    /// The heads' outputs before the output projection, (B, T, nh·hd), head-major.
    fn heads(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &AttnMask,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden is (B, T, d)");
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = lin(&self.q_proj, x).view([b, t, nh, hd]).transpose(1, 2); // (B, nh, T, hd)
        let k = lin(&self.k_proj, x).view([b, t, nkv, hd]).transpose(1, 2); // (B, kv, T, hd)
        let v = lin(&self.v_proj, x).view([b, t, nkv, hd]).transpose(1, 2); // (B, kv, T, hd)
        let q = apply_rope(&q, &rope.0, &rope.1);
        let k = apply_rope(&k, &rope.0, &rope.1);
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
            None => (k, v),
        };
        let (mask_t, causal) = match mask {
            AttnMask::Causal => (None, true),
            AttnMask::Full => (None, false),
            AttnMask::Explicit(m) => (Some(m), false),
        };
        // grouped-query attention: query head j reads key/value head j / (nh / kv). Without an
        // explicit mask the kernel does it (`enable_gqa`) without materialising the repeated
        // (B, nh, S, hd) keys and values, which autograd would keep for the backward; with one,
        // they are repeated (CUDA's memory-efficient kernel, which takes masks, has no
        // `enable_gqa` and would fall back to the math kernel's (B, nh, T, S) weights;
        // transformers makes the same choice)
        let gqa = nh != nkv && mask_t.is_none();
        let (k, v) = if mask_t.is_some() {
            (repeat_kv(k, nh / nkv), repeat_kv(v, nh / nkv))
        } else {
            (k, v)
        };
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask_t, 0.0, causal, None, gqa);
        y.transpose(1, 2).contiguous().view([b, t, nh * hd]) // (B, T, nh·hd)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, c: &LlamaConfig) -> Result<Self> {
        let (d, f) = (c.hidden_size as i64, c.intermediate_size as i64);
        Ok(Mlp {
            gate_proj: linear(&p / "gate_proj", d, f, c.mlp_bias)?,
            up_proj: linear(&p / "up_proj", d, f, c.mlp_bias)?,
            down_proj: linear(&p / "down_proj", f, d, c.mlp_bias)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        lin(&self.down_proj, &self.act(x))
    }
    /// silu(gate(x)) · up(x): the input of down_proj, (…, f).
    fn act(&self, x: &Tensor) -> Tensor {
        lin(&self.gate_proj, x).silu() * lin(&self.up_proj, x)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// h' = h + attn(rmsnorm(h)); h'' = h' + mlp(rmsnorm(h')). (B, T, d) → (B, T, d).
    fn forward(
        &self,
        h: &Tensor,
        rope: &(Tensor, Tensor),
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &AttnMask,
    ) -> Result<Tensor> {
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(h), rope, cache, mask);
        // not `+=`: that adds in place into a tensor autograd saved for backward
        let h = h.f_add(&a)?;
        Ok(&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)))
    }
}

enum AttnMask {
    /// plain causal attention among the new tokens (no cached prefix, no binding window)
    Causal,
    /// every query sees every key (one new token after a cached prefix)
    Full,
    /// (T, S) boolean, true where a query may look
    Explicit(Tensor),
}

/// The key/value cache for incremental decoding: one (k, v) pair per layer, (B, kv, S, hd).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a forward pass returns: logits for every position and, when asked, the residual stream
/// after each decoder layer (before the final norm), each (B, T, d).
#[derive(Debug)]
pub struct ForwardOutput {
    pub logits: Tensor,
    pub hidden_states: Vec<Tensor>,
}

/// The trunk's output, before the head: the final normed hidden state (B, T, d), which the head
/// (possibly in chunks of positions) turns into logits, and the residual stream after each of the
/// layers that were asked for, in the order asked (none costs nothing).
#[derive(Debug)]
pub struct TrunkOutput {
    pub last: Tensor,
    pub layers: Vec<Tensor>,
}

#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
    device: Device,
    /// the dtype activations are computed in (the variables may be f32: master weights)
    compute: Kind,
}

/// A variable that a config implies: its checkpoint name, its shape, and for each dimension the
/// config keys whose product it is (so that a weight that does not fit can name the key).
#[derive(Debug, Clone, PartialEq)]
pub struct VarSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub keys: Vec<&'static [&'static str]>,
}

/// The variables `Llama::new` creates for `c`: those outside the decoder layers (`layer` None) or
/// those of layer `i`. The config must have passed `LlamaConfig::validate` (no product overflows).
pub fn variables(c: &LlamaConfig, layer: Option<usize>) -> Vec<VarSpec> {
    type Dim = (i64, &'static [&'static str]);
    let d: Dim = (c.hidden_size as i64, &["hidden_size"]);
    let v: Dim = (c.vocab_size as i64, &["vocab_size"]);
    let f: Dim = (c.intermediate_size as i64, &["intermediate_size"]);
    let q: Dim = (
        (c.num_attention_heads * c.head_dim) as i64,
        &["num_attention_heads", "head_dim"],
    );
    let kv: Dim = (
        (c.num_key_value_heads * c.head_dim) as i64,
        &["num_key_value_heads", "head_dim"],
    );
    let mut out = Vec::new();
    let mut add = |name: String, dims: &[Dim]| {
        out.push(VarSpec {
            name,
            shape: dims.iter().map(|x| x.0).collect(),
            keys: dims.iter().map(|x| x.1).collect(),
        })
    };
    let Some(i) = layer else {
        add("model.embed_tokens.weight".into(), &[v, d]);
        add("model.norm.weight".into(), &[d]);
        if !c.tie_word_embeddings {
            add("lm_head.weight".into(), &[v, d]);
        }
        return out;
    };
    let l = format!("model.layers.{i}");
    add(format!("{l}.input_layernorm.weight"), &[d]);
    add(format!("{l}.post_attention_layernorm.weight"), &[d]);
    for (proj, out_dim, in_dim, bias) in [
        ("self_attn.q_proj", q, d, c.qkv_bias),
        ("self_attn.k_proj", kv, d, c.qkv_bias),
        ("self_attn.v_proj", kv, d, c.qkv_bias),
        ("self_attn.o_proj", d, q, c.o_bias),
        ("mlp.gate_proj", f, d, c.mlp_bias),
        ("mlp.up_proj", f, d, c.mlp_bias),
        ("mlp.down_proj", d, f, c.mlp_bias),
    ] {
        add(format!("{l}.{proj}.weight"), &[out_dim, in_dim]);
        if bias {
            add(format!("{l}.{proj}.bias"), &[out_dim]);
        }
    }
    out
}

/// Rotary inverse frequencies (head_dim/2), f32, with the config's scaling (transformers'
/// `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
/// `_compute_llama3_parameters`).
pub fn rope_inv_freq(c: &LlamaConfig) -> Vec<f32> {
    let hd = c.head_dim;
    let base: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / (c.rope_theta as f32).powf((2 * i) as f32 / hd as f32))
        .collect();
    match &c.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, lo, hi, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

impl Llama {
    /// Build the model's variables under `p` (the VarStore's root), randomly initialised
    /// (normal, std 0.02, as transformers' `initializer_range`). The config must have passed
    /// `LlamaConfig::validate`; a loader checks the weights against [`variables`] first, so that
    /// what is allocated here is bounded by what the files hold.
    pub fn new(p: &nn::Path, config: &LlamaConfig) -> Result<Self> {
        let c = config;
        let m = p / "model";
        let (v, d) = (c.vocab_size as i64, c.hidden_size as i64);
        let embed_tokens = (&m / "embed_tokens").f_var("weight", &[v, d], INIT)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let lp = &m / "layers" / i;
                Ok(DecoderLayer {
                    input_layernorm: RmsNorm::new(&lp / "input_layernorm", d, c.rms_norm_eps)?,
                    self_attn: Attention::new(&lp / "self_attn", c)?,
                    post_attention_layernorm: RmsNorm::new(
                        &lp / "post_attention_layernorm",
                        d,
                        c.rms_norm_eps,
                    )?,
                    mlp: Mlp::new(&lp / "mlp", c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&m / "norm", d, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some((p / "lm_head").f_var("weight", &[v, d], INIT)?)
        };
        let inv_freq = Tensor::f_from_slice(&rope_inv_freq(c))?.f_to_device(p.device())?;
        Ok(Llama {
            config: c.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: p.device(),
            compute: Kind::Float,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Compute activations in `kind` (f32, bf16 or f16). The variables keep their own dtype: cast
    /// the `VarStore` too for a model that is only run (a teacher), keep it f32 for one that is
    /// trained (f32 master weights, the casts inside the forward pass).
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute = kind;
    }

    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.layers.len()).map(|_| None).collect(),
            len: 0,
        }
    }

    /// The output projection's weight (V, d): lm_head, or the embedding when tied.
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn rope(&self, start: i64, t: i64) -> (Tensor, Tensor) {
        let pos = Tensor::arange_start(start, start + t, (Kind::Float, self.device)); // (T)
        let freqs = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0); // (T, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // (T, hd)
                                                      // in the compute dtype, so that a bf16/f16 model's attention stays in it
        (
            emb.cos().to_kind(self.compute),
            emb.sin().to_kind(self.compute),
        )
    }

    fn mask(&self, start: i64, t: i64) -> AttnMask {
        let total = start + t;
        let window = self.config.sliding_window.map(|w| w as i64);
        let window_binds = window.is_some_and(|w| total > w);
        if !window_binds {
            if start == 0 {
                return if t == 1 {
                    AttnMask::Full
                } else {
                    AttnMask::Causal
                };
            }
            if t == 1 {
                return AttnMask::Full;
            }
        }
        let rows = Tensor::arange_start(start, total, (Kind::Int64, self.device)).unsqueeze(1); // (T, 1)
        let cols = Tensor::arange(total, (Kind::Int64, self.device)).unsqueeze(0); // (1, S)
        let mut m = cols.le_tensor(&rows);
        if let Some(w) = window.filter(|_| window_binds) {
            m = m.logical_and(&cols.gt_tensor(&(&rows - w)));
        }
        AttnMask::Explicit(m)
    }

    /// RoPE tables (B, 1, T, hd) at each row's own positions (slot − pad, from 0 at its first real
    /// token) and the mask (B, 1, T, S) for slots start..start+T of left-padded rows: causal, real
    /// keys only, within the sliding window when there is one, and each slot sees itself.
    fn padded_rope_and_mask(
        &self,
        pad: &Tensor,
        start: i64,
        t: i64,
    ) -> ((Tensor, Tensor), AttnMask) {
        let total = start + t;
        let slots = Tensor::arange_start(start, total, (Kind::Int64, self.device)); // (T)
        let pos = (slots.unsqueeze(0) - pad.unsqueeze(1)).clamp_min(0); // (B, T)
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]); // (B, T, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1); // (B, 1, T, hd)
        let rope = (
            emb.cos().to_kind(self.compute),
            emb.sin().to_kind(self.compute),
        );
        let rows = slots.view([1, 1, t, 1]);
        let cols = Tensor::arange(total, (Kind::Int64, self.device)).view([1, 1, 1, total]);
        let mut m = cols
            .le_tensor(&rows)
            .logical_and(&cols.ge_tensor(&pad.view([-1, 1, 1, 1]))); // (B, 1, T, S)
        if let Some(w) = self.config.sliding_window.map(|w| w as i64) {
            m = m.logical_and(&cols.gt_tensor(&(&rows - w)));
        }
        (
            rope,
            AttnMask::Explicit(m.logical_or(&cols.eq_tensor(&rows))),
        )
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(i64, i64)> {
        let (b, t) = match ids.size().as_slice() {
            &[b, t] if t > 0 && b > 0 => (b, t),
            s => {
                return Err(Error::Shape(format!(
                    "model forward: 'ids' has shape {s:?}, expected [batch, seq], both > 0"
                )))
            }
        };
        let (lo, hi) = (
            ids.f_min()?.f_int64_value(&[])?,
            ids.f_max()?.f_int64_value(&[])?,
        );
        let v = self.config.vocab_size as i64;
        if lo < 0 || hi >= v {
            return Err(Error::Invalid(format!(
                "token id {} is outside the model's vocabulary of {v} (does the tokenizer belong to this model?)",
                if lo < 0 { lo } else { hi }
            )));
        }
        Ok((b, t))
    }

    /// The trunk: the final normed hidden state (B, T, d) and the residual stream after each layer
    /// listed in `keep` (indices into the decoder layers, in the order asked).
    fn trunk(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        keep: &[usize],
    ) -> Result<TrunkOutput> {
        self.trunk_padded(ids, cache, keep, None)
    }

    /// The trunk over rows left-padded by `pad` (B) slots each (None: no padding). A padded row's
    /// first real token is at position 0 (its positions are slot − pad); its queries see only its
    /// real keys, and a padding slot sees only itself (so that no row's attention is empty: an
    /// empty softmax is NaN, and 0·NaN would reach the real rows through the values).
    fn trunk_padded(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        keep: &[usize],
        pad: Option<&Tensor>,
    ) -> Result<TrunkOutput> {
        if let Some(&bad) = keep.iter().find(|&&l| l >= self.layers.len()) {
            return Err(Error::Invalid(format!(
                "hidden state of layer {bad} asked for, the model has layers 0..{}",
                self.layers.len().saturating_sub(1)
            )));
        }
        let (b, t) = self.check_ids(ids)?;
        let start = cache.as_ref().map_or(0, |c| c.len);
        // a padded batch's caller keeps each row within the context (its slots run past it)
        if pad.is_none() && (start + t) as usize > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "sequence of {} positions exceeds the model's context of {}",
                start + t,
                self.config.max_position_embeddings
            )));
        }
        let ids = ids.to_kind(Kind::Int64).to_device(self.device);
        let (rope, mask) = match pad {
            None => (self.rope(start, t), self.mask(start, t)),
            Some(pad) => {
                let pad = pad.to_kind(Kind::Int64).to_device(self.device);
                if pad.size() != [b] {
                    return Err(Error::Shape(format!(
                        "model forward: 'pad' has shape {:?}, expected [{b}]",
                        pad.size()
                    )));
                }
                self.padded_rope_and_mask(&pad, start, t)
            }
        };
        let mut h = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?
            .f_to_kind(self.compute)?; // (B, T, d)
        let mut kept: Vec<Option<Tensor>> = keep.iter().map(|_| None).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, &rope, slot, &mask)?;
            for (slot, _) in kept.iter_mut().zip(keep).filter(|(_, &l)| l == i) {
                *slot = Some(h.shallow_clone());
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        Ok(TrunkOutput {
            last: self.norm.forward(&h),
            layers: kept.into_iter().flatten().collect(),
        })
    }

    /// The residual stream through the decoder layers listed in `layers` (indices into this
    /// model's layers, run in the order given), from one pass: h_0 = embed(ids),
    /// then h_k = the output of layer `layers[k-1]`, before the final norm; `layers.len() + 1`
    /// tensors (B, T, d). With every layer in order, these are transformers' `hidden_states`
    /// (output_hidden_states=True) except the last, which transformers gives after the final norm.
    /// A list that skips layers runs the model those layers were cut from (what a student made of
    /// them computes).
    pub fn residual_stream(&self, ids: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        if let Some(&bad) = layers.iter().find(|&&l| l >= self.layers.len()) {
            return Err(Error::Invalid(format!(
                "residual stream through layer {bad} asked for, the model has layers 0..{}",
                self.layers.len().saturating_sub(1)
            )));
        }
        let (_b, t) = self.check_ids(ids)?;
        if t as usize > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "sequence of {t} positions exceeds the model's context of {}",
                self.config.max_position_embeddings
            )));
        }
        let ids = ids.to_kind(Kind::Int64).to_device(self.device);
        let (rope, mask) = (self.rope(0, t), self.mask(0, t));
        let mut h = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?
            .f_to_kind(self.compute)?; // (B, T, d)
        let mut out = Vec::with_capacity(layers.len() + 1);
        out.push(h.shallow_clone());
        for &i in layers {
            h = self.layers[i].forward(&h, &rope, None, &mask)?;
            out.push(h.shallow_clone());
        }
        Ok(out)
    }

    /// Logits (B, T, V) of the model made of the decoder layers listed in `layers` (run in that
    /// order): the final norm and the head after `residual_stream`'s last state.
    pub fn forward_layers(&self, ids: &Tensor, layers: &[usize]) -> Result<Tensor> {
        let last = self
            .residual_stream(ids, layers)?
            .pop()
            .expect("the embeddings at least");
        self.head(&self.norm.forward(&last))
    }

    /// The output head: logits (…, V) of normed hidden states (…, d).
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.f_linear::<Tensor>(&self.lm_head_weight().f_to_kind(hidden.kind())?, None)?)
    }

    /// Logits (B, T, V) for every position of `ids` (B, T).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.head(&self.trunk(ids, None, &[])?.last)
    }

    /// The trunk without the head: the final normed hidden state (B, T, d), for objectives computed
    /// over the vocabulary in chunks of positions, and the residual stream after each layer in
    /// `layers` (for hidden-state objectives), from the same forward pass.
    pub fn forward_trunk(&self, ids: &Tensor, layers: &[usize]) -> Result<TrunkOutput> {
        self.trunk(ids, None, layers)
    }

    /// The final normed hidden state (B, T, d), before the head.
    pub fn forward_hidden(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.trunk(ids, None, &[])?.last)
    }

    /// Logits plus the residual stream after each layer.
    pub fn forward_with_hidden(&self, ids: &Tensor) -> Result<ForwardOutput> {
        let all: Vec<usize> = (0..self.layers.len()).collect();
        let out = self.trunk(ids, None, &all)?;
        Ok(ForwardOutput {
            logits: self.head(&out.last)?,
            hidden_states: out.layers,
        })
    }

    /// Incremental forward: `ids` continue the sequence held in `cache`, which is extended.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.head(&self.trunk(ids, Some(cache), &[])?.last)
    }

    /// Incremental forward over left-padded rows: row b's first `pad[b]` slots (of the cache and,
    /// at the first call, of `ids`) are padding, which no real token sees; positions count from
    /// each row's first real token. The last position's logits of each row, (B, V), for
    /// generation.
    pub fn forward_padded_last(
        &self,
        ids: &Tensor,
        pad: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let out = self.trunk_padded(ids, Some(cache), &[], Some(pad))?;
        self.head(&out.last.f_select(1, -1)?)
    }
}

/// Activation statistics for width pruning by importance (Minitron, Muralidharan et al. 2024), each
/// a sum over the tokens of one forward pass, in f64:
///   mlp[l][j]   = Σ_t |silu(gate(x_t))·up(x_t)|_j   (layer l's down_proj input, channel j)
///   heads[l][h] = Σ_t ‖attn_h(x_t)‖₂                (head h's output before o_proj)
///   hidden[i]   = Σ_t Σ_n |RMSNorm_n(h_t)|_i        (every norm's output: 2 per layer + the final)
#[derive(Debug)]
pub struct ActivationSums {
    pub mlp: Vec<Tensor>,
    pub heads: Vec<Tensor>,
    pub hidden: Tensor,
    /// how many tokens were summed over
    pub tokens: i64,
}

impl Llama {
    /// The [`ActivationSums`] of one forward pass over `ids` (B, T), without gradients.
    pub fn activation_sums(&self, ids: &Tensor) -> Result<ActivationSums> {
        let (b, t) = self.check_ids(ids)?;
        if t as usize > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "sequence of {t} positions exceeds the model's context of {}",
                self.config.max_position_embeddings
            )));
        }
        tch::no_grad(|| {
            let ids = ids.to_kind(Kind::Int64).to_device(self.device);
            let rope = self.rope(0, t);
            let mask = self.mask(0, t);
            let mut h = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?
                .f_to_kind(self.compute)?;
            let abs_sum = |x: &Tensor| {
                x.to_kind(Kind::Double)
                    .abs()
                    .sum_dim_intlist(&[0i64, 1][..], false, Kind::Double)
            };
            let mut hidden = Tensor::zeros(
                [self.config.hidden_size as i64],
                (Kind::Double, self.device),
            );
            let (mut mlp, mut heads) = (Vec::new(), Vec::new());
            for layer in &self.layers {
                let x = layer.input_layernorm.forward(&h);
                hidden += abs_sum(&x);
                let y = layer.self_attn.heads(&x, &rope, None, &mask); // (B, T, nh·hd)
                let a = &layer.self_attn;
                let per_head = y
                    .to_kind(Kind::Double)
                    .view([b, t, a.n_heads, a.head_dim])
                    .norm_scalaropt_dim(2, &[-1i64][..], false)
                    .sum_dim_intlist(&[0i64, 1][..], false, Kind::Double);
                heads.push(per_head);
                h = &h + lin(&a.o_proj, &y);
                let x = layer.post_attention_layernorm.forward(&h);
                hidden += abs_sum(&x);
                let act = layer.mlp.act(&x);
                mlp.push(abs_sum(&act));
                h = &h + lin(&layer.mlp.down_proj, &act);
            }
            hidden += abs_sum(&self.norm.forward(&h));
            Ok(ActivationSums {
                mlp,
                heads,
                hidden,
                tokens: b * t,
            })
        })
    }
}
