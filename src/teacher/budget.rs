//! A teacher-query budget: the teacher's signal (live or from a store) is obtained for
//! k = ⌈budget · N⌉ of the N training sequences only, chosen once before the first step by a rule.
//! Per sequence i, over its counted target positions t (token weights w_t > 0), with q_t the
//! student's and p_t the teacher's next-token distribution (both at T = 1, on the shared
//! vocabulary prefix) and y_t the label:
//!   uncertainty: s_i = Σ_t w_t H(q_t) / Σ_t w_t,  H(q) = −Σ_v q(v) log q(v)    (highest first)
//!   rad:         s_i = Σ_t w_t g_t c_t / Σ_t w_t,  g_t = 1 − (q_t(1st) − q_t(2nd)),  c_t = p_t(y_t)
//!   kd3:         s_i = Σ_t w_t max_v ½(p_t(v) + q_t(v)) / Σ_t w_t                 (highest first)
//!   random:      the first k of a Fisher–Yates permutation drawn from SplitMix64(seed ^ BUDGET)
//! and the chosen set is the k highest scores (ties: the lower index first); a sequence with no
//! counted position scores −∞ (null in the record). The set is recorded in the checkpoint
//! (`TrainState::budget`), so that a resume uses it, and in a `{"kind": "budget"}` record.
//!
//! RAD (Baykal, Trinh, Iliopoulos, Menghani, Vee, "Robust Active Distillation", ICLR 2023):
//! query the soft labels of points that are both informative (gain = 1 − the student's margin)
//! and likely labelled correctly by the teacher. Differences: the paper derives a randomised
//! sampling distribution from a game between the learner and an adversary that corrupts the
//! teacher's labels, for unlabelled data where the teacher's correctness is unknown; here the
//! data has labels, so the probability that the teacher is right at a position is read directly
//! as p_t(y_t) (this needs a teacher pass over the training data, the cost the budget saves
//! afterwards), and the trade-off is the product g·c taken deterministically top-k, per sequence
//! as a mean over its positions. No published code was compared with.
//!
//! KD³ (Tang, Chen, Niu, Sugiyama, Gong, "Distribution Shift Matters for Knowledge Distillation
//! with Webly Collected Images", ICCV 2023): keep the web instances that teacher and student,
//! their predictions combined, classify confidently. Differences: the paper averages the two
//! predictions and keeps instances whose combined confidence passes a threshold, re-selected as
//! training goes; here the combined confidence max ½(p + q) is averaged over a sequence's
//! positions and the top k are kept, once (a budget, not a threshold). It also needs a teacher
//! pass over the training data.
//!
//! The sequences outside the set train with cross-entropy on their labels (`unselected =
//! "cross_entropy"`: the micro-batch splits into the chosen rows, which see the whole objective
//! and the teacher, and the others, which see cross-entropy alone, each scaled by its share of the
//! micro-batch's token weights; the teacher never sees an unselected row) or are never drawn
//! (`unselected = "skip"`: the sampler permutes the chosen rows only).
use crate::config::{issue, Checked};
use crate::data::{Batch, Sequence};
use crate::generate::SplitMix64;
use crate::model::Llama;
use crate::teacher::{TeacherDist, TeacherSignal};
use crate::{Error, Result};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

/// How the budgeted sequences are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    Uncertainty,
    Rad,
    Kd3,
    Random,
}

impl Selection {
    pub const NAMES: &'static str = "uncertainty, rad, kd3, random";

    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "uncertainty" => Selection::Uncertainty,
            "rad" => Selection::Rad,
            "kd3" => Selection::Kd3,
            "random" => Selection::Random,
            _ => {
                return Err(format!(
                    "unknown rule '{s}', expected one of {}",
                    Self::NAMES
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Selection::Uncertainty => "uncertainty",
            Selection::Rad => "rad",
            Selection::Kd3 => "kd3",
            Selection::Random => "random",
        }
    }

    /// Whether the scores read the student's / the teacher's distribution.
    pub fn needs_student(self) -> bool {
        self != Selection::Random
    }
    pub fn needs_teacher(self) -> bool {
        matches!(self, Selection::Rad | Selection::Kd3)
    }
}

/// What the sequences outside the set do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unselected {
    CrossEntropy,
    Skip,
}

/// `[teacher] budget, selection, unselected`, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// the share of training sequences, in (0, 1]
    pub share: f64,
    pub selection: Selection,
    pub unselected: Unselected,
}

