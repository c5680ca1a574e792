//! Text generation with a KV cache: greedy (temperature 0) or sampled with temperature and
//! nucleus (top-p) filtering from a seeded generator, one token at a time.
use crate::model::Llama;
use crate::{Error, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// generation stops after any of these ids (it is not returned)
    pub stop_ids: Vec<u32>,
}

/// SplitMix64: a small, seeded, portable generator for sampling.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// uniform in [0, 1)
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Pick the next token from one row of logits (V).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, (((x - max) as f64) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    // keep the smallest prefix whose mass reaches top_p (at least one token)
    let mut cum = 0.0;
    let mut keep = probs.len();
    for (k, p) in probs.iter().enumerate() {
        cum += p.1;
        if cum >= top_p {
            keep = k + 1;
            break;
        }
    }
    let kept = &probs[..keep];
    let mass: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * mass;
    for p in kept {
        if u < p.1 {
            return p.0 as u32;
        }
        u -= p.1;
    }
    kept[keep - 1].0 as u32
}

/// Generate up to `max_new_tokens` after `prompt`, calling `on_token` with each new id.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Invalid("generate: the prompt has no tokens".into()));
    }
    let vocab = model.config.vocab_size as u32;
    if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
        return Err(Error::Invalid(format!(
            "generate: token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return Err(Error::Invalid(format!(
            "generate: temperature must be ≥ 0 (0 = greedy), got {}",
            opts.temperature
        )));
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        return Err(Error::Invalid(format!(
            "generate: top-p must be in (0, 1], got {}",
            opts.top_p
        )));
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() >= context {
        return Err(Error::Invalid(format!(
            "generate: the prompt has {} tokens and the model's context is {context}: no room to generate",
            prompt.len()
        )));
    }
    let mut rng = SplitMix64::new(opts.seed);
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    tch::no_grad(|| -> Result<()> {
        let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let mut input = Tensor::f_from_slice(&ids)?.unsqueeze(0); // (1, T)
        for _ in 0..opts.max_new_tokens {
            if cache.len() + input.size()[1] as usize > model.config.max_position_embeddings {
                break;
            }
            let logits = model.forward_cached(&input, &mut cache)?; // (1, T, V)
            let last = logits
                .select(1, -1)
                .squeeze_dim(0)
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu);
            let row = Vec::<f32>::try_from(&last)?;
            let next = sample(&row, opts.temperature, opts.top_p, &mut rng);
            if opts.stop_ids.contains(&next) {
                break;
            }
            out.push(next);
            on_token(next)?;
            input = Tensor::f_from_slice(&[next as i64])?.unsqueeze(0);
        }
        Ok(())
    })?;
    Ok(out)
}
