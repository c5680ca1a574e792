//! SinKD (Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"),
//! batch-wise over the N rows of [N, C] logits:
//!   W_ij = Σ_c |softmax(s_i/T)_c − softmax(t_j/T)_c|        (L1 cost between rows, N×N)
//!   K = exp(−W/ε);  `iters` Sinkhorn iterations of K give P, one iteration = a row normalisation
//!   (each row sums to 1) followed by a column normalisation (each column sums to 1), as SinKD's
//!   published code counts them
//!   loss = Σ_ij P_ij·W_ij                                   (SinKD's defaults: ε = 0.1, 20 iterations)
//! The normalisations run in log space (log K = −W/ε, subtract logsumexp), the same P without
//! underflow. The gradient flows through W and through P (a differentiable Sinkhorn).
//! Compared with SinKD's published code (github.com/2018cx/SinKD, loss.py, `saliency_mse`): the same
//! order (rows, then columns, per iteration), ε = 0.1 and 20 iterations (its `sinkhorn_loss` passes
//! 20 to a `sinkhorn_normalized` whose own default is 10); it normalises K itself (no log space), fixes
//! T = 2 and scales the loss by 0.0008·20/8 = 0.002 — here T is an argument and the scale belongs to
//! the loss weight. `iters` = 0 returns K unnormalised.
//! On a stored (sparse) teacher: refused (`REDUCED_REFUSAL`): the cost compares row i of the student
//! with row j ≠ i of the teacher outcome by outcome, and a store's rows have different outcomes.
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads, TEMPERATURE};
use super::{check_pair, check_temperature, compute_kind};
use crate::{Error, Result};
use tch::Tensor;

/// The transport plan after `iters` Sinkhorn iterations of exp(−W/ε), each normalising the rows
/// (dim 1), then the columns (dim 0): after any iteration the columns sum to 1 exactly (up to
/// rounding) and the rows approach 1.
pub fn sinkhorn_plan(w: &Tensor, epsilon: f64, iters: usize) -> Result<Tensor> {
    let mut log_p = w.f_div_scalar(-epsilon)?;
    for _ in 0..iters {
        for dim in [1, 0] {
            log_p = log_p.f_sub(&log_p.f_logsumexp([dim], true)?)?;
        }
    }
    Ok(log_p.f_exp()?)
}

/// The L1 cost matrix W (N×N) between the student's and the teacher's row distributions.
pub fn cost_matrix(s: &Tensor, t: &Tensor, temperature: f64) -> Result<Tensor> {
    let kind = compute_kind(s);
    let q = s
        .f_to_kind(kind)?
        .f_div_scalar(temperature)?
        .f_softmax(-1, kind)?;
    let p = t
        .f_to_kind(kind)?
        .f_div_scalar(temperature)?
        .f_softmax(-1, kind)?
        .f_detach()?;
    Ok(Tensor::f_cdist(&q, &p, 1.0, None::<i64>)?)
}

/// SinKD's loss Σ_ij P_ij·W_ij over `s`, `t` of shape [N, C]; `iters` Sinkhorn iterations (rows
/// then columns each); ε > 0.
pub fn sinkhorn(
    s: &Tensor,
    t: &Tensor,
    temperature: f64,
    epsilon: f64,
    iters: usize,
) -> Result<Tensor> {
    check_pair("sinkhorn", s, t)?;
    check_temperature("sinkhorn", temperature)?;
    if s.dim() != 2 {
        return Err(Error::Shape(format!(
            "sinkhorn: 'student' has shape {:?}, expected [N, C]",
            s.size()
        )));
    }
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(Error::Invalid(format!(
            "sinkhorn: epsilon must be positive, got {epsilon}"
        )));
    }
    let w = cost_matrix(s, t, temperature)?;
    let p = sinkhorn_plan(&w, epsilon, iters)?;
    let kind = w.kind();
    Ok(p.f_mul(&w)?.f_sum(kind)?)
}

// ---------------------------------------------------------------- run-file kind

/// As a run-file kind: the rows are the positions of the micro-batch that count (weight > 0), each
/// a distribution over the vocabulary; the transport plan couples the student's rows with the
/// teacher's. Fractional weights select rows (weight > 0) but do not weigh them. The loss spans the
/// micro-batch, so the objective is then computed over whole micro-batches (no chunking).
pub const SINKHORN: LossSpec = LossSpec {
    name: "sinkhorn",
    summary: "Σ_ij P_ij·W_ij, W = L1 cost between student and teacher rows, P = Sinkhorn plan",
    params: &[
        TEMPERATURE,
        ParamSpec {
            name: "epsilon",
            default: 0.1,
            range: Range::Positive,
            doc: "the entropic regularisation",
        },
        ParamSpec {
            name: "iters",
            default: 20.0,
            range: Range::Count,
            doc: "Sinkhorn iterations, each a row then a column normalisation (SinKD's count)",
        },
    ],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(Sinkhorn {
            temperature: p.get("temperature"),
            epsilon: p.get("epsilon"),
            iters: p.count("iters"),
        }))
    },
};

/// Why SinKD is not defined on a store's reduced distributions.
pub const REDUCED_REFUSAL: &str = "its cost compares the student's row i with the teacher's row j \
    ≠ i outcome by outcome, and on a store each row's reduced distribution has its own outcomes (that \
    position's stored tokens and a tail bucket of different tokens), so rows of different positions \
    share no outcomes to compare";

#[derive(Debug)]
struct Sinkhorn {
    temperature: f64,
    epsilon: f64,
    iters: usize,
}

impl Loss for Sinkhorn {
    fn spec(&self) -> &'static LossSpec {
        &SINKHORN
    }
    fn per_position(&self) -> bool {
        false
    }
    fn on_reduced(&self) -> std::result::Result<(), &'static str> {
        Err(REDUCED_REFUSAL)
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.temperature))
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        if x.reduced.is_some() {
            return Err(Error::Invalid(format!(
                "sinkhorn: not defined on a teacher store: {REDUCED_REFUSAL}"
            )));
        }
        let t = x.teacher("sinkhorn")?;
        let v = *x.student.size().last().unwrap_or(&0);
        let rows = |m: &Tensor| -> Result<Tensor> {
            let counted = x
                .weights
                .f_gt(0.0)?
                .f_flatten(0, -1)?
                .f_nonzero()?
                .f_squeeze_dim(1)?;
            Ok(m.f_reshape([-1, v])?.f_index_select(0, &counted)?)
        };
        let (s, t) = (rows(x.student)?, rows(t)?);
        if s.size()[0] == 0 {
            return Ok(Tensor::f_zeros(
                [],
                (super::compute_kind(x.student), x.student.device()),
            )?);
        }
        sinkhorn(&s, &t, self.temperature, self.epsilon, self.iters)
    }
}
