//! Choosing a student's layers by how little runs of consecutive layers change the residual stream:
//!
//!   d(i, j) = (1/π) · mean over tokens t of arccos( ⟨h_i(t), h_j(t)⟩ / (‖h_i(t)‖·‖h_j(t)‖) ),  i < j
//!
//! h_i is the residual stream entering layer i (h_0 = the embeddings, h_L = the last layer's output
//! before the final norm), so d(l, l+n) scores the run of the n layers l..l+n−1: removing it feeds
//! h_l straight into layer l+n. Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
//! Layers" (arXiv:2403.17887), §3.2 eq. 7, measures the final token of each sequence; we average over
//! every token, as ShortGPT's Block Influence does (Men et al. 2024, arXiv:2403.03853, eq. 1:
//! BI_l = 1 − cos(h_l, h_{l+1}), one layer at a time). Computed in f64 from the model's hidden
//! states, every token of every calibration window counted once.
//!
//! How L layers become N (`Strategy`), each never removing the first or the last layer when
//! `keep_ends` (and N ≥ 2):
//! - `OneShot` (Gromov et al.): one measurement; remove the run of n = L − N consecutive layers with
//!   the smallest d(l, l+n).
//! - `Iterative { block }`: remove the run of min(block, layers left − N) consecutive layers with the
//!   smallest d on the current model, measure the shortened model again, repeat until N remain.
//!   One-shot is the case block ≥ L − N.
//! - `Independent` (ShortGPT): one measurement; remove the L − N layers with the smallest d(l, l+1).
//! - `Perplexity { candidates: K }`: one measurement; the K runs of L − N layers with the smallest
//!   d(l, l+n) are each removed in turn and the model left is judged by its perplexity on the same
//!   calibration windows, exp(mean NLL of every token after the first of a window); the lowest
//!   wins (the earliest on a tie). d proposes, the perplexity decides: on the demo teacher d ranks
//!   the good runs first but not in order (BENCHMARKS.md), and K perplexity passes of an N-layer
//!   model cost about K·N/L of one measurement.
//!
//! The default (`Perplexity { candidates: 4 }`, ends kept) is the strategy whose untrained student
//! had the lowest perplexity on the demo teacher, SmolLM2-135M cut from 30 to 10 layers
//! (BENCHMARKS.md, "Choosing the student's layers"). Each measurement is one forward pass of the
//! model over the calibration windows; iterative makes L − N of them, on a model one layer shorter
//! each time.
use crate::model::Llama;
use crate::{Error, Result};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    OneShot,
    Iterative { block: usize },
    Independent,
    Perplexity { candidates: usize },
}

