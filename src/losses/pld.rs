//! Plackett-Luce Distillation (PLD; Bassam et al. 2025, "Plackett-Luce Distillation", eq. 6):
//!   π* = the true label first, then every other class by descending teacher logit
//!   a_k = softmax(t/τ)[π*_k]                         (teacher confidence of the k-th ranked class)
//!   L   = Σ_k a_k·(logsumexp_{l≥k} s_{π*_l} − s_{π*_k})
//! a weighted sum of Plackett-Luce choice losses of the teacher-optimal ranking under the student's
//! scores; mean over counted positions (label −100 never counts). As τ → 0 with the teacher's argmax
//! at the label, a → one-hot on π*_1 and L → cross-entropy on the true label.
//! On a stored (sparse) teacher (τ must equal the store's temperature T): the same formula on the
//! K + 1 reduced outcomes with the tail bucket ranked last: π̃ = the label, the other stored tokens by
//! descending p̃, then the bucket, whose score is logsumexp_{v ∉ S} s_v (the Plackett-Luce score of
//! "a token off the store"; the student at T = 1 whatever T). Every stored rank's suffix holds the
//! whole tail, so each of its terms is exact; the bucket's own term is 0. The value is the dense PLD
//! less the tail's inner terms Σ_{k in tail} a_k·(…), which need the order and logits of the tokens
//! off the store (their weights sum to the tail mass).
use super::hinton::labelled_weights;
use super::reduced::student_log_probs;
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads};
use super::{check_pair, compute_kind, lead_shape, masked_mean, Reduced};
use crate::data::IGNORE_INDEX;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// Σ_k w_k·(logsumexp_{l≥k} x_l − x_k) over the last dim of scores already in ranked order.
/// The scan and the weighted sum run in f64 (a long f32 scan over a 50k vocabulary drifts past the
/// reference tests' 1e-6); the result returns in the input's kind.
pub(crate) fn plackett_luce_suffix(ranked_scores: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let kind = ranked_scores.kind();
    let x = ranked_scores.f_to_kind(Kind::Double)?;
    let suffix_lse = x.f_flip([-1])?.f_logcumsumexp(-1)?.f_flip([-1])?;
    Ok(weights
        .f_to_kind(Kind::Double)?
        .f_mul(&suffix_lse.f_sub(&x)?)?
        .f_sum_dim_intlist(-1, false, Kind::Double)?
        .f_to_kind(kind)?)
}

pub fn pld_per_pos(s: &Tensor, t: &Tensor, labels: &Tensor, tau: f64) -> Result<Tensor> {
    check_pair("pld", s, t)?;
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::Invalid(format!(
            "pld: tau must be positive and finite, got {tau}"
        )));
    }
    let lead = lead_shape(s);
    if labels.size() != lead {
        return Err(Error::Shape(format!(
            "pld: 'labels' has shape {:?}, expected {:?}",
            labels.size(),
            lead
        )));
    }
    let kind = compute_kind(s);
    let (s, t) = (s.f_to_kind(kind)?, t.f_to_kind(kind)?.f_detach()?);
    let labels = labels.f_to_kind(Kind::Int64)?.f_to_device(s.device())?;
    let safe = labels
        .f_masked_fill(&labels.f_eq(IGNORE_INDEX)?, 0)?
        .f_unsqueeze(-1)?;
    // rank: label first (+inf key), then descending teacher logit; stable for ties
    let key = t.f_scatter_value(-1, &safe, f64::INFINITY)?;
    let (_, order) = key.f_sort_stable(true, -1, true)?;
    let ranked_s = s.f_gather(-1, &order, false)?;
    // teacher weights in f64: an f32 softmax over 50k classes sums to 1 ± 2e-6, a bias the whole
    // loss inherits
    let a = t
        .f_to_kind(Kind::Double)?
        .f_div_scalar(tau)?
        .f_softmax(-1, Kind::Double)?
        .f_gather(-1, &order, false)?;
    plackett_luce_suffix(&ranked_s, &a)
}

