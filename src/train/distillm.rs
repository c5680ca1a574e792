//! DistiLLM's adaptive off-policy approach (Ko et al. 2024, "DistiLLM: Towards Streamlined
//! Distillation for Large Language Models", §3.2, Algorithm 1), `[onpolicy] mode = "distillm"`:
//!   φ, the probability of training on student-generated outputs (SGO), starts at `fraction`
//!   (DistiLLM's init_threshold; default 0). Every micro-batch draws r ~ U(0, 1); with
//!   s = φ·ρ(step / total), ρ the replay ratio (decreasing: 1 − x, constant: 1/2, increasing: x):
//!     r < s, or r < φ while the replay buffer holds fewer than `replay_capacity` samples
//!         → fresh: the student continues the rows' prompts (as a GKD step, train/onpolicy.rs);
//!           the samples join the buffer (first in, first out) and are trained on;
//!     else r < φ → replay: `micro_batch` distinct samples drawn uniformly from the buffer;
//!     else       → the data's rows.
//!   After each evaluation, with L the student's validation loss (cross-entropy, ln of its
//!   perplexity): if L ≥ L_ref + ε (`loss_eps`) then φ ← min(φ + 0.1, 1) and L_ref ← L. L_ref
//!   starts as the loss of the evaluation before the first step.
//! The objective is the run's (DistiLLM's own is the skew KL: `kind = "skew_kl"`).
//! Differences from the published code (jongwooko/distillm, finetune.py), which this follows where
//! the paper is silent (L_ref moves only when φ is raised; the draw is per forward batch, here
//! per micro-batch): its draws come from NumPy's and Python's global generators, ours are
//! functions of (seed, step, micro-batch), so a resumed run draws what the uninterrupted one drew;
//! its buffer lives in memory only, ours (with φ and L_ref) is saved in every checkpoint
//! (`replay.json`), so a killed run resumes exactly.
use super::onpolicy::{draw, sample_sequence};
use crate::config::{issue, Checked};
use crate::data::{Sequence, IGNORE_INDEX};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The checkpoint file that holds the replay buffer.
pub const FILE: &str = "replay.json";

/// The share of fresh samples among SGO steps as the run advances: ρ(x), x = step / total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReplayRatio {
    Decreasing,
    Constant,
    Increasing,
}

impl ReplayRatio {
    pub fn parse(s: &str) -> Checked<Self> {
        match s {
            "decreasing" => Ok(Self::Decreasing),
            "constant" => Ok(Self::Constant),
            "increasing" => Ok(Self::Increasing),
            _ => Err(issue(
                "onpolicy.replay_ratio",
                format!("'{s}': expected \"decreasing\", \"constant\" or \"increasing\""),
            )),
        }
    }

    pub fn at(self, x: f64) -> f64 {
        match self {
            Self::Decreasing => 1.0 - x,
            Self::Constant => 0.5,
            Self::Increasing => x,
        }
    }
}

/// The settings of the adaptive mode.
#[derive(Debug, Clone, PartialEq)]
pub struct DistiLLM {
    pub capacity: usize,
    pub ratio: ReplayRatio,
    /// ε: how far the validation loss must rise above L_ref to raise φ
    pub loss_eps: f64,
}

/// Where a micro-batch's rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Fresh,
    Replay,
    Data,
}

/// What a checkpoint records of the adaptive mode (besides the buffer's samples).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveState {
    /// φ
    pub sgo_probability: f64,
    /// L_ref (None before the first evaluation)
    pub reference_loss: Option<f64>,
    /// samples in the buffer (`replay.json` holds them)
    pub buffered: usize,
}

/// φ, L_ref and the replay buffer of a run.
#[derive(Debug, Clone)]
pub struct Adaptive {
    pub settings: DistiLLM,
    pub phi: f64,
    pub reference_loss: Option<f64>,
    /// oldest first
    pub buffer: Vec<Sequence>,
}

/// A stream of draws apart from GKD's (which uses (seed, step, 0) and (seed, step, 1 + row)).
const STREAM: u64 = 0xD157_11AA_0000_0001;

impl Adaptive {
    pub fn new(settings: DistiLLM, phi: f64) -> Self {
        Adaptive {
            settings,
            phi,
            reference_loss: None,
            buffer: vec![],
        }
    }

