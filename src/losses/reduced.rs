//! Divergences on a stored (sparse) teacher signal compare reduced distributions (DESIGN.md §7):
//!   p̃ = (p(v_1), …, p(v_K), m),                 m = exp(log_tail) = Σ_{v ∉ S} p(v)
//!   q̃ = (q(v_1), …, q(v_K), 1 − Σ_k q(v_k)),    q = softmax(s/T)
//! on the K + 1 outcomes "the stored token v_k" and "a token off the store" (the tail bucket, last),
//! S = {v_1, …, v_K} the stored ids of the position, p the teacher at the store's temperature T.
//! A divergence D on a store means D(p̃, q̃). For an f-divergence (KL, JSD, skew KL, TVD) this is at
//! most D(p, q) (data processing), equal when every token is stored; each loss's first comment says
//! what it is on a store, or why it refuses.
//!
//! The student's side, stably (never log(1 − Σ q), which cancels when the stored mass nears 1):
//!   log q(v_k) = gather(s/T, v_k) − logsumexp_v(s_v/T)
//!   log q̃_tail = logsumexp_{v ∉ S}(s_v/T) − logsumexp_v(s_v/T)   (stored ids scattered to −inf)
//! The teacher's side: log p̃ = (logprobs, log_tail); log_tail = −inf only when the teacher gives the
//! tokens off the store no mass at all (a store computes it as a log-sum-exp: a sharp teacher's
//! tail of 1e−60 stays in, and with it the student's tail in the student's normalisation).
//! Padding slots (logprob −inf) and a bucket of teacher mass 0 lie outside the support on both sides
//! (the losses' convention, losses/mod.rs): they leave every sum and the student is renormalised over
//! the rest. The losses then receive the "logits" T·log p̃ and T·log q̃: their own division by T gives
//! back log p̃ and log q̃ (up to one rounding), so every factor that depends on T (hinton's T²) stays
//! right, and their log_softmax renormalises p̃ (a store's rounded log-probabilities and tail sum to 1
//! only up to that rounding). The gradient reaches the student's logits through the gather and the
//! two log-sum-exps; the teacher is a constant.
use super::compute_kind;
use crate::teacher::SparseDist;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// A store's signal at some positions reduced together with the student's logits there. Every
/// tensor has the student's leading shape `[...]` (positions flattened in the store's order).
#[derive(Debug)]
pub struct Reduced {
    /// T·log q̃ `[..., K+1]`, with the graph to the student's logits; −inf on padding slots, and on
    /// the bucket when no token is off the store
    pub student: Tensor,
    /// T·log p̃ `[..., K+1]`, no graph; −inf on padding slots, and on the bucket when m = 0
    pub teacher: Tensor,
    /// the stored ids `[..., K]` i64
    pub indices: Tensor,
    /// `[..., K]` bool: the slot holds a stored token (not padding)
    pub stored: Tensor,
    /// the store's temperature T
    pub temperature: f64,
}

impl Reduced {
    /// The reduced pair for student logits `[..., V]` (ids in the student's vocabulary) and a store's
    /// signal at the same N = Π[...] positions.
    pub fn new(student: &Tensor, signal: &SparseDist) -> Result<Reduced> {
        Ok(Self::build(student, signal, None)?.0)
    }

    /// The reduced pair with the student's side computed by hand ([`ByHand`]) from `logits` (N, V)
    /// f32 without a graph, whose buffer it takes over: `student` is then a leaf (N, K+1), log q̃
    /// times T, and `ByHand::logits_grad` turns its gradient into the logits' (N, V).
    pub fn by_hand(logits: Tensor, signal: &SparseDist) -> Result<(Reduced, ByHand)> {
        let (r, h) = Self::build(&logits.shallow_clone(), signal, Some(logits))?;
        Ok((r, h.expect("built by hand")))
    }

