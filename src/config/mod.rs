//! The run file (TOML): what `distill train run.toml` reads. Each module owns its section: the
//! on-disk form (serde, unknown keys refused) and its validated runtime form (defaults filled in,
//! enums instead of strings), with the checks of every range:
//!   [teacher] → teacher::TeacherFile    [student] → student::StudentFile
//!   [[teacher]], [teachers] → teacher::ensemble (several teachers)
//!   [data]    → data::DataFile          [[loss]]  → objective::LossTerm (kinds from losses::registry)
//!   [optim]   → train::optim::OptimFile [run]     → train::options::RunSection
//!   [capture] → teacher::store::config::CaptureFile
//!   [onpolicy] → train::onpolicy::OnPolicyFile
//!   [generate_data] → generate::data::GenerateDataFile (read by `distill generate-data`)
//!   [paced]   → train::paced::PacedFile
//! This module only composes them, applies `--set` overrides, and turns a problem into one line that
//! names the user's file and line (`run.toml:12: optim.lr: must be positive`), or the `--set` that
//! caused it.
pub mod source;

pub use source::{apply_overrides, expand_path};

use crate::data::{DataConfig, DataFile};
use crate::generate::data::{GenerateData, GenerateDataFile};
use crate::objective::LossTerm;
use crate::student::{StudentConfig, StudentFile};
use crate::teacher::config::TeacherConfig;
use crate::teacher::ensemble::{TeacherSection, TeachersConfig, TeachersFile};
use crate::teacher::store::config::{CaptureConfig, CaptureFile};
use crate::train::onpolicy::{OnPolicy, OnPolicyFile};
use crate::train::optim::{OptimConfig, OptimFile};
use crate::train::options::{RunOptions, RunSection};
use crate::train::paced::{Paced, PacedFile};
use crate::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A value of the run file that is wrong, by its key path ("optim.lr", "loss.1.beta").
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigIssue {
    pub key: String,
    pub msg: String,
}

pub fn issue(key: impl Into<String>, msg: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        key: key.into(),
        msg: msg.into(),
    }
}

pub type Checked<T> = std::result::Result<T, ConfigIssue>;

/// Resolves the paths a run file names: relative to its folder, `~/` from $HOME.
pub struct Paths<'a> {
    pub base: &'a Path,
}

impl Paths<'_> {
    pub fn resolve(&self, p: &Path) -> PathBuf {
        expand_path(p, self.base)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// `[teacher]`, or several `[[teacher]]` tables
    pub teacher: TeacherSection,
    /// `[teachers]`: how several teachers combine
    pub teachers: Option<TeachersFile>,
    pub student: StudentFile,
    pub data: DataFile,
    /// each `[[loss]]` is read by the registry (its parameters are the kind's own)
    #[serde(default)]
    pub loss: Vec<toml::Table>,
    #[serde(default)]
    pub optim: OptimFile,
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub capture: CaptureFile,
    pub onpolicy: Option<OnPolicyFile>,
    pub generate_data: Option<GenerateDataFile>,
    pub paced: Option<PacedFile>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// the teacher; with several `[[teacher]]`, the first
    pub teacher: TeacherConfig,
    /// several teachers (`[[teacher]]`): all of them and how they combine
    pub teachers: Option<TeachersConfig>,
    pub student: StudentConfig,
    pub data: DataConfig,
    pub losses: Vec<LossTerm>,
    pub optim: OptimConfig,
    pub run: RunOptions,
    pub capture: CaptureConfig,
    /// `[onpolicy]`: a share of steps on the student's own samples (GKD)
    pub onpolicy: Option<OnPolicy>,
    /// `[generate_data]`: what `distill generate-data` writes (training ignores it)
    pub generate_data: Option<GenerateData>,
    /// `[paced]`: rows weighted by the student's pass rate on their problem (PACED)
    pub paced: Option<Paced>,
}

