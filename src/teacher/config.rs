//! `[teacher]`: which model teaches (a model, a captured store, or both), and the dtype it computes
//! in.
use crate::config::{issue, Checked, Paths};
use crate::device::Dtype;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherFile {
    /// a Hugging Face folder or a .gguf file (optional when `store` is given)
    pub path: Option<PathBuf>,
    /// "f32" (default), "bf16" or "f16": the teacher's weights are cast to it and it computes in it
    pub dtype: Option<String>,
    /// a teacher store (`distill capture`): its signal replaces the teacher's forward; with `path`
    /// too, the live teacher serves the sequences the store does not hold (a hybrid)
    pub store: Option<PathBuf>,
    /// hybrid only: add what the live teacher computed to the store
    pub write_back: Option<bool>,
    /// the share of training sequences the teacher is queried for, in (0, 1] (teacher/budget.rs)
    pub budget: Option<f64>,
    /// how that share is chosen: "uncertainty", "rad", "kd3" or "random" (default)
    pub selection: Option<String>,
    /// the other sequences: "cross_entropy" (default, trained on their labels) or "skip"
    pub unselected: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TeacherConfig {
    pub path: Option<PathBuf>,
    pub dtype: Dtype,
    pub store: Option<PathBuf>,
    pub write_back: bool,
    /// a teacher-query budget (None: every training sequence)
    pub budget: Option<super::budget::Budget>,
}

impl TeacherFile {
    pub fn resolve(&self, paths: &Paths) -> Checked<TeacherConfig> {
        let dtype = match &self.dtype {
            Some(d) => Dtype::parse(d).map_err(|m| issue("teacher.dtype", m))?,
            None => Dtype::F32,
        };
        if self.path.is_none() && self.store.is_none() {
            return Err(issue(
                "teacher",
                "give 'path' (a model), 'store' (a captured teacher store) or both",
            ));
        }
        let write_back = self.write_back.unwrap_or(false);
        if write_back && (self.path.is_none() || self.store.is_none()) {
            return Err(issue(
                "teacher.write_back",
                "needs both 'path' and 'store' (the live teacher writes into the store)",
            ));
        }
        Ok(TeacherConfig {
            path: self.path.as_deref().map(|p| paths.resolve(p)),
            dtype,
            store: self.store.as_deref().map(|p| paths.resolve(p)),
            write_back,
            budget: super::budget::Budget::resolve(
                self.budget,
                self.selection.as_deref(),
                self.unselected.as_deref(),
            )?,
        })
    }
}

impl TeacherConfig {
    /// The teacher model's path, or an error saying this use needs one.
    pub fn model_path(&self, why: &str) -> crate::Result<&PathBuf> {
        self.path.as_ref().ok_or_else(|| {
            crate::Error::Invalid(format!("teacher.path: {why} needs the teacher model"))
        })
    }
}
