//! One shard of a teacher store: the captured positions of some sequences, as a safetensors file
//! compressed whole with zstd (`shard-NNNNN.safetensors.zst`). In Python:
//!   import zstandard, safetensors.numpy
//!   t = safetensors.numpy.load(zstandard.ZstdDecompressor().decompress(open(path, "rb").read()))
//! Tensors (S sequences, P positions, E kept tokens in all):
//!   keys       U64 [S]  each sequence's key (`Sequence::key`: a hash of its ids and labels)
//!   tokens     U16 or U32 [S·seq_len]  each sequence's ids (what the teacher saw: `store verify`
//!                       recomputes from them)
//!   positions  U32 [S]  its captured (target) positions, in order
//!   at         U32 [P]  each captured position's index in its sequence
//!   k          U16 [P]  kept tokens per position
//!   ids        U16 or U32 [E]   token ids (U16 when the vocabulary fits), descending probability
//!                               except the label, which may come last
//!   logprobs   U8 or F16 [E]    quantised log p_T (see select.rs)
//!   log_tail   F32 [P]  log of the mass of the tokens not kept (log Σ_{v not kept} p(v))
//!   log_z      F32 [P]  logsumexp(t/T) over the whole vocabulary
//! Metadata: format, quantisation.
//!
//! Why safetensors shards compressed with zstd, rather than Parquet or Arrow: a Python user opens a
//! shard with two small packages (`zstandard`, `safetensors`) and gets the tensors as they are
//! written (flat typed arrays with offsets, u8/f16 log-probabilities and u16 ids exactly, no nested
//! list columns to unpack); the Rust side needs no Arrow or Parquet dependency (safetensors is how
//! models are read already). The cost: one zstd frame per shard, so a shard is decoded whole.
//! Reading (reader.rs): the compressed file is memory-mapped and its checksum checked, then the
//! shard is decoded whole (zstd, then safetensors) into the flat arrays of `Shard` and kept in a
//! small cache of recently used shards; a sequence is found by its key (store.json lists each
//! shard's keys: key → shard, row) or by its number in the store (`Store::get_index`). The map
//! saves a copy of the compressed bytes, not the decode: each cache miss decodes a whole shard.
use super::select::{Kept, Quant};
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// One sequence's capture: its key, its ids, and the kept tokens at its target positions.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqRecord {
    pub key: u64,
    pub tokens: Vec<u32>,
    /// the target positions' indices in the sequence, ascending
    pub at: Vec<u32>,
    pub kept: Vec<Kept>,
}

/// A decoded shard: flat arrays with offsets.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub keys: Vec<u64>,
    /// ids of every sequence, `seq_len` each
    pub tokens: Vec<u32>,
    pub seq_len: usize,
    /// each position's index in its sequence
    pub at: Vec<u32>,
    /// position offsets per sequence: sequence s has positions [pos_at[s], pos_at[s + 1])
    pub pos_at: Vec<usize>,
    /// entry offsets per position
    pub entry_at: Vec<usize>,
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub log_tail: Vec<f32>,
    pub log_z: Vec<f32>,
}

/// The zstd level: measured on the demo teacher, levels above 3 gained little and cost capture time.
const ZSTD_LEVEL: i32 = 3;

fn view<'a>(
    dtype: Dtype,
    shape: usize,
    data: &'a [u8],
) -> Result<safetensors::tensor::TensorView<'a>> {
    safetensors::tensor::TensorView::new(dtype, vec![shape], data)
        .map_err(|e| Error::Invalid(format!("store shard: {e}")))
}

