//! A run's peak memory and step time, predicted before it starts from a short measured probe
//! (`distill plan`, and `distill train` with `[run] max_memory`):
//!
//!   peak = max( set-up peak,  R + G + max(S(N, c), O, E(Nₑ), C) )
//!     R       = resident memory after set-up, its freed pages handed back (measured): libtorch, the teacher's and the student's
//!               weights, AdamW's m and v (allocated at set-up: 2·4·P bytes), the data
//!     G       = 4·P          the f32 gradient of each of the P trainable parameters (counted)
//!     S(N, c) = s₀ + s_tok·N + s_chunk·c   one micro-step's transient memory: the activations kept
//!               for the backward ∝ N = micro_batch·seq_len positions, the (c, V) logits, teacher
//!               distribution and their gradients ∝ c = the chunk (c = N unchunked); s₀, s_tok and
//!               s_chunk fitted to three probe micro-steps (N, c) = (T₀, T₀), (m·T₀, T₀),
//!               (m·T₀, m·T₀) on m = micro_batch (≥ 2) rows of T₀ = min(seq_len, 128) positions:
//!               at the run's own micro-batch, since a micro-step's peak is the larger of its
//!               trunk's and its chunk loop's, and small probes (a small chunk hiding under the
//!               trunk's peak) extrapolate too low; below c = T₀ the line is an extrapolation
//!     O       = 2·4·max_p    AdamW's two temporaries (g², the denominator) for its largest
//!               parameter (counted)
//!     E(Nₑ)   = e₀ + e_tok·Nₑ  an evaluation batch (no graph, whole (Nₑ, V) tensors, Nₑ =
//!               micro_batch·seq_len), fitted to two probe evaluations (T₀, m·T₀)
//!     C       = 2·8·P        a checkpoint's optimizer.safetensors: every moment's bytes, then the
//!               serialised file (counted; 2·4·P_all for the student folder at the end, whichever is
//!               larger)
//!   step time = grad_accum · t_tok · N + t_opt, t_tok from the larger probe micro-step, t_opt from
//!               AdamW's passes over P floats timed on a scratch tensor.
//!
//! The probes are micro-steps on a sequence of the run's data (the live teacher's signal, or a
//! store's for a validation sequence) whose gradients are zeroed afterwards: no weight, optimizer
//! moment or data position changes. Each probe's memory is its resident high-water mark over a
//! baseline from which the allocator's free pages were first handed back (glibc's `malloc_trim`),
//! so that pages kept from earlier work do not hide what it touches. Memory is the process's
//! resident set (VmRSS, VmHWM, Linux);
//! on CUDA the device's memory is not predicted. The chunk chosen for a budget is the configured
//! one when it fits, else the largest c (a multiple of 64 when ≥ 64) with predicted peak ≤ budget.
use crate::bench::{peak_rss_mib, reset_peak_rss};
use crate::data::{Batch, Sequence, IGNORE_INDEX};
use crate::eval::distill_metrics;
use crate::model::Llama;
use crate::objective::Objective;
use crate::teacher::store::reader::release_freed_memory;
use crate::teacher::TeacherSignal;
use crate::train::optim::AdamW;
use crate::train::step::{micro_step, StepOptions};
use crate::{Error, Result};
use serde::Serialize;
use std::time::Instant;
use tch::{nn, Kind, Tensor};

const MIB: f64 = 1024.0 * 1024.0;

/// A size with units ("8GiB", "512MiB", "2GB", "1000000"): bytes. Binary units are powers of 1024,
/// decimal ones (kB, MB, GB, TB) powers of 1000; a plain number is bytes.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let x: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like \"8GiB\" or \"512MiB\""))?;
    let k = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => MIB,
        "gib" | "g" => MIB * 1024.0,
        "tib" | "t" => MIB * MIB,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(format!(
                "'{s}': unknown unit '{unit}' (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
            ))
        }
    };
    let b = x * k;
    if !(1.0..1e18).contains(&b) {
        return Err(format!("'{s}' must be between 1 byte and 1e18 bytes"));
    }
    Ok(b as u64)
}

