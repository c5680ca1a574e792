//! The distillation recipe, top to bottom, in four phases:
//! 1. set-up: models on the run's device and dtypes, data, objective, optimizer, the resumed state;
//!    every check passes before the output folder is touched.
//! 2. before: the output folder is taken (locked; a previous run cleared only now, on
//!    --overwrite), run.json written, the student evaluated.
//! 3. steps: for each optimizer step, micro-batches → train::step (teacher signal, student forward,
//!    objective, backward) → clipping → AdamW; logs, evaluations, checkpoints. A run in stages
//!    (progressive pruning, train/stages.rs) cuts the student before the first step of each stage.
//! 4. write-out: the student folder, a closing summary record, then loss.png and report.md made
//!    from the records.
use super::budget::BudgetRun;
use super::checkpoint;
use super::distillm::{self, Adaptive, Source};
use super::faults::Faults;
use super::hidden::{self, Projections};
use super::optim::{lr_at, AdamW};
use super::options::Length;
use super::output::{holds_run, RunOutput, Start};
use super::paced::PacedRun;
use super::parallel;
use super::plan::{self, Plan};
use super::stages::{self, StageState, Staged};
use super::state::TrainState;
use super::step::{micro_step, StepOptions};
use crate::config::RunConfig;
use crate::data::mixture::Mixture;
use crate::data::{self, Batch, Dataset, Sampler};
use crate::device::{check_available, device_name};
use crate::dist::World;
use crate::eval::{distill_metrics, DistillMetrics};
use crate::fingerprint;
use crate::model::{self, hf, LoadedModel};
use crate::objective::Objective;
use crate::student::{self, StudentInit};
use crate::teacher::ensemble::Teachers;
use crate::teacher::store::header::{teacher_hash, template_hash, tokenizer_hash};
use crate::teacher::{
    vocab, Hybrid, HybridState, Live, Store, StoreSignal, TeacherSignal, VocabMap, VocabReport,
};
use crate::{Error, Result};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// the teacher's weights, summarised (per variable: Σx and Σx², in name order) after set-up and
    /// after the run: they must be equal, the teacher is frozen
    pub teacher_checksums: (Vec<f64>, Vec<f64>),
}

/// Per variable of `vs` (in name order): Σx and Σx², in f64, computed on the device.
pub fn weight_checksums(vs: &tch::nn::VarStore) -> Result<Vec<f64>> {
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sums = Vec::with_capacity(2 * vars.len());
    for (_, t) in &vars {
        let t = t.f_to_kind(tch::Kind::Double)?;
        sums.push(t.f_sum(tch::Kind::Double)?);
        sums.push(t.f_square()?.f_sum(tch::Kind::Double)?);
    }
    if sums.is_empty() {
        return Ok(vec![]);
    }
    Ok(Vec::<f64>::try_from(
        tch::Tensor::f_stack(&sums, 0)?.f_to_device(tch::Device::Cpu)?,
    )?)
}

/// Everything phase 1 settles.
struct Setup {
    /// the live teacher (None when a store serves every sequence)
    teacher: Option<LoadedModel>,
    store: Option<Store>,
    /// a hybrid's counts and write-back
    hybrid: RefCell<HybridState>,
    student: LoadedModel,
    /// the hidden-state terms' learned projections (trained with the student)
    projections: Option<Projections>,
    ds: Dataset,
    objective: Objective,
    opt: AdamW,
    sampler: Sampler,
    /// `[[data.source]]`: rows drawn from the sources by weight (data/mixture.rs)
    mixture: Option<Mixture>,
    state: TrainState,
    start: Start,
    teacher_checksum: Vec<f64>,
    /// how the student's layers were chosen, when measured
    pruning: Option<student::Pruning>,
    /// a run in stages: the plan and the calibration windows
    staged: Option<Staged>,
    /// several teachers (`[[teacher]]`): those after the first (`teacher`), their maps, the shares
    teachers: Option<Teachers>,
    /// the teacher's distribution in the student's ids, and what the check found
    vocab: VocabMap,
    vocab_report: VocabReport,
    /// the ids that end a student's sample (on-policy steps, PACED's rollouts)
    stop_ids: Vec<u32>,
    /// DistiLLM's adaptive mode: φ, L_ref and the replay buffer
    distillm: Option<Adaptive>,
    /// PACED: the problems and the rows' weights (train/paced.rs)
    paced: Option<PacedRun>,
    /// a teacher-query budget: the chosen rows (train/budget.rs), and the selection's record until
    /// it is written
    budget: Option<BudgetRun>,
    budget_record: Option<Value>,
    /// this process among several (one by default; train/parallel.rs)
    world: World,
    /// `[run] max_memory`: the prediction the run was checked against (train/plan.rs)
    plan: Option<Plan>,
}

fn total_steps(cfg: &RunConfig, n_train: usize) -> usize {
    match cfg.run.length {
        Length::Steps(n) => n,
        Length::Epochs(e) => {
            let per_step = cfg.optim.micro_batch * cfg.optim.grad_accum;
            ((e * n_train as f64) / per_step as f64).ceil().max(1.0) as usize
        }
    }
}

pub fn train(cfg: &RunConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    // several processes (train/parallel.rs): the group first; the global micro-batch is the
    // processes' micro-batches together, and what the sampler, the fingerprint and the step
    // count see
    let mut cfg = cfg.clone();
    let world = parallel::join(&mut cfg)?;
    cfg.optim.micro_batch *= world.size;
    let cfg = &cfg;
    let mut s = set_up(cfg, opts)?;
    parallel::check_objective(&s.objective, world.size)?;
    // every rank done with its set-up (and at the same step) before rank 0 takes the folder
    parallel::agree_on_start(&world, s.state.step)?;
    parallel::broadcast_start(&world, &s.opt)?;
    s.world = world;
    // set-up's freed pages (loading, dequantising) back to the system before the steps, as
    // train/plan.rs assumes
    crate::teacher::store::reader::release_freed_memory();
    if let Some(budget) = cfg.run.max_memory {
        fit_memory(cfg, &mut s, budget)?; // a run that does not fit is refused here
    }
    let mut out = if s.world.is_main() {
        RunOutput::open(&cfg.run.output, s.start, Faults::from_env())?
    } else {
        RunOutput::inert(&cfg.run.output)
    };
    // the vocabulary check's line, once the run holds its folder (a refused run prints one line)
    let summary = s.vocab_report.summary();
    if opts.progress && s.world.is_main() {
        eprintln!("{summary}");
    } else {
        tracing::info!("{summary}");
    }
    out.write_run_info(&run_info(cfg, opts, &s))?;
    if let Some(r) = s.budget_record.take() {
        out.metric(&r)?;
    }
    let before = match s.start {
        Start::Resume(_) => None,
        _ => {
            let m = evaluate(cfg, &s)?;
            tracing::info!(
                "before: student ppl {:.2}, teacher ppl {:.2}, KL {:.4}",
                m.student_ppl,
                m.teacher_ppl,
                m.kl
            );
            if let Some(a) = s.distillm.as_mut() {
                a.after_eval(m.student_ppl.ln());
                s.state.distillm = Some(a.state());
            }
            out.metric(&eval_record(cfg, &s, 0, &m)?)?;
            Some(m)
        }
    };
    let last_eval = steps(cfg, opts, &mut s, &mut out)?;
    write_out(cfg, &s, &mut out, before, last_eval, started)
}

// ---------------------------------------------------------------- 1. set-up

/// The output folder must not be, hold, or lie inside an input: a run could overwrite it.
fn check_output_apart(cfg: &RunConfig) -> Result<()> {
    // the canonical form of a path that may not exist yet: its nearest existing ancestor, resolved
    fn canonical(p: &Path) -> PathBuf {
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        let mut rest = Vec::new();
        let mut cur = abs.as_path();
        loop {
            if let Ok(c) = cur.canonicalize() {
                return rest.iter().rev().fold(c, |acc, r| acc.join(r));
            }
            match (cur.parent(), cur.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    cur = parent;
                }
                _ => return abs,
            }
        }
    }
    let out = canonical(&cfg.run.output);
    let mut inputs = Vec::new();
    if let Some(p) = &cfg.teacher.path {
        inputs.push(("teacher.path", p.clone()));
    }
    if let Some(p) = &cfg.teacher.store {
        inputs.push(("teacher.store", p.clone()));
    }
    if let StudentInit::Path(p) = &cfg.student.init {
        inputs.push(("student.path", p.clone()));
    }
    inputs.push(("data.train", cfg.data.train.clone()));
    if let Some(v) = &cfg.data.validation {
        inputs.push(("data.validation", v.clone()));
    }
    for src in &cfg.data.sources {
        inputs.push(("data.source.train", src.train.clone()));
        if let Some(v) = &src.validation {
            inputs.push(("data.source.validation", v.clone()));
        }
    }
    for (key, p) in inputs {
        let input = canonical(&p);
        if out.starts_with(&input) || input.starts_with(&out) {
            return Err(Error::Invalid(format!(
                "run.output = {}: the output folder {} {key} ({}); choose an output folder apart from every input",
                cfg.run.output.display(),
                if out == input {
                    "is"
                } else if input.starts_with(&out) {
                    "contains"
                } else {
                    "lies inside"
                },
                p.display()
            )));
        }
    }
    Ok(())
}

