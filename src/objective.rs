//! The objective: the weighted sum of the loss terms named in the run file,
//!   L = Σ_i w_i · term_i(student logits, teacher logits, labels, mask)
//! over the positions whose label counts (mask = labels ≠ −100). Teacher and student logits are
//! compared on their shared vocabulary prefix (padding rows may differ). Stateful terms (TAID's λ)
//! live here and are saved with the checkpoint.
use crate::config::{LossKind, LossTerm};
use crate::losses::{self, taid::TaidState, token_selective, Taid};
use crate::{Error, Result};
use tch::{Kind, Tensor};

pub struct Objective {
    terms: Vec<(LossTerm, Option<Taid>)>,
    names: Vec<String>,
}

/// The total (with its graph) and each term's value (unweighted, detached).
pub struct ObjectiveValue {
    pub total: Tensor,
    pub parts: Vec<Tensor>,
}

impl Objective {
    pub fn new(terms: &[LossTerm], total_steps: usize) -> Result<Self> {
        let mut out = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for t in terms {
            let taid = match t.kind {
                LossKind::Taid {
                    t_start,
                    t_end,
                    alpha,
                    beta,
                } => Some(Taid::new(t_start, t_end, alpha, beta, total_steps)?),
                _ => None,
            };
            let base = t.kind.name().to_string();
            let n = names
                .iter()
                .filter(|x| x.split('#').next() == Some(&base))
                .count();
            names.push(if n == 0 {
                base
            } else {
                format!("{base}#{}", n + 1)
            });
            out.push((t.clone(), taid));
        }
        Ok(Objective { terms: out, names })
    }

    /// Term names for logs ("forward_kl", "cross_entropy", a "#2" suffix for repeats).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether any term needs the teacher's logits.
    pub fn needs_teacher(&self) -> bool {
        self.terms
            .iter()
            .any(|(t, _)| t.kind != LossKind::CrossEntropy)
    }

    /// s: student logits (B, T, Vs); t: teacher logits (B, T, Vt) or None when no term needs them;
    /// labels (B, T) with −100 where nothing counts.
    pub fn compute(
        &self,
        s: &Tensor,
        t: Option<&Tensor>,
        labels: &Tensor,
    ) -> Result<ObjectiveValue> {
        let mask = labels.f_ne(-100)?;
        let mut total = Tensor::f_zeros([], (Kind::Float, s.device()))?;
        let mut parts = Vec::with_capacity(self.terms.len());
        let shared = |t: &Tensor| -> Result<(Tensor, Tensor)> {
            let v = s.size()[2].min(t.size()[2]);
            Ok((s.f_narrow(2, 0, v)?, t.f_narrow(2, 0, v)?))
        };
        for (term, taid) in &self.terms {
            let m = Some(&mask);
            let value = match &term.kind {
                LossKind::CrossEntropy => losses::hinton::cross_entropy(s, labels, m)?,
                kind => {
                    let t = t.ok_or_else(|| {
                        Error::Invalid(format!("{}: needs the teacher's logits", kind.name()))
                    })?;
                    let (s, t) = shared(t)?;
                    match kind {
                        LossKind::ForwardKl { temperature } => {
                            losses::forward_kl(&s, &t, *temperature, m)?
                        }
                        LossKind::ReverseKl { temperature } => {
                            losses::reverse_kl(&s, &t, *temperature, m)?
                        }
                        LossKind::Jsd { beta, temperature } => {
                            losses::jsd(&s, &t, *beta, *temperature, m)?
                        }
                        LossKind::SkewKl { alpha, temperature } => {
                            losses::skew_kl(&s, &t, *alpha, *temperature, m)?
                        }
                        LossKind::SkewReverseKl { alpha, temperature } => {
                            losses::skew_reverse_kl(&s, &t, *alpha, *temperature, m)?
                        }
                        LossKind::Tvd { temperature } => losses::tvd(&s, &t, *temperature, m)?,
                        LossKind::AdaptiveKl { mu, temperature } => {
                            losses::adaptive_kl(&s, &t, *mu, *temperature, m)?
                        }
                        LossKind::Hinton { alpha, temperature } => {
                            losses::hinton(&s, &t, labels, *alpha, *temperature, m)?
                        }
                        LossKind::Pld { tau } => losses::pld(&s, &t, labels, *tau, m)?,
                        LossKind::Taid { .. } => {
                            taid.as_ref().expect("made in new").loss(&s, &t, m)?
                        }
                        LossKind::TokenSelective(cfg) => {
                            token_selective::token_selective(&s, &t, cfg, m)?
                        }
                        LossKind::CrossEntropy => unreachable!("handled above"),
                    }
                }
            };
            let value = value.f_to_kind(Kind::Float)?;
            total = total.f_add(&value.f_mul_scalar(term.weight)?)?;
            parts.push(value.f_detach()?);
        }
        Ok(ObjectiveValue { total, parts })
    }

    /// After optimizer step `step`, whose terms had the (unweighted) values `parts`: advance the
    /// stateful terms, each with its own value (TAID's λ follows TAID's loss).
    pub fn after_step(&mut self, parts: &[f64], step: usize) {
        for ((_, taid), &value) in self.terms.iter_mut().zip(parts) {
            if let Some(t) = taid {
                t.update(value, step);
            }
        }
    }

    /// TAID's λ of each TAID term (for logs).
    pub fn lambdas(&self) -> Vec<f64> {
        self.terms
            .iter()
            .filter_map(|(_, t)| t.as_ref().map(|t| t.lambda()))
            .collect()
    }

    pub fn state(&self) -> Vec<Option<TaidState>> {
        self.terms
            .iter()
            .map(|(_, t)| t.as_ref().map(|t| t.state()))
            .collect()
    }

