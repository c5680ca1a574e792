//! `store.json`: the self-describing header of a teacher store. It says what the store belongs to
//! (the teacher, tokenizer, chat template, sequence length and packing), how it was captured (the
//! selection, the temperature, the quantisation), which data it holds (one fingerprint per capture,
//! each sequence's key) and its shards with a checksum each. Written atomically after every shard.
use super::select::Selection;
use crate::fingerprint::Fnv64;
use crate::model::Tokenizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FORMAT: &str = "distill-teacher-store";
pub const VERSION: u32 = 1;

/// What a store's signal depends on besides the data: each field is compared by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// FNV-1a of the teacher's files (config and weights) and the dtype it computed in
    pub teacher: String,
    /// FNV-1a of the tokenizer's `tokenizer.json`
    pub tokenizer: String,
    /// FNV-1a of the chat template, or "none"
    pub chat_template: String,
    pub seq_len: usize,
    pub packing: bool,
}

impl Identity {
    /// The fields of `self` (a store's) that differ from `now` (a run's), as "field (store X, run Y)".
    pub fn differences(&self, now: &Identity) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name} (store {a}, this run {b})"));
            }
        };
        cmp("teacher", self.teacher.clone(), now.teacher.clone());
        cmp("tokenizer", self.tokenizer.clone(), now.tokenizer.clone());
        cmp(
            "chat_template",
            self.chat_template.clone(),
            now.chat_template.clone(),
        );
        cmp("seq_len", self.seq_len.to_string(), now.seq_len.to_string());
        cmp("packing", self.packing.to_string(), now.packing.to_string());
        out
    }
}

/// The hash of a tokenizer's definition.
pub fn tokenizer_hash(tok: &Tokenizer) -> String {
    Fnv64::default().bytes(tok.json().as_bytes()).hex()
}

/// The hash of a tokenizer's chat template, or "none".
pub fn template_hash(tok: &Tokenizer) -> String {
    match &tok.chat_template {
        Some(t) => Fnv64::default().bytes(t.as_bytes()).hex(),
        None => "none".into(),
    }
}

/// The hash of a teacher's files: a .gguf file whole; a folder's config.json and its weight files
/// (*.safetensors, sorted by name); with the dtype it computes in.
pub fn teacher_hash(path: &Path, dtype: &str) -> Result<String> {
    let mut h = Fnv64::default();
    let mut files = Vec::new();
    if path.is_dir() {
        files.push(path.join("config.json"));
        let mut weights: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        weights.sort();
        files.extend(weights);
    } else {
        files.push(path.to_path_buf());
    }
    for f in files {
        let file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        // SAFETY: read-only map of a file the run only reads
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&f, e))?;
        h.words(&map);
    }
    h.bytes(dtype.as_bytes());
    Ok(h.hex())
}

/// One capture into the store: the data it was asked to hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    /// FNV-1a of the keys of the sequences it was asked for, in order
    pub fingerprint: String,
    pub sequences: usize,
    pub appended: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub sequences: usize,
    pub positions: usize,
    pub entries: usize,
    /// bytes of the compressed file
    pub bytes: u64,
    /// FNV-1a of the compressed file
    pub checksum: String,
    /// each sequence's key, hex, in shard order
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub identity: Identity,
    /// where the teacher was read from (informational; `identity.teacher` is what is compared)
    pub teacher_source: String,
    /// the dtype the teacher computed in
    pub teacher_dtype: String,
    /// rows of the teacher's output (the vocabulary it scores)
    pub vocab_rows: usize,
    pub selection: Selection,
    pub captures: Vec<Capture>,
    pub shards: Vec<ShardEntry>,
}

impl Header {
    pub fn read(dir: &Path) -> Result<Header> {
        let path = dir.join("store.json");
        let text = crate::io::read_to_string(&path)?;
        let h: Header = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not a store header: {e}")))?;
        if h.format != FORMAT {
            return Err(Error::format(
                &path,
                format!("format '{}' is not '{FORMAT}'", h.format),
            ));
        }
        if h.version != VERSION {
            return Err(Error::format(
                &path,
                format!(
                    "store format version {} (this distill reads version {VERSION})",
                    h.version
                ),
            ));
        }
        Ok(h)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Invalid(format!("store header: {e}")))?;
        crate::io::write_atomic(&dir.join("store.json"), text.as_bytes())
    }

    pub fn sequences(&self) -> usize {
        self.shards.iter().map(|s| s.sequences).sum()
    }
    pub fn positions(&self) -> usize {
        self.shards.iter().map(|s| s.positions).sum()
    }
    pub fn entries(&self) -> usize {
        self.shards.iter().map(|s| s.entries).sum()
    }
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

/// A key as the header writes it.
pub fn key_hex(k: u64) -> String {
    format!("{k:016x}")
}

pub fn parse_key(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok().filter(|_| s.len() == 16)
}
