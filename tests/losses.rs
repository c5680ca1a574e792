//! Every loss against an independent float64 computation written plainly here from the formulas in
//! the issue (loops over rows; no code shared with src/losses), its gradient against central finite
//! differences, and the identities that separate right from almost-right. Each tolerance is a bound
//! on the rounding error of the computation it checks, derived below, not read off one machine.
#![allow(clippy::type_complexity, clippy::needless_range_loop)]
use distill::losses::{self, token_selective as tsd, Taid};
use tch::{Device, Kind, Tensor};

// ---------- plain f64 reference ----------

type Row = Vec<f64>;

fn log_softmax(x: &[f64]) -> Row {
    let m = x
        .iter()
        .cloned()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
    x.iter().map(|v| v - m - z.ln()).collect()
}

/// (log q, log p) over the teacher's support (entries where t is finite), at temperature `temp`.
fn pair(s: &[f64], t: &[f64], temp: f64) -> (Row, Row) {
    let idx: Vec<usize> = (0..t.len()).filter(|&i| t[i].is_finite()).collect();
    let ss: Row = idx.iter().map(|&i| s[i] / temp).collect();
    let tt: Row = idx.iter().map(|&i| t[i] / temp).collect();
    (log_softmax(&ss), log_softmax(&tt))
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

fn fkl(s: &[f64], t: &[f64], temp: f64) -> f64 {
    let (lq, lp) = pair(s, t, temp);
    kl(&lp, &lq)
}
fn rkl(s: &[f64], t: &[f64], temp: f64) -> f64 {
    let (lq, lp) = pair(s, t, temp);
    kl(&lq, &lp)
}
fn mix_log(la: &[f64], lb: &[f64], w: f64) -> Row {
    la.iter()
        .zip(lb)
        .map(|(a, b)| (w * a.exp() + (1.0 - w) * b.exp()).ln())
        .collect()
}
fn jsd(s: &[f64], t: &[f64], beta: f64, temp: f64) -> f64 {
    let (lq, lp) = pair(s, t, temp);
    let lm = mix_log(&lp, &lq, beta);
    beta * kl(&lp, &lm) + (1.0 - beta) * kl(&lq, &lm)
}
fn skew_kl(s: &[f64], t: &[f64], a: f64, temp: f64) -> f64 {
    let (lq, lp) = pair(s, t, temp);
    kl(&lp, &mix_log(&lp, &lq, a))
}
fn skew_rkl(s: &[f64], t: &[f64], a: f64, temp: f64) -> f64 {
    let (lq, lp) = pair(s, t, temp);
    kl(&lq, &mix_log(&lq, &lp, a))
}
fn tvd(s: &[f64], t: &[f64], temp: f64) -> f64 {
    let (lq, lp) = pair(s, t, temp);
    0.5 * lq
        .iter()
        .zip(&lp)
        .map(|(a, b)| (a.exp() - b.exp()).abs())
        .sum::<f64>()
}
fn akl(s: &[f64], t: &[f64], mu: f64, temp: f64) -> f64 {
    let (lq, lp) = pair(s, t, temp);
    let (p, q): (Row, Row) = (
        lp.iter().map(|x| x.exp()).collect(),
        lq.iter().map(|x| x.exp()).collect(),
    );
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
    let (mut cum, mut g_head, mut g_tail) = (0.0, 0.0, 0.0);
    for &i in &order {
        if cum < mu {
            g_head += (p[i] - q[i]).abs();
        } else {
            g_tail += (p[i] - q[i]).abs();
        }
        cum += p[i];
    }
    if g_head + g_tail == 0.0 {
        return 0.0;
    }
    (g_head * kl(&lp, &lq) + g_tail * kl(&lq, &lp)) / (g_head + g_tail)
}
fn ce(s: &[f64], label: usize) -> f64 {
    -log_softmax(s)[label]
}
fn pld(s: &[f64], t: &[f64], label: usize, tau: f64) -> f64 {
    let mut rest: Vec<usize> = (0..s.len()).filter(|&i| i != label).collect();
    rest.sort_by(|&a, &b| t[b].partial_cmp(&t[a]).unwrap());
    let pi: Vec<usize> = std::iter::once(label).chain(rest).collect();
    let a: Row = log_softmax(&t.iter().map(|x| x / tau).collect::<Row>())
        .iter()
        .map(|x| x.exp())
        .collect();
    // Σ_{l≥k} exp(s_{π_l}) for every k, by one backward pass
    let mut suffix = vec![0.0; pi.len() + 1];
    for k in (0..pi.len()).rev() {
        suffix[k] = suffix[k + 1] + s[pi[k]].exp();
    }
    (0..pi.len())
        .map(|k| a[pi[k]] * (suffix[k].ln() - s[pi[k]]))
        .sum()
}
fn taid_ref(s: &[f64], t: &[f64], lambda: f64) -> f64 {
    let target: Row = s
        .iter()
        .zip(t)
        .map(|(a, b)| (1.0 - lambda) * a + lambda * b)
        .collect();
    fkl(s, &target, 1.0)
}
fn entropy(l: &[f64]) -> f64 {
    -l.iter()
        .map(|x| if x.exp() == 0.0 { 0.0 } else { x.exp() * x })
        .sum::<f64>()
}
fn tsd_weighted_jsd(s: &[f64], t: &[f64], beta: f64) -> f64 {
    let (lq, lp) = pair(s, t, 1.0);
    let w = 1.0 / (1.0 + (-(entropy(&lq) - entropy(&lp))).exp());
    w * jsd(s, t, beta, 1.0)
}
fn tsd_rank(s: &[f64], t: &[f64], k: usize) -> f64 {
    let mut cand: Vec<usize> = (0..s.len()).collect();
    cand.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap());
    cand.truncate(k);
    cand.sort_by(|&a, &b| t[b].partial_cmp(&t[a]).unwrap());
    (0..cand.len())
        .map(|i| cand[i..].iter().map(|&l| s[l].exp()).sum::<f64>().ln() - s[cand[i]])
        .sum()
}
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (pos - lo as f64) * (v[hi] - v[lo])
}

/// max |log x| over the entries of a matrix.
fn max_abs_log(k: &[Row]) -> f64 {
    k.iter().flatten().map(|x| x.ln().abs()).fold(0.0, f64::max)
}

/// SinKD's plan from the cost W: K = exp(−W/ε), then `iters` iterations, each dividing every row by
/// its sum and then every column by its sum. Also the largest |log| of an entry over all iterates
/// (the rounding bound needs it).
fn sinkhorn_plan_ref(w: &[Row], eps: f64, iters: usize) -> (Vec<Row>, f64) {
    let n = w.len();
    let mut k: Vec<Row> = w
        .iter()
        .map(|r| r.iter().map(|x| (-x / eps).exp()).collect())
        .collect();
    let mut mlog = max_abs_log(&k);
    for _ in 0..iters {
        for row in k.iter_mut() {
            let z: f64 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= z);
        }
        mlog = mlog.max(max_abs_log(&k));
        for j in 0..n {
            let z: f64 = (0..n).map(|i| k[i][j]).sum();
            (0..n).for_each(|i| k[i][j] /= z);
        }
        mlog = mlog.max(max_abs_log(&k));
    }
    (k, mlog)
}

/// SinKD's cost W_ij = Σ_c |q_i(c) − p_j(c)| between the rows' distributions at temperature T.
fn sinkhorn_cost_ref(s: &[Row], t: &[Row], temp: f64) -> Vec<Row> {
    let probs = |r: &Row| -> Row {
        log_softmax(&r.iter().map(|x| x / temp).collect::<Row>())
            .iter()
            .map(|x| x.exp())
            .collect()
    };
    let (q, p): (Vec<Row>, Vec<Row>) =
        (s.iter().map(probs).collect(), t.iter().map(probs).collect());
    q.iter()
        .map(|qi| {
            p.iter()
                .map(|pj| qi.iter().zip(pj).map(|(a, b)| (a - b).abs()).sum())
                .collect()
        })
        .collect()
}

fn sinkhorn_ref(s: &[Row], t: &[Row], temp: f64, eps: f64, iters: usize) -> f64 {
    let w = sinkhorn_cost_ref(s, t, temp);
    let (p, _) = sinkhorn_plan_ref(&w, eps, iters);
    p.iter()
        .flatten()
        .zip(w.iter().flatten())
        .map(|(a, b)| a * b)
        .sum()
}

/// Mean of `f(row)` over the rows where mask is nonzero (0 when none).
fn masked_mean_ref(rows: usize, mask: &[f64], f: impl Fn(usize) -> f64) -> f64 {
    let counted: Vec<usize> = (0..rows).filter(|&i| mask[i] != 0.0).collect();
    if counted.is_empty() {
        return 0.0;
    }
    counted.iter().map(|&i| f(i)).sum::<f64>() / counted.len() as f64
}

// ---------- data ----------

struct Lcg(u64);
impl Lcg {
    fn normal(&mut self) -> f64 {
        let mut u = || {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (u(), u());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }
}

/// n rows of V normal numbers times `scale`, each an f32 number (so that an f32 tensor holds
/// exactly what the f64 reference reads).
fn rows(seed: u64, n: usize, v: usize, scale: f64) -> Vec<Row> {
    let mut r = Lcg(seed);
    (0..n)
        .map(|_| (0..v).map(|_| (r.normal() * scale) as f32 as f64).collect())
        .collect()
}

/// [2, n/2, V] tensor of the rows (f32 unless `kind` says otherwise).
fn tensor(rows: &[Row], kind: Kind) -> Tensor {
    let v = rows[0].len() as i64;
    let flat: Vec<f64> = rows.iter().flatten().cloned().collect();
    Tensor::from_slice(&flat)
        .reshape([2, rows.len() as i64 / 2, v])
        .to_kind(kind)
}
fn mask_tensor(mask: &[f64]) -> Tensor {
    Tensor::from_slice(mask).reshape([2, mask.len() as i64 / 2])
}
fn val(x: &Tensor) -> f64 {
    x.to_kind(Kind::Double).double_value(&[])
}

const N: usize = 6;
const MASK: [f64; N] = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0];

