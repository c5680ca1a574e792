//! The distillation recipe, top to bottom: set-up (everything checked before the output folder is
//! touched) → evaluation before → steps (teacher forward without a graph, student forward and
//! backward, the objective, clipping, AdamW) with logs, evaluations and checkpoints → the student
//! folder, the plot and the report.
use super::checkpoint;
use super::optim::{lr_at, AdamW};
use super::state::TrainState;
use crate::config::{Length, RunConfig, StudentInit};
use crate::data::{self, sampler::batch_tensors, Sampler};
use crate::eval::{distill_metrics, DistillMetrics};
use crate::model::{self, hf, LoadedModel};
use crate::objective::Objective;
use crate::report::{self, MetricsLog};
use crate::{io::write_atomic, student, Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind};

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// continue from the newest checkpoint in the output folder
    pub resume: bool,
    /// replace a previous run in the output folder
    pub overwrite: bool,
    /// draw a progress bar on stderr
    pub progress: bool,
    /// the run file's path, recorded in the report
    pub run_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub output: PathBuf,
    pub steps: usize,
    pub skipped_steps: usize,
    pub before: Option<DistillMetrics>,
    pub after: DistillMetrics,
    pub seconds: f64,
}

/// Files a run writes into its output folder; their presence means the folder holds a run.
const RUN_FILES: &[&str] = &[
    "run.json",
    "checkpoints",
    "metrics.jsonl",
    "student",
    "report.md",
    "loss.png",
];

fn holds_run(output: &Path) -> bool {
    ["run.json", "checkpoints", "metrics.jsonl"]
        .iter()
        .any(|f| output.join(f).exists())
}

