//! Total variation distance: TVD(p, q) = ½·Σ_v |p(v) − q(v)|, mean over counted positions
//! (used as a KD objective by Wen et al. 2023, "f-divergence minimization for sequence-level KD").
//! On a stored (sparse) teacher: the same formula on the K + 1 reduced outcomes, ½·Σ|p̃ − q̃|.
use super::registry::{Loss, LossInput, LossSpec, Reads, TEMPERATURE};
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

pub fn tvd(s: &Tensor, t: &Tensor, temperature: f64, weights: Option<&Tensor>) -> Result<Tensor> {
    masked_mean("tvd", &tvd_per_pos(s, t, temperature)?, weights)
}

// ---------------------------------------------------------------- run-file kind

pub const TVD: LossSpec = LossSpec {
    name: "tvd",
    summary: "½ Σ |p − q|",
    params: &[TEMPERATURE],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(Tvd {
            temperature: p.get("temperature"),
        }))
    },
};

#[derive(Debug)]
struct Tvd {
    temperature: f64,
}

impl Loss for Tvd {
    fn reads_only_reduced(&self) -> bool {
        true
    }
    fn spec(&self) -> &'static LossSpec {
        &TVD
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        let (s, t) = x.pair("tvd", self.temperature)?;
        tvd(s, t, self.temperature, Some(x.weights))
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
}