impl Strategy {
    /// "one-shot", "iterative" (one layer a round), "iterative:K" (runs of K), "independent".
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "one-shot" => Ok(Strategy::OneShot),
            "independent" => Ok(Strategy::Independent),
            "iterative" => Ok(Strategy::Iterative { block: 1 }),
            "perplexity" => Ok(Strategy::Perplexity { candidates: 4 }),
            _ => match (
                s.strip_prefix("iterative:").map(str::parse::<usize>),
                s.strip_prefix("perplexity:").map(str::parse::<usize>),
            ) {
                (Some(Ok(block)), _) if block >= 1 => Ok(Strategy::Iterative { block }),
                (_, Some(Ok(candidates))) if candidates >= 1 => {
                    Ok(Strategy::Perplexity { candidates })
                }
                _ => Err(format!(
                    "unknown strategy '{s}', expected one of \"one-shot\", \"iterative\", \"iterative:K\" (K ≥ 1), \"independent\", \"perplexity\", \"perplexity:K\" (K ≥ 1)"
                )),
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Strategy::OneShot => "one-shot".into(),
            Strategy::Iterative { block: 1 } => "iterative".into(),
            Strategy::Iterative { block } => format!("iterative:{block}"),
            Strategy::Independent => "independent".into(),
            Strategy::Perplexity { candidates: 4 } => "perplexity".into(),
            Strategy::Perplexity { candidates } => format!("perplexity:{candidates}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneOptions {
    /// how many layers the student keeps
    pub keep: usize,
    pub strategy: Strategy,
    /// never remove the first or the last layer (when at least two are kept)
    pub keep_ends: bool,
}

/// The measured default: on the demo teacher (30 → 10 layers) the perplexity choice among the four
/// runs of smallest d gave the lowest untrained perplexity (14.1k; iterative 33.5k, one-shot 39.6k,
/// independent 63.3k, iterative:4 214k, the demo's every third layer 212k) at the cost of one
/// measurement and four perplexity passes (iterative makes twenty measurements); keeping the ends
/// changed no strategy's choice there. BENCHMARKS.md, "Choosing the student's layers".
pub const DEFAULT_STRATEGY: Strategy = Strategy::Perplexity { candidates: 4 };
pub const DEFAULT_KEEP_ENDS: bool = true;

/// d(i, j) of one model, 0 ≤ i < j ≤ m, for the model made of the teacher's `layers` (m of them).
#[derive(Debug, Clone)]
pub struct Distances {
    /// the teacher's layers the measured model runs, in order
    pub layers: Vec<usize>,
    /// Σ over tokens of arccos(cos(h_i, h_j)), (m+1)², row-major
    sums: Vec<f64>,
    pub tokens: usize,
}

impl Distances {
    /// d(i, j) = (1/π)·mean arccos(cos(h_i, h_j)), for 0 ≤ i, j ≤ m.
    pub fn d(&self, i: usize, j: usize) -> f64 {
        let n = self.layers.len() + 1;
        self.sums[i * n + j] / (std::f64::consts::PI * self.tokens as f64)
    }
}

/// Measure the model made of the teacher's `layers` (run in order) on `windows` of token ids.
pub fn distances(model: &Llama, layers: &[usize], windows: &[Vec<u32>]) -> Result<Distances> {
    let n = layers.len() + 1;
    let mut sums = Tensor::zeros([n as i64, n as i64], (Kind::Double, Device::Cpu));
    let mut tokens = 0usize;
    tch::no_grad(|| -> Result<()> {
        for w in windows {
            let ids: Vec<i64> = w.iter().map(|&x| x as i64).collect();
            let ids = Tensor::f_from_slice(&ids)?.f_unsqueeze(0)?; // (1, T)
            let hs = model.residual_stream(&ids, layers)?; // n × (1, T, d)
            let h = Tensor::f_stack(&hs, 0)?
                .f_squeeze_dim(1)?
                .f_to_kind(Kind::Double)?; // (n, T, d)
            let norm = h
                .f_norm_scalaropt_dim(2i64, [-1i64].as_slice(), true)?
                .f_clamp_min(f64::MIN_POSITIVE)?; // (n, T, 1)
            let u = h.f_div(&norm)?.f_transpose(0, 1)?; // (T, n, d), unit rows
            let cos = u.f_bmm(&u.f_transpose(1, 2)?)?.f_clamp(-1.0, 1.0)?; // (T, n, n)
            let angle = cos
                .f_acos()?
                .f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
            sums = sums.f_add(&angle.f_to_device(Device::Cpu)?)?; // (n, n)
            tokens += w.len();
        }
        Ok(())
    })?;
    let sums = Vec::<f64>::try_from(sums.f_flatten(0, -1)?)?;
    if sums.iter().any(|x| !x.is_finite()) {
        return Err(Error::Invalid(
            "the teacher's hidden states are not finite on the calibration text".into(),
        ));
    }
    Ok(Distances {
        layers: layers.to_vec(),
        sums,
        tokens,
    })
}

/// One candidate of a round: the teacher's layers it would remove and its score.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub layers: Vec<usize>,
    pub d: f64,
    /// the calibration perplexity without these layers, when judged (`Perplexity`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
}

/// exp(mean NLL) of every token after the first of each window, for the model made of the
/// teacher's `layers`.
pub fn calibration_perplexity(
    model: &Llama,
    layers: &[usize],
    windows: &[Vec<u32>],
) -> Result<f64> {
    let (mut nll, mut n) = (0.0, 0usize);
    tch::no_grad(|| -> Result<()> {
        for w in windows.iter().filter(|w| w.len() >= 2) {
            let ids: Vec<i64> = w.iter().map(|&x| x as i64).collect();
            let ids = Tensor::f_from_slice(&ids)?.f_unsqueeze(0)?; // (1, T)
            let logits = model.forward_layers(&ids, layers)?;
            nll += crate::eval::nll_sum(&logits, &ids)?;
            n += w.len() - 1;
        }
        Ok(())
    })?;
    if n == 0 {
        return Err(Error::Invalid(
            "the calibration text has no window of two tokens".into(),
        ));
    }
    Ok((nll / n as f64).exp())
}

/// One measurement and what it removed.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// the teacher's layers of the model measured
    pub layers: Vec<usize>,
    pub candidates: Vec<Candidate>,
    /// the teacher's layers removed after this measurement
    pub removed: Vec<usize>,
}

