//! What a checkpoint records besides the weights and the optimizer moments: enough to continue the
//! run exactly (data position, loss-term state, counters). Training uses no other randomness: the
//! data order is a function of (seed, epoch), on-policy draws of (seed, step, micro-batch), and the
//! student starts from the teacher's layers or a folder, so the sampler's position is the whole
//! random state.
use crate::data::sampler::SamplerState;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// optimizer steps completed
    pub step: usize,
    pub total_steps: usize,
    /// optimizer updates applied (step minus skipped steps)
    pub adam_t: usize,
    pub sampler: SamplerState,
    /// each loss term's state (TAID's λ), None for stateless terms
    pub objective: Vec<Option<serde_json::Value>>,
    pub skipped_steps: usize,
    pub tokens_seen: u64,
    pub seed: u64,
    /// what the result depends on (run-file keys, the data's token stream): a resume with any of
    /// them changed is refused, naming the keys
    #[serde(default)]
    pub fingerprint: crate::fingerprint::Fingerprint,
    /// a run in stages: the stage and the student's layers (train/stages.rs)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<super::stages::StageState>,
    /// DistiLLM's adaptive mode: φ, L_ref and the buffer's size (train/distillm.rs; the samples
    /// are in the checkpoint's `replay.json`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillm: Option<super::distillm::AdaptiveState>,
    /// PACED: the pass-rate table the run weights its rows by (train/paced.rs)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paced: Option<super::paced::PacedState>,
    /// `[[data.source]]`: each source's data position and the weights in use (DDK changes them)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixture: Option<crate::data::mixture::MixtureState>,
    /// a teacher-query budget: the chosen sequences and the teacher rows asked so far
    /// (teacher/budget.rs)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::teacher::budget::BudgetState>,
    /// `[run] max_memory`: the chunk the prediction chose (train/plan.rs); a resume keeps it
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_chunk: Option<usize>,
}
