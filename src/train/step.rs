//! One micro-step: the forward passes, the objective and the backward pass, for one `Batch`.
//!
//!   teacher signal ← prepare(batch, teacher layers)   (the teacher's trunk, no graph)
//!   student trunk  ← forward(batch.ids, student layers) (B, T, d), with its graph
//!   hidden terms   ← objective.compute_hidden(layer states, weights)   (once, every position)
//!   for each chunk of c positions (or all at once):
//!       s = head(student hidden[chunk])        (c, Vs)
//!       t = teacher signal at the chunk        (c, Vt)
//!       value += share · objective(s, t, labels, weights)   → backward into the detached hidden
//!   the trunk's backward, once, with the gathered gradient and the hidden terms
//!
//! The layer states of the hidden-state terms come from the same forward passes as the logits (the
//! layers `Objective::hidden_layers` names); their value joins the trunk's one backward pass.
//! With chunking no (B, T, V) tensor of either side exists, only (c, V) ones. Each chunk's weighted
//! mean is scaled by its share Σ_chunk w / Σ w of the micro-batch's weights (computed on the host,
//! from the batch's host copy), so value and gradients equal the unchunked ones. The values stay on
//! the device until the end: one host read per micro-step, none per chunk or per term.
use crate::data::Batch;
use crate::model::Llama;
use crate::objective::Objective;
use crate::teacher::TeacherSignal;
use crate::Result;
use tch::{Kind, Tensor};

/// The result of one micro-batch's objective: its value (scaled), each term's value (scaled), and
/// whether it was finite (when not, the caller skips the step: no update is applied).
pub struct MicroStep {
    pub loss: f64,
    pub parts: Vec<f64>,
    pub finite: bool,
}

/// How to run a micro-step.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions {
    /// positions per chunk of the vocabulary-sized work (None = whole tensors)
    pub chunk: Option<usize>,
    /// the factor on the value and gradients (1 / gradient accumulation)
    pub scale: f64,
    /// test hook: multiply the value by NaN (only with the `fault-injection` feature)
    #[cfg(feature = "fault-injection")]
    pub poison: bool,
}

impl StepOptions {
    pub fn new(chunk: Option<usize>, scale: f64) -> Self {
        StepOptions {
            chunk,
            scale,
            #[cfg(feature = "fault-injection")]
            poison: false,
        }
    }

    fn poisoned(&self, x: Tensor) -> Result<Tensor> {
        #[cfg(feature = "fault-injection")]
        if self.poison {
            return Ok(x.f_mul_scalar(f64::NAN)?);
        }
        Ok(x)
    }
}

fn add(acc: Option<Tensor>, x: Tensor) -> Result<Tensor> {
    Ok(match acc {
        Some(a) => a.f_add(&x)?,
        None => x,
    })
}

