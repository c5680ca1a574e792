//! Cutting examples into fixed-length sequences. `labels[t]` is the id at t+1 when that token is a
//! target, else −100 (never counted); the last position has no next token inside the sequence.
use super::Example;

#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

fn sequence(ids: &[u32], target: &[bool], len: usize, pad: u32) -> Sequence {
    let mut out_ids = ids.to_vec();
    out_ids.resize(len, pad);
    let labels = (0..len)
        .map(|t| {
            if t + 1 < ids.len() && target[t + 1] {
                ids[t + 1] as i64
            } else {
                -100
            }
        })
        .collect();
    Sequence {
        ids: out_ids,
        labels,
    }
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
    ids.chunks(len)
        .zip(target.chunks(len))
        .filter(|(c, _)| c.len() >= 2)
        .map(|(c, t)| sequence(c, t, len, pad))
        .collect()
}

/// One sequence per example, truncated or padded to `len`.
pub fn pad_each(examples: &[Example], len: usize, pad: u32) -> Vec<Sequence> {
    examples
        .iter()
        .filter(|e| e.ids.len() >= 2)
        .map(|e| {
            let n = e.ids.len().min(len);
            sequence(&e.ids[..n], &e.target[..n], len, pad)
        })
        .collect()
}