impl Budget {
    /// From the run file's keys; None when none of them is given.
    pub fn resolve(
        share: Option<f64>,
        selection: Option<&str>,
        unselected: Option<&str>,
    ) -> Checked<Option<Budget>> {
        if share.is_none() && selection.is_none() && unselected.is_none() {
            return Ok(None);
        }
        let share = share.unwrap_or(1.0);
        if !(share > 0.0 && share <= 1.0) {
            return Err(issue(
                "teacher.budget",
                format!("must be a share in (0, 1], got {share}"),
            ));
        }
        let selection = Selection::parse(selection.unwrap_or("random"))
            .map_err(|m| issue("teacher.selection", m))?;
        let unselected = match unselected.unwrap_or("cross_entropy") {
            "cross_entropy" => Unselected::CrossEntropy,
            "skip" => Unselected::Skip,
            u => {
                return Err(issue(
                    "teacher.unselected",
                    format!("unknown value '{u}', expected one of cross_entropy, skip"),
                ))
            }
        };
        Ok(Some(Budget {
            share,
            selection,
            unselected,
        }))
    }

    /// k = ⌈share · n⌉ (at least 1 when n > 0).
    pub fn count(&self, n: usize) -> usize {
        ((self.share * n as f64).ceil() as usize).clamp(n.min(1), n)
    }

    pub fn describe(&self) -> String {
        format!(
            "budget = {}, selection = {}, unselected = {}",
            self.share,
            self.selection.name(),
            match self.unselected {
                Unselected::CrossEntropy => "cross_entropy",
                Unselected::Skip => "skip",
            }
        )
    }
}

/// The chosen set, as a checkpoint (and a budgeted store's `budget.json`) records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BudgetState {
    pub share: f64,
    pub selection: String,
    /// indices of the chosen training sequences, ascending
    pub chosen: Vec<usize>,
    /// their keys (`Sequence::key`), in the same order
    pub keys: Vec<u64>,
    /// training rows sent to the teacher so far
    #[serde(default)]
    pub teacher_rows: u64,
}

/// A selection: the chosen indices (ascending) and every sequence's score (None for `random`).
#[derive(Debug, Clone)]
pub struct Chosen {
    pub chosen: Vec<usize>,
    pub scores: Option<Vec<f64>>,
}

/// The k indices of a seeded uniform choice among n, ascending.
pub fn random_choice(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut g = SplitMix64::new(seed ^ 0x4255_4447_4554_0000);
    let mut p: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (g.next_u64() % (n - i) as u64) as usize;
        p.swap(i, j);
    }
    let mut out = p[..k.min(n)].to_vec();
    out.sort_unstable();
    out
}

/// The k highest scores' indices (ties: lower index first), ascending.
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    // −∞ (nothing counted) last; NaN never occurs (finite models), but would sort last too
    idx.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.cmp(&b))
    });
    let mut out = idx[..k.min(idx.len())].to_vec();
    out.sort_unstable();
    out
}

/// Per-position scores of a rule, (N) f64. `s`: student logits (N, Vs); `t`: the teacher's
/// logits (N, Vt) when the rule reads them; `labels` (N) i64 (any value where weight is 0).
pub fn position_scores(
    rule: Selection,
    s: &Tensor,
    t: Option<&Tensor>,
    labels: &Tensor,
) -> Result<Tensor> {
    let need_t = || {
        t.ok_or_else(|| {
            Error::Invalid(format!(
                "selection '{}' needs the teacher's distribution",
                rule.name()
            ))
        })
    };
    // both sides on the shared vocabulary prefix, as the objective compares them
    let width = |x: &Tensor| *x.size().last().unwrap_or(&0);
    let v = match t {
        Some(t) if rule.needs_teacher() => width(s).min(width(t)),
        _ => width(s),
    };
    let log_q = s
        .f_narrow(-1, 0, v)?
        .f_to_kind(Kind::Double)?
        .f_log_softmax(-1, Kind::Double)?; // (N, v)
    let q = log_q.f_exp()?;
    Ok(match rule {
        Selection::Uncertainty => q
            .f_mul(&log_q)?
            .f_sum_dim_intlist(-1, false, Kind::Double)?
            .f_neg()?,
        Selection::Rad => {
            let top = q.f_topk(2.min(v), -1, true, true)?.0; // (N, 2)
            let margin = if v >= 2 {
                top.f_select(1, 0)?.f_sub(&top.f_select(1, 1)?)?
            } else {
                top.f_select(1, 0)?
            };
            let gain = margin.f_neg()?.f_add_scalar(1.0)?;
            let p = need_t()?
                .f_narrow(-1, 0, v)?
                .f_to_kind(Kind::Double)?
                .f_softmax(-1, Kind::Double)?;
            let y = labels.f_clamp(0, v - 1)?.f_unsqueeze(-1)?;
            gain.f_mul(&p.f_gather(-1, &y, false)?.f_squeeze_dim(-1)?)?
        }
        Selection::Kd3 => {
            let p = need_t()?
                .f_narrow(-1, 0, v)?
                .f_to_kind(Kind::Double)?
                .f_softmax(-1, Kind::Double)?;
            p.f_add(&q)?.f_mul_scalar(0.5)?.f_amax(-1, false)?
        }
        Selection::Random => Tensor::f_zeros([s.size()[0]], (Kind::Double, s.device()))?,
    })
}