/// `bytes` as "1.23 GiB" / "456.7 MiB".
pub fn show_bytes(bytes: f64) -> String {
    if bytes.abs() >= 1024.0 * MIB {
        format!("{:.2} GiB", bytes / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", bytes / MIB)
    }
}

fn rss_bytes() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb * 1024.0)
}

fn hwm_bytes() -> f64 {
    peak_rss_mib() * MIB
}

/// The resident memory `f` adds at its peak over a trimmed baseline (bytes), and its seconds.
fn transient<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, f64)> {
    release_freed_memory();
    let base = rss_bytes();
    reset_peak_rss();
    let t = Instant::now();
    f()?;
    let sec = t.elapsed().as_secs_f64();
    Ok(((hwm_bytes() - base).max(0.0), sec))
}

/// What the run's shape is, from the run file.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    /// positions of a micro-batch: micro_batch · seq_len
    pub tokens: usize,
    pub grad_accum: usize,
    /// the configured chunk (0 = whole tensors)
    pub loss_chunk: usize,
    /// whether the objective works in chunks at all (else c = N whatever the chunk)
    pub chunkable: bool,
    /// whether the run writes checkpoints (checkpoint_every > 0)
    pub checkpoints: bool,
}

/// Element counts of the trained tensors.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Counts {
    /// trainable parameters (the optimizer's: student and projections)
    pub trainable: u64,
    /// every variable of the student (what its model.safetensors holds)
    pub student: u64,
    /// the largest trainable tensor
    pub largest: u64,
    /// bytes of the teacher's weights (0 without a live teacher)
    pub teacher_bytes: u64,
}

impl Counts {
    pub fn of(opt: &AdamW, student: &nn::VarStore, teacher: Option<&nn::VarStore>) -> Counts {
        let numel = |t: &Tensor| t.size().iter().product::<i64>().max(0) as u64;
        let params = opt.params();
        Counts {
            trainable: params.iter().map(|t| numel(t)).sum(),
            student: student.variables().values().map(numel).sum(),
            largest: params.iter().map(|t| numel(t)).max().unwrap_or(0),
            teacher_bytes: teacher.map_or(0, |vs| {
                vs.variables()
                    .values()
                    .map(|t| numel(t) * t.kind().elt_size_in_bytes() as u64)
                    .sum()
            }),
        }
    }
}

/// What the probe measured (bytes, seconds).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Probe {
    /// the resident high-water mark of set-up (loading, conversions)
    pub setup_peak: f64,
    /// resident memory after set-up
    pub resident: f64,
    /// the probe's positions T₀ (one row)
    pub n0: usize,
    /// S(N, c) = s0 + s_tok·N + s_chunk·c
    pub s0: f64,
    pub s_tok: f64,
    pub s_chunk: f64,
    /// E(N) = e0 + e_tok·N
    pub e0: f64,
    pub e_tok: f64,
    /// seconds per position of a micro-step, and of AdamW's step over the trainable parameters
    pub t_tok: f64,
    pub t_opt: f64,
}

/// One micro-step's probe sequence: `seq`'s first `len` tokens (cycled when shorter), every
/// position a target of weight 1 but the last. Only for a live teacher (a store serves the
/// sequences it holds).
pub fn probe_sequence(seq: &Sequence, len: usize) -> Sequence {
    let ids: Vec<u32> = (0..len).map(|i| seq.ids[i % seq.ids.len()]).collect();
    let mut labels: Vec<i64> = ids[1..].iter().map(|&x| x as i64).collect();
    labels.push(IGNORE_INDEX);
    let mut weights = vec![1.0f32; len];
    weights[len - 1] = 0.0;
    Sequence {
        ids,
        labels,
        weights,
        spans: vec![],
        domain: seq.domain,
    }
}

