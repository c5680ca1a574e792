//! Distillation losses: one file per divergence or method, each opening with its formula and source.
//!
//! Conventions (DESIGN.md §3): `s` = student logits, `t` = teacher logits, both `[..., V]` of one
//! shape; `weights` has the leading shape `[...]`: a per-token weight ≥ 0 (0 where a position does
//! not count; a boolean mask is the 0/1 case), `None` = all 1. The temperature `T` divides both
//! logits before the softmax; `p` = softmax(t/T) (teacher), `q` = softmax(s/T) (student). Each loss
//! returns a scalar: the weighted mean Σ w·loss / Σ w over positions (0 when Σ w = 0). Values are divergences (≥ 0, 0 iff equal), never the cross-entropy form.
//! Computation is in f32 (f64 when the inputs are f64), in log-sum-exp form (`log_softmax`), and the
//! teacher is a constant: only the student receives a gradient.
//!
//! Vocabulary entries where the teacher's logit is −inf (a masked vocabulary, padded rows) lie outside
//! the support: they are removed from both distributions, the student renormalised over the rest, so
//! that every divergence stays finite.
//!
//! On a teacher store (sparse signal) a divergence compares the reduced distributions: the stored
//! tokens plus one tail bucket on both sides (`reduced.rs`); each loss's first comment says what it
//! is there, or why it refuses.
pub mod akl;
pub mod hidden;
pub mod hinton;
pub mod jsd;
pub mod kl;
pub mod pld;
pub mod reduced;
pub mod registry;
pub mod sinkhorn;
pub mod skew;
pub mod taid;
pub mod token_selective;
pub mod tvd;

pub use akl::adaptive_kl;
pub use hidden::hidden;
pub use hinton::hinton;
pub use jsd::jsd;
pub use kl::{forward_kl, reverse_kl};
pub use pld::pld;
pub use reduced::Reduced;
pub use registry::{Loss, LossInput, LossSpec, Reads, REGISTRY};
pub use sinkhorn::sinkhorn;
pub use skew::{skew_kl, skew_reverse_kl};
pub use taid::Taid;
pub use tvd::tvd;

use crate::{Error, Result};
use tch::{Kind, Tensor};

