//! The output folder of a run: every file a run writes goes through `RunOutput`, the one writer
//! (with several processes, only rank 0 will hold one). It holds an exclusive lock on the folder
//! (`.lock`) from the moment it opens until the run ends, so that two runs cannot write into one
//! folder; it clears a previous run only when asked (`--overwrite`) and only once every check of the
//! new run has passed.
//!
//!   run.json        what the run is (models, data, objective, settings): the report's source
//!   metrics.jsonl   one record per logged step, per evaluation, and a closing summary
//!   checkpoints/    step-N/ (student, optimizer.safetensors, state.json), whole or absent
//!   student/        the distilled student, a Hugging Face folder
//!   projection.safetensors   the hidden-state terms' learned projections (train/hidden.rs), when
//!                   the run has any: beside the student, never inside it
//!   loss.png, report.md   made from run.json and the metric records alone
use super::checkpoint;
use super::faults::Faults;
use super::optim::AdamW;
use super::state::TrainState;
use crate::io::{read_to_string, write_atomic};
use crate::model::LoadedModel;
use crate::{report, Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Files a run writes into its output folder.
const RUN_FILES: &[&str] = &[
    "run.json",
    "checkpoints",
    "metrics.jsonl",
    "student",
    "projection.safetensors",
    "report.md",
    "loss.png",
];

/// Whether `dir` holds a run (its presence means the folder is taken).
pub fn holds_run(dir: &Path) -> bool {
    ["run.json", "checkpoints", "metrics.jsonl"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// How the run starts in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// an empty (or new) folder
    Fresh,
    /// replace the run in the folder
    Overwrite,
    /// continue the run whose newest checkpoint is at this step
    Resume(usize),
}

pub struct RunOutput {
    dir: PathBuf,
    metrics_path: PathBuf,
    /// None: a rank other than 0 of a run over several processes, which writes nothing
    metrics: Option<std::fs::File>,
    faults: Faults,
    _lock: Option<std::fs::File>,
}

impl RunOutput {
    /// Take the folder: lock it, clear the previous run for `Overwrite`, open the metrics (a resumed
    /// run keeps the records up to its checkpoint's step, so that no step appears twice).
    pub fn open(dir: &Path, start: Start, faults: Faults) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Invalid(format!(
                    "{}: another run is writing into this folder (it holds {}); wait for it or choose another output",
                    dir.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        if start == Start::Overwrite {
            for f in RUN_FILES {
                let p = dir.join(f);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
                } else if p.exists() {
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
        let metrics_path = dir.join("metrics.jsonl");
        let kept = match start {
            Start::Resume(step) if metrics_path.exists() => read_to_string(&metrics_path)?
                .lines()
                .filter(|l| {
                    // the records up to the checkpoint; a closing summary is written anew
                    serde_json::from_str::<Value>(l).ok().is_some_and(|v| {
                        v.get("kind").and_then(Value::as_str) != Some("summary")
                            && v.get("step")
                                .and_then(Value::as_u64)
                                .is_some_and(|s| s as usize <= step)
                    })
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            _ => String::new(),
        };
        write_atomic(&metrics_path, kept.as_bytes())?;
        let metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        Ok(RunOutput {
            dir: dir.to_path_buf(),
            metrics_path,
            metrics: Some(metrics),
            faults,
            _lock: Some(lock),
        })
    }

    /// The output of a rank other than 0 (train/parallel.rs): it names the folder rank 0 writes
    /// and writes nothing itself.
    pub fn inert(dir: &Path) -> Self {
        RunOutput {
            dir: dir.to_path_buf(),
            metrics_path: dir.join("metrics.jsonl"),
            metrics: None,
            faults: Faults::default(),
            _lock: None,
        }
    }

    /// Whether this output writes (rank 0, or the only process).
    pub fn writes(&self) -> bool {
        self.metrics.is_some()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// run.json: what the run is.
    pub fn write_run_info(&self, info: &Value) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let text = serde_json::to_string_pretty(info).expect("json values serialise");
        write_atomic(&self.dir.join("run.json"), text.as_bytes())
    }

    /// One metric record, flushed and fsynced.
    pub fn metric(&mut self, record: &Value) -> Result<()> {
        let Some(metrics) = self.metrics.as_mut() else {
            return Ok(());
        };
        let line = format!("{record}\n");
        metrics
            .write_all(line.as_bytes())
            .and_then(|_| metrics.sync_data())
            .map_err(|e| Error::io(&self.metrics_path, e))
    }

    /// `extra`: further files of named tensors (file name, tensors), e.g. the projections.
    pub fn checkpoint(
        &self,
        student: &LoadedModel,
        extra: &[(&str, Vec<(String, tch::Tensor)>)],
        files: &[(&str, Vec<u8>)],
        opt: &AdamW,
        state: &TrainState,
        keep_last: usize,
    ) -> Result<PathBuf> {
        if !self.writes() {
            return Ok(checkpoint::dir(&self.dir));
        }
        checkpoint::save(
            &self.dir,
            student,
            extra,
            files,
            opt,
            state,
            keep_last,
            &self.faults,
        )
    }

    /// Named tensors as `OUTPUT/{file}` (atomically), beside the student folder.
    pub fn save_tensors(&self, file: &str, tensors: &[(String, tch::Tensor)]) -> Result<PathBuf> {
        let path = self.dir.join(file);
        if !self.writes() {
            return Ok(path);
        }
        crate::model::hf::write_safetensors(&path, tensors)?;
        Ok(path)
    }

    /// The student as `student/`, written to a hidden folder and renamed into place.
    pub fn save_student(&self, student: &LoadedModel) -> Result<PathBuf> {
        let final_dir = self.dir.join("student");
        let partial = self.dir.join(".partial-student");
        if !self.writes() {
            return Ok(final_dir);
        }
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        }
        student.save_hf(&partial)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&partial, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        Ok(final_dir)
    }

    /// loss.png (sources.png with several sources) and report.md, from run.json and the metric records alone.
    pub fn write_report(&self) -> Result<Vec<Value>> {
        if !self.writes() {
            return Ok(vec![]);
        }
        let records = report::read_metrics(&self.metrics_path)?;
        let info: Value = serde_json::from_str(&read_to_string(&self.dir.join("run.json"))?)
            .map_err(|e| Error::format(self.dir.join("run.json"), e.to_string()))?;
        report::plot_loss(&records, &self.dir.join("loss.png"))?;
        report::plot_sources(&records, &self.dir.join("sources.png"))?;
        let md = report::markdown(&info, &records, &self.dir);
        write_atomic(&self.dir.join("report.md"), md.as_bytes())?;
        Ok(records)
    }
}
