//! Hidden-state distillation: the student's residual stream after chosen layers, projected to the
//! teacher's width, against the teacher's residual stream after the layers they are mapped to.
//! For a mapped pair (student layer s, teacher layer t) and a position n, with y = P·h_s[n] (d_t)
//! and x = h_t[n] (d_t):
//!   mse            = (1/d_t)·Σ_j (y_j − x_j)²
//!                    TinyBERT (Jiao et al. 2020, eq. 7–8): MSE(H^S·W_h, H^T), W_h learned
//!   cosine         = 1 − y·x / (max(‖y‖, ε)·max(‖x‖, ε)),  ε = 1e-8
//!                    DistilBERT's cosine loss on hidden states (Sanh et al. 2019, §2)
//!   normalized_mse = (1/d_t)·Σ_j (LN(y)_j − LN(x)_j)²,  LN(z) = (z − mean z)/√(var z + 1e-5)
//!                    (biased variance, no affine parameters): the layer-normalised regression
//!                    targets of data2vec (Baevski et al. 2022, §3.3). It ignores each vector's offset
//!                    and scale; at ε → 0 it equals 2·(1 − Pearson correlation of y and x), in [0, 4].
//! The term is the weighted mean over positions, averaged over the mapped pairs:
//!   hidden = (1/|pairs|)·Σ_pairs Σ_n w_n·d_n / Σ_n w_n   (0 when Σ w = 0)
//! with the batch's per-token weights: a position counts as much as its prediction does in the logit
//! terms (0 for padding and for prompts that are not trained on), since the hidden state at n is
//! what predicts token n + 1.
//! P (d_t, d_s) is one matrix per `hidden` term, shared by its pairs (TinyBERT's single W_h): learned
//! with the student when the widths differ (train/hidden.rs holds it), absent (the identity) when
//! they agree. The teacher's states are constants; the student's states and P receive gradients.
//! Computed in f32 (f64 for f64 student states). Not defined on a teacher store: a store holds the
//! teacher's output distribution only.
use super::masked_mean;
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads};
use crate::{Error, Result};
use tch::Tensor;

/// The metrics, in the order of their run-file names.
pub const METRICS: &[&str] = &["mse", "cosine", "normalized_mse"];

/// ε under the norms of `cosine` (a zero vector then has cosine 0 with everything, distance 1).
pub const COSINE_EPS: f64 = 1e-8;
/// ε added to the variance in `normalized_mse` (torch's layer_norm default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Mse,
    Cosine,
    NormalizedMse,
}

impl Metric {
    pub fn name(&self) -> &'static str {
        METRICS[*self as usize]
    }
    fn from_index(i: f64) -> Metric {
        match i as usize {
            0 => Metric::Mse,
            1 => Metric::Cosine,
            _ => Metric::NormalizedMse,
        }
    }
}

/// The distance of each position, shape `[...]`, between y (…, d) and x (…, d) (same shape).
fn per_position(metric: Metric, y: &Tensor, x: &Tensor) -> Result<Tensor> {
    let kind = y.kind();
    let mse = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        Ok(a.f_sub(b)?.f_square()?.f_mean_dim(-1, false, kind)?)
    };
    match metric {
        Metric::Mse => mse(y, x),
        Metric::Cosine => {
            let norm = |z: &Tensor| -> Result<Tensor> {
                Ok(z.f_norm_scalaropt_dim(2.0, -1, false)?
                    .f_clamp_min(COSINE_EPS)?)
            };
            let dot = y.f_mul(x)?.f_sum_dim_intlist(-1, false, kind)?;
            let cos = dot.f_div(&norm(y)?.f_mul(&norm(x)?)?)?;
            Ok(cos.f_neg()?.f_add_scalar(1.0)?)
        }
        Metric::NormalizedMse => {
            let ln = |z: &Tensor| -> Result<Tensor> {
                let c = z.f_sub(&z.f_mean_dim(-1, true, kind)?)?;
                let var = c.f_square()?.f_mean_dim(-1, true, kind)?;
                Ok(c.f_div(&var.f_add_scalar(LAYER_NORM_EPS)?.f_sqrt()?)?)
            };
            mse(&ln(y)?, &ln(x)?)
        }
    }
}