/// PLD per position on a store's reduced pair `r` (τ = its temperature); `s` the student's logits
/// `[..., V]`, `labels` `[...]` (the label is one of the stored ids).
pub fn pld_reduced_per_pos(s: &Tensor, r: &Reduced, labels: &Tensor) -> Result<Tensor> {
    let lead = lead_shape(s);
    if labels.size() != lead || r.indices.size()[..lead.len()] != lead[..] {
        return Err(Error::Shape(format!(
            "pld: 'labels' has shape {:?} and the store's ids {:?}, expected [{lead:?}] and [{lead:?}, K]",
            labels.size(),
            r.indices.size()
        )));
    }
    let k = r.slots();
    // the student's scores at T = 1: log q̃ (Plackett-Luce is unchanged by a shift per position)
    let scores = if r.temperature == 1.0 {
        r.student.shallow_clone()
    } else {
        student_log_probs(s, &r.indices, &r.stored, 1.0)?
    }; // [..., K+1]
    let kind = scores.kind();
    let x = scores.f_narrow(-1, 0, k)?; // [..., K], −inf on padding
    let x_tail = scores.f_narrow(-1, k, 1)?.f_to_kind(Kind::Double)?; // [..., 1]
                                                                      // teacher weights a = p̃ (renormalised, f64, as the dense form's softmax), 0 on padding
    let a = r
        .teacher
        .f_to_kind(Kind::Double)?
        .f_div_scalar(r.temperature)?
        .f_softmax(-1, Kind::Double)?
        .f_narrow(-1, 0, k)?; // [..., K]
    let labels = labels.f_to_kind(Kind::Int64)?.f_to_device(s.device())?;
    let is_label = r
        .indices
        .f_eq_tensor(&labels.f_unsqueeze(-1)?)?
        .f_logical_and(&r.stored)?;
    // the order: padding slots first (weight 0, and outside every other slot's suffix), then the
    // label, then the other stored tokens by descending p̃ (stable for ties); the bucket comes last
    let (_, by_p) = r
        .teacher
        .f_narrow(-1, 0, k)?
        .f_sort_stable(true, -1, true)?;
    let class = is_label.f_to_kind(Kind::Int64)?.f_add(
        &r.stored
            .f_logical_not()?
            .f_to_kind(Kind::Int64)?
            .f_mul_scalar(2)?,
    )?;
    let (_, by_class) = class
        .f_gather(-1, &by_p, false)?
        .f_sort_stable(true, -1, true)?;
    let order = by_p.f_gather(-1, &by_class, false)?; // [..., K]
    let zero = Tensor::f_zeros([], (kind, s.device()))?;
    let ranked = x
        .f_where_self(&r.stored, &zero)?
        .f_gather(-1, &order, false)?
        .f_to_kind(Kind::Double)?;
    let a = a.f_gather(-1, &order, false)?;
    // suffix log-sum-exp over the ranked slots, then with the bucket (after every slot)
    let suffix = ranked
        .f_flip([-1])?
        .f_logcumsumexp(-1)?
        .f_flip([-1])?
        .f_logaddexp(&x_tail)?;
    Ok(a.f_mul(&suffix.f_sub(&ranked)?)?
        .f_sum_dim_intlist(-1, false, Kind::Double)?
        .f_to_kind(kind)?)
}

pub fn pld(
    s: &Tensor,
    t: &Tensor,
    labels: &Tensor,
    tau: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let per = pld_per_pos(s, t, labels, tau)?;
    let keep = labelled_weights("pld", s, labels, weights)?;
    masked_mean("pld", &per, Some(&keep))
}

// ---------------------------------------------------------------- run-file kind

pub const PLD: LossSpec = LossSpec {
    name: "pld",
    summary:
        "Σ_k softmax(t/τ)[π*_k]·(logsumexp_{l≥k} s_{π*_l} − s_{π*_k}), π* = label, then by teacher",
    params: &[ParamSpec {
        name: "tau",
        default: 1.0,
        range: Range::Positive,
        doc: "the temperature of the teacher's confidence weights",
    }],
    reads: Reads::Logits,
    build: |p, _| Ok(Box::new(Pld { tau: p.get("tau") })),
};

#[derive(Debug)]
struct Pld {
    tau: f64,
}

impl Loss for Pld {
    fn spec(&self) -> &'static LossSpec {
        &PLD
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("tau", self.tau))
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        if let Some(r) = x.reduced_at("pld", self.tau)? {
            let per = pld_reduced_per_pos(x.student, r, x.labels)?;
            let keep = labelled_weights("pld", x.student, x.labels, Some(x.weights))?;
            return masked_mean("pld", &per, Some(&keep));
        }
        pld(
            x.student,
            x.teacher("pld")?,
            x.labels,
            self.tau,
            Some(x.weights),
        )
    }
}