/// The probe: set-up's measured memory, three micro-steps on `seq` (one row, then `rows` — the
/// run's micro-batch, at least 2 — unchunked and chunked by one row) and two evaluations (one row,
/// two), AdamW's pass timed on scratch. Gradients are zeroed afterwards.
pub fn probe(
    student: &Llama,
    teacher: &dyn TeacherSignal,
    objective: &Objective,
    opt: &mut AdamW,
    seq: &Sequence,
    rows: usize,
    trainable: u64,
) -> Result<Probe> {
    let setup_peak = hwm_bytes();
    release_freed_memory(); // as `distill train` does after set-up
    let resident = rss_bytes();
    let device = student.device();
    let n = seq.ids.len();
    let seqs = std::slice::from_ref(seq);
    let step = |rows: &[usize], c: usize| -> Result<(f64, f64)> {
        let b = Batch::new(seqs, rows, device)?;
        transient(|| {
            micro_step(
                student,
                Some(teacher),
                objective,
                &b,
                &StepOptions::new(Some(c), 1.0),
            )
        })
    };
    // a warm-up: the gradients are allocated, libtorch's first-call costs paid
    let m = rows.max(2);
    let all = vec![0; m];
    step(&[0], n)?;
    let (ha, _) = step(&[0], n)?;
    let (hb, _) = step(&all, n)?;
    let (hc, tc) = step(&all, m * n)?;
    opt.zero_grad();
    tracing::debug!(
        "plan probe: micro-step transients {:.1} / {:.1} / {:.1} MiB",
        ha / MIB,
        hb / MIB,
        hc / MIB
    );
    let more = ((m - 1) * n) as f64;
    let s_tok = ((hb - ha) / more).max(0.0);
    let s_chunk = ((hc - hb) / more).max(0.0);
    let s0 = ha - s_tok * n as f64 - s_chunk * n as f64;
    let eval = |rows: usize| -> Result<f64> {
        let many: Vec<Sequence> = (0..rows).map(|_| seq.clone()).collect();
        Ok(transient(|| distill_metrics(teacher, student, &many, rows))?.0)
    };
    eval(1)?;
    let ea = eval(1)?;
    let eb = eval(m)?;
    let e_tok = ((eb - ea) / more).max(0.0);
    let e0 = ea - e_tok * n as f64;
    // AdamW's passes (lerp, square + lerp, sqrt, three scalar ops, addcdiv ≈ 8 over P floats),
    // timed on a scratch tensor of at most 4M floats and scaled to P
    let k = trainable.clamp(1, 1 << 22) as i64;
    let t_opt = tch::no_grad(|| -> Result<f64> {
        let mut x = Tensor::f_ones([k], (Kind::Float, device))?;
        let mut y = Tensor::f_ones([k], (Kind::Float, device))?;
        let g = Tensor::f_ones([k], (Kind::Float, device))?;
        let t = Instant::now();
        let _ = x.f_lerp_(&g, 0.1)?;
        let _ = y.f_lerp_(&g.f_square()?, 0.001)?;
        let mut d = y.f_sqrt()?;
        let _ = d.f_div_scalar_(0.5)?;
        let _ = d.f_add_scalar_(1e-8)?;
        let _ = d.f_mul_scalar_(-1.0)?;
        let mut p = g.f_detach_copy()?;
        let _ = p.f_addcdiv_(&x, &d)?;
        let _ = p.f_sum(Kind::Float)?.f_double_value(&[])?; // waits for the device
        Ok(t.elapsed().as_secs_f64() * trainable as f64 / k as f64)
    })?;
    reset_peak_rss();
    Ok(Probe {
        setup_peak,
        resident,
        n0: n,
        s0,
        s_tok,
        s_chunk,
        e0,
        e_tok,
        t_tok: tc / (m * n) as f64,
        t_opt,
    })
}

/// One line of the prediction.
#[derive(Debug, Clone, Serialize)]
pub struct Term {
    pub name: String,
    pub bytes: f64,
    pub how: String,
}

