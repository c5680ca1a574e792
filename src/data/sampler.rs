//! Deterministic data order: epoch e visits the training sequences in a Fisher–Yates permutation
//! drawn from SplitMix64(seed, e). The position (epoch, cursor) is all a checkpoint needs.
use crate::generate::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    pub cursor: usize,
}

pub struct Sampler {
    n: usize,
    seed: u64,
    order: Vec<usize>,
    pub state: SamplerState,
}

fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(
        seed ^ epoch
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0xD1B5_4A32_D192_ED03),
    );
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        Sampler {
            n,
            seed,
            order: permutation(n, seed, 0),
            state: SamplerState {
                epoch: 0,
                cursor: 0,
            },
        }
    }

    pub fn restore(&mut self, state: SamplerState) {
        self.order = permutation(self.n, self.seed, state.epoch);
        self.state = state;
    }

    /// The next `k` sequence indices, crossing into the next epoch when needed.
    pub fn next_batch(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.state.cursor == self.n {
                self.state.epoch += 1;
                self.state.cursor = 0;
                self.order = permutation(self.n, self.seed, self.state.epoch);
            }
            out.push(self.order[self.state.cursor]);
            self.state.cursor += 1;
        }
        out
    }
}

/// (ids, labels) tensors (B, T) of a group of sequences.
pub fn batch_tensors(group: &[super::Sequence]) -> crate::Result<(tch::Tensor, tch::Tensor)> {
    let t = group[0].ids.len() as i64;
    let ids: Vec<i64> = group
        .iter()
        .flat_map(|s| s.ids.iter().map(|&x| x as i64))
        .collect();
    let labels: Vec<i64> = group
        .iter()
        .flat_map(|s| s.labels.iter().copied())
        .collect();
    let b = group.len() as i64;
    Ok((
        tch::Tensor::f_from_slice(&ids)?.f_view([b, t])?,
        tch::Tensor::f_from_slice(&labels)?.f_view([b, t])?,
    ))
}
