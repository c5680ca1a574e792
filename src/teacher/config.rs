//! `[teacher]`: which model teaches, and the dtype it computes in.
use crate::config::{issue, Checked, Paths};
use crate::device::Dtype;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherFile {
    /// a Hugging Face folder or a .gguf file
    pub path: PathBuf,
    /// "f32" (default), "bf16" or "f16": the teacher's weights are cast to it and it computes in it
    pub dtype: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TeacherConfig {
    pub path: PathBuf,
    pub dtype: Dtype,
}

impl TeacherFile {
    pub fn resolve(&self, paths: &Paths) -> Checked<TeacherConfig> {
        let dtype = match &self.dtype {
            Some(d) => Dtype::parse(d).map_err(|m| issue("teacher.dtype", m))?,
            None => Dtype::F32,
        };
        Ok(TeacherConfig {
            path: paths.resolve(&self.path),
            dtype,
        })
    }
}
