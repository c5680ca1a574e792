//! Measurements for `distill bench`: one full distillation step timed by phase, the machine's f32
//! matmul peak, and each divergence's forward + backward over a vocabulary-sized input. Peak memory
//! is the process's resident high-water mark (VmHWM), reset (clear_refs) after loading so that it
//! covers the measured work (the loaded weights stay resident and are included).
use crate::data::{Batch, IGNORE_INDEX};
use crate::losses::LossSpec;
use crate::model::LoadedModel;
use crate::objective::{LossTerm, Objective};
use crate::teacher::{TeacherDist, TeacherSignal};
use crate::train::optim::{AdamW, OptimConfig, Schedule};
use crate::train::step::{micro_step, StepOptions};
use crate::{Error, Result};
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Reset the resident-memory high-water mark (Linux); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The resident-memory high-water mark in MiB (Linux), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Best f32 GFLOP/s of an n×n by n×n matmul over a few repetitions on the CPU, at the current
/// thread count.
pub fn matmul_peak_gflops(n: i64) -> f64 {
    matmul_peak_gflops_on(n, Device::Cpu)
}

/// Wait for the device's queued work (CUDA runs asynchronously: a time read before it is the
/// launch's, not the work's).
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The same peak on `device` (on CUDA, synchronised around each product).
pub fn matmul_peak_gflops_on(n: i64, device: Device) -> f64 {
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let _ = a.matmul(&b); // warm-up
    sync(device);
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let c = a.matmul(&b);
            sync(device);
            let s = t.elapsed().as_secs_f64();
            drop(c);
            2.0 * (n as f64).powi(3) / s / 1e9
        })
        .fold(0.0, f64::max)
}

/// Model FLOPs per token of one distillation step: 2·N_teacher + 6·N_student (N counts the head
/// once) plus attention scores: 4·L·T·d_attn for the teacher's forward and 12·L·T·d_attn for the
/// student's forward and backward (no causal discount). Without a teacher (a store), the student's.
pub fn flops_per_token(teacher: Option<&LoadedModel>, student: &LoadedModel, seq: usize) -> f64 {
    let attn = |m: &LoadedModel| {
        let c = &m.model.config;
        c.num_hidden_layers as f64 * seq as f64 * (c.num_attention_heads * c.head_dim) as f64
    };
    teacher.map_or(0.0, |t| {
        2.0 * t.model.config.num_params() as f64 + 4.0 * attn(t)
    }) + 6.0 * student.model.config.num_params() as f64
        + 12.0 * attn(student)
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub implementation: String,
    pub batch: usize,
    pub seq: usize,
    pub threads: i32,
    pub steps: usize,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    pub peak_rss_mib: f64,
    /// median ms of each phase: teacher_forward, student_forward, loss, backward, optimizer
    pub phases: Vec<(String, f64)>,
    pub flops_per_token: f64,
    pub matmul_peak_gflops: f64,
    pub mfu: f64,
}

/// Deterministic token ids (b·7919 + t·104729 mod V): the same batch in every implementation.
pub fn bench_ids(batch: usize, seq: usize, vocab: usize) -> Tensor {
    let ids: Vec<i64> = (0..batch)
        .flat_map(|b| (0..seq).map(move |t| ((b * 7919 + t * 104729) % vocab) as i64))
        .collect();
    Tensor::from_slice(&ids).view([batch as i64, seq as i64])
}

/// The bench's batch: `bench_ids` with next-token labels (the last position predicts nothing).
pub fn bench_batch(batch: usize, seq: usize, vocab: usize) -> Result<Batch> {
    let ids = bench_ids(batch, seq, vocab); // (B, T)
    let labels = ids.roll([-1], [1]);
    let _ = labels.narrow(1, seq as i64 - 1, 1).fill_(IGNORE_INDEX);
    Batch::from_ids_labels(&ids, &labels)
}