/// What the result depends on, key by key: a checkpoint records it and a resume must match it.
/// Logging, evaluation and checkpoint cadence, threads, the device and the output folder are left
/// out: they do not change the weights (the device changes the last bits only).
fn fingerprint_of(
    cfg: &RunConfig,
    ds: &Dataset,
    total: usize,
    student: &str,
) -> fingerprint::Fingerprint {
    let mut data = crate::fingerprint::Fnv64::default();
    for s in ds.train.iter().chain(&ds.validation) {
        data.u32s(&s.ids).f32s(&s.weights);
    }
    let d = &cfg.data;
    let o = &cfg.optim;
    let losses: Vec<String> = cfg
        .losses
        .iter()
        .map(|l| format!("{} × {}", l.weight, l.describe()))
        .collect();
    [
        (
            "teacher.path",
            format!(
                "{:?}",
                cfg.teacher.path.as_ref().map(|p| p.display().to_string())
            ),
        ),
        (
            "teacher.store",
            format!(
                "{:?}",
                cfg.teacher.store.as_ref().map(|p| p.display().to_string())
            ),
        ),
        ("teacher.dtype", cfg.teacher.dtype.name().to_string()),
        ("student", student.to_string()),
        ("student.dtype", cfg.student.dtype.name().to_string()),
        ("data.train", d.train.display().to_string()),
        (
            "data.validation",
            format!(
                "{:?}",
                d.validation.as_ref().map(|p| p.display().to_string())
            ),
        ),
        ("data.format", format!("{:?}", d.format)),
        ("data.seq_len", d.seq_len.to_string()),
        ("data.packing", d.packing.to_string()),
        (
            "data.validation_fraction",
            d.validation_fraction.to_string(),
        ),
        ("data.max_train_tokens", format!("{:?}", d.max_train_tokens)),
        (
            "data.max_validation_sequences",
            format!("{:?}", d.max_validation_sequences),
        ),
        ("data tokens (fingerprint)", data.hex()),
        ("loss", losses.join(" + ")),
        ("optim.lr", o.lr.to_string()),
        ("optim.betas", format!("{:?}", o.betas)),
        ("optim.eps", o.eps.to_string()),
        ("optim.weight_decay", o.weight_decay.to_string()),
        ("optim.warmup_steps", o.warmup_steps.to_string()),
        ("optim.schedule", format!("{:?}", o.schedule)),
        ("optim.min_lr_ratio", o.min_lr_ratio.to_string()),
        ("optim.grad_clip", format!("{:?}", o.grad_clip)),
        ("optim.grad_accum", o.grad_accum.to_string()),
        ("optim.micro_batch", o.micro_batch.to_string()),
        ("optim.loss_chunk", o.loss_chunk.to_string()),
        ("run.seed", cfg.run.seed.to_string()),
        // GKD's settings read as before DistiLLM's mode existed (older checkpoints still match)
        (
            "onpolicy",
            format!("{:?}", cfg.onpolicy).replace(", adaptive: None", ""),
        ),
        ("run.steps or run.epochs (total steps)", total.to_string()),
    ]
    .into_iter()
    // the keys of later features only when given, so that older checkpoints still match: several
    // sources (names, paths, weights) and DDK, PACED, a teacher-query budget
    .chain((!d.sources.is_empty()).then(|| ("data.source", format!("{:?}", d.sources))))
    .chain(d.ddk.map(|k| ("data.ddk", format!("{k:?}"))))
    .chain(cfg.paced.as_ref().map(|p| ("paced", format!("{p:?}"))))
    .chain(
        cfg.teacher
            .budget
            .as_ref()
            .map(|b| ("teacher.budget", b.describe())),
    )
    .chain(cfg.teachers.as_ref().map(|t| ("teachers", t.describe())))
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn set_up(cfg: &RunConfig, opts: &TrainOptions) -> Result<Setup> {
    let out = &cfg.run.output;
    if holds_run(out) && !opts.resume && !opts.overwrite {
        return Err(Error::Invalid(format!(
            "{}: holds another run; pass --resume to continue it or --overwrite to replace it",
            out.display()
        )));
    }
    check_output_apart(cfg)?;
    let device = cfg.run.device;
    check_available(device)?;
    // the teacher in f32 first: a student made of its layers copies f32 weights
    let mut teacher = match &cfg.teacher.path {
        Some(p) => {
            Some(model::load(p, device).map_err(|e| Error::Invalid(format!("teacher: {e}")))?)
        }
        None => None,
    };
    // the student's source as the fingerprint and run.json say it; layers chosen by similarity are
    // measured now (again on a resume: the same teacher and text choose the same layers)
    let mut pruning = None;
    let mut student = match (&cfg.student.init, &teacher) {
        (StudentInit::Path(p), _) => {
            model::load(p, device).map_err(|e| Error::Invalid(format!("student: {e}")))?
        }
        (StudentInit::FromTeacher { layers }, Some(t)) => {
            student::from_teacher_layers(t, layers, device)?
        }
        (
            StudentInit::Similarity {
                options,
                calibration,
            },
            Some(t),
        ) => {
            let p = choose_layers(t, options, calibration)?;
            let s = student::from_teacher_layers(t, &p.kept, device)?;
            pruning = Some(p);
            s
        }
        (StudentInit::Teacher, Some(t)) => {
            let all: Vec<usize> = (0..t.model.config.num_hidden_layers).collect();
            student::from_teacher_layers(t, &all, device)?
        }
        (
            StudentInit::FromTeacher { .. } | StudentInit::Similarity { .. } | StudentInit::Teacher,
            None,
        ) => {
            return Err(Error::Invalid(
                "student.from_teacher: needs the teacher model (teacher.path), not only its store"
                    .into(),
            ))
        }
    };
    student.model.set_compute_kind(cfg.student.dtype.kind());
    // the teacher layer each student layer came from, when it was made of the teacher's layers
    let copied_from: Option<Vec<usize>> = match (&cfg.student.init, &pruning) {
        (StudentInit::FromTeacher { layers }, _) => Some(layers.clone()),
        (StudentInit::Similarity { .. }, Some(p)) => Some(p.kept.clone()),
        (StudentInit::Teacher, _) => Some((0..student.model.config.num_hidden_layers).collect()),
        (StudentInit::Similarity { .. }, None) | (StudentInit::Path(_), _) => None,
    };
    // a run in stages: the plan checked against the student's start, the calibration windows read
    // with the teacher's tokenizer (measured f32 teacher, before its dtype is set)
    let staged = match (&cfg.student.stages, &teacher, &copied_from) {
        (Some(st), Some(t), Some(initial)) => Some(stages::plan(st, t, initial.clone())?),
        (None, _, _) => None,
        _ => unreachable!("stages start from the teacher's layers (config) and need its model"),
    };
    if let Some(teacher) = teacher.as_mut() {
        // a teacher is only run: its weights take its dtype; a student keeps f32 master weights
        // and computes in its dtype
        let t_kind = cfg.teacher.dtype.kind();
        if t_kind != tch::Kind::Float {
            teacher.vs.set_kind(t_kind);
        }
        teacher.model.set_compute_kind(t_kind);
        teacher.vs.freeze();
    }
    let (mut vocab_report, vocab) = match (&teacher, &cfg.teacher.store) {
        (Some(t), _) => vocab::check(t, &student)?,
        // a store-only run: the store's rows against the student's, one tokenizer (the store's
        // tokenizer is checked against the student's below)
        (None, Some(dir)) => {
            let rows = Store::open(dir)?.header.vocab_rows;
            let tok = student
                .tokenizer
                .as_ref()
                .ok_or_else(|| Error::format(&student.source, "the student has no tokenizer"))?;
            vocab::compare(
                vocab::Side {
                    source: dir,
                    tokenizer: tok,
                    rows,
                },
                vocab::Side {
                    source: &student.source,
                    tokenizer: tok,
                    rows: student.model.config.vocab_size,
                },
            )?
        }
        (None, None) => unreachable!("the config asks for a teacher path or a store"),
    };
    // several teachers: the others loaded and checked like the first
    let teachers = match &cfg.teachers {
        Some(t) => Some(Teachers::load(t, &student, device)?),
        None => None,
    };
    let context = teacher
        .as_ref()
        .map_or(usize::MAX, |t| t.model.config.max_position_embeddings)
        .min(student.model.config.max_position_embeddings);
    if cfg.data.seq_len > context {
        return Err(Error::Invalid(format!(
            "data.seq_len = {} exceeds the models' context of {context} positions",
            cfg.data.seq_len
        )));
    }
    // the data in the student's ids (the student is what is trained); chat data rendered with its
    // template, else the teacher's
    let s_tok = student.tokenizer.as_ref().expect("checked by vocab::check");
    let with_template;
    let tok = match (
        &s_tok.chat_template,
        teacher.as_ref().and_then(|t| t.tokenizer.as_ref()),
    ) {
        (None, Some(t)) if t.chat_template.is_some() => {
            with_template = {
                let mut x = s_tok.clone();
                x.chat_template = t.chat_template.clone();
                x
            };
            &with_template
        }
        _ => s_tok,
    };
    let eos = student
        .model
        .config
        .eos_token_ids
        .first()
        .copied()
        .or_else(|| tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e)));
    let ds = data::load(&cfg.data, tok, eos)?;
    let mut stop_ids = student.model.config.eos_token_ids.clone();
    stop_ids.extend(tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e)));
    if ds.validation.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: too little data to hold out a validation sequence; give data.validation",
            cfg.data.train.display()
        )));
    }
    let mut paced = match &cfg.paced {
        Some(o) => Some(
            PacedRun::new(
                o.clone(),
                &ds.train,
                &ds.answers,
                &ds.validation,
                &ds.validation_answers,
            )
            .map_err(|e| Error::format(&cfg.data.train, e.to_string()))?,
        ),
        None => None,
    };
    let total = total_steps(cfg, ds.train.len());
    // a teacher-query budget: the chosen sequences, before the store is checked for them
    let (mut budget, budget_record) = match &cfg.teacher.budget {
        Some(b) => {
            // a resume takes the checkpoint's set (checked below) without measuring again
            let recorded = match checkpoint::latest(&cfg.run.output) {
                Ok(Some(ck)) if opts.resume => {
                    checkpoint::read_state(&ck).ok().and_then(|st| st.budget)
                }
                _ => None,
            };
            let (state, record) = match recorded {
                Some(st) => (st, Value::Null),
                None => choose_budget(cfg, b, &student, teacher.as_ref(), &vocab, &ds)?,
            };
            let run = BudgetRun::new(*b, state.chosen.clone(), ds.train.len(), total)?;
            (Some((run, state)), Some(record))
        }
        None => (None, None),
    };
    let chosen = budget.as_ref().map(|(r, _)| r.chosen.as_slice());
    let store = match &cfg.teacher.store {
        Some(dir) => Some(open_store(
            cfg,
            dir,
            teacher.as_ref(),
            tok,
            &ds,
            total,
            chosen,
        )?),
        None => None,
    };
    // a store that holds every sequence the run reads makes the live teacher unnecessary (unless
    // writing back)
    if let (Some(st), Some(_)) = (&store, &teacher) {
        if missing_sequences(st, &ds, cfg, total, chosen).0 == 0
            && !cfg.teacher.write_back
            && cfg.onpolicy.is_none()
        {
            tracing::info!(
                "the store holds every sequence the run reads: the teacher model is not kept"
            );
            teacher = None;
            crate::teacher::store::reader::release_freed_memory();
        }
    }
    if store.is_some() && vocab.translates_ids() {
        return Err(Error::Invalid(
            "teacher.store: the student's tokenizer has tokens at other ids than the teacher's; a store is read in the teacher's ids, which is supported only when they agree (padding rows may differ)".into(),
        ));
    }
    // every token id must have a row in the student and a counterpart in the teacher
    let rows = vocab.width();
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
            "{}: token id {max_id} is outside the {rows} ids that both models have rows for (does the tokenizer belong to these models?)",
            cfg.data.train.display()
        )));
    }
    let mut objective = Objective::new(&cfg.losses, total)?;
    if let Some(t) = &teachers {
        t.check_ids(max_id, cfg.data.seq_len)?;
        let hidden: Vec<String> = objective
            .hidden_terms()
            .iter()
            .map(|&i| cfg.losses[i].describe())
            .collect();
        t.check_objective(&hidden)?;
    }
    if let Some(st) = &store {
        objective
            .check_sparse(st.header.selection.temperature)
            .map_err(|e| Error::Invalid(format!("teacher.store = {}: {e}", st.dir.display())))?;
    }
    // the hidden-state terms' layer maps and projections (a store refused them above)
    let projections = match &teacher {
        Some(t) if !objective.hidden_terms().is_empty() => hidden::wire(
            &mut objective,
            &cfg.losses,
            &student.model.config,
            &t.model.config,
            copied_from.as_deref(),
            cfg.run.seed,
            device,
        )?,
        _ => None,
    };
    let hybrid = RefCell::new(HybridState::default());
    if cfg.teacher.write_back {
        let (Some(st), Some(t)) = (&store, &teacher) else {
            unreachable!(
                "write_back needs path and store (checked in config) and the teacher is kept then"
            )
        };
        let keys: Vec<u64> = ds
            .train
            .iter()
            .chain(&ds.validation)
            .map(|s| s.key())
            .collect();
        hybrid.borrow_mut().writer = Some(crate::teacher::store::StoreWriter::open(
            &st.dir,
            st.header.identity.clone(),
            (
                t.source.display().to_string(),
                cfg.teacher.dtype.name().to_string(),
            ),
            t.model.config.vocab_size,
            st.header.selection,
            crate::teacher::store::header::Capture {
                fingerprint: crate::teacher::store::capture::data_fingerprint(&keys),
                sequences: keys.len(),
                appended: true,
            },
            crate::teacher::store::Mode::Append,
            cfg.capture.shard_sequences,
        )?);
    }
    let mut projections = projections;
    let mut opt = AdamW::new(&student.vs, &cfg.optim)?;
    if let Some(p) = &projections {
        opt.add(&p.vs)?;
    }
    let n_sampled = budget
        .as_ref()
        .map_or(ds.train.len(), |(r, _)| r.sampled_len(ds.train.len()));
    let mut sampler = Sampler::new(n_sampled, cfg.run.seed);
    let mut mixture = (!ds.sources.is_empty()).then(|| {
        let sizes: Vec<usize> = ds.sources.iter().map(|s| s.train.len()).collect();
        let weights: Vec<f64> = ds.sources.iter().map(|s| s.weight).collect();
        Mixture::new(&sizes, &weights, cfg.run.seed)
    });
    // what the student is made of: the layers, however they were chosen
    let student_source = match (&cfg.student.init, &pruning) {
        (StudentInit::Path(p), _) => p.display().to_string(),
        (StudentInit::FromTeacher { layers }, _) => format!("teacher layers {layers:?}"),
        (StudentInit::Similarity { .. }, Some(p)) => format!("teacher layers {:?}", p.kept),
        (StudentInit::Similarity { .. }, None) => unreachable!("measured above"),
        (StudentInit::Teacher, _) => "the teacher's layers".to_string(),
    };
    let mut fingerprint = fingerprint_of(cfg, &ds, total, &student_source);
    if let Some(st) = &cfg.student.stages {
        fingerprint.insert("student.stage".into(), st.describe());
    }
    let mut state = TrainState {
        step: 0,
        total_steps: total,
        adam_t: 0,
        sampler: sampler.state,
        objective: objective.state(),
        skipped_steps: 0,
        tokens_seen: 0,
        seed: cfg.run.seed,
        fingerprint: fingerprint.clone(),
        stages: None,
        distillm: None,
        paced: None,
        mixture: mixture.as_ref().map(Mixture::state),
        budget: None,
        loss_chunk: None,
    };
    let mut adaptive = cfg
        .onpolicy
        .as_ref()
        .and_then(|o| Some(Adaptive::new(o.adaptive.clone()?, o.fraction)));
    state.distillm = adaptive.as_ref().map(Adaptive::state);
    let start = if opts.resume && holds_run(out) {
        let ck = checkpoint::latest(out)?.ok_or_else(|| {
            let broken = checkpoint::incomplete(out);
            let what = if broken.is_empty() {
                format!("no checkpoint in {}", checkpoint::dir(out).display())
            } else {
                format!(
                    "no complete checkpoint ({} lacks state.json)",
                    broken
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            Error::Invalid(format!(
                "{}: cannot resume: {what}; nothing was changed (--overwrite starts the run over)",
                out.display()
            ))
        })?;
        let st = checkpoint::read_state(&ck)?;
        let differing = fingerprint::differences(&st.fingerprint, &fingerprint);
        if !differing.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: was made with other settings or data; differing: {} (--overwrite starts over)",
                ck.display(),
                differing.join("; ")
            )));
        }
        if st.step > total || st.adam_t > st.step || st.skipped_steps > st.step {
            return Err(Error::format(
                ck.join("state.json"),
                format!(
                    "step {} (updates {}, skipped {}) does not fit a run of {total} steps",
                    st.step, st.adam_t, st.skipped_steps
                ),
            ));
        }
        // a run in stages: the student of the checkpoint's stage (its layers, then its weights)
        if let Some(plan) = &staged {
            let at = ck.join("state.json");
            let rec = st
                .stages
                .as_ref()
                .ok_or_else(|| Error::format(&at, "a run in stages, but no stage recorded"))?;
            plan.check(rec, st.step)
                .map_err(|m| Error::format(&at, m))?;
            let mut from = 0;
            let idx: Vec<usize> = rec
                .layers
                .iter()
                .map(|l| {
                    from += plan.initial[from..]
                        .iter()
                        .position(|x| x == l)
                        .expect("checked")
                        + 1;
                    from - 1
                })
                .collect();
            student = stages::cut(&student, &idx, device)?;
            if let Some(t) = &teacher {
                if !objective.hidden_terms().is_empty() {
                    projections = hidden::wire(
                        &mut objective,
                        &cfg.losses,
                        &student.model.config,
                        &t.model.config,
                        Some(&rec.layers),
                        cfg.run.seed,
                        device,
                    )?;
                }
            }
            opt = AdamW::new(&student.vs, &cfg.optim)?;
            if let Some(p) = &projections {
                opt.add(&p.vs)?;
            }
        }
        let weights = hf::read_safetensors(&ck.join("model.safetensors"))?;
        hf::load_into(&student.vs, &weights, &ck)?;
        if let Some(p) = &projections {
            p.load(&ck)?;
        }
        opt.load_state(
            &hf::read_safetensors(&ck.join("optimizer.safetensors"))?,
            st.adam_t,
            &ck,
        )?;
        sampler
            .restore(st.sampler)
            .map_err(|m| Error::format(ck.join("state.json"), m))?;
        objective.restore(&st.objective)?;
        if let Some(m) = mixture.as_mut() {
            let rec = st.mixture.as_ref().ok_or_else(|| {
                Error::format(
                    ck.join("state.json"),
                    "a run with [[data.source]], but no source positions recorded",
                )
            })?;
            m.restore(rec)
                .map_err(|e| Error::format(ck.join("state.json"), e))?;
        }
        if let Some(a) = adaptive.as_mut() {
            let rec = st.distillm.as_ref().ok_or_else(|| {
                Error::format(
                    ck.join("state.json"),
                    "[onpolicy] mode = \"distillm\", but no replay state recorded",
                )
            })?;
            a.restore(rec, &ck, cfg.data.seq_len)?;
        }
        // PACED: the weights of the table the uninterrupted run used
        match (paced.as_mut(), &st.paced) {
            (Some(p), Some(t)) => {
                p.apply(t)
                    .map_err(|e| Error::format(ck.join("state.json"), e.to_string()))?;
            }
            (Some(_), None) if st.step > 0 => {
                return Err(Error::format(
                    ck.join("state.json"),
                    "a PACED run, but no pass-rate table recorded",
                ))
            }
            _ => {}
        }
        // a budget: the set the uninterrupted run chose (and its teacher-row count)
        if let Some((run, _)) = &budget {
            let at = ck.join("state.json");
            let rec = st
                .budget
                .as_ref()
                .ok_or_else(|| Error::format(&at, "a budgeted run, but no chosen set recorded"))?;
            rec.check(&run.budget, &ds.train)
                .map_err(|m| Error::format(&at, m))?;
            let b = run.budget;
            budget = Some((
                BudgetRun::new(b, rec.chosen.clone(), ds.train.len(), total)?,
                rec.clone(),
            ));
        }
        state = st;
        tracing::info!("resuming from {} (step {})", ck.display(), state.step);
        Start::Resume(state.step)
    } else if opts.overwrite && holds_run(out) {
        Start::Overwrite
    } else {
        Start::Fresh
    };
    // the teacher's mass on its padding rows, on the first validation batch (one forward pass)
    if let Some(t) = &teacher {
        let first: Vec<usize> = (0..ds.validation.len().min(cfg.optim.micro_batch)).collect();
        vocab_report.teacher_padding_mass = vocab::padding_mass(
            &t.model,
            &vocab,
            &Batch::new(&ds.validation, &first, device)?,
        )?;
    }
    // shown once every check has passed (a refused run prints one line)
    if let Some(p) = &pruning {
        if opts.progress {
            eprint!("{}", p.table());
        } else {
            tracing::info!("{}", p.table());
        }
    }
    let teacher_checksum = match &teacher {
        Some(t) => weight_checksums(&t.vs)?,
        None => vec![],
    };
    let (budget, budget_record) = match budget {
        Some((run, st)) => {
            if state.budget.is_none() {
                state.budget = Some(st);
            }
            (
                Some(run),
                budget_record.filter(|r| state.step == 0 && !r.is_null()),
            )
        }
        None => (None, None),
    };
    Ok(Setup {
        world: World::single(),
        plan: None,
        budget,
        budget_record,
        distillm: adaptive,
        paced,
        stop_ids,
        pruning,
        staged,
        vocab,
        vocab_report,
        teachers,
        teacher_checksum,
        teacher,
        store,
        hybrid,
        student,
        projections,
        ds,
        objective,
        opt,
        sampler,
        mixture,
        state,
        start,
    })
}

