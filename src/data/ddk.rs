//! DDK (Liu et al. 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
//! arXiv 2407.16154): the sources' sampling weights follow the student–teacher gap per domain.
//! Every `interval` optimizer steps (and before the first), on each domain i's validation data:
//!   ratio_i  = PPL_student(i) / PPL_teacher(i)
//!   r̂_i      = exp(ratio_i) / Σ_j exp(ratio_j)                  (the domain discrepancy factor)
//!   ψ_i      = w_i · exp(r̂_i)                                    (w = the weights in use)
//!   w'_i     = α · ψ_i / Σ_j ψ_j + (1 − α) / N                  (factor-smooth updating)
//! so a domain the student trails the teacher on most gains weight, multiplicatively over
//! updates, while the (1 − α)/N share keeps every domain sampled. The first weights are the
//! run file's (`[[data.source]] weight`, normalised).
//! Source of the formula: the paper's §3 as we know it; neither the paper's text nor code could be
//! consulted from this machine (no public code release is known to us), so the exact form —
//! in particular whether ψ multiplies the previous weights by exp(r̂) — is from memory of the
//! paper and should be checked against it. `alpha` defaults to 0.5 (our choice).
//! Computed in f64 with the largest exponent subtracted (log-sum-exp form).
use crate::config::{issue, Checked};
use serde::Deserialize;

/// `[data.ddk]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdkFile {
    /// optimizer steps between updates (K)
    pub interval: usize,
    /// α: the share of the update that follows the discrepancy (the rest is uniform)
    pub alpha: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ddk {
    pub interval: usize,
    pub alpha: f64,
}

impl DdkFile {
    pub fn resolve(&self) -> Checked<Ddk> {
        if self.interval == 0 {
            return Err(issue("data.ddk.interval", "must be at least 1 step"));
        }
        let alpha = self.alpha.unwrap_or(0.5);
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(issue(
                "data.ddk.alpha",
                format!("must be in (0, 1], got {alpha}"),
            ));
        }
        Ok(Ddk {
            interval: self.interval,
            alpha,
        })
    }
}

impl Ddk {
    /// An update is due before step `step + 1` when `step` is a multiple of the interval and the
    /// weights were not already updated there (`last`: the step of the last update; a resumed run
    /// does not repeat it).
    pub fn due(&self, step: usize, last: Option<usize>) -> bool {
        step.is_multiple_of(self.interval) && last != Some(step)
    }

    /// The new weights from the weights in use and each domain's (student ppl, teacher ppl).
    /// None when a ratio is not finite and > 0 (the weights then stay).
    pub fn update(&self, weights: &[f64], ppl: &[(f64, f64)]) -> Option<Vec<f64>> {
        let ratios: Vec<f64> = ppl.iter().map(|&(s, t)| s / t).collect();
        if ratios.iter().any(|r| !(r.is_finite() && *r > 0.0)) || weights.len() != ratios.len() {
            return None;
        }
        let r = discrepancy_factor(&ratios);
        // log ψ_i = log w_i + r̂_i
        let log_psi: Vec<f64> = weights.iter().zip(&r).map(|(w, r)| w.ln() + r).collect();
        let top = log_psi.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let psi: Vec<f64> = log_psi.iter().map(|l| (l - top).exp()).collect();
        let sum: f64 = psi.iter().sum();
        let n = weights.len() as f64;
        Some(
            psi.iter()
                .map(|p| self.alpha * p / sum + (1.0 - self.alpha) / n)
                .collect(),
        )
    }
}

/// r̂ = softmax(ratios) over the domains.
pub fn discrepancy_factor(ratios: &[f64]) -> Vec<f64> {
    let top = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = ratios.iter().map(|r| (r - top).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

/// The weights normalised to sum to 1.
pub fn normalised(weights: &[f64]) -> Vec<f64> {
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| w / sum).collect()
}