    /// The source of micro-batch `micro` of step `step` (from 1) of `total`.
    pub fn source(&self, seed: u64, step: usize, micro: usize, total: usize) -> Source {
        let r = draw(seed ^ STREAM, step as u64, micro as u64).next_f64();
        let s = self.phi * self.settings.ratio.at(step as f64 / total.max(1) as f64);
        if r < s || (r < self.phi && self.buffer.len() < self.settings.capacity) {
            Source::Fresh
        } else if r < self.phi {
            Source::Replay
        } else {
            Source::Data
        }
    }

    /// Fresh samples join the buffer (those with no token to learn, none); the oldest leave
    /// beyond its capacity.
    pub fn push(&mut self, samples: &[Sequence]) {
        self.buffer
            .extend(samples.iter().filter(|s| s.counted() > 0).cloned());
        let over = self.buffer.len().saturating_sub(self.settings.capacity);
        self.buffer.drain(..over);
    }

    /// `n` distinct buffer indices, uniformly (a partial Fisher–Yates shuffle), drawn from
    /// (seed, step, micro).
    pub fn pick(&self, n: usize, seed: u64, step: usize, micro: usize) -> Vec<usize> {
        let len = self.buffer.len();
        let mut g = draw(seed ^ STREAM ^ 1, step as u64, micro as u64);
        let mut idx: Vec<usize> = (0..len).collect();
        for i in 0..n.min(len) {
            let j = i + ((g.next_f64() * (len - i) as f64) as usize).min(len - i - 1);
            idx.swap(i, j);
        }
        idx.truncate(n.min(len));
        idx
    }

    /// DistiLLM's scheduler after an evaluation whose validation loss is `loss`.
    pub fn after_eval(&mut self, loss: f64) {
        match self.reference_loss {
            None => self.reference_loss = Some(loss),
            Some(r) if loss >= r + self.settings.loss_eps => {
                self.phi = (self.phi + 0.1).min(1.0);
                self.reference_loss = Some(loss);
            }
            Some(_) => {}
        }
    }

    pub fn state(&self) -> AdaptiveState {
        AdaptiveState {
            sgo_probability: self.phi,
            reference_loss: self.reference_loss,
            buffered: self.buffer.len(),
        }
    }

    /// The buffer as `replay.json`: per sample its prompt length and unpadded ids (the rest is a
    /// function of them: `sample_sequence`).
    pub fn buffer_json(&self) -> Vec<u8> {
        let rows: Vec<Stored> = self.buffer.iter().map(Stored::of).collect();
        serde_json::to_vec(&rows).expect("the buffer serialises")
    }

    /// The state and buffer of checkpoint `ck`.
    pub fn restore(&mut self, st: &AdaptiveState, ck: &Path, seq_len: usize) -> Result<()> {
        self.phi = st.sgo_probability;
        self.reference_loss = st.reference_loss;
        self.buffer.clear();
        if st.buffered == 0 {
            return Ok(());
        }
        let p = ck.join(FILE);
        let rows: Vec<Stored> = serde_json::from_str(&crate::io::read_to_string(&p)?)
            .map_err(|e| Error::format(&p, format!("not a replay buffer: {e}")))?;
        if rows.len() != st.buffered {
            return Err(Error::format(
                &p,
                format!(
                    "holds {} samples, state.json says {}",
                    rows.len(),
                    st.buffered
                ),
            ));
        }
        for (i, r) in rows.iter().enumerate() {
            if r.prompt == 0 || r.prompt >= r.ids.len() || r.ids.len() > seq_len {
                return Err(Error::format(
                    &p,
                    format!(
                        "sample {i}: prompt {} of {} tokens does not fit a sequence of {seq_len}",
                        r.prompt,
                        r.ids.len()
                    ),
                ));
            }
            self.buffer.push(sample_sequence(
                &r.ids[..r.prompt],
                &r.ids[r.prompt..],
                seq_len,
                r.domain,
            ));
        }
        Ok(())
    }
}

/// A buffered sample as `replay.json` keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    prompt: usize,
    ids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    domain: Option<u32>,
}