/// The probe of train/plan.rs on the set-up run: a sequence of its data (a store's validation
/// sequence when there is no live teacher), the live teacher's signal (a hybrid never writes back
/// here), the gradients zeroed afterwards.
fn measure(cfg: &RunConfig, s: &mut Setup) -> Result<(plan::Probe, plan::Counts, plan::Shape)> {
    let counts = plan::Counts::of(&s.opt, &s.student.vs, s.teacher.as_ref().map(|t| &t.vs));
    let shape = plan::Shape {
        tokens: cfg.optim.micro_batch * cfg.data.seq_len,
        grad_accum: cfg.optim.grad_accum,
        loss_chunk: cfg.optim.loss_chunk,
        chunkable: s.objective.chunkable(),
        checkpoints: cfg.run.checkpoint_every > 0,
    };
    let (signal, seq): (Box<dyn TeacherSignal>, _) = match (&s.teacher, &s.store) {
        (Some(t), _) => {
            let first = s.ds.train.first().unwrap_or(&s.ds.validation[0]);
            (
                Box::new(Live::new(&t.model).with_vocab(&s.vocab)),
                plan::probe_sequence(first, cfg.data.seq_len.min(PROBE_POSITIONS)),
            )
        }
        (None, Some(st)) => (
            Box::new(StoreSignal::new(st, &s.vocab)),
            s.ds.validation[0].clone(),
        ),
        (None, None) => unreachable!("the config asks for a teacher path or a store"),
    };
    let probe = plan::probe(
        &s.student.model,
        signal.as_ref(),
        &s.objective,
        &mut s.opt,
        &seq,
        cfg.optim.micro_batch,
        counts.trainable,
    )?;
    Ok((probe, counts, shape))
}

