//! Plackett-Luce Distillation (PLD; Bassam et al. 2025, "Plackett-Luce Distillation", eq. 6):
//!   π* = the true label first, then every other class by descending teacher logit
//!   a_k = softmax(t/τ)[π*_k]                         (teacher confidence of the k-th ranked class)
//!   L   = Σ_k a_k·(logsumexp_{l≥k} s_{π*_l} − s_{π*_k})
//! a weighted sum of Plackett-Luce choice losses of the teacher-optimal ranking under the student's
//! scores; mean over counted positions (label −100 never counts). As τ → 0 with the teacher's argmax
//! at the label, a → one-hot on π*_1 and L → cross-entropy on the true label.
use super::hinton::labelled_weights;
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range};
use super::{check_pair, compute_kind, lead_shape, masked_mean};
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
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        pld(
            x.student,
            x.teacher("pld")?,
            x.labels,
            self.tau,
            Some(x.weights),
        )
    }
}