// ---------- how far the f32 computation may lie from the f64 reference ----------
//
// Every tolerance below is a bound on rounding error, derived for the operations the loss performs,
// so that it holds on any CPU (Intel with AVX-512, AMD with AVX2, aarch64 with NEON: each orders
// libtorch's sums differently). The model (Higham, "Accuracy and Stability of Numerical
// Algorithms", 2nd ed., §2.2 and §4.2):
// - every f32 operation returns the exact result of its operands times (1 + δ), |δ| ≤ u = 2⁻²⁴; a
//   scalar argument (T, α, 1/ε) is rounded to f32 once more;
// - exp, log, log1p and sigmoid are within ELEM·u relative: 20 ulp, the accuracy of libtorch's fast
//   `exp_u20`; its Sleef functions (1 ulp) and glibc's (1–2 ulp) are better;
// - a sum of n terms, in ANY order (SIMD lanes, blocks, threads), is within γ(n)·Σ|terms| of the
//   exact sum, γ(n) = n·u/(1 − n·u). This is the only bound that holds whatever the order, so it
//   grows with n, not log2(n): at V = 50,000, γ = 3e-3, while the errors seen on real CPUs are near
//   √V·u ≈ 1e-5 relative. Loose (about 1% of a divergence at V = 50,000), but still well below the
//   formula mistakes the tests must catch (`tolerances_are_far_below_formula_mistakes`).
// The bounds are first order in u. The terms they drop are below γ(V) ≤ 0.3% of those they keep,
// and the f64 reference's own error is the same expression with 2⁻⁵³ (2⁻²⁹ of ours): TOL_MARGIN
// covers both. The data are f32 numbers (`rows`), so the f32 tensors hold exactly what the
// reference reads; only the division by T ≠ 1 rounds an input.
const U: f64 = 1.0 / 16_777_216.0; // 2^-24, f32
const U64: f64 = 1.0 / 9_007_199_254_740_992.0; // 2^-53, f64
const ELEM: f64 = 40.0;
const TOL_MARGIN: f64 = 1.01;

/// γ(n) for unit roundoff u.
fn gamma_u(n: usize, u: f64) -> f64 {
    let nu = n as f64 * u;
    assert!(nu < 0.01, "bound not valid for n = {n}");
    nu / (1.0 - nu)
}
fn gamma(n: usize) -> f64 {
    gamma_u(n, U)
}

/// Log-softmax of one row, exact, with `err[i]` ≥ |computed − exact| for every entry; `n` is the
/// length of the row as the loss sees it (entries outside the support included).
#[derive(Clone)]
struct LogP {
    l: Row,
    err: Row,
    n: usize,
}

impl LogP {
    fn prob(&self, i: usize) -> f64 {
        self.l[i].exp()
    }
    fn max_err(&self) -> f64 {
        self.err.iter().cloned().fold(0.0, f64::max)
    }
}

/// Bound on every entry of log_softmax(x̂) computed with unit roundoff u, where x̂ = x + an input
/// error of at most `dx` per entry, `range` = max x − min x and n entries. libtorch computes
/// m = max x̂, d_i = x̂_i − m, Z = Σ exp(d_i), out_i = (x̂_i − m) − log Z:
///   input error: Δ log_softmax_i = Δx_i − Σ_j q_j Δx_j                      → 2·dx
///   d_i rounds (u·range); it enters out_i and, through exp, Z               → 2·u·range
///   exp (ELEM·u), the sum (γ(n)), log's rounding (ELEM·u·log Z ≤ ELEM·u·ln n)
///   the last subtraction (u·|out_i| ≤ u·(range + ln n))
fn lsm_err(n: usize, range: f64, dx: f64, u: f64) -> f64 {
    let ln_n = (n as f64).ln();
    2.0 * dx + gamma_u(n, u) + u * (3.0 * range + ELEM + (ELEM + 1.0) * ln_n)
}

/// The log-softmax of the already scaled row x, with its error bound (input error `dx`).
fn logp_b(x: &[f64], n: usize, dx: f64) -> LogP {
    let l = log_softmax(x);
    let finite = || x.iter().cloned().filter(|v| v.is_finite());
    let range = finite().fold(f64::NEG_INFINITY, f64::max) - finite().fold(f64::INFINITY, f64::min);
    let e = lsm_err(n, range, dx, U);
    LogP {
        err: vec![e; l.len()],
        l,
        n,
    }
}

/// (q, p) over the teacher's support as the f32 code forms them at temperature T: the division by
/// T ≠ 1 rounds each scaled logit by u·|x/T| (at T = 1 there is no division).
fn pair_b(s: &[f64], t: &[f64], temp: f64) -> (LogP, LogP) {
    let idx: Vec<usize> = (0..t.len()).filter(|&i| t[i].is_finite()).collect();
    let scaled = |r: &[f64]| -> (Row, f64) {
        let x: Row = idx.iter().map(|&i| r[i] / temp).collect();
        let dx = if temp == 1.0 {
            0.0
        } else {
            U * x.iter().map(|v| v.abs()).fold(0.0, f64::max)
        };
        (x, dx)
    };
    let ((xs, dxs), (xt, dxt)) = (scaled(s), scaled(t));
    (logp_b(&xs, s.len(), dxs), logp_b(&xt, t.len(), dxt))
}

/// KL(a‖b) = Σ a_i·(log a_i − log b_i) and its bound. Per term, a_i = exp(log a_i) is off by
/// a_i·(err_a + ELEM·u), the difference d_i by err_a + err_b (+ u·|d_i|), the product rounds (u);
/// the sum of n terms adds γ(n)·Σ a_i|d_i|:
///   Σ a_i·(err_a,i + err_b,i) + Σ a_i·|d_i|·(err_a,i + (ELEM + 2)·u) + γ(n)·Σ a_i·|d_i|
fn kl_b(a: &LogP, b: &LogP) -> (f64, f64) {
    let (mut value, mut bound, mut sum_abs) = (0.0, 0.0, 0.0);
    for i in 0..a.l.len() {
        let ai = a.prob(i);
        if ai == 0.0 {
            continue;
        }
        let d = a.l[i] - b.l[i];
        value += ai * d;
        sum_abs += ai * d.abs();
        bound += ai * (a.err[i] + b.err[i]) + ai * d.abs() * (a.err[i] + (ELEM + 2.0) * U);
    }
    (value, bound + gamma(a.n) * sum_abs)
}

/// log(w·a + (1−w)·b) entry by entry as `mixture` forms it: A = log a + log w and
/// B = log b + log(1−w) (each off by its input's error, the rounded scalar and the addition), then
/// logaddexp(A, B) = max + log1p(exp(−|A − B|)). logaddexp moves by w_A·ΔA + w_B·ΔB (its weights
/// sum to 1); its own steps add u·|A − B|·w_min (the difference, through a derivative w_min),
/// ELEM·u·w_min (exp), 2·ELEM·u·w_min (log1p of exp(−z) ≤ 2·w_min) and u·|log m| (the last add).
fn mix_b(a: &LogP, b: &LogP, w: f64) -> LogP {
    if w == 0.0 {
        return b.clone();
    }
    if w == 1.0 {
        return a.clone();
    }
    let (lw, lw1) = (w.ln(), (1.0 - w).ln());
    let mut out = LogP {
        l: vec![],
        err: vec![],
        n: a.n,
    };
    for i in 0..a.l.len() {
        let (x, y) = (a.l[i] + lw, b.l[i] + lw1);
        let m = x.max(y) + (-(x - y).abs()).exp().ln_1p();
        let (wa, wb) = ((x - m).exp(), (y - m).exp());
        let w_min = wa.min(wb);
        let da = a.err[i] + U * (a.l[i].abs() + 2.0 * lw.abs());
        let db = b.err[i] + U * (b.l[i].abs() + 2.0 * lw1.abs());
        out.l.push(m);
        out.err.push(
            wa * da + wb * db + U * (x - y).abs() * w_min + 3.0 * ELEM * U * w_min + U * m.abs(),
        );
    }
    out
}

/// H = −Σ p log p and its bound (the same terms as `kl_b` with d_i = log p_i).
fn entropy_b(p: &LogP) -> (f64, f64) {
    let (mut h, mut bound) = (0.0, 0.0);
    for i in 0..p.l.len() {
        let pi = p.prob(i);
        if pi == 0.0 {
            continue;
        }
        h -= pi * p.l[i];
        bound += pi * p.err[i] + pi * p.l[i].abs() * (p.err[i] + (ELEM + 1.0) * U);
    }
    (h, bound + gamma(p.n) * h)
}

/// β·KL(p‖M) + (1−β)·KL(q‖M), M = β·p + (1−β)·q, and its bound (each KL's, plus the scalar
/// products and the sum).
fn jsd_of_b(q: &LogP, p: &LogP, beta: f64) -> (f64, f64) {
    let m = mix_b(p, q, beta);
    let ((k1, e1), (k2, e2)) = (kl_b(p, &m), kl_b(q, &m));
    let value = beta * k1 + (1.0 - beta) * k2;
    let bound =
        beta * e1 + (1.0 - beta) * e2 + U * (2.0 * beta * k1 + 2.0 * (1.0 - beta) * k2 + value);
    (value, bound)
}

fn fkl_b(s: &[f64], t: &[f64], temp: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, temp);
    kl_b(&p, &q)
}
fn rkl_b(s: &[f64], t: &[f64], temp: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, temp);
    kl_b(&q, &p)
}
fn jsd_b(s: &[f64], t: &[f64], beta: f64, temp: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, temp);
    jsd_of_b(&q, &p, beta)
}
fn skew_kl_b(s: &[f64], t: &[f64], a: f64, temp: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, temp);
    kl_b(&p, &mix_b(&p, &q, a))
}
fn skew_rkl_b(s: &[f64], t: &[f64], a: f64, temp: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, temp);
    kl_b(&q, &mix_b(&q, &p, a))
}

/// ½·Σ|p − q|: each probability is off by p_i·(err + ELEM·u), the difference rounds (u), and the sum
/// of n terms adds γ(n)·Σ|p − q|.
fn tvd_b(s: &[f64], t: &[f64], temp: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, temp);
    let (mut sum, mut bound) = (0.0, 0.0);
    for i in 0..p.l.len() {
        let (pi, qi) = (p.prob(i), q.prob(i));
        sum += (pi - qi).abs();
        bound += pi * (p.err[i] + ELEM * U) + qi * (q.err[i] + ELEM * U);
    }
    (0.5 * sum, 0.5 * (bound + (U + gamma(p.n)) * sum))
}

