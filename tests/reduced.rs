//! Divergences on a stored (sparse) teacher signal. Every loss that accepts a store is checked
//! against a float64 reference written plainly here from the reduced definitions (losses/reduced.rs
//! and the first comment of each loss; loops and explicit sums, no code shared with src/losses), its
//! gradient against central finite differences; then the identity "every token stored gives the
//! dense loss", the temperature trick, `check_sparse`'s refusals, evaluation on a store, and the
//! unchanged training step fed by a store. Each tolerance is a bound on rounding error derived below.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]
use distill::data::{Batch, Sequence};
use distill::eval::distill_metrics;
use distill::losses::registry::{self, BuildContext, LossInput};
use distill::losses::{self, Reduced};
use distill::model::{self, LlamaConfig};
use distill::objective::{LossTerm, Objective};
use distill::teacher::{PreparedSignal, SparseDist, TeacherDist, TeacherSignal};
use distill::train::step::{micro_step, StepOptions};
use tch::{Device, Kind, Tensor};

type Row = Vec<f64>;

// ---------- data ----------

struct Lcg(u64);
impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (a, b) = (self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }
}

/// n rows of V normal numbers times `scale`, each an f32 number (an f32 tensor holds exactly what
/// the f64 reference reads).
fn rows(seed: u64, n: usize, v: usize, scale: f64) -> Vec<Row> {
    let mut r = Lcg(seed);
    (0..n)
        .map(|_| (0..v).map(|_| (r.normal() * scale) as f32 as f64).collect())
        .collect()
}

fn log_softmax(x: &[f64]) -> Row {
    let m = x
        .iter()
        .cloned()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
    x.iter().map(|v| v - m - z.ln()).collect()
}

fn scaled(x: &[f64], temp: f64) -> Row {
    x.iter().map(|v| v / temp).collect()
}

/// One position of a store, as a capture writes it (src/teacher/mod.rs): the `keep` most probable
/// tokens of p = softmax(t/T) by descending p, the label appended when it is not among them, padded
/// to `k` slots (logprob −inf, id = the row's first); the tail mass Σ_{v not stored} p(v) summed
/// here token by token. `round` rounds the log-probabilities and the tail's log to f32 (the store's type).
#[derive(Clone)]
struct Stored {
    ids: Vec<i64>,
    lp: Row,
    tail: f64,
}

impl Stored {
    fn valid(&self) -> Vec<usize> {
        (0..self.ids.len())
            .filter(|&j| self.lp[j].is_finite())
            .collect()
    }
    fn lp_of(&self, v: usize) -> Option<f64> {
        self.valid()
            .into_iter()
            .find(|&j| self.ids[j] == v as i64)
            .map(|j| self.lp[j])
    }
}

fn capture(t: &[f64], label: i64, keep: usize, k: usize, temp: f64, round: bool) -> Stored {
    let lp = log_softmax(&scaled(t, temp));
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&a, &b| lp[b].partial_cmp(&lp[a]).unwrap());
    let mut ids: Vec<usize> = order[..keep].to_vec();
    if label >= 0 && !ids.contains(&(label as usize)) {
        ids.push(label as usize);
    }
    assert!(ids.len() <= k);
    let mut tail = 0.0;
    for v in 0..t.len() {
        if !ids.contains(&v) {
            tail += lp[v].exp();
        }
    }
    let r = |x: f64| if round { x as f32 as f64 } else { x };
    let mut out = Stored {
        ids: ids.iter().map(|&v| v as i64).collect(),
        lp: ids.iter().map(|&v| r(lp[v])).collect(),
        // a store keeps log m as f32
        tail: if round {
            (tail.ln() as f32 as f64).exp()
        } else {
            tail
        },
    };
    while out.ids.len() < k {
        out.ids.push(out.ids[0]);
        out.lp.push(f64::NEG_INFINITY);
    }
    out
}

fn sparse(st: &[Stored], temp: f64, kind: Kind) -> SparseDist {
    let (n, k) = (st.len() as i64, st[0].ids.len() as i64);
    let ids: Vec<i64> = st.iter().flat_map(|r| r.ids.clone()).collect();
    let lp: Vec<f64> = st.iter().flat_map(|r| r.lp.clone()).collect();
    let tail: Vec<f64> = st.iter().map(|r| r.tail).collect();
    SparseDist {
        indices: Tensor::from_slice(&ids).reshape([n, k]),
        logprobs: Tensor::from_slice(&lp).reshape([n, k]).to_kind(kind),
        log_tail: Tensor::from_slice(&tail).log().to_kind(kind),
        log_z: Tensor::zeros([n], (kind, Device::Cpu)),
        temperature: temp,
    }
}

fn matrix(r: &[Row], kind: Kind) -> Tensor {
    let flat: Vec<f64> = r.iter().flatten().cloned().collect();
    Tensor::from_slice(&flat)
        .reshape([r.len() as i64, r[0].len() as i64])
        .to_kind(kind)
}

fn val(x: &Tensor) -> f64 {
    x.to_kind(Kind::Double).double_value(&[])
}

const N: usize = 6;
const V: usize = 40;
const K: usize = 8;
/// Position weights: 0 where a position does not count, one fractional.
const W: [f64; N] = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5];
/// Kept top tokens per row, and the label's rank in the teacher's order (−1: label −100).
/// Rows 0, 2 and 5 store the label outside the top set (appended last); row 3's teacher is 0
/// outside its top 2 (a masked vocabulary: tail mass 0, the bucket leaves both sides); row 4 has
/// no padding.
const KEEP: [usize; N] = [3, 7, 5, 2, 8, 4];
const LABEL_RANK: [i64; N] = [20, 1, 30, 0, -1, 39];

/// A fixed problem: student logits, teacher logits and labels (ids), at V tokens.
struct Problem {
    s: Vec<Row>,
    t: Vec<Row>,
    labels: Vec<i64>,
}

fn problem(seed: u64) -> Problem {
    let s = rows(seed, N, V, 1.5);
    let mut t = rows(seed + 1, N, V, 2.0);
    // row 3: a teacher that puts no mass outside its top 2 (−inf logits elsewhere)
    let mut order: Vec<usize> = (0..V).collect();
    order.sort_by(|&a, &b| t[3][b].partial_cmp(&t[3][a]).unwrap());
    for &v in &order[2..] {
        t[3][v] = f64::NEG_INFINITY;
    }
    let labels = (0..N)
        .map(|i| {
            if LABEL_RANK[i] < 0 {
                return -100;
            }
            let mut order: Vec<usize> = (0..V).collect();
            order.sort_by(|&a, &b| t[i][b].partial_cmp(&t[i][a]).unwrap());
            order[LABEL_RANK[i] as usize] as i64
        })
        .collect();
    Problem { s, t, labels }
}

impl Problem {
    fn store(&self, temp: f64) -> Vec<Stored> {
        (0..N)
            .map(|i| capture(&self.t[i], self.labels[i], KEEP[i], K, temp, true))
            .collect()
    }
    fn labels(&self) -> Tensor {
        Tensor::from_slice(&self.labels)
    }
}