    fn build(
        student: &Tensor,
        signal: &SparseDist,
        by_hand: Option<Tensor>,
    ) -> Result<(Reduced, Option<ByHand>)> {
        let temperature = signal.temperature;
        super::check_temperature("teacher store", temperature)?;
        let shape = student.size();
        if shape.is_empty() || !student.is_floating_point() {
            return Err(Error::Shape(format!(
                "teacher store: 'student' has shape {shape:?} and kind {:?}, expected float [..., V]",
                student.kind()
            )));
        }
        let lead = &shape[..shape.len() - 1];
        let v = shape[shape.len() - 1];
        let n: i64 = lead.iter().product();
        let idx_shape = signal.indices.size();
        if idx_shape.len() != 2 || idx_shape[0] != n || idx_shape[1] < 1 {
            return Err(Error::Shape(format!(
                "teacher store: 'indices' has shape {idx_shape:?}, expected [{n}, K ≥ 1] (one row per \
                 student position)"
            )));
        }
        let k = idx_shape[1];
        if signal.logprobs.size() != idx_shape {
            return Err(Error::Shape(format!(
                "teacher store: 'logprobs' has shape {:?}, expected {idx_shape:?} (the indices')",
                signal.logprobs.size()
            )));
        }
        if signal.log_tail.size() != [n] {
            return Err(Error::Shape(format!(
                "teacher store: 'log_tail' has shape {:?}, expected [{n}]",
                signal.log_tail.size()
            )));
        }
        let device = student.device();
        let kind = compute_kind(student);
        let with_k = |x: &Tensor| -> Result<Tensor> {
            let mut s = lead.to_vec();
            s.push(k);
            Ok(x.f_to_device(device)?.f_reshape(s)?)
        };
        let indices = with_k(&signal.indices.f_to_kind(Kind::Int64)?)?; // [..., K]
                                                                        // the range check reads back from the device: skipped for a store checked when it was read
        if !super::is_trusted() && indices.numel() > 0 {
            let (lo, hi) = (
                indices.f_min()?.f_int64_value(&[])?,
                indices.f_max()?.f_int64_value(&[])?,
            );
            if lo < 0 || hi >= v {
                return Err(Error::Invalid(format!(
                    "teacher store: a stored id lies outside the student's vocabulary [0, {v}) \
                     (ids {lo}..={hi})"
                )));
            }
        }
        let logprobs = with_k(&signal.logprobs.f_to_kind(kind)?)?.f_detach()?; // [..., K]
        let stored = logprobs.f_isneginf()?.f_logical_not()?;
        let q = match &by_hand {
            None => student_log_probs(student, &indices, &stored, temperature)?, // [..., K+1]
            Some(_) => Tensor::f_empty([0], (kind, device))?,
        };
        // log m as stored (−inf only for a tail with no mass at all)
        let tail = signal
            .log_tail
            .f_to_device(device)?
            .f_to_kind(kind)?
            .f_reshape(lead)?
            .f_unsqueeze(-1)?;
        let p = Tensor::f_cat(&[logprobs, tail], -1)?.f_detach()?; // [..., K+1]
        let times_t = |x: Tensor| -> Result<Tensor> {
            Ok(if temperature == 1.0 {
                x
            } else {
                x.f_mul_scalar(temperature)?
            })
        };
        let (q, hand) = match by_hand {
            None => (q, None),
            Some(logits) => {
                if logits.kind() != Kind::Float || logits.requires_grad() || logits.dim() != 2 {
                    return Err(Error::Invalid(format!(
                        "teacher store: the by-hand reduction takes f32 logits (N, V) without a \
                         graph, got {:?} {:?}",
                        logits.kind(),
                        logits.size()
                    )));
                }
                let idx = indices.f_reshape([n, k])?;
                let ok = stored.f_reshape([n, k])?;
                let (q, h) = ByHand::new(logits, idx, ok, temperature)?;
                (
                    q.f_reshape(shape_k1(lead, k))?.f_set_requires_grad(true)?,
                    Some(h),
                )
            }
        };
        let reduced = Reduced {
            student: times_t(q.shallow_clone())?,
            teacher: times_t(p)?,
            indices,
            stored,
            temperature,
        };
        Ok((reduced, hand.map(|h| h.with_leaf(q))))
    }

    /// K, the stored slots per position.
    pub fn slots(&self) -> i64 {
        *self.indices.size().last().unwrap_or(&0)
    }
}

/// Whether a loss at temperature `a` may read a store captured at `b`: equal up to an f32 rounding
/// (a store may keep its temperature as an f32 number).
pub fn same_temperature(a: f64, b: f64) -> bool {
    (a - b).abs() <= f64::from(f32::EPSILON) * a.abs().max(b.abs())
}

