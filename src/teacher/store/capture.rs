//! `distill capture RUN.toml`: run the teacher over the run's data (its tokenizer, chat template,
//! packing and seq_len) once and write the store.
//!
//! What is captured: the validation sequences first (every evaluation needs them), then the
//! training sequences in data order — or, with `steps`, exactly the training sequences the run's
//! first `steps` optimizer steps visit, in the order it visits them (its sampler, its seed). A
//! sequence the store already holds is skipped, so a killed capture run again continues where its
//! last shard ended; `append` adds other data to an existing store. With a teacher-query budget
//! (`--budget`, teacher/budget.rs) only the chosen training sequences are captured (after the
//! validation ones), and the set goes into the store's `budget.json`, which a run with the same
//! budget and rule then uses as its set. Over several processes (torchrun's variables), each rank
//! runs its share of the same batches into shards of the same store (parallel.rs).
use super::config::CaptureConfig;
use super::header::{teacher_hash, template_hash, tokenizer_hash, Capture, Header, Identity};
use super::parallel;
use super::select::select_rows;
use super::shard::SeqRecord;
use super::writer::{merge_parts, Mode, StoreWriter};
use crate::config::RunConfig;
use crate::data::{self, Batch, Sampler, Sequence, IGNORE_INDEX};
use crate::dist::World;
use crate::fingerprint::Fnv64;
use crate::model::{self, LoadedModel};
use crate::teacher::vocab::{self, VocabReport};
use crate::teacher::{Live, TeacherSignal};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    /// where to write (default: the run file's `teacher.store`)
    pub out: Option<PathBuf>,
    /// add this data to a store that holds other data
    pub append: bool,
    /// capture only the training sequences the run's first `steps` steps visit
    pub steps: Option<usize>,
    /// draw a progress bar on stderr
    pub progress: bool,
    /// also time a bare teacher forward of each batch, just before its capture (the overhead)
    pub compare_forward: bool,
    /// capture only a budget's chosen training sequences (None: the run file's `[teacher] budget`)
    pub budget: Option<crate::teacher::budget::Budget>,
}

#[derive(Debug, Clone)]
pub struct CaptureSummary {
    pub dir: PathBuf,
    /// sequences this call captured, and those the store already held
    pub captured: usize,
    pub already: usize,
    /// target positions this call captured
    pub positions: usize,
    /// tokens the teacher ran over (rows × seq_len)
    pub tokens: usize,
    pub seconds: f64,
    /// seconds of the capture loop alone (teacher forward, selection, shards), and of the bare
    /// teacher forward over the same batches when asked for
    pub loop_seconds: f64,
    pub forward_seconds: Option<f64>,
    pub header: Header,
}

/// The identity a run's set-up gives a store: the teacher's files and dtype, the tokenizer and
/// template (of the model whose tokenizer reads the data), seq_len and packing.
pub fn identity_of(
    teacher_path: &Path,
    dtype: &str,
    tokenizer: &crate::model::Tokenizer,
    cfg: &RunConfig,
) -> Result<Identity> {
    Ok(Identity {
        teacher: teacher_hash(teacher_path, dtype)?,
        tokenizer: tokenizer_hash(tokenizer),
        chat_template: template_hash(tokenizer),
        seq_len: cfg.data.seq_len,
        packing: cfg.data.packing,
    })
}

/// The fingerprint of a list of sequences: their keys, in order.
pub fn data_fingerprint(keys: &[u64]) -> String {
    let mut h = Fnv64::default();
    for k in keys {
        h.bytes(&k.to_le_bytes());
    }
    h.hex()
}

/// The sequences a capture covers, in capture order: validation, then training (all, in data
/// order; or those the first `steps` steps visit; every one with several sources).
pub fn plan<'d>(ds: &'d data::Dataset, cfg: &RunConfig, steps: Option<usize>) -> Vec<&'d Sequence> {
    let mut out: Vec<&Sequence> = ds.validation.iter().collect();
    match steps {
        // several sources are drawn by weights that DDK changes as the run goes: every sequence
        None => out.extend(ds.train.iter()),
        Some(_) if !ds.sources.is_empty() => out.extend(ds.train.iter()),
        Some(n) => {
            let mut sampler = Sampler::new(ds.train.len(), cfg.run.seed);
            for _ in 0..n * cfg.optim.grad_accum {
                for r in sampler.next_batch(cfg.optim.micro_batch) {
                    out.push(&ds.train[r]);
                }
            }
        }
    }
    out
}