fn weights() -> Tensor {
    Tensor::from_slice(&W)
}

// ---------- plain f64 reference: the reduced pair and the divergences ----------

/// The reduced pair as the losses see it: (log q̃, log p̃) on the outcomes in the support, the valid
/// slots in slot order and then the tail bucket when the store's tail mass is > 0 (a bucket of
/// teacher mass 0 leaves both sides); each side renormalised over these outcomes (the student's
/// already sums to 1 when the bucket stays; the store's rounded values sum to 1 only up to that
/// rounding). Also the number of stored outcomes (the bucket, when present, is last).
fn reduced_ref(s: &[f64], st: &Stored, temp: f64) -> (Row, Row, usize) {
    let lq_full = log_softmax(&scaled(s, temp));
    let valid = st.valid();
    let (mut lq, mut lp) = (vec![], vec![]);
    for &j in &valid {
        lq.push(lq_full[st.ids[j] as usize]);
        lp.push(st.lp[j]);
    }
    if st.tail > 0.0 {
        let mut off = 0.0;
        for v in 0..s.len() {
            if st.lp_of(v).is_none() {
                off += lq_full[v].exp();
            }
        }
        lq.push(off.ln());
        lp.push(st.tail.ln());
    }
    (log_softmax(&lq), log_softmax(&lp), valid.len())
}

fn kl(la: &[f64], lb: &[f64]) -> f64 {
    la.iter()
        .zip(lb)
        .map(|(a, b)| {
            if a.exp() == 0.0 {
                0.0
            } else {
                a.exp() * (a - b)
            }
        })
        .sum()
}
fn mix(la: &[f64], lb: &[f64], w: f64) -> Row {
    la.iter()
        .zip(lb)
        .map(|(a, b)| (w * a.exp() + (1.0 - w) * b.exp()).ln())
        .collect()
}
fn jsd(lq: &[f64], lp: &[f64], beta: f64) -> f64 {
    let lm = mix(lp, lq, beta);
    beta * kl(lp, &lm) + (1.0 - beta) * kl(lq, &lm)
}
fn tvd(lq: &[f64], lp: &[f64]) -> f64 {
    0.5 * lq
        .iter()
        .zip(lp)
        .map(|(a, b)| (a.exp() - b.exp()).abs())
        .sum::<f64>()
}
fn entropy(l: &[f64]) -> f64 {
    -l.iter()
        .map(|x| if x.exp() == 0.0 { 0.0 } else { x.exp() * x })
        .sum::<f64>()
}
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// AKL's mixing weights (g_head, g_tail) on the reduced outcomes: the head among the first
/// `n_stored` outcomes (descending p̃, up to and including the first reaching μ), the bucket always
/// in the tail.
fn akl_gaps(lq: &[f64], lp: &[f64], n_stored: usize, mu: f64) -> (f64, f64) {
    let mut order: Vec<usize> = (0..n_stored).collect();
    order.sort_by(|&a, &b| lp[b].partial_cmp(&lp[a]).unwrap());
    let mut head = vec![false; lp.len()];
    let mut before = 0.0;
    for &i in &order {
        head[i] = before < mu;
        before += lp[i].exp();
    }
    let (mut gh, mut gt) = (0.0, 0.0);
    for i in 0..lp.len() {
        let gap = (lp[i].exp() - lq[i].exp()).abs();
        if head[i] {
            gh += gap;
        } else {
            gt += gap;
        }
    }
    (gh, gt)
}
fn akl_with(lq: &[f64], lp: &[f64], (gh, gt): (f64, f64)) -> f64 {
    if gh + gt == 0.0 {
        return 0.0;
    }
    (gh * kl(lp, lq) + gt * kl(lq, lp)) / (gh + gt)
}

/// PLD on a store (τ = T): π̃ = the label, the other stored tokens by descending p̃, the bucket last
/// with score ln Σ_{v not stored} exp(s_v); a = p̃; Σ over the stored ranks of
/// a_k·(ln Σ_{l≥k} exp(score_l) − score_k), the bucket in every suffix.
fn pld_ref(s: &[f64], st: &Stored, label: i64, temp: f64) -> f64 {
    let (_, lp, n) = reduced_ref(s, st, temp);
    let valid = st.valid();
    let mut ranked: Vec<usize> = (0..n).collect(); // outcome numbers of the stored slots
    ranked.sort_by(|&a, &b| lp[b].partial_cmp(&lp[a]).unwrap());
    if let Some(pos) = ranked.iter().position(|&o| st.ids[valid[o]] == label) {
        let o = ranked.remove(pos);
        ranked.insert(0, o);
    }
    let score: Row = ranked
        .iter()
        .map(|&o| s[st.ids[valid[o]] as usize])
        .collect();
    let mut bucket = 0.0;
    for v in 0..s.len() {
        if st.lp_of(v).is_none() {
            bucket += s[v].exp();
        }
    }
    let mut total = 0.0;
    for k in 0..ranked.len() {
        let suffix: f64 = score[k..].iter().map(|x| x.exp()).sum::<f64>() + bucket;
        total += lp[ranked[k]].exp() * (suffix.ln() - score[k]);
    }
    total
}

/// The dense PLD (τ = T) of tests/losses.rs: the label first, then every other token by descending
/// teacher logit, a = softmax(t/T).
fn pld_dense_terms(s: &[f64], t: &[f64], label: usize, temp: f64) -> (Vec<usize>, Row) {
    let mut rest: Vec<usize> = (0..s.len()).filter(|&i| i != label).collect();
    rest.sort_by(|&a, &b| t[b].partial_cmp(&t[a]).unwrap());
    let pi: Vec<usize> = std::iter::once(label).chain(rest).collect();
    let a = log_softmax(&scaled(t, temp));
    let mut suffix = vec![0.0; pi.len() + 1];
    for k in (0..pi.len()).rev() {
        suffix[k] = suffix[k + 1] + s[pi[k]].exp();
    }
    let terms = (0..pi.len())
        .map(|k| a[pi[k]].exp() * (suffix[k].ln() - s[pi[k]]))
        .collect();
    (pi, terms)
}

/// TAID on a store (T = 1): p̃_λ = softmax((1−λ)·log q̃_held + λ·log p̃), KL(p̃_λ‖q̃).
fn taid_ref(s: &[f64], held: &[f64], st: &Stored, lambda: f64) -> f64 {
    let (lq, lp, _) = reduced_ref(s, st, 1.0);
    let (lq_held, _, _) = reduced_ref(held, st, 1.0);
    let target: Row = lq_held
        .iter()
        .zip(&lp)
        .map(|(a, b)| (1.0 - lambda) * a + lambda * b)
        .collect();
    kl(&log_softmax(&target), &lq)
}