impl Stored {
    /// A sample sequence: the prompt ends where its first target's prediction starts; the
    /// unpadded length is the prompt plus the counted tokens.
    fn of(s: &Sequence) -> Stored {
        let first = s
            .labels
            .iter()
            .position(|&l| l != IGNORE_INDEX)
            .unwrap_or(0);
        let prompt = first + 1;
        Stored {
            prompt,
            ids: s.ids[..prompt + s.counted()].to_vec(),
            domain: s.domain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive(phi: f64, capacity: usize) -> Adaptive {
        Adaptive::new(
            DistiLLM {
                capacity,
                ratio: ReplayRatio::Decreasing,
                loss_eps: 0.1,
            },
            phi,
        )
    }

    fn sample(p: &[u32], y: &[u32]) -> Sequence {
        sample_sequence(p, y, 12, None)
    }

    #[test]
    fn the_source_follows_the_thresholds() {
        let (seed, total) = (5, 100);
        for phi in [0.0, 0.3, 1.0] {
            let mut a = adaptive(phi, 2);
            let full = {
                let mut b = a.clone();
                b.push(&[sample(&[1], &[2]), sample(&[1], &[3])]);
                b
            };
            for step in 1..=total {
                for micro in 0..2 {
                    let r = draw(seed ^ STREAM, step as u64, micro as u64).next_f64();
                    let s = phi * (1.0 - step as f64 / total as f64);
                    let want_empty = if r < phi { Source::Fresh } else { Source::Data };
                    let want_full = if r < s {
                        Source::Fresh
                    } else if r < phi {
                        Source::Replay
                    } else {
                        Source::Data
                    };
                    assert_eq!(a.source(seed, step, micro, total), want_empty);
                    assert_eq!(full.source(seed, step, micro, total), want_full);
                }
            }
            a.phi = 0.0;
            assert!((1..=total).all(|k| a.source(seed, k, 0, total) == Source::Data));
        }
    }

    #[test]
    fn phi_rises_by_a_tenth_when_the_loss_rises_by_eps() {
        let mut a = adaptive(0.0, 4);
        a.after_eval(2.0); // the reference
        assert_eq!((a.phi, a.reference_loss), (0.0, Some(2.0)));
        a.after_eval(2.05); // not by ε
        assert_eq!((a.phi, a.reference_loss), (0.0, Some(2.0)));
        a.after_eval(1.0); // a fall does not move the reference
        assert_eq!((a.phi, a.reference_loss), (0.0, Some(2.0)));
        a.after_eval(2.1);
        assert!((a.phi - 0.1).abs() < 1e-15 && a.reference_loss == Some(2.1));
        for k in 0..20 {
            a.after_eval(3.0 + k as f64);
        }
        assert_eq!(a.phi, 1.0);
    }

    #[test]
    fn the_buffer_is_first_in_first_out_and_picks_distinct_samples() {
        let mut a = adaptive(1.0, 3);
        let xs: Vec<Sequence> = (0..5).map(|k| sample(&[1, 2], &[10 + k, 20])).collect();
        a.push(&xs[..2]);
        a.push(&xs[2..]);
        assert_eq!(a.buffer, xs[2..].to_vec());
        let mut seen = [0usize; 3];
        for step in 1..=300 {
            let p = a.pick(2, 9, step, 0);
            assert_eq!(p.len(), 2);
            assert_ne!(p[0], p[1]);
            for i in p {
                seen[i] += 1;
            }
        }
        // uniform: each of 3 samples in 2/3 of 300 picks (binomial sd ≈ 8.2); 6 sd apart
        for s in seen {
            assert!((s as f64 - 200.0).abs() < 50.0, "{seen:?}");
        }
        assert_eq!(a.pick(5, 9, 1, 0).len(), 3);
    }

    #[test]
    fn the_buffer_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = adaptive(0.4, 8);
        a.reference_loss = Some(1.5);
        let mut with_domain = sample(&[7, 8, 9], &[1]);
        with_domain.domain = Some(2);
        a.push(&[sample(&[1], &[2, 3, 4]), with_domain, sample(&[5, 6], &[])]);
        assert_eq!(
            a.buffer.len(),
            2,
            "a sample without a token to learn is not kept"
        );
        std::fs::write(dir.path().join(FILE), a.buffer_json()).unwrap();
        let mut b = adaptive(0.0, 8);
        b.restore(&a.state(), dir.path(), 12).unwrap();
        assert_eq!(b.buffer, a.buffer);
        assert_eq!((b.phi, b.reference_loss), (0.4, Some(1.5)));
        // a file that disagrees with the state is refused, naming it
        let mut st = a.state();
        st.buffered = 3;
        let e = b.restore(&st, dir.path(), 12).unwrap_err().to_string();
        assert!(e.contains(FILE) && e.contains("holds 2 samples"), "{e}");
    }
}