/// The dtype a loss computes in: f64 for f64 inputs, else f32.
pub(crate) fn compute_kind(x: &Tensor) -> Kind {
    if x.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// `s` and `t` must be floating tensors of one shape with a vocabulary dimension.
pub(crate) fn check_pair(name: &str, s: &Tensor, t: &Tensor) -> Result<()> {
    if s.dim() == 0 {
        return Err(Error::Shape(format!(
            "{name}: 'student' is a scalar, expected [..., V]"
        )));
    }
    if s.size() != t.size() {
        return Err(Error::Shape(format!(
            "{name}: 'teacher' has shape {:?}, expected {:?} (the student's)",
            t.size(),
            s.size()
        )));
    }
    for (arg, x) in [("student", s), ("teacher", t)] {
        if !x.is_floating_point() {
            return Err(Error::Shape(format!(
                "{name}: '{arg}' has kind {:?}, expected a float tensor",
                x.kind()
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_temperature(name: &str, temperature: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Invalid(format!(
            "{name}: temperature must be positive and finite, got {temperature}"
        )));
    }
    Ok(())
}

pub(crate) fn check_unit(name: &str, arg: &str, x: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&x) {
        return Err(Error::Invalid(format!(
            "{name}: {arg} must be in [0, 1], got {x}"
        )));
    }
    Ok(())
}

/// Per-token weights as a float tensor of the leading shape `lead`, in `like`'s compute kind (all
/// ones when None). A boolean mask is the 0/1 case. Weights must be ≥ 0 (not checked here: that
/// would cost a host synchronisation per call; `data::Batch` makes them).
pub(crate) fn weights_of(
    name: &str,
    weights: Option<&Tensor>,
    lead: &[i64],
    like: &Tensor,
) -> Result<Tensor> {
    let kind = compute_kind(like);
    match weights {
        None => Ok(Tensor::f_ones(lead, (kind, like.device()))?),
        Some(w) => {
            if w.size() != lead {
                return Err(Error::Shape(format!(
                    "{name}: 'weights' has shape {:?}, expected {:?} (the logits' leading shape)",
                    w.size(),
                    lead
                )));
            }
            Ok(w.f_to_kind(kind)?.f_to_device(like.device())?)
        }
    }
}

/// Weighted mean Σ w·x / Σ w of `per_pos` (leading shape); 0 when Σ w = 0. Positions of weight 0
/// are selected away (`where`) before the product, so a non-finite value there cannot leak in
/// (0·NaN). At 0/1 weights this is the masked mean over the counted positions, bit for bit.
pub(crate) fn masked_mean(
    name: &str,
    per_pos: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let w = weights_of(name, weights, &per_pos.size(), per_pos)?.f_to_kind(per_pos.kind())?;
    let zero = Tensor::f_zeros([], (per_pos.kind(), per_pos.device()))?;
    let kept = per_pos.f_where_self(&w.f_ne(0.0)?, &zero)?.f_mul(&w)?;
    let total = w.f_sum(per_pos.kind())?;
    let one = Tensor::f_ones([], (per_pos.kind(), per_pos.device()))?;
    let denom = total.f_where_self(&total.f_gt(0.0)?, &one)?;
    Ok(kept.f_sum(per_pos.kind())?.f_div(&denom)?)
}

/// One distribution over the vocabulary in a form safe for every divergence: `logp` with the
/// entries outside the support set to 0 (finite, so no NaN reaches a gradient); `prob()` is
/// exp(logp) with those entries 0, formed only when a divergence needs it.
pub(crate) struct Dist {
    pub logp: Tensor,
    outside: Option<Tensor>,
}

impl Dist {
    pub fn prob(&self) -> Result<Tensor> {
        let p = self.logp.f_exp()?;
        Ok(match &self.outside {
            Some(o) => p.f_masked_fill(o, 0.0)?,
            None => p,
        })
    }
    pub fn kind(&self) -> Kind {
        self.logp.kind()
    }
}

/// `distributions` after the checks every pairwise divergence makes: same shapes, floats, T > 0.
pub(crate) fn checked_distributions(
    name: &str,
    s: &Tensor,
    t: &Tensor,
    temperature: f64,
) -> Result<(Dist, Dist)> {
    check_pair(name, s, t)?;
    check_temperature(name, temperature)?;
    distributions(s, t, temperature)
}

thread_local! {
    static TRUSTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PARTIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with inputs checked upstream: teacher logits finite (a model's forward pass) and labels
/// in the vocabulary (checked when the data was read). The losses then skip the checks that read a
/// value back from the device (the teacher's −inf test, the labels' range), so a training step
/// makes no host synchronisation per loss term or chunk. The training step and evaluation use it;
/// inside, a −inf teacher logit would give NaN, so a caller with unchecked inputs must not (a
/// store's reduced distributions, which hold −inf by design, run under `partial_support`).
pub fn trusted<R>(f: impl FnOnce() -> R) -> R {
    let was = TRUSTED.with(|c| c.replace(true));
    let out = f();
    TRUSTED.with(|c| c.set(was));
    out
}

pub(crate) fn is_trusted() -> bool {
    TRUSTED.with(|c| c.get())
}

/// Run `f` on teacher "logits" that may hold −inf by design (a store's reduced distributions: padding
/// slots, an empty tail bucket): the divergences then always take the path that removes those
/// entries, without first reading back from the device whether there are any (trusted or not).
pub(crate) fn partial_support<R>(f: impl FnOnce() -> R) -> R {
    let was = PARTIAL.with(|c| c.replace(true));
    let out = f();
    PARTIAL.with(|c| c.set(was));
    out
}

/// Student and teacher distributions (q, p) at temperature `T`, with the teacher's −inf entries
/// removed from both.
pub(crate) fn distributions(s: &Tensor, t: &Tensor, temperature: f64) -> Result<(Dist, Dist)> {
    let kind = compute_kind(s);
    let scale = |x: &Tensor| -> Result<Tensor> {
        let x = x.f_to_kind(kind)?;
        Ok(if temperature == 1.0 {
            x
        } else {
            x.f_div_scalar(temperature)?
        })
    };
    let s = scale(s)?;
    let t = scale(t)?.f_detach()?;
    // one reduction instead of a boolean tensor in the common case (no −inf in the teacher); none
    // at all (no host read) for trusted inputs (a model's logits) and for a store's reduced
    // distributions (always the masked path)
    let has_outside = PARTIAL.with(|c| c.get())
        || (!is_trusted() && t.f_min()?.f_double_value(&[])? == f64::NEG_INFINITY);
    if !has_outside {
        let (lq, lp) = (s.f_log_softmax(-1, kind)?, t.f_log_softmax(-1, kind)?);
        return Ok((
            Dist {
                logp: lq,
                outside: None,
            },
            Dist {
                logp: lp,
                outside: None,
            },
        ));
    }
    let outside = t.f_isneginf()?;
    let s = s.f_masked_fill(&outside, f64::NEG_INFINITY)?;
    let zero = Tensor::f_zeros([], (kind, s.device()))?;
    let safe = |x: Tensor| -> Result<Dist> {
        Ok(Dist {
            logp: zero.f_where_self(&outside, &x)?,
            outside: Some(outside.shallow_clone()),
        })
    };
    Ok((
        safe(s.f_log_softmax(-1, kind)?)?,
        safe(t.f_log_softmax(-1, kind)?)?,
    ))
}

/// Per position KL(a‖b) = Σ_v a(v)·(log a(v) − log b(v)), over the last dimension.
pub(crate) fn kl_per_pos(a: &Dist, b: &Dist) -> Result<Tensor> {
    Ok(a.prob()?
        .f_mul(&a.logp.f_sub(&b.logp)?)?
        .f_sum_dim_intlist(-1, false, a.kind())?)
}

/// The mixture w·a + (1−w)·b as a `Dist`, its log computed as logaddexp(log w + log a,
/// log(1−w) + log b) (never the log of a sum of probabilities).
pub(crate) fn mixture(a: &Dist, b: &Dist, w: f64) -> Result<Dist> {
    let logp = if w == 0.0 {
        b.logp.shallow_clone()
    } else if w == 1.0 {
        a.logp.shallow_clone()
    } else {
        a.logp
            .f_add_scalar(w.ln())?
            .f_logaddexp(&b.logp.f_add_scalar((1.0 - w).ln())?)?
    };
    let outside = a.outside.as_ref().map(|o| o.shallow_clone());
    let logp = match &outside {
        Some(o) => logp.f_masked_fill(o, 0.0)?,
        None => logp,
    };
    Ok(Dist { logp, outside })
}

/// The leading shape `[...]` of `[..., V]`.
pub(crate) fn lead_shape(x: &Tensor) -> Vec<i64> {
    let s = x.size();
    s[..s.len() - 1].to_vec()
}
