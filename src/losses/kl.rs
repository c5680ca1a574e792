//! Forward and reverse Kullback–Leibler divergence with temperature.
//!   forward_kl = KL(p‖q) = Σ_v p(v)·(log p(v) − log q(v))   (mean-seeking; Hinton et al. 2015)
//!   reverse_kl = KL(q‖p) = Σ_v q(v)·(log q(v) − log p(v))   (mode-seeking; MiniLLM, Gu et al. 2024)
//! p = softmax(t/T), q = softmax(s/T); mean over counted positions. No T² factor here (`hinton`
//! applies it). Differs from torchtune's "ForwardKLLoss", which returns the cross-entropy −Σ p log q
//! (same gradient, value higher by H(p), not 0 at p = q).
//! Note for readers of PyTorch code: `F.kl_div(input, target)` is KL(target‖input).
//! On a stored (sparse) teacher: the same formulas on the K + 1 reduced outcomes, KL(p̃‖q̃), KL(q̃‖p̃).
use super::registry::{Loss, LossInput, LossSpec, Reads, TEMPERATURE};
use super::{checked_distributions, kl_per_pos, masked_mean};
use crate::Result;
use tch::Tensor;

/// KL(p‖q) per position, shape `[...]`.
pub fn forward_kl_per_pos(s: &Tensor, t: &Tensor, temperature: f64) -> Result<Tensor> {
    let (q, p) = checked_distributions("forward_kl", s, t, temperature)?;
    kl_per_pos(&p, &q)
}

/// KL(q‖p) per position, shape `[...]`.
pub fn reverse_kl_per_pos(s: &Tensor, t: &Tensor, temperature: f64) -> Result<Tensor> {
    let (q, p) = checked_distributions("reverse_kl", s, t, temperature)?;
    kl_per_pos(&q, &p)
}

/// KL(p‖q), mean over counted positions.
pub fn forward_kl(
    s: &Tensor,
    t: &Tensor,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean(
        "forward_kl",
        &forward_kl_per_pos(s, t, temperature)?,
        weights,
    )
}

/// KL(q‖p), mean over counted positions.
pub fn reverse_kl(
    s: &Tensor,
    t: &Tensor,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean(
        "reverse_kl",
        &reverse_kl_per_pos(s, t, temperature)?,
        weights,
    )
}

// ---------------------------------------------------------------- run-file kind

pub const FORWARD_KL: LossSpec = LossSpec {
    name: "forward_kl",
    summary: "KL(p‖q) = Σ p·(log p − log q), p = softmax(t/T), q = softmax(s/T)",
    params: &[TEMPERATURE],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(ForwardKl {
            temperature: p.get("temperature"),
        }))
    },
};

pub const REVERSE_KL: LossSpec = LossSpec {
    name: "reverse_kl",
    summary: "KL(q‖p) = Σ q·(log q − log p)",
    params: &[TEMPERATURE],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(ReverseKl {
            temperature: p.get("temperature"),
        }))
    },
};

#[derive(Debug)]
struct ForwardKl {
    temperature: f64,
}

impl Loss for ForwardKl {
    fn reads_only_reduced(&self) -> bool {
        true
    }
    fn spec(&self) -> &'static LossSpec {
        &FORWARD_KL
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        let (s, t) = x.pair("forward_kl", self.temperature)?;
        forward_kl(s, t, self.temperature, Some(x.weights))
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
}

#[derive(Debug)]
struct ReverseKl {
    temperature: f64,
}

impl Loss for ReverseKl {
    fn reads_only_reduced(&self) -> bool {
        true
    }
    fn spec(&self) -> &'static LossSpec {
        &REVERSE_KL
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        let (s, t) = x.pair("reverse_kl", self.temperature)?;
        reverse_kl(s, t, self.temperature, Some(x.weights))
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
}
