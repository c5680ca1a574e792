//! Writing a teacher store: sequences are gathered into shards; each shard is written atomically
//! (temporary file, fsync, rename) and only then entered in the header (written atomically too).
//! A kill at any point leaves a store whose header lists complete shards only: a shard file not in
//! the header is an orphan that the next shard of that number replaces. So a resumed capture
//! neither repeats nor misses a position.
//!
//! Several processes (a capture over WORLD_SIZE ranks, parallel.rs) write one store without
//! sharing the header: rank r's writer (`StoreWriter::part`) names its shards
//! `shard-r{r}-NNNNN.safetensors.zst` (NNNNN after that rank's shards the header already lists, so
//! names never collide across runs or world sizes) and, after each shard file, lists its shards so
//! far in `part-{r}.json` (atomically) instead of store.json. Rank 0 merges the part files into
//! the header at the end; any writer that opens the store (`open`) first adopts the part files a
//! killed capture left, so their complete shards count as held.
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
    /// several processes: this rank's shards go to its part file, not the header
    part: Option<Part>,
    /// test hook: stop the process (SIGKILL) after writing this shard's file, before the header
    /// (with a part writer: this rank's shard of that number, before its part file)
    #[cfg(feature = "fault-injection")]
    die_after_shard_file: Option<usize>,
}

/// A rank's shards while several processes capture.
struct Part {
    rank: usize,
    /// the number of its next shard file
    next: usize,
    entries: Vec<ShardEntry>,
}

/// Where rank `rank` lists its shards during a capture over several processes.
pub fn part_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("part-{rank}.json"))
}

/// The part files in `dir`, by name.
fn part_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("part-"))
                .and_then(|n| n.strip_suffix(".json"))
                .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The shards listed in part files (a capture over several processes, finished or killed) entered
/// in `header`, each once (by file name); each must be there with its size. Returns the part
/// files, to delete once the header is written.
fn adopt_parts(dir: &Path, header: &mut Header) -> Result<Vec<PathBuf>> {
    let parts = part_files(dir)?;
    for part in &parts {
        let text = crate::io::read_to_string(part)?;
        let entries: Vec<ShardEntry> = serde_json::from_str(&text)
            .map_err(|e| Error::format(part, format!("not a list of shards: {e}")))?;
        for e in entries {
            if header.shards.iter().any(|s| s.file == e.file) {
                continue;
            }
            let at = dir.join(&e.file);
            let len = std::fs::metadata(&at).map_err(|x| Error::io(&at, x))?.len();
            if len != e.bytes || e.keys.len() != e.sequences {
                return Err(Error::format(
                    part,
                    format!(
                        "{} has {len} bytes, the part file lists {} (and {} keys for {} sequences)",
                        e.file,
                        e.bytes,
                        e.keys.len(),
                        e.sequences
                    ),
                ));
            }
            header.shards.push(e);
        }
    }
    Ok(parts)
}

fn remove_all(files: &[PathBuf]) -> Result<()> {
    for f in files {
        std::fs::remove_file(f).map_err(|e| Error::io(f, e))?;
    }
    Ok(())
}

/// The end of a capture over several processes (rank 0, once every rank has written its last
/// shard): the part files merged into the header, written atomically, then deleted.
pub fn merge_parts(dir: &Path) -> Result<Header> {
    let mut header = Header::read(dir)?;
    let parts = adopt_parts(dir, &mut header)?;
    header.write(dir)?;
    remove_all(&parts)?;
    Ok(header)
}

/// The number after the largest of rank `rank`'s shard files that `header` lists (0 for none).
fn next_part_number(header: &Header, rank: usize) -> usize {
    let prefix = format!("shard-r{rank}-");
    header
        .shards
        .iter()
        .filter_map(|s| {
            s.file
                .strip_prefix(&prefix)?
                .strip_suffix(".safetensors.zst")?
                .parse::<usize>()
                .ok()
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
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
        let mut header = if dir.join("store.json").exists() {
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
        // the complete shards of a capture over several processes that was killed
        let parts = adopt_parts(dir, &mut header)?;
        header.write(dir)?;
        remove_all(&parts)?;
        Ok(Self::new(dir, header, shard_sequences, None))
    }

    /// Rank `rank`'s writer in a capture over several processes, once rank 0 has opened the store
    /// (`open`): it holds what the header lists, and lists its own shards in its part file.
    pub fn part(dir: &Path, rank: usize, shard_sequences: usize) -> Result<StoreWriter> {
        let header = Header::read(dir)?;
        let part = Part {
            rank,
            next: next_part_number(&header, rank),
            entries: Vec::new(),
        };
        Ok(Self::new(dir, header, shard_sequences, Some(part)))
    }

    fn new(dir: &Path, header: Header, shard_sequences: usize, part: Option<Part>) -> StoreWriter {
        let held = header
            .shards
            .iter()
            .flat_map(|s| s.keys.iter())
            .filter_map(|k| super::header::parse_key(k))
            .collect();
        StoreWriter {
            dir: dir.to_path_buf(),
            wide_ids: header.vocab_rows > u16::MAX as usize + 1,
            header,
            held,
            pending: Vec::new(),
            shard_sequences: shard_sequences.max(1),
            part,
            #[cfg(feature = "fault-injection")]
            die_after_shard_file: std::env::var("DISTILL_FAULT_CAPTURE_DIE_AFTER_SHARD")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
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
        // n: the hook's number (the shard's, or this rank's shard's)
        #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
        let (n, file) = match &self.part {
            None => {
                let n = self.header.shards.len();
                (n, format!("shard-{n:05}.safetensors.zst"))
            }
            Some(p) => (
                p.next,
                format!("shard-r{}-{:05}.safetensors.zst", p.rank, p.next),
            ),
        };
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
        let entry = ShardEntry {
            file,
            sequences: self.pending.len(),
            positions,
            entries,
            bytes: bytes.len() as u64,
            checksum: Fnv64::default().words(&bytes).hex(),
            keys: self.pending.iter().map(|r| key_hex(r.key)).collect(),
        };
        match &mut self.part {
            None => {
                self.header.shards.push(entry);
                self.header.write(&self.dir)?;
            }
            Some(p) => {
                p.entries.push(entry.clone());
                p.next += 1;
                self.header.shards.push(entry);
                let text = serde_json::to_string_pretty(&p.entries)
                    .map_err(|e| Error::Invalid(format!("part file: {e}")))?;
                crate::io::write_atomic(&part_path(&self.dir, p.rank), text.as_bytes())?;
            }
        }
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