/// The prediction for one chunk.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// the chunk c the step uses (positions per chunk; = N when the objective is not chunked)
    pub chunk: usize,
    /// the terms of the formula (bytes), in the order of the formula
    pub terms: Vec<Term>,
    /// each phase's predicted resident peak: set-up, step, optimizer, evaluation, checkpoint
    pub phases: Vec<(String, f64)>,
    pub peak: f64,
    /// the phase of the peak
    pub peak_phase: String,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub probe: Probe,
    pub counts: Counts,
    pub shape: Shape,
    /// the budget it was checked against (bytes), when given
    pub max_memory: Option<u64>,
}

/// The prediction at chunk `c`.
pub fn predict(probe: &Probe, counts: &Counts, shape: &Shape, c: usize) -> Plan {
    let n = shape.tokens;
    let c = if shape.chunkable {
        c.clamp(1, n.max(1))
    } else {
        n
    };
    let p = counts.trainable as f64;
    let r = probe.resident;
    let g = 4.0 * p;
    let s_tok = probe.s_tok * n as f64;
    let s_chunk = probe.s_chunk * c as f64;
    let s = (probe.s0 + s_tok + s_chunk).max(0.0);
    let o = 8.0 * counts.largest as f64;
    let e = (probe.e0 + probe.e_tok * n as f64).max(0.0);
    let ck = if shape.checkpoints { 16.0 * p } else { 0.0 };
    let w = 8.0 * counts.student as f64;
    let cw = ck.max(w);
    let terms = vec![
        Term {
            name: "resident after set-up".into(),
            bytes: r,
            how: "measured (VmRSS)".into(),
        },
        Term {
            name: "  of which student weights".into(),
            bytes: 4.0 * counts.student as f64,
            how: "counted: 4 B x student params".into(),
        },
        Term {
            name: "  of which AdamW m, v".into(),
            bytes: 8.0 * p,
            how: "counted: 2 x 4 B x trainable params".into(),
        },
        Term {
            name: "  of which teacher weights".into(),
            bytes: counts.teacher_bytes as f64,
            how: "counted: the teacher's tensors".into(),
        },
        Term {
            name: "gradients G".into(),
            bytes: g,
            how: "counted: 4 B x trainable params".into(),
        },
        Term {
            name: "step: fixed s0".into(),
            bytes: probe.s0,
            how: "fitted to the probe".into(),
        },
        Term {
            name: "step: activations s_tok*N".into(),
            bytes: s_tok,
            how: format!("{:.0} B/position x N = {n}", probe.s_tok),
        },
        Term {
            name: "step: logits chunk s_chunk*c".into(),
            bytes: s_chunk,
            how: format!("{:.0} B/position x c = {c}", probe.s_chunk),
        },
        Term {
            name: "optimizer temporaries O".into(),
            bytes: o,
            how: "counted: 2 x 4 B x largest param".into(),
        },
        Term {
            name: "evaluation E".into(),
            bytes: e,
            how: format!(
                "e0 {} + {:.0} B/position x {n}",
                show_bytes(probe.e0),
                probe.e_tok
            ),
        },
        Term {
            name: "checkpoint / write-out C".into(),
            bytes: cw,
            how: "counted: 2 x 8 B x trainable (optimizer file), or 2 x 4 B x student params"
                .into(),
        },
    ];
    let base = r + g;
    let phases = vec![
        ("set-up".to_string(), probe.setup_peak),
        ("step".to_string(), base + s),
        ("optimizer".to_string(), base + o),
        ("evaluation".to_string(), base + e),
        ("checkpoint".to_string(), base + cw),
    ];
    let (peak_phase, peak) = phases
        .iter()
        .fold(("set-up".to_string(), 0.0f64), |acc, (k, v)| {
            if *v > acc.1 {
                (k.clone(), *v)
            } else {
                acc
            }
        });
    let step_seconds = shape.grad_accum as f64 * probe.t_tok * n as f64 + probe.t_opt;
    Plan {
        chunk: c,
        terms,
        phases,
        peak,
        peak_phase,
        step_seconds,
        tokens_per_second: (shape.grad_accum * n) as f64 / step_seconds.max(1e-12),
        probe: *probe,
        counts: *counts,
        shape: *shape,
        max_memory: None,
    }
}

