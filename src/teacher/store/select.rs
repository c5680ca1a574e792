//! Which of the teacher's tokens a store keeps at a position, and how their log-probabilities are
//! written down.
//!
//! Selection (DESIGN.md §7): with p = softmax(t/T) at the capture temperature T, keep the smallest
//! set of most probable tokens whose mass reaches `coverage`, at most `max_k` tokens, and always the
//! label token (when it is not among them it takes the last place, so the set never exceeds
//! `max_k`). Recorded besides: the log of the tail mass, log Σ_{v not kept} p(v), computed as a
//! log-sum-exp over the tokens not kept (exact however small the tail: a sharp teacher's tail of
//! 1e−60 is not 0, which would take the tail out of both reduced distributions), and
//! log Z = logsumexp(t/T) over the whole vocabulary.
//!
//! Tail sampling (`tail_samples` = n > 0; Anshumann et al. 2025, "Sparse Logit Sampling:
//! Accelerating Knowledge Distillation in LLMs", who show that a cached top-k biases the student and
//! that sampled tokens do not): besides the head above, n tokens are drawn with replacement from the
//! tail distribution p(v)/m over the tokens not in the head (m the tail mass), and each distinct
//! drawn token v is stored with p̂(v) = m·c_v/n (c_v its draws): E[p̂(v)] = p(v), so the forward-KL
//! gradient q − p̂ is unbiased for every token, while the top-k-and-bucket form fixes the shape of the
//! student's tail. The kept tokens then represent all the mass (log-tail `CLOSED_TAIL`). The draws
//! are seeded by the sequence's key: a sequence is stored alike whatever batch it was captured in.
//! The label is always kept with its exact p (it is excluded from the draws, like the head).
//!
//! Quantisation of log p (the ids are exact):
//!   u8:  q = round(−log p / STEP), STEP = U8_RANGE / 255, clamped to [0, 255]; log p ≈ −q·STEP.
//!        Error ≤ STEP/2 = 0.039 nats in log p (a relative error ≤ 4% in p), below e^−20 clamped.
//!   f16: log p as an IEEE half (relative error ≤ 2^−11, i.e. ≤ 0.005 nats at log p = −10).
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// The lowest log-probability the u8 scheme represents (−20 nats: p ≈ 2·10⁻⁹).
pub const U8_RANGE: f64 = 20.0;
const U8_STEP: f64 = U8_RANGE / 255.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    U8,
    F16,
}

impl Quant {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "u8" => Ok(Quant::U8),
            "f16" => Ok(Quant::F16),
            other => Err(format!("'{other}' is not one of u8, f16")),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Quant::U8 => "u8",
            Quant::F16 => "f16",
        }
    }
    /// Bytes per stored log-probability.
    pub fn bytes(&self) -> usize {
        match self {
            Quant::U8 => 1,
            Quant::F16 => 2,
        }
    }
    pub fn encode(&self, lp: &[f32], out: &mut Vec<u8>) {
        match self {
            Quant::U8 => out.extend(
                lp.iter()
                    .map(|&x| ((-x as f64) / U8_STEP).round().clamp(0.0, 255.0) as u8),
            ),
            Quant::F16 => {
                for &x in lp {
                    out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())
                }
            }
        }
    }
    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        match self {
            Quant::U8 => Ok(bytes
                .iter()
                .map(|&q| (-(q as f64) * U8_STEP) as f32)
                .collect()),
            Quant::F16 => {
                if !bytes.len().is_multiple_of(2) {
                    return Err(Error::Invalid(
                        "f16 log-probabilities: odd byte count".into(),
                    ));
                }
                Ok(bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect())
            }
        }
    }
    /// The value a stored log-probability reads back as (for tests and the verifier).
    pub fn round_trip(&self, lp: f32) -> f32 {
        let mut b = Vec::new();
        self.encode(&[lp], &mut b);
        self.decode(&b).expect("one value")[0]
    }
}

/// How a store chooses and writes tokens.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Selection {
    pub coverage: f64,
    pub max_k: usize,
    pub temperature: f64,
    pub quantisation: Quant,
    /// draws from the tail (0 = none: the tail is one bucket); see `sample_tail`
    #[serde(default)]
    pub tail_samples: usize,
}

