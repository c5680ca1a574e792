//! Total variation distance: TVD(p, q) = ½·Σ_v |p(v) − q(v)|, mean over counted positions
//! (used as a KD objective by Wen et al. 2023, "f-divergence minimization for sequence-level KD").
use super::{checked_distributions, masked_mean};
use crate::Result;
use tch::Tensor;

pub fn tvd_per_pos(s: &Tensor, t: &Tensor, temperature: f64) -> Result<Tensor> {
    let (q, p) = checked_distributions("tvd", s, t, temperature)?;
    let kind = q.kind();
    Ok(p.prob()?
        .f_sub(&q.prob()?)?
        .f_abs()?
        .f_sum_dim_intlist(-1, false, kind)?
        .f_mul_scalar(0.5)?)
}

pub fn tvd(s: &Tensor, t: &Tensor, temperature: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    masked_mean("tvd", &tvd_per_pos(s, t, temperature)?, mask)
}
