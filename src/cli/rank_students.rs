//! `distill rank-students TEACHER CANDIDATE... --data CALIB [--sequences N] [--seq-len T]
//! [--classes K] [--json]`: score each untrained candidate student by how closely its relation
//! matrices match the teacher's on calibration text (DisWOT; the score is
//! distill::student::diswot), and print them best first. A candidate is a model folder or .gguf
//! file, or a student built in memory from the teacher: `layers:0,3,6` (those layers, as `distill
//! convert --layers`), `keep:N` (N layers chosen by similarity on the same text, as `distill
//! prune`), `width:D` (hidden size D, channels by importance on the same text, as `distill
//! prune-width`).
use anyhow::{anyhow, bail, Context, Result};
use distill::model::{self, LoadedModel};
use distill::prune_width::{self, WidthSpec};
use distill::student::{self, diswot, prune, Calibration, PruneOptions};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The teacher (HF folder or .gguf)
    teacher: PathBuf,
    /// Students: model folders or .gguf files, or built from the teacher: layers:0,3,6 (those
    /// layers), keep:N (N layers chosen by similarity), width:D (hidden size D by importance)
    candidates: Vec<String>,
    /// Calibration text: a file, or a folder of text files (read in name order)
    #[arg(long)]
    data: PathBuf,
    /// Calibration windows (the samples of the relation matrix)
    #[arg(long, default_value_t = diswot::DEFAULT_SEQUENCES)]
    sequences: usize,
    /// Tokens a calibration window
    #[arg(long, default_value_t = diswot::DEFAULT_SEQ_LEN)]
    seq_len: usize,
    /// Classes of the semantic matrix: the most frequent next tokens of the calibration text
    #[arg(long, default_value_t = diswot::DEFAULT_CLASSES)]
    classes: usize,
    /// Print the ranking as JSON instead of the table
    #[arg(long)]
    json: bool,
}

/// A candidate as written on the command line.
enum Spec {
    Path(PathBuf),
    Layers(Vec<usize>),
    Keep(usize),
    Width(usize),
}

fn parse(s: &str) -> Result<Spec> {
    let number = |v: &str, what: &str| -> Result<usize> {
        v.trim()
            .parse::<usize>()
            .map_err(|_| anyhow!("'{v}' is not {what}"))
    };
    if let Some(v) = s.strip_prefix("layers:") {
        let layers = v
            .split(',')
            .map(|x| number(x, "a layer index"))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Spec::Layers(layers));
    }
    if let Some(v) = s.strip_prefix("keep:") {
        return Ok(Spec::Keep(number(v, "a count of layers")?));
    }
    if let Some(v) = s.strip_prefix("width:") {
        return Ok(Spec::Width(number(v, "a hidden size")?));
    }
    let p = PathBuf::from(s);
    match distill::io::metadata(&p)? {
        Some(_) => Ok(Spec::Path(p)),
        None => bail!("no such model folder or file (or a spec layers:…, keep:N, width:D)"),
    }
}

/// One candidate's line of the ranking.
#[derive(Serialize)]
struct Row {
    rank: usize,
    candidate: String,
    /// the teacher's layers it is made of, when built from them
    layers: Option<Vec<usize>>,
    num_layers: usize,
    hidden_size: usize,
    params: i64,
    #[serde(flatten)]
    score: diswot::Score,
}

#[derive(Serialize)]
struct Ranking {
    teacher: PathBuf,
    data: PathBuf,
    sequences: usize,
    seq_len: usize,
    /// the token ids of the semantic matrix's classes
    classes: Vec<i64>,
    teacher_ppl: f64,
    /// best first
    candidates: Vec<Row>,
}

/// Build the student a spec names, and the teacher's layers it keeps when built from them.
fn build(
    spec: &Spec,
    teacher: &LoadedModel,
    windows: &[Vec<u32>],
    device: tch::Device,
) -> Result<(LoadedModel, Option<Vec<usize>>)> {
    let n = teacher.model.config.num_hidden_layers;
    Ok(match spec {
        Spec::Path(p) => (super::load(p, device)?, None),
        Spec::Layers(layers) => {
            if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
                bail!(
                    "layer {bad} does not exist (the teacher has layers 0..{})",
                    n - 1
                );
            }
            let s = student::from_teacher_layers(teacher, layers, device)?;
            (s, Some(layers.clone()))
        }
        Spec::Keep(keep) => {
            prune::check_keep(*keep, n).map_err(|m| anyhow!("{m}"))?;
            let o = PruneOptions {
                keep: *keep,
                strategy: prune::DEFAULT_STRATEGY,
                keep_ends: prune::DEFAULT_KEEP_ENDS,
            };
            let p = prune::prune(&teacher.model, windows, &o)?;
            let s = student::from_teacher_layers(teacher, &p.kept, device)?;
            (s, Some(p.kept))
        }
        Spec::Width(d) => {
            let c = &teacher.model.config;
            let spec = WidthSpec::resolve(c, Some(*d), None, None, None)?;
            let w: Vec<Vec<i64>> = windows
                .iter()
                .map(|w| w.iter().map(|&x| x as i64).collect())
                .collect();
            let imp = prune_width::importance(&teacher.model, &w)?;
            (prune_width::prune(teacher, &spec, &imp)?, None)
        }
    })
}

