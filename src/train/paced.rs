//! PACED (Xu, Sang, Zhou, He, Wang 2026, "PACED: Distillation at the Frontier of Student
//! Competence", arXiv 2603.11178): weight each problem by the student's pass rate p on it,
//!   p_x = (rollouts of prompt x whose answer passes the check) / n      (n student rollouts)
//!   w(p) = p^α · (1 − p)^β                                               (the Beta kernel)
//! so that nothing is learned where the student always fails (p = 0) or always succeeds (p = 1),
//! the two ends where the paper shows the gradient's signal-to-noise ratio vanishes. The paper's
//! default is α = β = 1 (w = p(1 − p)); with a forward-KL stage then a reverse-KL stage (the
//! objective's `steps` windows) it is the paper's two-stage schedule.
//!
//! Here, for `{"prompt", "response", "answer"}` training records (`data.packing = false`: one
//! sequence per example, so a row is one problem):
//!   - before the first step and every `refresh_every` steps, the student samples n continuations of
//!     every prompt that has an answer (batched, `generate_batch`); the seed of rollout j of problem
//!     k at refresh s is a function of (run seed, s, k, j), so nothing random is saved;
//!   - w_k = max(p_k^α (1 − p_k)^β, floor), normalised to mean 1 over the problems; when every w_k
//!     is 0 (all p ∈ {0, 1} and no floor) the weights fall back to uniform (1) and the record says so;
//!   - a training row's per-token weights are multiplied by its problem's w (rows of examples
//!     without an answer keep weight 1), and the micro-batch's value is scaled by
//!     Σ_t w_k(t)·m_t / Σ_t m_t (m the unweighted token weights), so that the objective is
//!     Σ_t w_k(t) · m_t · ℓ_t / Σ_t m_t,
//!     the unweighted token mean with each token scaled by its problem's weight, rather than a
//!     mean re-normalised by the weights, which would undo the weighting of a batch whose problems
//!     all have small w;
//!   - the pass-rate table goes into the checkpoint (`TrainState::paced`), and each refresh is a
//!     metrics record {"kind": "paced", "step" (the first step it weights), "mean_p",
//!     "histogram" (problems per number of passing rollouts, 0..=n), "zero_weight_share", ...}.
//!
//! Differences from the paper: no published code was found to compare with. The paper estimates p
//! on the problems and weights their distillation loss; how often p is refreshed and how the
//! weights are normalised are not specified in the parts we could read: the refresh cadence, the
//! mean-1 normalisation, the uniform fall-back and the optional `floor` are this implementation's.
use super::answer_check::AnswerCheck;
use crate::config::{issue, Checked};
use crate::data::{Batch, Sequence, IGNORE_INDEX};
use crate::generate::{generate_batch, GenerateOptions, SplitMix64};
use crate::model::{Llama, Tokenizer};
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::{json, Value};

/// `[paced]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacedFile {
    /// student rollouts per problem (default 8)
    pub rollouts: Option<usize>,
    /// α ≥ 0 (default 1)
    pub alpha: Option<f64>,
    /// β ≥ 0 (default 1)
    pub beta: Option<f64>,
    /// refresh the pass rates every this many optimizer steps (default 50)
    pub refresh_every: Option<usize>,
    /// sampling temperature of the rollouts (default 1; 0 = greedy)
    pub temperature: Option<f64>,
    /// nucleus of the rollouts (default 1)
    pub top_p: Option<f64>,
    /// tokens per rollout (default 32)
    pub max_new_tokens: Option<usize>,
    /// "exact" (default), "numeric" or "regex:PATTERN"
    pub check: Option<String>,
    /// lower bound of the unnormalised weight, in [0, 1] (default 0)
    pub floor: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Paced {
    pub rollouts: usize,
    pub alpha: f64,
    pub beta: f64,
    pub refresh_every: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub check: AnswerCheck,
    pub floor: f64,
}

