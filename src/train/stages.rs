//! A run in stages (progressive pruning, student/ppcl.rs has the procedure and its formula), as the
//! train loop sees it. Before the first step of stage k (step B_{k−1} + 1):
//!   1. choose the layers to remove by measuring the current student on the calibration windows
//!      (ppcl::choose, i.e. prune.rs on the student as trained so far);
//!   2. rebuild the student without them: a new VarStore holding copies of the kept layers'
//!      weights (renumbered 0..n_k) and of the embeddings, final norm and head;
//!   3. slice AdamW: each kept parameter's moments move with it (renamed), t continues;
//!   4. re-wire the `hidden` terms: student layer j ↔ teacher layer L_k[j];
//!   5. record it: a metric record {"kind": "stage", "step": B_{k−1} + 1, …} with the layers
//!      before and after, the removed teacher layers, their score, and the student evaluated right
//!      after the cut.
//!
//! A checkpoint records the stage and L_k (`TrainState::stages`); a resume rebuilds the student
//! of that stage (any layers of the right count, their weights then read from the checkpoint),
//! its optimizer and wiring, so that a run killed inside a stage, or at a boundary (its
//! checkpoint at B_{k−1}, the cut not yet made), continues bit-identically: the cut is measured
//! again on the same weights.
use super::optim::AdamW;
use super::options::{Length, RunOptions, RunSection};
use crate::config::{issue, Checked};
use crate::model::LoadedModel;
use crate::objective::LossTerm;
use crate::student::{self, Stages};
use crate::{Error, Result};
use std::collections::HashMap;
use tch::Device;

/// What a checkpoint records of a run in stages.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageState {
    /// the stage the student is in (1-based; every checkpoint is inside one)
    pub stage: usize,
    /// the teacher layer each student layer came from
    pub layers: Vec<usize>,
}

/// The run-file checks that need `[run]` and `[[loss]]` too: `run.steps` is the sum of the
/// stages' steps (derived when absent); epochs are refused; a `hidden` term's explicit layer map
/// is refused (its student layers disappear at the stages).
pub fn check_run(
    stages: &Stages,
    file: &RunSection,
    losses: &[LossTerm],
    run: &mut RunOptions,
) -> Checked<()> {
    let total = stages.total_steps();
    match (file.steps, file.epochs) {
        (_, Some(_)) => {
            return Err(issue(
                "run.epochs",
                format!("a run in stages lasts the sum of the stages' steps ({total}); remove run.epochs"),
            ))
        }
        (Some(s), None) if s != total => {
            return Err(issue(
                "run.steps",
                format!(
                    "is {s}, but the stages' steps add up to {total}; make them agree or leave run.steps out"
                ),
            ))
        }
        _ => run.length = Length::Steps(total),
    }
    if let Some(i) = losses.iter().position(|l| l.layers.is_some()) {
        return Err(issue(
            format!("loss.{i}.layers"),
            "in a run in stages each student layer is mapped to the teacher layer it came from, which the stages change; leave 'layers' out",
        ));
    }
    Ok(())
}

/// Everything a run in stages settles at set-up.
pub struct Staged {
    pub stages: Stages,
    /// the calibration text as token windows (the teacher's tokenizer)
    pub windows: Vec<Vec<u32>>,
    /// the teacher layers the student starts from
    pub initial: Vec<usize>,
    /// the student's layer count after each stage
    pub counts: Vec<usize>,
}

/// Settle a run in stages at set-up: the layer count after each stage, for a student that starts
/// with the teacher layers `initial` (too many layers removed is refused naming the stage's key),
/// and the calibration windows, read with the teacher's tokenizer.
pub fn plan(stages: &Stages, teacher: &LoadedModel, initial: Vec<usize>) -> Result<Staged> {
    let counts = stages
        .counts(initial.len())
        .map_err(|(_, key, why)| Error::Invalid(format!("{key}: {why}")))?;
    let k = "student.from_teacher.calibration";
    let tok = teacher.tokenizer.as_ref().ok_or_else(|| {
        Error::Invalid(format!(
            "{k}: the teacher has no tokenizer to read the calibration text with"
        ))
    })?;
    let context = teacher.model.config.max_position_embeddings;
    let cal = &stages.calibration;
    if cal.seq_len > context {
        return Err(Error::Invalid(format!(
            "student.from_teacher.calibration_seq_len = {}: exceeds the teacher's context of {context}",
            cal.seq_len
        )));
    }
    let windows = cal
        .windows(tok, crate::model::eos_id(teacher))
        .map_err(|e| Error::Invalid(format!("{k}: {e}")))?;
    Ok(Staged {
        stages: stages.clone(),
        windows,
        initial,
        counts,
    })
}