fn fault_nan_steps() -> Vec<usize> {
    // test hook: poison the loss at these steps (comma-separated) to exercise the NaN path
    std::env::var("DISTILL_FAULT_NAN_STEPS")
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn fault_step_delay() -> Option<std::time::Duration> {
    // test hook: slow every step down so that a test can kill the run at a chosen step
    std::env::var("DISTILL_FAULT_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
}

fn total_steps(cfg: &RunConfig, n_train: usize) -> usize {
    match cfg.length {
        Length::Steps(n) => n,
        Length::Epochs(e) => {
            let per_step = cfg.optim.micro_batch * cfg.optim.grad_accum;
            ((e * n_train as f64) / per_step as f64).ceil().max(1.0) as usize
        }
    }
}

pub fn train(cfg: &RunConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    if let Some(t) = cfg.threads {
        tch::set_num_threads(t as i32);
    }
    let out = &cfg.output;
    if holds_run(out) && !opts.resume && !opts.overwrite {
        return Err(Error::Invalid(format!(
            "{}: holds another run; pass --resume to continue it or --overwrite to replace it",
            out.display()
        )));
    }
    // ---- set-up: nothing is written before all of it succeeds
    let device = Device::Cpu;
    let mut teacher =
        model::load(&cfg.teacher, device).map_err(|e| Error::Invalid(format!("teacher: {e}")))?;
    teacher.vs.freeze();
    let student = match &cfg.student {
        StudentInit::Path(p) => {
            model::load(p, device).map_err(|e| Error::Invalid(format!("student: {e}")))?
        }
        StudentInit::FromTeacher { layers } => {
            student::from_teacher_layers(&teacher, layers, device)?
        }
    };
    if let Some(note) = student::check_vocabularies(&teacher, &student)? {
        tracing::warn!("{note}");
    }
    let context = teacher
        .model
        .config
        .max_position_embeddings
        .min(student.model.config.max_position_embeddings);
    if cfg.data.seq_len > context {
        return Err(Error::Invalid(format!(
            "data.seq_len = {} exceeds the models' context of {context} positions",
            cfg.data.seq_len
        )));
    }
    let tok = teacher
        .tokenizer
        .as_ref()
        .expect("checked by check_vocabularies");
    let eos = teacher
        .model
        .config
        .eos_token_ids
        .first()
        .copied()
        .or_else(|| tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e)));
    let ds = data::load(&cfg.data, tok, eos)?;
    if ds.validation.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: too little data to hold out a validation sequence; give data.validation",
            cfg.data.train.display()
        )));
    }
    // every token id must have a row in both models (checked before anything is written)
    let rows = teacher
        .model
        .config
        .vocab_size
        .min(student.model.config.vocab_size);
    let max_id = ds
        .train
        .iter()
        .chain(&ds.validation)
        .flat_map(|s| s.ids.iter())
        .max()
        .copied()
        .unwrap_or(0);
    if max_id as usize >= rows {
        return Err(Error::Invalid(format!(
            "{}: token id {max_id} is outside the models' vocabulary of {rows} rows (does the tokenizer belong to these models?)",
            cfg.data.train.display()
        )));
    }
    let total = total_steps(cfg, ds.train.len());
    let mut objective = Objective::new(&cfg.losses, total)?;
    let mut opt = AdamW::new(&student.vs, &cfg.optim)?;
    let mut sampler = Sampler::new(ds.train.len(), cfg.seed);
    let mut state = TrainState {
        step: 0,
        total_steps: total,
        adam_t: 0,
        sampler: sampler.state,
        objective: objective.state(),
        skipped_steps: 0,
        tokens_seen: 0,
        seed: cfg.seed,
    };
    let resume_from = if opts.resume {
        checkpoint::latest(out)?
    } else {
        None
    };
    if let Some(ck) = &resume_from {
        let st = checkpoint::read_state(ck)?;
        if st.total_steps != total || st.seed != cfg.seed {
            return Err(Error::Invalid(format!(
                "{}: was made by a run of {} steps with seed {}; this run file gives {total} steps with seed {} (--overwrite starts over)",
                ck.display(),
                st.total_steps,
                st.seed,
                cfg.seed
            )));
        }
        let weights = hf::read_safetensors(&ck.join("model.safetensors"))?;
        hf::load_into(&student.vs, &weights, ck)?;
        opt.load_state(
            &hf::read_safetensors(&ck.join("optimizer.safetensors"))?,
            st.adam_t,
            ck,
        )?;
        sampler.restore(st.sampler);
        objective.restore(&st.objective)?;
        state = st;
        tracing::info!("resuming from {} (step {})", ck.display(), state.step);
    } else if opts.overwrite || opts.resume {
        for f in RUN_FILES {
            let p = out.join(f);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            } else if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let run_json = json!({
        "run_file": opts.run_file.as_ref().map(|p| p.display().to_string()),
        "teacher": cfg.teacher.display().to_string(),
        "total_steps": total,
        "seed": cfg.seed,
        "train_sequences": ds.train.len(),
        "validation_sequences": ds.validation.len(),
    });
    write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&run_json)
            .expect("json")
            .as_bytes(),
    )?;
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = MetricsLog::open(&metrics_path, resume_from.as_ref().map(|_| state.step))?;
    let eval_batch = cfg.optim.micro_batch;
    let eval = |student: &LoadedModel| {
        distill_metrics(&teacher.model, &student.model, &ds.validation, eval_batch)
    };
    let eval_record = |step: usize, m: &DistillMetrics| {
        json!({"kind": "eval", "step": step, "student_ppl": m.student_ppl, "teacher_ppl": m.teacher_ppl,
               "kl": m.kl, "top1": m.top1, "tokens": m.tokens})
    };
    if resume_from.is_none() {
        let m = eval(&student)?;
        tracing::info!(
            "before: student ppl {:.2}, teacher ppl {:.2}, KL {:.4}",
            m.student_ppl,
            m.teacher_ppl,
            m.kl
        );
        metrics.write(&eval_record(0, &m))?;
    }

    // ---- the steps
    let names = objective.names().to_vec();
    let nan_steps = fault_nan_steps();
    let step_delay = fault_step_delay();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]",
            )
            .expect("valid template"),
        );
        b.set_position(state.step as u64);
        Some(b)
    } else {
        None
    };
    let mut last_eval: Option<(usize, DistillMetrics)> = None;
    while state.step < total {
        let step = state.step + 1;
        let t0 = Instant::now();
        opt.zero_grad();
        let (mut loss, mut parts, mut finite, mut tokens) =
            (0.0, vec![0.0; names.len()], true, 0usize);
        for _ in 0..cfg.optim.grad_accum {
            let idx = sampler.next_batch(cfg.optim.micro_batch);
            let group: Vec<data::Sequence> = idx.iter().map(|&i| ds.train[i].clone()).collect();
            let (ids, labels) = batch_tensors(&group)?; // (B, T)
            let chunk = (cfg.optim.loss_chunk > 0).then_some(cfg.optim.loss_chunk);
            let m = objective.micro_step(
                &student.model,
                Some(&teacher.model),
                &ids,
                &labels,
                chunk,
                1.0 / cfg.optim.grad_accum as f64,
                nan_steps.contains(&step),
            )?;
            tokens += labels.f_ne(-100)?.f_sum(Kind::Int64)?.f_int64_value(&[])? as usize;
            if !m.finite {
                finite = false;
                continue; // keep drawing the step's micro-batches: the data position stays on schedule
            }
            loss += m.loss;
            for (p, v) in parts.iter_mut().zip(&m.parts) {
                *p += v;
            }
        }
        let grad_norm = match (finite, cfg.optim.grad_clip) {
            (false, _) => f64::NAN,
            (true, Some(c)) => opt.clip(c)?,
            (true, None) => opt.grad_norm()?,
        };
        let lr = lr_at(&cfg.optim, step, total);
        let skipped = !(finite && grad_norm.is_finite());
        if skipped {
            opt.zero_grad();
            state.skipped_steps += 1;
            tracing::warn!(
                "step {step}: non-finite loss or gradient; step skipped (weights unchanged)"
            );
        } else {
            opt.step(lr)?;
            objective.after_step(&parts, step);
        }
        state.step = step;
        state.adam_t = opt.t;
        state.sampler = sampler.state;
        state.objective = objective.state();
        state.tokens_seen += tokens as u64;
        let secs = t0.elapsed().as_secs_f64();
        if step.is_multiple_of(cfg.log_every) || step == total {
            let mut rec = json!({"kind": "train", "step": step, "loss": if skipped { Value::Null } else { json!(loss) },
                "lr": lr, "grad_norm": if grad_norm.is_finite() { json!(grad_norm) } else { Value::Null },
                "tokens_per_s": tokens as f64 / secs, "skipped": skipped, "skipped_total": state.skipped_steps});
            for (n, p) in names.iter().zip(&parts) {
                rec[n] = if skipped { Value::Null } else { json!(p) };
            }
            let lambdas = objective.lambdas();
            if !lambdas.is_empty() {
                rec["taid_lambda"] = json!(lambdas);
            }
            metrics.write(&rec)?;
        }
        if let Some(b) = &bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4} {:.0} tok/s", tokens as f64 / secs));
        }
        if step == total || (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) {
            let m = eval(&student)?;
            tracing::info!(
                "step {step}: student ppl {:.2}, KL {:.4}, top-1 {:.3}",
                m.student_ppl,
                m.kl,
                m.top1
            );
            metrics.write(&eval_record(step, &m))?;
            last_eval = Some((step, m));
        }
        if step == total || (cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every))
        {
            checkpoint::save(out, &student, &opt, &state, cfg.keep_last)?;
        }
        if let Some(d) = step_delay {
            std::thread::sleep(d);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    // ---- what the user keeps
    let after = match last_eval {
        Some((_, m)) => m,
        None => eval(&student)?,
    };
    let final_dir = out.join("student");
    let partial = out.join(".partial-student");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    student.save_hf(&partial)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&partial, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    let records = report::read_metrics(&metrics_path)?;
    report::plot_loss(&records, &out.join("loss.png"))?;
    let before = records
        .iter()
        .find(|r| r["kind"] == "eval" && r["step"] == 0)
        .and_then(|r| serde_json::from_value::<DistillMetrics>(r.clone()).ok());
    let speeds = forward_speeds(&teacher, &student, &ds.validation, eval_batch)?;
    let summary = TrainSummary {
        output: out.clone(),
        steps: total,
        skipped_steps: state.skipped_steps,
        before,
        after,
        seconds: started.elapsed().as_secs_f64(),
    };
    let md = report::markdown(
        cfg,
        opts.run_file.as_deref(),
        &teacher,
        &student,
        &ds,
        &summary,
        speeds,
    );
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(summary)
}

/// Tokens per second of one forward pass over a validation batch: (teacher, student).
fn forward_speeds(
    teacher: &LoadedModel,
    student: &LoadedModel,
    seqs: &[data::Sequence],
    batch: usize,
) -> Result<(f64, f64)> {
    let group = &seqs[..seqs.len().min(batch.max(1))];
    let (ids, _) = batch_tensors(group)?;
    let n = ids.numel() as f64;
    let time = |m: &LoadedModel| -> Result<f64> {
        let _ = tch::no_grad(|| m.model.forward(&ids))?; // warm-up
        let t = Instant::now();
        let _ = tch::no_grad(|| m.model.forward(&ids))?;
        Ok(n / t.elapsed().as_secs_f64())
    };
    Ok((time(teacher)?, time(student)?))
}