/// Serialise and compress records; `wide_ids` when some id needs 32 bits.
pub fn encode(records: &[SeqRecord], quant: Quant, wide_ids: bool) -> Result<Vec<u8>> {
    let (mut tokens, mut at) = (Vec::new(), Vec::new());
    let (mut keys, mut positions, mut k, mut ids, mut lps, mut tail, mut log_z) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let push_id = |out: &mut Vec<u8>, i: u32| {
        if wide_ids {
            out.extend_from_slice(&i.to_le_bytes());
        } else {
            out.extend_from_slice(&(i as u16).to_le_bytes());
        }
    };
    let mut entries = 0usize;
    let mut n_pos = 0usize;
    let mut n_tokens = 0usize;
    for r in records {
        if r.at.len() != r.kept.len() {
            return Err(Error::Shape(format!(
                "store shard: {} positions but {} kept sets",
                r.at.len(),
                r.kept.len()
            )));
        }
        keys.extend_from_slice(&r.key.to_le_bytes());
        positions.extend_from_slice(&(r.kept.len() as u32).to_le_bytes());
        for &t in &r.tokens {
            push_id(&mut tokens, t);
        }
        n_tokens += r.tokens.len();
        for &a in &r.at {
            at.extend_from_slice(&a.to_le_bytes());
        }
        n_pos += r.kept.len();
        for p in &r.kept {
            k.extend_from_slice(&(p.ids.len() as u16).to_le_bytes());
            for &i in &p.ids {
                push_id(&mut ids, i);
            }
            quant.encode(&p.logprobs, &mut lps);
            tail.extend_from_slice(&p.log_tail.to_le_bytes());
            log_z.extend_from_slice(&p.log_z.to_le_bytes());
            entries += p.ids.len();
        }
    }
    let id_type = if wide_ids { Dtype::U32 } else { Dtype::U16 };
    let lp_type = match quant {
        Quant::U8 => Dtype::U8,
        Quant::F16 => Dtype::F16,
    };
    let views = vec![
        ("keys".to_string(), view(Dtype::U64, records.len(), &keys)?),
        ("tokens".to_string(), view(id_type, n_tokens, &tokens)?),
        (
            "positions".to_string(),
            view(Dtype::U32, records.len(), &positions)?,
        ),
        ("at".to_string(), view(Dtype::U32, n_pos, &at)?),
        ("k".to_string(), view(Dtype::U16, n_pos, &k)?),
        ("ids".to_string(), view(id_type, entries, &ids)?),
        ("logprobs".to_string(), view(lp_type, entries, &lps)?),
        ("log_tail".to_string(), view(Dtype::F32, n_pos, &tail)?),
        ("log_z".to_string(), view(Dtype::F32, n_pos, &log_z)?),
    ];
    let meta = HashMap::from([
        (
            "format".to_string(),
            "distill-teacher-store-shard".to_string(),
        ),
        ("quantisation".to_string(), quant.name().to_string()),
    ]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Invalid(format!("serialising a store shard: {e}")))?;
    zstd::bulk::compress(&bytes, ZSTD_LEVEL)
        .map_err(|e| Error::Invalid(format!("compressing a store shard: {e}")))
}

/// The longest a shard may decompress to (a guard against a corrupt size field).
const MAX_SHARD_BYTES: usize = 1 << 34;

