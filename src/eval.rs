//! Evaluation: perplexity of a causal LM over a token stream.
//! The stream is cut into consecutive, non-overlapping windows of `window` tokens (the last one may
//! be shorter); inside each window every token after the first is predicted from the ones before it.
//! perplexity = exp(Σ −log q(x_t | x_<t) / N), N = number of predicted tokens.
use crate::data::{Batch, Sequence};
use crate::model::Llama;
use crate::teacher::{TeacherDist, TeacherSignal};
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

/// What distillation is judged by, over the target positions of validation sequences, each
/// position weighted by its per-token weight (1 on targets by default): student and teacher
/// perplexity exp(Σ w·NLL / Σ w), KL(teacher‖student) per token (T = 1, shared vocabulary) and how
/// often the student's top-1 token equals the teacher's.
/// From a teacher store (a sparse signal) the teacher's side is the store's, at its capture
/// temperature T: the teacher's NLL is −(the label's stored log-probability at T), the KL is the
/// reduced forward KL(p̃‖q̃) at T (losses/reduced.rs: the stored tokens and one tail bucket), and the
/// teacher's top-1 is the stored token of highest log-probability. The student's perplexity stays
/// its own at T = 1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DistillMetrics {
    pub student_ppl: f64,
    pub teacher_ppl: f64,
    pub kl: f64,
    pub top1: f64,
    /// positions with a weight > 0
    pub tokens: usize,
}

pub fn distill_metrics(
    teacher: &dyn TeacherSignal,
    student: &Llama,
    seqs: &[Sequence],
    batch: usize,
) -> Result<DistillMetrics> {
    if seqs.is_empty() {
        return Err(Error::Invalid(
            "evaluation needs at least one validation sequence".into(),
        ));
    }
    distill_sums(teacher, student, seqs, batch)?.metrics()
}

/// The sums `DistillMetrics` are ratios of, over a set of sequences: sums of several sets (the
/// ranks' shares of the validation data) add up to the sums of their union.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricSums {
    /// Σ w·NLL of the student, of the teacher; Σ w·KL; Σ w·[top-1 equal]; Σ w
    pub nll_student: f64,
    pub nll_teacher: f64,
    pub kl: f64,
    pub agree: f64,
    pub weight: f64,
    /// positions with a weight > 0
    pub tokens: usize,
}

impl MetricSums {
    pub fn to_vec(&self) -> Vec<f64> {
        vec![
            self.nll_student,
            self.nll_teacher,
            self.kl,
            self.agree,
            self.weight,
            self.tokens as f64,
        ]
    }

    pub fn from_slice(v: &[f64]) -> MetricSums {
        MetricSums {
            nll_student: v[0],
            nll_teacher: v[1],
            kl: v[2],
            agree: v[3],
            weight: v[4],
            tokens: v[5].round() as usize,
        }
    }

    pub fn metrics(&self) -> Result<DistillMetrics> {
        if self.tokens == 0 || self.weight <= 0.0 {
            return Err(Error::Invalid(
                "the validation data has no target token".into(),
            ));
        }
        Ok(DistillMetrics {
            student_ppl: (self.nll_student / self.weight).exp(),
            teacher_ppl: (self.nll_teacher / self.weight).exp(),
            kl: self.kl / self.weight,
            top1: self.agree / self.weight,
            tokens: self.tokens,
        })
    }
}