/// AKL and its bound. Value = w·F + (1−w)·R with w = g_head/(g_head + g_tail), F = KL(p‖q),
/// R = KL(q‖p), each g a sum of |p − q| over a set of tokens.
/// - Computed probabilities are off by the relative ε' = err_p + ELEM·u. The head is decided in f32
///   by the mass ranked above a token (sort, cumsum, minus the token): that mass is off by at most
///   ε' + γ(n) + u, plus the mass of the token's near-ties (|p_j − p_i| ≤ ε'·(p_i + p_j)), which the
///   f32 sort may rank either side. A token whose exact mass above lies within that of μ is
///   ambiguous: it may fall in either set, moving |p − q| from one g to the other.
/// - So each g is off by δg = Σ p·(err_p + ELEM·u) + Σ q·(err_q + ELEM·u) + (u + γ(n))·G (its terms
///   and sum) + Σ over ambiguous tokens of |p − q|, and w by 2·δg/G. With F's and R's bounds and
///   three roundings (two products, the quotient).
fn akl_b(s: &[f64], t: &[f64], mu: f64, temp: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, temp);
    let n = p.l.len();
    let (pp, qq): (Row, Row) = (
        (0..n).map(|i| p.prob(i)).collect(),
        (0..n).map(|i| q.prob(i)).collect(),
    );
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| pp[b].partial_cmp(&pp[a]).unwrap());
    let rel = p.max_err() + ELEM * U;
    let mass_err = rel + gamma(p.n) + U;
    let near = |a: f64, b: f64| (a - b).abs() <= rel * (a + b);
    let (mut g_head, mut g_tail, mut ambiguous, mut before) = (0.0, 0.0, 0.0, 0.0);
    for (k, &i) in order.iter().enumerate() {
        let gap = (pp[i] - qq[i]).abs();
        if before < mu {
            g_head += gap;
        } else {
            g_tail += gap;
        }
        // the near-ties of token i are its neighbours in the sorted order
        let ties: f64 = order[..k]
            .iter()
            .rev()
            .take_while(|&&j| near(pp[j], pp[i]))
            .chain(order[k + 1..].iter().take_while(|&&j| near(pp[j], pp[i])))
            .map(|&j| pp[j])
            .sum();
        if (before - mu).abs() <= mass_err + ties {
            ambiguous += gap;
        }
        before += pp[i];
    }
    let total = g_head + g_tail;
    if total == 0.0 {
        // p = q: both sides compute the same distributions bit for bit, and the loss returns 0
        return (akl(s, t, mu, temp), 0.0);
    }
    let ((f, ef), (r, er)) = (kl_b(&p, &q), kl_b(&q, &p));
    let delta_g = (0..n)
        .map(|i| pp[i] * (p.err[i] + ELEM * U) + qq[i] * (q.err[i] + ELEM * U))
        .sum::<f64>()
        + (U + gamma(p.n)) * total
        + ambiguous;
    let w = g_head / total;
    let bound =
        2.0 * delta_g / total * (f - r).abs() + w * ef + (1.0 - w) * er + 3.0 * U * f.max(r);
    (akl(s, t, mu, temp), bound)
}

/// TAID: KL(p‖q) at T = 1 with p = softmax((1−λ)·s + λ·t). The f32 target rounds by
/// u·(2·(1−λ)·|s| + 2·λ·|t| + |target|) per entry (two scalar products with rounded scalars, one
/// sum); at λ ∈ {0, 1} it is a copy of s or t, exact.
fn taid_b(s: &[f64], t: &[f64], lambda: f64) -> (f64, f64) {
    let target: Row = s
        .iter()
        .zip(t)
        .map(|(a, b)| (1.0 - lambda) * a + lambda * b)
        .collect();
    let dx = if lambda == 0.0 || lambda == 1.0 {
        0.0
    } else {
        (0..s.len())
            .map(|i| {
                U * (2.0 * (1.0 - lambda) * s[i].abs()
                    + 2.0 * lambda * t[i].abs()
                    + target[i].abs())
            })
            .fold(0.0, f64::max)
    };
    let q = logp_b(s, s.len(), 0.0);
    let p = logp_b(&target, s.len(), dx);
    kl_b(&p, &q)
}

/// −log q(label) at T = 1: one log-softmax entry.
fn ce_b(s: &[f64], label: usize) -> (f64, f64) {
    let q = logp_b(s, s.len(), 0.0);
    (-q.l[label], q.err[label])
}

/// PLD: libtorch computes it in f64 from the f32 logits (exact there), then rounds it to f32 (u·|L|).
/// The f64 part: the teacher weights a (a softmax in f64: relative `lsm_err` with 2⁻⁵³, and Σ a = 1
/// so it moves L by that times L), the suffix logsumexp scan (V logaddexp steps, each adding
/// 3·ELEM·2⁻⁵³ + 2⁻⁵³·|lse| at most), the weighted sum (γ(V)·L, 2·2⁻⁵³·L).
fn pld_b(s: &[f64], t: &[f64], label: usize, tau: f64) -> (f64, f64) {
    let value = pld(s, t, label, tau);
    let n = s.len();
    let xt: Row = t.iter().map(|x| x / tau).collect();
    let range_t = xt.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        - xt.iter().cloned().fold(f64::INFINITY, f64::min);
    let max_t = xt.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let a_err = lsm_err(n, range_t, U64 * max_t, U64) + ELEM * U64;
    let max_lse = s.iter().map(|v| v.abs()).fold(0.0, f64::max) + (n as f64).ln();
    let scan = n as f64 * U64 * (3.0 * ELEM + max_lse);
    let f64_part = a_err * value + scan + (2.0 * U64 + gamma_u(n, U64)) * value;
    (value, U * value.abs() + f64_part)
}

/// The ranking term: f32 logits (exact) → top-K → a K-term Plackett-Luce sum in f64 → f32. The f64
/// part over K terms is below 4·K·2⁻⁵³·(|L| + K·(max|s| + ln K)); the cast adds u·|L|.
fn tsd_rank_b(s: &[f64], t: &[f64], k: usize) -> (f64, f64) {
    let value = tsd_rank(s, t, k);
    let max_s = s.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let kf = k as f64;
    (
        value,
        U * value.abs() + 4.0 * kf * U64 * (value.abs() + kf * (max_s + kf.ln())),
    )
}

/// sigmoid(H(q) − H(p))·JSD(β) at T = 1: the weight moves by ¼ of its argument's error (the
/// sigmoid's slope) plus its own rounding; the product rounds once.
fn tsd_weighted_jsd_b(s: &[f64], t: &[f64], beta: f64) -> (f64, f64) {
    let (q, p) = pair_b(s, t, 1.0);
    let ((hq, ehq), (hp, ehp)) = (entropy_b(&q), entropy_b(&p));
    let w = 1.0 / (1.0 + (-(hq - hp)).exp());
    let ew = 0.25 * (ehq + ehp + U * (hq - hp).abs()) + ELEM * U * w;
    let (j, ej) = jsd_of_b(&q, &p, beta);
    (tsd_weighted_jsd(s, t, beta), w * ej + j * ew + U * w * j)
}

/// Mean over the counted rows of values with bounds: Σ over c counted rows (γ(c)·Σ|v|), then a
/// division (u).
fn mean_b(rows: &[(f64, f64)], mask: &[f64]) -> (f64, f64) {
    let counted: Vec<&(f64, f64)> = rows
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m != 0.0)
        .map(|(r, _)| r)
        .collect();
    if counted.is_empty() {
        return (0.0, 0.0);
    }
    let c = counted.len() as f64;
    let value = counted.iter().map(|r| r.0).sum::<f64>() / c;
    let sum_abs = counted.iter().map(|r| r.0.abs()).sum::<f64>();
    let bound = counted.iter().map(|r| r.1).sum::<f64>() / c
        + gamma(counted.len()) * sum_abs / c
        + U * value.abs();
    (value, bound)
}

/// Assert |ours − reference| ≤ TOL_MARGIN · bound.
fn within(ours: f64, (reference, bound): (f64, f64), what: &str) {
    let tol = TOL_MARGIN * bound;
    assert!(
        (ours - reference).abs() <= tol,
        "{what}: ours {ours} vs reference {reference}: error {:e} above the bound {tol:e}",
        (ours - reference).abs()
    );
}

/// Bound on each entry of SinKD's cost W computed with unit roundoff u (f32 or f64) from N rows of
/// C classes:
/// - softmax entries (x̂ = x/T rounds by u·|x/T|) are off by the relative
///   ε_sm = 2·dx + γ(C) + u·(2·range + 2·ELEM + 2) (d_i, exp, the sum, 1/Z and the product);
/// - W_ij = Σ_c |q_ic − p_jc| by ε_sm(q_i) + ε_sm(p_j) + (u + γ(C))·W_ij (the probabilities sum to
///   1; the differences round; the sum of C terms).
fn sinkhorn_cost_err(s: &[Row], t: &[Row], temp: f64, u: f64) -> Vec<Row> {
    let c = s[0].len();
    let sm_err = |r: &Row| -> f64 {
        let x: Row = r.iter().map(|v| v / temp).collect();
        let range = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - x.iter().cloned().fold(f64::INFINITY, f64::min);
        let dx = u * x.iter().map(|v| v.abs()).fold(0.0, f64::max);
        2.0 * dx + gamma_u(c, u) + u * (2.0 * range + 2.0 * ELEM + 2.0)
    };
    let w = sinkhorn_cost_ref(s, t, temp);
    s.iter()
        .zip(&w)
        .map(|(si, wi)| {
            t.iter()
                .zip(wi)
                .map(|(tj, wij)| sm_err(si) + sm_err(tj) + (u + gamma_u(c, u)) * wij)
                .collect()
        })
        .collect()
}

/// SinKD's loss and a bound on its computation with unit roundoff u, N rows, ε, `iters` iterations:
/// - W as `sinkhorn_cost_err`; L = W/(−ε) adds the rounded scalar and the quotient:
///   e_L = max (E_W/ε + 2·u·|L|);
/// - each normalisation X − logsumexp(X) along a line of N entries of size ≤ M (the largest |log|
///   of any iterate, from the reference) adds at most ρ = γ(N) + u·(4·M + (ELEM + 1)·(1 + ln N)).
///   Write the error of an iterate as a_i + b_j + e_ij: a row step replaces a by a' with
///   |a'| ≤ |b| + |e| (the logsumexp of a row lies between its smallest and largest entry), a
///   column step b by |b'| ≤ |a'| + |e|, and each step adds ρ to e; so after `iters` iterations
///   |error of log P| ≤ 4·iters·(e_L + 2·iters·ρ) (e_L alone for 0 iterations);
/// - P = exp(log P): relative r_P = exp(that)·(1 + ELEM·u) − 1; loss = Σ P⊙W over N² terms:
///   (1 + r_P)·Σ P_ij·E_W,ij + loss·(r_P + u + γ(N²)).
fn sinkhorn_b(s: &[Row], t: &[Row], temp: f64, eps: f64, iters: usize, u: f64) -> (f64, f64) {
    let n = s.len();
    let w = sinkhorn_cost_ref(s, t, temp);
    let ew = sinkhorn_cost_err(s, t, temp, u);
    let (plan, mlog) = sinkhorn_plan_ref(&w, eps, iters);
    let e_l = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| ew[i][j] / eps + 2.0 * u * w[i][j] / eps)
        .fold(0.0, f64::max);
    let rho = gamma_u(n, u) + u * (4.0 * mlog + (ELEM + 1.0) * (1.0 + (n as f64).ln()));
    let it = iters as f64;
    let e_logp = if iters == 0 {
        e_l
    } else {
        4.0 * it * (e_l + 2.0 * it * rho)
    };
    let r_p = e_logp.exp() * (1.0 + ELEM * u) - 1.0;
    let loss: f64 = (0..n)
        .map(|i| (0..n).map(|j| plan[i][j] * w[i][j]).sum::<f64>())
        .sum();
    let pe: f64 = (0..n)
        .map(|i| (0..n).map(|j| plan[i][j] * ew[i][j]).sum::<f64>())
        .sum();
    (
        loss,
        (1.0 + r_p) * pe + loss * (r_p + u + gamma_u(n * n, u)),
    )
}

