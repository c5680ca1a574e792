//! Every loss against an independent float64 computation written plainly here from the formulas in
//! the issue (loops over rows; no code shared with src/losses), its gradient against central finite
//! differences, and the identities that separate right from almost-right.
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
fn sinkhorn_ref(s: &[Row], t: &[Row], temp: f64, eps: f64, iters: usize) -> (f64, Vec<Row>) {
    let probs = |r: &Row| -> Row {
        log_softmax(&r.iter().map(|x| x / temp).collect::<Row>())
            .iter()
            .map(|x| x.exp())
            .collect()
    };
    let (q, p): (Vec<Row>, Vec<Row>) =
        (s.iter().map(probs).collect(), t.iter().map(probs).collect());
    let n = s.len();
    let w: Vec<Row> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| q[i].iter().zip(&p[j]).map(|(a, b)| (a - b).abs()).sum())
                .collect()
        })
        .collect();
    let mut k: Vec<Row> = w
        .iter()
        .map(|r| r.iter().map(|x| (-x / eps).exp()).collect())
        .collect();
    for it in 0..iters {
        if it % 2 == 0 {
            for row in k.iter_mut() {
                let z: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= z);
            }
        } else {
            for j in 0..n {
                let z: f64 = (0..n).map(|i| k[i][j]).sum();
                (0..n).for_each(|i| k[i][j] /= z);
            }
        }
    }
    let loss = (0..n)
        .map(|i| (0..n).map(|j| k[i][j] * w[i][j]).sum::<f64>())
        .sum();
    (loss, k)
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

