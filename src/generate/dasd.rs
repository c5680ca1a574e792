//! Sequence-level distillation data as DASD makes it (Yan et al. 2026, "Distribution-Aligned
//! Sequence Distillation for Superior Long-CoT Reasoning"): the teacher samples several answers
//! per prompt across a temperature schedule, and divergence-aware selection keeps the answers the
//! student is furthest from:
//!   temperature of sample k of n (from 0):  τ_k = τ_first + (τ_last − τ_first) · k / (n − 1)
//!                                            (τ_first when n = 1 or one temperature is given)
//!   score(y | x) = (1/|y|) Σ_t [log p(y_t | x, y_<t) − log q(y_t | x, y_<t)]
//!   p = teacher, q = student, both at temperature 1, teacher-forced over the answer's tokens
//!   (a drawn end of sequence included), log-softmax over the shared vocabulary prefix
//!   min(V_p, V_q) in the models' compute dtype, the mean summed in f64; keep the `keep` answers
//!   with the largest score (ties: the lower sample index), written in sample order.
//! Differences from the paper: DASD's divergence-aware sampling classifies the *sentences* of a
//! response by their teacher and student probabilities ("teacher sentences": high under the
//! teacher, low under the student) and prefers responses rich in teacher sentences; here the whole
//! response's mean token log-ratio stands for that (the same direction, no sentence splitting and
//! no thresholds). DASD's temperature schedule is a training curriculum (low-temperature samples
//! first, then high-temperature ones); here it spreads a prompt's samples across temperatures, and
//! each record carries its temperature so that a curriculum can order them. Mixed-policy
//! distillation (the student writes a prefix, the teacher finishes it) is not part of this.
use crate::model::Llama;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// τ_k of sample `k` of `n` under the schedule `temps` (one value, or [first, last]).
pub fn temperature(temps: &[f64], k: usize, n: usize) -> f64 {
    match temps {
        [first, last] if n > 1 => first + (last - first) * k as f64 / (n - 1) as f64,
        [first, ..] => *first,
        [] => 1.0,
    }
}

/// Mean log-probability (f64) of each answer under `model`, teacher-forced: row r is
/// `prompts[r] ++ answers[r]`, right-padded to the longest (causal: padding after a row's end
/// changes nothing before it); log-softmax over the first `vocab` columns of the logits.
pub fn mean_logprobs(
    model: &Llama,
    prompts: &[&[u32]],
    answers: &[&[u32]],
    vocab: usize,
) -> Result<Vec<f64>> {
    if prompts.len() != answers.len() {
        return Err(Error::Invalid(format!(
            "dasd: {} prompts for {} answers",
            prompts.len(),
            answers.len()
        )));
    }
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    let longest = prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| p.len() + a.len())
        .max()
        .unwrap_or(0);
    let b = prompts.len();
    let mut ids = vec![0i64; b * longest];
    // the position whose logits predict each answer token, and that token, per row
    let mut pos = Vec::new();
    let mut tok = Vec::new();
    for (r, (p, a)) in prompts.iter().zip(answers).enumerate() {
        if p.is_empty() || a.is_empty() {
            return Err(Error::Invalid(format!(
                "dasd: row {r} has an empty prompt or answer"
            )));
        }
        for (k, &t) in p.iter().chain(a.iter()).enumerate() {
            ids[r * longest + k] = t as i64;
        }
        for (j, &t) in a.iter().enumerate() {
            pos.push((r * longest + p.len() + j - 1) as i64);
            tok.push(t as i64);
        }
    }
    let device = model.device();
    let per_token: Vec<f32> = tch::no_grad(|| -> Result<Vec<f32>> {
        let input = Tensor::f_from_slice(&ids)?
            .f_view([b as i64, longest as i64])?
            .f_to_device(device)?;
        let hidden = model.forward_hidden(&input)?; // (B, L, d)
        let d = *hidden.size().last().unwrap_or(&0);
        let pos = Tensor::f_from_slice(&pos)?.f_to_device(device)?;
        let tok = Tensor::f_from_slice(&tok)?.f_to_device(device)?;
        // the head only where an answer token is predicted: (N, d) → (N, V)
        let logits = model.head(&hidden.f_reshape([-1, d])?.f_index_select(0, &pos)?)?;
        let v = vocab.min(*logits.size().last().unwrap_or(&0) as usize) as i64;
        let rows = logits.f_narrow(-1, 0, v)?.f_to_kind(Kind::Float)?; // (N, v)
        let lp = rows
            .f_log_softmax(-1, Kind::Float)?
            .f_gather(-1, &tok.f_unsqueeze(-1)?, false)?
            .f_squeeze_dim(-1)?; // (N)
        Ok(Vec::<f32>::try_from(&lp.f_to_device(Device::Cpu)?)?)
    })?;
    let mut out = Vec::with_capacity(b);
    let mut at = 0;
    for a in answers {
        let s: f64 = per_token[at..at + a.len()].iter().map(|&x| x as f64).sum();
        out.push(s / a.len() as f64);
        at += a.len();
    }
    Ok(out)
}

/// The indices of the `keep` largest scores (ties: the lower index), ascending.
pub fn select(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // descending score; NaN last
    order.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or_else(|| scores[a].is_nan().cmp(&scores[b].is_nan()))
            .then(a.cmp(&b))
    });
    let mut kept: Vec<usize> = order.into_iter().take(keep).collect();
    kept.sort_unstable();
    kept
}
