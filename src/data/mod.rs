//! Training data: text files and JSONL records turned into fixed-length token sequences with labels.
//! An `Example` is a token stream with a per-token flag "this token is a prediction target"; a
//! `Sequence` is `seq_len` ids plus `labels[t]` = the next token when it is a target, else
//! `IGNORE_INDEX`, and per-token weights; a `Batch` is the tensors of some sequences.
pub mod batch;
pub mod config;
pub mod ddk;
pub mod jsonl;
pub mod mixture;
pub mod packing;
pub mod prompts;
pub mod sampler;
pub mod text;

use crate::model::Tokenizer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

pub use batch::Batch;
pub use config::{DataConfig, DataFile, DataFormat, SourceConfig};
pub use packing::{pack, pad_each, Sequence, Span};
pub use sampler::Sampler;

/// The label of a position whose next token is not predicted (PyTorch's `ignore_index`): the one
/// definition, used by the data, the losses and evaluation.
pub const IGNORE_INDEX: i64 = -100;

/// One document or conversation: ids, which of them are targets, and the weight of its targets
/// (1 unless a JSONL record gives `"weight"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
    pub weight: f32,
}

impl Example {
    pub fn push(&mut self, ids: &[u32], target: bool) {
        self.ids.extend_from_slice(ids);
        self.target.extend(std::iter::repeat_n(target, ids.len()));
    }
}

pub struct Dataset {
    pub train: Vec<Sequence>,
    pub validation: Vec<Sequence>,
    pub train_tokens: usize,
    /// each training example's checkable answer (a JSONL record's "answer"), by the example index
    /// that `Sequence::spans` give
    pub answers: Vec<Option<String>>,
    /// the same for the validation sequences' examples (the training list when they are held out
    /// of it)
    pub validation_answers: Vec<Option<String>>,
    /// `[[data.source]]`: each source's name, weight and its sequences in `train` and
    /// `validation` (empty for the single-source form)
    pub sources: Vec<SourceData>,
}

/// One source of a run with several: where its sequences lie in the dataset's lists.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceData {
    pub name: String,
    pub weight: f64,
    pub train: std::ops::Range<usize>,
    pub validation: std::ops::Range<usize>,
}

/// The files under `path` (itself if a file; a folder's regular files sorted by name).
pub fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    match crate::io::metadata(path)? {
        Some(m) if m.is_file() => return Ok(vec![path.to_path_buf()]),
        Some(m) if m.is_dir() => {}
        Some(_) => return Err(Error::format(path, "not a regular file or folder")),
        None => return Err(Error::format(path, "no such data file or folder")),
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn read_examples(
    path: &Path,
    format: DataFormat,
    tok: &Tokenizer,
    eos: Option<u32>,
    max_tokens: Option<usize>,
) -> Result<(Vec<Example>, Vec<Option<String>>)> {
    let mut out = Vec::new();
    let mut answers = Vec::new();
    let mut tokens = 0usize;
    for f in files_of(path)? {
        let examples = match format {
            DataFormat::Text => text::read(&f, tok, eos)?
                .into_iter()
                .map(|e| (e, None))
                .collect(),
            DataFormat::Jsonl => jsonl::read_with_answers(&f, tok, eos)?,
        };
        for (mut e, a) in examples {
            answers.push(a);
            // the limit counts tokens: the example that crosses it is cut there
            if let Some(m) = max_tokens {
                let left = m - tokens;
                if e.ids.len() >= left {
                    e.ids.truncate(left);
                    e.target.truncate(left);
                    out.push(e);
                    return Ok((out, answers));
                }
            }
            tokens += e.ids.len();
            out.push(e);
        }
    }
    Ok((out, answers))
}

fn to_sequences(examples: &[Example], cfg: &DataConfig, pad: u32) -> Vec<Sequence> {
    if cfg.packing {
        pack(examples, cfg.seq_len, pad)
    } else {
        pad_each(examples, cfg.seq_len, pad)
    }
}

/// Read, tokenise and cut the training (and validation) data. Refuses data with no target token.
/// With `[[data.source]]`, each source is read and cut alone (its own validation, or its own
/// held-out fraction), its sequences tagged with `domain = Some(index)` and appended in order;
/// example indices (`Span::example`) are renumbered into the joined answer lists.
pub fn load(cfg: &DataConfig, tok: &Tokenizer, eos: Option<u32>) -> Result<Dataset> {
    if cfg.sources.is_empty() {
        return load_one(cfg, tok, eos);
    }
    let mut all = Dataset {
        train: vec![],
        validation: vec![],
        train_tokens: 0,
        answers: vec![],
        validation_answers: vec![],
        sources: vec![],
    };
    for (i, src) in cfg.sources.iter().enumerate() {
        let one = DataConfig {
            train: src.train.clone(),
            validation: src.validation.clone(),
            sources: vec![],
            ddk: None,
            ..cfg.clone()
        };
        let d = load_one(&one, tok, eos)?;
        if d.validation.is_empty() {
            return Err(Error::format(
                &src.train,
                format!(
                    "source '{}': too little data to hold out a validation sequence; give its validation",
                    src.name
                ),
            ));
        }
        let tag = |seqs: Vec<Sequence>, first_example: usize| {
            seqs.into_iter().map(move |mut s| {
                s.domain = Some(i as u32);
                for sp in &mut s.spans {
                    sp.example += first_example;
                }
                s
            })
        };
        let (t0, v0) = (all.train.len(), all.validation.len());
        let (a0, va0) = (all.answers.len(), all.validation_answers.len());
        all.train.extend(tag(d.train, a0));
        all.validation.extend(tag(d.validation, va0));
        all.answers.extend(d.answers);
        all.validation_answers.extend(d.validation_answers);
        all.train_tokens += d.train_tokens;
        all.sources.push(SourceData {
            name: src.name.clone(),
            weight: src.weight,
            train: t0..all.train.len(),
            validation: v0..all.validation.len(),
        });
    }
    Ok(all)
}

fn load_one(cfg: &DataConfig, tok: &Tokenizer, eos: Option<u32>) -> Result<Dataset> {
    let pad = eos.unwrap_or(0);
    let (train_ex, answers) =
        read_examples(&cfg.train, cfg.format, tok, eos, cfg.max_train_tokens)?;
    let mut train = to_sequences(&train_ex, cfg, pad);
    let targets = |s: &[Sequence]| s.iter().map(Sequence::counted).sum::<usize>();
    if targets(&train) == 0 {
        return Err(Error::format(
            &cfg.train,
            "empty data: no token to train on",
        ));
    }
    let mut validation_answers = answers.clone();
    let mut validation = match &cfg.validation {
        Some(v) => {
            let (ex, a) = read_examples(v, cfg.format, tok, eos, None)?;
            validation_answers = a;
            let seqs = to_sequences(&ex, cfg, pad);
            if targets(&seqs) == 0 {
                return Err(Error::format(
                    v,
                    "empty validation data: no token to evaluate",
                ));
            }
            seqs
        }
        None => {
            // hold out the last fraction of the training sequences (at least one when possible)
            let n = train.len();
            let k = ((n as f64 * cfg.validation_fraction).ceil() as usize).min(n.saturating_sub(1));
            train.split_off(n - k)
        }
    };
    if let Some(m) = cfg.max_validation_sequences {
        validation.truncate(m);
    }
    let train_tokens = targets(&train);
    Ok(Dataset {
        train,
        validation,
        train_tokens,
        answers,
        validation_answers,
        sources: vec![],
    })
}