/// Positions of the probe's sequence (at most): long enough for the per-position terms to stand
/// out of the allocator's noise, short enough to take seconds on a CPU.
const PROBE_POSITIONS: usize = 128;

/// `[run] max_memory`: the prediction, and the chunk that fits (a resume keeps its recorded one);
/// a run that does not fit is refused before the output folder is touched.
fn fit_memory(cfg: &RunConfig, s: &mut Setup, budget: u64) -> Result<()> {
    let (probe, counts, shape) = measure(cfg, s)?;
    let p = match s.state.loss_chunk {
        Some(c) => {
            let mut p = plan::predict(&probe, &counts, &shape, c);
            p.max_memory = Some(budget);
            if p.peak > budget as f64 {
                return Err(Error::Invalid(format!(
                    "run.max_memory = {}: the checkpoint's chunk of {c} positions is predicted to need {} ({}); nothing was changed",
                    plan::show_bytes(budget as f64),
                    plan::show_bytes(p.peak),
                    p.peak_phase
                )));
            }
            p
        }
        None => plan::fit(&probe, &counts, &shape, budget)?,
    };
    tracing::info!(
        "max_memory {}: predicted peak {} ({}), chunk {}",
        plan::show_bytes(budget as f64),
        plan::show_bytes(p.peak),
        p.peak_phase,
        p.chunk
    );
    s.state.loss_chunk = Some(p.chunk);
    s.plan = Some(p);
    Ok(())
}

/// `distill plan`: set-up as `distill train` does it (nothing written), the probe, and the
/// prediction at the configured chunk, or with `[run] max_memory` the chunk that fits (Err: the
/// prediction at the configured chunk and why it does not fit).
pub fn plan(cfg: &RunConfig) -> Result<std::result::Result<Plan, (Plan, Error)>> {
    let opts = TrainOptions {
        overwrite: true, // the output folder is only read, never written
        ..TrainOptions::default()
    };
    let mut s = set_up(cfg, &opts)?;
    let (probe, counts, shape) = measure(cfg, &mut s)?;
    Ok(match cfg.run.max_memory {
        Some(b) => plan::fit(&probe, &counts, &shape, b).map_err(|e| {
            let mut p = plan::predict(&probe, &counts, &shape, plan::configured_chunk(&shape));
            p.max_memory = Some(b);
            (p, e)
        }),
        None => Ok(plan::predict(
            &probe,
            &counts,
            &shape,
            plan::configured_chunk(&shape),
        )),
    })
}

/// The layers `[student] from_teacher = { keep = N, method = "similarity", … }` asks for, measured
/// on the teacher (f32, before its dtype is set).
fn choose_layers(
    teacher: &LoadedModel,
    options: &student::PruneOptions,
    calibration: &student::Calibration,
) -> Result<student::Pruning> {
    let k = "student.from_teacher";
    let layers = teacher.model.config.num_hidden_layers;
    student::prune::check_keep(options.keep, layers)
        .map_err(|m| Error::Invalid(format!("{k}.keep = {}: {m}", options.keep)))?;
    let t = Instant::now();
    let p = student::choose_layers(teacher, options, calibration)
        .map_err(|e| Error::Invalid(format!("{k}.calibration: {e}")))?;
    tracing::info!(
        "chose layers {:?} in {:.1}s",
        p.kept,
        t.elapsed().as_secs_f64()
    );
    Ok(p)
}