/// The vocabulary sizes of `check_against_reference`, and its data for the vi-th one: normal
/// logits, and in the teacher's a few likely classes (+6 on every 37th), as a language model has.
/// Without them KL(p‖q) and KL(q‖p) would agree as V grows (both (σ_p² + σ_q²)/2 for independent
/// normal logits), and swapping p and q would go unseen.
const VOCABS: [usize; 4] = [3, 50, 1000, 50_000];
fn reference_data(vi: usize, v: usize) -> (Vec<Row>, Vec<Row>) {
    let mut t = rows(200 + vi as u64, N, v, 1.5);
    for r in t.iter_mut() {
        for x in r.iter_mut().step_by(37) {
            *x = (*x + 10.0) as f32 as f64;
        }
    }
    (rows(100 + vi as u64, N, v, 2.0), t)
}

/// Compare a loss over [2, 3, V] with and without the mask, at T = 1 and T = 2.5, for several V,
/// against `reference` (a row's value and its error bound, from the functions above).
fn check_against_reference(
    name: &str,
    ours: impl Fn(&Tensor, &Tensor, f64, Option<&Tensor>) -> Tensor,
    reference: impl Fn(&[f64], &[f64], f64) -> (f64, f64),
) {
    for (vi, &v) in VOCABS.iter().enumerate() {
        let (s, t) = reference_data(vi, v);
        for temp in [1.0, 2.5] {
            let (st, tt) = (tensor(&s, Kind::Float), tensor(&t, Kind::Float));
            let per_row: Vec<(f64, f64)> = (0..N).map(|i| reference(&s[i], &t[i], temp)).collect();
            let all = val(&ours(&st, &tt, temp, None));
            within(
                all,
                mean_b(&per_row, &[1.0; N]),
                &format!("{name} V={v} T={temp}"),
            );
            let masked = val(&ours(&st, &tt, temp, Some(&mask_tensor(&MASK))));
            within(
                masked,
                mean_b(&per_row, &MASK),
                &format!("{name} masked V={v} T={temp}"),
            );
        }
    }
}

#[test]
fn forward_and_reverse_kl_match_reference() {
    check_against_reference(
        "forward_kl",
        |s, t, tp, m| losses::forward_kl(s, t, tp, m).unwrap(),
        fkl_b,
    );
    check_against_reference(
        "reverse_kl",
        |s, t, tp, m| losses::reverse_kl(s, t, tp, m).unwrap(),
        rkl_b,
    );
}

#[test]
fn jsd_matches_reference() {
    for beta in [0.1, 0.5, 0.9] {
        check_against_reference(
            "jsd",
            |s, t, tp, m| losses::jsd(s, t, beta, tp, m).unwrap(),
            |s, t, tp| jsd_b(s, t, beta, tp),
        );
    }
}

#[test]
fn skew_divergences_match_reference() {
    check_against_reference(
        "skew_kl",
        |s, t, tp, m| losses::skew_kl(s, t, 0.1, tp, m).unwrap(),
        |s, t, tp| skew_kl_b(s, t, 0.1, tp),
    );
    check_against_reference(
        "skew_reverse_kl",
        |s, t, tp, m| losses::skew_reverse_kl(s, t, 0.1, tp, m).unwrap(),
        |s, t, tp| skew_rkl_b(s, t, 0.1, tp),
    );
}

#[test]
fn tvd_and_adaptive_kl_match_reference() {
    check_against_reference(
        "tvd",
        |s, t, tp, m| losses::tvd(s, t, tp, m).unwrap(),
        tvd_b,
    );
    check_against_reference(
        "adaptive_kl",
        |s, t, tp, m| losses::adaptive_kl(s, t, 0.5, tp, m).unwrap(),
        |s, t, tp| akl_b(s, t, 0.5, tp),
    );
}

/// Where a mistake must show: at every V and T, only where T ≠ 1 (a missing temperature), or, for
/// a mistake that nearly keeps the value on near-symmetric data, at some V for each T.
#[derive(PartialEq)]
enum Seen {
    Everywhere,
    WhereTIsNot1,
    AtSomeV,
}

/// The bounds are worst cases over every summation order, so loose; this shows they still
/// separate each loss from its nearest wrong formulas (the cross-entropy form, p and q swapped, a
/// temperature missing, a parameter mirrored): on the data of `check_against_reference`, each
/// mistake moves the mean by at least MISTAKE_RATIO times the tolerance (where `Seen` says).
/// Three mirrorings (skew_kl's p and q, jsd's β, adaptive_kl's weights) change the value by less
/// than the bound at V = 50,000, where it is about 1% of the value; the smaller vocabularies of the
/// same test catch them.
#[test]
fn tolerances_are_far_below_formula_mistakes() {
    const MISTAKE_RATIO: f64 = 20.0;
    type Right = Box<dyn Fn(&[f64], &[f64], f64) -> (f64, f64)>;
    type Wrong = Box<dyn Fn(&[f64], &[f64], f64) -> f64>;
    // (mistake, the right value with its bound, the wrong value, where it must show)
    let cases: Vec<(&str, Right, Wrong, Seen)> = vec![
        (
            "forward_kl as the cross-entropy −Σ p·log q",
            Box::new(fkl_b),
            Box::new(|s, t, tp| fkl(s, t, tp) + entropy(&pair(s, t, tp).1)),
            Seen::Everywhere,
        ),
        (
            "forward_kl with p and q swapped",
            Box::new(fkl_b),
            Box::new(rkl),
            Seen::Everywhere,
        ),
        (
            "forward_kl without the temperature",
            Box::new(fkl_b),
            Box::new(|s, t, _| fkl(s, t, 1.0)),
            Seen::WhereTIsNot1,
        ),
        (
            "forward_kl with the temperature on the student only",
            Box::new(fkl_b),
            Box::new(|s, t, tp| kl(&pair(s, t, 1.0).1, &pair(s, t, tp).0)),
            Seen::WhereTIsNot1,
        ),
        (
            "reverse_kl as the cross-entropy −Σ q·log p",
            Box::new(rkl_b),
            Box::new(|s, t, tp| rkl(s, t, tp) + entropy(&pair(s, t, tp).0)),
            Seen::Everywhere,
        ),
        (
            "skew_kl(0.1) with α and 1 − α swapped",
            Box::new(|s, t, tp| skew_kl_b(s, t, 0.1, tp)),
            Box::new(|s, t, tp| skew_kl(s, t, 0.9, tp)),
            Seen::Everywhere,
        ),
        (
            "skew_kl(0.1) with p and q swapped",
            Box::new(|s, t, tp| skew_kl_b(s, t, 0.1, tp)),
            Box::new(|s, t, tp| skew_rkl(s, t, 0.1, tp)),
            Seen::AtSomeV,
        ),
        (
            "skew_reverse_kl(0.1) with α and 1 − α swapped",
            Box::new(|s, t, tp| skew_rkl_b(s, t, 0.1, tp)),
            Box::new(|s, t, tp| skew_rkl(s, t, 0.9, tp)),
            Seen::Everywhere,
        ),
        (
            "jsd(0.1) with β and 1 − β swapped",
            Box::new(|s, t, tp| jsd_b(s, t, 0.1, tp)),
            Box::new(|s, t, tp| jsd(s, t, 0.9, tp)),
            Seen::AtSomeV,
        ),
        (
            "tvd without the ½",
            Box::new(tvd_b),
            Box::new(|s, t, tp| 2.0 * tvd(s, t, tp)),
            Seen::Everywhere,
        ),
        (
            // g_head·RKL + g_tail·FKL = FKL + RKL − AKL
            "adaptive_kl with the weights of FKL and RKL swapped",
            Box::new(|s, t, tp| akl_b(s, t, 0.5, tp)),
            Box::new(|s, t, tp| fkl(s, t, tp) + rkl(s, t, tp) - akl(s, t, 0.5, tp)),
            Seen::AtSomeV,
        ),
        (
            "taid(0.4) with λ and 1 − λ swapped",
            Box::new(|s, t, _| taid_b(s, t, 0.4)),
            Box::new(|s, t, _| taid_ref(s, t, 0.6)),
            Seen::Everywhere,
        ),
        (
            "taid(0.75) with λ and 1 − λ swapped",
            Box::new(|s, t, _| taid_b(s, t, 0.75)),
            Box::new(|s, t, _| taid_ref(s, t, 0.25)),
            Seen::Everywhere,
        ),
    ];
    for (mistake, right, wrong, seen) in &cases {
        for temp in [1.0, 2.5] {
            if *seen == Seen::WhereTIsNot1 && temp == 1.0 {
                continue;
            }
            let ratios: Vec<f64> = VOCABS
                .iter()
                .enumerate()
                .map(|(vi, &v)| {
                    let (s, t) = reference_data(vi, v);
                    let per_row: Vec<(f64, f64)> =
                        (0..N).map(|i| right(&s[i], &t[i], temp)).collect();
                    let (value, bound) = mean_b(&per_row, &[1.0; N]);
                    let wrong_value = masked_mean_ref(N, &[1.0; N], |i| wrong(&s[i], &t[i], temp));
                    (wrong_value - value).abs() / (TOL_MARGIN * bound)
                })
                .collect();
            let shown: Vec<String> = VOCABS
                .iter()
                .zip(&ratios)
                .map(|(v, r)| format!("V={v}: {r:.0}"))
                .collect();
            let what = format!(
                "{mistake}, T={temp}: times the tolerance {}",
                shown.join(", ")
            );
            eprintln!("{what}");
            let enough = |r: &f64| *r >= MISTAKE_RATIO;
            match seen {
                Seen::AtSomeV => assert!(ratios.iter().any(enough), "{what}"),
                _ => assert!(ratios.iter().all(enough), "{what}"),
            }
        }
    }
}