/// The log-tail a store records when the kept tokens represent all the mass (a sampled tail): the
/// smallest normal f32, not −inf, so that the student's own mass off the store stays in its
/// normalisation (the divergences remove a −inf bucket from both sides) and is pushed towards 0.
pub const CLOSED_TAIL: f32 = -87.33655; // ln(f32::MIN_POSITIVE)

/// The kept tokens of one position.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub ids: Vec<u32>,
    /// exact (unquantised) log p_T
    pub logprobs: Vec<f32>,
    /// log of the mass of every token not kept (−inf only when they have none at all)
    pub log_tail: f32,
    pub log_z: f32,
}

/// Below this tail mass, 1 − Σ kept p loses digits to cancellation: such rows take the exact
/// log-sum-exp over the tokens not kept instead (relative error of 1 − m from f32 log-probabilities
/// is about 1e−7 / (1 − m): ≤ 1e−5 above this bound).
const EXACT_TAIL_BELOW: f64 = 0.01;

/// Select the kept tokens at N positions from the teacher's logits (N, V) and the labels (N)
/// (each a valid id). The vocabulary-sized work is one log-softmax and one top-k; rows with a tail
/// below `EXACT_TAIL_BELOW` add a log-sum-exp over their tokens not kept. One host read of
/// (N, max_k).
pub fn select(logits: &Tensor, labels: &[i64], sel: &Selection, seed: u64) -> Result<Vec<Kept>> {
    let n = logits.size()[0];
    if n as usize != labels.len() {
        return Err(Error::Shape(format!(
            "select: {} labels for {n} positions",
            labels.len()
        )));
    }
    if n == 0 {
        return Ok(vec![]);
    }
    let v = logits.size()[1];
    let k = (sel.max_k as i64).min(v);
    let x = logits.f_to_kind(Kind::Float)?;
    let x = if sel.temperature == 1.0 {
        x
    } else {
        x.f_div_scalar(sel.temperature)?
    };
    // log p over the vocabulary (log_softmax is the fastest full pass on the CPU: faster than a
    // separate logsumexp); log Z read back from the top entry: log Z = x_top − log p_top
    let lp = x.f_log_softmax(-1, Kind::Float)?; // (N, V)
    let (top_v, top_i) = lp.f_topk(k, -1, true, true)?; // (N, k) descending
    let first = top_i.f_narrow(1, 0, 1)?;
    let log_z = x
        .f_gather(-1, &first, false)?
        .f_sub(&top_v.f_narrow(1, 0, 1)?)?
        .f_squeeze_dim(-1)?; // (N)
    let label_t = Tensor::f_from_slice(labels)?
        .f_to_device(x.device())?
        .f_unsqueeze(-1)?;
    let label_lp = lp.f_gather(-1, &label_t, false)?.f_squeeze_dim(-1)?; // (N)
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(Vec::<f32>::try_from(
            t.f_to_kind(Kind::Float)?
                .f_flatten(0, -1)?
                .f_to_device(tch::Device::Cpu)?,
        )?)
    };
    let top_v = host(&top_v)?;
    let top_i = Vec::<i64>::try_from(top_i.f_flatten(0, -1)?.f_to_device(tch::Device::Cpu)?)?;
    let label_lp = host(&label_lp)?;
    let log_z = host(&log_z)?;
    let k = k as usize;
    let mut chosen: Vec<(Vec<u32>, Vec<f32>, f64)> = Vec::with_capacity(n as usize);
    for (row, &label) in labels.iter().enumerate() {
        let (kept_ids, kept_lp) = head(
            &top_v[row * k..(row + 1) * k],
            &top_i[row * k..(row + 1) * k],
            label,
            label_lp[row],
            sel.coverage,
        );
        let kept_mass: f64 = kept_lp.iter().map(|&x| (x as f64).exp()).sum();
        chosen.push((kept_ids, kept_lp, 1.0 - kept_mass));
    }
    // the exact tail of the sharp rows: log-sum-exp over their tokens not kept (kept ids scattered
    // to −inf; a row's ids padded with its first, which scatters to the same place)
    let sharp: Vec<usize> = (0..chosen.len())
        .filter(|&r| chosen[r].2 < EXACT_TAIL_BELOW && chosen[r].0.len() < v as usize)
        .collect();
    let mut exact = vec![f32::NEG_INFINITY; chosen.len()];
    if !sharp.is_empty() {
        let width = sharp.iter().map(|&r| chosen[r].0.len()).max().unwrap_or(1);
        let mut at = Vec::with_capacity(sharp.len() * width);
        for &r in &sharp {
            let ids = &chosen[r].0;
            at.extend((0..width).map(|j| *ids.get(j).unwrap_or(&ids[0]) as i64));
        }
        let rows = Tensor::f_from_slice(&sharp.iter().map(|&r| r as i64).collect::<Vec<_>>())?
            .f_to_device(x.device())?;
        let at = Tensor::f_from_slice(&at)?
            .f_view([sharp.len() as i64, width as i64])?
            .f_to_device(x.device())?;
        let off = lp
            .f_index_select(0, &rows)?
            .f_scatter_value(-1, &at, f64::NEG_INFINITY)?
            .f_logsumexp(&[-1i64][..], false)?;
        for (&r, t) in sharp.iter().zip(host(&off)?) {
            exact[r] = t;
        }
    }
    if sel.tail_samples > 0 {
        return sample_tail(&lp, chosen, &exact, &log_z, sel, seed, v as usize);
    }
    Ok(chosen
        .into_iter()
        .enumerate()
        .map(|(row, (ids, logprobs, tail))| {
            let log_tail = if tail >= EXACT_TAIL_BELOW {
                tail.ln() as f32
            } else if ids.len() < v as usize {
                exact[row]
            } else {
                f32::NEG_INFINITY // every token kept
            };
            Kept {
                ids,
                logprobs,
                log_tail,
                log_z: log_z[row],
            }
        })
        .collect())
}