pub fn load_teacher(cfg: &RunConfig, why: &str) -> Result<LoadedModel> {
    let path = cfg.teacher.model_path(why)?;
    let mut teacher =
        model::load(path, cfg.run.device).map_err(|e| Error::Invalid(format!("teacher: {e}")))?;
    let kind = cfg.teacher.dtype.kind();
    if kind != tch::Kind::Float {
        teacher.vs.set_kind(kind);
    }
    teacher.model.set_compute_kind(kind);
    teacher.vs.freeze();
    Ok(teacher)
}

/// The run's student as it starts, for a budget's selection rule: a folder, or the teacher's
/// layers copied in f32 (layers chosen by similarity and runs in stages are refused).
fn load_student(cfg: &RunConfig) -> Result<LoadedModel> {
    use crate::student::StudentInit;
    let device = cfg.run.device;
    let teacher_f32 = || -> Result<LoadedModel> {
        model::load(
            cfg.teacher
                .model_path("a student made of the teacher's layers")?,
            device,
        )
        .map_err(|e| Error::Invalid(format!("teacher: {e}")))
    };
    let mut student = match &cfg.student.init {
        StudentInit::Path(p) => {
            model::load(p, device).map_err(|e| Error::Invalid(format!("student: {e}")))?
        }
        StudentInit::FromTeacher { layers } => {
            crate::student::from_teacher_layers(&teacher_f32()?, layers, device)?
        }
        StudentInit::Teacher => {
            let t = teacher_f32()?;
            let all: Vec<usize> = (0..t.model.config.num_hidden_layers).collect();
            crate::student::from_teacher_layers(&t, &all, device)?
        }
        StudentInit::Similarity { .. } => {
            return Err(Error::Invalid(
                "capture --budget: a student whose layers are chosen by similarity is not supported here; use selection = \"random\" or capture without a budget".into(),
            ))
        }
    };
    student.model.set_compute_kind(cfg.student.dtype.kind());
    Ok(student)
}

/// The vocabulary check a run does at set-up (`teacher::vocab`), against the run's student, with
/// its refusals: tokens on one side only, and (a store is read in the teacher's ids) tokens at other
/// ids. A student built from the teacher's layers has the teacher's tokenizer and rows; a student
/// folder is loaded on the CPU for the comparison and dropped.
pub fn check_vocabulary(cfg: &RunConfig, teacher: &LoadedModel) -> Result<VocabReport> {
    use crate::student::StudentInit;
    let student = match &cfg.student.init {
        StudentInit::Path(p) => Some(
            model::load(p, tch::Device::Cpu)
                .map_err(|e| Error::Invalid(format!("student: {e}")))?,
        ),
        _ => None,
    };
    let (report, map) = vocab::check(teacher, student.as_ref().unwrap_or(teacher))?;
    if map.translates_ids() {
        return Err(Error::Invalid(
            "capture: the student's tokenizer has tokens at other ids than the teacher's; a store is read in the teacher's ids, which is supported only when they agree (padding rows may differ)".into(),
        ));
    }
    Ok(report)
}

/// A capture in this process alone.
pub fn capture(
    cfg: &RunConfig,
    capture: &CaptureConfig,
    opts: &CaptureOptions,
) -> Result<CaptureSummary> {
    capture_on(&World::single(), cfg, capture, opts)
}