impl RunConfig {
    /// Read and validate a run file, with `--set` overrides applied. Errors cite the file's line,
    /// or the `--set` that caused them.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = crate::io::read_to_string(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base, overrides)
    }

    /// Parse from a string (tests); `path` names it in errors and gives the folder relative paths
    /// start from.
    pub fn from_str(text: &str, path: &Path) -> Result<Self> {
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(text, &path.display().to_string(), base, &[])
    }

    /// Parse `text`, named `label` in errors, relative paths from `base`, with `--set` overrides.
    pub fn parse(text: &str, label: &str, base: &Path, overrides: &[String]) -> Result<Self> {
        let label = label.to_string();
        // the user's text first, so that its errors carry its lines
        let mut file: RunFile =
            toml::from_str(text).map_err(|e| source::toml_error(&label, Some(text), &e))?;
        let mut set_keys: Vec<(String, String)> = Vec::new();
        if !overrides.is_empty() {
            let mut table: toml::Table =
                toml::from_str(text).map_err(|e| source::toml_error(&label, Some(text), &e))?;
            // one override at a time: the first that breaks the document is the one named
            for o in overrides {
                apply_overrides(&mut table, std::slice::from_ref(o))?;
                let merged = toml::to_string(&table)
                    .map_err(|e| Error::Invalid(format!("--set {o}: {e}")))?;
                file = toml::from_str(&merged)
                    .map_err(|e| Error::Invalid(format!("--set {o}: {}", e.message().trim())))?;
                let (key, _) = source::parse_override(o)?;
                set_keys.push((key, o.clone()));
            }
        }
        Self::resolve(&file, &Paths { base }).map_err(|i| {
            // the --set that wrote this key (or a section above it), else the user's line
            let by_set = set_keys.iter().rev().find(|(k, _)| {
                i.key == *k
                    || i.key.starts_with(&format!("{k}."))
                    || k.starts_with(&format!("{}.", i.key))
            });
            match (by_set, source::line_of_key(text, &i.key)) {
                (Some((_, o)), _) => Error::Invalid(format!("--set {o}: {}: {}", i.key, i.msg)),
                (None, Some(line)) => {
                    Error::Invalid(format!("{label}:{line}: {}: {}", i.key, i.msg))
                }
                (None, None) => Error::Invalid(format!("{label}: {}: {}", i.key, i.msg)),
            }
        })
    }

    fn resolve(f: &RunFile, paths: &Paths) -> Checked<Self> {
        let losses = crate::objective::loss_terms(&f.loss)?;
        let (student, data) = (f.student.resolve(paths)?, f.data.resolve(paths)?);
        let (teacher, teachers) =
            crate::teacher::ensemble::resolve(&f.teacher, f.teachers.as_ref(), &data, paths)?;
        if f.onpolicy.is_some()
            && matches!(
                teachers.as_ref().map(|t| &t.combine),
                Some(crate::teacher::ensemble::Combine::PerSource(_))
            )
        {
            return Err(issue(
                "teachers.combine",
                "\"per_source\" cannot go with [onpolicy]: the student's samples have no source",
            ));
        }
        let (optim, mut run) = (f.optim.resolve()?, f.run.resolve(paths)?);
        if f.onpolicy.is_some() {
            if teacher.path.is_none() {
                return Err(issue(
                    "onpolicy",
                    "needs the teacher model (teacher.path): no store holds the student's samples",
                ));
            }
            if teacher.write_back {
                return Err(issue(
                    "teacher.write_back",
                    "cannot go with [onpolicy]: the rows would be the student's samples",
                ));
            }
        }
        if f.paced.is_some()
            && f.onpolicy.as_ref().and_then(|o| o.mode.as_deref()) == Some("distillm")
        {
            return Err(issue(
                "paced",
                "cannot go with [onpolicy] mode = \"distillm\": a replayed sample has no problem to weigh it by",
            ));
        }
        if teacher
            .budget
            .is_some_and(|b| b.unselected == crate::teacher::budget::Unselected::Skip)
            && !data.sources.is_empty()
        {
            return Err(issue(
                "teacher.unselected",
                "\"skip\" cannot go with [[data.source]] yet (the sources draw from all their sequences; \"cross_entropy\" can)",
            ));
        }
        if teacher.budget.is_some() && (f.onpolicy.is_some() || f.paced.is_some()) {
            return Err(issue(
                "teacher.budget",
                "cannot go with [onpolicy] or [paced] (their rows are not the chosen sequences)",
            ));
        }
        if f.paced.is_some() && data.packing {
            return Err(issue(
                "data.packing",
                "must be false with [paced]: each row must be one {prompt, response, answer} record",
            ));
        }
        if let crate::train::options::Length::Steps(total) = run.length {
            crate::objective::check_windows(&losses, total)?;
        }
        if let Some(stages) = &student.stages {
            crate::train::stages::check_run(stages, &f.run, &losses, &mut run)?;
        }
        Ok(RunConfig {
            capture: f.capture.resolve(&losses)?,
            onpolicy: f.onpolicy.as_ref().map(OnPolicyFile::resolve).transpose()?,
            generate_data: f
                .generate_data
                .as_ref()
                .map(|g| g.resolve(paths, run.seed))
                .transpose()?,
            paced: f.paced.as_ref().map(PacedFile::resolve).transpose()?,
            teacher,
            teachers,
            student,
            data,
            losses,
            optim,
            run,
        })
    }
}