fn labels_for(v: usize) -> Vec<i64> {
    vec![1 % v as i64, -100, 2 % v as i64, 0, (v as i64) - 1, -100]
}

/// 0 where the label is −100, else the mask.
fn label_mask(labels: &[i64], mask: &[f64]) -> Vec<f64> {
    (0..N)
        .map(|i| if labels[i] == -100 { 0.0 } else { mask[i] })
        .collect()
}

#[test]
fn hinton_matches_reference() {
    for v in [3usize, 50, 50_000] {
        let (s, t) = (rows(300, N, v, 2.0), rows(301, N, v, 3.0));
        let labels = labels_for(v);
        let lt = Tensor::from_slice(&labels).reshape([2, 3]);
        for (alpha, temp) in [(0.7, 2.0), (0.5, 1.0)] {
            for mask in [[1.0; N], MASK] {
                let ours = val(&losses::hinton(
                    &tensor(&s, Kind::Float),
                    &tensor(&t, Kind::Float),
                    &lt,
                    alpha,
                    temp,
                    Some(&mask_tensor(&mask)),
                )
                .unwrap());
                let soft: Vec<(f64, f64)> = (0..N).map(|i| fkl_b(&s[i], &t[i], temp)).collect();
                let hard: Vec<(f64, f64)> = (0..N)
                    .map(|i| {
                        if labels[i] == -100 {
                            (0.0, 0.0)
                        } else {
                            ce_b(&s[i], labels[i] as usize)
                        }
                    })
                    .collect();
                let (soft, soft_b) = mean_b(&soft, &mask);
                let (hard, hard_b) = mean_b(&hard, &label_mask(&labels, &mask));
                // two products by rounded scalars (2u each) and their sum (u)
                let k = alpha * temp * temp;
                let value = k * soft + (1.0 - alpha) * hard;
                let bound = k * soft_b
                    + (1.0 - alpha) * hard_b
                    + U * (2.0 * k * soft.abs() + 2.0 * (1.0 - alpha) * hard.abs() + value.abs());
                within(
                    ours,
                    (value, bound),
                    &format!("hinton V={v} a={alpha} T={temp}"),
                );
            }
        }
    }
}

#[test]
fn pld_matches_reference() {
    for v in [3usize, 50, 50_000] {
        let (s, t) = (rows(400, N, v, 2.0), rows(401, N, v, 3.0));
        let labels = labels_for(v);
        let lt = Tensor::from_slice(&labels).reshape([2, 3]);
        for tau in [1.0, 0.5] {
            for mask in [[1.0; N], MASK] {
                let ours = val(&losses::pld(
                    &tensor(&s, Kind::Float),
                    &tensor(&t, Kind::Float),
                    &lt,
                    tau,
                    Some(&mask_tensor(&mask)),
                )
                .unwrap());
                let per_row: Vec<(f64, f64)> = (0..N)
                    .map(|i| {
                        if labels[i] == -100 {
                            (0.0, 0.0)
                        } else {
                            pld_b(&s[i], &t[i], labels[i] as usize, tau)
                        }
                    })
                    .collect();
                within(
                    ours,
                    mean_b(&per_row, &label_mask(&labels, &mask)),
                    &format!("pld V={v} tau={tau}"),
                );
            }
        }
    }
}

fn taid_at(lambda: f64) -> Taid {
    let mut taid = Taid::new(0.4, 1.0, 5e-4, 0.99, 100).unwrap();
    let mut st = taid.state();
    st.lambda = lambda;
    taid.restore(st);
    taid
}

#[test]
fn taid_loss_matches_reference() {
    for lambda in [0.0, 0.4, 0.75, 1.0] {
        let taid = taid_at(lambda);
        check_against_reference(
            "taid",
            |s, t, _tp, m| taid.loss(s, t, m).unwrap(),
            |s, t, _| taid_b(s, t, lambda),
        );
    }
}

