//! Reading a teacher store: the header, an index from sequence key to (shard, row), and shards
//! memory-mapped, checked against their checksum and decoded whole when first asked for (the
//! `CACHED_SHARDS` most recently used kept). A sequence is read by its key (`get`) or by its number
//! in the store (`get_index`).
use super::header::{parse_key, Header};
use super::shard::{self, Shard};
use crate::fingerprint::Fnv64;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Decoded shards kept in memory (a batch's rows come from a few shards at most).
const CACHED_SHARDS: usize = 16;

pub struct Store {
    pub dir: PathBuf,
    pub header: Header,
    index: HashMap<u64, (usize, usize)>,
    cache: Mutex<Vec<(usize, Arc<Shard>)>>,
}

/// One sequence's captured positions, borrowed from its decoded shard.
pub struct Record {
    pub shard: Arc<Shard>,
    pub row: usize,
}

/// Hand memory freed by the process back to the operating system (glibc keeps freed heap blocks,
/// e.g. a dropped teacher's layer weights, resident otherwise); a no-op elsewhere.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Store {
    /// Open the store in `dir`: its header and the index of its keys. Shards are read on demand.
    pub fn open(dir: &Path) -> Result<Store> {
        if !dir.join("store.json").exists() {
            return Err(Error::format(
                dir,
                "not a teacher store (no store.json); `distill capture` makes one",
            ));
        }
        let header = Header::read(dir)?;
        let mut index = HashMap::new();
        for (s, e) in header.shards.iter().enumerate() {
            if e.keys.len() != e.sequences {
                return Err(Error::format(
                    dir.join("store.json"),
                    format!(
                        "shard {}: {} keys for {} sequences",
                        e.file,
                        e.keys.len(),
                        e.sequences
                    ),
                ));
            }
            for (row, k) in e.keys.iter().enumerate() {
                let key = parse_key(k).ok_or_else(|| {
                    Error::format(
                        dir.join("store.json"),
                        format!("shard {}: bad key '{k}'", e.file),
                    )
                })?;
                index.entry(key).or_insert((s, row));
            }
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            header,
            index,
            cache: Mutex::new(Vec::new()),
        })
    }

    pub fn contains(&self, key: u64) -> bool {
        self.index.contains_key(&key)
    }

    /// Distinct sequences held.
    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Every key held, in shard order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.header
            .shards
            .iter()
            .flat_map(|s| s.keys.iter().filter_map(|k| parse_key(k)))
    }

    /// The record of the `i`-th sequence in the store's order (shards in order, rows in order: the
    /// capture's order), or None past the end.
    pub fn get_index(&self, i: usize) -> Result<Option<Record>> {
        let mut first = 0;
        for (s, e) in self.header.shards.iter().enumerate() {
            if i < first + e.sequences {
                return Ok(Some(Record {
                    shard: self.shard(s)?,
                    row: i - first,
                }));
            }
            first += e.sequences;
        }
        Ok(None)
    }

    /// The record of `key`, or None when the store does not hold it.
    pub fn get(&self, key: u64) -> Result<Option<Record>> {
        let Some(&(s, row)) = self.index.get(&key) else {
            return Ok(None);
        };
        Ok(Some(Record {
            shard: self.shard(s)?,
            row,
        }))
    }

    /// Shard `s`, decoded (checksum first).
    pub fn shard(&self, s: usize) -> Result<Arc<Shard>> {
        let mut cache = self.cache.lock().expect("store cache lock");
        if let Some(i) = cache.iter().position(|(n, _)| *n == s) {
            let hit = cache.remove(i);
            let shard = hit.1.clone();
            cache.push(hit);
            return Ok(shard);
        }
        let entry = &self.header.shards[s];
        let path = self.dir.join(&entry.file);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: a read-only map; the store's shards are never rewritten in place (only renamed
        // over, which leaves this mapping's pages intact)
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let sum = Fnv64::default().words(&map).hex();
        if map.len() as u64 != entry.bytes || sum != entry.checksum {
            return Err(Error::format(
                &path,
                format!(
                    "damaged shard: {} bytes with checksum {sum}, the header records {} bytes with {} (capture it again: delete the store or this shard's entry)",
                    map.len(),
                    entry.bytes,
                    entry.checksum
                ),
            ));
        }
        let shard = Arc::new(shard::decode(
            &map,
            self.header.selection.quantisation,
            &path,
        )?);
        if shard.len() != entry.sequences {
            return Err(Error::format(
                &path,
                format!(
                    "{} sequences, the header records {}",
                    shard.len(),
                    entry.sequences
                ),
            ));
        }
        if cache.len() >= CACHED_SHARDS {
            cache.remove(0);
        }
        cache.push((s, shard.clone()));
        Ok(shard)
    }
}
