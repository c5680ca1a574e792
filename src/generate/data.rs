//! `distill generate-data`: training data written by the teacher. For each prompt of a prompt file
//! the teacher samples `samples` answers (batched, `batch` prompts at a time, sample k at the
//! schedule's temperature τ_k), teacher and student score each answer teacher-forced, and the
//! `keep` answers the student is furthest from survive (divergence-aware selection, `dasd.rs`);
//! with `rationale_template` the answers are rationales for labelled examples, written as the two
//! tasks of distilling step-by-step (`step_by_step.rs`). Out: JSONL that `distill train` reads
//! unchanged ({"prompt", "response"}, or {"messages"} for chat prompts), each record with how its
//! answer was made (line, sample, temperature, top_p, seed, row_seed, tokens, finish,
//! teacher_logp, student_logp, score).
//!
//! Resumable after a kill: sample k of prompt i is drawn from row_seed(seed, i, k), and the batches
//! are fixed by prompt index ([0, batch), [batch, 2·batch), …), so any batch's records are a
//! function of the run file alone. Records are appended a whole batch at a time (one write, then
//! fsync); `--resume` drops a torn last line and any batch whose records are not all there, and
//! goes on from the next batch: the file then ends exactly as an uninterrupted run's. (The file is
//! appended to, not replaced atomically: a reader may see a partial last batch while it runs.)
use super::{dasd, generate_batch, step_by_step, Finish, GenerateOptions, SplitMix64};
use crate::config::{issue, Checked, Paths};
use crate::data::{jsonl, prompts};
use crate::model::{LoadedModel, Message, Tokenizer};
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

