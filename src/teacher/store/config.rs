//! `[capture]`: how `distill capture` selects and writes the teacher's distribution.
use super::select::{Quant, Selection};
use crate::config::{issue, Checked};
use crate::objective::LossTerm;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    /// the mass the kept tokens reach at each position, in (0, 1]
    pub coverage: Option<f64>,
    /// at most this many tokens in a position's head (the label included; drawn tail tokens come on top)
    pub max_k: Option<usize>,
    /// the temperature the distribution is taken at (default: the run's losses' temperature)
    pub temperature: Option<f64>,
    /// "u8" (default) or "f16": how log-probabilities are written
    pub quantisation: Option<String>,
    /// sequences per shard
    pub shard_sequences: Option<usize>,
    /// draws from each position's tail beyond the kept head (0: the tail is one bucket)
    pub tail_samples: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CaptureConfig {
    pub selection: Selection,
    pub shard_sequences: usize,
}

/// The defaults, chosen by measurement on the demo teacher (BENCHMARKS.md, "Teacher store").
pub const COVERAGE: f64 = 0.95;
pub const MAX_K: usize = 16;
pub const SHARD_SEQUENCES: usize = 64;
pub const TAIL_SAMPLES: usize = 32;
/// Bound on `max_k` (a k is written as u16).
const MAX_K_LIMIT: usize = 65535;

impl CaptureFile {
    pub fn resolve(&self, losses: &[LossTerm]) -> Checked<CaptureConfig> {
        let coverage = self.coverage.unwrap_or(COVERAGE);
        if !(coverage > 0.0 && coverage <= 1.0) {
            return Err(issue("capture.coverage", "must be in (0, 1]"));
        }
        let max_k = self.max_k.unwrap_or(MAX_K);
        if !(1..=MAX_K_LIMIT).contains(&max_k) {
            return Err(issue(
                "capture.max_k",
                format!("must be in [1, {MAX_K_LIMIT}], got {max_k}"),
            ));
        }
        let temperature = match self.temperature {
            Some(t) if t.is_finite() && t > 0.0 => t,
            Some(_) => return Err(issue("capture.temperature", "must be positive and finite")),
            None => default_temperature(losses),
        };
        let quantisation = match &self.quantisation {
            Some(q) => Quant::parse(q).map_err(|m| issue("capture.quantisation", m))?,
            None => Quant::U8,
        };
        if self.tail_samples.is_some_and(|n| n > 4096) {
            return Err(issue("capture.tail_samples", "must be at most 4096"));
        }
        let shard_sequences = self.shard_sequences.unwrap_or(SHARD_SEQUENCES);
        if shard_sequences == 0 {
            return Err(issue("capture.shard_sequences", "must be at least 1"));
        }
        Ok(CaptureConfig {
            selection: Selection {
                coverage,
                max_k,
                temperature,
                quantisation,
                tail_samples: self.tail_samples.unwrap_or(TAIL_SAMPLES),
            },
            shard_sequences,
        })
    }
}

/// The temperature of the run's teacher-using losses when they agree, else 1.
fn default_temperature(losses: &[LossTerm]) -> f64 {
    let ts: Vec<f64> = losses
        .iter()
        .filter(|l| l.spec.name != "cross_entropy" && l.spec.reads == crate::losses::Reads::Logits)
        .map(|l| {
            l.params
                .iter()
                .find(|(n, _)| *n == "temperature")
                .map_or(1.0, |(_, v)| v)
        })
        .collect();
    match ts.first() {
        Some(&t) if ts.iter().all(|&x| x == t) => t,
        _ => 1.0,
    }
}