/// Forward and backward of the objective for one micro-batch; gradients accumulate into the
/// student's parameters (and into the hidden terms' projections).
pub fn micro_step(
    student: &Llama,
    teacher: Option<&dyn TeacherSignal>,
    objective: &Objective,
    batch: &Batch,
    opts: &StepOptions,
) -> Result<MicroStep> {
    let teacher = teacher.filter(|_| objective.needs_teacher());
    let (s_layers, t_layers) = objective.hidden_layers();
    let signal = match teacher {
        Some(t) => Some(t.prepare(batch, &t_layers)?),
        None => None,
    };
    let (labels, weights) = batch.flat_targets()?; // (N), (N)
    let n = labels.size()[0];
    let total_weight = batch.weight_sum(0, n as usize);
    let trunk = student.forward_trunk(&batch.ids, &s_layers)?;
    let s_trunk = trunk.last; // (B, T, d), with the trunk's graph
    let n_terms = objective.names().len();
    // accumulated in f64, as the host would (each chunk's f32 value converted exactly)
    let mut loss = Tensor::f_zeros([], (Kind::Double, student.device()))?;
    let mut parts = Tensor::f_zeros([n_terms as i64], (Kind::Double, student.device()))?;
    // what joins the trunk's backward pass at the end: the hidden terms, the unchunked objective
    let mut rest: Option<Tensor> = None;
    if !objective.hidden_terms().is_empty() && total_weight > 0.0 {
        let t_hidden = signal.as_ref().map(|s| s.hidden()).ok_or_else(|| {
            crate::Error::Invalid("hidden-state terms need the teacher's hidden states".into())
        })?;
        let flat = |xs: &[Tensor]| -> Result<Vec<Tensor>> {
            Ok(xs
                .iter()
                .map(|x| x.f_flatten(0, 1)) // (N, d)
                .collect::<std::result::Result<_, _>>()?)
        };
        let v = objective.compute_hidden(&flat(&trunk.layers)?, &flat(t_hidden)?, &weights)?;
        let part = opts.poisoned(v.total.f_mul_scalar(opts.scale)?)?;
        loss = loss.f_add(&part.f_detach()?.f_to_kind(Kind::Double)?)?;
        let scaled: Vec<Tensor> = v
            .parts
            .iter()
            .map(|p| p.f_mul_scalar(opts.scale)?.f_to_kind(Kind::Double))
            .collect::<std::result::Result<_, _>>()?;
        parts = parts.f_add(&Tensor::f_stack(&scaled, 0)?)?;
        rest = Some(part);
    }
    let chunk = opts.chunk.filter(|_| objective.chunkable());
    let (detached, c) = match chunk {
        // the head's work over chunks of positions, backpropagated into detached hidden states
        Some(c) => (
            Some(
                s_trunk
                    .f_detach()?
                    .f_flatten(0, 1)?
                    .f_set_requires_grad(true)?,
            ), // (N, d)
            c as i64,
        ),
        None => (None, n),
    };
    if total_weight > 0.0 && objective.reads_logits() {
        let flat = s_trunk.f_flatten(0, 1)?; // (N, d)
        let mut start = 0;
        while start < n {
            let len = c.min(n - start);
            let share = batch.weight_sum(start as usize, len as usize) / total_weight;
            if share > 0.0 {
                let h = detached.as_ref().unwrap_or(&flat).f_narrow(0, start, len)?;
                let s_logits = student.head(&h)?; // (len, Vs)
                let t_dist = match &signal {
                    Some(sig) => Some(sig.positions(start, len)?), // (len, Vt)
                    None => None,
                };
                // labels were checked when the data was read, and the teacher signal is finite
                let v = crate::losses::trusted(|| {
                    objective.compute(
                        &s_logits,
                        t_dist.as_ref(),
                        &labels.f_narrow(0, start, len)?,
                        &weights.f_narrow(0, start, len)?,
                    )
                })?;
                let w = opts.scale * share;
                let part = opts.poisoned(v.total.f_mul_scalar(w)?)?;
                loss = loss.f_add(&part.f_detach()?.f_to_kind(Kind::Double)?)?;
                let scaled: Vec<Tensor> = v
                    .parts
                    .iter()
                    .map(|p| p.f_mul_scalar(w)?.f_to_kind(Kind::Double))
                    .collect::<std::result::Result<_, _>>()?;
                parts = parts.f_add(&Tensor::f_stack(&scaled, 0)?)?;
                if detached.is_some() {
                    part.f_backward()?; // into the detached hidden states
                } else {
                    rest = Some(add(rest, part)?); // whole tensors: one chunk, with the trunk's graph
                }
            }
            start += len;
        }
    }
    if let Some(d) = &detached {
        // the gradient gathered on the detached hidden states, pulled back through the trunk
        let grad = d.grad();
        if grad.defined() {
            let pull = s_trunk
                .f_mul(&grad.f_view_as(&s_trunk)?)?
                .f_sum(Kind::Float)?;
            rest = Some(add(rest, pull)?);
        }
    }
    if let Some(r) = rest {
        r.f_backward()?; // the trunk's one backward pass
    }
    // the one host read of the micro-step
    let values: Vec<f64> = Vec::<f64>::try_from(
        Tensor::f_cat(&[loss.f_unsqueeze(0)?, parts], 0)?.f_to_device(tch::Device::Cpu)?,
    )?;
    let loss = values[0];
    Ok(MicroStep {
        loss,
        parts: values[1..].to_vec(),
        finite: loss.is_finite(),
    })
}