/// A capture as one rank of `world` (one process: `World::single()`; several: parallel.rs).
pub fn capture_on(
    world: &World,
    cfg: &RunConfig,
    capture: &CaptureConfig,
    opts: &CaptureOptions,
) -> Result<CaptureSummary> {
    let started = Instant::now();
    let dir = opts
        .out
        .clone()
        .or_else(|| cfg.teacher.store.clone())
        .ok_or_else(|| {
            Error::Invalid("teacher.store: where to write the store (or pass --out)".into())
        })?;
    let teacher = load_teacher(cfg, "a capture")?;
    // the run's vocabulary check before anything is written: a store for a student that training
    // would refuse is not made (its line is printed once the store is open: a refused capture
    // prints one line)
    let summary = check_vocabulary(cfg, &teacher)?.summary();
    let tok = teacher
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::format(&teacher.source, "the teacher has no tokenizer"))?;
    let ds = data::load(&cfg.data, tok, model::eos_id(&teacher))?;
    let budget = opts.budget.or(cfg.teacher.budget);
    let (planned, budget_state) = match &budget {
        None => (plan(&ds, cfg, opts.steps), None),
        Some(_) if opts.steps.is_some() => {
            return Err(Error::Invalid(
                "capture: --steps and a budget do not go together (the budget decides which training sequences are read)".into(),
            ))
        }
        Some(b) => {
            let student = if b.selection.needs_student() {
                Some(load_student(cfg)?)
            } else {
                None
            };
            let live = Live::new(&teacher.model);
            let chosen = crate::teacher::budget::select(
                b,
                student.as_ref().map(|s| &s.model),
                Some(&live as &dyn TeacherSignal),
                &ds.train,
                cfg.run.seed,
                cfg.optim.micro_batch,
            )
            .map_err(|e| Error::Invalid(format!("capture --budget: {e}")))?;
            let mut planned: Vec<&Sequence> = ds.validation.iter().collect();
            planned.extend(chosen.chosen.iter().map(|&i| &ds.train[i]));
            (
                planned,
                Some(crate::teacher::budget::BudgetState::new(
                    b,
                    &chosen.chosen,
                    &ds.train,
                )),
            )
        }
    };
    let keys: Vec<u64> = planned.iter().map(|s| s.key()).collect();
    let identity = identity_of(
        cfg.teacher.model_path("a capture")?,
        cfg.teacher.dtype.name(),
        tok,
        cfg,
    )?;
    let open = || {
        StoreWriter::open(
            &dir,
            identity,
            (
                teacher.source.display().to_string(),
                cfg.teacher.dtype.name().to_string(),
            ),
            teacher.model.config.vocab_size,
            capture.selection,
            Capture {
                fingerprint: data_fingerprint(&keys),
                sequences: keys.len(),
                appended: false,
            },
            if opts.append {
                Mode::Append
            } else {
                Mode::Capture
            },
            capture.shard_sequences,
        )
    };
    // several processes: rank 0 opens the store, then every rank writes its own shards
    let mut writer = if world.size == 1 {
        open()?
    } else {
        let opened = if world.is_main() {
            open().map(|_| ())
        } else {
            Ok(())
        };
        parallel::agree(world, opened, "opening the store")?;
        StoreWriter::part(&dir, world.rank, capture.shard_sequences)?
    };
    if world.is_main() {
        if opts.progress {
            eprintln!("{summary}");
        } else {
            tracing::info!("{summary}");
        }
    }
    // what is left, each distinct sequence once
    let mut todo: Vec<&Sequence> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut already = 0;
    for (s, &k) in planned.iter().zip(&keys) {
        if !seen.insert(k) {
            continue;
        }
        if writer.holds(k) {
            already += 1;
        } else {
            todo.push(s);
        }
    }
    // the bar counts the tokens the teacher runs over (as the closing line's tokens/s does); the
    // target positions are fewer (a sequence's last token and masked prompts have none)
    let batch_rows = cfg.optim.micro_batch.max(1);
    let total_tokens: usize = todo
        .chunks(batch_rows)
        .enumerate()
        .filter(|(b, _)| parallel::runs_batch(world, *b))
        .flat_map(|(_, rows)| rows.iter().map(|s| s.ids.len()))
        .sum();
    let bar = (opts.progress && world.is_main()).then(|| {
        let b = indicatif::ProgressBar::new(total_tokens as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "capture {bar:30} {pos}/{len} tokens, {msg}, ETA {eta} ({elapsed} so far)",
            )
            .expect("valid template"),
        );
        b.set_message("- tokens/s");
        b
    });
    let live = Live::new(&teacher.model);
    let (mut captured, mut positions, mut tokens) = (0usize, 0usize, 0usize);
    let owned: Vec<Sequence> = todo.iter().map(|s| (*s).clone()).collect();
    let idx: Vec<usize> = (0..owned.len()).collect();
    if opts.compare_forward && !idx.is_empty() {
        // one warm-up forward, so that neither timing pays the first call's set-up
        let batch = Batch::new(&owned, &idx[..batch_rows.min(idx.len())], cfg.run.device)?;
        let _ = tch::no_grad(|| teacher.model.forward(&batch.ids))?;
    }
    let loop_start = Instant::now();
    // with --compare-forward: seconds of the bare forwards, each run just before its batch's
    // capture (interleaved, so that both timings see the machine in the same state)
    let mut forward_total = 0.0f64;
    let run = || -> Result<Header> {
        // the batches one process would run; with several, each rank its share of them
        for (b, rows) in idx.chunks(batch_rows).enumerate() {
            if !parallel::runs_batch(world, b) {
                continue;
            }
            let batch = Batch::new(&owned, rows, cfg.run.device)?;
            if opts.compare_forward {
                let t = Instant::now();
                let logits = tch::no_grad(|| teacher.model.forward(&batch.ids))?;
                let _ = logits.f_sum(tch::Kind::Float)?.f_double_value(&[])?; // wait for the work
                drop(logits);
                forward_total += t.elapsed().as_secs_f64();
            }
            let labels: Vec<Vec<i64>> = rows.iter().map(|&r| owned[r].labels.clone()).collect();
            let kept = tch::no_grad(|| -> Result<_> {
                let sig = live.prepare(&batch, &[])?;
                let dense = sig.positions(0, sig.len())?;
                let keys: Vec<u64> = rows.iter().map(|&r| owned[r].key()).collect();
                select_rows(dense.dense()?, &labels, &keys, &capture.selection, false)
            })?;
            for (&r, kept) in rows.iter().zip(kept) {
                let s = &owned[r];
                let at = targets(s);
                captured += 1;
                positions += at.len();
                tokens += s.ids.len();
                writer.add(SeqRecord {
                    key: s.key(),
                    tokens: s.ids.clone(),
                    at,
                    kept,
                })?;
            }
            if let Some(b) = &bar {
                b.set_position(tokens as u64);
                let rate = tokens as f64 / loop_start.elapsed().as_secs_f64().max(1e-9);
                b.set_message(format!("{rate:.1} tokens/s"));
            }
        }
        writer.finish()
    };
    let mut header = parallel::agree(world, run(), "capturing")?;
    // the capture's own time: the loop's, less the bare forwards run inside it for the comparison
    let loop_seconds = loop_start.elapsed().as_secs_f64() - forward_total;
    let (counts, loop_seconds) =
        parallel::reduce_counts(world, &[captured, positions, tokens], loop_seconds)?;
    let (captured, positions, tokens) = (counts[0], counts[1], counts[2]);
    if world.size > 1 {
        // every rank's shards are written: rank 0 enters them in the header
        let merged = if world.is_main() {
            merge_parts(&dir).map(|_| ())
        } else {
            Ok(())
        };
        parallel::agree(
            world,
            merged,
            "merging the ranks' part files into store.json",
        )?;
        header = Header::read(&dir)?;
    }
    if let Some(st) = &budget_state {
        // (one process: a budget is refused with several)
        crate::teacher::budget::write_store_file(&dir, st)?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let forward_seconds = opts.compare_forward.then_some(forward_total);
    Ok(CaptureSummary {
        dir,
        captured,
        already,
        positions,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        loop_seconds,
        forward_seconds,
        header,
    })
}

/// A sequence's target positions (where its label counts).
fn targets(s: &Sequence) -> Vec<u32> {
    s.labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(t, _)| t as u32)
        .collect()
}
