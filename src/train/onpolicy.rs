//! On-policy distillation (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models:
//! Learning from Self-Generated Mistakes"): with probability λ a step trains on sequences the
//! student samples itself, scored by the teacher in one forward pass, instead of the data's:
//!   for each row of the step's batch: x = the row's prompt; y ~ student(· | x) at temperature τ,
//!   top-p; the objective D(teacher ‖ student)(y | x) over the tokens of y only
//! (any divergence of the run; GKD's own is the generalised JSD(β), `kind = "jsd"`).
//!
//! Which steps are on-policy, and every row's sampling seed, are functions of (run seed, step):
//! nothing to carry in a checkpoint, and a resumed run draws what the uninterrupted run drew (its
//! student weights are the same). The data sampler advances on every step either way, so λ = 0 is
//! the off-policy run step for step, and a run's data positions do not depend on λ.
//!
//! A row's prompt: its tokens up to its first target (a {prompt, response} or chat record's
//! prompt), and at least `prompt_tokens` of them (plain text has a target at every position);
//! at most T − 1. The student continues it for min(max_new_tokens, T − prompt) tokens; a drawn end
//! of sequence is kept as the last target. The row is the prompt, the sample and padding to T (not
//! counted). Differences from GKD's code (TRL's `GKDTrainer`): λ is drawn per step, not per batch
//! of the accelerator; the sample is taken from the student being trained with no separate
//! generation copy, as GKD's algorithm states.
use super::distillm::{DistiLLM, ReplayRatio};
use crate::config::{issue, Checked};
use crate::data::{Batch, Sequence, IGNORE_INDEX};
use crate::eval::{distill_metrics, DistillMetrics};
use crate::generate::{generate_batch, Finish, GenerateOptions, SplitMix64};
use crate::model::Llama;
use crate::teacher::TeacherSignal;
use crate::Result;
use serde::Deserialize;
use tch::Device;

/// `[onpolicy]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnPolicyFile {
    /// λ: the share of steps on the student's own samples, in [0, 1]
    pub fraction: Option<f64>,
    /// sampling temperature (default 1; 0 = greedy)
    pub temperature: Option<f64>,
    /// nucleus (default 1: the whole distribution)
    pub top_p: Option<f64>,
    /// tokens the student writes per row (default 64)
    pub max_new_tokens: Option<usize>,
    /// at least this many tokens of a row's start make its prompt (default 16)
    pub prompt_tokens: Option<usize>,
    /// "gkd" (default: λ fixed) or "distillm" (adaptive, with a replay buffer: train/distillm.rs)
    pub mode: Option<String>,
    /// distillm: the replay buffer's size in samples (default 1000)
    pub replay_capacity: Option<usize>,
    /// distillm: "decreasing" (default), "constant" or "increasing"
    pub replay_ratio: Option<String>,
    /// distillm: the rise of the validation loss that raises the SGO probability (default 0.1)
    pub loss_eps: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OnPolicy {
    pub fraction: f64,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub prompt_tokens: usize,
    /// DistiLLM's adaptive mode (`fraction` is then φ's start)
    pub adaptive: Option<DistiLLM>,
}