// ---------------------------------------------------------------- 2. before

fn run_info(cfg: &RunConfig, opts: &TrainOptions, s: &Setup) -> Value {
    let sc = &s.student.model.config;
    let student_source = match (&cfg.student.init, &s.pruning) {
        (StudentInit::Path(p), _) => format!("`{}`", p.display()),
        (StudentInit::FromTeacher { layers }, _) => format!("teacher layers {layers:?}"),
        (StudentInit::Similarity { calibration, .. }, Some(p)) => format!(
            "teacher layers {:?}, chosen by similarity ({}) on `{}`",
            p.kept,
            p.strategy,
            calibration.path.display()
        ),
        (StudentInit::Similarity { .. }, None) => unreachable!("measured at set-up"),
        (StudentInit::Teacher, _) => "the teacher's layers".to_string(),
    };
    // a run in stages: the student it ends with, and how it gets there
    let (student_source, student_params, student_layers) = match &s.staged {
        Some(st) => {
            let last = *st.counts.last().expect("at least one stage");
            let mut c = sc.clone();
            c.num_hidden_layers = last;
            (
                format!(
                    "{student_source}, {} layers pruned in {} stages to {last} (student.stage)",
                    st.initial.len(),
                    st.counts.len()
                ),
                c.num_params(),
                last,
            )
        }
        None => (student_source, sc.num_params(), sc.num_hidden_layers),
    };
    let stage_plan = s.staged.as_ref().map(|st| {
        st.stages
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let (first, last) = st.stages.span(i + 1);
                json!({"stage": i + 1, "layers_after": st.counts[i], "steps": stage.steps,
                       "first_step": first, "last_step": last, "strategy": stage.strategy.name()})
            })
            .collect::<Vec<_>>()
    });
    json!({
        "run_file": opts.run_file.as_ref().map(|p| p.display().to_string()),
        "teacher": match &s.teacher {
            Some(t) => json!({"source": t.source.display().to_string(), "format": t.format,
                    "parameters": t.model.config.num_params(), "layers": t.model.config.num_hidden_layers,
                    "dtype": cfg.teacher.dtype.name()}),
            None => json!({"source": s.store.as_ref().map(|st| st.header.teacher_source.clone()),
                    "format": "store", "dtype": s.store.as_ref().map(|st| st.header.teacher_dtype.clone())}),
        },
        "store": s.store.as_ref().map(|st| json!({
            "path": st.dir.display().to_string(), "sequences": st.len(),
            "coverage": st.header.selection.coverage, "max_k": st.header.selection.max_k,
            "temperature": st.header.selection.temperature,
            "quantisation": st.header.selection.quantisation.name(),
            "hybrid": s.teacher.is_some(), "write_back": cfg.teacher.write_back})),
        "student": {"source": student_source, "parameters": student_params,
                    "layers": student_layers, "dtype": cfg.student.dtype.name()},
        "stages": stage_plan,
        "calibration": cfg.student.stages.as_ref().map(|st| st.describe()),
        "data": {"train": cfg.data.train.display().to_string(), "seq_len": cfg.data.seq_len,
                 "train_sequences": s.ds.train.len(), "train_tokens": s.ds.train_tokens,
                 "validation_sequences": s.ds.validation.len(),
                 "sources": s.ds.sources.iter().map(|x| json!({"name": x.name, "weight": x.weight,
                     "train_sequences": x.train.len(), "validation_sequences": x.validation.len()})).collect::<Vec<_>>(),
                 "ddk": cfg.data.ddk.map(|d| json!({"interval": d.interval, "alpha": d.alpha}))},
        "objective": cfg.losses.iter().map(|l| format!("{} × {}", l.weight, l.describe())).collect::<Vec<_>>(),
        "hidden_layers": s.objective.hidden_maps().into_iter().map(|m| json!({
            "term": m.term, "pairs": m.pairs, "projection": m.projected})).collect::<Vec<_>>(),
        "optim": {"lr": cfg.optim.lr, "schedule": format!("{:?}", cfg.optim.schedule).to_lowercase(),
                  "warmup_steps": cfg.optim.warmup_steps, "micro_batch": cfg.optim.micro_batch,
                  "grad_accum": cfg.optim.grad_accum},
        // micro_batch above is the global one: the processes' micro-batches together
        "processes": s.world.size,
        "total_steps": s.state.total_steps,
        "seed": cfg.run.seed,
        "device": device_name(cfg.run.device),
        "threads": tch::get_num_threads(),
        "fingerprint": s.state.fingerprint,
        "vocab": {"summary": s.vocab_report.summary(), "check": s.vocab_report},
        "pruning": s.pruning,
        "teachers": s.teachers.as_ref().map(|t| json!({"combine": t.config.combine.name(),
            "members": t.config.members.iter().map(|m| json!({"name": m.name,
                "path": m.path.display().to_string(), "weight": m.weight, "dtype": m.dtype.name()})).collect::<Vec<_>>(),
            "vocab": t.reports.iter().map(|r| r.summary()).collect::<Vec<_>>()})),
        "plan": s.plan.as_ref().map(Plan::record),
    })
}

/// A budget's chosen set and its record: a budgeted store's set (`distill capture --budget`, when
/// it was chosen with the same budget and rule), else chosen now by the rule over the training
/// sequences (the student as it starts; for rad/kd3 the live teacher, never the store's or a
/// hybrid's signal, so that choosing writes nothing back).
fn choose_budget(
    cfg: &RunConfig,
    b: &crate::teacher::budget::Budget,
    student: &LoadedModel,
    teacher: Option<&LoadedModel>,
    vocab: &VocabMap,
    ds: &Dataset,
) -> Result<(crate::teacher::budget::BudgetState, Value)> {
    use crate::teacher::budget::{self, BudgetState, Chosen};
    let t0 = Instant::now();
    let mut other = None;
    if let Some(dir) = &cfg.teacher.store {
        if let Some(st) = budget::read_store_file(dir)? {
            if st.share == b.share && st.selection == b.selection.name() {
                let at = dir.join(budget::STORE_FILE);
                let mut set = BudgetState::from_keys(st.share, &st.selection, &st.keys, &ds.train)
                    .map_err(|m| Error::format(&at, m))?;
                set.check(b, &ds.train).map_err(|m| Error::format(&at, m))?;
                set.teacher_rows = 0;
                let chosen = Chosen {
                    chosen: set.chosen.clone(),
                    scores: None,
                };
                let rec = budget::record(
                    b,
                    ds.train.len(),
                    &chosen,
                    "store",
                    t0.elapsed().as_secs_f64(),
                );
                return Ok((set, rec));
            }
            other = Some(format!(
                "{}: the store's set was chosen with budget = {}, selection = {}",
                dir.display(),
                st.share,
                st.selection
            ));
        }
    }
    let live = teacher.map(|t| Live::new(&t.model).with_vocab(vocab));
    let chosen = budget::select(
        b,
        Some(&student.model),
        live.as_ref().map(|l| l as &dyn TeacherSignal),
        &ds.train,
        cfg.run.seed,
        cfg.optim.micro_batch,
    )
    .map_err(|e| {
        let why = other
            .as_deref()
            .map_or(String::new(), |o| format!(" ({o})"));
        Error::Invalid(format!("teacher.selection: {e}{why}"))
    })?;
    if let Some(o) = other {
        tracing::warn!("{o}; chosen anew");
    }
    let rec = budget::record(
        b,
        ds.train.len(),
        &chosen,
        "measured",
        t0.elapsed().as_secs_f64(),
    );
    Ok((BudgetState::new(b, &chosen.chosen, &ds.train), rec))
}

/// The teacher signal of the run: the live teacher, the store, or both (a hybrid); several
/// teachers combined (teacher/ensemble.rs).
fn signal<'a>(
    teacher: &'a Option<LoadedModel>,
    store: &'a Option<Store>,
    hybrid: &'a RefCell<HybridState>,
    vocab: &'a VocabMap,
    teachers: &'a Option<Teachers>,
) -> Box<dyn TeacherSignal + 'a> {
    let live = |t: &'a LoadedModel| Live::new(&t.model).with_vocab(vocab);
    match (teacher, store) {
        (Some(t), None) => match teachers {
            Some(e) => Box::new(e.signal(live(t))),
            None => Box::new(live(t)),
        },
        (None, Some(st)) => Box::new(StoreSignal::new(st, vocab)),
        (Some(t), Some(st)) => Box::new(Hybrid::new(st, live(t), hybrid, vocab)),
        (None, None) => unreachable!("the config asks for a teacher path or a store"),
    }
}