/// Token-selective part 3 on a store: the student's top-`kc` candidates, the stored ones by
/// descending p̃, then the others; the Plackett-Luce terms of the stored ranks only.
fn tsd_rank_ref(s: &[f64], st: &Stored, kc: usize) -> f64 {
    let mut cand: Vec<usize> = (0..s.len()).collect();
    cand.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap());
    cand.truncate(kc);
    let (mut known, rest): (Vec<usize>, Vec<usize>) =
        cand.into_iter().partition(|&v| st.lp_of(v).is_some());
    known.sort_by(|&a, &b| st.lp_of(b).partial_cmp(&st.lp_of(a)).unwrap());
    let ranked: Vec<usize> = known.iter().chain(&rest).cloned().collect();
    (0..known.len())
        .map(|i| ranked[i..].iter().map(|&l| s[l].exp()).sum::<f64>().ln() - s[ranked[i]])
        .sum()
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (pos - lo as f64) * (v[hi] - v[lo])
}

/// Σ w_i·f(i) / Σ w_i over the positions with w_i ≠ 0 (0 when none).
fn mean(w: &[f64], f: impl Fn(usize) -> f64) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..w.len() {
        if w[i] != 0.0 {
            num += w[i] * f(i);
            den += w[i];
        }
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The weights with 0 where the label is −100.
fn labelled(labels: &[i64]) -> Vec<f64> {
    (0..N)
        .map(|i| if labels[i] == -100 { 0.0 } else { W[i] })
        .collect()
}

// ---------- how far the computed value may lie from the reference ----------
//
// The model of tests/losses.rs (Higham, §2.2 and §4.2): each operation is exact times (1 + δ),
// |δ| ≤ u; exp/log within ELEM·u (libtorch's exp_u20: 20 ulp, doubled); a sum of n terms in any
// order within γ(n) = n·u/(1 − n·u) of Σ|terms|. A log_softmax over n entries of range r, inputs off
// by dx, is within lsm(n, r, dx) = 2dx + γ(n) + u·(3r + ELEM + (ELEM + 1)·ln n) per entry.
// A reduced log-probability passes through: the student's log_softmax over V and the bucket's
// log-sum-exp over the tokens off the store (each an lsm over V; the bucket adds both), the
// multiplication by T and the loss's division by T (2u·|entry|), and the loss's log_softmax over
// the K + 1 outcomes (an lsm over K + 1 with that input error). Every divergence here is a sum over
// the ≤ 2(K + 1) outcomes of mass-weighted terms whose sensitivity to a log-probability error E is
// at most (1 + |log p̃ − log q̃|) per unit mass (kl_b in tests/losses.rs gives Σ a·(E_a + E_b) +
// Σ a·|d|·(E_a + (ELEM + 2)·u) + γ·Σ a·|d|), and the masses sum to ≤ 2 per side; JSD and the skews
// add the mixture's log (another E), PLD its f64 scan. BOUND_FACTOR = 16 covers these counts.
const U32: f64 = 1.0 / 16_777_216.0; // 2^-24
const U64: f64 = 1.0 / 9_007_199_254_740_992.0; // 2^-53
const ELEM: f64 = 40.0;
const BOUND_FACTOR: f64 = 16.0;

fn gamma(n: usize, u: f64) -> f64 {
    let nu = n as f64 * u;
    assert!(nu < 0.01);
    nu / (1.0 - nu)
}
fn lsm(n: usize, range: f64, dx: f64, u: f64) -> f64 {
    2.0 * dx + gamma(n, u) + u * (3.0 * range + ELEM + (ELEM + 1.0) * (n as f64).ln())
}
fn finite_range(x: &[f64]) -> f64 {
    let f = || x.iter().cloned().filter(|v| v.is_finite());
    f().fold(f64::NEG_INFINITY, f64::max) - f().fold(f64::INFINITY, f64::min)
}

/// The bound E on each reduced log-probability of position i as the losses see it, unit roundoff u.
fn entry_err(s: &[f64], st: &Stored, temp: f64, u: f64) -> f64 {
    let x = scaled(s, temp);
    let dx = if temp == 1.0 {
        0.0
    } else {
        u * x.iter().map(|v| v.abs()).fold(0.0, f64::max)
    };
    let student = 2.0 * lsm(s.len(), finite_range(&x), dx, u);
    let (lq, lp, _) = reduced_ref(s, st, temp);
    let big = lq
        .iter()
        .chain(&lp)
        .cloned()
        .filter(|v| v.is_finite())
        .fold(0.0, |m: f64, v| m.max(v.abs()));
    let input = student + ELEM * u * big + 2.0 * u * big;
    let range = finite_range(&[lq.clone(), lp.clone()].concat());
    lsm(K + 1, range, input, u)
}

/// The bound on a divergence of value `f` at position i: BOUND_FACTOR·E·(1 + |f| + D), D = the
/// largest |log p̃ − log q̃| on the support.
fn div_bound(s: &[f64], st: &Stored, temp: f64, f: f64, u: f64) -> f64 {
    let (lq, lp, _) = reduced_ref(s, st, temp);
    let d = lq
        .iter()
        .zip(&lp)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    BOUND_FACTOR * entry_err(s, st, temp, u) * (1.0 + f.abs() + d)
}

fn within(what: &str, ours: f64, reference: f64, bound: f64) {
    assert!(
        (ours - reference).abs() <= bound,
        "{what}: {ours} vs reference {reference}: |diff| {} > bound {bound}",
        (ours - reference).abs()
    );
}

// ---------- the losses on a store ----------

/// One loss kind on a store: its run-file parameters, the store's temperature, and its per-position
/// reference value (student rows, the unperturbed rows for stop-gradient parts, the row index).
struct Case {
    name: &'static str,
    params: Vec<(&'static str, f64)>,
    temp: f64,
    /// the weights of the mean: W, or W without the positions whose label is −100
    labelled: bool,
    per_pos: Box<dyn Fn(&[Row], &[Row], usize) -> f64>,
}

fn cases(p: &Problem) -> Vec<Case> {
    let labels = p.labels.clone();
    let store_at = |temp: f64| p.store(temp);
    let mut out: Vec<Case> = vec![];
    let st2 = store_at(2.0);
    let st1 = store_at(1.0);
    {
        let st = st2.clone();
        out.push(Case {
            name: "forward_kl",
            params: vec![("temperature", 2.0)],
            temp: 2.0,
            labelled: false,
            per_pos: Box::new(move |s, _, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 2.0);
                kl(&lp, &lq)
            }),
        });
    }
    {
        let st = st1.clone();
        out.push(Case {
            name: "reverse_kl",
            params: vec![],
            temp: 1.0,
            labelled: false,
            per_pos: Box::new(move |s, _, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 1.0);
                kl(&lq, &lp)
            }),
        });
    }
    {
        let st = st2.clone();
        out.push(Case {
            name: "jsd",
            params: vec![("temperature", 2.0), ("beta", 0.3)],
            temp: 2.0,
            labelled: false,
            per_pos: Box::new(move |s, _, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 2.0);
                jsd(&lq, &lp, 0.3)
            }),
        });
    }
    {
        let st = st1.clone();
        out.push(Case {
            name: "skew_kl",
            params: vec![("alpha", 0.1)],
            temp: 1.0,
            labelled: false,
            per_pos: Box::new(move |s, _, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 1.0);
                kl(&lp, &mix(&lp, &lq, 0.1))
            }),
        });
    }
    {
        let st = st2.clone();
        out.push(Case {
            name: "skew_reverse_kl",
            params: vec![("temperature", 2.0), ("alpha", 0.2)],
            temp: 2.0,
            labelled: false,
            per_pos: Box::new(move |s, _, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 2.0);
                kl(&lq, &mix(&lq, &lp, 0.2))
            }),
        });
    }
    {
        let st = st2.clone();
        out.push(Case {
            name: "tvd",
            params: vec![("temperature", 2.0)],
            temp: 2.0,
            labelled: false,
            per_pos: Box::new(move |s, _, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 2.0);
                tvd(&lq, &lp)
            }),
        });
    }
    for mu in [0.5, 0.95] {
        let st = st1.clone();
        out.push(Case {
            name: "adaptive_kl",
            params: vec![("mu", mu)],
            temp: 1.0,
            labelled: false,
            // g_head and g_tail are detached: taken at the unperturbed rows
            per_pos: Box::new(move |s, held, i| {
                let (lq, lp, n) = reduced_ref(&s[i], &st[i], 1.0);
                let (hq, hp, _) = reduced_ref(&held[i], &st[i], 1.0);
                akl_with(&lq, &lp, akl_gaps(&hq, &hp, n, mu))
            }),
        });
    }
    {
        // hinton at T = 2: α·T²·KL(p̃‖q̃) + (1−α)·CE, each its own mean (CE over labelled positions)
        let st = st2.clone();
        let labels = labels.clone();
        out.push(Case {
            name: "hinton",
            params: vec![("temperature", 2.0), ("alpha", 0.6)],
            temp: 2.0,
            labelled: false,
            per_pos: Box::new(move |s, _, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 2.0);
                let soft = 0.6 * 4.0 * kl(&lp, &lq);
                // the CE's mean runs over the labelled weights: rescale its share accordingly
                let lw = labelled(&labels);
                let (sw, slw): (f64, f64) = (W.iter().sum(), lw.iter().sum());
                let hard = if labels[i] == -100 {
                    0.0
                } else {
                    -log_softmax(&s[i])[labels[i] as usize] * sw / slw
                };
                soft + 0.4 * hard
            }),
        });
    }
    for temp in [1.0, 2.0] {
        let st = store_at(temp);
        let labels = labels.clone();
        out.push(Case {
            name: "pld",
            params: vec![("tau", temp)],
            temp,
            labelled: true,
            per_pos: Box::new(move |s, _, i| pld_ref(&s[i], &st[i], labels[i], temp)),
        });
    }
    {
        let st = st1.clone();
        out.push(Case {
            name: "taid",
            params: vec![("t_start", 0.6), ("t_end", 0.6)],
            temp: 1.0,
            labelled: false,
            per_pos: Box::new(move |s, held, i| taid_ref(&s[i], &held[i], &st[i], 0.6)),
        });
    }
    {
        // token-selective at T = 2 with its defaults: β 0.9, quantile 0.1, top-10; weights 1, 1, 0.1
        let st = st2.clone();
        out.push(Case {
            name: "token_selective",
            params: vec![("temperature", 2.0)],
            temp: 2.0,
            labelled: false,
            per_pos: Box::new(move |s, held, i| {
                let (lq, lp, _) = reduced_ref(&s[i], &st[i], 2.0);
                let (hq, hp, _) = reduced_ref(&held[i], &st[i], 2.0);
                let part1 = sigmoid(entropy(&hq) - entropy(&hp)) * jsd(&lq, &lp, 0.9);
                // part 2: H(q) over the full vocabulary, kept when at or above the 0.1-quantile of
                // the counted positions' H (the threshold and the selection detached)
                let h = |r: &Row| entropy(&log_softmax(&scaled(r, 2.0)));
                let counted: Vec<f64> = (0..N)
                    .filter(|&j| W[j] != 0.0)
                    .map(|j| h(&held[j]))
                    .collect();
                let thr = quantile(counted.clone(), 0.1);
                let kept: Vec<f64> = (0..N)
                    .map(|j| {
                        if W[j] != 0.0 && h(&held[j]) >= thr {
                            W[j]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let (sw, skw): (f64, f64) = (W.iter().sum(), kept.iter().sum());
                let part2 = if kept[i] != 0.0 {
                    h(&s[i]) * sw / skw
                } else {
                    0.0
                };
                let part3 = tsd_rank_ref(&s[i], &st[i], 10);
                part1 + part2 + 0.1 * part3
            }),
        });
    }
    out
}

/// The loss `c` on the store at its temperature, computed by the library (Loss::compute).
fn library_value(c: &Case, p: &Problem, s: &Tensor) -> Tensor {
    let st = sparse(&p.store(c.temp), c.temp, Kind::Float);
    let loss = registry::build(c.name, &c.params, &BuildContext { total_steps: 1 }).unwrap();
    let r = Reduced::new(s, &st).unwrap();
    loss.compute(&LossInput {
        student: s,
        teacher: None,
        reduced: Some(&r),
        labels: &p.labels(),
        weights: &weights(),
    })
    .unwrap()
}

fn reference_value(c: &Case, s: &[Row], held: &[Row], labels: &[i64]) -> f64 {
    let w: Vec<f64> = if c.labelled {
        labelled(labels)
    } else {
        W.to_vec()
    };
    mean(&w, |i| (c.per_pos)(s, held, i))
}

#[test]
fn every_loss_on_a_store_matches_its_reduced_reference() {
    let p = problem(100);
    for c in cases(&p) {
        let ours = val(&library_value(&c, &p, &matrix(&p.s, Kind::Double)));
        let reference = reference_value(&c, &p.s, &p.s, &p.labels);
        let st = p.store(c.temp);
        let w: Vec<f64> = if c.labelled {
            labelled(&p.labels)
        } else {
            W.to_vec()
        };
        let bound = mean(&w, |i| {
            div_bound(&p.s[i], &st[i], c.temp, (c.per_pos)(&p.s, &p.s, i), U64)
        });
        within(c.name, ours, reference, bound);
        assert!(reference.is_finite() && reference > 0.0, "{}", c.name);
    }
}

#[test]
fn the_reduced_reference_is_far_from_the_dense_and_bucketless_values() {
    // the tolerances above lie far below the mistakes a reduced loss could make: comparing the
    // full distributions, or forgetting the tail bucket
    let p = problem(100);
    let st = p.store(2.0);
    let ours = val(&library_value(
        &cases(&p)[0],
        &p,
        &matrix(&p.s, Kind::Double),
    ));
    let bound = mean(&W, |i| {
        let (lq, lp, _) = reduced_ref(&p.s[i], &st[i], 2.0);
        div_bound(&p.s[i], &st[i], 2.0, kl(&lp, &lq), U64)
    });
    let dense = mean(&W, |i| {
        let (lq, lp) = (
            log_softmax(&scaled(&p.s[i], 2.0)),
            log_softmax(&scaled(&p.t[i], 2.0)),
        );
        kl(&lp, &lq)
    });
    let bucketless = mean(&W, |i| {
        let (lq, lp, n) = reduced_ref(&p.s[i], &st[i], 2.0);
        kl(&log_softmax(&lp[..n]), &log_softmax(&lq[..n]))
    });
    for (what, other) in [("dense", dense), ("without the bucket", bucketless)] {
        assert!(
            (ours - other).abs() > 1e4 * bound,
            "forward_kl on a store vs {what}: {ours} vs {other}, bound {bound}"
        );
    }
}

/// Autograd gradient of the library's loss (f64) against central differences of the f64
/// reference. In f64 with h = 1e-6 and sums over V = 40 terms, a central difference is off by
/// h²/6·|f‴| (about 1e-12 for these O(1) logits) plus the rounding 40·2⁻⁵³·|f|/h·(a few) ≈ 1e-8:
/// the tolerance 1e-6 + 1e-5·|fd| lies far above both.
#[test]
fn every_loss_on_a_store_has_the_reference_gradient() {
    let p = problem(200);
    for c in cases(&p) {
        let x = matrix(&p.s, Kind::Double).set_requires_grad(true);
        library_value(&c, &p, &x).backward();
        let g = x.grad();
        let h = 1e-6;
        for i in 0..N {
            for j in 0..V {
                let mut plus = p.s.clone();
                plus[i][j] += h;
                let mut minus = p.s.clone();
                minus[i][j] -= h;
                let fd = (reference_value(&c, &plus, &p.s, &p.labels)
                    - reference_value(&c, &minus, &p.s, &p.labels))
                    / (2.0 * h);
                let ad = g.double_value(&[i as i64, j as i64]);
                assert!(
                    (fd - ad).abs() < 1e-6 + 1e-5 * fd.abs(),
                    "{}: d/ds[{i}][{j}] autograd {ad} vs finite difference {fd}",
                    c.name
                );
            }
        }
    }
}

#[test]
fn every_token_stored_gives_the_dense_loss() {
    // K = V: each row stores the whole vocabulary (sorted by p, tail 0) in f64, so that the two
    // paths differ only in the order of their sums; the bound is the reduced one with u = 2⁻⁵³
    let p = problem(300);
    let t: Vec<Row> = rows(301, N, V, 2.0); // finite everywhere
    let s = matrix(&p.s, Kind::Double);
    let labels = p.labels();
    for c in cases(&p) {
        let full: Vec<Stored> = (0..N)
            .map(|i| capture(&t[i], p.labels[i], V, V, c.temp, false))
            .collect();
        assert!(full.iter().all(|r| r.tail == 0.0));
        let loss = registry::build(c.name, &c.params, &BuildContext { total_steps: 1 }).unwrap();
        let r = Reduced::new(&s, &sparse(&full, c.temp, Kind::Double)).unwrap();
        let on_store = val(&loss
            .compute(&LossInput {
                student: &s,
                teacher: None,
                reduced: Some(&r),
                labels: &labels,
                weights: &weights(),
            })
            .unwrap());
        let dense = val(&loss
            .compute(&LossInput {
                student: &s,
                teacher: Some(&matrix(&t, Kind::Double)),
                reduced: None,
                labels: &labels,
                weights: &weights(),
            })
            .unwrap());
        let bound = mean(&W, |i| div_bound(&p.s[i], &full[i], c.temp, dense, U64)) * 2.0;
        within(c.name, on_store, dense, bound);
    }
}

#[test]
fn the_reduced_pair_is_t_times_the_reduced_log_probabilities() {
    // the losses receive T·log q̃ and T·log p̃ (slots, then the bucket): their own division by T
    // gives back the reduced distributions, so hinton's T² and every T-dependent factor stay right
    let p = problem(400);
    for temp in [1.0, 2.0] {
        let st = p.store(temp);
        let r = Reduced::new(&matrix(&p.s, Kind::Double), &sparse(&st, temp, Kind::Float)).unwrap();
        assert_eq!(r.student.size(), [N as i64, K as i64 + 1]);
        for i in 0..N {
            let lq_full = log_softmax(&scaled(&p.s[i], temp));
            let mut off = 0.0;
            for v in 0..V {
                if st[i].lp_of(v).is_none() {
                    off += lq_full[v].exp();
                }
            }
            let bound = entry_err(&p.s[i], &st[i], temp, U64) * temp;
            for j in 0..=K {
                let (q, pt) = if j == K {
                    (off.ln(), st[i].tail.ln())
                } else if st[i].lp[j].is_finite() {
                    (lq_full[st[i].ids[j] as usize], st[i].lp[j])
                } else {
                    (f64::NEG_INFINITY, f64::NEG_INFINITY)
                };
                let (ours_q, ours_p) = (
                    r.student.double_value(&[i as i64, j as i64]),
                    r.teacher.double_value(&[i as i64, j as i64]),
                );
                if q.is_finite() {
                    within("T·log q̃", ours_q, temp * q, bound);
                } else {
                    assert_eq!(ours_q, f64::NEG_INFINITY, "row {i} slot {j}");
                }
                if pt.is_finite() {
                    within("T·log p̃", ours_p, temp * pt, bound);
                } else {
                    assert_eq!(ours_p, f64::NEG_INFINITY, "row {i} slot {j}");
                }
            }
        }
    }
}

#[test]
fn pld_on_a_store_is_the_dense_pld_less_the_tail_terms() {
    // the claim in pld.rs: every stored rank's term is the dense one; what is missing is the terms
    // of the ranks off the store (their weights sum to the tail mass)
    let p = problem(500);
    for temp in [1.0, 2.0] {
        // unrounded store, so that a = p̃ is the dense softmax exactly (up to f64 rounding)
        for i in (0..N).filter(|&i| p.labels[i] >= 0) {
            let st = capture(&p.t[i], p.labels[i], KEEP[i], K, temp, false);
            let (pi, terms) = pld_dense_terms(&p.s[i], &p.t[i], p.labels[i] as usize, temp);
            let on_store: f64 = pi
                .iter()
                .zip(&terms)
                .filter(|(v, _)| st.lp_of(**v).is_some())
                .map(|(_, x)| x)
                .sum();
            let reduced = pld_ref(&p.s[i], &st, p.labels[i], temp);
            // both are f64 sums of ≤ V terms a·(ln Σ exp − s) over ≤ V + 1 exps: each term within
            // (2·ELEM + 2·(V + 1))·2⁻⁵³·(1 + |term|) of exact, the sums add γ(V); 1e3 covers both sides
            let bound = 1e3 * U64 * (1.0 + terms.iter().map(|x| x.abs()).sum::<f64>());
            within("pld: dense less the tail terms", reduced, on_store, bound);
        }
    }
}

#[test]
fn the_objective_trains_on_a_store_in_f32_under_trusted_inputs() {
    // the training step's path: f32 student, f32 store, Objective::compute inside `trusted` (no
    // host reads), −inf padding and an empty bucket handled without NaN; value against the f64
    // reference with the f32 bound (u = 2⁻²⁴) plus the f32 value's own rounding
    let p = problem(600);
    let st = p.store(2.0);
    let term = |k: &str, ps: &[(&str, f64)], w: f64| LossTerm::new(k, ps, w).unwrap();
    let obj = Objective::new(
        &[
            term("forward_kl", &[("temperature", 2.0)], 0.7),
            term("hinton", &[("temperature", 2.0), ("alpha", 0.5)], 0.3),
            term("cross_entropy", &[], 0.2),
        ],
        10,
    )
    .unwrap();
    let x = matrix(&p.s, Kind::Float).set_requires_grad(true);
    let signal = TeacherDist::Sparse(sparse(&st, 2.0, Kind::Float));
    let v = losses::trusted(|| obj.compute(&x, Some(&signal), &p.labels(), &weights())).unwrap();
    v.total.backward();
    assert!(x.grad().isfinite().all().int64_value(&[]) == 1);
    let fkl = mean(&W, |i| {
        let (lq, lp, _) = reduced_ref(&p.s[i], &st[i], 2.0);
        kl(&lp, &lq)
    });
    let lw = labelled(&p.labels);
    let ce = mean(&lw, |i| -log_softmax(&p.s[i])[p.labels[i] as usize]);
    let fkl_bound = mean(&W, |i| {
        let (lq, lp, _) = reduced_ref(&p.s[i], &st[i], 2.0);
        div_bound(&p.s[i], &st[i], 2.0, kl(&lp, &lq), U32)
    });
    let ce_bound = mean(&lw, |i| lsm(V, finite_range(&p.s[i]), 0.0, U32));
    let parts: Vec<f64> = v.parts.iter().map(val).collect();
    within("forward_kl", parts[0], fkl, fkl_bound + U32 * fkl);
    let hinton = 0.5 * 4.0 * fkl + 0.5 * ce;
    let hinton_bound = 0.5 * 4.0 * fkl_bound + 0.5 * ce_bound + 4.0 * U32 * hinton;
    within("hinton", parts[1], hinton, hinton_bound);
    within("cross_entropy", parts[2], ce, ce_bound + U32 * ce);
    let total = 0.7 * fkl + 0.3 * hinton + 0.2 * ce;
    let total_bound = 0.7 * fkl_bound + 0.3 * hinton_bound + 0.2 * ce_bound + 8.0 * U32 * total;
    within("total", val(&v.total), total, total_bound);
}

// ---------- check_sparse ----------

fn objective(terms: &[(&str, &[(&str, f64)])]) -> Objective {
    let terms: Vec<LossTerm> = terms
        .iter()
        .map(|(k, ps)| LossTerm::new(k, ps, 1.0).unwrap())
        .collect();
    Objective::new(&terms, 10).unwrap()
}

fn refusal(obj: &Objective, temp: f64) -> String {
    obj.check_sparse(temp).unwrap_err().to_string()
}

#[test]
fn check_sparse_refuses_sinkhorn_and_other_temperatures() {
    let sink = objective(&[("forward_kl", &[]), ("sinkhorn", &[])]);
    let m = refusal(&sink, 1.0);
    assert!(
        m.contains("'sinkhorn'") && m.contains("teacher store") && m.contains("outcomes"),
        "{m}"
    );
    // a term at another temperature, named as names() names it
    let two = objective(&[
        ("forward_kl", &[("temperature", 1.0)]),
        ("forward_kl", &[("temperature", 2.0)]),
    ]);
    assert_eq!(two.names()[1], "forward_kl#2");
    let m = refusal(&two, 1.0);
    assert!(
        m.contains("'forward_kl#2'")
            && m.contains("temperature = 2")
            && m.contains("tail's mass")
            && m.contains("does not hold"),
        "{m}"
    );
    // a term without a temperature reads the teacher at T = 1
    let m = refusal(&objective(&[("taid", &[])]), 2.0);
    assert!(m.contains("'taid'") && m.contains("T = 1"), "{m}");
    // PLD's temperature is its τ
    let pld = objective(&[("pld", &[("tau", 0.5)])]);
    assert!(pld.check_sparse(0.5).is_ok());
    assert!(refusal(&pld, 1.0).contains("tau = 0.5"));
    // a store whose temperature was kept as an f32 number still matches
    let t07 = objective(&[("hinton", &[("temperature", 0.7)]), ("cross_entropy", &[])]);
    assert!(t07.check_sparse(0.7f32 as f64).is_ok());
    // terms that need no teacher accept any store
    assert!(objective(&[("cross_entropy", &[])])
        .check_sparse(3.0)
        .is_ok());
    // every other kind accepts a store at its temperature
    for spec in registry::REGISTRY
        .iter()
        .filter(|s| s.name != "sinkhorn" && s.reads == registry::Reads::Logits)
    {
        let obj = objective(&[(spec.name, &[])]);
        assert!(obj.check_sparse(1.0).is_ok(), "{}", spec.name);
    }
    // a term that compares hidden states is refused on any store, saying why
    let e = objective(&[("hidden", &[])])
        .check_sparse(1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("loss term 'hidden' is not defined on a teacher store")
            && e.contains("hidden states"),
        "{e}"
    );
    // a loss handed a pair reduced at another temperature refuses it (its division by its own T
    // would sharpen p̃, not give the distribution at that temperature)
    let p = problem(700);
    let loss = registry::build(
        "forward_kl",
        &[("temperature", 2.0)],
        &BuildContext { total_steps: 1 },
    )
    .unwrap();
    let s = matrix(&p.s, Kind::Float);
    let r = Reduced::new(&s, &sparse(&p.store(1.0), 1.0, Kind::Float)).unwrap();
    let e = loss
        .compute(&LossInput {
            student: &s,
            teacher: None,
            reduced: Some(&r),
            labels: &p.labels(),
            weights: &weights(),
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("forward_kl: reads the teacher at temperature 2"),
        "{e}"
    );
    // and compute refuses the same, never silently
    let signal = TeacherDist::Sparse(sparse(&p.store(1.0), 1.0, Kind::Float));
    for obj in [&sink, &two] {
        let e = obj
            .compute(
                &matrix(&p.s, Kind::Float),
                Some(&signal),
                &p.labels(),
                &weights(),
            )
            .err()
            .expect("refused");
        assert!(e.to_string().contains("loss term"), "{e}");
    }
}

#[test]
fn every_temperature_parameter_is_the_one_check_sparse_reads() {
    for spec in registry::REGISTRY {
        for name in ["temperature", "tau"] {
            if spec.params.iter().any(|p| p.name == name) {
                let loss =
                    registry::build(spec.name, &[(name, 2.5)], &BuildContext { total_steps: 1 })
                        .unwrap();
                assert_eq!(
                    loss.teacher_temperature(),
                    Some((name, 2.5)),
                    "{}",
                    spec.name
                );
            }
        }
    }
}

#[test]
fn a_store_with_the_wrong_shape_is_refused_by_name() {
    let p = problem(800);
    let st = sparse(&p.store(1.0), 1.0, Kind::Float);
    let s = matrix(&p.s[..4], Kind::Float);
    let e = Reduced::new(&s, &st).unwrap_err().to_string();
    assert!(e.contains("'indices'") && e.contains("[4, K"), "{e}");
    let mut bad = sparse(&p.store(1.0), 1.0, Kind::Float);
    bad.indices = bad.indices.ones_like() * (V as i64);
    let e = Reduced::new(&matrix(&p.s, Kind::Float), &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the student's vocabulary"), "{e}");
}

// ---------- evaluation and the training step on a store ----------

/// A teacher store stand-in: the teacher's logits at a position are a fixed random row per input
/// token (a bigram teacher), captured as `capture` does at temperature T with K slots.
struct BigramStore {
    table: Vec<Row>,
    temp: f64,
}

struct PreparedStore {
    rows: Vec<Stored>,
    temp: f64,
}

impl BigramStore {
    fn captured(&self, ids: &[i64], labels: &[i64]) -> Vec<Stored> {
        ids.iter()
            .zip(labels)
            .enumerate()
            .map(|(i, (&id, &label))| {
                let keep = [3, 5, 2, 6][i % 4];
                capture(&self.table[id as usize], label, keep, K, self.temp, true)
            })
            .collect()
    }
}

impl TeacherSignal for BigramStore {
    fn prepare<'a>(
        &'a self,
        batch: &Batch,
        _hidden_layers: &[usize],
    ) -> distill::Result<Box<dyn PreparedSignal + 'a>> {
        let ids = Vec::<i64>::try_from(batch.ids.flatten(0, 1)).unwrap();
        let labels = Vec::<i64>::try_from(batch.labels.flatten(0, 1)).unwrap();
        Ok(Box::new(PreparedStore {
            rows: self.captured(&ids, &labels),
            temp: self.temp,
        }))
    }
    fn vocab_size(&self) -> usize {
        V
    }
}

impl PreparedSignal for PreparedStore {
    fn positions(&self, start: i64, len: i64) -> distill::Result<TeacherDist> {
        let rows = &self.rows[start as usize..(start + len) as usize];
        Ok(TeacherDist::Sparse(sparse(rows, self.temp, Kind::Float)))
    }
    fn hidden(&self) -> &[Tensor] {
        &[]
    }
    fn len(&self) -> i64 {
        self.rows.len() as i64
    }
}

/// A tiny opinionated student (large embeddings), sequences of random ids with next-token labels,
/// a fractional weight on some targets.
fn eval_setup() -> (model::LoadedModel, Vec<Sequence>, BigramStore) {
    let cfg = LlamaConfig::tiny(V, 32, 1, 4, 2);
    let student = model::random(&cfg, Device::Cpu, 9).unwrap();
    tch::no_grad(|| {
        let mut e = student.vs.variables()["model.embed_tokens.weight"].shallow_clone();
        let _ = e.f_mul_scalar_(8.0).unwrap();
    });
    let mut r = Lcg(901);
    let seqs: Vec<Sequence> = (0..3)
        .map(|_| {
            let ids: Vec<u32> = (0..9).map(|_| (r.uniform() * V as f64) as u32).collect();
            let mut labels: Vec<i64> = ids[1..].iter().map(|&x| x as i64).collect();
            labels.push(-100);
            let weights: Vec<f32> = labels
                .iter()
                .enumerate()
                .map(|(i, &l)| {
                    if l == -100 {
                        0.0
                    } else if i % 3 == 1 {
                        0.5
                    } else {
                        1.0
                    }
                })
                .collect();
            Sequence {
                ids,
                labels,
                weights,
                spans: vec![],
                domain: None,
            }
        })
        .collect();
    // the teacher's row for token v: the student's logits after v alone, plus noise, so that the
    // two often (not always) agree on the top token
    let alone = tch::no_grad(|| {
        student
            .model
            .forward(&Tensor::arange(V as i64, (Kind::Int64, Device::Cpu)).reshape([V as i64, 1]))
            .unwrap()
    })
    .reshape([V as i64, V as i64])
    .to_kind(Kind::Double);
    let noise = rows(902, V, V, 4.0);
    let table = (0..V)
        .map(|v| {
            (0..V)
                .map(|j| (alone.double_value(&[v as i64, j as i64]) + noise[v][j]) as f32 as f64)
                .collect()
        })
        .collect();
    let store = BigramStore { table, temp: 2.0 };
    (student, seqs, store)
}

#[test]
fn eval_metrics_on_a_store_match_the_reference() {
    let (student, seqs, store) = eval_setup();
    let m = distill_metrics(&store, &student.model, &seqs, seqs.len()).unwrap();
    // the reference, from the same student logits (one batch of every sequence, as evaluated)
    let b = Batch::new(&seqs, &[0, 1, 2], Device::Cpu).unwrap();
    let logits = tch::no_grad(|| student.model.forward(&b.ids).unwrap())
        .flatten(0, 1)
        .to_kind(Kind::Double);
    let s: Vec<Row> = (0..logits.size()[0])
        .map(|i| Vec::<f64>::try_from(logits.get(i)).unwrap())
        .collect();
    let ids = Vec::<i64>::try_from(b.ids.flatten(0, 1)).unwrap();
    let labels = Vec::<i64>::try_from(b.labels.flatten(0, 1)).unwrap();
    let w: Vec<f64> = seqs
        .iter()
        .flat_map(|q| q.weights.iter().map(|&x| x as f64))
        .collect();
    let st = store.captured(&ids, &labels);
    let (mut nll_s, mut nll_t, mut kl_sum, mut top1, mut wsum) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut nll_s_bound, mut kl_bound) = (0.0, 0.0);
    for i in (0..s.len()).filter(|&i| w[i] != 0.0) {
        let l = labels[i] as usize;
        nll_s += w[i] * -log_softmax(&s[i])[l];
        nll_s_bound += w[i] * lsm(V, finite_range(&s[i]), 0.0, U32);
        nll_t += w[i] * -st[i].lp_of(l).expect("the label is stored");
        let (lq, lp, _) = reduced_ref(&s[i], &st[i], 2.0);
        let f = kl(&lp, &lq);
        kl_sum += w[i] * f;
        kl_bound += w[i] * div_bound(&s[i], &st[i], 2.0, f, U32);
        let argmax_s = (0..V).fold(0, |b, v| if s[i][v] > s[i][b] { v } else { b });
        let best = (0..K).fold(0, |b, j| if st[i].lp[j] > st[i].lp[b] { j } else { b });
        top1 += w[i] * (argmax_s as i64 == st[i].ids[best]) as i64 as f64;
        wsum += w[i];
    }
    // perplexities: exp of a mean whose error is the mean of the per-position bounds
    let rel = |b: f64| b.exp_m1() + 1e-12;
    let (ps, pt) = ((nll_s / wsum).exp(), (nll_t / wsum).exp());
    within(
        "student_ppl",
        m.student_ppl,
        ps,
        ps * rel(nll_s_bound / wsum),
    );
    // the teacher's NLL is the stored f32 numbers summed in f64
    within("teacher_ppl", m.teacher_ppl, pt, pt * 1e-12);
    within("kl", m.kl, kl_sum / wsum, kl_bound / wsum + 1e-12);
    within("top1", m.top1, top1 / wsum, 1e-12);
    assert!(
        m.top1 > 0.0 && m.top1 < 1.0,
        "top1 {} should be informative",
        m.top1
    );
    assert_eq!(m.tokens, w.iter().filter(|&&x| x != 0.0).count());
}

#[test]
fn the_step_trains_on_a_store_chunked_or_not() {
    // the unchanged step (train/step.rs) asks the store for chunks of positions: the same loss and
    // gradients whole or in chunks, and the value is the objective's on the whole batch. Tolerance
    // 1e-5 relative, as tests/chunked.rs: each position's value is computed row by row the same
    // way in any chunk; what differs is the grouping of the f32 sums over ≤ 27 positions of terms
    // ≥ 0 (each chunk's mean times its share, summed in f64), at most 2·27·2⁻²⁴ ≈ 3.2e-6 relative,
    // plus a few single roundings (the divisions, the shares, the terms' weighted sum)
    let obj = objective(&[
        ("forward_kl", &[("temperature", 2.0)]),
        ("pld", &[("tau", 2.0)]),
        ("cross_entropy", &[]),
    ]);
    assert!(!obj.reads_only_reduced());
    step_on_a_store_chunked_or_not(&obj);
}

#[test]
fn the_step_trains_on_a_store_chunked_with_the_reduced_pair_by_hand() {
    // every term reads the student only through the reduced pair: in chunks, the step computes the
    // pair's student side by hand (reduced::ByHand) instead of by autograd; whole, by autograd
    let t2: &[(&str, f64)] = &[("temperature", 2.0)];
    let obj = objective(&[
        ("forward_kl", t2),
        ("reverse_kl", t2),
        ("jsd", &[("beta", 0.3), ("temperature", 2.0)]),
        ("skew_kl", &[("alpha", 0.2), ("temperature", 2.0)]),
        ("skew_reverse_kl", &[("alpha", 0.2), ("temperature", 2.0)]),
        ("tvd", t2),
        ("adaptive_kl", &[("mu", 0.5), ("temperature", 2.0)]),
    ]);
    assert!(obj.reads_only_reduced());
    step_on_a_store_chunked_or_not(&obj);
}

fn step_on_a_store_chunked_or_not(obj: &Objective) {
    let (student, seqs, store) = eval_setup();
    let b = Batch::new(&seqs, &[0, 1, 2], Device::Cpu).unwrap();
    let grads = || -> Vec<Tensor> {
        let mut v: Vec<(String, Tensor)> = student
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.grad().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t)| t).collect()
    };
    let zero = || {
        for (_, mut v) in student.vs.variables() {
            v.zero_grad();
        }
    };
    zero();
    let whole = micro_step(
        &student.model,
        Some(&store),
        obj,
        &b,
        &StepOptions::new(None, 1.0),
    )
    .unwrap();
    let g_whole = grads();
    assert!(whole.finite);
    // the objective on the whole batch, directly
    let s = tch::no_grad(|| student.model.forward(&b.ids).unwrap()).flatten(0, 1);
    let prepared = store.prepare(&b, &[]).unwrap();
    let (labels, w) = b.flat_targets().unwrap();
    let direct = obj
        .compute(
            &s,
            Some(&prepared.positions(0, prepared.len()).unwrap()),
            &labels,
            &w,
        )
        .unwrap();
    within(
        "step vs objective",
        whole.loss,
        val(&direct.total),
        1e-5 * whole.loss.abs(),
    );
    for chunk in [1usize, 4, 10] {
        zero();
        let part = micro_step(
            &student.model,
            Some(&store),
            obj,
            &b,
            &StepOptions::new(Some(chunk), 1.0),
        )
        .unwrap();
        within(
            "chunked loss",
            part.loss,
            whole.loss,
            1e-5 * whole.loss.abs(),
        );
        for (g, h) in grads().iter().zip(&g_whole) {
            let scale = h.abs().max().double_value(&[]).max(1e-12);
            let diff = (g - h).abs().max().double_value(&[]);
            assert!(
                diff / scale < 1e-5,
                "chunk {chunk}: gradient differs by {diff}"
            );
        }
    }
}