/// Every training sequence's score under `rule` (student and, for rad/kd3, the teacher run over
/// the sequences in batches of `batch_rows`, without a graph).
pub fn sequence_scores(
    rule: Selection,
    student: &Llama,
    teacher: Option<&dyn TeacherSignal>,
    train: &[Sequence],
    batch_rows: usize,
) -> Result<Vec<f64>> {
    let device = student.device();
    let mut out = Vec::with_capacity(train.len());
    let idx: Vec<usize> = (0..train.len()).collect();
    for rows in idx.chunks(batch_rows.max(1)) {
        let batch = Batch::new(train, rows, device)?;
        let (b, tl) = batch.shape();
        let scores = tch::no_grad(|| -> Result<Tensor> {
            let (labels, weights) = batch.flat_targets()?; // (N), (N)
            let s = student.forward(&batch.ids)?.f_flatten(0, 1)?; // (N, Vs)
            let t = match (rule.needs_teacher(), teacher) {
                (true, Some(sig)) => {
                    let p = sig.prepare(&batch, &[])?;
                    match p.positions(0, p.len())? {
                        TeacherDist::Dense(t) => Some(t),
                        TeacherDist::Sparse(_) => {
                            return Err(Error::Invalid(format!(
                                "selection '{}' needs the teacher's full distribution: give teacher.path, or a store captured with `distill capture --budget`",
                                rule.name()
                            )))
                        }
                    }
                }
                (true, None) => {
                    return Err(Error::Invalid(format!(
                        "selection '{}' needs the teacher model (teacher.path), or a store captured with `distill capture --budget`",
                        rule.name()
                    )))
                }
                (false, _) => None,
            };
            let x = position_scores(rule, &s, t.as_ref(), &labels)?;
            let w = weights.f_to_kind(Kind::Double)?;
            // per row: Σ_t w_t x_t / Σ_t w_t
            let num = x
                .f_mul(&w)?
                .f_view([b, tl])?
                .f_sum_dim_intlist(-1, false, Kind::Double)?;
            let den = w
                .f_view([b, tl])?
                .f_sum_dim_intlist(-1, false, Kind::Double)?;
            Ok(Tensor::f_stack(&[num, den], 0)?.f_to_device(tch::Device::Cpu)?)
        })?;
        let v: Vec<f64> = Vec::<f64>::try_from(scores.f_flatten(0, 1)?)?;
        let (num, den) = v.split_at(b as usize);
        for (n, d) in num.iter().zip(den) {
            out.push(if *d > 0.0 { n / d } else { f64::NEG_INFINITY });
        }
    }
    Ok(out)
}

/// Choose the budget's sequences among `train`.
pub fn select(
    budget: &Budget,
    student: Option<&Llama>,
    teacher: Option<&dyn TeacherSignal>,
    train: &[Sequence],
    seed: u64,
    batch_rows: usize,
) -> Result<Chosen> {
    let k = budget.count(train.len());
    if budget.selection == Selection::Random {
        return Ok(Chosen {
            chosen: random_choice(train.len(), k, seed),
            scores: None,
        });
    }
    if k == train.len() {
        // everything is chosen: no pass over the data
        return Ok(Chosen {
            chosen: (0..k).collect(),
            scores: None,
        });
    }
    let student = student.ok_or_else(|| {
        Error::Invalid(format!(
            "selection '{}' needs the student model",
            budget.selection.name()
        ))
    })?;
    let scores = sequence_scores(budget.selection, student, teacher, train, batch_rows)?;
    Ok(Chosen {
        chosen: top_k(&scores, k),
        scores: Some(scores),
    })
}

