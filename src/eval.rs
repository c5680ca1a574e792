//! Evaluation: perplexity of a causal LM over a token stream.
//! The stream is cut into consecutive, non-overlapping windows of `window` tokens (the last one may
//! be shorter); inside each window every token after the first is predicted from the ones before it.
//! perplexity = exp(Σ −log q(x_t | x_<t) / N), N = number of predicted tokens.
use crate::model::Llama;
use crate::{Error, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct Perplexity {
    pub nll_sum: f64,
    pub tokens: usize,
    pub seconds: f64,
}

impl Perplexity {
    pub fn value(&self) -> f64 {
        (self.nll_sum / self.tokens as f64).exp()
    }
}

/// Summed negative log-likelihood of `ids` (B, T) predicting positions 1..T from logits (B, T, V).
pub fn nll_sum(logits: &Tensor, ids: &Tensor) -> Result<f64> {
    let t = ids.size()[1];
    let logp = logits.narrow(1, 0, t - 1).f_log_softmax(-1, Kind::Float)?; // (B, T-1, V)
    let target = ids
        .narrow(1, 1, t - 1)
        .to_kind(Kind::Int64)
        .to_device(logp.device())
        .unsqueeze(-1);
    let picked = logp.f_gather(-1, &target, false)?; // (B, T-1, 1)
    Ok(-picked.f_sum(Kind::Double)?.double_value(&[]))
}

pub fn perplexity(model: &Llama, ids: &[u32], window: usize, batch: usize) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(Error::Invalid(format!(
            "perplexity needs at least 2 tokens, got {}",
            ids.len()
        )));
    }
    if window < 2 {
        return Err(Error::Invalid(format!(
            "perplexity window must be at least 2, got {window}"
        )));
    }
    let start = std::time::Instant::now();
    let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let chunks: Vec<&[i64]> = ids.chunks(window).filter(|c| c.len() >= 2).collect();
    let mut nll = 0.0;
    let mut tokens = 0;
    tch::no_grad(|| -> Result<()> {
        let full: Vec<&&[i64]> = chunks.iter().filter(|c| c.len() == window).collect();
        let tail: Vec<&&[i64]> = chunks.iter().filter(|c| c.len() != window).collect();
        for group in full.chunks(batch.max(1)).chain(tail.chunks(1)) {
            let rows: Vec<i64> = group.iter().flat_map(|c| c.iter().copied()).collect();
            let x =
                Tensor::f_from_slice(&rows)?.f_view([group.len() as i64, group[0].len() as i64])?; // (B, T)
            let logits = model.forward(&x)?;
            nll += nll_sum(&logits, &x)?;
            tokens += group.len() * (group[0].len() - 1);
        }
        Ok(())
    })?;
    Ok(Perplexity {
        nll_sum: nll,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}