/// Time `steps` full distillation steps (after `warmup`) of `student` against a teacher signal
/// (`teacher`'s live forward, or a store that holds the bench batch, then `teacher` is None) with
/// `loss`, AdamW (lr 1e-5). `chunk` = positions per chunk of the objective (None = whole tensors).
#[allow(clippy::too_many_arguments)]
pub fn step(
    teacher: Option<&LoadedModel>,
    signal: &dyn TeacherSignal,
    student: &LoadedModel,
    loss: LossTerm,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    chunk: Option<usize>,
) -> Result<StepReport> {
    if loss.spec.reads != crate::losses::Reads::Logits {
        return Err(Error::Invalid(format!(
            "bench step: '{}' compares hidden states; the bench times losses over the logits",
            loss.spec.name
        )));
    }
    let vocab = signal.vocab_size().min(student.model.config.vocab_size);
    let b = bench_batch(batch, seq, vocab)?;
    let ids = b.ids.shallow_clone();
    let objective = Objective::new(&[loss], steps + warmup)?;
    let cfg = OptimConfig {
        lr: 1e-5,
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
        warmup_steps: 0,
        schedule: Schedule::Constant,
        min_lr_ratio: 1.0,
        grad_clip: None,
        grad_accum: 1,
        micro_batch: batch,
        loss_chunk: chunk.unwrap_or(0),
    };
    let mut opt = AdamW::new(&student.vs, &cfg)?;
    let names = [
        "teacher_forward",
        "student_forward",
        "loss",
        "backward",
        "optimizer",
    ];
    let mut phases: Vec<Vec<f64>> = vec![vec![]; names.len()];
    let mut totals = vec![];
    let device = student.model.device();
    // a time mark after the device's work is done
    let mark = |t0: &Instant| {
        sync(device);
        t0.elapsed().as_secs_f64()
    };
    reset_peak_rss();
    for i in 0..steps + warmup {
        opt.zero_grad();
        let t0 = Instant::now();
        let mut marks = vec![];
        if let Some(c) = chunk {
            // teacher trunk, student trunk, then head + loss + backward chunk by chunk: the phases
            // are not separable, so the whole objective and backward count as "backward"
            let m = micro_step(
                &student.model,
                Some(signal),
                &objective,
                &b,
                &StepOptions::new(Some(c), 1.0),
            )?;
            if !m.finite {
                return Err(Error::Invalid("bench: non-finite loss".into()));
            }
            marks.extend([0.0, 0.0, 0.0, mark(&t0)]);
        } else {
            let t_dist = tch::no_grad(|| -> Result<TeacherDist> {
                let sig = signal.prepare(&b, &[])?;
                sig.positions(0, sig.len())
            })?;
            marks.push(mark(&t0));
            let s_logits = student.model.forward(&ids)?.f_flatten(0, 1)?;
            marks.push(mark(&t0));
            let (l, w) = b.flat_targets()?;
            let v = objective.compute(&s_logits, Some(&t_dist), &l, &w)?;
            let _ = v.total.f_double_value(&[])?;
            marks.push(mark(&t0));
            v.total.f_backward()?;
            marks.push(mark(&t0));
        }
        opt.step(1e-5)?;
        marks.push(mark(&t0));
        if i >= warmup {
            let mut prev = 0.0;
            for (k, &m) in marks.iter().enumerate() {
                if m > 0.0 {
                    phases[k].push((m - prev) * 1e3);
                    prev = m;
                } else {
                    phases[k].push(0.0);
                }
            }
            totals.push(marks[marks.len() - 1]);
        }
    }
    let peak = peak_rss_mib();
    let sec = median(totals);
    let tokens = (batch * seq) as f64;
    let fpt = flops_per_token(teacher, student, seq);
    let from_store = teacher.is_none();
    // the peak of the device the step ran on (a larger product on a GPU, which 1024 leaves idle)
    let peak_gflops = match device {
        Device::Cuda(_) => matmul_peak_gflops_on(8192, device),
        d => matmul_peak_gflops_on(1024, d),
    };
    Ok(StepReport {
        implementation: format!(
            "distill{}{}",
            if from_store { ", from a store" } else { "" },
            chunk.map_or(String::new(), |c| format!(" (chunk {c})"))
        ),
        batch,
        seq,
        threads: tch::get_num_threads(),
        steps,
        ms_per_step: sec * 1e3,
        tokens_per_s: tokens / sec,
        peak_rss_mib: peak,
        phases: names
            .iter()
            .zip(phases)
            .map(|(n, v)| (n.to_string(), median(v)))
            .collect(),
        flops_per_token: fpt,
        matmul_peak_gflops: peak_gflops,
        mfu: fpt * tokens / sec / (peak_gflops * 1e9),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    pub loss: String,
    pub ms: f64,
    pub peak_rss_mib: f64,
}

/// The parameters each kind is benched with where they differ from its defaults (the same as
/// bench/reference_losses.py uses), and TAID's λ.
const BENCH_PARAMS: &[(&LossSpec, &[(&str, f64)])] =
    &[(&crate::losses::hinton::HINTON, &[("temperature", 2.0)])];

/// Forward + backward of each loss of the registry over random logits of `shape` (…, V): median ms
/// and the memory high-water mark above what was resident before. Sinkhorn is left out: it compares
/// every pair of rows (O(N²·V)), not positions; so are kinds that compare hidden states, not logits.
pub fn losses(shape: &[i64], reps: usize) -> Result<Vec<LossReport>> {
    use crate::losses::registry::{self, BuildContext, LossInput};
    tch::manual_seed(0);
    let t = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 2.0;
    let s0 = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 2.0;
    let lead = &shape[..shape.len() - 1];
    let labels = Tensor::randint(shape[shape.len() - 1], lead, (Kind::Int64, Device::Cpu));
    let weights = Tensor::ones(lead, (Kind::Float, Device::Cpu));
    let mut out = vec![];
    for spec in registry::REGISTRY
        .iter()
        .filter(|s| **s != &crate::losses::sinkhorn::SINKHORN)
        .filter(|s| s.reads == crate::losses::Reads::Logits)
    {
        let given = BENCH_PARAMS
            .iter()
            .find(|(s, _)| *s == *spec)
            .map_or(&[][..], |(_, p)| *p);
        let mut loss = registry::build(spec.name, given, &BuildContext { total_steps: 1 })?;
        if *spec == &crate::losses::taid::TAID {
            loss.restore(&serde_json::json!({"lambda": 0.5, "momentum": 0.0, "prev_loss": null}))?;
        }
        let mut times = vec![];
        let base = {
            reset_peak_rss();
            peak_rss_mib()
        };
        for _ in 0..reps {
            let s = s0.detach().set_requires_grad(true);
            let t0 = Instant::now();
            let l = loss.compute(&LossInput {
                student: &s,
                teacher: Some(&t),
                reduced: None,
                labels: &labels,
                weights: &weights,
            })?;
            l.f_backward()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        out.push(LossReport {
            loss: spec.name.into(),
            ms: median(times),
            peak_rss_mib: peak_rss_mib() - base,
        });
    }
    Ok(out)
}

/// Capture the bench batch (`bench_batch`) with `teacher` into the store `dir` (created when
/// absent; nothing is done when it holds the batch already), with the default selection.
pub fn capture_batch(
    teacher: &LoadedModel,
    dir: &std::path::Path,
    batch: usize,
    seq: usize,
    vocab: usize,
) -> Result<()> {
    use crate::teacher::store::{config, header, select, shard::SeqRecord, Mode, StoreWriter};
    let b = bench_batch(batch, seq, vocab)?;
    let tok = teacher
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::format(&teacher.source, "the teacher has no tokenizer"))?;
    let identity = header::Identity {
        teacher: header::teacher_hash(&teacher.source, "f32")?,
        tokenizer: header::tokenizer_hash(tok),
        chat_template: header::template_hash(tok),
        seq_len: seq,
        packing: false,
    };
    let selection = select::Selection {
        coverage: config::COVERAGE,
        max_k: config::MAX_K,
        temperature: 1.0,
        quantisation: select::Quant::U8,
        tail_samples: config::TAIL_SAMPLES,
    };
    let mut w = StoreWriter::open(
        dir,
        identity,
        (teacher.source.display().to_string(), "f32".into()),
        teacher.model.config.vocab_size,
        selection,
        header::Capture {
            fingerprint: crate::teacher::store::capture::data_fingerprint(&b.keys),
            sequences: b.keys.len(),
            appended: false,
        },
        Mode::Append,
        config::SHARD_SEQUENCES,
    )?;
    if b.keys.iter().all(|k| w.holds(*k)) {
        return Ok(());
    }
    let labels: Vec<Vec<i64>> = Vec::<i64>::try_from(b.labels.f_flatten(0, 1)?)?
        .chunks(seq)
        .map(|c| c.to_vec())
        .collect();
    let logits = tch::no_grad(|| teacher.model.forward(&b.ids))?.f_flatten(0, 1)?;
    let kept = select::select_rows(&logits, &labels, &b.keys, &selection, false)?;
    let ids = Vec::<i64>::try_from(b.ids.f_flatten(0, 1)?)?;
    for (r, kept) in kept.into_iter().enumerate() {
        w.add(SeqRecord {
            key: b.keys[r],
            tokens: ids[r * seq..(r + 1) * seq]
                .iter()
                .map(|&x| x as u32)
                .collect(),
            at: (0..seq as u32 - 1).collect(),
            kept,
        })?;
    }
    w.finish()?;
    Ok(())
}
