//! Building a student: loaded from a folder or GGUF, or made from the teacher by keeping some of its
//! layers (embeddings, final norm, head and the listed decoder layers copied; layer `layers[k]` of
//! the teacher becomes layer k of the student), listed in the run file or chosen by measuring the
//! teacher on calibration text (`prune`); candidates ranked before training by DisWOT (`diswot`);
//! and, in stages, pruned again during the run (`ppcl`).
pub mod calibration;
pub mod diswot;
pub mod ppcl;
pub mod prune;

pub use calibration::Calibration;
pub use ppcl::{Stage, StageFile, Stages};
pub use prune::{PruneOptions, Pruning, Strategy};

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
    /// `[[student.stage]]`: progressive pruning during the run (`ppcl`)
    pub stage: Option<Vec<StageFile>>,
}

/// `from_teacher = { layers = [0, 3, …] }`, or `{ keep = N, method = "similarity", calibration =
/// "PATH" }` (the layers chosen at set-up; see `prune`); with `[[student.stage]]` also neither of
/// them (the whole teacher), and `calibration` is what every stage is measured on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromTeacher {
    pub layers: Option<Vec<usize>>,
    pub keep: Option<usize>,
    /// "similarity": the only method so far
    pub method: Option<String>,
    /// the text the teacher is measured on: a file or a folder of text files
    pub calibration: Option<PathBuf>,
    /// windows of calibration text (default 16)
    pub calibration_sequences: Option<usize>,
    /// tokens a window (default 256)
    pub calibration_seq_len: Option<usize>,
    /// "perplexity" (default), "perplexity:K", "one-shot", "iterative", "iterative:K",
    /// "independent": see `prune`
    pub strategy: Option<String>,
    /// never remove the teacher's first or last layer (default true)
    pub keep_ends: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StudentInit {
    Path(PathBuf),
    FromTeacher {
        layers: Vec<usize>,
    },
    /// `keep` of the teacher's layers, chosen at set-up by their similarity on calibration text
    Similarity {
        options: PruneOptions,
        calibration: Calibration,
    },
    /// every layer of the teacher: a run in stages that starts from the whole teacher
    Teacher,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StudentConfig {
    pub init: StudentInit,
    pub dtype: Dtype,
    /// progressive pruning during the run (`[[student.stage]]`)
    pub stages: Option<Stages>,
}

/// What `from_teacher` resolves to: the student's start, and the calibration text with the
/// ends rule when one is given (the stages of a run measure on them too).
struct Resolved {
    init: StudentInit,
    calibration: Option<Calibration>,
    keep_ends: bool,
}

impl FromTeacher {
    /// `staged`: the run has `[[student.stage]]` (calibration then goes with any form).
    fn resolve(&self, paths: &Paths, staged: bool) -> Checked<Resolved> {
        const K: &str = "student.from_teacher";
        let calibration = match &self.calibration {
            Some(path) => {
                let mut calibration = Calibration::new(paths.resolve(path));
                for (key, v, slot) in [
                    (
                        "calibration_sequences",
                        self.calibration_sequences,
                        &mut calibration.sequences,
                    ),
                    (
                        "calibration_seq_len",
                        self.calibration_seq_len,
                        &mut calibration.seq_len,
                    ),
                ] {
                    match v {
                        Some(0) => return Err(issue(format!("{K}.{key}"), "must be at least 1")),
                        Some(n) => *slot = n,
                        None => {}
                    }
                }
                Some(calibration)
            }
            None => None,
        };
        let keep_ends = self.keep_ends.unwrap_or(prune::DEFAULT_KEEP_ENDS);
        // keys that only choosing by measurement reads
        let measuring = [
            ("method", self.method.is_some()),
            ("strategy", self.strategy.is_some()),
            ("calibration", self.calibration.is_some() && !staged),
            (
                "calibration_sequences",
                self.calibration_sequences.is_some() && !staged,
            ),
            (
                "calibration_seq_len",
                self.calibration_seq_len.is_some() && !staged,
            ),
            ("keep_ends", self.keep_ends.is_some() && !staged),
        ];
        let init = match (&self.layers, self.keep) {
            (Some(layers), None) => {
                if let Some((key, _)) = measuring.iter().find(|(_, given)| *given) {
                    return Err(issue(
                        format!("{K}.{key}"),
                        "goes with 'keep' (layers chosen by measurement), not with a list of 'layers'",
                    ));
                }
                if layers.is_empty() {
                    return Err(issue(format!("{K}.layers"), "must list at least one layer"));
                }
                StudentInit::FromTeacher {
                    layers: layers.clone(),
                }
            }
            (None, Some(keep)) => {
                if keep == 0 {
                    return Err(issue(
                        format!("{K}.keep"),
                        "must be at least 1 (a student needs a layer)",
                    ));
                }
                match self.method.as_deref() {
                    Some("similarity") => {}
                    Some(m) => {
                        return Err(issue(
                            format!("{K}.method"),
                            format!("unknown method '{m}', expected \"similarity\""),
                        ))
                    }
                    None => {
                        return Err(issue(
                            format!("{K}.method"),
                            "missing: say how the layers are chosen (method = \"similarity\")",
                        ))
                    }
                }
                let calibration = calibration.clone().ok_or_else(|| {
                    issue(
                        format!("{K}.calibration"),
                        "missing: the text (a file or a folder of text files) the teacher is measured on",
                    )
                })?;
                let strategy = match &self.strategy {
                    Some(s) => Strategy::parse(s).map_err(|m| issue(format!("{K}.strategy"), m))?,
                    None => prune::DEFAULT_STRATEGY,
                };
                StudentInit::Similarity {
                    options: PruneOptions {
                        keep,
                        strategy,
                        keep_ends,
                    },
                    calibration,
                }
            }
            (None, None) if staged => {
                if let Some((key, _)) = measuring[..2].iter().find(|(_, given)| *given) {
                    return Err(issue(
                        format!("{K}.{key}"),
                        "goes with 'keep' (layers chosen by measurement); without 'layers' or 'keep' the stages start from the whole teacher",
                    ));
                }
                StudentInit::Teacher
            }
            _ => {
                return Err(issue(
                    K,
                    if staged {
                        "give at most one of 'layers' (a list) or 'keep' (a count, with method); with neither, the stages start from the whole teacher"
                    } else {
                        "give exactly one of 'layers' (a list) or 'keep' (a count, with method and calibration)"
                    },
                ))
            }
        };
        Ok(Resolved {
            init,
            calibration,
            keep_ends,
        })
    }
}

impl StudentFile {
    pub fn resolve(&self, paths: &Paths) -> Checked<StudentConfig> {
        let staged = self.stage.is_some();
        let resolved = match (&self.path, &self.from_teacher) {
            (Some(p), None) if !staged => Resolved {
                init: StudentInit::Path(paths.resolve(p)),
                calibration: None,
                keep_ends: prune::DEFAULT_KEEP_ENDS,
            },
            (Some(_), None) => {
                return Err(issue(
                    "student.stage",
                    "a run in stages starts from the teacher's layers: give 'from_teacher' instead of 'path'",
                ))
            }
            (None, Some(ft)) => ft.resolve(paths, staged)?,
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
        let stages = match &self.stage {
            None => None,
            Some(files) => {
                if files.is_empty() {
                    return Err(issue(
                        "student.stage",
                        "at least one [[student.stage]] is needed (or none at all)",
                    ));
                }
                let stages = files
                    .iter()
                    .enumerate()
                    .map(|(i, f)| f.resolve(i))
                    .collect::<Checked<Vec<Stage>>>()?;
                let calibration = resolved.calibration.clone().ok_or_else(|| {
                    issue(
                        "student.from_teacher.calibration",
                        "missing: [[student.stage]] measures the student on calibration text (a file or a folder of text files)",
                    )
                })?;
                let stages = Stages {
                    stages,
                    calibration,
                    keep_ends: resolved.keep_ends,
                };
                // the layer counts, where the start is known before the teacher is read
                let start = match &resolved.init {
                    StudentInit::FromTeacher { layers } => Some(layers.len()),
                    StudentInit::Similarity { options, .. } => Some(options.keep),
                    _ => None,
                };
                if let Some(start) = start {
                    stages
                        .counts(start)
                        .map_err(|(_, key, why)| issue(key, why))?;
                }
                Some(stages)
            }
        };
        Ok(StudentConfig {
            init: resolved.init,
            dtype,
            stages,
        })
    }
}

/// Choose `options.keep` of the teacher's layers by measuring it on the calibration text (read with
/// its tokenizer): the choice, with every round's candidates and scores.
pub fn choose_layers(
    teacher: &LoadedModel,
    options: &PruneOptions,
    calibration: &Calibration,
) -> Result<Pruning> {
    let tok = teacher.tokenizer.as_ref().ok_or_else(|| {
        Error::format(
            &teacher.source,
            "the teacher has no tokenizer to read the calibration text with",
        )
    })?;
    let context = teacher.model.config.max_position_embeddings;
    if calibration.seq_len > context {
        return Err(Error::Invalid(format!(
            "calibration windows of {} tokens exceed the teacher's context of {context}",
            calibration.seq_len
        )));
    }
    let windows = calibration.windows(tok, model::eos_id(teacher))?;
    prune::prune(&teacher.model, &windows, options)
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
