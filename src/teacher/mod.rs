//! The teacher's signal: what the objective compares the student with, for a batch and a range of
//! its positions. One interface, several sources: `Live` runs the teacher's forward pass now; the
//! teacher store (captured once, read back) and hybrids implement the same trait later.
//!
//! Positions are the batch's flattened (B·T) positions, row-major, so that the step can ask for
//! chunks of them. The distribution comes as dense logits (…, V) or, from a store, as a sparse
//! top-k with its tail mass and log-normaliser; the hidden states of chosen layers come with it.
pub mod budget;
pub mod config;
pub mod ensemble;
pub mod hybrid;
pub mod live;
pub mod store;
pub mod vocab;

pub use hybrid::{Hybrid, HybridState};
pub use live::Live;
pub use store::{Store, StoreSignal};
pub use vocab::{VocabMap, VocabReport};

use crate::data::Batch;
use crate::Result;
use tch::Tensor;

/// The teacher's next-token distribution at some positions.
#[derive(Debug)]
pub enum TeacherDist {
    /// logits (N, V), computed without a graph
    Dense(Tensor),
    /// a reduced distribution (a store's): the kept tokens and one tail bucket
    Sparse(SparseDist),
}

/// The teacher's distribution at N positions reduced to K stored tokens per position plus a tail,
/// p = softmax(t/T) at the capture temperature T:
///   p(v) = exp(logprobs[n, k]) for v = indices[n, k]; every token not stored shares exp(`log_tail[n]`).
/// A row keeps the teacher's most probable tokens, sorted by descending log-probability, except that
/// the label token is always included (it may come last, out of order). A row with fewer than K kept
/// tokens is padded: a padding slot has logprob −inf and an index equal to another valid index of
/// the same row (e.g. the row's first), so that a gather or scatter on it is harmless. The valid
/// slots of a row hold distinct ids. The divergences compare the reduced distributions this defines
/// (losses/reduced.rs).
#[derive(Debug)]
pub struct SparseDist {
    /// (N, K) i64: the stored token ids, already in the student's id space
    pub indices: Tensor,
    /// (N, K) f32: log p(v) of the stored tokens at T; −inf on padding slots
    pub logprobs: Tensor,
    /// (N) f32: log of the mass of every token not stored; −inf when they have none (every token
    /// stored, or a teacher whose other logits are −inf: a masked vocabulary), never from rounding
    /// (a store computes it as a log-sum-exp, so a tiny tail stays finite)
    pub log_tail: Tensor,
    /// (N) f32: logsumexp(t/T) over the full vocabulary (informational)
    pub log_z: Tensor,
    /// T, the temperature the signal was captured at
    pub temperature: f64,
}

impl TeacherDist {
    /// The dense logits, or an error naming what is missing for a sparse signal.
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            TeacherDist::Dense(t) => Ok(t),
            TeacherDist::Sparse(_) => Err(crate::Error::Invalid(
                "this loss needs the teacher's full distribution; the teacher signal is sparse (top-k)"
                    .into(),
            )),
        }
    }
}

/// A source of teacher signal.
pub trait TeacherSignal {
    /// Start a batch: the work its positions share (the live teacher's trunk) is done here, once.
    /// `hidden_layers` asks for the residual stream after those teacher layers.
    fn prepare<'a>(
        &'a self,
        batch: &Batch,
        hidden_layers: &[usize],
    ) -> Result<Box<dyn PreparedSignal + 'a>>;
    /// Rows of the teacher's output distribution (the vocabulary it scores).
    fn vocab_size(&self) -> usize;
}

/// The teacher's signal for one batch.
pub trait PreparedSignal {
    /// The distribution at flattened positions [start, start + len).
    fn positions(&self, start: i64, len: i64) -> Result<TeacherDist>;
    /// The hidden states asked for in `prepare`, each (B, T, d_teacher).
    fn hidden(&self) -> &[Tensor];
    /// Flattened positions in the batch (B·T).
    fn len(&self) -> i64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
