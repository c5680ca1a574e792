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
