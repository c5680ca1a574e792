//! Progressive pruning (PPCL: progressive pruning of contiguous layers, each stage followed by
//! layer-wise distillation): one run in K stages, `[[student.stage]]` in the run file.
//!
//!   L_0 = the teacher layers the student starts from (all of them, a list, or `keep` chosen by
//!         similarity); student_0 = those layers of the teacher
//!   for k = 1..K, at step B_{k−1} = S_1 + … + S_{k−1}:
//!     n_k = |L_{k−1}| − remove_k  (or keep_k)
//!     measure student_{k−1}, as trained so far, on the calibration windows:
//!       d(i, j) = (1/π)·mean over tokens t of arccos cos(h_i(t), h_j(t))      (student/prune.rs)
//!     R_k = the run of n = |L_{k−1}| − n_k consecutive student layers l..l+n−1 with the smallest
//!           d(l, l+n), the first and last layer spared (keep_ends) — `strategy = "one-shot"`, the
//!           default; any other strategy of `distill prune` ("perplexity[:K]", "iterative[:K]",
//!           "independent") as it has them
//!     student_k = student_{k−1} without R_k: the kept layers keep their trained weights;
//!                 L_k = L_{k−1} without R_k (the teacher layer each student layer came from)
//!     S_k optimizer steps (B_{k−1}+1 ..= B_k) of the run's objective, where every `hidden` term
//!       maps student layer j to teacher layer L_k[j] (train/hidden.rs):
//!       Σ_i w_i·term_i(student logits, teacher)  +  w_h·(1/n_k)·Σ_j dist(h^s_j, h^t_{L_k[j]})
//!
//! `run.steps` = S_1 + … + S_K (derived when absent; a different value is refused). The learning-
//! rate schedule runs once over all the steps (one warm-up, one decay; it does not restart at a
//! stage). AdamW's state is sliced at a boundary: every kept parameter keeps its moments (a layer
//! renamed to its new index), the removed layers' moments go, the step count t continues — as
//! removing those parameters from a torch param group would. The train loop side: train/stages.rs.
//!
//! Sources and differences. The issue names PPCL; its paper was not in the reference corpus
//! available here (searched: "progressive pruning contiguous layers distillation PPCL"), so the
//! procedure above is the issue's sketch, built from parts this crate already checks: the score
//! of Gromov et al. 2024 (arXiv:2403.17887, eq. 7, averaged over every token as ShortGPT does;
//! see prune.rs) and TinyBERT-style hidden-state alignment (losses/hidden.rs). The nearest
//! published procedure found, Kovalev & Tikhomirov 2025 ("Iterative Layer-wise Distillation",
//! arXiv:2511.05085), prunes in rounds too and trains each round on KL(logits) + MSE(hidden
//! states); it scores a layer by the quality lost when it alone is removed (an evaluation per
//! candidate) where we use the angular distance (one forward pass per stage), and it fine-tunes
//! each round separately where we keep one optimizer and one schedule across the run.
use super::prune::{self, PruneOptions, Pruning, Strategy};
use super::Calibration;
use crate::config::{issue, Checked};
use crate::model::Llama;
use crate::Result;
use serde::Deserialize;

/// One `[[student.stage]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFile {
    /// layers to remove from the current student
    pub remove: Option<usize>,
    /// or: the student's layer count after the stage
    pub keep: Option<usize>,
    /// optimizer steps of the stage, after its pruning
    pub steps: Option<usize>,
    /// how the layers are chosen: "one-shot" (default: one contiguous run) or any other strategy
    /// of prune.rs
    pub strategy: Option<String>,
}

/// How many layers a stage takes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Remove(usize),
    Keep(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub cut: Cut,
    pub steps: usize,
    pub strategy: Strategy,
}

/// A run in stages: the stages, the calibration text every stage is measured on, and whether the
/// first and last layer are spared.
#[derive(Debug, Clone, PartialEq)]
pub struct Stages {
    pub stages: Vec<Stage>,
    pub calibration: Calibration,
    pub keep_ends: bool,
}

/// One contiguous run a stage: the PPCL default.
pub const DEFAULT_STAGE_STRATEGY: Strategy = Strategy::OneShot;

impl StageFile {
    /// Check one stage; `i` is its index in the file (`student.stage.{i}`).
    pub fn resolve(&self, i: usize) -> Checked<Stage> {
        let at = |k: &str| format!("student.stage.{i}.{k}");
        let cut = match (self.remove, self.keep) {
            (Some(0), None) => return Err(issue(at("remove"), "must be at least 1")),
            (Some(n), None) => Cut::Remove(n),
            (None, Some(0)) => {
                return Err(issue(
                    at("keep"),
                    "must be at least 1 (a student needs a layer)",
                ))
            }
            (None, Some(n)) => Cut::Keep(n),
            _ => {
                return Err(issue(
                    format!("student.stage.{i}"),
                    "give exactly one of 'remove' (layers to remove) or 'keep' (layers left after the stage)",
                ))
            }
        };
        let steps = match self.steps {
            None => return Err(issue(at("steps"), "missing: the stage's optimizer steps")),
            Some(0) => return Err(issue(at("steps"), "must be at least 1")),
            Some(s) => s,
        };
        let strategy = match &self.strategy {
            Some(s) => Strategy::parse(s).map_err(|m| issue(at("strategy"), m))?,
            None => DEFAULT_STAGE_STRATEGY,
        };
        Ok(Stage {
            cut,
            steps,
            strategy,
        })
    }
}

