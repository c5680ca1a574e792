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

    /// Continue from a checkpoint's position; a cursor beyond the data is refused.
    pub fn restore(&mut self, state: SamplerState) -> Result<(), String> {
        if state.cursor > self.n {
            return Err(format!(
                "the data position {} lies beyond the {} training sequences",
                state.cursor, self.n
            ));
        }
        self.order = permutation(self.n, self.seed, state.epoch);
        self.state = state;
        Ok(())
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