/// One mapped pair's term: Σ_n w_n·d(P·h_s[n], h_t[n]) / Σ_n w_n. Shapes: `student` (…, d_s),
/// `teacher` (…, d_t) with the same leading shape, `projection` (d_t, d_s) or None (then d_s must
/// equal d_t), `weights` the leading shape (None = all 1).
pub fn hidden(
    metric: Metric,
    student: &Tensor,
    teacher: &Tensor,
    projection: Option<&Tensor>,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let (s, t) = (student.size(), teacher.size());
    if s.is_empty() || t.is_empty() || s[..s.len() - 1] != t[..t.len() - 1] {
        return Err(Error::Shape(format!(
            "hidden: 'student' has shape {s:?} and 'teacher' {t:?}, expected [..., d_s] and \
             [..., d_t] over the same positions"
        )));
    }
    for (arg, x) in [("student", student), ("teacher", teacher)] {
        if !x.is_floating_point() {
            return Err(Error::Shape(format!(
                "hidden: '{arg}' has kind {:?}, expected a float tensor",
                x.kind()
            )));
        }
    }
    let (d_s, d_t) = (s[s.len() - 1], t[t.len() - 1]);
    let kind = super::compute_kind(student);
    let h = student.f_to_kind(kind)?;
    let y = match projection {
        Some(p) => {
            if p.size() != [d_t, d_s] {
                return Err(Error::Shape(format!(
                    "hidden: 'projection' has shape {:?}, expected [{d_t}, {d_s}] (teacher width, \
                     student width)",
                    p.size()
                )));
            }
            h.f_linear::<Tensor>(&p.f_to_kind(kind)?, None)? // (…, d_t)
        }
        None if d_s == d_t => h,
        None => {
            return Err(Error::Shape(format!(
                "hidden: the student's width {d_s} differs from the teacher's {d_t} and no \
                 projection was given"
            )))
        }
    };
    let x = teacher.f_to_kind(kind)?.f_detach()?;
    masked_mean("hidden", &per_position(metric, &y, &x)?, weights)
}

/// What a hidden-state term sees: the mapped pairs' states over the same positions, its projection,
/// and the per-token weights of those positions.
pub struct HiddenInput<'a> {
    /// (student state (…, d_s), teacher state (…, d_t)) per mapped pair
    pub pairs: Vec<(&'a Tensor, &'a Tensor)>,
    /// (d_t, d_s), or None when the widths agree
    pub projection: Option<&'a Tensor>,
    pub weights: &'a Tensor,
}

// ---------------------------------------------------------------- run-file kind

pub const METRIC: ParamSpec = ParamSpec {
    name: "metric",
    default: 0.0,
    range: Range::Choice(METRICS),
    doc: "the distance per position: mse, cosine (1 − cos) or normalized_mse (of layer-normed vectors)",
};

pub const HIDDEN: LossSpec = LossSpec {
    name: "hidden",
    summary: "mean over layer pairs of d(P·h_s, h_t): mse, 1 − cos, or mse of layer-normed states",
    params: &[METRIC],
    reads: Reads::Hidden,
    build: |p, _| {
        Ok(Box::new(Hidden {
            metric: Metric::from_index(p.get("metric")),
        }))
    },
};

#[derive(Debug)]
struct Hidden {
    metric: Metric,
}

impl Loss for Hidden {
    fn spec(&self) -> &'static LossSpec {
        &HIDDEN
    }
    fn compute(&self, _x: &LossInput) -> Result<Tensor> {
        Err(Error::Invalid(
            "hidden: compares hidden states, not logits (the objective calls compute_hidden)"
                .into(),
        ))
    }
    fn on_reduced(&self) -> std::result::Result<(), &'static str> {
        Err(
            "it compares the teacher's hidden states, and a store holds only the teacher's \
             output distribution (give teacher.path without teacher.store)",
        )
    }
    fn compute_hidden(&self, x: &HiddenInput) -> Result<Tensor> {
        if x.pairs.is_empty() {
            return Err(Error::Invalid("hidden: no layer pair to compare".into()));
        }
        let mut total: Option<Tensor> = None;
        for (s, t) in &x.pairs {
            let v = hidden(self.metric, s, t, x.projection, Some(x.weights))?;
            total = Some(match total {
                Some(acc) => acc.f_add(&v)?,
                None => v,
            });
        }
        let n = x.pairs.len() as f64;
        Ok(total.expect("at least one pair").f_div_scalar(n)?)
    }
}