impl Stages {
    /// The run's length: the sum of the stages' steps.
    pub fn total_steps(&self) -> usize {
        self.stages.iter().map(|s| s.steps).sum()
    }

    /// The layer count after each stage, for a student that starts with `start` layers; a stage
    /// that cannot be done is refused as (its index, the key, why).
    pub fn counts(&self, start: usize) -> std::result::Result<Vec<usize>, (usize, String, String)> {
        let mut cur = start;
        let mut out = Vec::with_capacity(self.stages.len());
        for (i, s) in self.stages.iter().enumerate() {
            let (key, next) = match s.cut {
                Cut::Remove(n) => ("remove", cur.saturating_sub(n)),
                Cut::Keep(n) => ("keep", n),
            };
            let why = match s.cut {
                Cut::Remove(n) if n >= cur => Some(format!(
                    "removes {n} layers from a student of {cur}; at most {} can go",
                    cur.saturating_sub(1)
                )),
                Cut::Keep(n) if n >= cur => Some(format!(
                    "keeps {n} layers of a student of {cur}; keep fewer to remove any"
                )),
                _ => None,
            };
            if let Some(why) = why {
                return Err((i, format!("student.stage.{i}.{key}"), why));
            }
            out.push(next);
            cur = next;
        }
        Ok(out)
    }

    /// The stage (1-based) that optimizer step `step` (1-based) belongs to; 0 for step 0.
    pub fn stage_of(&self, step: usize) -> usize {
        if step == 0 {
            return 0;
        }
        let mut end = 0;
        for (k, s) in self.stages.iter().enumerate() {
            end += s.steps;
            if step <= end {
                return k + 1;
            }
        }
        self.stages.len()
    }

    /// The first and last optimizer step of stage `k` (1-based).
    pub fn span(&self, k: usize) -> (usize, usize) {
        let before: usize = self.stages[..k - 1].iter().map(|s| s.steps).sum();
        (before + 1, before + self.stages[k - 1].steps)
    }

    /// A line for the fingerprint and run.json: what the stages are and what they measure on.
    pub fn describe(&self) -> String {
        let stages: Vec<String> = self
            .stages
            .iter()
            .map(|s| {
                let cut = match s.cut {
                    Cut::Remove(n) => format!("remove {n}"),
                    Cut::Keep(n) => format!("keep {n}"),
                };
                format!("{cut} ({}), {} steps", s.strategy.name(), s.steps)
            })
            .collect();
        format!(
            "{}; calibration {} ({} × {} tokens); keep_ends {}",
            stages.join(" → "),
            self.calibration.path.display(),
            self.calibration.sequences,
            self.calibration.seq_len,
            self.keep_ends
        )
    }
}

/// What a stage removes from a student whose layer j came from teacher layer `layers[j]`: the
/// choice of prune.rs on the student as it is (its layer indices), and the same in teacher layers.
#[derive(Debug, Clone)]
pub struct StageCut {
    /// the student's layers kept (its own indices, in order)
    pub kept: Vec<usize>,
    /// the teacher layers of the student after the stage
    pub layers: Vec<usize>,
    /// the teacher layers removed
    pub removed: Vec<usize>,
    /// the measurement(s) in the student's own indices
    pub pruning: Pruning,
}

/// Choose what stage `stage` removes from `student` (whose layer j came from teacher layer
/// `layers[j]`), measuring it on `windows`.
pub fn choose(
    student: &Llama,
    layers: &[usize],
    stage: &Stage,
    keep_ends: bool,
    windows: &[Vec<u32>],
) -> Result<StageCut> {
    let m = student.config.num_hidden_layers;
    if layers.len() != m {
        return Err(crate::Error::Invalid(format!(
            "internal: a student of {m} layers with {} recorded",
            layers.len()
        )));
    }
    let keep = match stage.cut {
        Cut::Remove(n) => m.saturating_sub(n),
        Cut::Keep(n) => n,
    };
    let pruning = prune::prune(
        student,
        windows,
        &PruneOptions {
            keep,
            strategy: stage.strategy,
            keep_ends,
        },
    )?;
    let kept = pruning.kept.clone();
    let removed = (0..m)
        .filter(|j| !kept.contains(j))
        .map(|j| layers[j])
        .collect();
    Ok(StageCut {
        layers: kept.iter().map(|&j| layers[j]).collect(),
        kept,
        removed,
        pruning,
    })
}
