//! `distill store inspect` and `distill store verify`: what a store holds, and how close it is to
//! the teacher it claims to come from.
//!
//! Inspect (from the store alone): positions (tokens), bytes per token, k (mean, p90), the mean mass
//! the kept tokens hold (1 − tail), the identity and the captures.
//! Verify (runs the teacher again over a sample of the stored sequences) at each sampled position:
//!   captured mass      Σ_{v kept} p(v), p the teacher's full distribution at the store's T
//!   KL(full ‖ reconstructed)  r(v) = the stored p(v) on kept tokens and the tail mass spread evenly
//!                      over the other V − k tokens, r normalised: what a full-vocabulary consumer
//!                      of the store sees. With tail draws (the stored tail is closed: the draws'
//!                      estimates m·c/n already sum to the tail mass m, nothing is left for the
//!                      V − k tokens never drawn, and the KL would be infinite) the head is taken
//!                      as stored, each drawn token at its estimate m·c/n, and the tokens not
//!                      stored share evenly Good–Turing's estimate of the mass the draws missed,
//!                      u = m·max(N₁, 1)/n (N₁ the tokens drawn once; `unseen_mass`), r normalised (by
//!                      1 + u). Which entries are draws is found by choosing the head again from
//!                      the exact distribution (`select::head`, the label the sequence's next
//!                      token); a drawn label keeps its place in the head and is counted there.
//!   KL(reduced)        KL(p̃ ‖ s̃) over the K + 1 outcomes (kept tokens + tail) between the
//!                      teacher's exact reduced distribution and the stored one: the quantisation
//!                      error alone (what training from the store sees, losses/reduced.rs)
//!   top-1              whether the stored most probable token is the teacher's argmax
//!   |Δ log p|          largest difference between a stored and a recomputed log-probability (a
//!                      wrong teacher shows here first)
use super::header::teacher_hash;
use super::reader::Store;
use super::select::{head, CLOSED_TAIL};
use crate::data::Batch;
use crate::model::LoadedModel;
use crate::teacher::{Live, TeacherSignal};
use crate::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub sequences: usize,
    pub positions: usize,
    pub bytes: u64,
    pub bytes_per_token: f64,
    pub mean_k: f64,
    pub p90_k: usize,
    pub mean_mass: f64,
    pub shards: usize,
}

pub fn inspect(store: &Store) -> Result<Inspection> {
    let h = &store.header;
    let mut ks: Vec<usize> = Vec::with_capacity(h.positions());
    let mut mass = 0.0f64;
    for s in 0..h.shards.len() {
        let shard = store.shard(s)?;
        for p in 0..shard.log_tail.len() {
            ks.push(shard.entries(p).len());
            mass += 1.0 - (shard.log_tail[p] as f64).exp();
        }
    }
    let n = ks.len();
    ks.sort_unstable();
    Ok(Inspection {
        sequences: h.sequences(),
        positions: n,
        bytes: h.bytes(),
        bytes_per_token: h.bytes() as f64 / n.max(1) as f64,
        mean_k: ks.iter().sum::<usize>() as f64 / n.max(1) as f64,
        p90_k: ks.get((n * 9) / 10).copied().unwrap_or(0),
        mean_mass: mass / n.max(1) as f64,
        shards: h.shards.len(),
    })
}

/// Good–Turing's estimate of the tail mass that no draw reached, from the drawn tokens' stored
/// log-estimates ln(m·c/n) and the number of draws n: m̂·max(N₁, 1)/n, with m̂ = Σ p̂ (the tail mass
/// m, up to quantisation), c = round(p̂·n/m̂) each token's draws and N₁ the tokens drawn once (at
/// least one draw's worth, so that no token is given 0 when every drawn token came twice). 0
/// without draws.
pub fn unseen_mass(drawn_logp: &[f64], n: usize) -> f64 {
    let m: f64 = drawn_logp.iter().map(|l| l.exp()).sum();
    if drawn_logp.is_empty() || n == 0 || m <= 0.0 {
        return 0.0;
    }
    let once = drawn_logp
        .iter()
        .filter(|l| (l.exp() * n as f64 / m).round() <= 1.0)
        .count()
        .max(1);
    m * once as f64 / n as f64
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub positions: usize,
    pub sequences: usize,
    /// whether the teacher's files and dtype hash to the store's identity
    pub teacher_matches: bool,
    pub captured_mass: f64,
    pub kl_reconstructed: f64,
    pub kl_reduced: f64,
    pub top1: f64,
    pub max_abs_logprob_error: f64,
}