/// Of the sequences the run reads (validation, and the training sequences its `total` steps
/// visit; with a budget, the chosen ones), how many the store does not hold, of how many; and the
/// first missing one's place.
fn missing_sequences(
    store: &Store,
    ds: &Dataset,
    cfg: &RunConfig,
    total: usize,
    chosen: Option<&[usize]>,
) -> (usize, usize, Option<String>) {
    let needed = match chosen {
        Some(c) => ds
            .validation
            .iter()
            .chain(c.iter().map(|&i| &ds.train[i]))
            .collect(),
        None => crate::teacher::store::capture::plan(ds, cfg, Some(total)),
    };
    let mut seen = std::collections::HashSet::new();
    let (mut missing, mut distinct, mut first) = (0, 0, None);
    for (i, s) in needed.iter().enumerate() {
        let k = s.key();
        if !seen.insert(k) {
            continue;
        }
        distinct += 1;
        if !store.contains(k) {
            missing += 1;
            first.get_or_insert_with(|| {
                if i < ds.validation.len() {
                    format!("validation sequence {i}")
                } else {
                    "a training sequence of the run's steps".to_string()
                }
            });
        }
    }
    (missing, distinct, first)
}

/// Open the run's store and check that it belongs to this run: the teacher (when the run has one),
/// the tokenizer, template, seq_len and packing by name; with no teacher model, every sequence.
fn open_store(
    cfg: &RunConfig,
    dir: &Path,
    teacher: Option<&LoadedModel>,
    tok: &crate::model::Tokenizer,
    ds: &Dataset,
    total: usize,
    chosen: Option<&[usize]>,
) -> Result<Store> {
    let store = Store::open(dir)?;
    let at = dir.join("store.json");
    let mut now = store.header.identity.clone();
    if let (Some(_), Some(p)) = (teacher, &cfg.teacher.path) {
        now.teacher = teacher_hash(p, cfg.teacher.dtype.name())?;
    }
    now.tokenizer = tokenizer_hash(tok);
    now.chat_template = template_hash(tok);
    now.seq_len = cfg.data.seq_len;
    now.packing = cfg.data.packing;
    let differing = store.header.identity.differences(&now);
    if !differing.is_empty() {
        return Err(Error::format(
            &at,
            format!(
                "the store does not belong to this run: {}",
                differing.join("; ")
            ),
        ));
    }
    let (missing, needed, first) = missing_sequences(&store, ds, cfg, total, chosen);
    if missing > 0 && teacher.is_none() {
        return Err(Error::format(
            &at,
            format!(
                "data: {missing} of the {needed} sequences this run reads are not in the store (first: {}); capture them (`distill capture --append`) or give teacher.path for a hybrid run",
                first.unwrap_or_default()
            ),
        ));
    }
    if missing > 0 {
        tracing::info!(
            "the store holds {} of the {needed} sequences the run reads; the live teacher serves the rest",
            needed - missing
        );
    }
    Ok(store)
}

/// The validation metrics; over several processes each rank measures its share and the sums are
/// reduced (every rank gets the whole result).
fn evaluate(cfg: &RunConfig, s: &Setup) -> Result<DistillMetrics> {
    if let Some(t) = &s.teachers {
        t.shares.borrow_mut().take()?; // the validation set's shares only (read by eval_record)
    }
    metrics_of(cfg, s, &s.ds.validation)
}

/// Each source's validation metrics (`[[data.source]]`), in the sources' order.
fn source_metrics(cfg: &RunConfig, s: &Setup) -> Result<Vec<DistillMetrics>> {
    s.ds.sources
        .iter()
        .map(|src| metrics_of(cfg, s, &s.ds.validation[src.validation.clone()]))
        .collect()
}

/// The metrics of some validation sequences: over several processes each rank measures its share
/// and the sums are reduced, so that every rank holds the same values (DDK's weights agree).
fn metrics_of(cfg: &RunConfig, s: &Setup, seqs: &[data::Sequence]) -> Result<DistillMetrics> {
    let teacher = signal(&s.teacher, &s.store, &s.hybrid, &s.vocab, &s.teachers);
    if s.world.size == 1 {
        return distill_metrics(
            teacher.as_ref(),
            &s.student.model,
            seqs,
            cfg.optim.micro_batch,
        );
    }
    if seqs.is_empty() {
        return Err(Error::Invalid(
            "evaluation needs at least one validation sequence".into(),
        ));
    }
    let mine = parallel::eval_rows(&s.world, seqs.len());
    let sums = crate::eval::distill_sums(
        teacher.as_ref(),
        &s.student.model,
        &seqs[mine],
        cfg.optim.micro_batch / s.world.size,
    )?;
    parallel::reduce_sums(&s.world, sums)?.metrics()
}

/// The eval record; with `[onpolicy]`, also the exposure-bias measure (the teacher judging the
/// student's own continuations of the validation prompts) and the first two samples.
fn eval_record(cfg: &RunConfig, s: &Setup, step: usize, m: &DistillMetrics) -> Result<Value> {
    let mut rec = json!({"kind": "eval", "step": step, "student_ppl": m.student_ppl, "teacher_ppl": m.teacher_ppl,
           "kl": m.kl, "top1": m.top1, "tokens": m.tokens});
    // several teachers: each one's share of the signal and its own perplexity
    if let (Some(t), Some(first)) = (&s.teachers, &s.teacher) {
        rec["teachers"] = crate::teacher::ensemble::eval_record(
            t,
            Live::new(&first.model).with_vocab(&s.vocab),
            &s.student.model,
            &s.ds.validation,
            cfg.optim.micro_batch,
        )?;
    }
    // several sources: each one's validation data alone
    if !s.ds.sources.is_empty() {
        let mut per = serde_json::Map::new();
        for (src, m) in s.ds.sources.iter().zip(source_metrics(cfg, s)?) {
            per.insert(
                src.name.clone(),
                json!({"student_ppl": m.student_ppl, "teacher_ppl": m.teacher_ppl,
                    "kl": m.kl, "top1": m.top1, "tokens": m.tokens}),
            );
        }
        rec["sources"] = Value::Object(per);
    }
    // PACED: the student's pass rate on the validation problems
    if let (Some(p), Some(tok)) = (&s.paced, &s.student.tokenizer) {
        if let Some(rate) = p.validation_pass_rate(
            &s.student.model,
            tok,
            cfg.run.seed,
            &s.stop_ids,
            PACED_ROLLOUT_ROWS,
        )? {
            rec["paced_pass_rate"] = json!(rate);
        }
    }
    if let Some(o) = &cfg.onpolicy {
        let teacher = signal(&s.teacher, &s.store, &s.hybrid, &s.vocab, &s.teachers);
        let (om, samples) = o.evaluate(
            teacher.as_ref(),
            &s.student.model,
            &s.ds.validation,
            cfg.optim.micro_batch,
            cfg.run.seed,
            &s.stop_ids,
        )?;
        rec["onpolicy"] = json!({"student_ppl": om.student_ppl, "teacher_ppl": om.teacher_ppl,
            "kl": om.kl, "top1": om.top1, "tokens": om.tokens});
        if let Some(tok) = &s.student.tokenizer {
            let mut shown = vec![];
            for q in samples.iter().take(2) {
                let p = o.prompt_len(q).min(q.ids.len());
                let n = p + q.counted();
                shown.push(json!({"prompt": tok.decode(&q.ids[..p], false)?,
                    "sample": tok.decode(&q.ids[p..n.min(q.ids.len())], false)?}));
            }
            rec["samples"] = json!(shown);
        }
    }
    Ok(rec)
}

// ---------------------------------------------------------------- 3. steps

/// Rows per batched generation of PACED's rollouts (whole problems per call).
const PACED_ROLLOUT_ROWS: usize = 64;

fn progress_bar(total: usize, at: usize) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    b.set_position(at as u64);
    b
}

