//! Skew KL divergences (DistiLLM, Ko et al. 2024, eqs. 4–5), α = 0.1 by default:
//!   skew_kl(α)         = KL(p ‖ α·p + (1−α)·q)
//!   skew_reverse_kl(α) = KL(q ‖ α·q + (1−α)·p)
//! The mixture's log is a logaddexp of log-probabilities; the gradient flows through q wherever it
//! appears (as in DistiLLM's code). α = 0 gives forward (resp. reverse) KL; α = 1 gives 0.
use super::{check_unit, checked_distributions, kl_per_pos, masked_mean, mixture};
use crate::Result;
use tch::Tensor;

pub fn skew_kl_per_pos(s: &Tensor, t: &Tensor, alpha: f64, temperature: f64) -> Result<Tensor> {
    check_unit("skew_kl", "alpha", alpha)?;
    let (q, p) = checked_distributions("skew_kl", s, t, temperature)?;
    kl_per_pos(&p, &mixture(&p, &q, alpha)?)
}

pub fn skew_reverse_kl_per_pos(
    s: &Tensor,
    t: &Tensor,
    alpha: f64,
    temperature: f64,
) -> Result<Tensor> {
    check_unit("skew_reverse_kl", "alpha", alpha)?;
    let (q, p) = checked_distributions("skew_reverse_kl", s, t, temperature)?;
    kl_per_pos(&q, &mixture(&q, &p, alpha)?)
}

pub fn skew_kl(
    s: &Tensor,
    t: &Tensor,
    alpha: f64,
    temperature: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean("skew_kl", &skew_kl_per_pos(s, t, alpha, temperature)?, mask)
}

pub fn skew_reverse_kl(
    s: &Tensor,
    t: &Tensor,
    alpha: f64,
    temperature: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean(
        "skew_reverse_kl",
        &skew_reverse_kl_per_pos(s, t, alpha, temperature)?,
        mask,
    )
}