/// The head of a position from its `k` = min(max_k, V) most probable tokens (`vals`, log p
/// descending, and their `ids`): the smallest prefix whose mass reaches `coverage`, and the label
/// (with its log p `label_lp`), which takes the last place when the prefix is all k.
pub fn head(
    vals: &[f32],
    ids: &[i64],
    label: i64,
    label_lp: f32,
    coverage: f64,
) -> (Vec<u32>, Vec<f32>) {
    let k = vals.len();
    let mut mass = 0.0f64;
    let mut take = 0;
    while take < k && mass < coverage {
        mass += (vals[take] as f64).exp();
        take += 1;
    }
    let mut kept_ids: Vec<u32> = ids[..take].iter().map(|&i| i as u32).collect();
    let mut kept_lp: Vec<f32> = vals[..take].to_vec();
    if !kept_ids.contains(&(label as u32)) {
        if take == k {
            kept_ids.pop();
            kept_lp.pop();
        }
        kept_ids.push(label as u32);
        kept_lp.push(label_lp);
    }
    (kept_ids, kept_lp)
}

/// The head of each row (`chosen`: ids, exact log p, 1 − head mass) plus `tail_samples` draws
/// from its tail, as described at the top. `exact[r]` is the log tail mass where it was computed
/// exactly (sharp rows), else it is read from 1 − head mass.
fn sample_tail(
    lp: &Tensor,
    chosen: Vec<(Vec<u32>, Vec<f32>, f64)>,
    exact: &[f32],
    log_z: &[f32],
    sel: &Selection,
    seed: u64,
    v: usize,
) -> Result<Vec<Kept>> {
    let n = sel.tail_samples as i64;
    let log_m: Vec<f64> = chosen
        .iter()
        .enumerate()
        .map(|(r, (_, _, tail))| {
            if *tail >= EXACT_TAIL_BELOW {
                tail.ln()
            } else {
                exact[r] as f64
            }
        })
        .collect();
    // rows with a tail to draw from
    let rows: Vec<usize> = (0..chosen.len())
        .filter(|&r| log_m[r].is_finite() && log_m[r] > -60.0 && chosen[r].0.len() < v)
        .collect();
    let mut draws: Vec<Vec<i64>> = vec![vec![]; chosen.len()];
    if !rows.is_empty() {
        let width = rows.iter().map(|&r| chosen[r].0.len()).max().unwrap_or(1);
        let mut at = Vec::with_capacity(rows.len() * width);
        for &r in &rows {
            let ids = &chosen[r].0;
            at.extend((0..width).map(|j| *ids.get(j).unwrap_or(&ids[0]) as i64));
        }
        let idx = Tensor::f_from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>())?
            .f_to_device(lp.device())?;
        let at = Tensor::f_from_slice(&at)?
            .f_view([rows.len() as i64, width as i64])?
            .f_to_device(lp.device())?;
        // p over the tokens off the head (unnormalised: multinomial normalises each row): one
        // exp over the rows, then the head's entries zeroed in place (every row drawn from, the
        // common case, needs no gathered copy of the log-probabilities first)
        let mut tail_p = if rows.len() == chosen.len() {
            lp.f_exp()?
        } else {
            lp.f_index_select(0, &idx)?.f_exp_()?
        };
        let _ = tail_p.f_scatter_value_(-1, &at, 0.0)?;
        // the same draws for the same sequence, whatever else is in the batch
        tch::manual_seed((seed & 0x7fff_ffff_ffff_ffff) as i64);
        let got = tail_p.f_multinomial(n, true)?; // (rows, n)
        let got = Vec::<i64>::try_from(got.f_flatten(0, -1)?.f_to_device(tch::Device::Cpu)?)?;
        for (j, &r) in rows.iter().enumerate() {
            draws[r] = got[j * n as usize..(j + 1) * n as usize].to_vec();
        }
    }
    Ok(chosen
        .into_iter()
        .enumerate()
        .map(|(r, (mut ids, mut logprobs, _))| {
            if draws[r].is_empty() {
                // nothing to draw from: the bucket as without sampling
                let log_tail = if log_m[r].is_finite() {
                    log_m[r] as f32
                } else {
                    f32::NEG_INFINITY
                };
                return Kept {
                    ids,
                    logprobs,
                    log_tail,
                    log_z: log_z[r],
                };
            }
            let mut counts: std::collections::BTreeMap<i64, usize> = Default::default();
            for &d in &draws[r] {
                *counts.entry(d).or_default() += 1;
            }
            for (id, c) in counts {
                let est = (log_m[r] + (c as f64 / n as f64).ln()) as f32;
                match ids.iter().position(|&x| x as i64 == id) {
                    // the label, appended exactly after the head: its estimate replaces it
                    Some(j) => logprobs[j] = est,
                    None => {
                        ids.push(id as u32);
                        logprobs.push(est);
                    }
                }
            }
            Kept {
                ids,
                logprobs,
                log_tail: CLOSED_TAIL,
                log_z: log_z[r],
            }
        })
        .collect())
}