/// The optimizer steps; returns the last evaluation, if any.
fn steps(
    cfg: &RunConfig,
    opts: &TrainOptions,
    s: &mut Setup,
    out: &mut RunOutput,
) -> Result<Option<DistillMetrics>> {
    let total = s.state.total_steps;
    let names = s.objective.names().to_vec();
    let faults = Faults::from_env();
    let device = cfg.run.device;
    let bar = (opts.progress && s.world.is_main()).then(|| progress_bar(total, s.state.step));
    // the chunk `[run] max_memory` chose (recorded, so a resume keeps it), else the configured one
    let chunk = s
        .state
        .loss_chunk
        .or((cfg.optim.loss_chunk > 0).then_some(cfg.optim.loss_chunk));
    let mut last_eval = None;
    while s.state.step < total {
        let step = s.state.step + 1;
        // a run in stages: the cut before the stage's first step
        if let Some(k) = s
            .staged
            .as_ref()
            .and_then(|st| st.due(s.state.step, s.state.stages.as_ref()))
        {
            enter_stage(cfg, s, out, k)?;
            faults.entered_stage(k);
        }
        // PACED: the pass rates, before the first step and every `refresh_every` steps
        if let Some(p) = s.paced.as_mut() {
            if p.due(s.state.paced.as_ref(), s.state.step) {
                let t = Instant::now();
                let tok = s.student.tokenizer.as_ref().ok_or_else(|| {
                    Error::format(&s.student.source, "the student has no tokenizer")
                })?;
                let table = p.measure(
                    &s.student.model,
                    tok,
                    cfg.run.seed,
                    s.state.step,
                    &s.stop_ids,
                    PACED_ROLLOUT_ROWS,
                )?;
                let uniform = p.apply(&table)?;
                if uniform {
                    tracing::warn!(
                        "paced: every problem has weight 0 (pass rates all 0 or 1): uniform weights until the next refresh"
                    );
                }
                out.metric(&p.record(&table, uniform, t.elapsed().as_secs_f64()))?;
                s.state.paced = Some(table);
            }
        }
        // DDK: the sources' weights from the student–teacher gap, before the first step and every
        // `interval` steps (data/ddk.rs)
        if let Some(d) = cfg.data.ddk {
            if d.due(s.state.step, s.mixture.as_ref().and_then(|m| m.ddk_step)) {
                let per = source_metrics(cfg, s)?;
                let ppl: Vec<(f64, f64)> =
                    per.iter().map(|m| (m.student_ppl, m.teacher_ppl)).collect();
                let m = s
                    .mixture
                    .as_mut()
                    .expect("[data.ddk] needs [[data.source]]");
                let previous = m.weights.clone();
                match d.update(&m.weights, &ppl) {
                    Some(w) => m.weights = w,
                    None => tracing::warn!(
                        "ddk: a perplexity is not finite ({ppl:?}); the weights stay"
                    ),
                }
                m.ddk_step = Some(s.state.step);
                s.state.mixture = Some(m.state());
                let ratios: Vec<f64> = ppl.iter().map(|(a, b)| a / b).collect();
                let names: Vec<&str> = s.ds.sources.iter().map(|x| x.name.as_str()).collect();
                out.metric(&json!({"kind": "ddk", "step": step, "sources": names,
                    "weights": m.weights, "previous": previous, "discrepancies": ratios,
                    "student_ppl": ppl.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "teacher_ppl": ppl.iter().map(|p| p.1).collect::<Vec<_>>()}))?;
            }
        }
        let t0 = Instant::now();
        s.objective.begin_step(step); // terms outside their `steps` window count nothing
        s.opt.zero_grad();
        let (mut loss, mut parts, mut finite, mut tokens) =
            (0.0, vec![0.0; names.len()], true, 0usize);
        #[allow(unused_mut)]
        let mut step_opts = StepOptions::new(chunk, 1.0 / cfg.optim.grad_accum as f64);
        #[cfg(feature = "fault-injection")]
        {
            step_opts.poison = faults.poison(step);
        }
        let teacher = signal(&s.teacher, &s.store, &s.hybrid, &s.vocab, &s.teachers);
        if let Some(t) = &s.teachers {
            t.shares.borrow_mut().take()?; // this step's shares only
        }
        let on_policy = cfg
            .onpolicy
            .as_ref()
            .filter(|o| o.is_on_policy(cfg.run.seed, step));
        // micro-batches by source: fresh student samples, replayed ones, the data's
        let mut sources = [0usize; 3];
        let mut source_rows = vec![0usize; s.ds.sources.len()];
        let (mut teacher_rows, mut unselected_ce) = (0usize, 0.0);
        for micro in 0..cfg.optim.grad_accum {
            let mut rows = match s.mixture.as_mut() {
                Some(m) => m.next_batch(cfg.optim.micro_batch, cfg.run.seed, step, micro),
                None => s.sampler.next_batch(cfg.optim.micro_batch),
            };
            if let Some(b) = &s.budget {
                rows = b.rows(rows); // skip: the sampler's indices are into the chosen set
            }
            let source = match (&s.distillm, on_policy) {
                (Some(a), _) => a.source(cfg.run.seed, step, micro, total),
                (None, Some(_)) => Source::Fresh,
                (None, None) => Source::Data,
            };
            sources[source as usize] += 1;
            // the data's rows per source (a replay trains on the buffer's samples instead)
            for &r in rows.iter().filter(|_| source != Source::Replay) {
                if let Some(i) = s.ds.sources.iter().position(|x| x.train.contains(&r)) {
                    source_rows[i] += 1;
                }
            }
            // several processes: this rank's share of the global micro-batch, its backward scaled
            // by its share of the weight (train/parallel.rs)
            let (rows, share) = parallel::my_rows(&s.world, &s.ds.train, &rows)?;
            let mut batch = match (source, &cfg.onpolicy) {
                // the rows' prompts continued by the student, scored by the teacher
                (Source::Fresh, Some(o)) => {
                    let samples = o.samples(
                        &s.student.model,
                        &s.ds.train,
                        &rows,
                        cfg.run.seed,
                        step,
                        micro,
                        &s.stop_ids,
                    )?;
                    if let Some(a) = s.distillm.as_mut() {
                        a.push(&samples);
                    }
                    let idx: Vec<usize> = (0..samples.len()).collect();
                    let mut b = Batch::new(&samples, &idx, device)?;
                    b.rows = rows.clone();
                    b
                }
                (Source::Replay, _) => {
                    let a = s.distillm.as_ref().expect("replay is the adaptive mode's");
                    let picked = a.pick(cfg.optim.micro_batch, cfg.run.seed, step, micro);
                    Batch::new(&a.buffer, &picked, device)?
                }
                _ => Batch::new(&s.ds.train, &rows, device)?, // (B, T)
            };
            // PACED: each row's tokens weighted by its problem's w, the value by Σ w·m / Σ m
            let mut micro_opts = step_opts;
            micro_opts.scale *= share;
            if let Some(p) = &s.paced {
                micro_opts.scale *= p.weigh(&mut batch)?;
            }
            tokens += batch.counted();
            let m = match &s.budget {
                // the chosen rows with the objective and the teacher, the others with CE alone
                Some(b) => {
                    let r = b.micro_step(
                        &s.student.model,
                        teacher.as_ref(),
                        &s.objective,
                        &s.ds.train,
                        &batch,
                        &micro_opts,
                    )?;
                    teacher_rows += r.teacher_rows;
                    unselected_ce += r.unselected_ce;
                    r.step
                }
                None => micro_step(
                    &s.student.model,
                    Some(teacher.as_ref()),
                    &s.objective,
                    &batch,
                    &micro_opts,
                )?,
            };
            if !m.finite {
                finite = false;
                continue; // keep drawing the step's micro-batches: the data position stays on schedule
            }
            loss += m.loss;
            for (p, v) in parts.iter_mut().zip(&m.parts) {
                *p += v;
            }
        }
        // several processes: the gradients and the logged values summed across the ranks
        let reduced = parallel::reduce_step(&s.world, &s.opt, loss, &parts, tokens, finite)?;
        let (loss, parts, tokens, finite) =
            (reduced.loss, reduced.parts, reduced.tokens, reduced.finite);
        let grad_norm = match (finite, cfg.optim.grad_clip) {
            (false, _) => f64::NAN,
            (true, Some(c)) => s.opt.clip(c)?,
            (true, None) => s.opt.grad_norm()?,
        };
        let lr = lr_at(&cfg.optim, step, total);
        let skipped = !(finite && grad_norm.is_finite());
        if skipped {
            s.opt.zero_grad();
            s.state.skipped_steps += 1;
            tracing::warn!(
                "step {step}: non-finite loss or gradient; step skipped (weights unchanged)"
            );
        } else {
            s.opt.step(lr)?;
            s.objective.after_step(&parts, step);
        }
        s.state.step = step;
        s.state.adam_t = s.opt.t;
        s.state.sampler = s.sampler.state;
        s.state.mixture = s.mixture.as_ref().map(Mixture::state);
        s.state.objective = s.objective.state();
        s.state.tokens_seen += tokens as u64;
        s.state.distillm = s.distillm.as_ref().map(Adaptive::state);
        if let Some(b) = s.state.budget.as_mut() {
            b.teacher_rows += teacher_rows as u64;
        }
        let secs = t0.elapsed().as_secs_f64();
        if step.is_multiple_of(cfg.run.log_every) || step == total {
            let mut rec = json!({"kind": "train", "step": step, "loss": if skipped { Value::Null } else { json!(loss) },
                "lr": lr, "grad_norm": if grad_norm.is_finite() { json!(grad_norm) } else { Value::Null },
                "tokens_per_s": tokens as f64 / secs, "seconds": secs, "skipped": skipped, "skipped_total": s.state.skipped_steps});
            for (i, (n, p)) in names.iter().zip(&parts).enumerate() {
                // a term outside its step window is logged as null
                rec[n] = if skipped || !s.objective.active(i) {
                    Value::Null
                } else {
                    json!(p)
                };
            }
            for (name, values) in s.objective.log_values() {
                rec[name] = json!(values);
            }
            // the process's resident high-water mark so far (Linux; train/plan.rs predicts it)
            rec["peak_rss_mib"] = json!(crate::bench::peak_rss_mib());
            if s.teacher.is_some() && s.store.is_some() {
                rec["store_fraction"] = json!(s.hybrid.borrow().store_fraction());
            }
            match &s.distillm {
                Some(a) => {
                    rec["sources"] =
                        json!({"fresh": sources[0], "replay": sources[1], "data": sources[2]});
                    rec["sgo_probability"] = json!(a.phi);
                    rec["replay_buffer"] = json!(a.buffer.len());
                }
                None if cfg.onpolicy.is_some() => rec["on_policy"] = json!(on_policy.is_some()),
                None => {}
            }
            if let Some(st) = &s.state.stages {
                rec["stage"] = json!(st.stage);
            }
            if let Some(t) = &s.teachers {
                rec["teacher_shares"] = json!(t.shares.borrow_mut().take()?);
            }
            if !source_rows.is_empty() {
                rec["source_rows"] = json!(source_rows);
            }
            if let Some(t) = reduced.all_reduce_seconds {
                // rank 0's wait in the gradients' all-reduce (includes waiting for slower ranks)
                rec["all_reduce_seconds"] = json!(t);
                rec["processes"] = json!(s.world.size);
            }
            if let Some(b) = &s.state.budget {
                // rows sent to the teacher at this step and so far (evaluations not counted)
                rec["teacher_rows"] = json!(teacher_rows);
                rec["teacher_rows_total"] = json!(b.teacher_rows);
                rec["unselected_ce"] = json!(unselected_ce);
            }
            out.metric(&rec)?;
        }
        if let Some(b) = &bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4} {:.0} tok/s", tokens as f64 / secs));
        }
        if step == total || (cfg.run.eval_every > 0 && step.is_multiple_of(cfg.run.eval_every)) {
            let m = evaluate(cfg, s)?;
            tracing::info!(
                "step {step}: student ppl {:.2}, KL {:.4}, top-1 {:.3}",
                m.student_ppl,
                m.kl,
                m.top1
            );
            if let Some(a) = s.distillm.as_mut() {
                a.after_eval(m.student_ppl.ln());
                s.state.distillm = Some(a.state());
            }
            let mut rec = eval_record(cfg, s, step, &m)?;
            if let Some(a) = &s.distillm {
                rec["sgo_probability"] = json!(a.phi);
            }
            out.metric(&rec)?;
            last_eval = Some(m);
        }
        if step == total
            || (cfg.run.checkpoint_every > 0 && step.is_multiple_of(cfg.run.checkpoint_every))
        {
            // rows written back so far reach the store before the checkpoint that has read them
            if let Some(w) = s.hybrid.borrow_mut().writer.as_mut() {
                w.flush()?;
            }
            out.checkpoint(
                &s.student,
                &projection_files(&s.projections),
                &replay_files(&s.distillm),
                &s.opt,
                &s.state,
                cfg.run.keep_last,
            )?;
        }
        faults.after_step(step);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(last_eval)
}

