//! Adaptive KL (AKL; Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge
//! Distillation for Large Language Models", eq. 8–10), μ = 0.5 by default:
//!   head = the teacher's top tokens, taken in descending p, up to and including the first whose
//!          cumulative probability reaches μ; tail = the rest
//!   g_head = Σ_head |p − q|,  g_tail = Σ_tail |p − q|   (both detached)
//!   AKL = (g_head·KL(p‖q) + g_tail·KL(q‖p)) / (g_head + g_tail)
//! Mean over counted positions; at p = q (g_head + g_tail = 0) the value is 0.
//! Differs from the published code, which sorts ascending and calls "tail" the smallest tokens whose
//! cumulative mass stays below μ: the two splits differ only in the token that crosses μ.
//! On a stored (sparse) teacher, on the K + 1 reduced outcomes (p̃, q̃): head = the stored tokens in
//! descending p̃ up to and including the first whose cumulative mass reaches μ (all stored tokens when
//! they do not reach μ); the tail bucket is always in the tail (each of its tokens ranks below every
//! stored one of the teacher's top set); then the same formula. This is the dense head whenever the
//! stored top set reaches μ; g_tail, KL and reverse KL are their reduced forms.
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads, TEMPERATURE};
use super::{checked_distributions, kl_per_pos, masked_mean, Dist, Reduced};
use crate::{Error, Result};
use tch::Tensor;

/// 1 where a vocabulary entry is in the teacher's head (shape of `p`).
pub fn head_mask(p: &Tensor, mu: f64) -> Result<Tensor> {
    let (sorted, idx) = p.f_sort(-1, true)?;
    let before = sorted.f_cumsum(-1, sorted.kind())?.f_sub(&sorted)?; // mass of the tokens ranked above
    let head_sorted = before.f_lt(mu)?.f_to_kind(p.kind())?;
    Ok(Tensor::f_zeros_like(p)?.f_scatter(-1, &idx, &head_sorted)?)
}

pub fn adaptive_kl_per_pos(s: &Tensor, t: &Tensor, mu: f64, temperature: f64) -> Result<Tensor> {
    check_mu(mu)?;
    let (q, p) = checked_distributions("adaptive_kl", s, t, temperature)?;
    let head = head_mask(&p.prob()?, mu)?;
    akl_of(&q, &p, &head)
}

/// AKL per position on a store's reduced pair: the head among the K stored slots only, the tail
/// bucket (the last outcome) always in the tail.
pub fn adaptive_kl_reduced_per_pos(r: &Reduced, mu: f64) -> Result<Tensor> {
    check_mu(mu)?;
    let (q, p) = checked_distributions("adaptive_kl", &r.student, &r.teacher, r.temperature)?;
    let stored_head = head_mask(&p.prob()?.f_narrow(-1, 0, r.slots())?, mu)?; // [..., K]
    let bucket = Tensor::f_zeros_like(&stored_head.f_narrow(-1, 0, 1)?)?; // [..., 1]
    akl_of(&q, &p, &Tensor::f_cat(&[stored_head, bucket], -1)?)
}

fn check_mu(mu: f64) -> Result<()> {
    if !(mu > 0.0 && mu <= 1.0) {
        return Err(Error::Invalid(format!(
            "adaptive_kl: mu must be in (0, 1], got {mu}"
        )));
    }
    Ok(())
}

/// AKL per position of distributions already formed, with the teacher's head (1 = head).
fn akl_of(q: &Dist, p: &Dist, head: &Tensor) -> Result<Tensor> {
    let kind = p.kind();
    let p_prob = p.prob()?;
    let gap = p_prob.f_sub(&q.prob()?)?.f_abs()?.f_detach()?;
    let g_head = gap.f_mul(head)?.f_sum_dim_intlist(-1, false, kind)?;
    let g_tail = gap
        .f_mul(&head.f_neg()?.f_add_scalar(1.0)?)?
        .f_sum_dim_intlist(-1, false, kind)?;
    let total = g_head.f_add(&g_tail)?;
    let fkl = kl_per_pos(p, q)?;
    let rkl = kl_per_pos(q, p)?;
    let num = g_head.f_mul(&fkl)?.f_add(&g_tail.f_mul(&rkl)?)?;
    let ratio = num.f_div(&total.f_clamp_min(1e-30)?)?;
    let zero = Tensor::f_zeros([], (kind, ratio.device()))?;
    Ok(ratio
        .f_where_self(&total.f_gt(0.0)?, &zero)?
        .f_to_kind(kind)?)
}

pub fn adaptive_kl(
    s: &Tensor,
    t: &Tensor,
    mu: f64,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    masked_mean(
        "adaptive_kl",
        &adaptive_kl_per_pos(s, t, mu, temperature)?,
        weights,
    )
}

// ---------------------------------------------------------------- run-file kind

pub const ADAPTIVE_KL: LossSpec = LossSpec {
    name: "adaptive_kl",
    summary: "(g_head·KL(p‖q) + g_tail·KL(q‖p)) / (g_head + g_tail), head = teacher mass up to μ",
    params: &[
        TEMPERATURE,
        ParamSpec {
            name: "mu",
            default: 0.5,
            range: Range::UnitOpen,
            doc: "the teacher's cumulative mass that makes the head",
        },
    ],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(AdaptiveKl {
            mu: p.get("mu"),
            temperature: p.get("temperature"),
        }))
    },
};

#[derive(Debug)]
struct AdaptiveKl {
    mu: f64,
    temperature: f64,
}

impl Loss for AdaptiveKl {
    fn reads_only_reduced(&self) -> bool {
        true
    }
    fn spec(&self) -> &'static LossSpec {
        &ADAPTIVE_KL
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        if let Some(r) = x.reduced_at("adaptive_kl", self.temperature)? {
            return masked_mean(
                "adaptive_kl",
                &adaptive_kl_reduced_per_pos(r, self.mu)?,
                Some(x.weights),
            );
        }
        adaptive_kl(
            x.student,
            x.teacher("adaptive_kl")?,
            self.mu,
            self.temperature,
            Some(x.weights),
        )
    }
}
