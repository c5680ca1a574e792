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

/// What distillation is judged by, over the target positions of validation sequences:
/// student and teacher perplexity, KL(teacher‖student) per token (T = 1, shared vocabulary) and
/// how often the student's top-1 token equals the teacher's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DistillMetrics {
    pub student_ppl: f64,
    pub teacher_ppl: f64,
    pub kl: f64,
    pub top1: f64,
    pub tokens: usize,
}

pub fn distill_metrics(
    teacher: &Llama,
    student: &Llama,
    seqs: &[crate::data::Sequence],
    batch: usize,
) -> Result<DistillMetrics> {
    if seqs.is_empty() {
        return Err(Error::Invalid(
            "evaluation needs at least one validation sequence".into(),
        ));
    }
    let (mut nll_s, mut nll_t, mut kl, mut agree, mut n) = (0.0, 0.0, 0.0, 0.0, 0usize);
    tch::no_grad(|| -> Result<()> {
        for group in seqs.chunks(batch.max(1)) {
            let (ids, labels) = crate::data::sampler::batch_tensors(group)?;
            let s = student.forward(&ids)?;
            let t = teacher.forward(&ids)?;
            let v = s.size()[2].min(t.size()[2]);
            let (s, t) = (s.narrow(2, 0, v), t.narrow(2, 0, v));
            let mask = labels.f_ne(-100)?;
            let safe = labels.f_clamp_min(0)?.f_unsqueeze(-1)?;
            let pick = |logits: &Tensor| -> Result<f64> {
                let lp = logits
                    .f_log_softmax(-1, Kind::Float)?
                    .f_gather(-1, &safe, false)?
                    .f_squeeze_dim(-1)?;
                Ok(-lp
                    .f_masked_select(&mask)?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?)
            };
            nll_s += pick(&s)?;
            nll_t += pick(&t)?;
            let per = crate::losses::kl::forward_kl_per_pos(&s, &t, 1.0)?;
            kl += per
                .f_masked_select(&mask)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            let same = s
                .f_argmax(-1, false)?
                .f_eq_tensor(&t.f_argmax(-1, false)?)?;
            agree += same
                .f_masked_select(&mask)?
                .f_sum(Kind::Double)?
                .f_double_value(&[])?;
            n += mask.f_sum(Kind::Int64)?.f_int64_value(&[])? as usize;
        }
        Ok(())
    })?;
    if n == 0 {
        return Err(Error::Invalid(
            "the validation data has no target token".into(),
        ));
    }
    let nf = n as f64;
    Ok(DistillMetrics {
        student_ppl: (nll_s / nf).exp(),
        teacher_ppl: (nll_t / nf).exp(),
        kl: kl / nf,
        top1: agree / nf,
        tokens: n,
    })
}
