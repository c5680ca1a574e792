//! The teacher store: the teacher's next-token distributions captured once (`distill capture`) and
//! read back by any number of runs, with no teacher forward.
//!
//! A store is a folder:
//!   store.json                    the header (header.rs): format version; the identity of the
//!                                 teacher (hash of its files and dtype), tokenizer, chat template,
//!                                 seq_len and packing; the selection (coverage, max_k, temperature,
//!                                 quantisation); each capture's data fingerprint; each shard's
//!                                 sequences, keys, size and checksum
//!   shard-NNNNN.safetensors.zst   the shards (shard.rs): safetensors compressed with zstd
//!   shard-rR-NNNNN.safetensors.zst  the same, written by rank R of a capture over several
//!                                 processes (parallel.rs); part-R.json lists them until rank 0
//!                                 merges it into store.json
//! A sequence is filed under its key (a hash of its ids and labels, `Sequence::key`): the teacher's
//! output at a position depends on the sequence's ids only, so equal keys mean equal signal.
//! At each target position it keeps (select.rs) the smallest set of most probable tokens reaching
//! `coverage` of the mass (at most `max_k`), always the label; their quantised log-probabilities;
//! the tail mass and log Z. Divergences on it compare reduced distributions (losses/reduced.rs).
pub mod capture;
pub mod config;
pub mod header;
pub mod parallel;
pub mod reader;
pub mod select;
pub mod shard;
pub mod signal;
pub mod verify;
pub mod writer;

pub use capture::{capture, capture_on, CaptureOptions, CaptureSummary};
pub use config::CaptureConfig;
pub use header::{Header, Identity};
pub use reader::Store;
pub use signal::StoreSignal;
pub use writer::{Mode, StoreWriter};