/// `Reduced::by_hand` against `Reduced::new` (autograd through `student_log_probs`), in f32: the
/// student side log q̃ and the gradient it passes back to the logits for an arbitrary upstream
/// gradient on the pair's finite entries, at T = 1 and 2, with padding slots, a teacher tail of 0
/// (row 3) and, with every token stored (K = V), an empty student tail. (Both follow SparseDist's
/// contract that a padding slot repeats a valid id of its row.) Both compute the same
/// log-sum-exps in f32 from the same logits (|x| < 12 here): log q̃ agrees to a few f32 roundings
/// of numbers below 16, i.e. within 1e-5; each gradient entry is a few products of such
/// exponentials and the upstream sums (|Σg| < 11), so within 2e-5 of the largest entry.
#[test]
fn the_reduced_student_side_by_hand_equals_autograd() {
    let p = problem(400);
    // every token stored needs a teacher with mass on every token (a token of mass 0 is not stored)
    let t: Vec<Row> = rows(401, N, V, 2.0);
    let all: Vec<Stored> = (0..N)
        .map(|i| capture(&t[i], p.labels[i].max(0), V, V, 1.0, true))
        .collect();
    for (what, temp, st) in [
        ("T = 1", 1.0, p.store(1.0)),
        ("T = 2", 2.0, p.store(2.0)),
        ("every token stored", 1.0, all),
    ] {
        let sp = sparse(&st, temp, Kind::Float);
        let k1 = st[0].ids.len() as i64 + 1;
        let x = matrix(&p.s, Kind::Float);
        let up: Vec<f64> = (0..N as i64 * k1)
            .map(|i| ((i * 7919 % 13) as f64 - 6.0) / 5.0)
            .collect();
        let up = Tensor::from_slice(&up)
            .reshape([N as i64, k1])
            .to_kind(Kind::Float);
        let zero = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let pull = |q: &Tensor| (q.where_self(&q.isfinite(), &zero) * &up).sum(Kind::Float);
        let xa = x.copy().set_requires_grad(true);
        let ra = Reduced::new(&xa, &sp).unwrap();
        pull(&ra.student).backward();
        let ga = xa.grad();
        let (rb, hand) = Reduced::by_hand(x.copy(), &sp).unwrap();
        assert_eq!(
            Vec::<bool>::try_from(ra.student.isfinite().flatten(0, -1)).unwrap(),
            Vec::<bool>::try_from(rb.student.isfinite().flatten(0, -1)).unwrap(),
            "{what}: the same −inf entries"
        );
        let finite = ra.student.isfinite();
        let dq = (ra.student.where_self(&finite, &zero) - rb.student.where_self(&finite, &zero))
            .abs()
            .max()
            .double_value(&[]);
        assert!(dq < 1e-5, "{what}: log q̃ differs by {dq}");
        pull(&rb.student).backward();
        let gb = hand.logits_grad().unwrap().expect("the pair was reached");
        let scale = ga.abs().max().double_value(&[]);
        let dg = (&ga - &gb).abs().max().double_value(&[]);
        assert!(
            scale > 0.1 && dg < 2e-5 * scale,
            "{what}: gradient differs by {dg} (scale {scale})"
        );
    }
}
