//! The run file (TOML): what `distill train run.toml` reads. The on-disk form (`RunFile`, serde,
//! unknown keys refused) is kept apart from the validated runtime form (`RunConfig`, defaults filled
//! in, enums instead of strings). Errors read `run.toml:12: unknown field 'temprature', expected …`.
use crate::losses::token_selective::TokenSelectiveConfig;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

// ---------------------------------------------------------------- on disk

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    pub teacher: TeacherFile,
    pub student: StudentFile,
    pub data: DataFile,
    #[serde(default)]
    pub loss: Vec<LossFile>,
    #[serde(default)]
    pub optim: OptimFile,
    #[serde(default)]
    pub run: RunSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherFile {
    pub path: PathBuf,
    /// compute dtype of the teacher; only "f32" for now
    pub dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentFile {
    pub path: Option<PathBuf>,
    pub from_teacher: Option<FromTeacher>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromTeacher {
    pub layers: Vec<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    /// a file, or a folder whose files (sorted by name) are all read
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    /// "text" or "jsonl"; default from the file extension (.jsonl → jsonl)
    pub format: Option<String>,
    pub seq_len: Option<usize>,
    pub packing: Option<bool>,
    pub validation_fraction: Option<f64>,
    /// stop reading training text after this many tokens (the demo uses it)
    pub max_train_tokens: Option<usize>,
    pub max_validation_sequences: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossFile {
    pub kind: Spanned<String>,
    pub weight: Option<f64>,
    pub temperature: Option<f64>,
    pub beta: Option<f64>,
    pub alpha: Option<f64>,
    pub mu: Option<f64>,
    pub tau: Option<f64>,
    pub t_start: Option<f64>,
    pub t_end: Option<f64>,
    pub top_k: Option<usize>,
    pub entropy_quantile: Option<f64>,
    pub w_jsd: Option<f64>,
    pub w_entropy: Option<f64>,
    pub w_rank: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimFile {
    pub lr: Option<f64>,
    pub betas: Option<[f64; 2]>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
    pub warmup_steps: Option<usize>,
    pub schedule: Option<String>,
    pub min_lr_ratio: Option<f64>,
    pub grad_clip: Option<f64>,
    pub grad_accum: Option<usize>,
    pub micro_batch: Option<usize>,
    /// positions per chunk of the vocabulary-sized objective (0 = all at once)
    pub loss_chunk: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub eval_every: Option<usize>,
    pub checkpoint_every: Option<usize>,
    pub log_every: Option<usize>,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
    pub output: Option<PathBuf>,
    pub keep_last: Option<usize>,
}

// ---------------------------------------------------------------- runtime

#[derive(Debug, Clone, PartialEq)]
pub enum StudentInit {
    Path(PathBuf),
    FromTeacher { layers: Vec<usize> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    Text,
    Jsonl,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    pub format: DataFormat,
    pub seq_len: usize,
    pub packing: bool,
    pub validation_fraction: f64,
    pub max_train_tokens: Option<usize>,
    pub max_validation_sequences: Option<usize>,
}

/// One term of the objective, with its parameters filled in.
#[derive(Debug, Clone, PartialEq)]
pub enum LossKind {
    CrossEntropy,
    ForwardKl {
        temperature: f64,
    },
    ReverseKl {
        temperature: f64,
    },
    Jsd {
        beta: f64,
        temperature: f64,
    },
    SkewKl {
        alpha: f64,
        temperature: f64,
    },
    SkewReverseKl {
        alpha: f64,
        temperature: f64,
    },
    Tvd {
        temperature: f64,
    },
    AdaptiveKl {
        mu: f64,
        temperature: f64,
    },
    Hinton {
        alpha: f64,
        temperature: f64,
    },
    Pld {
        tau: f64,
    },
    Taid {
        t_start: f64,
        t_end: f64,
        alpha: f64,
        beta: f64,
    },
    TokenSelective(TokenSelectiveConfig),
}

impl LossKind {
    pub fn name(&self) -> &'static str {
        match self {
            LossKind::CrossEntropy => "cross_entropy",
            LossKind::ForwardKl { .. } => "forward_kl",
            LossKind::ReverseKl { .. } => "reverse_kl",
            LossKind::Jsd { .. } => "jsd",
            LossKind::SkewKl { .. } => "skew_kl",
            LossKind::SkewReverseKl { .. } => "skew_reverse_kl",
            LossKind::Tvd { .. } => "tvd",
            LossKind::AdaptiveKl { .. } => "adaptive_kl",
            LossKind::Hinton { .. } => "hinton",
            LossKind::Pld { .. } => "pld",
            LossKind::Taid { .. } => "taid",
            LossKind::TokenSelective(_) => "token_selective",
        }
    }
}

pub const LOSS_KINDS: &[&str] = &[
    "cross_entropy",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
    "adaptive_kl",
    "hinton",
    "pld",
    "taid",
    "token_selective",
];

#[derive(Debug, Clone, PartialEq)]
pub struct LossTerm {
    pub kind: LossKind,
    pub weight: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OptimConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    pub grad_clip: Option<f64>,
    pub grad_accum: usize,
    pub micro_batch: usize,
    pub loss_chunk: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Length {
    Steps(usize),
    Epochs(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub teacher: PathBuf,
    pub student: StudentInit,
    pub data: DataConfig,
    pub losses: Vec<LossTerm>,
    pub optim: OptimConfig,
    pub length: Length,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub seed: u64,
    pub threads: Option<usize>,
    pub output: PathBuf,
    pub keep_last: usize,
}

/// `~/…` from $HOME; a relative path from the run file's folder.
pub fn expand_path(p: &Path, base: &Path) -> PathBuf {
    if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), std::env::var_os("HOME")) {
        return PathBuf::from(home).join(rest);
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// 1-based line of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Turn a toml error into `file:line: message` (message without toml's source excerpt).
fn toml_error(path: &Path, text: Option<&str>, e: &toml::de::Error) -> Error {
    let msg = e.message().replace('`', "'");
    let msg = msg.trim_end_matches('\n');
    match (text, e.span()) {
        (Some(t), Some(span)) => Error::Invalid(format!(
            "{}:{}: {}",
            path.display(),
            line_of(t, span.start),
            msg
        )),
        _ => Error::Invalid(format!("{}: {}", path.display(), msg)),
    }
}

/// Apply `--set key.path=value` overrides to a TOML table. The value is read as TOML (numbers,
/// booleans, arrays, strings in quotes) or taken as a bare string.
pub fn apply_overrides(table: &mut toml::Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (key, raw) = o.split_once('=').ok_or_else(|| {
            Error::Invalid(format!("--set {o}: expected KEY=VALUE, e.g. optim.lr=1e-4"))
        })?;
        let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("parsed key"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        let mut cur = &mut *table;
        for p in &parts[..parts.len() - 1] {
            let entry = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = entry
                .as_table_mut()
                .ok_or_else(|| Error::Invalid(format!("--set {o}: '{p}' is not a section")))?;
        }
        cur.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(())
}

impl RunConfig {
    /// Read and validate a run file, with `--set` overrides applied.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = crate::io::read_to_string(path)?;
        // First pass on the text itself, so that errors carry line numbers.
        let file: RunFile = toml::from_str(&text).map_err(|e| toml_error(path, Some(&text), &e))?;
        if overrides.is_empty() {
            return Self::from_file(file, path, &text);
        }
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| toml_error(path, Some(&text), &e))?;
        apply_overrides(&mut table, overrides)?;
        // the overridden document, read again (its errors can only come from the --set values)
        let merged = toml::to_string(&table).map_err(|e| Error::Invalid(format!("--set: {e}")))?;
        let label = PathBuf::from(format!(
            "{} with --set {}",
            path.display(),
            overrides.join(" --set ")
        ));
        let file: RunFile = toml::from_str(&merged).map_err(|e| toml_error(&label, None, &e))?;
        Self::from_file(file, path, &merged)
    }

    /// Parse from a string (tests, examples).
    pub fn from_str(text: &str, path: &Path) -> Result<Self> {
        let file: RunFile = toml::from_str(text).map_err(|e| toml_error(path, Some(text), &e))?;
        Self::from_file(file, path, text)
    }

    fn from_file(f: RunFile, path: &Path, text: &str) -> Result<Self> {
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| expand_path(p, base);
        let bad = |key: &str, msg: String| Error::config(path, key, msg);
        if let Some(d) = &f.teacher.dtype {
            if d != "f32" && d != "float32" {
                return Err(bad(
                    "teacher.dtype",
                    format!("'{d}' is not supported yet (supported: f32)"),
                ));
            }
        }
        let student = match (&f.student.path, &f.student.from_teacher) {
            (Some(p), None) => StudentInit::Path(resolve(p)),
            (None, Some(ft)) => {
                if ft.layers.is_empty() {
                    return Err(bad(
                        "student.from_teacher.layers",
                        "must list at least one layer".into(),
                    ));
                }
                StudentInit::FromTeacher {
                    layers: ft.layers.clone(),
                }
            }
            _ => {
                return Err(bad(
                    "student",
                    "give exactly one of 'path' or 'from_teacher'".into(),
                ))
            }
        };
        let d = &f.data;
        let format = match d.format.as_deref() {
            Some("text") => DataFormat::Text,
            Some("jsonl") => DataFormat::Jsonl,
            Some(other) => {
                return Err(bad(
                    "data.format",
                    format!("'{other}' is not one of text, jsonl"),
                ))
            }
            None if d.train.extension().is_some_and(|e| e == "jsonl") => DataFormat::Jsonl,
            None => DataFormat::Text,
        };
        let data = DataConfig {
            train: resolve(&d.train),
            validation: d.validation.as_deref().map(resolve),
            format,
            seq_len: d.seq_len.unwrap_or(256),
            packing: d.packing.unwrap_or(true),
            validation_fraction: d.validation_fraction.unwrap_or(0.05),
            max_train_tokens: d.max_train_tokens,
            max_validation_sequences: d.max_validation_sequences,
        };
        if data.seq_len < 2 {
            return Err(bad(
                "data.seq_len",
                format!("must be at least 2, got {}", data.seq_len),
            ));
        }
        if !(0.0..1.0).contains(&data.validation_fraction) {
            return Err(bad("data.validation_fraction", "must be in [0, 1)".into()));
        }
        if f.loss.is_empty() {
            return Err(bad(
                "loss",
                format!(
                    "at least one [[loss]] term is needed (kinds: {})",
                    LOSS_KINDS.join(", ")
                ),
            ));
        }
        let losses = f
            .loss
            .iter()
            .map(|l| loss_term(l, path, text))
            .collect::<Result<Vec<_>>>()?;
        let o = &f.optim;
        let schedule = match o.schedule.as_deref().unwrap_or("cosine") {
            "cosine" => Schedule::Cosine,
            "linear" => Schedule::Linear,
            "constant" => Schedule::Constant,
            other => {
                return Err(bad(
                    "optim.schedule",
                    format!("'{other}' is not one of cosine, linear, constant"),
                ))
            }
        };
        let betas = o.betas.unwrap_or([0.9, 0.999]);
        let optim = OptimConfig {
            lr: o.lr.unwrap_or(1e-4),
            betas: (betas[0], betas[1]),
            eps: o.eps.unwrap_or(1e-8),
            weight_decay: o.weight_decay.unwrap_or(0.0),
            warmup_steps: o.warmup_steps.unwrap_or(0),
            schedule,
            min_lr_ratio: o.min_lr_ratio.unwrap_or(0.1),
            grad_clip: match o.grad_clip {
                Some(c) if c > 0.0 => Some(c),
                Some(_) => None,
                None => Some(1.0),
            },
            grad_accum: o.grad_accum.unwrap_or(1),
            micro_batch: o.micro_batch.unwrap_or(4),
            loss_chunk: o.loss_chunk.unwrap_or(512),
        };
        if !(optim.lr > 0.0 && optim.lr.is_finite()) {
            return Err(bad(
                "optim.lr",
                format!("must be positive, got {}", optim.lr),
            ));
        }
        for (k, b) in [
            ("optim.betas", optim.betas.0),
            ("optim.betas", optim.betas.1),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(k, format!("{b} is not in [0, 1)")));
            }
        }
        if optim.grad_accum == 0 || optim.micro_batch == 0 {
            return Err(bad(
                "optim.micro_batch",
                "micro_batch and grad_accum must be positive".into(),
            ));
        }
        let r = &f.run;
        let length = match (r.steps, r.epochs) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "run.steps",
                    "give 'steps' or 'epochs', not both".into(),
                ))
            }
            (Some(0), None) => return Err(bad("run.steps", "must be positive".into())),
            (Some(s), None) => Length::Steps(s),
            (None, Some(e)) if e > 0.0 => Length::Epochs(e),
            (None, Some(e)) => return Err(bad("run.epochs", format!("must be positive, got {e}"))),
            (None, None) => Length::Epochs(1.0),
        };
        let output = r
            .output
            .as_deref()
            .map(resolve)
            .unwrap_or_else(|| base.join("distill-out"));
        Ok(RunConfig {
            teacher: resolve(&f.teacher.path),
            student,
            data,
            losses,
            optim,
            length,
            eval_every: r.eval_every.unwrap_or(0),
            checkpoint_every: r.checkpoint_every.unwrap_or(0),
            log_every: r.log_every.unwrap_or(1).max(1),
            seed: r.seed.unwrap_or(0),
            threads: r.threads,
            output,
            keep_last: r.keep_last.unwrap_or(2).max(1),
        })
    }
}

