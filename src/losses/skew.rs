//! Skew KL divergences (DistiLLM, Ko et al. 2024, eqs. 4–5), α = 0.1 by default:
//!   skew_kl(α)         = KL(p ‖ α·p + (1−α)·q)
//!   skew_reverse_kl(α) = KL(q ‖ α·q + (1−α)·p)
//! The mixture's log is a logaddexp of log-probabilities; the gradient flows through q wherever it
//! appears (as in DistiLLM's code). α = 0 gives forward (resp. reverse) KL; α = 1 gives 0.
//! On a stored (sparse) teacher: the same formulas on the K + 1 reduced outcomes (p̃, q̃).
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads, TEMPERATURE};
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
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean(
        "skew_kl",
        &skew_kl_per_pos(s, t, alpha, temperature)?,
        weights,
    )
}

pub fn skew_reverse_kl(
    s: &Tensor,
    t: &Tensor,
    alpha: f64,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean(
        "skew_reverse_kl",
        &skew_reverse_kl_per_pos(s, t, alpha, temperature)?,
        weights,
    )
}

// ---------------------------------------------------------------- run-file kind

const ALPHA: ParamSpec = ParamSpec {
    name: "alpha",
    default: 0.1,
    range: Range::Unit,
    doc: "the skew: the first distribution's share of the mixture",
};

pub const SKEW_KL: LossSpec = LossSpec {
    name: "skew_kl",
    summary: "KL(p ‖ α·p + (1−α)·q)",
    params: &[TEMPERATURE, ALPHA],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(Skew {
            reverse: false,
            alpha: p.get("alpha"),
            temperature: p.get("temperature"),
        }))
    },
};

pub const SKEW_REVERSE_KL: LossSpec = LossSpec {
    name: "skew_reverse_kl",
    summary: "KL(q ‖ α·q + (1−α)·p)",
    params: &[TEMPERATURE, ALPHA],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(Skew {
            reverse: true,
            alpha: p.get("alpha"),
            temperature: p.get("temperature"),
        }))
    },
};

#[derive(Debug)]
struct Skew {
    reverse: bool,
    alpha: f64,
    temperature: f64,
}

impl Loss for Skew {
    fn reads_only_reduced(&self) -> bool {
        true
    }
    fn spec(&self) -> &'static LossSpec {
        if self.reverse {
            &SKEW_REVERSE_KL
        } else {
            &SKEW_KL
        }
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        let f = if self.reverse {
            skew_reverse_kl
        } else {
            skew_kl
        };
        let (s, t) = x.pair(self.spec().name, self.temperature)?;
        f(s, t, self.alpha, self.temperature, Some(x.weights))
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
}
