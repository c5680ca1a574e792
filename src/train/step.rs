//! One micro-step: the forward passes, the objective and the backward pass, for one `Batch`.
//!
//!   teacher signal ← prepare(batch, teacher layers)   (the teacher's trunk, no graph)
//!   student trunk  ← forward(batch.ids, student layers) (B, T, d), with its graph
//!   hidden terms   ← objective.compute_hidden(layer states, weights)   (once, every position)
//!   for each chunk of c positions (or all at once):
//!       s = head(student hidden[chunk])        (c, Vs)
//!       t = teacher signal at the chunk        (c, Vt)
//!       value += share · objective(s, t, labels, weights)   → backward into the chunk's logits,
//!       then the head's backward by hand (`HeadGrad`): ∂L/∂h, and ∂L/∂W in place
//!       (a store's signal with terms that read only its reduced pair: the backward stops at the
//!       pair's student side, and `reduced::ByHand` carries it to the logits in place)
//!   the trunk's backward, once, with the gathered gradient and the hidden terms
//!
//! The layer states of the hidden-state terms come from the same forward passes as the logits (the
//! layers `Objective::hidden_layers` names); their value joins the trunk's one backward pass.
//! With chunking no (B, T, V) tensor of either side exists, only (c, V) ones. Each chunk's weighted
//! mean is scaled by its share Σ_chunk w / Σ w of the micro-batch's weights (computed on the host,
//! from the batch's host copy), so value and gradients equal the unchunked ones. The values stay on
//! the device until the end: one host read per micro-step, none per chunk or per term.
use crate::data::Batch;
use crate::losses::reduced::Reduced;
use crate::model::Llama;
use crate::objective::Objective;
use crate::teacher::{TeacherDist, TeacherSignal};
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
    // chunked: the head's backward by hand (`HeadGrad`); whole tensors: one chunk with the graph
    let logits_work = total_weight > 0.0 && objective.reads_logits();
    let mut by_hand = match chunk {
        Some(_) if logits_work => Some(HeadGrad::new(&s_trunk)?),
        _ => None,
    };
    let c = chunk.map_or(n, |c| c as i64);
    if logits_work {
        let flat = match &by_hand {
            Some(hg) => hg.hidden.shallow_clone(),
            None => s_trunk.f_flatten(0, 1)?, // (N, d)
        };
        let mut start = 0;
        while start < n {
            let len = c.min(n - start);
            let share = batch.weight_sum(start as usize, len as usize) / total_weight;
            if share > 0.0 {
                let h = flat.f_narrow(0, start, len)?;
                let s_logits = match &by_hand {
                    Some(hg) => hg.logits(student, &h)?, // (len, Vs), no graph
                    None => student.head(&h)?,           // (len, Vs), with the graph
                };
                let t_dist = match &signal {
                    Some(sig) => Some(sig.positions(start, len)?), // (len, Vt)
                    None => None,
                };
                let (l, wt) = (
                    labels.f_narrow(0, start, len)?,
                    weights.f_narrow(0, start, len)?,
                );
                // labels were checked when the data was read, and the teacher signal is finite
                let (v, leaf) = crate::losses::trusted(|| -> Result<_> {
                    match (&by_hand, &t_dist) {
                        // a store's signal and an objective that reads only its reduced pair: the
                        // pair's student side by hand as well (`reduced::ByHand`)
                        (Some(_), Some(TeacherDist::Sparse(sp)))
                            if objective.reads_only_reduced() && s_logits.kind() == Kind::Float =>
                        {
                            let (r, hand) = Reduced::by_hand(s_logits.shallow_clone(), sp)?;
                            let v = objective.compute_on_reduced(&r, &l, &wt)?;
                            Ok((v, Leaf::Reduced(hand)))
                        }
                        (Some(_), _) => {
                            let s = s_logits.f_set_requires_grad(true)?;
                            let v = objective.compute(&s, t_dist.as_ref(), &l, &wt)?;
                            Ok((v, Leaf::Logits(s)))
                        }
                        (None, _) => Ok((
                            objective.compute(&s_logits, t_dist.as_ref(), &l, &wt)?,
                            Leaf::Graph,
                        )),
                    }
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
                match (&mut by_hand, leaf) {
                    (Some(hg), leaf) => {
                        part.f_backward()?; // into the chunk's leaf
                        let g = match leaf {
                            Leaf::Logits(s) => Some(s.grad()).filter(|g| g.defined()),
                            Leaf::Reduced(hand) => hand.logits_grad()?,
                            Leaf::Graph => None,
                        };
                        if let Some(g) = g {
                            hg.backward(student, &g, &h, start)?;
                        }
                    }
                    // whole tensors: one chunk, with the trunk's graph
                    (None, _) => rest = Some(add(rest, part)?),
                }
            }
            start += len;
        }
    }
    if let Some(hg) = by_hand.take() {
        // the gradient gathered on the hidden states, pulled back through the trunk
        if hg.touched {
            let pull = s_trunk
                .f_mul(&hg.grad.f_view_as(&s_trunk)?)?
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

/// Where a chunk's objective stopped its backward: the logits made a leaf, the student side of a
/// store's reduced pair computed by hand, or (whole tensors) nowhere before the trunk.
enum Leaf {
    Logits(Tensor),
    Reduced(crate::losses::reduced::ByHand),
    Graph,
}

/// The output head's backward over chunks of positions, by hand: a chunk's logits are computed
/// without a graph and made a leaf, the objective's backward stops there with G = ∂L/∂logits
/// (len, V), and then
///   ∂L/∂h = G·W        written into the chunk's rows of `grad` (N, d)
///   ∂L/∂W += Gᵀ·h      added in place into W's gradient (V, d)
/// — what autograd's backward of `h·Wᵀ` computes, without its (V, d) temporary per chunk (the
/// head's weight is the largest tensor of a small model: 113 MB for SmolLM2's 49,152 × 576, and
/// allocating and faulting it in once per chunk cost more than the product itself). The hidden
/// states' gradient then joins the trunk's one backward pass. When the head computes in another
/// dtype than its weight is kept in (bf16 activations, f32 weights), ∂L/∂W is formed in the
/// weight's dtype from the chunk's G and h cast to it.
struct HeadGrad {
    /// the trunk's final hidden states (N, d), detached
    hidden: Tensor,
    /// ∂L/∂hidden (N, d)
    grad: Tensor,
    /// whether any chunk wrote a gradient
    touched: bool,
}

impl HeadGrad {
    fn new(trunk: &Tensor) -> Result<HeadGrad> {
        let hidden = trunk.f_detach()?.f_flatten(0, 1)?; // (N, d)
        Ok(HeadGrad {
            grad: hidden.f_zeros_like()?,
            hidden,
            touched: false,
        })
    }

    /// The chunk's logits (len, V) from its hidden states `h`, without a graph.
    fn logits(&self, student: &Llama, h: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| student.head(h))
    }

    /// With g = ∂L/∂logits (len, V) of the chunk whose rows start at `start`.
    fn backward(&mut self, student: &Llama, g: &Tensor, h: &Tensor, start: i64) -> Result<()> {
        let w = student.lm_head_weight();
        if w.requires_grad() && !w.grad().defined() {
            // W's gradient buffer, the first time a chunk has one for it: zeros, which this and
            // later chunks add into in place (zero_grad keeps the buffer). Only then: a weight
            // the objective never reaches keeps no gradient, and the optimizer skips it.
            w.f_mul_scalar(0.0)?.f_sum(Kind::Float)?.f_backward()?;
        }
        tch::no_grad(|| -> Result<()> {
            let len = g.size()[0];
            let wk = w.f_to_kind(g.kind())?; // a no-op when the head computes in W's dtype
            let _ = g.f_mm_out(&self.grad.f_narrow(0, start, len)?, &wk)?;
            if w.requires_grad() {
                let k = w.kind();
                let _ = w
                    .grad()
                    .f_addmm_(&g.f_to_kind(k)?.f_tr()?, &h.f_to_kind(k)?)?;
            }
            Ok(())
        })?;
        self.touched = true;
        Ok(())
    }
}