impl Staged {
    /// Check a checkpoint's stage record against the plan: the stage of its step, the layer count
    /// of that stage, every layer among the initial ones, in order, none twice.
    pub fn check(&self, st: &StageState, step: usize) -> std::result::Result<(), String> {
        let want = self.stages.stage_of(step);
        if st.stage != want {
            return Err(format!(
                "stage {} recorded at step {step}, which is in stage {want}",
                st.stage
            ));
        }
        if st.stage == 0 || st.layers.len() != self.counts[st.stage - 1] {
            return Err(format!(
                "{} layers recorded for stage {}, which has {}",
                st.layers.len(),
                st.stage,
                self.counts.get(st.stage.wrapping_sub(1)).unwrap_or(&0)
            ));
        }
        let mut at = 0;
        for l in &st.layers {
            match self.initial[at..].iter().position(|x| x == l) {
                Some(p) => at += p + 1,
                None => {
                    return Err(format!(
                        "layers {:?} are not a subsequence of the student's initial layers {:?}",
                        st.layers, self.initial
                    ))
                }
            }
        }
        Ok(())
    }

    /// The stage whose first step is `step + 1`, when the student is not in it yet.
    pub fn due(&self, step: usize, state: Option<&StageState>) -> Option<usize> {
        let next = self.stages.stage_of(step + 1);
        (next > state.map_or(0, |s| s.stage)).then_some(next)
    }
}

/// The student made of `student`'s layers `kept` (its own indices, in order), with copies of their
/// weights and of every other weight; on `device`, computing in the same dtype.
pub fn cut(student: &LoadedModel, kept: &[usize], device: Device) -> Result<LoadedModel> {
    let mut s = student::from_teacher_layers(student, kept, device)?;
    s.model.set_compute_kind(student.model.compute_kind());
    Ok(s)
}

/// AdamW for the student cut to `kept` (`new` holds it): each kept parameter's moments as they
/// were (`model.layers.{kept[j]}.…` → `model.layers.{j}.…`), the step count unchanged; `extra`:
/// further stores whose variables keep their names (the projections).
pub fn slice_optimizer(
    old: &AdamW,
    kept: &[usize],
    new: &tch::nn::VarStore,
    extra: Option<&tch::nn::VarStore>,
    cfg: &super::optim::OptimConfig,
) -> Result<AdamW> {
    let to_new: HashMap<usize, usize> = kept.iter().enumerate().map(|(j, &k)| (k, j)).collect();
    let mut moments: HashMap<String, tch::Tensor> = HashMap::new();
    for (name, t) in old.state_tensors() {
        // "m.model.layers.7.mlp…" → "m.model.layers.2.mlp…"; a removed layer's moments go
        let (prefix, param) = name.split_at(2);
        let renamed = match param.strip_prefix("model.layers.") {
            Some(rest) => {
                let (idx, tail) = rest.split_once('.').ok_or_else(|| {
                    Error::Invalid(format!("internal: optimizer tensor '{name}'"))
                })?;
                let idx: usize = idx
                    .parse()
                    .map_err(|_| Error::Invalid(format!("internal: optimizer tensor '{name}'")))?;
                match to_new.get(&idx) {
                    Some(j) => format!("{prefix}model.layers.{j}.{tail}"),
                    None => continue,
                }
            }
            None => name.clone(),
        };
        moments.insert(renamed, t);
    }
    let mut opt = AdamW::new(new, cfg)?;
    if let Some(vs) = extra {
        opt.add(vs)?;
    }
    opt.load_state(
        &moments,
        old.t,
        std::path::Path::new("(the optimizer at a stage boundary)"),
    )?;
    Ok(opt)
}
