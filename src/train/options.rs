//! `[run]`: how long, how often to evaluate, log and checkpoint, the seed, the threads, where the
//! output goes and which device computes.
use crate::config::{issue, Checked, Paths};
use serde::Deserialize;
use std::path::PathBuf;
use tch::Device;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub eval_every: Option<usize>,
    pub checkpoint_every: Option<usize>,
    pub log_every: Option<usize>,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
    pub output: Option<PathBuf>,
    pub keep_last: Option<usize>,
    /// "cpu" (default), "cuda" or "cuda:N"
    pub device: Option<String>,
    /// the resident memory a run may use, e.g. "8GiB" (train/plan.rs chooses the chunk to fit)
    pub max_memory: Option<Size>,
}

/// A size as written: a number of bytes, or a string with units ("8GiB").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Length {
    Steps(usize),
    Epochs(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    pub length: Length,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub seed: u64,
    /// libtorch's intra-op threads; the command line's --threads wins over it
    pub threads: Option<usize>,
    pub output: PathBuf,
    pub keep_last: usize,
    pub device: Device,
    /// bytes; None = no limit
    pub max_memory: Option<u64>,
}

/// Steps and epochs beyond this are refused (a run of 2^32 steps is a typo, and counts stay far from
/// overflow).
const MAX_STEPS: usize = 1 << 32;

impl RunSection {
    pub fn resolve(&self, paths: &Paths) -> Checked<RunOptions> {
        let length = match (self.steps, self.epochs) {
            (Some(_), Some(_)) => {
                return Err(issue("run.steps", "give 'steps' or 'epochs', not both"))
            }
            (Some(s), None) if s == 0 || s > MAX_STEPS => {
                return Err(issue(
                    "run.steps",
                    format!("must be in [1, {MAX_STEPS}], got {s}"),
                ))
            }
            (Some(s), None) => Length::Steps(s),
            (None, Some(e)) if e > 0.0 && e <= 1e6 => Length::Epochs(e),
            (None, Some(e)) => {
                return Err(issue("run.epochs", format!("must be in (0, 1e6], got {e}")))
            }
            (None, None) => Length::Epochs(1.0),
        };
        if let Some(t) = self.threads {
            if t == 0 || t > 4096 {
                return Err(issue(
                    "run.threads",
                    format!("must be in [1, 4096], got {t}"),
                ));
            }
        }
        let device = match &self.device {
            Some(d) => crate::device::parse_device(d).map_err(|m| issue("run.device", m))?,
            None => Device::Cpu,
        };
        let max_memory = match &self.max_memory {
            Some(Size::Bytes(0)) => return Err(issue("run.max_memory", "must be at least 1 byte")),
            Some(Size::Bytes(b)) => Some(*b),
            Some(Size::Text(m)) => {
                Some(super::plan::parse_bytes(m).map_err(|e| issue("run.max_memory", e))?)
            }
            None => None,
        };
        Ok(RunOptions {
            length,
            eval_every: self.eval_every.unwrap_or(0),
            checkpoint_every: self.checkpoint_every.unwrap_or(0),
            log_every: self.log_every.unwrap_or(1).max(1),
            seed: self.seed.unwrap_or(0),
            threads: self.threads,
            output: self
                .output
                .as_deref()
                .map(|p| paths.resolve(p))
                .unwrap_or_else(|| paths.base.join("distill-out")),
            keep_last: self.keep_last.unwrap_or(2).max(1),
            device,
            max_memory,
        })
    }
}
