//! Forward and reverse Kullback–Leibler divergence with temperature.
//!   forward_kl = KL(p‖q) = Σ_v p(v)·(log p(v) − log q(v))   (mean-seeking; Hinton et al. 2015)
//!   reverse_kl = KL(q‖p) = Σ_v q(v)·(log q(v) − log p(v))   (mode-seeking; MiniLLM, Gu et al. 2024)
//! p = softmax(t/T), q = softmax(s/T); mean over counted positions. No T² factor here (`hinton`
//! applies it). Differs from torchtune's "ForwardKLLoss", which returns the cross-entropy −Σ p log q
//! (same gradient, value higher by H(p), not 0 at p = q).
//! Note for readers of PyTorch code: `F.kl_div(input, target)` is KL(target‖input).
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
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean("forward_kl", &forward_kl_per_pos(s, t, temperature)?, mask)
}

/// KL(q‖p), mean over counted positions.
pub fn reverse_kl(
    s: &Tensor,
    t: &Tensor,
    temperature: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean("reverse_kl", &reverse_kl_per_pos(s, t, temperature)?, mask)
}