/// log q̃ `[..., K+1]` of student logits `s` `[..., V]` at temperature T: log q(v_k) for the stored
/// ids `indices` `[..., K]` (−inf where `stored` is false: padding), then the tail bucket's
/// log Σ_{v ∉ S} q(v) (−inf when every id is stored). The bucket's log-sum-exp is written out so that
/// an empty tail gives −inf with a zero gradient (autograd's logsumexp gives NaN there).
pub fn student_log_probs(
    s: &Tensor,
    indices: &Tensor,
    stored: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let kind = compute_kind(s);
    let x = s.f_to_kind(kind)?;
    let x = if temperature == 1.0 {
        x
    } else {
        x.f_div_scalar(temperature)?
    }; // [..., V]
    let lse = x.f_logsumexp([-1], true)?; // [..., 1]
    let on = x
        .f_gather(-1, indices, false)?
        .f_sub(&lse)?
        .f_masked_fill(&stored.f_logical_not()?, f64::NEG_INFINITY)?; // [..., K]
    let off = x.f_scatter_value(-1, indices, f64::NEG_INFINITY)?; // [..., V], stored ids −inf
    let zero = Tensor::f_zeros([], (kind, x.device()))?;
    let m = off.f_amax([-1], true)?.f_detach()?; // [..., 1], −inf for an empty tail
    let m = m.f_where_self(&m.f_isfinite()?, &zero)?;
    let sum = off.f_sub(&m)?.f_exp()?.f_sum_dim_intlist(-1, true, kind)?; // [..., 1]
    let nonempty = sum.f_gt(0.0)?;
    let one = Tensor::f_ones([], (kind, x.device()))?;
    let neg_inf = Tensor::f_full([], f64::NEG_INFINITY, (kind, x.device()))?;
    let tail = sum
        .f_where_self(&nonempty, &one)?
        .f_log()?
        .f_add(&m)?
        .f_sub(&lse)?
        .f_where_self(&nonempty, &neg_inf)?; // [..., 1]
    Ok(Tensor::f_cat(&[on, tail], -1)?)
}

fn shape_k1(lead: &[i64], k: i64) -> Vec<i64> {
    let mut s = lead.to_vec();
    s.push(k + 1);
    s
}

/// log q̃ of a store's reduced pair and its backward, by hand, for logits s (N, V) that have no
/// graph (the chunked step's, `train/step.rs`), in place in their buffer. With x = s/T, S the stored
/// ids of a row (valid slots) and Ŝ the others:
///   lse_off = log Σ_{v∈Ŝ} e^{x_v},  lse = log(e^{lse_off} + Σ_{k∈S} e^{x_k})
///   log q̃_k = x_k − lse,  log q̃_tail = lse_off − lse
/// and, with g = ∂L/∂log q̃ (g zero on padding slots and on an empty tail, as autograd gives for
/// the masked entries of `student_log_probs`) and Σg its row sum,
///   ∂L/∂x_v = g_tail·e^{x_v − lse_off} − Σg·e^{x_v − lse}     v ∈ Ŝ
///   ∂L/∂x_k = g_k − Σg·e^{x_k − lse}                             k ∈ S
///   ∂L/∂s = ∂L/∂x / T.
/// The tail's sum runs over the off-store entries alone (scaled by their own maximum), so it is
/// exact however close the stored mass comes to 1, as `student_log_probs`'s is. The buffer holds,
/// in turn, x, x with the stored entries at −inf, e^{x − m_off}, and the gradient: five passes over
/// (N, V) and no (N, V) temporary, where autograd's backward of `student_log_probs` allocates about
/// ten. It relies on `SparseDist`'s contract (valid ids distinct, a padding slot repeating a valid
/// id of its row): then S and Ŝ cover the vocabulary and lse is `student_log_probs`'s. A row
/// without any valid slot (a position of weight 0 whose ids were all mapped away) gets a finite,
/// unnormalised q̃, which its weight of 0 leaves out.
#[derive(Debug)]
pub struct ByHand {
    /// (N, V): e^{x_v − m_off} off the store, 0 on it
    buf: Tensor,
    /// (N, K) stored ids, (N, K) valid slots, (N, K) x at the stored ids
    indices: Tensor,
    stored: Tensor,
    x_k: Tensor,
    /// (N, 1): m_off (0 for an empty tail), lse_off (−inf for an empty tail), lse
    m_off: Tensor,
    lse_off: Tensor,
    lse: Tensor,
    temperature: f64,
    /// the leaf log q̃ (N·…, K+1) whose gradient `logits_grad` reads
    leaf: Option<Tensor>,
}

