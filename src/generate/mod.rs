//! Text generation with a KV cache: greedy (temperature 0) or sampled with temperature and
//! nucleus (top-p) filtering from a seeded generator; one prompt or many at once (`batched`).
//! Training data written by a teacher (`data`: DASD's selection in `dasd`, distilling
//! step-by-step's records in `step_by_step`).
pub mod batched;
pub mod dasd;
pub mod data;
pub mod step_by_step;

pub use batched::{generate_batch, pick, Finish, Generated};

use crate::model::Llama;
use crate::Result;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// generation stops after any of these ids (it is not returned)
    pub stop_ids: Vec<u32>,
}

/// SplitMix64: a small, seeded, portable generator for sampling.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// uniform in [0, 1)
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Generate up to `max_new_tokens` after `prompt`, calling `on_token` with each new id: a batch
/// of one (`generate_batch`), seeded by `opts.seed`.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let mut out = generate_batch(model, &[prompt.to_vec()], &[opts.seed], opts, |_, id| {
        on_token(id)
    })?;
    Ok(out.remove(0).tokens)
}