impl OnPolicyFile {
    pub fn resolve(&self) -> Checked<OnPolicy> {
        let adaptive = match self.mode.as_deref().unwrap_or("gkd") {
            "gkd" => {
                for (key, given) in [
                    ("replay_capacity", self.replay_capacity.is_some()),
                    ("replay_ratio", self.replay_ratio.is_some()),
                    ("loss_eps", self.loss_eps.is_some()),
                ] {
                    if given {
                        return Err(issue(
                            format!("onpolicy.{key}"),
                            "belongs to mode = \"distillm\" (this section's mode is \"gkd\")",
                        ));
                    }
                }
                None
            }
            "distillm" => {
                let capacity = self.replay_capacity.unwrap_or(1000);
                if capacity == 0 {
                    return Err(issue("onpolicy.replay_capacity", "must be at least 1"));
                }
                let loss_eps = self.loss_eps.unwrap_or(0.1);
                if !loss_eps.is_finite() {
                    return Err(issue("onpolicy.loss_eps", "must be a finite number"));
                }
                Some(DistiLLM {
                    capacity,
                    ratio: ReplayRatio::parse(
                        self.replay_ratio.as_deref().unwrap_or("decreasing"),
                    )?,
                    loss_eps,
                })
            }
            m => {
                return Err(issue(
                    "onpolicy.mode",
                    format!("'{m}': expected \"gkd\" or \"distillm\""),
                ))
            }
        };
        // GKD's λ, or DistiLLM's starting φ (its init_threshold, 0 by default)
        let fraction = self
            .fraction
            .unwrap_or(if adaptive.is_some() { 0.0 } else { 0.5 });
        if !(0.0..=1.0).contains(&fraction) {
            return Err(issue("onpolicy.fraction", "must be in [0, 1]"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(issue("onpolicy.temperature", "must be ≥ 0 (0 = greedy)"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(issue("onpolicy.top_p", "must be in (0, 1]"));
        }
        let max_new_tokens = self.max_new_tokens.unwrap_or(64);
        if max_new_tokens == 0 {
            return Err(issue("onpolicy.max_new_tokens", "must be at least 1"));
        }
        let prompt_tokens = self.prompt_tokens.unwrap_or(16);
        if prompt_tokens == 0 {
            return Err(issue("onpolicy.prompt_tokens", "must be at least 1"));
        }
        Ok(OnPolicy {
            fraction,
            temperature,
            top_p,
            max_new_tokens,
            prompt_tokens,
            adaptive,
        })
    }
}

/// SplitMix64 of a seed mixed with two indices: a reproducible draw per (seed, a, b).
pub(crate) fn draw(seed: u64, a: u64, b: u64) -> SplitMix64 {
    let mut g = SplitMix64::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let s = g.next_u64() ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    SplitMix64::new(s)
}

impl OnPolicy {
    /// Whether step `step` (from 1) trains on the student's samples: u(seed, step) < λ (GKD; the
    /// adaptive mode decides per micro-batch, train/distillm.rs).
    pub fn is_on_policy(&self, seed: u64, step: usize) -> bool {
        self.adaptive.is_none()
            && self.fraction > 0.0
            && draw(seed, step as u64, 0).next_f64() < self.fraction
    }

    /// The prompt length of a sequence of T tokens: up to its first target, at least
    /// `prompt_tokens`, at most T − 1.
    pub fn prompt_len(&self, s: &Sequence) -> usize {
        let t = s.ids.len();
        // labels[p] is the token at p + 1: the first target token sits at p + 1
        let first_target = s
            .labels
            .iter()
            .position(|&l| l != IGNORE_INDEX)
            .map_or(t, |p| p + 1);
        first_target.max(self.prompt_tokens).min(t - 1).max(1)
    }

    /// The student's continuations of the prompts of `rows` (micro-batch `micro` of step `step`),
    /// each a sequence of the rows' length T.
    #[allow(clippy::too_many_arguments)]
    pub fn samples(
        &self,
        student: &Llama,
        seqs: &[Sequence],
        rows: &[usize],
        seed: u64,
        step: usize,
        micro: usize,
        stop_ids: &[u32],
    ) -> Result<Vec<Sequence>> {
        let t = seqs[rows[0]].ids.len();
        let prompts: Vec<Vec<u32>> = rows
            .iter()
            .map(|&r| seqs[r].ids[..self.prompt_len(&seqs[r])].to_vec())
            .collect();
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(1);
        let opts = GenerateOptions {
            // no row can use more than the shortest prompt leaves of T
            max_new_tokens: self.max_new_tokens.min(t - shortest),
            temperature: self.temperature,
            top_p: self.top_p,
            seed,
            stop_ids: stop_ids.to_vec(),
        };
        let seeds: Vec<u64> = (0..rows.len())
            .map(|k| draw(seed, step as u64, 1 + (micro * rows.len() + k) as u64).next_u64())
            .collect();
        let gen = generate_batch(student, &prompts, &seeds, &opts, |_, _| Ok(()))?;
        Ok(rows
            .iter()
            .zip(prompts.iter().zip(&gen))
            .map(|(&r, (p, g))| {
                let mut y = g.tokens.clone();
                if g.finish == Finish::Stop {
                    if let Some(&eos) = stop_ids.first() {
                        y.push(eos);
                    }
                }
                y.truncate(t - p.len());
                sample_sequence(p, &y, t, seqs[r].domain)
            })
            .collect())
    }

    /// The step's rows replaced by the student's continuations of their prompts, as a batch of
    /// the same shape (its `rows` still name the data's rows).
    #[allow(clippy::too_many_arguments)]
    pub fn rollout(
        &self,
        student: &Llama,
        seqs: &[Sequence],
        rows: &[usize],
        seed: u64,
        step: usize,
        micro: usize,
        stop_ids: &[u32],
        device: Device,
    ) -> Result<Batch> {
        let out = self.samples(student, seqs, rows, seed, step, micro, stop_ids)?;
        let idx: Vec<usize> = (0..out.len()).collect();
        let mut b = Batch::new(&out, &idx, device)?;
        b.rows = rows.to_vec();
        Ok(b)
    }

    /// The exposure-bias measure: the student continues every validation prompt (the same draws
    /// at every evaluation: "step 0", never a training step), and the teacher judges those
    /// tokens: KL(teacher‖student) per sampled token, the teacher's perplexity of the student's
    /// text, top-1 agreement. Returns the metrics and the samples.
    pub fn evaluate(
        &self,
        teacher: &dyn TeacherSignal,
        student: &Llama,
        validation: &[Sequence],
        batch: usize,
        seed: u64,
        stop_ids: &[u32],
    ) -> Result<(DistillMetrics, Vec<Sequence>)> {
        let idx: Vec<usize> = (0..validation.len()).collect();
        let mut samples = Vec::with_capacity(validation.len());
        for (k, rows) in idx.chunks(batch.max(1)).enumerate() {
            samples.extend(self.samples(student, validation, rows, seed, 0, k, stop_ids)?);
        }
        let m = distill_metrics(teacher, student, &samples, batch)?;
        Ok((m, samples))
    }
}

/// prompt + sample, padded to `t`: targets (weight 1) are the sample's tokens only.
pub fn sample_sequence(prompt: &[u32], sample: &[u32], t: usize, domain: Option<u32>) -> Sequence {
    let ids: Vec<u32> = prompt.iter().chain(sample).copied().collect();
    let target: Vec<bool> = (0..ids.len()).map(|i| i >= prompt.len()).collect();
    let mut s = crate::data::packing::sequence(&ids, &target, t, 0, vec![]);
    s.domain = domain;
    s
}
