//! Writing a teacher store: sequences are gathered into shards; each shard is written atomically
//! (temporary file, fsync, rename) and only then entered in the header (written atomically too).
//! A kill at any point leaves a store whose header lists complete shards only: a shard file not in
//! the header is an orphan that the next shard of that number replaces. So a resumed capture
//! neither repeats nor misses a position.
use super::header::{key_hex, Capture, Header, Identity, ShardEntry, FORMAT, VERSION};
use super::select::Selection;
use super::shard::{self, SeqRecord};
use crate::fingerprint::Fnv64;
use crate::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub struct StoreWriter {
    dir: PathBuf,
    pub header: Header,
    held: HashSet<u64>,
    pending: Vec<SeqRecord>,
    shard_sequences: usize,
    wide_ids: bool,
    /// test hook: stop the process (SIGKILL) after writing this shard's file, before the header
    #[cfg(feature = "fault-injection")]
    die_after_shard_file: Option<usize>,
}

/// How a capture relates to the store it writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// a new store, or the same capture continued
    Capture,
    /// add this data to a store that holds other data
    Append,
}

impl StoreWriter {
    /// Create the store in `dir`, or open it to continue (`Capture`, same data) or to add data
    /// (`Append`). Everything that decides the signal must match an existing store's, by name.
    /// `teacher_source` = (where the teacher was read from, its dtype).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        dir: &Path,
        identity: Identity,
        teacher_source: (String, String),
        vocab_rows: usize,
        selection: Selection,
        capture: Capture,
        mode: Mode,
        shard_sequences: usize,
    ) -> Result<StoreWriter> {
        let header = if dir.join("store.json").exists() {
            let mut h = Header::read(dir)?;
            let at = dir.join("store.json");
            let differing = h.identity.differences(&identity);
            if !differing.is_empty() {
                return Err(Error::format(
                    &at,
                    format!(
                        "the store belongs to another set-up: {}; capture into a new folder",
                        differing.join("; ")
                    ),
                ));
            }
            if h.selection != selection {
                return Err(Error::format(
                    &at,
                    format!(
                        "the store was captured with {}, this capture asks for {}; capture into a new folder",
                        describe(&h.selection),
                        describe(&selection)
                    ),
                ));
            }
            let known = h
                .captures
                .iter()
                .any(|c| c.fingerprint == capture.fingerprint);
            match mode {
                Mode::Capture if !known => {
                    return Err(Error::format(
                        &at,
                        format!(
                            "data: the store holds a capture of other data (fingerprint {}, this run's {}); pass --append to add this data's sequences",
                            h.captures.last().map_or("none", |c| c.fingerprint.as_str()),
                            capture.fingerprint
                        ),
                    ))
                }
                Mode::Append if !known => h.captures.push(Capture {
                    appended: true,
                    ..capture
                }),
                _ => {}
            }
            h
        } else {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            Header {
                format: FORMAT.into(),
                version: VERSION,
                identity,
                teacher_source: teacher_source.0,
                teacher_dtype: teacher_source.1,
                vocab_rows,
                selection,
                captures: vec![capture],
                shards: vec![],
            }
        };
        let held = header
            .shards
            .iter()
            .flat_map(|s| s.keys.iter())
            .filter_map(|k| super::header::parse_key(k))
            .collect();
        header.write(dir)?;
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            wide_ids: header.vocab_rows > u16::MAX as usize + 1,
            header,
            held,
            pending: Vec::new(),
            shard_sequences: shard_sequences.max(1),
            #[cfg(feature = "fault-injection")]
            die_after_shard_file: std::env::var("DISTILL_FAULT_CAPTURE_DIE_AFTER_SHARD")
                .ok()
                .and_then(|v| v.parse().ok()),
        })
    }

    /// Whether the store holds (or is about to write) `key`.
    pub fn holds(&self, key: u64) -> bool {
        self.held.contains(&key)
    }

    /// Add a sequence's capture; a full shard is written.
    pub fn add(&mut self, record: SeqRecord) -> Result<()> {
        if !self.held.insert(record.key) {
            return Ok(());
        }
        self.pending.push(record);
        if self.pending.len() >= self.shard_sequences {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the pending sequences as a shard (none: nothing happens).
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.header.shards.len();
        let file = format!("shard-{n:05}.safetensors.zst");
        let bytes = shard::encode(
            &self.pending,
            self.header.selection.quantisation,
            self.wide_ids,
        )?;
        crate::io::write_atomic(&self.dir.join(&file), &bytes)?;
        #[cfg(feature = "fault-injection")]
        if self.die_after_shard_file == Some(n) {
            // SAFETY: sends SIGKILL to this process; nothing runs after it
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        let positions = self.pending.iter().map(|r| r.kept.len()).sum();
        let entries = self
            .pending
            .iter()
            .flat_map(|r| r.kept.iter().map(|p| p.ids.len()))
            .sum();
        self.header.shards.push(ShardEntry {
            file,
            sequences: self.pending.len(),
            positions,
            entries,
            bytes: bytes.len() as u64,
            checksum: Fnv64::default().words(&bytes).hex(),
            keys: self.pending.iter().map(|r| key_hex(r.key)).collect(),
        });
        self.header.write(&self.dir)?;
        self.pending.clear();
        Ok(())
    }

    /// Write what is pending; the store is complete for what it was given.
    pub fn finish(mut self) -> Result<Header> {
        self.flush()?;
        Ok(self.header)
    }
}

pub fn describe(s: &Selection) -> String {
    format!(
        "coverage {}, max_k {}, tail_samples {}, temperature {}, quantisation {}",
        s.coverage,
        s.max_k,
        s.tail_samples,
        s.temperature,
        s.quantisation.name()
    )
}
