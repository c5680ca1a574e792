//! TAID: Temporally Adaptive Interpolated Distillation (Shing et al. 2025, ICLR, eqs. 2 and 5, and
//! Algorithm 1):
//!   p_λ = softmax((1−λ)·stopgrad(s) + λ·t)     (interpolation in logit space)
//!   loss = KL(p_λ ‖ q),  q = softmax(s)        (mean over counted positions)
//! λ update after each step with loss L (first call only records L, as the published code does):
//!   rel = (L_prev − L)/(L_prev + 1e−15);  m = β·m + (1−β)·rel
//!   λ = min(t_end, max(t_start + (t_end − t_start)·step/total_steps, λ + α·sigmoid(m)·(1−λ)))
//! Defaults from the paper: t_start 0.4, t_end 1.0, α 5e−4, β 0.99.
//! On a stored (sparse) teacher (captured at T = 1): the same formula on the K + 1 reduced outcomes,
//! p̃_λ = softmax((1−λ)·sg(log q̃) + λ·log p̃), loss KL(p̃_λ‖q̃). On the stored tokens p̃_λ has the
//! dense target's proportions; its bucket is the geometric interpolation q̃_tail^(1−λ)·p̃_tail^λ (up to
//! the normalisation), not the dense target's tail mass, which needs the logits off the store.
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads};
use super::{check_pair, check_unit, distributions, kl_per_pos, masked_mean};
use crate::{Error, Result};
use tch::Tensor;

/// What a checkpoint must hold to continue λ's schedule exactly.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaidState {
    pub lambda: f64,
    pub momentum: f64,
    pub prev_loss: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Taid {
    pub t_start: f64,
    pub t_end: f64,
    pub alpha: f64,
    pub beta: f64,
    pub total_steps: usize,
    state: TaidState,
}

impl Taid {
    pub fn new(
        t_start: f64,
        t_end: f64,
        alpha: f64,
        beta: f64,
        total_steps: usize,
    ) -> Result<Self> {
        check_unit("taid", "t_start", t_start)?;
        check_unit("taid", "t_end", t_end)?;
        check_unit("taid", "beta", beta)?;
        if t_start > t_end {
            return Err(Error::Invalid(format!(
                "taid: t_start {t_start} exceeds t_end {t_end}"
            )));
        }
        if !(alpha.is_finite() && alpha >= 0.0) {
            return Err(Error::Invalid(format!(
                "taid: alpha must be non-negative, got {alpha}"
            )));
        }
        if total_steps == 0 {
            return Err(Error::Invalid("taid: total_steps must be positive".into()));
        }
        Ok(Taid {
            t_start,
            t_end,
            alpha,
            beta,
            total_steps,
            state: TaidState {
                lambda: t_start,
                momentum: 0.0,
                prev_loss: None,
            },
        })
    }

    pub fn lambda(&self) -> f64 {
        self.state.lambda
    }

    /// The linear ramp's value at `step`.
    pub fn ramp(&self, step: usize) -> f64 {
        let progress = (step as f64 / self.total_steps as f64).min(1.0);
        self.t_start + (self.t_end - self.t_start) * progress
    }

    /// KL(p_λ‖q) per position, shape `[...]`.
    pub fn loss_per_pos(&self, s: &Tensor, t: &Tensor) -> Result<Tensor> {
        check_pair("taid", s, t)?;
        let lambda = self.state.lambda;
        let kind = super::compute_kind(s);
        // interpolate only where both ends take part, so that a teacher logit of −inf (outside the
        // support) stays −inf for λ > 0 and never meets 0·∞ at λ = 0
        let s_det = s.f_detach()?.f_to_kind(kind)?;
        let target = if lambda == 0.0 {
            s_det
        } else if lambda == 1.0 {
            t.f_to_kind(kind)?
        } else {
            s_det
                .f_mul_scalar(1.0 - lambda)?
                .f_add(&t.f_to_kind(kind)?.f_mul_scalar(lambda)?)?
        };
        let (q, p) = distributions(s, &target, 1.0)?;
        kl_per_pos(&p, &q)
    }

    pub fn loss(&self, s: &Tensor, t: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
        masked_mean("taid", &self.loss_per_pos(s, t)?, weights)
    }

    /// Advance λ after a step whose loss was `loss_value`; `step` counts from 1.
    pub fn update(&mut self, loss_value: f64, step: usize) {
        let Some(prev) = self.state.prev_loss else {
            self.state.prev_loss = Some(loss_value);
            return;
        };
        let rel = (prev - loss_value) / (prev + 1e-15);
        let momentum = self.beta * self.state.momentum + (1.0 - self.beta) * rel;
        let sigmoid = 1.0 / (1.0 + (-momentum).exp());
        let adaptive = self.state.lambda + self.alpha * sigmoid * (1.0 - self.state.lambda);
        let ramp = self.ramp(step);
        let st = &mut self.state;
        st.lambda = self.t_end.min(ramp.max(adaptive));
        st.momentum = momentum;
        st.prev_loss = Some(loss_value);
    }

    pub fn state(&self) -> TaidState {
        self.state
    }

    pub fn restore(&mut self, state: TaidState) {
        self.state = state;
    }
}

// ---------------------------------------------------------------- run-file kind

pub const TAID: LossSpec = LossSpec {
    name: "taid",
    summary: "KL(p_λ‖q), p_λ = softmax((1−λ)·sg(s) + λ·t), λ adapted each step",
    params: &[
        ParamSpec {
            name: "t_start",
            default: 0.4,
            range: Range::Unit,
            doc: "λ at the start",
        },
        ParamSpec {
            name: "t_end",
            default: 1.0,
            range: Range::Unit,
            doc: "λ's ceiling",
        },
        ParamSpec {
            name: "alpha",
            default: 5e-4,
            range: Range::NonNegative,
            doc: "the adaptive step size",
        },
        ParamSpec {
            name: "beta",
            default: 0.99,
            range: Range::Unit,
            doc: "the momentum of the relative loss change",
        },
    ],
    reads: Reads::Logits,
    build: |p, ctx| {
        Ok(Box::new(Taid::new(
            p.get("t_start"),
            p.get("t_end"),
            p.get("alpha"),
            p.get("beta"),
            ctx.total_steps,
        )?))
    },
};

impl Loss for Taid {
    fn spec(&self) -> &'static LossSpec {
        &TAID
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        let (s, t) = x.pair("taid", 1.0)?;
        self.loss(s, t, Some(x.weights))
    }
    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::to_value(self.state).expect("TaidState serialises"))
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.state = serde_json::from_value(state.clone())
            .map_err(|e| Error::Invalid(format!("taid: checkpoint state: {e}")))?;
        Ok(())
    }
    fn after_step(&mut self, value: f64, step: usize) {
        self.update(value, step);
    }
    fn log_value(&self) -> Option<(&'static str, f64)> {
        Some(("taid_lambda", self.lambda()))
    }
}