/// The choice and how it was made.
#[derive(Debug, Clone, Serialize)]
pub struct Pruning {
    pub teacher_layers: usize,
    pub keep: usize,
    pub strategy: String,
    pub keep_ends: bool,
    /// calibration tokens per measurement
    pub tokens: usize,
    pub rounds: Vec<Round>,
    /// the teacher's layers the student keeps, in order
    pub kept: Vec<usize>,
}

/// Check `keep` against a teacher of `layers` layers; the message says why it does not fit.
pub fn check_keep(keep: usize, layers: usize) -> std::result::Result<(), String> {
    if keep == 0 {
        return Err("a student needs at least one layer".into());
    }
    if keep >= layers {
        return Err(format!(
            "the teacher has {layers} layers; keep fewer to remove any"
        ));
    }
    Ok(())
}

/// Choose `o.keep` of the model's layers by the strategy, measuring on `windows`.
pub fn prune(model: &Llama, windows: &[Vec<u32>], o: &PruneOptions) -> Result<Pruning> {
    let total = model.config.num_hidden_layers;
    check_keep(o.keep, total).map_err(|m| Error::Invalid(format!("keep = {}: {m}", o.keep)))?;
    // keep_ends fixes two layers: possible only when two are kept
    let ends = usize::from(o.keep_ends && o.keep >= 2);
    let mut cur: Vec<usize> = (0..total).collect();
    let mut rounds = Vec::new();
    let mut tokens = 0;
    while cur.len() > o.keep {
        let dist = distances(model, &cur, windows)?;
        tokens = dist.tokens;
        let m = cur.len();
        let (candidates, removed) = match o.strategy {
            Strategy::Independent => {
                // each single layer, scored alone; the m − keep lowest go
                let c: Vec<Candidate> = (ends..m - ends)
                    .map(|l| Candidate {
                        layers: vec![cur[l]],
                        d: dist.d(l, l + 1),
                        ppl: None,
                    })
                    .collect();
                let mut order: Vec<usize> = (0..c.len()).collect();
                order.sort_by(|&a, &b| c[a].d.total_cmp(&c[b].d).then(a.cmp(&b)));
                let mut removed: Vec<usize> = order[..m - o.keep]
                    .iter()
                    .map(|&k| c[k].layers[0])
                    .collect();
                removed.sort_unstable();
                (c, removed)
            }
            Strategy::OneShot | Strategy::Iterative { .. } | Strategy::Perplexity { .. } => {
                let n = match o.strategy {
                    Strategy::Iterative { block } => block.min(m - o.keep),
                    _ => m - o.keep,
                };
                // the run cur[s..s+n] for every start s that spares the ends
                let mut c: Vec<Candidate> = (ends..=m - n - ends)
                    .map(|s| Candidate {
                        layers: cur[s..s + n].to_vec(),
                        d: dist.d(s, s + n),
                        ppl: None,
                    })
                    .collect();
                if let Strategy::Perplexity { candidates } = o.strategy {
                    // the K smallest d, each judged by the perplexity of the model without it
                    let mut order: Vec<usize> = (0..c.len()).collect();
                    order.sort_by(|&a, &b| c[a].d.total_cmp(&c[b].d).then(a.cmp(&b)));
                    for &k in order.iter().take(candidates) {
                        let left: Vec<usize> = cur
                            .iter()
                            .copied()
                            .filter(|l| !c[k].layers.contains(l))
                            .collect();
                        c[k].ppl = Some(calibration_perplexity(model, &left, windows)?);
                    }
                    let best = c
                        .iter()
                        .enumerate()
                        .filter_map(|(k, x)| x.ppl.map(|p| (k, p)))
                        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
                        .map(|(k, _)| c[k].layers.clone())
                        .expect("at least one candidate judged");
                    if !c.iter().filter_map(|x| x.ppl).all(f64::is_finite) {
                        return Err(Error::Invalid(
                            "a candidate's calibration perplexity is not finite".into(),
                        ));
                    }
                    (c, best)
                } else {
                    let best = lowest_d(&c);
                    (c, best)
                }
            }
        };

        rounds.push(Round {
            layers: cur.clone(),
            candidates,
            removed: removed.clone(),
        });
        cur.retain(|l| !removed.contains(l));
    }
    Ok(Pruning {
        teacher_layers: total,
        keep: o.keep,
        strategy: o.strategy.name(),
        keep_ends: o.keep_ends,
        tokens,
        rounds,
        kept: cur,
    })
}

