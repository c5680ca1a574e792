//! Batched generation with a KV cache: many prompts at once, left-padded to the longest, one
//! forward pass over the whole batch per new token; the next token of every row is picked on the
//! model's device, and only the B chosen ids come back to the host each step.
//!
//! Padding: row b is padded on the left by P − len_b slots (P the longest prompt), which no real
//! token attends to; its positions count from its first real token (`Llama::forward_padded_last`),
//! so a prompt generates the same tokens whatever the batch around it.
//!
//! Sampling, for one row with logits z and a uniform draw u from the row's own generator:
//!   p = softmax(z / T); sort p descending (stable); keep the shortest prefix whose mass reaches
//!   top_p (at least one token): k ∈ kept ⟺ Σ_{j<k} p_(j) < top_p; the token is the first sorted
//!   k with Σ_{j≤k} p_(j) > u · Σ_kept p — inverse-CDF sampling of the renormalised nucleus.
//! T = 0 is greedy (argmax). Each row draws one u per step from SplitMix64(seed of the row), so a
//! row's draws do not depend on the other rows.
use super::{GenerateOptions, SplitMix64};
use crate::model::Llama;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// One row's result: the new tokens (a stop id is not included) and why it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// a stop id was drawn
    Stop,
    /// `max_new_tokens` reached
    Length,
    /// the model's context is full
    Context,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Context => "context",
        }
    }
}

/// Check one prompt against the model and the options (the errors `generate` gives).
pub(super) fn check(model: &Llama, prompt: &[u32], opts: &GenerateOptions) -> Result<()> {
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
    Ok(())
}

/// The next token of each row of `logits` (B, V), on their device; `u` (B) uniform draws in
/// [0, 1). See the module comment.
pub fn pick(logits: &Tensor, temperature: f64, top_p: f64, u: &[f64]) -> Result<Tensor> {
    let z = logits.f_to_kind(Kind::Float)?;
    if temperature <= 0.0 {
        return Ok(z.f_argmax(-1, false)?);
    }
    let p = z.f_div_scalar(temperature)?.f_softmax(-1, Kind::Float)?;
    let (sorted, order) = p.f_sort_stable(true, -1, true)?; // (B, V) descending
    let cum = sorted.f_cumsum(-1, Kind::Float)?;
    let before = cum.f_sub(&sorted)?; // Σ_{j<k}
    let in_nucleus = before.f_lt(top_p)?;
    let kept = sorted.f_mul(&in_nucleus.f_to_kind(Kind::Float)?)?;
    let kcum = kept.f_cumsum(-1, Kind::Float)?;
    let mass = kcum.f_select(-1, -1)?.f_unsqueeze(-1)?; // (B, 1)
    let u = Tensor::f_from_slice(u)?
        .f_to_kind(Kind::Float)?
        .f_to_device(z.device())?
        .f_unsqueeze(-1)?;
    let target = mass.f_mul(&u)?;
    // the first k with kcum > target: the number of k with kcum ≤ target, at most the last kept
    let count = kcum
        .f_le_tensor(&target)?
        .f_sum_dim_intlist(&[-1i64][..], true, Kind::Int64)?;
    let last_kept = in_nucleus
        .f_sum_dim_intlist(&[-1i64][..], true, Kind::Int64)?
        .f_sub_scalar(1)?;
    let k = count.f_minimum(&last_kept)?;
    Ok(order.f_gather(-1, &k, false)?.f_squeeze_dim(-1)?)
}

/// Generate after each prompt, all rows in one batch; `seeds[b]` seeds row b's sampling.
/// `on_token(b, id)` is called with each new token of row b as it is chosen.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Generated>> {
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if seeds.len() != prompts.len() {
        return Err(Error::Invalid(format!(
            "generate: {} seeds for {} prompts",
            seeds.len(),
            prompts.len()
        )));
    }
    for p in prompts {
        check(model, p, opts)?;
    }
    let b = prompts.len();
    let context = model.config.max_position_embeddings;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    // a row ends after this many tokens: the last one is chosen from logits at position
    // context − 1, and never fed back
    let limit: Vec<usize> = prompts
        .iter()
        .map(|p| opts.max_new_tokens.min(context - p.len() + 1))
        .collect();
    let mut ids = vec![0i64; b * longest];
    let mut pad = vec![0i64; b];
    for (r, p) in prompts.iter().enumerate() {
        pad[r] = (longest - p.len()) as i64;
        for (k, &t) in p.iter().enumerate() {
            ids[r * longest + pad[r] as usize + k] = t as i64;
        }
    }
    let device = model.device();
    let pad = Tensor::f_from_slice(&pad)?.f_to_device(device)?;
    let mut input = Tensor::f_from_slice(&ids)?
        .f_view([b as i64, longest as i64])?
        .f_to_device(device)?;
    let mut rngs: Vec<SplitMix64> = seeds.iter().map(|&s| SplitMix64::new(s)).collect();
    let mut out: Vec<Generated> = (0..b)
        .map(|r| Generated {
            tokens: vec![],
            finish: if limit[r] == 0 {
                Finish::Length
            } else {
                Finish::Context
            },
        })
        .collect();
    let mut active: Vec<bool> = limit.iter().map(|&l| l > 0).collect();
    let mut cache = model.new_cache();
    tch::no_grad(|| -> Result<()> {
        while active.iter().any(|&a| a) {
            let logits = model.forward_padded_last(&input, &pad, &mut cache)?; // (B, V)
            let u: Vec<f64> = rngs.iter_mut().map(SplitMix64::next_f64).collect();
            let next = pick(&logits, opts.temperature, opts.top_p, &u)?;
            let host = Vec::<i64>::try_from(&next.f_to_device(Device::Cpu)?)?;
            for r in 0..b {
                if !active[r] {
                    continue;
                }
                let id = host[r] as u32;
                if opts.stop_ids.contains(&id) {
                    active[r] = false;
                    out[r].finish = Finish::Stop;
                    continue;
                }
                out[r].tokens.push(id);
                on_token(r, id)?;
                if out[r].tokens.len() == limit[r] {
                    active[r] = false;
                    if limit[r] == opts.max_new_tokens {
                        out[r].finish = Finish::Length;
                    }
                }
            }
            input = next.f_unsqueeze(1)?; // (B, 1): finished rows feed theirs, never read
        }
        Ok(())
    })?;
    Ok(out)
}
