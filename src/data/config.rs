//! `[data]`: where the training and validation text is, how it is read and cut.
use crate::config::{issue, Checked, Paths};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    /// a file, or a folder whose files (sorted by name) are all read
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    /// "text" or "jsonl"; default from the file extension (.jsonl → jsonl)
    pub format: Option<String>,
    pub seq_len: Option<usize>,
    pub packing: Option<bool>,
    pub validation_fraction: Option<f64>,
    /// stop reading training data after this many tokens
    pub max_train_tokens: Option<usize>,
    pub max_validation_sequences: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    Text,
    Jsonl,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub format: DataFormat,
    pub seq_len: usize,
    pub packing: bool,
    pub validation_fraction: f64,
    pub max_train_tokens: Option<usize>,
    pub max_validation_sequences: Option<usize>,
}

/// Longest sequence the run file may ask for (a bound far above any model's context, so that the
/// sizes derived from it cannot overflow).
const MAX_SEQ_LEN: usize = 1 << 24;

impl DataFile {
    pub fn resolve(&self, paths: &Paths) -> Checked<DataConfig> {
        let format = match self.format.as_deref() {
            Some("text") => DataFormat::Text,
            Some("jsonl") => DataFormat::Jsonl,
            Some(other) => {
                return Err(issue(
                    "data.format",
                    format!("'{other}' is not one of text, jsonl"),
                ))
            }
            None if self.train.extension().is_some_and(|e| e == "jsonl") => DataFormat::Jsonl,
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
            train: paths.resolve(&self.train),
            validation: self.validation.as_deref().map(|p| paths.resolve(p)),
            format,
            seq_len,
            packing: self.packing.unwrap_or(true),
            validation_fraction,
            max_train_tokens: self.max_train_tokens,
            max_validation_sequences: self.max_validation_sequences,
        })
    }
}
