//! Cutting examples into fixed-length sequences. `labels[t]` is the id at t+1 when that token is a
//! target, else `IGNORE_INDEX` (never counted); the last position has no next token inside the
//! sequence. `weights[t]` is the weight of the example that holds token t+1 (1 unless its record
//! gave one) where `labels[t]` counts, 0 elsewhere (data selection and mixing may change it later). Each sequence records where its tokens came from
//! (`spans`), so that a per-example store can find the row's documents and offsets again.
use super::{Example, IGNORE_INDEX};

/// Tokens [offset, offset + len) of example `example` (its index in the order the data was read)
/// fill positions [at, at + len) of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Span {
    pub example: usize,
    pub offset: usize,
    pub at: usize,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub weights: Vec<f32>,
    pub spans: Vec<Span>,
    /// the data source it was drawn from, when the run has several
    pub domain: Option<u32>,
}

impl Sequence {
    /// The key a teacher store files this sequence under: a hash of its ids and labels (what the
    /// teacher sees and which positions are targets). Equal keys, equal teacher signal.
    pub fn key(&self) -> u64 {
        crate::fingerprint::Fnv64::default()
            .u32s(&self.ids)
            .i64s(&self.labels)
            .finish()
    }

    /// Positions whose weight is not 0.
    pub fn counted(&self) -> usize {
        self.weights.iter().filter(|&&w| w != 0.0).count()
    }
}

/// `ids` padded with `pad` to `len`; labels (and weight 1) where the next token is a target.
pub(crate) fn sequence(
    ids: &[u32],
    target: &[bool],
    len: usize,
    pad: u32,
    spans: Vec<Span>,
) -> Sequence {
    let mut out_ids = ids.to_vec();
    out_ids.resize(len, pad);
    let labels: Vec<i64> = (0..len)
        .map(|t| {
            if t + 1 < ids.len() && target[t + 1] {
                ids[t + 1] as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    let weights = labels
        .iter()
        .map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    Sequence {
        ids: out_ids,
        labels,
        weights,
        spans,
        domain: None,
    }
}

/// `s.weights[t]` = `token_weight[t + 1]` where the label counts (the example weight of the
/// predicted token); untouched when every weight is 1.
fn weigh(s: &mut Sequence, token_weight: &[f32]) {
    if token_weight.iter().all(|&w| w == 1.0) {
        return;
    }
    for (t, w) in s.weights.iter_mut().enumerate() {
        if *w != 0.0 {
            *w = token_weight[t + 1];
        }
    }
}

/// The spans of stream positions [start, end) when the examples' lengths are `lens`.
fn spans_of(lens: &[usize], start: usize, end: usize) -> Vec<Span> {
    let mut out = Vec::new();
    let mut base = 0;
    for (example, &n) in lens.iter().enumerate() {
        let (lo, hi) = (start.max(base), end.min(base + n));
        if lo < hi {
            out.push(Span {
                example,
                offset: lo - base,
                at: lo - start,
                len: hi - lo,
            });
        }
        base += n;
        if base >= end {
            break;
        }
    }
    out
}

/// Concatenate every example into one stream and cut it into sequences of `len` (the last one
/// padded with `pad`; a remainder of fewer than 2 tokens is dropped).
pub fn pack(examples: &[Example], len: usize, pad: u32) -> Vec<Sequence> {
    let ids: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.ids.iter().copied())
        .collect();
    let target: Vec<bool> = examples
        .iter()
        .flat_map(|e| e.target.iter().copied())
        .collect();
    let weight: Vec<f32> = examples
        .iter()
        .flat_map(|e| std::iter::repeat_n(e.weight, e.ids.len()))
        .collect();
    let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    ids.chunks(len)
        .zip(target.chunks(len))
        .zip(weight.chunks(len))
        .enumerate()
        .filter(|(_, ((c, _), _))| c.len() >= 2)
        .map(|(i, ((c, t), w))| {
            let mut s = sequence(c, t, len, pad, spans_of(&lens, i * len, i * len + c.len()));
            weigh(&mut s, w);
            s
        })
        .collect()
}

/// One sequence per example, truncated or padded to `len`.
pub fn pad_each(examples: &[Example], len: usize, pad: u32) -> Vec<Sequence> {
    examples
        .iter()
        .enumerate()
        .filter(|(_, e)| e.ids.len() >= 2)
        .map(|(i, e)| {
            let n = e.ids.len().min(len);
            let span = Span {
                example: i,
                offset: 0,
                at: 0,
                len: n,
            };
            let mut s = sequence(&e.ids[..n], &e.target[..n], len, pad, vec![span]);
            weigh(&mut s, &vec![e.weight; n]);
            s
        })
        .collect()
}
