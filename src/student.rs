//! Building a student: loaded from a folder or GGUF, or made from the teacher by keeping some of its
//! layers (embeddings, final norm, head and the listed decoder layers copied; layer `layers[k]` of
//! the teacher becomes layer k of the student).
use crate::config::{issue, Checked, Paths};
use crate::device::Dtype;
use crate::model::{self, hf, LoadedModel};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{nn, Device, Tensor};

/// `[student]`: a model folder or file, or layers of the teacher; and the dtype it computes in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentFile {
    pub path: Option<PathBuf>,
    pub from_teacher: Option<FromTeacher>,
    /// "f32" (default), "bf16" or "f16": the compute dtype; weights and optimizer state stay f32
    pub dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromTeacher {
    pub layers: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StudentInit {
    Path(PathBuf),
    FromTeacher { layers: Vec<usize> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StudentConfig {
    pub init: StudentInit,
    pub dtype: Dtype,
}

impl StudentFile {
    pub fn resolve(&self, paths: &Paths) -> Checked<StudentConfig> {
        let init = match (&self.path, &self.from_teacher) {
            (Some(p), None) => StudentInit::Path(paths.resolve(p)),
            (None, Some(ft)) => {
                if ft.layers.is_empty() {
                    return Err(issue(
                        "student.from_teacher.layers",
                        "must list at least one layer",
                    ));
                }
                StudentInit::FromTeacher {
                    layers: ft.layers.clone(),
                }
            }
            _ => {
                return Err(issue(
                    "student",
                    "give exactly one of 'path' or 'from_teacher'",
                ))
            }
        };
        let dtype = match &self.dtype {
            Some(d) => Dtype::parse(d).map_err(|m| issue("student.dtype", m))?,
            None => Dtype::F32,
        };
        Ok(StudentConfig { init, dtype })
    }
}

pub fn from_teacher_layers(
    teacher: &LoadedModel,
    layers: &[usize],
    device: Device,
) -> Result<LoadedModel> {
    let n = teacher.model.config.num_hidden_layers;
    if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
        return Err(Error::Invalid(format!(
            "student.from_teacher.layers: layer {bad} does not exist (the teacher has layers 0..{})",
            n - 1
        )));
    }
    let mut config = teacher.model.config.clone();
    config.num_hidden_layers = layers.len();
    let src = teacher.vs.variables();
    let mut named: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in &src {
        match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (idx, tail) = rest
                    .split_once('.')
                    .expect("layer variable names have a tail");
                let idx: usize = idx.parse().expect("layer index");
                for (k, _) in layers.iter().enumerate().filter(|(_, &l)| l == idx) {
                    named.insert(format!("model.layers.{k}.{tail}"), t.shallow_clone());
                }
            }
            None => {
                named.insert(name.clone(), t.shallow_clone());
            }
        }
    }
    let vs = nn::VarStore::new(device);
    let m = model::Llama::new(&vs.root(), &config)?;
    hf::load_into(&vs, &named, &teacher.source)?;
    Ok(LoadedModel {
        vs,
        model: m,
        tokenizer: teacher.tokenizer.clone(),
        generation_config: teacher.generation_config.clone(),
        source: teacher.source.clone(),
        format: teacher.format,
        weight_types: teacher.weight_types.clone(),
    })
}