impl PacedFile {
    pub fn resolve(&self) -> Checked<Paced> {
        let rollouts = self.rollouts.unwrap_or(8);
        if rollouts == 0 || rollouts > 1 << 16 {
            return Err(issue("paced.rollouts", "must be in [1, 65536]"));
        }
        let exponent = |key: &str, v: Option<f64>| match v.unwrap_or(1.0) {
            x if x.is_finite() && x >= 0.0 => Ok(x),
            x => Err(issue(key, format!("must be ≥ 0 and finite, got {x}"))),
        };
        let alpha = exponent("paced.alpha", self.alpha)?;
        let beta = exponent("paced.beta", self.beta)?;
        let refresh_every = self.refresh_every.unwrap_or(50);
        if refresh_every == 0 {
            return Err(issue("paced.refresh_every", "must be at least 1"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(issue("paced.temperature", "must be ≥ 0 (0 = greedy)"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(issue("paced.top_p", "must be in (0, 1]"));
        }
        let max_new_tokens = self.max_new_tokens.unwrap_or(32);
        if max_new_tokens == 0 {
            return Err(issue("paced.max_new_tokens", "must be at least 1"));
        }
        let check = AnswerCheck::parse(self.check.as_deref().unwrap_or("exact"))
            .map_err(|m| issue("paced.check", m))?;
        let floor = self.floor.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&floor) {
            return Err(issue(
                "paced.floor",
                format!("must be in [0, 1], got {floor}"),
            ));
        }
        Ok(Paced {
            rollouts,
            alpha,
            beta,
            refresh_every,
            temperature,
            top_p,
            max_new_tokens,
            check,
            floor,
        })
    }
}

/// The pass-rate table of the last refresh, as a checkpoint records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PacedState {
    /// optimizer steps completed when it was measured
    pub at: usize,
    pub rollouts: usize,
    /// per problem (the training rows with an answer, in row order): passing rollouts
    pub passes: Vec<u32>,
}

/// One problem: a training row with an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// its index in the training sequences
    pub row: usize,
    /// its tokens before the first target (the record's prompt)
    pub prompt: Vec<u32>,
    pub answer: String,
}

/// The problems of the training rows: each row whose example has an answer and whose prompt
/// leaves a target inside the row.
pub fn problems(train: &[Sequence], answers: &[Option<String>]) -> Vec<Problem> {
    train
        .iter()
        .enumerate()
        .filter_map(|(row, s)| {
            let span = s.spans.first()?;
            let answer = answers.get(span.example)?.clone()?;
            // labels[p] is the token at p + 1: the prompt ends where the first target starts
            let first = s.labels.iter().position(|&l| l != IGNORE_INDEX)? + 1;
            Some(Problem {
                row,
                prompt: s.ids[..first].to_vec(),
                answer,
            })
        })
        .collect()
}

/// The seed of rollout `rollout` of problem `problem` at the refresh after `at` steps.
pub fn rollout_seed(seed: u64, at: usize, problem: usize, rollout: usize) -> u64 {
    let mut g = SplitMix64::new(
        seed ^ 0x5041_4345_4400_0000 ^ (at as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let a = g.next_u64() ^ (problem as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut g = SplitMix64::new(a);
    let b = g.next_u64() ^ (rollout as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
    SplitMix64::new(b).next_u64()
}

/// w(p) = max(p^α (1 − p)^β, floor), unnormalised.
pub fn kernel(p: f64, alpha: f64, beta: f64, floor: f64) -> f64 {
    (p.powf(alpha) * (1.0 - p).powf(beta)).max(floor)
}

/// The problems' weights from their pass counts: the kernel normalised to mean 1; all 1 when
/// every kernel value is 0 (the second value then says so).
pub fn weights(passes: &[u32], n: usize, alpha: f64, beta: f64, floor: f64) -> (Vec<f64>, bool) {
    let raw: Vec<f64> = passes
        .iter()
        .map(|&k| kernel(k as f64 / n as f64, alpha, beta, floor))
        .collect();
    let sum: f64 = raw.iter().sum();
    if sum <= 0.0 {
        return (vec![1.0; raw.len()], true);
    }
    let scale = raw.len() as f64 / sum;
    (raw.iter().map(|w| w * scale).collect(), false)
}

/// PACED in a run: its problems and the weight of every training row.
pub struct PacedRun {
    pub options: Paced,
    pub problems: Vec<Problem>,
    /// the validation rows with an answer (the held-out pass rate of each evaluation)
    pub validation: Vec<Problem>,
    /// per training row: its problem's weight (1 for rows without an answer)
    pub row_weights: Vec<f32>,
}

impl PacedRun {
    /// Refuses data with no problem (no record with an answer).
    pub fn new(
        options: Paced,
        train: &[Sequence],
        answers: &[Option<String>],
        validation: &[Sequence],
        validation_answers: &[Option<String>],
    ) -> Result<Self> {
        let problems = problems(train, answers);
        if problems.is_empty() {
            return Err(Error::Invalid(
                "[paced]: no training record has an \"answer\" (PACED needs {\"prompt\", \"response\", \"answer\"} records whose prompt fits in data.seq_len)".into(),
            ));
        }
        Ok(PacedRun {
            options,
            problems,
            validation: self::problems(validation, validation_answers),
            row_weights: vec![1.0; train.len()],
        })
    }

    /// Whether the table must be measured before the step after `step` completed steps.
    pub fn due(&self, table: Option<&PacedState>, step: usize) -> bool {
        table.is_none_or(|t| step >= t.at + self.options.refresh_every)
    }

    /// Measure the pass rates with the student as it is after `at` steps. Rows are generated in
    /// batches of whole problems (about `batch_rows` rows each).
    pub fn measure(
        &self,
        student: &Llama,
        tok: &Tokenizer,
        seed: u64,
        at: usize,
        stop_ids: &[u32],
        batch_rows: usize,
    ) -> Result<PacedState> {
        let passes =
            self.count_passes(&self.problems, student, tok, seed, at, stop_ids, batch_rows)?;
        Ok(PacedState {
            at,
            rollouts: self.options.rollouts,
            passes,
        })
    }

    /// The student's pass rate on the validation problems (None without any): n rollouts each,
    /// the same draws at every evaluation (refresh index `usize::MAX`, never a training refresh).
    pub fn validation_pass_rate(
        &self,
        student: &Llama,
        tok: &Tokenizer,
        seed: u64,
        stop_ids: &[u32],
        batch_rows: usize,
    ) -> Result<Option<f64>> {
        if self.validation.is_empty() {
            return Ok(None);
        }
        let passes = self.count_passes(
            &self.validation,
            student,
            tok,
            seed,
            usize::MAX,
            stop_ids,
            batch_rows,
        )?;
        let total: f64 = passes.iter().map(|&k| k as f64).sum();
        Ok(Some(
            total / (self.options.rollouts * self.validation.len()) as f64,
        ))
    }

    /// Passing rollouts per problem of `problems`, the seeds of refresh `at`.
    #[allow(clippy::too_many_arguments)]
    fn count_passes(
        &self,
        problems: &[Problem],
        student: &Llama,
        tok: &Tokenizer,
        seed: u64,
        at: usize,
        stop_ids: &[u32],
        batch_rows: usize,
    ) -> Result<Vec<u32>> {
        let o = &self.options;
        let n = o.rollouts;
        let per_call = (batch_rows / n).max(1);
        let mut passes = Vec::with_capacity(problems.len());
        for (c, chunk) in problems.chunks(per_call).enumerate() {
            let mut prompts = Vec::with_capacity(chunk.len() * n);
            let mut seeds = Vec::with_capacity(chunk.len() * n);
            for (i, p) in chunk.iter().enumerate() {
                for j in 0..n {
                    prompts.push(p.prompt.clone());
                    seeds.push(rollout_seed(seed, at, c * per_call + i, j));
                }
            }
            let opts = GenerateOptions {
                max_new_tokens: o.max_new_tokens,
                temperature: o.temperature,
                top_p: o.top_p,
                seed,
                stop_ids: stop_ids.to_vec(),
            };
            let out = generate_batch(student, &prompts, &seeds, &opts, |_, _| Ok(()))?;
            for (i, p) in chunk.iter().enumerate() {
                let mut k = 0u32;
                for g in &out[i * n..(i + 1) * n] {
                    if o.check.passes(&tok.decode(&g.tokens, false)?, &p.answer) {
                        k += 1;
                    }
                }
                passes.push(k);
            }
        }
        Ok(passes)
    }

    /// Take `table`'s weights; Err when it does not fit this run's problems.
    pub fn apply(&mut self, table: &PacedState) -> Result<bool> {
        if table.passes.len() != self.problems.len()
            || table.rollouts != self.options.rollouts
            || table.passes.iter().any(|&k| k as usize > table.rollouts)
        {
            return Err(Error::Invalid(format!(
                "paced: the recorded table has {} problems of {} rollouts, this run {} of {}",
                table.passes.len(),
                table.rollouts,
                self.problems.len(),
                self.options.rollouts
            )));
        }
        let o = &self.options;
        let (w, uniform) = weights(&table.passes, o.rollouts, o.alpha, o.beta, o.floor);
        for (p, w) in self.problems.iter().zip(w) {
            self.row_weights[p.row] = w as f32;
        }
        Ok(uniform)
    }

    /// The metrics record of a refresh.
    pub fn record(&self, table: &PacedState, uniform: bool, seconds: f64) -> Value {
        let n = table.rollouts;
        let mut histogram = vec![0usize; n + 1];
        for &k in &table.passes {
            histogram[k as usize] += 1;
        }
        let count = table.passes.len() as f64;
        let mean_p = table.passes.iter().map(|&k| k as f64).sum::<f64>() / (n as f64 * count);
        // the share whose kernel value is 0 (before any uniform fall-back)
        let o = &self.options;
        let zero = table
            .passes
            .iter()
            .filter(|&&k| kernel(k as f64 / n as f64, o.alpha, o.beta, o.floor) == 0.0)
            .count() as f64
            / count;
        json!({"kind": "paced", "step": table.at + 1, "after_steps": table.at,
            "problems": table.passes.len(), "rollouts": n, "mean_p": mean_p,
            "histogram": histogram, "zero_weight_share": zero, "uniform_fallback": uniform,
            "seconds": seconds})
    }

    /// Multiply each row's token weights by its problem's weight; returns the factor on the
    /// micro-batch's value, Σ weighted / Σ unweighted (1 for a batch with nothing counted).
    pub fn weigh(&self, batch: &mut Batch) -> Result<f64> {
        let (b, t) = batch.shape();
        let (b, t) = (b as usize, t as usize);
        let before: f64 = batch.weight_sum(0, b * t);
        let mut w = batch.host_weights().to_vec();
        for (i, &row) in batch.rows.iter().enumerate() {
            let f = self.row_weights.get(row).copied().unwrap_or(1.0);
            for x in &mut w[i * t..(i + 1) * t] {
                *x *= f;
            }
        }
        batch.set_weights(&w)?;
        let after = batch.weight_sum(0, b * t);
        Ok(if before > 0.0 { after / before } else { 1.0 })
    }
}