fn loss_term(l: &LossFile, path: &Path, text: &str) -> Result<LossTerm> {
    let kind = l.kind.get_ref().as_str();
    let line = line_of(text, l.kind.span().start);
    let err = |msg: String| {
        Error::Invalid(format!(
            "{}:{line}: [[loss]] kind = \"{kind}\": {msg}",
            path.display()
        ))
    };
    // which optional parameters each kind takes
    let allowed: &[&str] = match kind {
        "cross_entropy" => &[],
        "forward_kl" | "reverse_kl" | "tvd" => &["temperature"],
        "jsd" => &["temperature", "beta"],
        "skew_kl" | "skew_reverse_kl" | "hinton" => &["temperature", "alpha"],
        "adaptive_kl" => &["temperature", "mu"],
        "pld" => &["tau"],
        "taid" => &["t_start", "t_end", "alpha", "beta"],
        "token_selective" => &[
            "temperature",
            "beta",
            "top_k",
            "entropy_quantile",
            "w_jsd",
            "w_entropy",
            "w_rank",
        ],
        other => {
            return Err(err(format!(
                "unknown kind '{other}', expected one of {}",
                LOSS_KINDS.join(", ")
            )))
        }
    };
    let given = [
        ("temperature", l.temperature.is_some()),
        ("beta", l.beta.is_some()),
        ("alpha", l.alpha.is_some()),
        ("mu", l.mu.is_some()),
        ("tau", l.tau.is_some()),
        ("t_start", l.t_start.is_some()),
        ("t_end", l.t_end.is_some()),
        ("top_k", l.top_k.is_some()),
        ("entropy_quantile", l.entropy_quantile.is_some()),
        ("w_jsd", l.w_jsd.is_some()),
        ("w_entropy", l.w_entropy.is_some()),
        ("w_rank", l.w_rank.is_some()),
    ];
    for (name, set) in given {
        if set && !allowed.contains(&name) {
            return Err(err(format!(
                "'{name}' does not apply (it takes: {})",
                if allowed.is_empty() {
                    "nothing".into()
                } else {
                    allowed.join(", ")
                }
            )));
        }
    }
    let temperature = l.temperature.unwrap_or(1.0);
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(err(format!(
            "temperature must be positive, got {temperature}"
        )));
    }
    let unit = |name: &str, v: f64| -> Result<f64> {
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(err(format!("{name} must be in [0, 1], got {v}")))
        }
    };
    let k = match kind {
        "cross_entropy" => LossKind::CrossEntropy,
        "forward_kl" => LossKind::ForwardKl { temperature },
        "reverse_kl" => LossKind::ReverseKl { temperature },
        "tvd" => LossKind::Tvd { temperature },
        "jsd" => LossKind::Jsd {
            beta: unit("beta", l.beta.unwrap_or(0.5))?,
            temperature,
        },
        "skew_kl" => LossKind::SkewKl {
            alpha: unit("alpha", l.alpha.unwrap_or(0.1))?,
            temperature,
        },
        "skew_reverse_kl" => LossKind::SkewReverseKl {
            alpha: unit("alpha", l.alpha.unwrap_or(0.1))?,
            temperature,
        },
        "hinton" => LossKind::Hinton {
            alpha: unit("alpha", l.alpha.unwrap_or(0.5))?,
            temperature,
        },
        "adaptive_kl" => LossKind::AdaptiveKl {
            mu: unit("mu", l.mu.unwrap_or(0.5))?,
            temperature,
        },
        "pld" => LossKind::Pld {
            tau: l.tau.unwrap_or(1.0),
        },
        "taid" => LossKind::Taid {
            t_start: unit("t_start", l.t_start.unwrap_or(0.4))?,
            t_end: unit("t_end", l.t_end.unwrap_or(1.0))?,
            alpha: l.alpha.unwrap_or(5e-4),
            beta: unit("beta", l.beta.unwrap_or(0.99))?,
        },
        "token_selective" => {
            let d = TokenSelectiveConfig::default();
            LossKind::TokenSelective(TokenSelectiveConfig {
                beta: unit("beta", l.beta.unwrap_or(d.beta))?,
                entropy_quantile: unit(
                    "entropy_quantile",
                    l.entropy_quantile.unwrap_or(d.entropy_quantile),
                )?,
                top_k: l.top_k.unwrap_or(d.top_k),
                temperature,
                w_jsd: l.w_jsd.unwrap_or(d.w_jsd),
                w_entropy: l.w_entropy.unwrap_or(d.w_entropy),
                w_rank: l.w_rank.unwrap_or(d.w_rank),
            })
        }
        _ => unreachable!("kind checked above"),
    };
    if let LossKind::Pld { tau } = k {
        if !(tau > 0.0 && tau.is_finite()) {
            return Err(err(format!("tau must be positive, got {tau}")));
        }
    }
    let weight = l.weight.unwrap_or(1.0);
    if !weight.is_finite() {
        return Err(err("weight must be finite".into()));
    }
    Ok(LossTerm { kind: k, weight })
}