impl ByHand {
    fn new(mut x: Tensor, indices: Tensor, stored: Tensor, t: f64) -> Result<(Tensor, ByHand)> {
        tch::no_grad(|| {
            if t != 1.0 {
                let _ = x.f_div_scalar_(t)?;
            }
            let x_k = x.f_gather(-1, &indices, false)?; // (N, K)
            let _ = x.f_scatter_value_(-1, &indices, f64::NEG_INFINITY)?;
            let m = x.f_amax([-1], true)?; // (N, 1), −inf for an empty tail
            let zero = Tensor::f_zeros([], (Kind::Float, x.device()))?;
            let m_off = m.f_where_self(&m.f_isfinite()?, &zero)?;
            let _ = x.f_sub_(&m_off)?.f_exp_()?; // e^{x − m_off}, 0 on the store
            let lse_off = x
                .f_sum_dim_intlist(-1, true, Kind::Float)?
                .f_log()?
                .f_add(&m_off)?; // −inf for an empty tail
            let on = x_k.f_masked_fill(&stored.f_logical_not()?, f64::NEG_INFINITY)?;
            let lse = Tensor::f_cat(&[&on, &lse_off], -1)?.f_logsumexp([-1], true)?;
            let q = Tensor::f_cat(&[on.f_sub(&lse)?, lse_off.f_sub(&lse)?], -1)?; // (N, K+1)
            Ok((
                q,
                ByHand {
                    buf: x,
                    indices,
                    stored,
                    x_k,
                    m_off,
                    lse_off,
                    lse,
                    temperature: t,
                    leaf: None,
                },
            ))
        })
    }

    fn with_leaf(mut self, leaf: Tensor) -> ByHand {
        self.leaf = Some(leaf);
        self
    }

    /// ∂L/∂s (N, V) from the gradient the objective's backward left on the leaf log q̃; None when
    /// the objective did not reach it. Consumes the buffer.
    pub fn logits_grad(self) -> Result<Option<Tensor>> {
        let g = match &self.leaf {
            Some(l) if l.grad().defined() => l.grad(),
            _ => return Ok(None),
        };
        tch::no_grad(|| {
            let k = self.indices.size()[1];
            let g = g.f_reshape([-1, k + 1])?;
            let zero = Tensor::f_zeros([], (Kind::Float, g.device()))?;
            let g_k = g.f_narrow(1, 0, k)?.f_where_self(&self.stored, &zero)?; // (N, K)
            let nonempty = self.lse_off.f_isfinite()?; // (N, 1)
            let g_t = g.f_narrow(1, k, 1)?.f_where_self(&nonempty, &zero)?; // (N, 1)
            let sum_g = g_k.f_sum_dim_intlist(-1, true, Kind::Float)?.f_add(&g_t)?;
            // off the store: buf · (g_t e^{m_off − lse_off} − Σg e^{m_off − lse}) / T
            let tail_scale = self
                .m_off
                .f_sub(&self.lse_off.f_where_self(&nonempty, &zero)?)?
                .f_exp()?
                .f_mul(&g_t)?;
            let a = tail_scale
                .f_sub(&sum_g.f_mul(&self.m_off.f_sub(&self.lse)?.f_exp()?)?)?
                .f_div_scalar(self.temperature)?;
            let mut buf = self.buf;
            let _ = buf.f_mul_(&a)?; // 0 on the store
                                     // on the store: (g_k − Σg e^{x_k − lse}) / T, nothing from a padding slot
            let on = g_k
                .f_sub(&sum_g.f_mul(&self.x_k.f_sub(&self.lse)?.f_exp()?)?)?
                .f_where_self(&self.stored, &zero)?
                .f_div_scalar(self.temperature)?;
            let _ = buf.f_scatter_add_(-1, &self.indices, &on)?;
            Ok(Some(buf))
        })
    }
}
