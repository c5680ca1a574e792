//! Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2:
//!   L = α·T²·KL(p_T‖q_T) + (1−α)·CE(labels, q_1)
//! p_T = softmax(t/T), q_T = softmax(s/T), q_1 = softmax(s). The KL term is a mean over counted
//! positions; the cross-entropy term a mean over counted positions whose label is not −100 (ignored,
//! as PyTorch's `ignore_index`). `labels` has the leading shape and holds the target id of each
//! position (already shifted by the caller). T² keeps the soft term's gradient scale independent of T.
use super::{
    check_pair, check_temperature, check_unit, kl::forward_kl_per_pos, lead_shape, mask_bool,
    masked_mean,
};
use crate::{Error, Result};
use tch::{Kind, Tensor};

pub const IGNORE_INDEX: i64 = -100;

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
    let bad = labels
        .f_lt(0)?
        .f_logical_and(&ignored.f_logical_not()?)?
        .f_logical_or(&labels.f_ge(v)?)?;
    if bad.f_any()?.f_int64_value(&[])? != 0 {
        return Err(Error::Invalid(format!(
            "cross_entropy: a label is outside [0, {v}) and is not -100"
        )));
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

/// CE(labels, softmax(s)), mean over counted positions whose label is not −100.
pub fn cross_entropy(s: &Tensor, labels: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let nll = cross_entropy_per_pos(s, labels)?;
    let lead = lead_shape(s);
    let keep = mask_bool("cross_entropy", mask, &lead, s)?
        .f_logical_and(&labels.f_ne(IGNORE_INDEX)?.f_to_device(s.device())?)?;
    masked_mean("cross_entropy", &nll, Some(&keep))
}

pub fn hinton(
    s: &Tensor,
    t: &Tensor,
    labels: &Tensor,
    alpha: f64,
    temperature: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_pair("hinton", s, t)?;
    check_temperature("hinton", temperature)?;
    check_unit("hinton", "alpha", alpha)?;
    let soft = masked_mean("hinton", &forward_kl_per_pos(s, t, temperature)?, mask)?;
    let hard = cross_entropy(s, labels, mask)?;
    Ok(soft
        .f_mul_scalar(alpha * temperature * temperature)?
        .f_add(&hard.f_mul_scalar(1.0 - alpha)?)?)
}
