//! Token-selective KD (TSD-KD), three parts, each callable alone, summed with weights 1 / 1 / 0.1:
//!   1. weighted JSD: per token w = sigmoid(H(q) − H(p)) (detached) times JSD(β = 0.9); the student
//!      learns most where it is less certain than the teacher. Mean over counted tokens.
//!   2. entropy: mean H(q) over the counted tokens whose H(q) is at least the 0.1-quantile of H(q)
//!      over counted tokens (quantile detached, linear interpolation as `torch.quantile`).
//!   3. ranking: the student's top-K (10) candidates ordered by teacher logit, π; Plackett-Luce
//!      negative log-likelihood of that order under the student's scores in the standard suffix form
//!      Σ_k (logsumexp_{l≥k} s_{π_l} − s_{π_k}); mean over counted tokens. Its gradient descent raises
//!      the teacher-preferred candidate. The published code sums the prefix instead, which optimises
//!      the reverse order; this is the paper's intended objective.
//!
//! H(x) = −Σ x log x; p = softmax(t/T), q = softmax(s/T) (T = 1 by default).
//!
//! On a stored (sparse) teacher (T = the store's temperature), part by part:
//!   1. the same formula on the K + 1 reduced outcomes: sigmoid(H(q̃) − H(p̃))·JSD_β(p̃, q̃) (both
//!      entropies reduced, so that the selection compares like with like; H(p) itself needs the tail);
//!   2. unchanged: it reads only the student (its full H(q));
//!   3. the student's top-K candidates ranked by their stored p̃, those off the store after every
//!      stored one, and only the stored candidates' ranks summed (Σ_k stored_k·(…)); each of those
//!      terms is the dense one (every token off the store ranks below the teacher's stored top set),
//!      except when the label is a candidate stored outside that top set: the store does not say which
//!      unstored candidates rank above it, and it is put above them.
use super::jsd::jsd_of;
use super::pld::plackett_luce_suffix;
use super::registry::{Loss, LossInput, LossSpec, ParamSpec, Range, Reads, TEMPERATURE};
use super::{check_pair, check_temperature, distributions, masked_mean, weights_of, Reduced};
use crate::{Error, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenSelectiveConfig {
    pub beta: f64,
    pub entropy_quantile: f64,
    pub top_k: usize,
    pub temperature: f64,
    pub w_jsd: f64,
    pub w_entropy: f64,
    pub w_rank: f64,
}

impl Default for TokenSelectiveConfig {
    fn default() -> Self {
        TokenSelectiveConfig {
            beta: 0.9,
            entropy_quantile: 0.1,
            top_k: 10,
            temperature: 1.0,
            w_jsd: 1.0,
            w_entropy: 1.0,
            w_rank: 0.1,
        }
    }
}

fn entropy(d: &super::Dist) -> Result<Tensor> {
    let kind = d.kind();
    Ok(d.prob()?
        .f_mul(&d.logp)?
        .f_sum_dim_intlist(-1, false, kind)?
        .f_neg()?)
}

/// Part 1: mean over counted tokens of sigmoid(H(q) − H(p))·JSD_β(p, q).
pub fn weighted_jsd(
    s: &Tensor,
    t: &Tensor,
    beta: f64,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    super::check_unit("token_selective", "beta", beta)?;
    // one pair of distributions serves the weight and the divergence
    let (q, p) = super::checked_distributions("token_selective", s, t, temperature)?;
    let w = entropy(&q)?.f_sub(&entropy(&p)?)?.f_sigmoid()?.f_detach()?;
    masked_mean(
        "token_selective",
        &w.f_mul(&jsd_of(&q, &p, beta)?)?,
        weights,
    )
}

/// Part 2: mean H(q) over counted tokens with H(q) ≥ the `quantile` of H(q) over counted tokens.
pub fn entropy_term(
    s: &Tensor,
    quantile: f64,
    temperature: f64,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    super::check_unit("token_selective", "entropy_quantile", quantile)?;
    check_temperature("token_selective", temperature)?;
    let (q, _) = distributions(s, &s.f_detach()?, temperature)?;
    let h = entropy(&q)?;
    let w = weights_of("token_selective", weights, &h.size(), &h)?;
    let counted = w.f_ne(0.0)?;
    let values = h.f_detach()?.f_masked_select(&counted)?;
    if values.numel() == 0 {
        return masked_mean("token_selective", &h, Some(&w));
    }
    // the quantile is over the counted tokens (weight > 0), unweighted; the mean is weighted
    let threshold = values.f_quantile_scalar(quantile, None::<i64>, false, "linear")?;
    let keep = h.f_detach()?.f_ge_tensor(&threshold)?;
    masked_mean(
        "token_selective",
        &h,
        Some(&w.f_mul(&keep.f_to_kind(w.kind())?)?),
    )
}

/// Part 3: Plackett-Luce NLL of the teacher's order of the student's top-K candidates.
pub fn ranking_term(
    s: &Tensor,
    t: &Tensor,
    top_k: usize,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    check_pair("token_selective", s, t)?;
    if top_k == 0 {
        return Err(Error::Invalid(
            "token_selective: top_k must be positive".into(),
        ));
    }
    let kind = super::compute_kind(s);
    let k = (top_k as i64).min(*s.size().last().unwrap_or(&1));
    let s = s.f_to_kind(kind)?;
    let (_, cand) = s.f_detach()?.f_topk(k, -1, true, true)?; // (…, K) student's candidates
    let t_c = t.f_to_kind(kind)?.f_detach()?.f_gather(-1, &cand, false)?;
    let (_, order) = t_c.f_sort_stable(true, -1, true)?; // teacher's preference among them
    let ranked = s.f_gather(-1, &cand.f_gather(-1, &order, false)?, false)?;
    let ones = Tensor::f_ones_like(&ranked)?;
    let per = plackett_luce_suffix(&ranked, &ones)?;
    masked_mean("token_selective", &per, weights)
}

/// Part 3 on a store's reduced pair `r`: the student's top-K candidates (from its logits `s`
/// `[..., V]`) by descending stored p̃, the candidates off the store last (student order) and
/// weighted 0 in the Plackett-Luce sum.
pub fn ranking_term_reduced(
    s: &Tensor,
    r: &Reduced,
    top_k: usize,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    if top_k == 0 {
        return Err(Error::Invalid(
            "token_selective: top_k must be positive".into(),
        ));
    }
    let kind = super::compute_kind(s);
    let k = (top_k as i64).min(*s.size().last().unwrap_or(&1));
    let s = s.f_to_kind(kind)?;
    let (_, cand) = s.f_detach()?.f_topk(k, -1, true, true)?; // (…, Kc) student's candidates
    let hit = cand
        .f_unsqueeze(-1)?
        .f_eq_tensor(&r.indices.f_unsqueeze(-2)?)?
        .f_logical_and(&r.stored.f_unsqueeze(-2)?)?; // (…, Kc, K): candidate c is stored in slot j
    let neg_inf = Tensor::f_full([], f64::NEG_INFINITY, (r.teacher.kind(), s.device()))?;
    let key = r
        .teacher
        .f_narrow(-1, 0, r.slots())?
        .f_unsqueeze(-2)?
        .f_where_self(&hit, &neg_inf)?
        .f_amax([-1], false)?; // (…, Kc): T·log p̃ of the candidate, −inf off the store
    let known = hit.f_any_dim(-1, false)?;
    let (_, order) = key.f_sort_stable(true, -1, true)?;
    let ranked = s.f_gather(-1, &cand.f_gather(-1, &order, false)?, false)?;
    let w = known.f_gather(-1, &order, false)?.f_to_kind(kind)?;
    let per = plackett_luce_suffix(&ranked, &w)?;
    masked_mean("token_selective", &per, weights)
}

/// The weighted sum of the three parts.
pub fn token_selective(
    s: &Tensor,
    t: &Tensor,
    cfg: &TokenSelectiveConfig,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    weighted_sum(
        s,
        cfg,
        weights,
        || weighted_jsd(s, t, cfg.beta, cfg.temperature, weights),
        || ranking_term(s, t, cfg.top_k, weights),
    )
}

/// The weighted sum of the three parts on a store's reduced pair `r` (at temperature
/// `cfg.temperature`), `s` the student's logits `[..., V]`.
pub fn token_selective_reduced(
    s: &Tensor,
    r: &Reduced,
    cfg: &TokenSelectiveConfig,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    weighted_sum(
        s,
        cfg,
        weights,
        || weighted_jsd(&r.student, &r.teacher, cfg.beta, cfg.temperature, weights),
        || ranking_term_reduced(s, r, cfg.top_k, weights),
    )
}

fn weighted_sum(
    s: &Tensor,
    cfg: &TokenSelectiveConfig,
    weights: Option<&Tensor>,
    jsd: impl FnOnce() -> Result<Tensor>,
    rank: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let mut total = Tensor::f_zeros([], (super::compute_kind(s), s.device()))?;
    if cfg.w_jsd != 0.0 {
        total = total.f_add(&jsd()?.f_mul_scalar(cfg.w_jsd)?)?;
    }
    if cfg.w_entropy != 0.0 {
        total = total.f_add(
            &entropy_term(s, cfg.entropy_quantile, cfg.temperature, weights)?
                .f_mul_scalar(cfg.w_entropy)?,
        )?;
    }
    if cfg.w_rank != 0.0 {
        total = total.f_add(&rank()?.f_mul_scalar(cfg.w_rank)?)?;
    }
    Ok(total.f_to_kind(if s.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    })?)
}

