//! Generalised Jensen–Shannon divergence (GKD, Agarwal et al. 2024, eq. for JSD(β)):
//!   M = β·p + (1−β)·q,   JSD(β) = β·KL(p‖M) + (1−β)·KL(q‖M)
//! log M = logaddexp(log β + log p, log(1−β) + log q); mean over counted positions. No special case
//! at β ∈ {0, 1}: both give 0 (users who want FKL or RKL name them). The gradient flows through q in
//! both terms, M included. Differs from TRL's early `generalized_jsd_loss`, which put β on the wrong
//! distributions of the mixture.
//! On a stored (sparse) teacher: the same formula on the K + 1 reduced outcomes, M̃ = β·p̃ + (1−β)·q̃.
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads, TEMPERATURE};
use super::{check_unit, checked_distributions, kl_per_pos, masked_mean, mixture, Dist};
use crate::Result;
use tch::Tensor;

/// JSD(β) per position, shape `[...]`.
pub fn jsd_per_pos(s: &Tensor, t: &Tensor, beta: f64, temperature: f64) -> Result<Tensor> {
    check_unit("jsd", "beta", beta)?;
    let (q, p) = checked_distributions("jsd", s, t, temperature)?;
    jsd_of(&q, &p, beta)
}

/// JSD(β) per position of distributions already formed (student q, teacher p).
pub(crate) fn jsd_of(q: &Dist, p: &Dist, beta: f64) -> Result<Tensor> {
    let m = mixture(p, q, beta)?;
    Ok(kl_per_pos(p, &m)?
        .f_mul_scalar(beta)?
        .f_add(&kl_per_pos(q, &m)?.f_mul_scalar(1.0 - beta)?)?)
}

pub fn jsd(
    s: &Tensor,
    t: &Tensor,
    beta: f64,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean("jsd", &jsd_per_pos(s, t, beta, temperature)?, weights)
}

// ---------------------------------------------------------------- run-file kind

pub const BETA: ParamSpec = ParamSpec {
    name: "beta",
    default: 0.5,
    range: Range::Unit,
    doc: "the teacher's share of the mixture M = β·p + (1−β)·q",
};

pub const JSD: LossSpec = LossSpec {
    name: "jsd",
    summary: "β·KL(p‖M) + (1−β)·KL(q‖M), M = β·p + (1−β)·q",
    params: &[TEMPERATURE, BETA],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(Jsd {
            beta: p.get("beta"),
            temperature: p.get("temperature"),
        }))
    },
};

#[derive(Debug)]
struct Jsd {
    beta: f64,
    temperature: f64,
}

impl Loss for Jsd {
    fn reads_only_reduced(&self) -> bool {
        true
    }
    fn spec(&self) -> &'static LossSpec {
        &JSD
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        let (s, t) = x.pair("jsd", self.temperature)?;
        jsd(s, t, self.beta, self.temperature, Some(x.weights))
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
}
