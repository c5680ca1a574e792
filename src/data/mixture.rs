//! Drawing a run's rows from several sources by weight (`[[data.source]]`). Row `row` of
//! micro-batch `micro` of step `step` comes from source i with probability w_i / Σ w: the choice
//! is a pure function of (seed, step, micro, row, w) — u = SplitMix64 hash of the four, uniform in
//! [0, 1), source = the first i with u < Σ_{j≤i} w_j / Σ w — and the row is that source's next
//! sequence from its own epoch-shuffled sampler (data/sampler.rs, seeded per source). A
//! checkpoint records each sampler's position and the weights (DDK changes them), so a resumed
//! run draws the same rows.
use super::sampler::{Sampler, SamplerState};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MixtureState {
    /// each source's position
    pub samplers: Vec<SamplerState>,
    /// the weights in use (normalised)
    pub weights: Vec<f64>,
    /// DDK: the step of the last update (None before the first)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddk_step: Option<usize>,
}

pub struct Mixture {
    samplers: Vec<Sampler>,
    /// each source's first index in the joined training list
    offsets: Vec<usize>,
    pub weights: Vec<f64>,
    pub ddk_step: Option<usize>,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The source that row `row` of micro-batch `micro` of step `step` is drawn from.
pub fn draw_source(weights: &[f64], seed: u64, step: usize, micro: usize, row: usize) -> usize {
    let h = mix(seed ^ mix(step as u64 ^ mix(micro as u64 ^ mix(row as u64 ^ 0x5EED_D0A1))));
    let u = (h >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w / total;
        if u < acc {
            return i;
        }
    }
    weights.len() - 1 // u within rounding of 1
}

impl Mixture {
    /// Sources of `sizes` training sequences, laid out one after another from index 0, drawn by
    /// `weights`.
    pub fn new(sizes: &[usize], weights: &[f64], seed: u64) -> Mixture {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut at = 0;
        for &n in sizes {
            offsets.push(at);
            at += n;
        }
        Mixture {
            samplers: sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Sampler::new(n, mix(seed ^ mix(i as u64 ^ 0x50C2_CE00))))
                .collect(),
            offsets,
            weights: super::ddk::normalised(weights),
            ddk_step: None,
        }
    }

    pub fn state(&self) -> MixtureState {
        MixtureState {
            samplers: self.samplers.iter().map(|s| s.state).collect(),
            weights: self.weights.clone(),
            ddk_step: self.ddk_step,
        }
    }

    /// Continue from a checkpoint's state; one that does not fit these sources is refused.
    pub fn restore(&mut self, st: &MixtureState) -> Result<(), String> {
        if st.samplers.len() != self.samplers.len() || st.weights.len() != self.samplers.len() {
            return Err(format!(
                "the checkpoint has {} sources, the run {}",
                st.samplers.len(),
                self.samplers.len()
            ));
        }
        if st.weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
            return Err(format!("source weights {:?}: each must be > 0", st.weights));
        }
        for (s, &p) in self.samplers.iter_mut().zip(&st.samplers) {
            s.restore(p)?;
        }
        self.weights = st.weights.clone();
        self.ddk_step = st.ddk_step;
        Ok(())
    }

    /// The `k` rows of micro-batch `micro` of step `step`, as indices into the joined training
    /// list.
    pub fn next_batch(&mut self, k: usize, seed: u64, step: usize, micro: usize) -> Vec<usize> {
        (0..k)
            .map(|row| {
                let i = draw_source(&self.weights, seed, step, micro, row);
                self.offsets[i] + self.samplers[i].next_batch(1)[0]
            })
            .collect()
    }
}