    pub fn restore(&mut self, state: &[Option<TaidState>]) -> Result<()> {
        if state.len() != self.terms.len() {
            return Err(Error::Invalid(format!(
                "checkpoint has {} loss terms, the run file {}",
                state.len(),
                self.terms.len()
            )));
        }
        for ((_, t), s) in self.terms.iter_mut().zip(state) {
            if let (Some(t), Some(s)) = (t.as_mut(), s) {
                t.restore(*s);
            }
        }
        Ok(())
    }
}

/// The result of one micro-batch's objective: its value (scaled), each term's value (scaled), and
/// whether it was finite (when not, no gradient was applied from the non-finite part).
pub struct MicroStep {
    pub loss: f64,
    pub parts: Vec<f64>,
    pub finite: bool,
}

impl Objective {
    /// Whether every term is a mean of per-position values, so that the objective can be computed
    /// over chunks of positions (token-selective KD's entropy quantile spans all positions).
    pub fn chunkable(&self) -> bool {
        !self
            .terms
            .iter()
            .any(|(t, _)| matches!(t.kind, LossKind::TokenSelective(_)))
    }

    /// Forward and backward of the objective for one micro-batch, scaled by `scale` (1/accumulation).
    /// With `chunk` = Some(c) and a chunkable objective, the vocabulary-sized work runs c positions
    /// at a time: the student's trunk runs once, its hidden states are detached, and each chunk's
    /// head, log-softmax and divergence are formed and backpropagated into the detached hidden
    /// states and the head; the trunk then receives the summed gradient once. No (B, T, V) tensor of
    /// either side exists, only (c, V) ones. Each chunk's mean is weighted by its share of the counted
    /// positions, so the value and the gradients equal the unchunked ones.
    /// `poison` multiplies the value by NaN (the test hook for non-finite steps).
    #[allow(clippy::too_many_arguments)]
    pub fn micro_step(
        &self,
        student: &crate::model::Llama,
        teacher: Option<&crate::model::Llama>,
        ids: &Tensor,
        labels: &Tensor,
        chunk: Option<usize>,
        scale: f64,
        poison: bool,
    ) -> Result<MicroStep> {
        let teacher = if self.needs_teacher() { teacher } else { None };
        let poisoned = |x: Tensor| -> Result<Tensor> {
            Ok(if poison { x.f_mul_scalar(f64::NAN)? } else { x })
        };
        let chunk = chunk.filter(|_| self.chunkable());
        let Some(chunk) = chunk else {
            let t_logits = match teacher {
                Some(t) => Some(tch::no_grad(|| t.forward(ids))?), // (B, T, V), no graph
                None => None,
            };
            let s_logits = student.forward(ids)?; // (B, T, V)
            let v = self.compute(&s_logits, t_logits.as_ref(), labels)?;
            let total = poisoned(v.total.f_mul_scalar(scale)?)?;
            let loss = total.f_double_value(&[])?;
            let parts = v
                .parts
                .iter()
                .map(|p| Ok(p.f_double_value(&[])? * scale))
                .collect::<Result<Vec<_>>>()?;
            if !loss.is_finite() {
                return Ok(MicroStep {
                    loss,
                    parts,
                    finite: false,
                });
            }
            total.f_backward()?;
            return Ok(MicroStep {
                loss,
                parts,
                finite: true,
            });
        };
        let t_hidden = match teacher {
            Some(t) => Some(tch::no_grad(|| t.forward_hidden(ids))?.f_flatten(0, 1)?), // (N, d)
            None => None,
        };
        let s_hidden = student.forward_hidden(ids)?; // (B, T, d), with the trunk's graph
        let detached = s_hidden
            .f_detach()?
            .f_flatten(0, 1)?
            .f_set_requires_grad(true)?; // (N, d)
        let flat_labels = labels.f_flatten(0, 1)?; // (N)
        let counted = flat_labels
            .f_ne(-100)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
        let n = flat_labels.size()[0];
        let (mut loss, mut parts) = (0.0, vec![0.0; self.terms.len()]);
        if counted > 0 {
            let mut start = 0;
            while start < n {
                let c = (chunk as i64).min(n - start);
                let lab = flat_labels.f_narrow(0, start, c)?;
                let count = lab.f_ne(-100)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
                if count > 0 {
                    let w = scale * count as f64 / counted as f64;
                    let s_logits = student
                        .head(&detached.f_narrow(0, start, c)?)?
                        .f_unsqueeze(0)?; // (1, c, V)
                    let t_logits = match (&t_hidden, teacher) {
                        (Some(h), Some(t)) => {
                            Some(tch::no_grad(|| t.head(&h.narrow(0, start, c)))?.f_unsqueeze(0)?)
                        }
                        _ => None,
                    };
                    let v = self.compute(&s_logits, t_logits.as_ref(), &lab.f_unsqueeze(0)?)?;
                    let part = poisoned(v.total.f_mul_scalar(w)?)?;
                    let value = part.f_double_value(&[])?;
                    for (acc, p) in parts.iter_mut().zip(&v.parts) {
                        *acc += p.f_double_value(&[])? * w;
                    }
                    loss += value;
                    if !value.is_finite() {
                        return Ok(MicroStep {
                            loss,
                            parts,
                            finite: false,
                        });
                    }
                    part.f_backward()?;
                }
                start += c;
            }
        }
        // the trunk's backward, once, with the gradient gathered on the detached hidden states
        let grad = detached.grad();
        if grad.defined() {
            s_hidden
                .f_mul(&grad.f_view_as(&s_hidden)?)?
                .f_sum(Kind::Float)?
                .f_backward()?;
        }
        Ok(MicroStep {
            loss,
            parts,
            finite: true,
        })
    }
}
