//! Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2:
//!   L = α·T²·KL(p_T‖q_T) + (1−α)·CE(labels, q_1)
//! p_T = softmax(t/T), q_T = softmax(s/T), q_1 = softmax(s). The KL term is a mean over counted
//! positions; the cross-entropy term a mean over counted positions whose label is not −100 (ignored,
//! as PyTorch's `ignore_index`). `labels` has the leading shape and holds the target id of each
//! position (already shifted by the caller). T² keeps the soft term's gradient scale independent of T.
//! On a stored (sparse) teacher: α·T²·KL(p̃‖q̃) on the K + 1 reduced outcomes (at the store's T) plus
//! the same (1−α)·CE on the student's full logits (it needs no teacher).
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads, TEMPERATURE};
use super::{
    check_pair, check_temperature, check_unit, kl::forward_kl_per_pos, lead_shape, masked_mean,
    weights_of,
};
use crate::{Error, Result};
use tch::{Kind, Tensor};

pub use crate::data::IGNORE_INDEX;

/// Cross-entropy −log q(label) per position (T = 1), shape `[...]`, 0 where the label is −100.
pub fn cross_entropy_per_pos(s: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let lead = lead_shape(s);
    if labels.size() != lead {
        return Err(Error::Shape(format!(
            "cross_entropy: 'labels' has shape {:?}, expected {:?}",
            labels.size(),
            lead
        )));
    }
    let v = *s.size().last().unwrap_or(&0);
    let labels = labels.f_to_kind(Kind::Int64)?.f_to_device(s.device())?;
    let ignored = labels.f_eq(IGNORE_INDEX)?;
    // the range check reads back from the device: skipped for labels checked upstream
    if !super::is_trusted() {
        let bad = labels
            .f_lt(0)?
            .f_logical_and(&ignored.f_logical_not()?)?
            .f_logical_or(&labels.f_ge(v)?)?;
        if bad.f_any()?.f_int64_value(&[])? != 0 {
            return Err(Error::Invalid(format!(
                "cross_entropy: a label is outside [0, {v}) and is not -100"
            )));
        }
    }
    let safe = labels.f_masked_fill(&ignored, 0)?;
    let kind = super::compute_kind(s);
    let logq = s.f_to_kind(kind)?.f_log_softmax(-1, kind)?;
    let nll = logq
        .f_gather(-1, &safe.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?
        .f_neg()?;
    Ok(nll.f_masked_fill(&ignored, 0.0)?)
}

/// CE(labels, softmax(s)), weighted mean over the positions whose label is not −100.
pub fn cross_entropy(s: &Tensor, labels: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    let nll = cross_entropy_per_pos(s, labels)?;
    let keep = labelled_weights("cross_entropy", s, labels, weights)?;
    masked_mean("cross_entropy", &nll, Some(&keep))
}

/// The weights with 0 where the label is the ignore index (labels of the leading shape).
pub(crate) fn labelled_weights(
    name: &str,
    s: &Tensor,
    labels: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let w = weights_of(name, weights, &lead_shape(s), s)?;
    let labelled = labels.f_ne(IGNORE_INDEX)?.f_to_device(s.device())?;
    Ok(w.f_mul(&labelled.f_to_kind(w.kind())?)?)
}

pub fn hinton(
    s: &Tensor,
    t: &Tensor,
    labels: &Tensor,
    alpha: f64,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    check_pair("hinton", s, t)?;
    check_temperature("hinton", temperature)?;
    check_unit("hinton", "alpha", alpha)?;
    let soft = masked_mean("hinton", &forward_kl_per_pos(s, t, temperature)?, weights)?;
    let hard = cross_entropy(s, labels, weights)?;
    combine(&soft, &hard, alpha, temperature)
}

/// Hinton's loss on a store: the soft term on the reduced pair `r` (at the store's temperature), the
/// hard term on the student's logits `s` `[..., V]`.
pub fn hinton_reduced(
    s: &Tensor,
    r: &super::Reduced,
    labels: &Tensor,
    alpha: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    check_unit("hinton", "alpha", alpha)?;
    let temperature = r.temperature;
    let soft = masked_mean(
        "hinton",
        &forward_kl_per_pos(&r.student, &r.teacher, temperature)?,
        weights,
    )?;
    let hard = cross_entropy(s, labels, weights)?;
    combine(&soft, &hard, alpha, temperature)
}

/// α·T²·soft + (1−α)·hard.
fn combine(soft: &Tensor, hard: &Tensor, alpha: f64, temperature: f64) -> Result<Tensor> {
    Ok(soft
        .f_mul_scalar(alpha * temperature * temperature)?
        .f_add(&hard.f_mul_scalar(1.0 - alpha)?)?)
}

// ---------------------------------------------------------------- run-file kind

pub const CROSS_ENTROPY: LossSpec = LossSpec {
    name: "cross_entropy",
    summary: "−log q_1(label), the hard-label loss (no teacher)",
    params: &[],
    reads: Reads::Logits,
    build: |_, _| Ok(Box::new(CrossEntropy)),
};

pub const HINTON: LossSpec = LossSpec {
    name: "hinton",
    summary: "α·T²·KL(p_T‖q_T) + (1−α)·CE(labels, q_1)",
    params: &[
        TEMPERATURE,
        ParamSpec {
            name: "alpha",
            default: 0.5,
            range: Range::Unit,
            doc: "the soft term's share",
        },
    ],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(Hinton {
            alpha: p.get("alpha"),
            temperature: p.get("temperature"),
        }))
    },
};

#[derive(Debug)]
struct CrossEntropy;

impl Loss for CrossEntropy {
    fn spec(&self) -> &'static LossSpec {
        &CROSS_ENTROPY
    }
    fn needs_teacher(&self) -> bool {
        false
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        cross_entropy(x.student, x.labels, Some(x.weights))
    }
}

#[derive(Debug)]
struct Hinton {
    alpha: f64,
    temperature: f64,
}

impl Loss for Hinton {
    fn spec(&self) -> &'static LossSpec {
        &HINTON
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        if let Some(r) = x.reduced_at("hinton", self.temperature)? {
            return hinton_reduced(x.student, r, x.labels, self.alpha, Some(x.weights));
        }
        hinton(
            x.student,
            x.teacher("hinton")?,
            x.labels,
            self.alpha,
            self.temperature,
            Some(x.weights),
        )
    }
}