/// `[generate_data]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateDataFile {
    /// a prompt file ({"prompt"} or {"messages"}, optionally "answer")
    pub prompts: Option<PathBuf>,
    /// the JSONL to write
    pub out: Option<PathBuf>,
    /// wrap {"prompt"} records as a user turn of the chat template (default false)
    pub chat: Option<bool>,
    /// teacher samples per prompt (default 4)
    pub samples: Option<usize>,
    /// the temperature schedule across a prompt's samples: [τ] or [τ_first, τ_last] (default [1])
    pub temperatures: Option<Vec<f64>>,
    /// nucleus (default 1)
    pub top_p: Option<f64>,
    /// tokens per answer at most (default 128)
    pub max_new_tokens: Option<usize>,
    /// prompts generated together (default 8)
    pub batch: Option<usize>,
    /// answers per prompt kept by divergence-aware selection (default 1)
    pub keep: Option<usize>,
    /// the sampling seed (default: run.seed)
    pub seed: Option<u64>,
    /// distilling step-by-step: the teacher's prompt for a rationale, with {input} and {label}
    pub rationale_template: Option<String>,
    /// λ: the weight of the rationale records (default 1)
    pub rationale_weight: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateData {
    pub prompts: PathBuf,
    pub out: PathBuf,
    pub chat: bool,
    pub samples: usize,
    pub temperatures: Vec<f64>,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub batch: usize,
    pub keep: usize,
    pub seed: u64,
    pub rationale: Option<Rationale>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rationale {
    pub template: String,
    pub weight: f64,
}

impl GenerateDataFile {
    /// Checked, with defaults; `run_seed` is the run's seed.
    pub fn resolve(&self, paths: &Paths, run_seed: u64) -> Checked<GenerateData> {
        let key = |k: &str| format!("generate_data.{k}");
        let prompts = self
            .prompts
            .as_deref()
            .ok_or_else(|| issue(key("prompts"), "missing: the prompt file (JSONL)"))?;
        let out = self
            .out
            .as_deref()
            .ok_or_else(|| issue(key("out"), "missing: the JSONL file to write"))?;
        let samples = self.samples.unwrap_or(4);
        if !(1..=4096).contains(&samples) {
            return Err(issue(key("samples"), "must be in [1, 4096]"));
        }
        let temperatures = self.temperatures.clone().unwrap_or_else(|| vec![1.0]);
        if !(1..=2).contains(&temperatures.len()) {
            return Err(issue(
                key("temperatures"),
                "give [τ] or [τ_first, τ_last] (linear across a prompt's samples)",
            ));
        }
        if temperatures.iter().any(|t| !(t.is_finite() && *t >= 0.0)) {
            return Err(issue(key("temperatures"), "must be ≥ 0 (0 = greedy)"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(issue(key("top_p"), "must be in (0, 1]"));
        }
        let max_new_tokens = self.max_new_tokens.unwrap_or(128);
        if max_new_tokens == 0 {
            return Err(issue(key("max_new_tokens"), "must be at least 1"));
        }
        let batch = self.batch.unwrap_or(8);
        if !(1..=65536).contains(&batch) {
            return Err(issue(key("batch"), "must be in [1, 65536]"));
        }
        let keep = self.keep.unwrap_or(1);
        if keep == 0 || keep > samples {
            return Err(issue(
                key("keep"),
                format!("must be in [1, samples = {samples}]"),
            ));
        }
        let rationale = match (&self.rationale_template, self.rationale_weight) {
            (None, Some(_)) => {
                return Err(issue(
                    key("rationale_weight"),
                    "goes with rationale_template (distilling step-by-step)",
                ))
            }
            (None, None) => None,
            (Some(t), w) => {
                if let Some(p) = step_by_step::PLACES.iter().find(|p| !t.contains(*p)) {
                    return Err(issue(
                        key("rationale_template"),
                        format!("must hold {p} (the places are {{input}} and {{label}})"),
                    ));
                }
                let weight = w.unwrap_or(1.0);
                if !(weight.is_finite() && weight >= 0.0) {
                    return Err(issue(key("rationale_weight"), "must be a number ≥ 0"));
                }
                Some(Rationale {
                    template: t.clone(),
                    weight,
                })
            }
        };
        Ok(GenerateData {
            prompts: paths.resolve(prompts),
            out: paths.resolve(out),
            chat: self.chat.unwrap_or(false),
            samples,
            temperatures,
            top_p,
            max_new_tokens,
            batch,
            keep,
            seed: self.seed.unwrap_or(run_seed),
            rationale,
        })
    }
}

/// The seed of sample `k` of prompt `index`: a SplitMix64 draw of (seed, index, k).
pub fn row_seed(seed: u64, index: usize, k: usize) -> u64 {
    let a = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
    SplitMix64::new(a ^ (k as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// What one prompt becomes in the output.
#[derive(Debug, Clone)]
enum Form {
    /// {"prompt", "response"}
    Plain(String),
    /// {"messages"} with the answer as the last, assistant, turn
    Chat(Vec<Message>),
    /// distilling step-by-step's two tasks
    StepByStep { input: String, label: String },
}

/// One prompt of the file: what the teacher reads, and what the records say.
#[derive(Debug, Clone)]
pub struct Task {
    /// the file's line (from 1)
    pub line: usize,
    /// the teacher's prompt
    pub ids: Vec<u32>,
    form: Form,
}

/// The prompts of `g.prompts` as the teacher reads them (errors: `file:line: …`).
pub fn read_tasks(g: &GenerateData, tok: &Tokenizer) -> Result<Vec<Task>> {
    // every record checked and tokenised as `distill generate` reads it
    let ps = prompts::read(&g.prompts, tok, g.chat)?;
    let raw: Vec<Value> = jsonl::records(&g.prompts, |_, v| Ok(v.clone()))?;
    let file = g.prompts.display();
    let mut out = Vec::with_capacity(ps.len());
    for (p, v) in ps.into_iter().zip(raw) {
        let task = match &g.rationale {
            Some(r) => {
                let (Some(input), Some(label)) = (
                    v.get("prompt").and_then(Value::as_str),
                    v.get("answer").and_then(Value::as_str),
                ) else {
                    return Err(Error::Invalid(format!(
                        "{file}:{}: generate_data.rationale_template needs {{\"prompt\", \"answer\"}} records (the input and its label)",
                        p.line
                    )));
                };
                let text = step_by_step::fill(&r.template, input, label);
                let ids = if g.chat {
                    let m = [Message {
                        role: "user".into(),
                        content: text,
                    }];
                    tok.encode(&tok.apply_chat_template(&m, true)?, false)?
                } else {
                    tok.encode(&text, true)?
                };
                Task {
                    line: p.line,
                    ids,
                    form: Form::StepByStep {
                        input: input.to_string(),
                        label: label.to_string(),
                    },
                }
            }
            None => {
                let form = match (v.get("messages"), v.get("prompt").and_then(Value::as_str)) {
                    (Some(m), _) => Form::Chat(
                        serde_json::from_value(m.clone())
                            .map_err(|e| Error::Invalid(format!("{file}:{}: {e}", p.line)))?,
                    ),
                    (None, Some(s)) if g.chat => Form::Chat(vec![Message {
                        role: "user".into(),
                        content: s.to_string(),
                    }]),
                    _ => Form::Plain(p.text.clone()),
                };
                Task {
                    line: p.line,
                    ids: p.ids,
                    form,
                }
            }
        };
        if task.ids.is_empty() {
            return Err(Error::Invalid(format!(
                "{file}:{}: the prompt has no tokens",
                task.line
            )));
        }
        out.push(task);
    }
    Ok(out)
}

/// One answer of a batch: what the teacher wrote, and how it scored.
struct Answer {
    sample: usize,
    temperature: f64,
    row_seed: u64,
    text: String,
    tokens: usize,
    finish: Finish,
    teacher_logp: f64,
    student_logp: f64,
}

impl Answer {
    fn score(&self) -> f64 {
        self.teacher_logp - self.student_logp
    }
}

/// What a run did (this session's prompts only, on a resume).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub prompts: usize,
    /// prompts already in the file when a resumed run started
    pub resumed_at: usize,
    pub answers: usize,
    pub kept: usize,
    pub new_tokens: usize,
    /// mean score of every answer, and of the kept ones
    pub mean_score_all: f64,
    pub mean_score_kept: f64,
    pub seconds: f64,
}

/// Records per prompt in the output.
fn per_prompt(g: &GenerateData) -> usize {
    g.keep + usize::from(g.rationale.is_some())
}

/// How many prompts of `tasks` `out` holds in whole batches, after cutting it back to their end
/// (a torn line, a partial batch dropped).
fn resume_point(g: &GenerateData, tasks: &[Task]) -> Result<usize> {
    let bytes = match crate::io::metadata(&g.out)? {
        Some(_) => crate::io::read(&g.out)?,
        None => return Ok(0),
    };
    let index_of: HashMap<usize, usize> =
        tasks.iter().enumerate().map(|(i, t)| (t.line, i)).collect();
    let r = per_prompt(g);
    let (mut done, mut keep_bytes, mut in_batch, mut at) = (0usize, 0usize, 0usize, 0usize);
    let mut n = 0usize;
    // complete lines only: a last line without its newline is torn
    while let Some(len) = bytes[at..].iter().position(|&b| b == b'\n') {
        let line = &bytes[at..at + len];
        n += 1;
        at += len + 1;
        let bad = |msg: String| Error::Invalid(format!("{}:{n}: {msg}", g.out.display()));
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            // a torn write followed by nothing: only possible as the last line
            Err(_) if at == bytes.len() => break,
            Err(e) => return Err(bad(format!("not valid JSON: {e} (use --overwrite)"))),
        };
        let index = v
            .get("line")
            .and_then(Value::as_u64)
            .and_then(|l| index_of.get(&(l as usize)).copied())
            .ok_or_else(|| {
                bad(format!(
                    "not a record of {} (no \"line\" of it): use --overwrite to start again",
                    g.prompts.display()
                ))
            })?;
        let end = (done + g.batch).min(tasks.len());
        if !(done..end).contains(&index) {
            return Err(bad(format!(
                "a record of prompt line {} out of order: use --overwrite to start again",
                v["line"]
            )));
        }
        in_batch += 1;
        if in_batch == r * (end - done) {
            done = end;
            keep_bytes = at;
            in_batch = 0;
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&g.out)
        .map_err(|e| Error::io(&g.out, e))?;
    f.set_len(keep_bytes as u64)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&g.out, e))?;
    Ok(done)
}

/// The fault hook of the resume test: `DISTILL_FAULT_DIE_AFTER_PROMPTS=N` SIGKILLs the process once
/// a batch reaching N prompts is written (only with the `fault-injection` feature).
fn after_batch(_done: usize) {
    #[cfg(feature = "fault-injection")]
    if let Some(n) = std::env::var("DISTILL_FAULT_DIE_AFTER_PROMPTS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        if _done >= n {
            // SAFETY: sends SIGKILL to this process; nothing runs after it
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

/// Write `g.out` from `teacher` (sampling, scoring) and `student` (scoring). `resume` continues a
/// file, `overwrite` replaces it; with neither an existing file is refused. `stop_ids` end an
/// answer (the first is scored as its last token, as training appends it).
pub fn run(
    g: &GenerateData,
    teacher: &LoadedModel,
    student: &LoadedModel,
    stop_ids: &[u32],
    resume: bool,
    overwrite: bool,
) -> Result<Summary> {
    let started = std::time::Instant::now();
    let tok = teacher
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::format(&teacher.source, "the teacher has no tokenizer"))?;
    let tasks = read_tasks(g, tok)?;
    let context = teacher
        .model
        .config
        .max_position_embeddings
        .min(student.model.config.max_position_embeddings);
    if let Some(t) = tasks
        .iter()
        .find(|t| t.ids.len() + g.max_new_tokens + 1 > context)
    {
        return Err(Error::Invalid(format!(
            "{}:{}: the prompt's {} tokens and generate_data.max_new_tokens = {} (+1 for the end) exceed the models' context of {context}",
            g.prompts.display(),
            t.line,
            t.ids.len(),
            g.max_new_tokens
        )));
    }
    let vocab = teacher
        .model
        .config
        .vocab_size
        .min(student.model.config.vocab_size);
    let exists = crate::io::metadata(&g.out)?.is_some();
    if exists && !resume && !overwrite {
        return Err(Error::Invalid(format!(
            "generate_data.out = {}: exists; pass --resume to continue it or --overwrite to replace it",
            g.out.display()
        )));
    }
    if let Some(dir) = g.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let start = if resume { resume_point(g, &tasks)? } else { 0 };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&g.out)
        .map_err(|e| Error::io(&g.out, e))?;
    if !resume {
        file.set_len(0).map_err(|e| Error::io(&g.out, e))?;
    }
    let mut s = Summary {
        resumed_at: start,
        ..Summary::default()
    };
    let (mut sum_all, mut sum_kept) = (0.0f64, 0.0f64);
    let first_batch = start / g.batch;
    for (c, chunk) in tasks.chunks(g.batch).enumerate().skip(first_batch) {
        let base = c * g.batch;
        let answers = answer_batch(g, teacher, student, tok, chunk, base, stop_ids, vocab)?;
        let mut text = String::new();
        for (task, answers) in chunk.iter().zip(&answers) {
            let scores: Vec<f64> = answers.iter().map(Answer::score).collect();
            let kept = dasd::select(&scores, g.keep);
            sum_all += scores.iter().sum::<f64>();
            sum_kept += kept.iter().map(|&k| scores[k]).sum::<f64>();
            s.answers += answers.len();
            s.kept += kept.len();
            s.new_tokens += answers.iter().map(|a| a.tokens).sum::<usize>();
            if let Form::StepByStep { input, label } = &task.form {
                let mut rec = step_by_step::label_record(input, label);
                rec["line"] = json!(task.line);
                text += &format!("{rec}\n");
            }
            for &k in &kept {
                text += &format!("{}\n", record(g, task, &answers[k]));
            }
        }
        file.write_all(text.as_bytes())
            .and_then(|_| file.flush())
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::io(&g.out, e))?;
        s.prompts += chunk.len();
        tracing::info!(
            "generate-data: {}/{} prompts written",
            base + chunk.len(),
            tasks.len()
        );
        after_batch(base + chunk.len());
    }
    s.mean_score_all = sum_all / s.answers.max(1) as f64;
    s.mean_score_kept = sum_kept / s.kept.max(1) as f64;
    s.seconds = started.elapsed().as_secs_f64();
    Ok(s)
}

/// Every sample of every prompt of `chunk` (prompt indices from `base`), scored.
#[allow(clippy::too_many_arguments)]
fn answer_batch(
    g: &GenerateData,
    teacher: &LoadedModel,
    student: &LoadedModel,
    tok: &Tokenizer,
    chunk: &[Task],
    base: usize,
    stop_ids: &[u32],
    vocab: usize,
) -> Result<Vec<Vec<Answer>>> {
    let ids: Vec<Vec<u32>> = chunk.iter().map(|t| t.ids.clone()).collect();
    let mut out: Vec<Vec<Answer>> = chunk.iter().map(|_| Vec::new()).collect();
    let at = |m: String| {
        Error::Invalid(format!(
            "{}: prompts of lines {}..={}: {m}",
            g.prompts.display(),
            chunk[0].line,
            chunk[chunk.len() - 1].line
        ))
    };
    for k in 0..g.samples {
        let temperature = dasd::temperature(&g.temperatures, k, g.samples);
        let seeds: Vec<u64> = (0..chunk.len())
            .map(|r| row_seed(g.seed, base + r, k))
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: g.max_new_tokens,
            temperature,
            top_p: g.top_p,
            seed: g.seed,
            stop_ids: stop_ids.to_vec(),
        };
        let gen = generate_batch(&teacher.model, &ids, &seeds, &opts, |_, _| Ok(()))
            .map_err(|e| at(e.to_string()))?;
        // the scored tokens: the answer, and the end of sequence when one was drawn
        let scored: Vec<Vec<u32>> = gen
            .iter()
            .map(|x| {
                let mut y = x.tokens.clone();
                if let (Finish::Stop, Some(&eos)) = (x.finish, stop_ids.first()) {
                    y.push(eos);
                }
                y
            })
            .collect();
        let prompts: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let answers: Vec<&[u32]> = scored.iter().map(Vec::as_slice).collect();
        let lp_t = dasd::mean_logprobs(&teacher.model, &prompts, &answers, vocab)
            .map_err(|e| at(format!("teacher: {e}")))?;
        let lp_s = dasd::mean_logprobs(&student.model, &prompts, &answers, vocab)
            .map_err(|e| at(format!("student: {e}")))?;
        for (r, x) in gen.into_iter().enumerate() {
            out[r].push(Answer {
                sample: k,
                temperature,
                row_seed: seeds[r],
                text: tok.decode(&x.tokens, true)?,
                tokens: x.tokens.len(),
                finish: x.finish,
                teacher_logp: lp_t[r],
                student_logp: lp_s[r],
            });
        }
    }
    Ok(out)
}

/// The output record of a kept answer.
fn record(g: &GenerateData, task: &Task, a: &Answer) -> Value {
    let mut rec = match &task.form {
        Form::Plain(p) => json!({ "prompt": p, "response": a.text }),
        Form::Chat(m) => {
            let mut m = m.clone();
            m.push(Message {
                role: "assistant".into(),
                content: a.text.clone(),
            });
            json!({ "messages": m })
        }
        Form::StepByStep { input, .. } => step_by_step::rationale_record(
            input,
            &a.text,
            g.rationale.as_ref().map_or(1.0, |r| r.weight),
        ),
    };
    for (k, v) in [
        ("line", json!(task.line)),
        ("sample", json!(a.sample)),
        ("temperature", json!(a.temperature)),
        ("top_p", json!(g.top_p)),
        ("seed", json!(g.seed)),
        ("row_seed", json!(a.row_seed)),
        ("tokens", json!(a.tokens)),
        ("finish", json!(a.finish.as_str())),
        ("teacher_logp", json!(a.teacher_logp)),
        ("student_logp", json!(a.student_logp)),
        ("score", json!(a.score())),
    ] {
        rec[k] = v;
    }
    rec
}