#[test]
fn token_selective_parts_match_reference() {
    check_against_reference(
        "tsd jsd",
        |s, t, _, m| tsd::weighted_jsd(s, t, 0.9, 1.0, m).unwrap(),
        |s, t, _| tsd_weighted_jsd_b(s, t, 0.9),
    );
    check_against_reference(
        "tsd rank",
        |s, t, _, m| tsd::ranking_term(s, t, 10, m).unwrap(),
        |s, t, _| tsd_rank_b(s, t, 10),
    );
    for v in [3usize, 50, 50_000] {
        // rows of different spreads, so that their entropies lie apart (which rows the 0.1-quantile
        // keeps is discrete: the data check below)
        let s: Vec<Row> = (0..N)
            .map(|i| rows(500 + i as u64, 1, v, 1.0 + 0.5 * i as f64).remove(0))
            .collect();
        let h: Vec<(f64, f64)> = s.iter().map(|r| entropy_b(&logp_b(r, v, 0.0))).collect();
        for mask in [[1.0; N], MASK] {
            let ours = val(&tsd::entropy_term(
                &tensor(&s, Kind::Float),
                0.1,
                1.0,
                Some(&mask_tensor(&mask)),
            )
            .unwrap());
            let counted: Vec<usize> = (0..N).filter(|&i| mask[i] != 0.0).collect();
            // torch.quantile's linear interpolation between the two order statistics around
            // q·(n − 1); in f32 it moves by the errors of those two entropies plus three roundings
            let mut order = counted.clone();
            order.sort_by(|&a, &b| h[a].0.partial_cmp(&h[b].0).unwrap());
            let pos = 0.1 * (order.len() - 1) as f64;
            let (lo, hi) = (order[pos.floor() as usize], order[pos.ceil() as usize]);
            let frac = pos - pos.floor();
            let thr = quantile(counted.iter().map(|&i| h[i].0).collect(), 0.1);
            let thr_err = (1.0 - frac) * h[lo].1 + frac * h[hi].1 + 3.0 * U * thr.abs();
            // which tokens are kept is discrete: the data must leave it the same under rounding
            for &i in &counted {
                assert!(
                    (h[i].0 - thr).abs() > h[i].1 + thr_err,
                    "tsd entropy test data V={v}: entropy {} of row {i} within rounding of the \
                     threshold {thr}",
                    h[i].0
                );
            }
            let keep: Vec<f64> = (0..N)
                .map(|i| {
                    if mask[i] != 0.0 && h[i].0 >= thr {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            within(ours, mean_b(&h, &keep), &format!("tsd entropy V={v}"));
        }
        // the weighted sum, weights 1 / 1 / 0.1, against its parts computed by the same code: in
        // f32, a + b rounds (u), 0.1·c twice (2u: the scalar and the product), the total once (u)
        let t = rows(501, N, v, 3.0);
        let (st, tt) = (tensor(&s, Kind::Float), tensor(&t, Kind::Float));
        let total =
            val(
                &tsd::token_selective(&st, &tt, &tsd::TokenSelectiveConfig::default(), None)
                    .unwrap(),
            );
        let a = val(&tsd::weighted_jsd(&st, &tt, 0.9, 1.0, None).unwrap());
        let b = val(&tsd::entropy_term(&st, 0.1, 1.0, None).unwrap());
        let c = 0.1 * val(&tsd::ranking_term(&st, &tt, 10, None).unwrap());
        let parts = a + b + c;
        within(
            total,
            (parts, U * ((a + b).abs() + 2.0 * c.abs() + parts.abs())),
            "token_selective sum",
        );
    }
}

/// [N, C] tensor of the rows in `kind`.
fn matrix(r: &[Row], kind: Kind) -> Tensor {
    Tensor::from_slice(&r.iter().flatten().cloned().collect::<Vec<_>>())
        .reshape([r.len() as i64, r[0].len() as i64])
        .to_kind(kind)
}

#[test]
fn sinkhorn_matches_reference() {
    // In f64 end to end at every C. In f32 end to end where `sinkhorn_b` is informative (its error
    // in W, a sum over C classes, is amplified by 1/ε and by the iterations): C ≤ 50; at every C the
    // f32 cost matrix alone, whose bound is the sum's.
    for c in [3usize, 50, 5000] {
        let (s, t) = (rows(600, 5, c, 2.0), rows(601, 5, c, 3.0));
        for (temp, iters) in [(1.0, 20), (2.0, 7), (2.0, 1)] {
            let (reference, b32) = sinkhorn_b(&s, &t, temp, 0.1, iters, U);
            let (_, b64) = sinkhorn_b(&s, &t, temp, 0.1, iters, U64);
            let what = format!("sinkhorn C={c} T={temp} iters={iters}");
            let ours64 = val(&losses::sinkhorn(
                &matrix(&s, Kind::Double),
                &matrix(&t, Kind::Double),
                temp,
                0.1,
                iters,
            )
            .unwrap());
            // the reference is f64 too and obeys the same bound
            within(ours64, (reference, 2.0 * b64), &format!("{what} in f64"));
            if c <= 50 {
                let ours = val(&losses::sinkhorn(
                    &matrix(&s, Kind::Float),
                    &matrix(&t, Kind::Float),
                    temp,
                    0.1,
                    iters,
                )
                .unwrap());
                within(ours, (reference, b32 + b64), &what);
            }
        }
        for temp in [1.0, 2.0] {
            let ours = losses::sinkhorn::cost_matrix(
                &matrix(&s, Kind::Float),
                &matrix(&t, Kind::Float),
                temp,
            )
            .unwrap();
            let w = sinkhorn_cost_ref(&s, &t, temp);
            let err = sinkhorn_cost_err(&s, &t, temp, U);
            for i in 0..5 {
                for j in 0..5 {
                    within(
                        ours.double_value(&[i as i64, j as i64]),
                        (w[i][j], err[i][j]),
                        &format!("sinkhorn cost C={c} T={temp} [{i}][{j}]"),
                    );
                }
            }
        }
    }
}

#[test]
fn sinkhorn_iteration_is_rows_then_columns() {
    // a cost that is not symmetric, so that a row and a column normalisation differ
    let w: Vec<Row> = rows(610, 5, 5, 1.0)
        .iter()
        .map(|r| r.iter().map(|x| x.abs()).collect())
        .collect();
    let wt = matrix(&w, Kind::Double);
    for (eps, iters) in [(0.1, 1), (0.1, 2), (0.5, 3), (0.1, 20)] {
        let ours = losses::sinkhorn::sinkhorn_plan(&wt, eps, iters).unwrap();
        let (reference, mlog) = sinkhorn_plan_ref(&w, eps, iters);
        // log P of both (f64) within 4·iters·(e_L + 2·iters·ρ) each (see `sinkhorn_b`), with
        // e_L = 2·2⁻⁵³·|W|/ε (W is exact here)
        let e_l = 2.0 * U64 * w.iter().flatten().cloned().fold(0.0, f64::max) / eps;
        let rho = gamma_u(5, U64) + U64 * (4.0 * mlog + (ELEM + 1.0) * (1.0 + 5f64.ln()));
        let it = iters as f64;
        let e_logp = 2.0 * 4.0 * it * (e_l + 2.0 * it * rho);
        for i in 0..5 {
            for j in 0..5 {
                let x = ours.double_value(&[i as i64, j as i64]);
                assert!(
                    (x / reference[i][j]).ln().abs() <= TOL_MARGIN * (e_logp + ELEM * U64),
                    "ε={eps} iters={iters}: P[{i}][{j}] = {x} vs reference {}",
                    reference[i][j]
                );
            }
        }
        // the last step normalised the columns: each sums to 1 up to that step's rounding (ρ, the
        // exp of each entry, the 5-term sum)
        let col_tol = TOL_MARGIN * (rho + (ELEM + 5.0) * U64);
        let dev = (ours.sum_dim_intlist(0, false, Kind::Double) - 1.0)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            dev <= col_tol,
            "ε={eps} iters={iters}: column sums off by {dev:e}"
        );
    }
    // One iteration is a row and a column normalisation: the plan after it is not the one after a
    // single row normalisation (the definition before), whose rows, not columns, sum to 1.
    let one = losses::sinkhorn::sinkhorn_plan(&wt, 0.1, 1).unwrap();
    let rows_only: Vec<Row> = w
        .iter()
        .map(|r| {
            let k: Row = r.iter().map(|x| (-x / 0.1).exp()).collect();
            let z: f64 = k.iter().sum();
            k.iter().map(|x| x / z).collect()
        })
        .collect();
    let gap = (0..25)
        .map(|k| {
            (one.double_value(&[k / 5, k % 5]) - rows_only[k as usize / 5][k as usize % 5]).abs()
        })
        .fold(0.0, f64::max);
    assert!(
        gap > 1e-2,
        "one iteration equals a row normalisation: {gap}"
    );
}

// ---------- gradients ----------

/// Autograd gradient of `ours` (f64) against central differences of the f64 reference. In f64 with
/// h = 1e-6 and sums of at most 7 terms, a central difference is off by h²/6·|f‴| (about 1e-12 for
/// these O(1) logits) plus the rounding 2⁻⁵³·|f|/h·(a few) ≈ 1e-9, on any CPU: the tolerance
/// 1e-6 + 1e-5·|fd| lies far above both.
fn check_gradient(
    name: &str,
    ours: impl Fn(&Tensor) -> Tensor,
    reference: impl Fn(&[Row]) -> f64,
    s: &[Row],
) {
    let x = tensor(s, Kind::Double).set_requires_grad(true);
    ours(&x).backward();
    let g = x.grad().reshape([-1]);
    let h = 1e-6;
    let mut k = 0;
    for i in 0..s.len() {
        for j in 0..s[0].len() {
            let mut plus = s.to_vec();
            plus[i][j] += h;
            let mut minus = s.to_vec();
            minus[i][j] -= h;
            let fd = (reference(&plus) - reference(&minus)) / (2.0 * h);
            let ad = g.double_value(&[k]);
            assert!(
                (fd - ad).abs() < 1e-6 + 1e-5 * fd.abs(),
                "{name}: d/ds[{i}][{j}] autograd {ad} vs finite difference {fd}"
            );
            k += 1;
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let s = rows(700, N, 7, 1.5);
    let t = rows(701, N, 7, 2.0);
    let tt = tensor(&t, Kind::Double);
    let m = mask_tensor(&MASK);
    let labels = labels_for(7);
    let lt = Tensor::from_slice(&labels).reshape([2, 3]);
    check_gradient(
        "forward_kl",
        |x| losses::forward_kl(x, &tt, 2.0, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &MASK, |i| fkl(&x[i], &t[i], 2.0)),
        &s,
    );
    check_gradient(
        "reverse_kl",
        |x| losses::reverse_kl(x, &tt, 2.0, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &MASK, |i| rkl(&x[i], &t[i], 2.0)),
        &s,
    );
    check_gradient(
        "jsd",
        |x| losses::jsd(x, &tt, 0.3, 1.5, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &MASK, |i| jsd(&x[i], &t[i], 0.3, 1.5)),
        &s,
    );
    check_gradient(
        "skew_kl",
        |x| losses::skew_kl(x, &tt, 0.1, 1.0, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &MASK, |i| skew_kl(&x[i], &t[i], 0.1, 1.0)),
        &s,
    );
    check_gradient(
        "skew_reverse_kl",
        |x| losses::skew_reverse_kl(x, &tt, 0.1, 1.0, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &MASK, |i| skew_rkl(&x[i], &t[i], 0.1, 1.0)),
        &s,
    );
    check_gradient(
        "tvd",
        |x| losses::tvd(x, &tt, 1.0, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &MASK, |i| tvd(&x[i], &t[i], 1.0)),
        &s,
    );
    check_gradient(
        "adaptive_kl",
        |x| losses::adaptive_kl(x, &tt, 0.5, 1.0, Some(&m)).unwrap(),
        |x: &[Row]| {
            // g_head and g_tail are detached: hold the mixing weight at the unperturbed s
            masked_mean_ref(N, &MASK, |i| {
                let (f0, r0, a0) = (
                    fkl(&s[i], &t[i], 1.0),
                    rkl(&s[i], &t[i], 1.0),
                    akl(&s[i], &t[i], 0.5, 1.0),
                );
                let w_head = (a0 - r0) / (f0 - r0);
                w_head * fkl(&x[i], &t[i], 1.0) + (1.0 - w_head) * rkl(&x[i], &t[i], 1.0)
            })
        },
        &s,
    );
    let hard: Vec<f64> = (0..N)
        .map(|i| if labels[i] == -100 { 0.0 } else { MASK[i] })
        .collect();
    check_gradient(
        "hinton",
        |x| losses::hinton(x, &tt, &lt, 0.6, 2.0, Some(&m)).unwrap(),
        |x: &[Row]| {
            0.6 * 4.0 * masked_mean_ref(N, &MASK, |i| fkl(&x[i], &t[i], 2.0))
                + 0.4 * masked_mean_ref(N, &hard, |i| ce(&x[i], labels[i] as usize))
        },
        &s,
    );
    check_gradient(
        "pld",
        |x| losses::pld(x, &tt, &lt, 0.7, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &hard, |i| pld(&x[i], &t[i], labels[i] as usize, 0.7)),
        &s,
    );
    let taid = taid_at(0.6);
    check_gradient(
        "taid",
        |x| taid.loss(x, &tt, Some(&m)).unwrap(),
        |x: &[Row]| {
            // the interpolated target uses stopgrad(s): hold it at the unperturbed s
            masked_mean_ref(N, &MASK, |i| {
                let target: Row = s[i]
                    .iter()
                    .zip(&t[i])
                    .map(|(a, b)| 0.4 * a + 0.6 * b)
                    .collect();
                fkl(&x[i], &target, 1.0)
            })
        },
        &s,
    );
    check_gradient(
        "tsd rank",
        |x| tsd::ranking_term(x, &tt, 4, Some(&m)).unwrap(),
        |x: &[Row]| masked_mean_ref(N, &MASK, |i| tsd_rank(&x[i], &t[i], 4)),
        &s,
    );
    check_gradient(
        "tsd jsd",
        |x| tsd::weighted_jsd(x, &tt, 0.9, 1.0, Some(&m)).unwrap(),
        |x: &[Row]| {
            // the weight is detached: hold it at the unperturbed s
            masked_mean_ref(N, &MASK, |i| {
                let (lq, lp) = pair(&s[i], &t[i], 1.0);
                let w = 1.0 / (1.0 + (-(entropy(&lq) - entropy(&lp))).exp());
                w * jsd(&x[i], &t[i], 0.9, 1.0)
            })
        },
        &s,
    );
    // Sinkhorn on [N, C] rows
    let s2 = rows(702, 4, 5, 1.0);
    let t2 = rows(703, 4, 5, 1.0);
    let t2t = Tensor::from_slice(&t2.iter().flatten().cloned().collect::<Vec<_>>()).reshape([4, 5]);
    let x = Tensor::from_slice(&s2.iter().flatten().cloned().collect::<Vec<_>>())
        .reshape([4, 5])
        .set_requires_grad(true);
    losses::sinkhorn(&x, &t2t, 1.0, 0.5, 9).unwrap().backward();
    let g = x.grad().reshape([-1]);
    let h = 1e-6;
    for k in 0..20 {
        let (i, j) = (k / 5, k % 5);
        let mut p = s2.clone();
        p[i][j] += h;
        let mut mi = s2.clone();
        mi[i][j] -= h;
        let fd =
            (sinkhorn_ref(&p, &t2, 1.0, 0.5, 9) - sinkhorn_ref(&mi, &t2, 1.0, 0.5, 9)) / (2.0 * h);
        let ad = g.double_value(&[k as i64]);
        assert!(
            (fd - ad).abs() < 1e-6 + 1e-5 * fd.abs(),
            "sinkhorn d/ds[{i}][{j}]: {ad} vs {fd}"
        );
    }
}

// ---------- properties ----------

#[test]
fn divergences_are_nonnegative_and_zero_at_equality() {
    let (s_rows, t_rows) = (rows(800, N, 100, 3.0), rows(801, N, 100, 3.0));
    let s = tensor(&s_rows, Kind::Float);
    let t = tensor(&t_rows, Kind::Float);
    type Ours = Box<dyn Fn(&Tensor, &Tensor) -> Tensor>;
    type Bound = Box<dyn Fn(&[f64], &[f64]) -> (f64, f64)>;
    // (name, the loss, its reference value with the bound of its f32 computation)
    let all: Vec<(&str, Ours, Bound)> = vec![
        (
            "forward_kl",
            Box::new(|a, b| losses::forward_kl(a, b, 2.0, None).unwrap()),
            Box::new(|a, b| fkl_b(a, b, 2.0)),
        ),
        (
            "reverse_kl",
            Box::new(|a, b| losses::reverse_kl(a, b, 2.0, None).unwrap()),
            Box::new(|a, b| rkl_b(a, b, 2.0)),
        ),
        (
            "jsd",
            Box::new(|a, b| losses::jsd(a, b, 0.5, 2.0, None).unwrap()),
            Box::new(|a, b| jsd_b(a, b, 0.5, 2.0)),
        ),
        (
            "skew_kl",
            Box::new(|a, b| losses::skew_kl(a, b, 0.1, 2.0, None).unwrap()),
            Box::new(|a, b| skew_kl_b(a, b, 0.1, 2.0)),
        ),
        (
            "skew_reverse_kl",
            Box::new(|a, b| losses::skew_reverse_kl(a, b, 0.1, 2.0, None).unwrap()),
            Box::new(|a, b| skew_rkl_b(a, b, 0.1, 2.0)),
        ),
        (
            "tvd",
            Box::new(|a, b| losses::tvd(a, b, 2.0, None).unwrap()),
            Box::new(|a, b| tvd_b(a, b, 2.0)),
        ),
        (
            "adaptive_kl",
            Box::new(|a, b| losses::adaptive_kl(a, b, 0.5, 2.0, None).unwrap()),
            Box::new(|a, b| akl_b(a, b, 0.5, 2.0)),
        ),
        (
            "taid",
            Box::new(|a, b| taid_at(0.5).loss(a, b, None).unwrap()),
            Box::new(|a, b| taid_b(a, b, 0.5)),
        ),
        (
            "tsd jsd",
            Box::new(|a, b| tsd::weighted_jsd(a, b, 0.9, 1.0, None).unwrap()),
            Box::new(|a, b| tsd_weighted_jsd_b(a, b, 0.9)),
        ),
    ];
    for (name, f, bound) in &all {
        let per_row = |x: &[Row], y: &[Row]| -> Vec<(f64, f64)> {
            (0..N).map(|i| bound(&x[i], &y[i])).collect()
        };
        // different distributions: clearly positive, and as the reference says
        let d = val(&f(&s, &t));
        assert!(d > 1e-3, "{name}: {d} for different distributions");
        within(
            d,
            mean_b(&per_row(&s_rows, &t_rows), &[1.0; N]),
            &format!("{name} for different distributions"),
        );
        // equal ones: 0 (the reference) up to the rounding bound, far below the value above
        let z = val(&f(&s, &s));
        let (zero, z_bound) = mean_b(&per_row(&s_rows, &s_rows), &[1.0; N]);
        assert!(z_bound < 1e-3 * d, "{name}: bound {z_bound:e} at s = t");
        within(z, (zero, z_bound), &format!("{name} at s = t"));
    }
    // the exact forms are exactly zero (this is what catches the cross-entropy form)
    assert_eq!(val(&losses::forward_kl(&s, &s, 1.0, None).unwrap()), 0.0);
    assert_eq!(val(&losses::reverse_kl(&s, &s, 1.0, None).unwrap()), 0.0);
    assert_eq!(val(&losses::tvd(&s, &s, 1.0, None).unwrap()), 0.0);
}

#[test]
fn limits_of_the_parameters() {
    let (s_rows, t_rows) = (rows(900, N, 64, 2.0), rows(901, N, 64, 2.0));
    let s = tensor(&s_rows, Kind::Float);
    let t = tensor(&t_rows, Kind::Float);
    // the mean over the rows of a reference with its bound
    let reference = |f: &dyn Fn(&[f64], &[f64]) -> (f64, f64)| -> (f64, f64) {
        let per_row: Vec<(f64, f64)> = (0..N).map(|i| f(&s_rows[i], &t_rows[i])).collect();
        mean_b(&per_row, &[1.0; N])
    };
    let fkl_v = val(&losses::forward_kl(&s, &t, 1.0, None).unwrap());
    // jsd -> 0 at both ends
    assert_eq!(val(&losses::jsd(&s, &t, 0.0, 1.0, None).unwrap()), 0.0);
    assert_eq!(val(&losses::jsd(&s, &t, 1.0, 1.0, None).unwrap()), 0.0);
    let mid = val(&losses::jsd(&s, &t, 0.5, 1.0, None).unwrap());
    for b in [1e-4, 1.0 - 1e-4] {
        let near = val(&losses::jsd(&s, &t, b, 1.0, None).unwrap());
        within(
            near,
            reference(&|x, y| jsd_b(x, y, b, 1.0)),
            "jsd near an end",
        );
        assert!(near < mid * 1e-2, "jsd(β={b}) = {near}, mid {mid}");
    }
    // skew_kl(α→0) → KL(p‖q), skew_reverse_kl(α→0) → KL(q‖p): exactly at α = 0
    assert_eq!(
        val(&losses::skew_kl(&s, &t, 0.0, 1.0, None).unwrap()),
        fkl_v
    );
    let rkl_v = val(&losses::reverse_kl(&s, &t, 1.0, None).unwrap());
    assert_eq!(
        val(&losses::skew_reverse_kl(&s, &t, 0.0, 1.0, None).unwrap()),
        rkl_v
    );
    // and as α falls the gap to KL shrinks (it is α·χ²(p‖q) to first order), seen in f64, where the
    // rounding (≈ 64·2⁻⁵³·KL) is far below even the last gap; in f32 each value stays within its
    // bound of the reference
    let alphas = [1e-2, 1e-4, 1e-6, 1e-8, 1e-10];
    let (s64, t64) = (tensor(&s_rows, Kind::Double), tensor(&t_rows, Kind::Double));
    let fkl64 = val(&losses::forward_kl(&s64, &t64, 1.0, None).unwrap());
    let gaps: Vec<f64> = alphas
        .iter()
        .map(|&a| (val(&losses::skew_kl(&s64, &t64, a, 1.0, None).unwrap()) - fkl64).abs())
        .collect();
    assert!(
        gaps.windows(2).all(|w| w[1] < w[0]),
        "skew_kl does not approach KL as α → 0: {gaps:?}"
    );
    assert!(
        gaps[4] < 1e-5 * fkl64,
        "skew_kl(1e-10) is {} from KL",
        gaps[4]
    );
    for a in alphas {
        within(
            val(&losses::skew_kl(&s, &t, a, 1.0, None).unwrap()),
            reference(&|x, y| skew_kl_b(x, y, a, 1.0)),
            &format!("skew_kl(α={a})"),
        );
    }
    // hinton with α = 0 is the cross-entropy (label −100 ignored). Both sides take the same
    // log-softmax of the same rows; only the means differ, each within γ(4)·Σ|nll|/4 + u·mean.
    let labels_h = labels_for(64);
    let labels = Tensor::from_slice(&labels_h).reshape([2, 3]);
    let h0 = val(&losses::hinton(&s, &t, &labels, 0.0, 3.0, None).unwrap());
    let ce_torch = val(&s.reshape([6, 64]).cross_entropy_loss::<Tensor>(
        &labels.reshape([6]),
        None,
        tch::Reduction::Mean,
        -100,
        0.0,
    ));
    let nll: Vec<f64> = (0..N)
        .filter(|&i| labels_h[i] != -100)
        .map(|i| ce(&s_rows[i], labels_h[i] as usize))
        .collect();
    let c = nll.len();
    let mean_err = gamma(c) * nll.iter().sum::<f64>() / c as f64 + U * ce_torch.abs();
    within(
        h0,
        (ce_torch, 2.0 * mean_err),
        "hinton(α=0) vs cross-entropy",
    );
    // pld with τ → 0 is the cross-entropy on the true label when the teacher's top class is the
    // label (the f64 teacher weights are then exactly one-hot): both against the f64 reference,
    // each within its bound
    let labels_v: Vec<i64> = (0..N as i64).map(|i| (i * 5) % 64).collect();
    let mut t_top = rows(902, N, 64, 2.0);
    for (i, r) in t_top.iter_mut().enumerate() {
        r[labels_v[i] as usize] = 50.0;
    }
    let lt = Tensor::from_slice(&labels_v).reshape([2, 3]);
    let p0 = val(&losses::pld(&s, &tensor(&t_top, Kind::Float), &lt, 1e-3, None).unwrap());
    let ce_l = val(&s.reshape([6, 64]).cross_entropy_loss::<Tensor>(
        &lt.reshape([6]),
        None,
        tch::Reduction::Mean,
        -100,
        0.0,
    ));
    let pld_rows: Vec<(f64, f64)> = (0..N)
        .map(|i| pld_b(&s_rows[i], &t_top[i], labels_v[i] as usize, 1e-3))
        .collect();
    let ce_rows: Vec<(f64, f64)> = (0..N)
        .map(|i| ce_b(&s_rows[i], labels_v[i] as usize))
        .collect();
    let ((pld_v, pld_bound), (ce_v, ce_bound)) =
        (mean_b(&pld_rows, &[1.0; N]), mean_b(&ce_rows, &[1.0; N]));
    within(p0, (pld_v, pld_bound), "pld(τ→0)");
    within(ce_l, (ce_v, ce_bound), "cross-entropy");
    // the two f64 references agree up to their own rounding: a 64-term sum of exponentials and a
    // log each (γ(64) + 2⁻⁵³·(ELEM + 2·(max|s| + ln 64)) per row)
    let max_s = s_rows.iter().flatten().map(|x| x.abs()).fold(0.0, f64::max);
    let refs_tol = 2.0 * (gamma_u(64, U64) + U64 * (ELEM + 2.0 * (max_s + 64f64.ln())));
    assert!(
        (pld_v - ce_v).abs() <= refs_tol,
        "pld(τ→0) reference {pld_v} vs cross-entropy {ce_v}"
    );
    // TAID at λ = 1 is forward KL at T = 1
    assert_eq!(val(&taid_at(1.0).loss(&s, &t, None).unwrap()), fkl_v);
}

#[test]
fn taid_schedule_follows_its_rule() {
    let (t_start, t_end, alpha, beta, total) = (0.2, 0.9, 0.05, 0.9, 50usize);
    let mut taid = Taid::new(t_start, t_end, alpha, beta, total).unwrap();
    // scripted losses: falling, flat, rising, falling fast
    let script: Vec<f64> = (0..80)
        .map(|i| match i {
            0..=19 => 5.0 - 0.2 * i as f64,
            20..=34 => 1.0,
            35..=49 => 1.0 + 0.1 * (i - 35) as f64,
            _ => 2.5 * 0.8f64.powi(i - 50),
        })
        .collect();
    let (mut lam, mut m, mut prev): (f64, f64, Option<f64>) = (t_start, 0.0, None);
    let mut saved = None;
    for (k, &loss) in script.iter().enumerate() {
        let step = k + 1;
        taid.update(loss, step);
        // the rule, written out independently
        if let Some(p) = prev {
            let rel = (p - loss) / (p + 1e-15);
            m = beta * m + (1.0 - beta) * rel;
            let ramp = t_start + (t_end - t_start) * (step as f64 / total as f64).min(1.0);
            lam = t_end.min(ramp.max(lam + alpha / (1.0 + (-m).exp()) * (1.0 - lam)));
            assert!(
                taid.lambda() >= ramp - 1e-15,
                "λ below the ramp at step {step}"
            );
        }
        prev = Some(loss);
        assert!(
            (taid.lambda() - lam).abs() < 1e-15,
            "step {step}: λ {} vs rule {lam}",
            taid.lambda()
        );
        assert!(taid.lambda() <= t_end);
        if step == 30 {
            saved = Some(serde_json::to_string(&taid.state()).unwrap());
        }
    }
    assert_eq!(taid.lambda(), t_end);
    // restored from step 30's state, the same losses give the same λ bit for bit
    let mut resumed = Taid::new(t_start, t_end, alpha, beta, total).unwrap();
    resumed.restore(serde_json::from_str(&saved.unwrap()).unwrap());
    let mut again = Taid::new(t_start, t_end, alpha, beta, total).unwrap();
    for (k, &loss) in script.iter().enumerate() {
        again.update(loss, k + 1);
        if k + 1 > 30 {
            resumed.update(loss, k + 1);
            assert_eq!(resumed.state(), again.state());
        }
    }
}

#[test]
fn ranking_step_raises_the_teacher_preferred_candidate() {
    let s = rows(1000, N, 40, 1.0);
    let t = rows(1001, N, 40, 1.0);
    let x = tensor(&s, Kind::Float).set_requires_grad(true);
    let tt = tensor(&t, Kind::Float);
    tsd::ranking_term(&x, &tt, 10, None).unwrap().backward();
    let g = x.grad();
    let x_new = tch::no_grad(|| &x - g * 0.5);
    for (i, (sr, tr)) in s.iter().zip(&t).enumerate() {
        let mut cand: Vec<usize> = (0..40).collect();
        cand.sort_by(|&a, &b| sr[b].partial_cmp(&sr[a]).unwrap());
        let best = *cand[..10]
            .iter()
            .max_by(|&&a, &&b| tr[a].partial_cmp(&tr[b]).unwrap())
            .unwrap();
        let (a, b) = ((i / 3) as i64, (i % 3) as i64);
        let before = sr[best];
        let after = x_new.double_value(&[a, b, best as i64]);
        assert!(
            after > before,
            "row {i}: preferred candidate {best} went from {before} to {after}"
        );
    }
}

#[test]
fn masked_positions_change_nothing() {
    let s = rows(1100, N, 30, 2.0);
    let t = rows(1101, N, 30, 2.0);
    let mut s_g = s.clone();
    let mut t_g = t.clone();
    for i in (0..N).filter(|&i| MASK[i] == 0.0) {
        for j in 0..30 {
            s_g[i][j] = if j % 2 == 0 { 1e4 } else { -1e4 } * (j as f64 + 1.0);
            t_g[i][j] = -7e3 + j as f64 * 300.0;
        }
    }
    let labels = Tensor::from_slice(&labels_for(30)).reshape([2, 3]);
    let m = mask_tensor(&MASK);
    let losses_of: Vec<(&str, Box<dyn Fn(&Tensor, &Tensor) -> Tensor>)> = vec![
        (
            "forward_kl",
            Box::new(|a, b| losses::forward_kl(a, b, 2.0, Some(&m)).unwrap()),
        ),
        (
            "reverse_kl",
            Box::new(|a, b| losses::reverse_kl(a, b, 2.0, Some(&m)).unwrap()),
        ),
        (
            "jsd",
            Box::new(|a, b| losses::jsd(a, b, 0.5, 1.0, Some(&m)).unwrap()),
        ),
        (
            "skew_kl",
            Box::new(|a, b| losses::skew_kl(a, b, 0.1, 1.0, Some(&m)).unwrap()),
        ),
        (
            "tvd",
            Box::new(|a, b| losses::tvd(a, b, 1.0, Some(&m)).unwrap()),
        ),
        (
            "adaptive_kl",
            Box::new(|a, b| losses::adaptive_kl(a, b, 0.5, 1.0, Some(&m)).unwrap()),
        ),
        (
            "hinton",
            Box::new(|a, b| losses::hinton(a, b, &labels, 0.5, 2.0, Some(&m)).unwrap()),
        ),
        (
            "pld",
            Box::new(|a, b| losses::pld(a, b, &labels, 1.0, Some(&m)).unwrap()),
        ),
        (
            "taid",
            Box::new(|a, b| taid_at(0.5).loss(a, b, Some(&m)).unwrap()),
        ),
        (
            "token_selective",
            Box::new(|a, b| tsd::token_selective(a, b, &Default::default(), Some(&m)).unwrap()),
        ),
    ];
    for (name, f) in &losses_of {
        let clean = tensor(&s, Kind::Float).set_requires_grad(true);
        let garbage = tensor(&s_g, Kind::Float).set_requires_grad(true);
        let a = f(&clean, &tensor(&t, Kind::Float));
        let b = f(&garbage, &tensor(&t_g, Kind::Float));
        assert_eq!(
            val(&a),
            val(&b),
            "{name}: masked positions changed the value"
        );
        b.backward();
        let g = garbage.grad().reshape([N as i64, 30]);
        for i in (0..N).filter(|&i| MASK[i] == 0.0) {
            assert_eq!(
                g.get(i as i64).abs().max().double_value(&[]),
                0.0,
                "{name}: gradient at masked position {i}"
            );
        }
        assert!(
            g.isfinite().all().int64_value(&[]) == 1,
            "{name}: non-finite gradient"
        );
    }
    // fully masked input gives 0
    let none = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
    let (st, tt) = (tensor(&s, Kind::Float), tensor(&t, Kind::Float));
    assert_eq!(
        val(&losses::forward_kl(&st, &tt, 1.0, Some(&none)).unwrap()),
        0.0
    );
    assert_eq!(
        val(&losses::jsd(&st, &tt, 0.5, 1.0, Some(&none)).unwrap()),
        0.0
    );
}

#[test]
fn extreme_logits_and_masked_vocabulary_stay_finite() {
    let mut s = rows(1200, N, 50, 1.0);
    let mut t = rows(1201, N, 50, 1.0);
    for (i, (sr, tr)) in s.iter_mut().zip(t.iter_mut()).enumerate() {
        for j in 0..50 {
            sr[j] *= 1e4;
            tr[j] = if (i + j) % 7 == 0 {
                f64::NEG_INFINITY
            } else {
                tr[j] * 1e4
            };
        }
    }
    let labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).reshape([2, 3]);
    let cases: Vec<(&str, Box<dyn Fn(&Tensor, &Tensor) -> Tensor>)> = vec![
        (
            "forward_kl",
            Box::new(|a, b| losses::forward_kl(a, b, 1.0, None).unwrap()),
        ),
        (
            "reverse_kl",
            Box::new(|a, b| losses::reverse_kl(a, b, 1.0, None).unwrap()),
        ),
        (
            "jsd",
            Box::new(|a, b| losses::jsd(a, b, 0.5, 1.0, None).unwrap()),
        ),
        (
            "skew_kl",
            Box::new(|a, b| losses::skew_kl(a, b, 0.1, 1.0, None).unwrap()),
        ),
        (
            "skew_reverse_kl",
            Box::new(|a, b| losses::skew_reverse_kl(a, b, 0.1, 1.0, None).unwrap()),
        ),
        (
            "tvd",
            Box::new(|a, b| losses::tvd(a, b, 1.0, None).unwrap()),
        ),
        (
            "adaptive_kl",
            Box::new(|a, b| losses::adaptive_kl(a, b, 0.5, 1.0, None).unwrap()),
        ),
        (
            "hinton",
            Box::new(|a, b| losses::hinton(a, b, &labels, 0.5, 2.0, None).unwrap()),
        ),
        (
            "taid",
            Box::new(|a, b| taid_at(0.5).loss(a, b, None).unwrap()),
        ),
        (
            "token_selective",
            Box::new(|a, b| tsd::token_selective(a, b, &Default::default(), None).unwrap()),
        ),
        (
            "pld",
            Box::new(|a, b| losses::pld(a, b, &labels, 1.0, None).unwrap()),
        ),
        (
            "sinkhorn",
            Box::new(|a, b| {
                losses::sinkhorn(&a.reshape([6, 50]), &b.reshape([6, 50]), 1.0, 0.1, 20).unwrap()
            }),
        ),
    ];
    for (name, f) in &cases {
        let x = tensor(&s, Kind::Float).set_requires_grad(true);
        let l = f(&x, &tensor(&t, Kind::Float));
        assert!(val(&l).is_finite(), "{name}: {}", val(&l));
        l.backward();
        assert!(
            x.grad().isfinite().all().int64_value(&[]) == 1,
            "{name}: non-finite gradient"
        );
    }
    // and the masked vocabulary is handled as documented: excluded from both distributions
    let (st, tt) = (tensor(&rows(1300, N, 20, 1.0), Kind::Float), {
        let mut t2 = rows(1301, N, 20, 1.0);
        t2.iter_mut().for_each(|r| r[3] = f64::NEG_INFINITY);
        t2
    });
    let ours = val(&losses::reverse_kl(&st, &tensor(&tt, Kind::Float), 1.0, None).unwrap());
    let s_rows = rows(1300, N, 20, 1.0);
    let per_row: Vec<(f64, f64)> = (0..N).map(|i| rkl_b(&s_rows[i], &tt[i], 1.0)).collect();
    within(
        ours,
        mean_b(&per_row, &[1.0; N]),
        "reverse_kl with masked vocabulary",
    );
}

#[test]
fn shape_errors_name_the_argument() {
    let s = Tensor::zeros([2, 3, 5], (Kind::Float, Device::Cpu));
    let t = Tensor::zeros([2, 3, 6], (Kind::Float, Device::Cpu));
    let e = losses::forward_kl(&s, &t, 1.0, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("forward_kl: 'teacher' has shape [2, 3, 6], expected [2, 3, 5]"),
        "{e}"
    );
    let m = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
    let e = losses::jsd(&s, &s, 0.5, 1.0, Some(&m))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'weights' has shape [3, 2], expected [2, 3]"),
        "{e}"
    );
    let e = losses::tvd(&s, &s, 0.0, None).unwrap_err().to_string();
    assert!(e.contains("temperature"), "{e}");
}