/// Enter stage `k` of a run in stages (train/stages.rs): measure and cut the student, slice the
/// optimizer, re-wire the hidden terms, evaluate the cut student and record it.
fn enter_stage(cfg: &RunConfig, s: &mut Setup, out: &mut RunOutput, k: usize) -> Result<()> {
    let staged = s.staged.as_ref().expect("a run in stages");
    let stage = &staged.stages.stages[k - 1];
    let (first, last) = staged.stages.span(k);
    let before = match &s.state.stages {
        Some(st) => st.layers.clone(),
        None => staged.initial.clone(),
    };
    let t0 = Instant::now();
    let c = student::ppcl::choose(
        &s.student.model,
        &before,
        stage,
        staged.stages.keep_ends,
        &staged.windows,
    )
    .map_err(|e| Error::Invalid(format!("student.stage.{}: {e}", k - 1)))?;
    let measured = t0.elapsed().as_secs_f64();
    // the removed run's score, per measurement (null where removal was of separate layers)
    let scores: Vec<Option<f64>> = c
        .pruning
        .rounds
        .iter()
        .map(|r| {
            r.candidates
                .iter()
                .find(|x| x.layers == r.removed)
                .map(|x| x.d)
        })
        .collect();
    let strategy = stage.strategy.name();
    let device = cfg.run.device;
    let student = stages::cut(&s.student, &c.kept, device)?;
    let mut projections = match &s.teacher {
        Some(t) if !s.objective.hidden_terms().is_empty() => hidden::wire(
            &mut s.objective,
            &cfg.losses,
            &student.model.config,
            &t.model.config,
            Some(&c.layers),
            cfg.run.seed,
            device,
        )?,
        _ => None,
    };
    // projections (only between widths that differ) keep their trained values
    if let (Some(new), Some(old)) = (projections.as_mut(), s.projections.as_ref()) {
        new.vs.copy(&old.vs)?;
    }
    s.opt = stages::slice_optimizer(
        &s.opt,
        &c.kept,
        &student.vs,
        projections.as_ref().map(|p| &p.vs),
        &cfg.optim,
    )?;
    s.student = student;
    s.projections = projections;
    s.state.stages = Some(StageState {
        stage: k,
        layers: c.layers.clone(),
    });
    let m = evaluate(cfg, s)?;
    let line = format!(
        "stage {k}: {} → {} layers, removed teacher layers {:?} ({strategy}, measured in {measured:.1}s); steps {first}–{last}; cut student ppl {:.2}, KL {:.4}",
        before.len(),
        c.layers.len(),
        c.removed,
        m.student_ppl,
        m.kl
    );
    tracing::info!("{line}");
    out.metric(
        &json!({"kind": "stage", "step": first, "stage": k, "first_step": first,
        "last_step": last, "layers_before": before, "removed": c.removed, "layers": c.layers,
        "strategy": strategy, "d": scores, "measure_seconds": measured,
        "student_ppl": m.student_ppl, "teacher_ppl": m.teacher_ppl, "kl": m.kl, "top1": m.top1,
        "tokens": m.tokens,
        "hidden_layers": s.objective.hidden_maps().into_iter().map(|m| json!({
            "term": m.term, "pairs": m.pairs, "projection": m.projected})).collect::<Vec<_>>()}),
    )?;
    Ok(())
}

// ---------------------------------------------------------------- 4. write-out

fn write_out(
    cfg: &RunConfig,
    s: &Setup,
    out: &mut RunOutput,
    before: Option<DistillMetrics>,
    last_eval: Option<DistillMetrics>,
    started: Instant,
) -> Result<TrainSummary> {
    let after = match last_eval {
        Some(m) => m,
        None => evaluate(cfg, s)?,
    };
    out.save_student(&s.student)?;
    for (file, tensors) in projection_files(&s.projections) {
        out.save_tensors(file, &tensors)?; // beside student/, never inside it
    }
    if let Some(w) = s.hybrid.borrow_mut().writer.take() {
        let h = w.finish()?;
        tracing::info!(
            "write-back: the store now holds {} sequences",
            h.sequences()
        );
    }
    let (teacher_tps, student_tps) = forward_speeds(s, cfg.optim.micro_batch)?;
    let seconds = started.elapsed().as_secs_f64();
    out.metric(&json!({"kind": "summary", "step": s.state.step, "skipped_steps": s.state.skipped_steps,
        "seconds": seconds, "teacher_tokens_per_s": teacher_tps, "student_tokens_per_s": student_tps}))?;
    let records = out.write_report()?;
    let teacher_after = match &s.teacher {
        Some(t) => weight_checksums(&t.vs)?,
        None => vec![],
    };
    if teacher_after != s.teacher_checksum {
        return Err(Error::Invalid(
            "internal error: the teacher's weights changed during training (they are frozen)"
                .into(),
        ));
    }
    // a resumed run's "before" is in the records of the run it continues
    let before = before.or_else(|| {
        records
            .iter()
            .find(|r| r["kind"] == "eval" && r["step"] == 0)
            .and_then(|r| serde_json::from_value::<DistillMetrics>(r.clone()).ok())
    });
    Ok(TrainSummary {
        output: out.dir().to_path_buf(),
        steps: s.state.total_steps,
        skipped_steps: s.state.skipped_steps,
        before,
        after,
        seconds,
        teacher_checksums: (s.teacher_checksum.clone(), teacher_after),
    })
}

/// DistiLLM's replay buffer as a file of the checkpoint (none without it or when empty).
fn replay_files(a: &Option<Adaptive>) -> Vec<(&'static str, Vec<u8>)> {
    a.iter()
        .filter(|a| !a.buffer.is_empty())
        .map(|a| (distillm::FILE, a.buffer_json()))
        .collect()
}

/// The projections as a file of the checkpoint and of the output folder (none without them).
fn projection_files(p: &Option<Projections>) -> Vec<(&'static str, Vec<(String, tch::Tensor)>)> {
    p.iter().map(|p| (hidden::FILE, p.tensors())).collect()
}

/// Tokens per second of one forward pass over a validation batch: (teacher, student); the
/// teacher's is None when the run has no live teacher.
fn forward_speeds(s: &Setup, batch: usize) -> Result<(Option<f64>, f64)> {
    let rows: Vec<usize> = (0..s.ds.validation.len().min(batch.max(1))).collect();
    let b = Batch::new(&s.ds.validation, &rows, s.student.model.device())?;
    let n = b.ids.numel() as f64;
    let time = |m: &LoadedModel, ids: &tch::Tensor| -> Result<f64> {
        let _ = tch::no_grad(|| m.model.forward(ids))?; // warm-up
        let t = Instant::now();
        let _ = tch::no_grad(|| m.model.forward(ids))?;
        Ok(n / t.elapsed().as_secs_f64())
    };
    let teacher = match &s.teacher {
        Some(t) => Some(time(t, &s.vocab.teacher_ids(&b.ids)?)?),
        None => None,
    };
    Ok((teacher, time(&s.student, &b.ids)?))
}