/// `distill_metrics`'s sums over `seqs` (none: all zero).
pub fn distill_sums(
    teacher: &dyn TeacherSignal,
    student: &Llama,
    seqs: &[Sequence],
    batch: usize,
) -> Result<MetricSums> {
    if seqs.is_empty() {
        return Ok(MetricSums::default());
    }
    let device = student.device();
    let zero = || Tensor::f_zeros([], (Kind::Double, device));
    let (mut nll_s, mut nll_t, mut kl, mut agree, mut wsum) =
        (zero()?, zero()?, zero()?, zero()?, zero()?);
    let mut n = 0usize;
    // the data's labels were checked when read; the teacher signal is a model's (finite) logits
    // or a store's (read back checked)
    crate::losses::trusted(|| {
        tch::no_grad(|| -> Result<()> {
            let idx: Vec<usize> = (0..seqs.len()).collect();
            for rows in idx.chunks(batch.max(1)) {
                let b = Batch::new(seqs, rows, device)?;
                n += b.counted();
                let (labels, w) = b.flat_targets()?; // (N), (N)
                let s = student.forward(&b.ids)?.f_flatten(0, 1)?; // (N, Vs)
                let t = teacher.prepare(&b, &[])?;
                let t = t.positions(0, t.len())?;
                let w = w.f_to_kind(Kind::Double)?;
                let counted = w.f_ne(0.0)?;
                let safe = labels.f_clamp_min(0)?.f_unsqueeze(-1)?;
                // Σ w·x over positions of weight > 0 (elsewhere x may be anything: it is selected away)
                let weighted = |x: &Tensor| -> Result<Tensor> {
                    let x = x.f_to_kind(Kind::Double)?;
                    Ok(x.f_where_self(&counted, &x.f_zeros_like()?)?
                        .f_mul(&w)?
                        .f_sum(Kind::Double)?)
                };
                let nll = |logits: &Tensor| -> Result<Tensor> {
                    weighted(
                        &logits
                            .f_log_softmax(-1, Kind::Float)?
                            .f_gather(-1, &safe, false)?
                            .f_squeeze_dim(-1)?
                            .f_neg()?,
                    )
                };
                match &t {
                    TeacherDist::Dense(t) => {
                        // (N, Vt)
                        let v = s.size()[1].min(t.size()[1]);
                        let (s, t) = (s.f_narrow(1, 0, v)?, t.f_narrow(1, 0, v)?);
                        nll_s = nll_s.f_add(&nll(&s)?)?;
                        nll_t = nll_t.f_add(&nll(&t)?)?;
                        kl = kl.f_add(&weighted(&crate::losses::kl::forward_kl_per_pos(
                            &s, &t, 1.0,
                        )?)?)?;
                        let same = s
                            .f_argmax(-1, false)?
                            .f_eq_tensor(&t.f_argmax(-1, false)?)?;
                        agree = agree.f_add(&weighted(&same)?)?;
                    }
                    TeacherDist::Sparse(sparse) => {
                        let r = crate::losses::Reduced::new(&s, sparse)?; // (N, K+1) each
                        nll_s = nll_s.f_add(&nll(&s)?)?;
                        // the label's stored log-probability (the label is always stored)
                        let is_label = r
                            .indices
                            .f_eq_tensor(&labels.f_unsqueeze(-1)?)?
                            .f_logical_and(&r.stored)?; // (N, K)
                        let neg_inf = Tensor::f_full([], f64::NEG_INFINITY, (Kind::Float, device))?;
                        let logprobs = sparse
                            .logprobs
                            .f_to_kind(Kind::Float)?
                            .f_to_device(device)?;
                        let label_lp = logprobs
                            .f_where_self(&is_label, &neg_inf)?
                            .f_amax([-1], false)?;
                        nll_t = nll_t.f_add(&weighted(&label_lp.f_neg()?)?)?;
                        // the reduced pair holds −inf by design (padding slots, an empty tail)
                        let fkl = crate::losses::partial_support(|| {
                            crate::losses::kl::forward_kl_per_pos(
                                &r.student,
                                &r.teacher,
                                r.temperature,
                            )
                        })?;
                        kl = kl.f_add(&weighted(&fkl)?)?;
                        let best = r
                            .indices
                            .f_gather(-1, &logprobs.f_argmax(-1, true)?, false)?
                            .f_squeeze_dim(-1)?; // (N) the teacher's top stored token
                        let same = s.f_argmax(-1, false)?.f_eq_tensor(&best)?;
                        agree = agree.f_add(&weighted(&same)?)?;
                    }
                }
                wsum = wsum.f_add(&w.f_sum(Kind::Double)?)?;
            }
            Ok(())
        })
    })?;
    Ok(MetricSums {
        nll_student: nll_s.f_double_value(&[])?,
        nll_teacher: nll_t.f_double_value(&[])?,
        kl: kl.f_double_value(&[])?,
        agree: agree.f_double_value(&[])?,
        weight: wsum.f_double_value(&[])?,
        tokens: n,
    })
}