/// Recompute about `positions` stored positions (whole sequences, spread over the store) with
/// `teacher` (read from `teacher_path` in `dtype`).
pub fn verify(
    store: &Store,
    teacher: &LoadedModel,
    teacher_path: &std::path::Path,
    dtype: &str,
    positions: usize,
    device: Device,
) -> Result<Verification> {
    let h = &store.header;
    let teacher_matches = teacher_hash(teacher_path, dtype)? == h.identity.teacher;
    let sel = &h.selection;
    let temperature = sel.temperature;
    // whole sequences, evenly spread over the store, until `positions` are covered
    let total_seq = h.sequences();
    let per_seq = (h.positions() / total_seq.max(1)).max(1);
    let want = positions.div_ceil(per_seq).clamp(1, total_seq.max(1));
    let picks: Vec<usize> = (0..want).map(|i| i * total_seq / want).collect();
    let mut located = Vec::new(); // (shard, row)
    let mut at = 0;
    for (s, e) in h.shards.iter().enumerate() {
        for row in 0..e.sequences {
            if picks.binary_search(&(at + row)).is_ok() {
                located.push((s, row));
            }
        }
        at += e.sequences;
    }
    let live = Live::new(&teacher.model);
    let (mut n, mut mass, mut kl_r, mut kl_red, mut top1, mut max_err) =
        (0usize, 0.0f64, 0.0f64, 0.0f64, 0usize, 0.0f64);
    for (s, row) in &located {
        let shard = store.shard(*s)?;
        let ids: Vec<i64> = shard.tokens_of(*row).iter().map(|&x| x as i64).collect();
        let t = ids.len() as i64;
        let x = Tensor::f_from_slice(&ids)?
            .f_view([1, t])?
            .f_to_device(device)?;
        let labels = Tensor::f_full([1, t], -100i64, (Kind::Int64, device))?;
        let batch = Batch::from_ids_labels(&x, &labels)?;
        let logits = tch::no_grad(|| -> Result<Tensor> {
            let sig = live.prepare(&batch, &[])?;
            let d = sig.positions(0, sig.len())?;
            Ok(d.dense()?.f_to_kind(Kind::Double)?)
        })?; // (T, V)
        let v = logits.size()[1];
        let logp = logits
            .f_div_scalar(temperature)?
            .f_log_softmax(-1, Kind::Double)?;
        for p in shard.positions(*row) {
            let pos = shard.at[p] as i64;
            let e = shard.entries(p);
            let kept: Vec<i64> = shard.ids[e.clone()].iter().map(|&x| x as i64).collect();
            let stored: Vec<f64> = shard.logprobs[e].iter().map(|&x| x as f64).collect();
            let full = logp.f_select(0, pos)?; // (V)
            let tail = if sel.tail_samples > 0 && shard.log_tail[p] == CLOSED_TAIL {
                // the capture's head, chosen again from the exact distribution: the entries after
                // it are the draws
                let label = ids.get(pos as usize + 1).copied();
                let (vals, top) = full.f_topk(sel.max_k.min(v as usize) as i64, 0, true, true)?;
                let vals: Vec<f32> = Vec::<f64>::try_from(vals.f_to_device(Device::Cpu)?)?
                    .into_iter()
                    .map(|x| x as f32)
                    .collect();
                let top = Vec::<i64>::try_from(top.f_to_device(Device::Cpu)?)?;
                let label = label.unwrap_or(top[0]);
                let label_lp = full.f_double_value(&[label])? as f32;
                let head_len = head(&vals, &top, label, label_lp, sel.coverage)
                    .0
                    .len()
                    .min(stored.len());
                unseen_mass(&stored[head_len..], sel.tail_samples)
            } else {
                (shard.log_tail[p] as f64).exp()
            };
            let idx = Tensor::f_from_slice(&kept)?.f_to_device(device)?;
            let exact =
                Vec::<f64>::try_from(full.f_index_select(0, &idx)?.f_to_device(Device::Cpu)?)?;
            let m: f64 = exact.iter().map(|x| x.exp()).sum();
            mass += m;
            for (a, b) in exact.iter().zip(&stored) {
                if a.is_finite() && *a > -super::select::U8_RANGE {
                    max_err = max_err.max((a - b).abs());
                }
            }
            // reconstructed: stored on kept tokens, tail spread evenly, normalised
            let k = kept.len() as i64;
            let rest = (v - k).max(1) as f64;
            let fill = if tail > 0.0 {
                (tail / rest).ln()
            } else {
                f64::NEG_INFINITY
            };
            let log_r = Tensor::f_full([v], fill, (Kind::Double, device))?.f_index_put_(
                &[Some(idx.shallow_clone())],
                &Tensor::f_from_slice(&stored)?.f_to_device(device)?,
                false,
            )?;
            let log_r = log_r.f_sub(&log_r.f_logsumexp(&[0i64][..], false)?)?;
            let p_full = full.f_exp()?;
            let kl = p_full
                .f_mul(&full.f_sub(&log_r)?)?
                .f_where_self(&p_full.f_gt(0.0)?, &p_full.f_zeros_like()?)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            kl_r += kl;
            // reduced: (exact kept, exact tail) vs (stored kept, stored tail), both normalised
            let red = |lps: &[f64], tail: f64| -> Vec<f64> {
                let mut x: Vec<f64> = lps.iter().map(|l| l.exp()).collect();
                x.push(tail.max(0.0));
                let z: f64 = x.iter().sum();
                x.iter().map(|y| y / z).collect()
            };
            let (pe, ps) = (red(&exact, 1.0 - m), red(&stored, tail));
            kl_red += pe
                .iter()
                .zip(&ps)
                .filter(|(a, _)| **a > 0.0)
                .map(|(a, b)| a * (a / b).ln())
                .sum::<f64>();
            let argmax = full.f_argmax(0, false)?.f_int64_value(&[])?;
            // the first of the highest (kept tokens come in descending order; quantisation can
            // make neighbours equal)
            let mut best = 0;
            for (i, x) in stored.iter().enumerate() {
                if *x > stored[best] {
                    best = i;
                }
            }
            let stored_top = kept[best];
            top1 += usize::from(stored_top == argmax);
            n += 1;
        }
    }
    let d = n.max(1) as f64;
    Ok(Verification {
        positions: n,
        sequences: located.len(),
        teacher_matches,
        captured_mass: mass / d,
        kl_reconstructed: kl_r / d,
        kl_reduced: kl_red / d,
        top1: top1 as f64 / d,
        max_abs_logprob_error: max_err,
    })
}