pub fn run(a: Args, device: tch::Device) -> Result<()> {
    if a.candidates.is_empty() {
        bail!("no candidates: name at least one student after the teacher (a folder, a .gguf, layers:…, keep:N or width:D)");
    }
    if a.sequences < 2 || a.seq_len < 2 {
        bail!("--sequences and --seq-len must be at least 2 (a relation needs two samples, a window a next token)");
    }
    if a.classes == 0 {
        bail!("--classes must be at least 1");
    }
    // every candidate is read before the teacher is loaded: a typo costs nothing
    let specs = a
        .candidates
        .iter()
        .map(|c| parse(c).with_context(|| format!("candidate '{c}'")))
        .collect::<Result<Vec<_>>>()?;
    distill::data::files_of(&a.data).context("--data")?;
    let teacher = super::load(&a.teacher, device)?;
    let tok = teacher
        .tokenizer
        .as_ref()
        .context("the teacher has no tokenizer to read the calibration text with")?;
    let context = teacher.model.config.max_position_embeddings;
    if a.seq_len > context {
        bail!(
            "--seq-len {}: exceeds the teacher's context of {context}",
            a.seq_len
        );
    }
    let calibration = Calibration {
        path: a.data.clone(),
        sequences: a.sequences,
        seq_len: a.seq_len,
    };
    let windows = calibration
        .windows(tok, model::eos_id(&teacher))
        .context("--data")?;
    let windows = diswot::full_windows(windows, a.seq_len).context("--data")?;
    let classes = diswot::classes(&windows, a.classes);
    // the teacher measured once per vocabulary width (a student with other padding rows shares fewer)
    let mut measured: HashMap<usize, diswot::Measured> = HashMap::new();
    let rows = teacher.model.config.vocab_size;
    measured.insert(
        rows,
        diswot::measure(&teacher.model, &windows, &classes, rows)
            .context("measuring the teacher")?,
    );
    let teacher_ppl = measured[&rows].ppl();
    let mut out = Vec::new();
    for (name, spec) in a.candidates.iter().zip(&specs) {
        let mut one = || -> Result<Row> {
            let (s, layers) = build(spec, &teacher, &windows, device)?;
            let (_, map) = distill::teacher::vocab::check(&teacher, &s)?;
            if map.translates_ids() {
                bail!("its tokenizer gives tokens other ids than the teacher's; DisWOT feeds both the same ids");
            }
            let width = map.width();
            if let std::collections::hash_map::Entry::Vacant(v) = measured.entry(width) {
                v.insert(
                    diswot::measure(&teacher.model, &windows, &classes, width)
                        .context("measuring the teacher")?,
                );
            }
            let m = diswot::measure(&s.model, &windows, &classes, width)?;
            let c = &s.model.config;
            Ok(Row {
                rank: 0,
                candidate: name.clone(),
                layers,
                num_layers: c.num_hidden_layers,
                hidden_size: c.hidden_size,
                params: s.vs.variables().values().map(|t| t.numel() as i64).sum(),
                score: diswot::score(&measured[&width], &m)?,
            })
        };
        out.push(one().with_context(|| format!("candidate '{name}'"))?);
    }
    // best first; ties keep the command line's order
    out.sort_by(|x, y| y.score.score.total_cmp(&x.score.score));
    for (i, r) in out.iter_mut().enumerate() {
        r.rank = i + 1;
    }
    let ranking = Ranking {
        teacher: a.teacher.clone(),
        data: a.data.clone(),
        sequences: windows.len(),
        seq_len: a.seq_len,
        classes,
        teacher_ppl,
        candidates: out,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ranking)?);
    } else {
        print!("{}", table(&ranking));
    }
    Ok(())
}

fn table(r: &Ranking) -> String {
    let mut o = format!(
        "DisWOT ranking against {} on {} windows × {} tokens of {}, {} classes\n\
         score = −(d_sem + d_rel), higher is better (the teacher against itself: 0); ppl on the same text (the teacher's: {:.2})\n",
        r.teacher.display(),
        r.sequences,
        r.seq_len,
        r.data.display(),
        r.classes.len(),
        r.teacher_ppl
    );
    o += &format!(
        "{:>4} {:>10} {:>10} {:>10} {:>12} {:>6} {:>6} {:>9}  candidate\n",
        "rank", "score", "d_sem", "d_rel", "ppl", "layers", "hidden", "params"
    );
    for c in &r.candidates {
        let chosen = match (&c.layers, c.candidate.starts_with("layers:")) {
            (Some(l), false) => format!(" = layers {l:?}"),
            _ => String::new(),
        };
        o += &format!(
            "{:>4} {:>10.5} {:>10.5} {:>10.5} {:>12.2} {:>6} {:>6} {:>8.1}M  {}{chosen}\n",
            c.rank,
            c.score.score,
            c.score.semantic,
            c.score.relation,
            c.score.ppl,
            c.num_layers,
            c.hidden_size,
            c.params as f64 / 1e6,
            c.candidate
        );
    }
    o
}