/// The chunk the run would use without a budget: the configured one (0 = the whole micro-batch).
pub fn configured_chunk(shape: &Shape) -> usize {
    if shape.loss_chunk == 0 {
        shape.tokens
    } else {
        shape.loss_chunk.min(shape.tokens)
    }
}

/// The chunk for `budget` bytes: the configured one when its prediction fits, else the largest
/// that fits (a multiple of 64 when ≥ 64); a run that fits with no chunk is refused, naming the
/// phase and the terms' sizes.
pub fn fit(probe: &Probe, counts: &Counts, shape: &Shape, budget: u64) -> Result<Plan> {
    let want = configured_chunk(shape);
    let mut plan = predict(probe, counts, shape, want);
    plan.max_memory = Some(budget);
    let b = budget as f64;
    if plan.peak <= b {
        return Ok(plan);
    }
    let mut c = want;
    if shape.chunkable && probe.s_chunk > 0.0 {
        // the step phase at c: base + s0 + s_tok·N + s_chunk·c ≤ budget
        let at1 = predict(probe, counts, shape, 1);
        let step1 = at1.phases[1].1;
        let room = b - (step1 - probe.s_chunk);
        let most = (room / probe.s_chunk).floor();
        if most >= 1.0 {
            c = (most as usize).min(want);
            if c >= 64 {
                c -= c % 64;
            }
        }
    }
    let mut chosen = predict(probe, counts, shape, c);
    chosen.max_memory = Some(budget);
    if chosen.peak <= b {
        return Ok(chosen);
    }
    let smallest = predict(probe, counts, shape, 1);
    Err(Error::Invalid(format!(
        "run.max_memory = {}: the run is predicted to need {} at its peak ({}; {} even with a chunk of 1 position); raise run.max_memory or lower optim.micro_batch or data.seq_len (`distill plan` shows the terms); nothing was written",
        show_bytes(b),
        show_bytes(plan.peak),
        plan.peak_phase,
        show_bytes(smallest.peak),
    )))
}

impl Plan {
    /// The table `distill plan` prints.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s += &format!("{:<32} {:>12}  how\n", "term", "size");
        for t in &self.terms {
            s += &format!("{:<32} {:>12}  {}\n", t.name, show_bytes(t.bytes), t.how);
        }
        s += &format!("\n{:<32} {:>12}\n", "phase", "peak");
        for (k, v) in &self.phases {
            s += &format!("{k:<32} {:>12}\n", show_bytes(*v));
        }
        s += &format!(
            "\npredicted peak memory  {} ({})\n",
            show_bytes(self.peak),
            self.peak_phase
        );
        s += &format!(
            "predicted step time    {:.3} s ({:.0} tokens/s; {} x {} positions + optimizer {:.3} s)\n",
            self.step_seconds,
            self.tokens_per_second,
            self.shape.grad_accum,
            self.shape.tokens,
            self.probe.t_opt
        );
        s += &format!(
            "chunk                  {} positions{}\n",
            self.chunk,
            if self.shape.chunkable {
                ""
            } else {
                " (the objective is not chunked)"
            }
        );
        if let Some(m) = self.max_memory {
            s += &format!(
                "max_memory             {} ({})\n",
                show_bytes(m as f64),
                if self.peak <= m as f64 {
                    "fits"
                } else {
                    "does not fit"
                }
            );
        }
        s
    }

    /// What run.json records.
    pub fn record(&self) -> serde_json::Value {
        serde_json::json!({
            "chunk": self.chunk,
            "predicted_peak_bytes": self.peak,
            "predicted_peak_phase": self.peak_phase,
            "predicted_step_seconds": self.step_seconds,
            "max_memory": self.max_memory,
        })
    }
}