/// The kept sets of every target position of some rows, from their dense logits (R·T, V), labels
/// (R rows of T) and keys (`Sequence::key`, the seed of a row's tail draws): one `Vec<Kept>` per row, in position order. With `quantised`, the
/// log-probabilities are rounded as the store writes them (so a row reads the same whether it comes
/// from the store or was just selected).
pub fn select_rows(
    logits: &Tensor,
    labels: &[Vec<i64>],
    keys: &[u64],
    sel: &Selection,
    quantised: bool,
) -> Result<Vec<Vec<Kept>>> {
    // every position of a row at once (packed text has a target at nearly every position: a copy
    // of the targets' rows would cost more than the few extra rows), a stand-in label where none
    // counts; a row's tail draws are seeded by its key
    let t = labels.first().map_or(0, |l| l.len()) as i64;
    let mut all = Vec::with_capacity(labels.len() * t as usize);
    for (r, l) in labels.iter().enumerate() {
        let stand_in: Vec<i64> = l
            .iter()
            .map(|&x| if x == crate::data::IGNORE_INDEX { 0 } else { x })
            .collect();
        let rows = logits.f_narrow(0, r as i64 * t, t)?;
        all.extend(select(&rows, &stand_in, sel, keys[r])?);
    }
    let mut kept = all
        .into_iter()
        .zip(labels.iter().flatten())
        .filter(|(_, &l)| l != crate::data::IGNORE_INDEX)
        .map(|(k, _)| k);
    let mut out = Vec::with_capacity(labels.len());
    for l in labels {
        let n = l
            .iter()
            .filter(|&&x| x != crate::data::IGNORE_INDEX)
            .count();
        let mut row: Vec<Kept> = kept.by_ref().take(n).collect();
        if quantised {
            for p in &mut row {
                for x in &mut p.logprobs {
                    *x = sel.quantisation.round_trip(*x);
                }
            }
        }
        out.push(row);
    }
    Ok(out)
}
