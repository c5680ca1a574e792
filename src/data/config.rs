//! `[data]`: where the training and validation text is, how it is read and cut. One source
//! (`train`, `validation`) or several (`[[data.source]] name, train, validation, weight`: batches
//! drawn by weight, data/mixture.rs), and DDK's re-weighting of them (`[data.ddk]`, data/ddk.rs).
use crate::config::{issue, Checked, Paths};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    /// a file, or a folder whose files (sorted by name) are all read
    pub train: Option<PathBuf>,
    pub validation: Option<PathBuf>,
    /// several sources instead of `train`/`validation`
    pub source: Option<Vec<SourceFile>>,
    /// DDK: the sources' weights re-set from the student–teacher gap (data/ddk.rs)
    pub ddk: Option<super::ddk::DdkFile>,
    /// "text" or "jsonl"; default from the file extension (.jsonl → jsonl)
    pub format: Option<String>,
    pub seq_len: Option<usize>,
    pub packing: Option<bool>,
    pub validation_fraction: Option<f64>,
    /// stop reading training data after this many tokens
    pub max_train_tokens: Option<usize>,
    pub max_validation_sequences: Option<usize>,
}

/// `[[data.source]]`: one named source of training (and validation) data and its sampling weight.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub name: String,
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    /// relative sampling weight (> 0); 1 when left out
    pub weight: Option<f64>,
    /// the `[[teacher]]` name that teaches this source (`[teachers] combine = "per_source"`)
    pub teacher: Option<String>,
}

/// A source with its paths resolved.
#[derive(Clone, PartialEq)]
pub struct SourceConfig {
    pub name: String,
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub weight: f64,
    pub teacher: Option<String>,
}

/// As derived, with `teacher` only when given (a checkpoint's fingerprint prints the sources: older
/// ones still match).
impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("SourceConfig");
        d.field("name", &self.name)
            .field("train", &self.train)
            .field("validation", &self.validation)
            .field("weight", &self.weight);
        if let Some(t) = &self.teacher {
            d.field("teacher", t);
        }
        d.finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    Text,
    Jsonl,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// the training data (with `[[data.source]]`: the first source's, for messages)
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub format: DataFormat,
    pub seq_len: usize,
    pub packing: bool,
    pub validation_fraction: f64,
    pub max_train_tokens: Option<usize>,
    pub max_validation_sequences: Option<usize>,
    /// `[[data.source]]`: empty for the single-source form
    pub sources: Vec<SourceConfig>,
    pub ddk: Option<super::ddk::Ddk>,
}

/// Longest sequence the run file may ask for (a bound far above any model's context, so that the
/// sizes derived from it cannot overflow).
const MAX_SEQ_LEN: usize = 1 << 24;

impl DataFile {
    pub fn resolve(&self, paths: &Paths) -> Checked<DataConfig> {
        let sources = self.sources(paths)?;
        let train = match (&self.train, sources.first()) {
            (Some(t), _) => paths.resolve(t),
            (None, Some(s)) => s.train.clone(),
            (None, None) => {
                return Err(issue(
                    "data.train",
                    "missing: give data.train or one or more [[data.source]]",
                ))
            }
        };
        let ddk = match &self.ddk {
            Some(_) if sources.len() < 2 => {
                return Err(issue(
                    "data.ddk",
                    "re-weights sources: it needs two or more [[data.source]]",
                ));
            }
            Some(d) => Some(d.resolve()?),
            None => None,
        };
        let format = match self.format.as_deref() {
            Some("text") => DataFormat::Text,
            Some("jsonl") => DataFormat::Jsonl,
            Some(other) => {
                return Err(issue(
                    "data.format",
                    format!("'{other}' is not one of text, jsonl"),
                ))
            }
            None if train.extension().is_some_and(|e| e == "jsonl") => DataFormat::Jsonl,
            None => DataFormat::Text,
        };
        let seq_len = self.seq_len.unwrap_or(256);
        if !(2..=MAX_SEQ_LEN).contains(&seq_len) {
            return Err(issue(
                "data.seq_len",
                format!("must be in [2, {MAX_SEQ_LEN}], got {seq_len}"),
            ));
        }
        let validation_fraction = self.validation_fraction.unwrap_or(0.05);
        if !(0.0..1.0).contains(&validation_fraction) {
            return Err(issue("data.validation_fraction", "must be in [0, 1)"));
        }
        if self.max_train_tokens == Some(0) {
            return Err(issue(
                "data.max_train_tokens",
                "must be positive (leave it out to read all the data)",
            ));
        }
        if self.max_validation_sequences == Some(0) {
            return Err(issue(
                "data.max_validation_sequences",
                "must be positive (leave it out to keep every validation sequence)",
            ));
        }
        Ok(DataConfig {
            train,
            validation: self.validation.as_deref().map(|p| paths.resolve(p)),
            format,
            seq_len,
            packing: self.packing.unwrap_or(true),
            validation_fraction,
            max_train_tokens: self.max_train_tokens,
            max_validation_sequences: self.max_validation_sequences,
            sources,
            ddk,
        })
    }

    /// `[[data.source]]` checked: not with `train`/`validation`, names unique and non-empty,
    /// weights finite and > 0.
    fn sources(&self, paths: &Paths) -> Checked<Vec<SourceConfig>> {
        let Some(list) = &self.source else {
            return Ok(vec![]);
        };
        if self.train.is_some() || self.validation.is_some() {
            let key = if self.train.is_some() {
                "data.train"
            } else {
                "data.validation"
            };
            return Err(issue(
                key,
                "give either data.train (one source) or [[data.source]] (several), not both",
            ));
        }
        if list.is_empty() {
            return Err(issue("data.source", "needs at least one source"));
        }
        let mut out: Vec<SourceConfig> = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            if s.name.trim().is_empty() {
                return Err(issue(format!("data.source.{i}.name"), "must not be empty"));
            }
            if out.iter().any(|o| o.name == s.name) {
                return Err(issue(
                    format!("data.source.{i}.name"),
                    format!("'{}' names two sources; each needs its own name", s.name),
                ));
            }
            let weight = s.weight.unwrap_or(1.0);
            if !(weight.is_finite() && weight > 0.0) {
                return Err(issue(
                    format!("data.source.{i}.weight"),
                    format!("must be a finite number > 0, got {weight}"),
                ));
            }
            out.push(SourceConfig {
                name: s.name.clone(),
                train: paths.resolve(&s.train),
                validation: s.validation.as_deref().map(|p| paths.resolve(p)),
                weight,
                teacher: s.teacher.clone(),
            });
        }
        Ok(out)
    }
}
