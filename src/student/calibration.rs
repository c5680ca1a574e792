//! Calibration text, on which a teacher is measured to choose a student's layers: a text file, or a
//! folder of them (regular files, sorted by name), read as a run reads text data (each file one
//! document, EOS appended), tokenised with the teacher's tokenizer, concatenated, and cut into
//! `sequences` windows of `seq_len` tokens; the last window is shorter when the text runs out.
//! Only as many files are read as the windows need.
use crate::data;
use crate::model::Tokenizer;
use crate::{Error, Result};
use std::path::PathBuf;

/// 16 windows of 256 tokens: 4,096 tokens, a few seconds of a 135M teacher's forward on a CPU.
pub const DEFAULT_SEQUENCES: usize = 16;
pub const DEFAULT_SEQ_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub path: PathBuf,
    pub sequences: usize,
    pub seq_len: usize,
}

impl Calibration {
    pub fn new(path: PathBuf) -> Self {
        Calibration {
            path,
            sequences: DEFAULT_SEQUENCES,
            seq_len: DEFAULT_SEQ_LEN,
        }
    }

    /// The token windows: at most `sequences` of `seq_len` ids (the last may be shorter), at
    /// least one.
    pub fn windows(&self, tok: &Tokenizer, eos: Option<u32>) -> Result<Vec<Vec<u32>>> {
        if self.sequences == 0 || self.seq_len == 0 {
            return Err(Error::Invalid(format!(
                "calibration: {} sequences of {} tokens: both must be at least 1",
                self.sequences, self.seq_len
            )));
        }
        let want = self.sequences.saturating_mul(self.seq_len);
        let mut ids: Vec<u32> = Vec::new();
        for f in data::files_of(&self.path)? {
            for e in data::text::read(&f, tok, eos)? {
                ids.extend_from_slice(&e.ids);
            }
            if ids.len() >= want {
                break;
            }
        }
        ids.truncate(want);
        if ids.is_empty() {
            return Err(Error::format(
                &self.path,
                "calibration: no text to measure the teacher on",
            ));
        }
        Ok(ids.chunks(self.seq_len).map(<[u32]>::to_vec).collect())
    }
}
