//! A teacher-query budget in the training loop (the rules and the set: teacher/budget.rs).
//! A micro-batch of rows R splits into the chosen rows C and the others U:
//!   L = (Σ_{t∈C} w_t / Σ_{t∈R} w_t) · objective(C)  +  (Σ_{t∈U} w_t / Σ_{t∈R} w_t) · CE(U)
//! each part the usual weighted mean over its own rows, so that L is the token-weighted mean over
//! R with every unselected token's loss replaced by its cross-entropy (weight 1, whatever the
//! objective's own terms). The teacher is prepared for C only, and not at all when C is empty; a
//! micro-batch whose rows are all chosen is the plain micro-step (so budget = 1 is the plain run,
//! bit for bit). With `unselected = "skip"` the sampler permutes the chosen rows only.
use super::step::{micro_step, MicroStep, StepOptions};
use crate::data::{Batch, Sequence};
use crate::model::Llama;
use crate::objective::{LossTerm, Objective};
use crate::teacher::budget::{Budget, Unselected};
use crate::teacher::TeacherSignal;
use crate::{Error, Result};

pub struct BudgetRun {
    pub budget: Budget,
    /// the chosen training sequences, ascending
    pub chosen: Vec<usize>,
    mask: Vec<bool>,
    /// cross-entropy alone, for the unselected rows
    ce: Objective,
}

/// One budgeted micro-batch: the step's values, the rows sent to the teacher and the
/// cross-entropy part of the unselected rows (scaled as in the step's value; 0 without any).
pub struct BudgetStep {
    pub step: MicroStep,
    pub teacher_rows: usize,
    pub unselected_ce: f64,
}

impl BudgetRun {
    pub fn new(budget: Budget, chosen: Vec<usize>, n_train: usize, total: usize) -> Result<Self> {
        let mut mask = vec![false; n_train];
        for &i in &chosen {
            *mask.get_mut(i).ok_or_else(|| {
                Error::Invalid(format!(
                    "teacher.budget: chosen sequence {i} is beyond the {n_train} training sequences"
                ))
            })? = true;
        }
        let ce = LossTerm::new("cross_entropy", &[], 1.0).map_err(Error::Invalid)?;
        Ok(BudgetRun {
            budget,
            chosen,
            mask,
            ce: Objective::new(&[ce], total)?,
        })
    }

    /// How many rows the sampler permutes.
    pub fn sampled_len(&self, n_train: usize) -> usize {
        match self.budget.unselected {
            Unselected::Skip => self.chosen.len(),
            Unselected::CrossEntropy => n_train,
        }
    }

    /// The training rows of the sampler's draws (skip: its indices are into the chosen set).
    pub fn rows(&self, drawn: Vec<usize>) -> Vec<usize> {
        match self.budget.unselected {
            Unselected::Skip => drawn.into_iter().map(|i| self.chosen[i]).collect(),
            Unselected::CrossEntropy => drawn,
        }
    }

    pub fn is_chosen(&self, row: usize) -> bool {
        self.mask.get(row).copied().unwrap_or(false)
    }

    /// The micro-step of `batch` (rows of `train`) under the budget.
    pub fn micro_step(
        &self,
        student: &Llama,
        teacher: &dyn TeacherSignal,
        objective: &Objective,
        train: &[Sequence],
        batch: &Batch,
        opts: &StepOptions,
    ) -> Result<BudgetStep> {
        let asks = usize::from(objective.needs_teacher());
        let (sel, unsel): (Vec<usize>, Vec<usize>) =
            batch.rows.iter().partition(|&&r| self.is_chosen(r));
        if unsel.is_empty() {
            return Ok(BudgetStep {
                step: micro_step(student, Some(teacher), objective, batch, opts)?,
                teacher_rows: asks * sel.len(),
                unselected_ce: 0.0,
            });
        }
        let (b, t) = batch.shape();
        let total = batch.weight_sum(0, (b * t) as usize);
        let share = |x: &Batch| {
            let (b, t) = x.shape();
            if total > 0.0 {
                x.weight_sum(0, (b * t) as usize) / total
            } else {
                0.0
            }
        };
        let device = student.device();
        let mut parts = vec![0.0; objective.names().len()];
        let (mut loss, mut finite, mut teacher_rows) = (0.0, true, 0);
        if !sel.is_empty() {
            let c = Batch::new(train, &sel, device)?;
            let mut o = *opts;
            o.scale *= share(&c);
            let m = micro_step(student, Some(teacher), objective, &c, &o)?;
            loss += m.loss;
            finite &= m.finite;
            parts = m.parts;
            teacher_rows = asks * sel.len();
        }
        let u = Batch::new(train, &unsel, device)?;
        let mut o = *opts;
        o.scale *= share(&u);
        let m = micro_step(student, None, &self.ce, &u, &o)?;
        Ok(BudgetStep {
            step: MicroStep {
                loss: loss + m.loss,
                parts,
                finite: finite && m.finite,
            },
            teacher_rows,
            unselected_ce: m.loss,
        })
    }
}