/// The candidate of smallest d; the earliest on a tie.
fn lowest_d(c: &[Candidate]) -> Vec<usize> {
    c.iter()
        .enumerate()
        .min_by(|a, b| a.1.d.total_cmp(&b.1.d).then(a.0.cmp(&b.0)))
        .map(|(_, x)| x.layers.clone())
        .expect("a run fits: keep < m and keep ≥ 2 when the ends are kept")
}

/// "3-7" for a run of consecutive teacher layers, "3" for one.
fn span(layers: &[usize]) -> String {
    match layers {
        [] => "-".into(),
        [one] => one.to_string(),
        [first, .., last] if last - first + 1 == layers.len() => format!("{first}-{last}"),
        _ => format!("{layers:?}"),
    }
}

impl Pruning {
    /// The first round's candidates and scores (the teacher's), one line per candidate with the
    /// removed ones marked, then one line per later round and the kept layers.
    pub fn table(&self) -> String {
        let mut o = format!(
            "choosing {} of the teacher's {} layers by angular distance d = arccos(cos(h_in, h_out))/π (strategy {}, {} first and last layer, {} calibration tokens a measurement)\n",
            self.keep,
            self.teacher_layers,
            self.strategy,
            if self.keep_ends { "keeping the" } else { "free to remove the" },
            self.tokens
        );
        for (r, round) in self.rounds.iter().enumerate() {
            if r == 0 {
                o += &format!(
                    "round 1, the teacher's {} layers: candidates to remove\n  {:<10} {:>8}\n",
                    round.layers.len(),
                    "layers",
                    "d"
                );
                for c in &round.candidates {
                    let gone = c.layers.iter().all(|l| round.removed.contains(l));
                    let ppl = c
                        .ppl
                        .map_or(String::new(), |p| format!("  calibration ppl {p:.2}"));
                    o += &format!(
                        "  {:<10} {:>8.4}{ppl}{}\n",
                        span(&c.layers),
                        c.d,
                        if gone { "  removed" } else { "" }
                    );
                }
            } else {
                let d = round
                    .candidates
                    .iter()
                    .find(|c| c.layers == round.removed)
                    .map_or(f64::NAN, |c| c.d);
                o += &format!(
                    "round {}, {} layers: removed {} (d {:.4})\n",
                    r + 1,
                    round.layers.len(),
                    span(&round.removed),
                    d
                );
            }
        }
        o += &format!("kept layers: {:?}\n", self.kept);
        o
    }
}