// ---------------------------------------------------------------- run-file kind

pub const TOKEN_SELECTIVE: LossSpec = LossSpec {
    name: "token_selective",
    summary: "w_jsd·weighted JSD(β) + w_entropy·selective H(q) + w_rank·Plackett-Luce top-K",
    params: &[
        TEMPERATURE,
        ParamSpec {
            name: "beta",
            default: 0.9,
            range: Range::Unit,
            doc: "JSD's β",
        },
        ParamSpec {
            name: "top_k",
            default: 10.0,
            range: Range::Count,
            doc: "the student's candidates ranked by the teacher",
        },
        ParamSpec {
            name: "entropy_quantile",
            default: 0.1,
            range: Range::Unit,
            doc: "tokens with H(q) at or above this quantile enter the entropy term",
        },
        ParamSpec {
            name: "w_jsd",
            default: 1.0,
            range: Range::NonNegative,
            doc: "weight of part 1",
        },
        ParamSpec {
            name: "w_entropy",
            default: 1.0,
            range: Range::NonNegative,
            doc: "weight of part 2",
        },
        ParamSpec {
            name: "w_rank",
            default: 0.1,
            range: Range::NonNegative,
            doc: "weight of part 3",
        },
    ],
    reads: Reads::Logits,
    build: |p, _| {
        Ok(Box::new(TokenSelective(TokenSelectiveConfig {
            beta: p.get("beta"),
            entropy_quantile: p.get("entropy_quantile"),
            top_k: p.count("top_k"),
            temperature: p.get("temperature"),
            w_jsd: p.get("w_jsd"),
            w_entropy: p.get("w_entropy"),
            w_rank: p.get("w_rank"),
        })))
    },
};

#[derive(Debug)]
struct TokenSelective(TokenSelectiveConfig);

impl Loss for TokenSelective {
    fn spec(&self) -> &'static LossSpec {
        &TOKEN_SELECTIVE
    }
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        Some(("temperature", self.0.temperature))
    }
    fn compute(&self, x: &LossInput) -> Result<Tensor> {
        if let Some(r) = x.reduced_at("token_selective", self.0.temperature)? {
            return token_selective_reduced(x.student, r, &self.0, Some(x.weights));
        }
        token_selective(
            x.student,
            x.teacher("token_selective")?,
            &self.0,
            Some(x.weights),
        )
    }
    /// The entropy quantile spans every counted position of the micro-batch.
    fn per_position(&self) -> bool {
        false
    }
}