/// Decompress and decode a shard's bytes; every inconsistency is an error naming `file`.
pub fn decode(compressed: &[u8], quant: Quant, file: &Path) -> Result<Shard> {
    let bad = |m: String| Error::format(file, m);
    let size = zstd::zstd_safe::get_frame_content_size(compressed)
        .ok()
        .flatten()
        .ok_or_else(|| bad("not a zstd frame with a content size".into()))?;
    if size as usize > MAX_SHARD_BYTES {
        return Err(bad(format!("claims {size} bytes decompressed")));
    }
    let bytes = zstd::bulk::decompress(compressed, size as usize)
        .map_err(|e| bad(format!("cannot decompress: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let get = |name: &str, dtypes: &[Dtype]| -> Result<(Dtype, &[u8])> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("no tensor '{name}'")))?;
        if !dtypes.contains(&t.dtype()) || t.shape().len() != 1 {
            return Err(bad(format!(
                "tensor '{name}' has dtype {:?} and shape {:?}",
                t.dtype(),
                t.shape()
            )));
        }
        Ok((t.dtype(), t.data()))
    };
    let u64s = |b: &[u8]| -> Vec<u64> {
        b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    let u32s = |b: &[u8]| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let u16s = |b: &[u8]| -> Vec<u32> {
        b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect()
    };
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let keys = u64s(get("keys", &[Dtype::U64])?.1);
    let positions = u32s(get("positions", &[Dtype::U32])?.1);
    let at = u32s(get("at", &[Dtype::U32])?.1);
    let tokens = match get("tokens", &[Dtype::U16, Dtype::U32])? {
        (Dtype::U16, b) => u16s(b),
        (_, b) => u32s(b),
    };
    if keys.is_empty() || tokens.len() % keys.len() != 0 {
        return Err(bad(format!(
            "{} tokens for {} sequences",
            tokens.len(),
            keys.len()
        )));
    }
    let seq_len = tokens.len() / keys.len();
    let k = u16s(get("k", &[Dtype::U16])?.1);
    let ids = match get("ids", &[Dtype::U16, Dtype::U32])? {
        (Dtype::U16, b) => u16s(b),
        (_, b) => u32s(b),
    };
    let want = match quant {
        Quant::U8 => Dtype::U8,
        Quant::F16 => Dtype::F16,
    };
    let logprobs = quant.decode(get("logprobs", &[want])?.1)?;
    let log_tail = f32s(get("log_tail", &[Dtype::F32])?.1);
    let log_z = f32s(get("log_z", &[Dtype::F32])?.1);
    if positions.len() != keys.len() {
        return Err(bad("'positions' and 'keys' differ in length".into()));
    }
    let mut pos_at = Vec::with_capacity(keys.len() + 1);
    pos_at.push(0usize);
    for &p in &positions {
        pos_at.push(pos_at.last().expect("nonempty") + p as usize);
    }
    let n_pos = *pos_at.last().expect("nonempty");
    if k.len() != n_pos || at.len() != n_pos || log_tail.len() != n_pos || log_z.len() != n_pos {
        return Err(bad(format!(
            "{n_pos} positions by 'positions', but 'k' has {}, 'at' {}, 'log_tail' {}, 'log_z' {}",
            k.len(),
            at.len(),
            log_tail.len(),
            log_z.len()
        )));
    }
    let mut entry_at = Vec::with_capacity(n_pos + 1);
    entry_at.push(0usize);
    for &x in &k {
        if x == 0 {
            return Err(bad("a position with no kept token".into()));
        }
        entry_at.push(entry_at.last().expect("nonempty") + x as usize);
    }
    let entries = *entry_at.last().expect("nonempty");
    if ids.len() != entries || logprobs.len() != entries {
        return Err(bad(format!(
            "{entries} entries by 'k', but 'ids' has {}, 'logprobs' {}",
            ids.len(),
            logprobs.len()
        )));
    }
    for s in 0..keys.len() {
        let ats = &at[pos_at[s]..pos_at[s + 1]];
        if ats.windows(2).any(|w| w[0] >= w[1])
            || ats.last().is_some_and(|&a| a as usize + 1 >= seq_len)
        {
            return Err(bad(format!(
                "sequence {s}: positions out of order or beyond its {seq_len} tokens"
            )));
        }
    }
    Ok(Shard {
        keys,
        tokens,
        seq_len,
        at,
        pos_at,
        entry_at,
        ids,
        logprobs,
        log_tail,
        log_z,
    })
}

impl Shard {
    /// Sequences in the shard.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// The positions [start, end) of sequence `s`.
    pub fn positions(&self, s: usize) -> std::ops::Range<usize> {
        self.pos_at[s]..self.pos_at[s + 1]
    }
    /// The ids of sequence `s`.
    pub fn tokens_of(&self, s: usize) -> &[u32] {
        &self.tokens[s * self.seq_len..(s + 1) * self.seq_len]
    }
    /// The kept tokens at position `p` (ids, log-probabilities), its log tail mass and log Z.
    pub fn kept(&self, p: usize) -> Kept {
        let e = self.entries(p);
        Kept {
            ids: self.ids[e.clone()].to_vec(),
            logprobs: self.logprobs[e].to_vec(),
            log_tail: self.log_tail[p],
            log_z: self.log_z[p],
        }
    }
    /// The entries [start, end) of position `p`.
    pub fn entries(&self, p: usize) -> std::ops::Range<usize> {
        self.entry_at[p]..self.entry_at[p + 1]
    }
}