fn rows(seed: u64, n: usize, v: usize, scale: f64) -> Vec<Row> {
    let mut r = Lcg(seed);
    (0..n)
        .map(|_| (0..v).map(|_| r.normal() * scale).collect())
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

fn close(ours: f64, reference: f64, what: &str) {
    let err = (ours - reference).abs() / reference.abs().max(1.0);
    assert!(
        err <= 1e-6,
        "{what}: ours {ours} vs reference {reference} (error {err:e})"
    );
}

/// Compare a loss over [2, 3, V] with and without the mask, at T = 1 and T = 2.5, for several V.
fn check_against_reference(
    name: &str,
    ours: impl Fn(&Tensor, &Tensor, f64, Option<&Tensor>) -> Tensor,
    reference: impl Fn(&[f64], &[f64], f64) -> f64,
) {
    for (vi, &v) in [3usize, 50, 1000, 50_000].iter().enumerate() {
        let s = rows(100 + vi as u64, N, v, 2.0);
        let t = rows(200 + vi as u64, N, v, 3.0);
        for temp in [1.0, 2.5] {
            let (st, tt) = (tensor(&s, Kind::Float), tensor(&t, Kind::Float));
            let all = val(&ours(&st, &tt, temp, None));
            close(
                all,
                masked_mean_ref(N, &[1.0; N], |i| reference(&s[i], &t[i], temp)),
                &format!("{name} V={v} T={temp}"),
            );
            let masked = val(&ours(&st, &tt, temp, Some(&mask_tensor(&MASK))));
            close(
                masked,
                masked_mean_ref(N, &MASK, |i| reference(&s[i], &t[i], temp)),
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
        fkl,
    );
    check_against_reference(
        "reverse_kl",
        |s, t, tp, m| losses::reverse_kl(s, t, tp, m).unwrap(),
        rkl,
    );
}

#[test]
fn jsd_matches_reference() {
    for beta in [0.1, 0.5, 0.9] {
        check_against_reference(
            "jsd",
            |s, t, tp, m| losses::jsd(s, t, beta, tp, m).unwrap(),
            |s, t, tp| jsd(s, t, beta, tp),
        );
    }
}

#[test]
fn skew_divergences_match_reference() {
    check_against_reference(
        "skew_kl",
        |s, t, tp, m| losses::skew_kl(s, t, 0.1, tp, m).unwrap(),
        |s, t, tp| skew_kl(s, t, 0.1, tp),
    );
    check_against_reference(
        "skew_reverse_kl",
        |s, t, tp, m| losses::skew_reverse_kl(s, t, 0.1, tp, m).unwrap(),
        |s, t, tp| skew_rkl(s, t, 0.1, tp),
    );
}

#[test]
fn tvd_and_adaptive_kl_match_reference() {
    check_against_reference("tvd", |s, t, tp, m| losses::tvd(s, t, tp, m).unwrap(), tvd);
    check_against_reference(
        "adaptive_kl",
        |s, t, tp, m| losses::adaptive_kl(s, t, 0.5, tp, m).unwrap(),
        |s, t, tp| akl(s, t, 0.5, tp),
    );
}

fn labels_for(v: usize) -> Vec<i64> {
    vec![1 % v as i64, -100, 2 % v as i64, 0, (v as i64) - 1, -100]
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
                let soft = masked_mean_ref(N, &mask, |i| fkl(&s[i], &t[i], temp));
                let hard_mask: Vec<f64> = (0..N)
                    .map(|i| if labels[i] == -100 { 0.0 } else { mask[i] })
                    .collect();
                let hard = masked_mean_ref(N, &hard_mask, |i| ce(&s[i], labels[i] as usize));
                close(
                    ours,
                    alpha * temp * temp * soft + (1.0 - alpha) * hard,
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
                let m: Vec<f64> = (0..N)
                    .map(|i| if labels[i] == -100 { 0.0 } else { mask[i] })
                    .collect();
                close(
                    ours,
                    masked_mean_ref(N, &m, |i| pld(&s[i], &t[i], labels[i] as usize, tau)),
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
            |s, t, _| taid_ref(s, t, lambda),
        );
    }
}

#[test]
fn token_selective_parts_match_reference() {
    check_against_reference(
        "tsd jsd",
        |s, t, _, m| tsd::weighted_jsd(s, t, 0.9, 1.0, m).unwrap(),
        |s, t, _| tsd_weighted_jsd(s, t, 0.9),
    );
    check_against_reference(
        "tsd rank",
        |s, t, _, m| tsd::ranking_term(s, t, 10, m).unwrap(),
        |s, t, _| tsd_rank(s, t, 10),
    );
    for v in [3usize, 50, 50_000] {
        let s = rows(500, N, v, 2.0);
        for mask in [[1.0; N], MASK] {
            let ours = val(&tsd::entropy_term(
                &tensor(&s, Kind::Float),
                0.1,
                1.0,
                Some(&mask_tensor(&mask)),
            )
            .unwrap());
            let h: Vec<f64> = s.iter().map(|r| entropy(&log_softmax(r))).collect();
            let counted: Vec<f64> = (0..N).filter(|&i| mask[i] != 0.0).map(|i| h[i]).collect();
            let thr = quantile(counted, 0.1);
            let keep: Vec<f64> = (0..N)
                .map(|i| {
                    if mask[i] != 0.0 && h[i] >= thr {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            close(
                ours,
                masked_mean_ref(N, &keep, |i| h[i]),
                &format!("tsd entropy V={v}"),
            );
        }
        // the weighted sum, weights 1 / 1 / 0.1
        let t = rows(501, N, v, 3.0);
        let (st, tt) = (tensor(&s, Kind::Float), tensor(&t, Kind::Float));
        let total =
            val(
                &tsd::token_selective(&st, &tt, &tsd::TokenSelectiveConfig::default(), None)
                    .unwrap(),
            );
        let parts = val(&tsd::weighted_jsd(&st, &tt, 0.9, 1.0, None).unwrap())
            + val(&tsd::entropy_term(&st, 0.1, 1.0, None).unwrap())
            + 0.1 * val(&tsd::ranking_term(&st, &tt, 10, None).unwrap());
        close(total, parts, "token_selective sum");
    }
}

#[test]
fn sinkhorn_matches_reference() {
    for v in [3usize, 50, 5000] {
        let (s, t) = (rows(600, 5, v, 2.0), rows(601, 5, v, 3.0));
        let flat = |r: &[Row]| {
            Tensor::from_slice(&r.iter().flatten().cloned().collect::<Vec<_>>())
                .reshape([5, v as i64])
                .to_kind(Kind::Float)
        };
        for (temp, iters) in [(1.0, 20), (2.0, 7)] {
            let ours = val(&losses::sinkhorn(&flat(&s), &flat(&t), temp, 0.1, iters).unwrap());
            close(
                ours,
                sinkhorn_ref(&s, &t, temp, 0.1, iters).0,
                &format!("sinkhorn V={v}"),
            );
        }
    }
}

// ---------- gradients ----------

/// Autograd gradient of `ours` (f64) against central differences of the f64 reference.
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
        let fd = (sinkhorn_ref(&p, &t2, 1.0, 0.5, 9).0 - sinkhorn_ref(&mi, &t2, 1.0, 0.5, 9).0)
            / (2.0 * h);
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
    let s = tensor(&rows(800, N, 100, 3.0), Kind::Float);
    let t = tensor(&rows(801, N, 100, 3.0), Kind::Float);
    let all: Vec<(&str, Box<dyn Fn(&Tensor, &Tensor) -> Tensor>)> = vec![
        (
            "forward_kl",
            Box::new(|a, b| losses::forward_kl(a, b, 2.0, None).unwrap()),
        ),
        (
            "reverse_kl",
            Box::new(|a, b| losses::reverse_kl(a, b, 2.0, None).unwrap()),
        ),
        (
            "jsd",
            Box::new(|a, b| losses::jsd(a, b, 0.5, 2.0, None).unwrap()),
        ),
        (
            "skew_kl",
            Box::new(|a, b| losses::skew_kl(a, b, 0.1, 2.0, None).unwrap()),
        ),
        (
            "skew_reverse_kl",
            Box::new(|a, b| losses::skew_reverse_kl(a, b, 0.1, 2.0, None).unwrap()),
        ),
        (
            "tvd",
            Box::new(|a, b| losses::tvd(a, b, 2.0, None).unwrap()),
        ),
        (
            "adaptive_kl",
            Box::new(|a, b| losses::adaptive_kl(a, b, 0.5, 2.0, None).unwrap()),
        ),
        (
            "taid",
            Box::new(|a, b| taid_at(0.5).loss(a, b, None).unwrap()),
        ),
        (
            "tsd jsd",
            Box::new(|a, b| tsd::weighted_jsd(a, b, 0.9, 1.0, None).unwrap()),
        ),
    ];
    for (name, f) in &all {
        let d = val(&f(&s, &t));
        assert!(d > 1e-3, "{name}: {d} for different distributions");
        let z = val(&f(&s, &s));
        assert!(z.abs() < 1e-6, "{name}: {z} at s = t");
    }
    // the exact forms are exactly zero (this is what catches the cross-entropy form)
    assert_eq!(val(&losses::forward_kl(&s, &s, 1.0, None).unwrap()), 0.0);
    assert_eq!(val(&losses::reverse_kl(&s, &s, 1.0, None).unwrap()), 0.0);
    assert_eq!(val(&losses::tvd(&s, &s, 1.0, None).unwrap()), 0.0);
}

#[test]
fn limits_of_the_parameters() {
    let s = tensor(&rows(900, N, 64, 2.0), Kind::Float);
    let t = tensor(&rows(901, N, 64, 2.0), Kind::Float);
    let fkl_v = val(&losses::forward_kl(&s, &t, 1.0, None).unwrap());
    // jsd -> 0 at both ends
    assert_eq!(val(&losses::jsd(&s, &t, 0.0, 1.0, None).unwrap()), 0.0);
    assert_eq!(val(&losses::jsd(&s, &t, 1.0, 1.0, None).unwrap()), 0.0);
    let mid = val(&losses::jsd(&s, &t, 0.5, 1.0, None).unwrap());
    for b in [1e-4, 1.0 - 1e-4] {
        let near = val(&losses::jsd(&s, &t, b, 1.0, None).unwrap());
        assert!(near < mid * 1e-2, "jsd(β={b}) = {near}, mid {mid}");
    }
    // skew_kl(α→0) → KL(p‖q), skew_reverse_kl(α→0) → KL(q‖p)
    assert_eq!(
        val(&losses::skew_kl(&s, &t, 0.0, 1.0, None).unwrap()),
        fkl_v
    );
    let gaps: Vec<f64> = [1e-2, 1e-4, 1e-6, 1e-8, 1e-10]
        .iter()
        .map(|&a| (val(&losses::skew_kl(&s, &t, a, 1.0, None).unwrap()) - fkl_v).abs())
        .collect();
    assert!(
        gaps.windows(2).all(|w| w[1] <= w[0]),
        "skew_kl does not approach KL as α → 0: {gaps:?}"
    );
    assert!(
        gaps[4] < 1e-5 * fkl_v,
        "skew_kl(1e-10) is {} from KL",
        gaps[4]
    );
    let rkl_v = val(&losses::reverse_kl(&s, &t, 1.0, None).unwrap());
    assert_eq!(
        val(&losses::skew_reverse_kl(&s, &t, 0.0, 1.0, None).unwrap()),
        rkl_v
    );
    // hinton with α = 0 is the cross-entropy (label −100 ignored)
    let labels = Tensor::from_slice(&labels_for(64)).reshape([2, 3]);
    let h0 = val(&losses::hinton(&s, &t, &labels, 0.0, 3.0, None).unwrap());
    let ce_torch = val(&s.reshape([6, 64]).cross_entropy_loss::<Tensor>(
        &labels.reshape([6]),
        None,
        tch::Reduction::Mean,
        -100,
        0.0,
    ));
    assert!(
        (h0 - ce_torch).abs() < 1e-6,
        "hinton(α=0) {h0} vs cross-entropy {ce_torch}"
    );
    // pld with τ → 0 is the cross-entropy on the true label when the teacher's top class is the label
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
    assert!(
        (p0 - ce_l).abs() < 1e-5,
        "pld(τ→0) {p0} vs cross-entropy {ce_l}"
    );
    // TAID at λ = 1 is forward KL at T = 1
    assert_eq!(val(&taid_at(1.0).loss(&s, &t, None).unwrap()), fkl_v);
    // Sinkhorn's plan has unit row sums after a row step
    let w = Tensor::rand([5, 5], (Kind::Double, Device::Cpu)) * 2.0;
    for iters in [1, 3, 21] {
        let p = losses::sinkhorn::sinkhorn_plan(&w, 0.1, iters).unwrap();
        let dev = (p.sum_dim_intlist(1, false, Kind::Double) - 1.0)
            .abs()
            .max()
            .double_value(&[]);
        assert!(dev < 1e-12, "row sums off by {dev} after {iters} steps");
    }
    let p = losses::sinkhorn::sinkhorn_plan(&w, 0.1, 2).unwrap();
    let dev = (p.sum_dim_intlist(0, false, Kind::Double) - 1.0)
        .abs()
        .max()
        .double_value(&[]);
    assert!(dev < 1e-12, "column sums off by {dev} after a column step");
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
    close(
        ours,
        masked_mean_ref(N, &[1.0; N], |i| rkl(&s_rows[i], &tt[i], 1.0)),
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