impl BudgetState {
    pub fn new(budget: &Budget, chosen: &[usize], train: &[Sequence]) -> Self {
        BudgetState {
            share: budget.share,
            selection: budget.selection.name().to_string(),
            chosen: chosen.to_vec(),
            keys: chosen.iter().map(|&i| train[i].key()).collect(),
            teacher_rows: 0,
        }
    }

    /// The same set on `train`: every recorded key at its index, else Err naming the first
    /// mismatch.
    pub fn check(&self, budget: &Budget, train: &[Sequence]) -> std::result::Result<(), String> {
        if self.share != budget.share || self.selection != budget.selection.name() {
            return Err(format!(
                "the recorded set was chosen with budget = {}, selection = {}; this run asks for budget = {}, selection = {}",
                self.share, self.selection, budget.share, budget.selection.name()
            ));
        }
        if self.chosen.len() != self.keys.len() || self.chosen.len() != budget.count(train.len()) {
            return Err(format!(
                "the recorded set has {} sequences; this run's budget is {} of {}",
                self.chosen.len(),
                budget.count(train.len()),
                train.len()
            ));
        }
        for (&i, &k) in self.chosen.iter().zip(&self.keys) {
            if train.get(i).map(Sequence::key) != Some(k) {
                return Err(format!(
                    "the recorded sequence {i} is not this run's training sequence {i}"
                ));
            }
        }
        Ok(())
    }

    /// The set from keys (a budgeted store's): their indices in `train`, Err naming a missing key.
    pub fn from_keys(
        share: f64,
        selection: &str,
        keys: &[u64],
        train: &[Sequence],
    ) -> std::result::Result<Self, String> {
        let at: std::collections::HashMap<u64, usize> = train
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key(), i))
            .collect();
        let mut pairs = Vec::with_capacity(keys.len());
        for &k in keys {
            let i = at.get(&k).ok_or_else(|| {
                format!("sequence key {k:016x} is not among this run's training sequences")
            })?;
            pairs.push((*i, k));
        }
        pairs.sort_unstable();
        Ok(BudgetState {
            share,
            selection: selection.to_string(),
            chosen: pairs.iter().map(|p| p.0).collect(),
            keys: pairs.iter().map(|p| p.1).collect(),
            teacher_rows: 0,
        })
    }
}

/// The `{"kind": "budget"}` record of a selection.
pub fn record(budget: &Budget, n: usize, chosen: &Chosen, from: &str, seconds: f64) -> Value {
    let finite: Vec<f64> = chosen
        .scores
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            Value::Null
        } else {
            json!(xs.iter().sum::<f64>() / xs.len() as f64)
        }
    };
    let chosen_scores: Vec<f64> = match &chosen.scores {
        Some(s) => chosen
            .chosen
            .iter()
            .map(|&i| s[i])
            .filter(|x| x.is_finite())
            .collect(),
        None => vec![],
    };
    json!({"kind": "budget", "step": 0, "share": budget.share, "selection": budget.selection.name(),
        "unselected": match budget.unselected { Unselected::CrossEntropy => "cross_entropy", Unselected::Skip => "skip" },
        "sequences": n, "chosen": chosen.chosen.len(), "chosen_share": chosen.chosen.len() as f64 / n.max(1) as f64,
        "indices": chosen.chosen, "scores": chosen.scores, "mean_score": mean(&finite),
        "mean_chosen_score": mean(&chosen_scores), "from": from, "seconds": seconds})
}

/// A budgeted store's record of its set: `budget.json` beside `store.json`.
pub const STORE_FILE: &str = "budget.json";

/// Write a store's `budget.json` (atomically).
pub fn write_store_file(dir: &std::path::Path, state: &BudgetState) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::io::write_atomic(&dir.join(STORE_FILE), &bytes)
}

/// A store's `budget.json`, when it has one.
pub fn read_store_file(dir: &std::path::Path) -> Result<Option<BudgetState>> {
    let path = dir.join(STORE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read(&path).map_err(|e| Error::format(&path, e.to_string()))?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| Error::format(&path, e.to_string()))
}
