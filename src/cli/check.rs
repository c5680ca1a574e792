//! `distill check TEACHER STUDENT [--teacher MORE ...] [--data FILE] [--sequences N] [--seq-len N]`:
//! the vocabulary and template reconciliation a run makes at its start (`teacher::vocab`), on its
//! own: tokenizers compared token by token, padding rows, remapped ids, chat templates; with
//! --data, the teacher's mass on its padding rows over the first N windows of that text, and the
//! headroom of each teacher (TEACHER and every --teacher) over the student on those windows: its
//! perplexity, KL(teacher ‖ student), top-1 agreement (`eval::distill_metrics`, what a run's
//! evaluation reports), with a warning for a teacher no better than the student (its perplexity
//! at least the student's: distilling it would teach nothing). Exit 0 when every pair can be
//! distilled, 2 (an error line listing the first differing tokens) when one cannot.
use anyhow::{bail, Context, Result};
use distill::data::{Batch, Sequence, IGNORE_INDEX};
use distill::model::LoadedModel;
use distill::teacher::vocab::{self, VocabReport};
use distill::teacher::Live;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    teacher: PathBuf,
    student: PathBuf,
    /// Further teachers to compare with TEACHER (their headroom over the student, with --data)
    #[arg(long = "teacher", value_name = "PATH")]
    teachers: Vec<PathBuf>,
    /// A text file to measure the teacher's mass on its padding rows with
    #[arg(long)]
    data: Option<PathBuf>,
    /// Windows of the text to run the teacher on
    #[arg(long, default_value_t = 8)]
    sequences: usize,
    /// Window length in tokens (capped at the teacher's context)
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
}

pub fn run(a: Args, device: tch::Device) -> Result<()> {
    if a.sequences == 0 || a.seq_len == 0 {
        bail!("--sequences and --seq-len must be at least 1");
    }
    let teacher = super::load(&a.teacher, device).context("teacher")?;
    let student = super::load(&a.student, device).context("student")?;
    let data = a.data.as_deref().map(|p| (p, a.sequences, a.seq_len));
    let report = check_pair(&teacher, &student, data)?;
    let mut lines = report.lines(&teacher.source, &student.source);
    if data.is_some() && report.teacher_padding_rows == 0 {
        let at = lines.len() - 1;
        lines.insert(
            at,
            "padding mass:   none to measure (the teacher has no padding rows)".into(),
        );
    }
    for line in lines {
        println!("{line}");
    }
    let mut others = Vec::new();
    for p in &a.teachers {
        let t = super::load(p, device).with_context(|| format!("teacher {}", p.display()))?;
        for line in check_pair(&t, &student, None)?.lines(&t.source, &student.source) {
            println!("{line}");
        }
        others.push(t);
    }
    if let Some((path, sequences, seq_len)) = data {
        let all: Vec<&LoadedModel> = std::iter::once(&teacher).chain(&others).collect();
        for line in headroom(&all, &student, path, sequences, seq_len)? {
            println!("{line}");
        }
    }
    Ok(())
}

/// Each teacher's perplexity, KL(teacher ‖ student) and top-1 agreement on the first `sequences`
/// windows of `seq_len` tokens of `path` (every position but each window's last predicted), and
/// the student's perplexity; a warning line for each teacher whose perplexity is not below the
/// student's.
fn headroom(
    teachers: &[&LoadedModel],
    student: &LoadedModel,
    path: &Path,
    sequences: usize,
    seq_len: usize,
) -> Result<Vec<String>> {
    let tok = student
        .tokenizer
        .as_ref()
        .context("the student has no tokenizer")?;
    let text = distill::io::read_to_string(path)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let ids = tok.encode(text, true)?;
    let context = teachers
        .iter()
        .map(|t| t.model.config.max_position_embeddings)
        .chain([student.model.config.max_position_embeddings])
        .min()
        .unwrap_or(seq_len);
    let len = seq_len.min(context).min(ids.len());
    if len < 2 {
        bail!("{}: too little text to measure with", path.display());
    }
    let windows: Vec<Sequence> = ids
        .chunks_exact(len)
        .take(sequences)
        .map(|w| Sequence {
            ids: w.to_vec(),
            labels: (0..len)
                .map(|t| w.get(t + 1).map_or(IGNORE_INDEX, |&x| x as i64))
                .collect(),
            weights: (0..len)
                .map(|t| if t + 1 < len { 1.0 } else { 0.0 })
                .collect(),
            spans: vec![],
            domain: None,
        })
        .collect();
    let mut out = vec![format!(
        "headroom over the student on {} windows of {len} tokens of {}:",
        windows.len(),
        path.display()
    )];
    let mut warnings = vec![];
    for t in teachers {
        let (_, map) = vocab::check(t, student)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= map.width()) {
            bail!(
                "{}: token id {bad} is outside the {} ids that {} and the student have rows for",
                path.display(),
                map.width(),
                t.source.display()
            );
        }
        let m = distill::eval::distill_metrics(
            &Live::new(&t.model).with_vocab(&map),
            &student.model,
            &windows,
            4,
        )?;
        out.push(format!(
            "  {}: teacher ppl {:.2}, student ppl {:.2}, KL(teacher‖student) {:.4}, top-1 agreement {:.3}",
            t.source.display(),
            m.teacher_ppl,
            m.student_ppl,
            m.kl,
            m.top1
        ));
        // a NaN perplexity warns too: nothing shows the teacher is better
        if m.teacher_ppl.partial_cmp(&m.student_ppl) != Some(std::cmp::Ordering::Less) {
            warnings.push(format!(
                "warning: {} is no better than the student on this text (perplexity {:.2} ≥ {:.2}): distilling it would teach nothing",
                t.source.display(),
                m.teacher_ppl,
                m.student_ppl
            ));
        }
    }
    out.extend(warnings);
    Ok(out)
}

/// The check of one (teacher, student) pair; with `data` = (text file, windows, window length),
/// the teacher's mass on its padding rows measured on that text (tokenised by the student).
pub fn check_pair(
    teacher: &LoadedModel,
    student: &LoadedModel,
    data: Option<(&Path, usize, usize)>,
) -> Result<VocabReport> {
    let (mut report, map) = vocab::check(teacher, student)?;
    let Some((path, sequences, seq_len)) = data else {
        return Ok(report);
    };
    if map.teacher_padding_rows() == 0 {
        return Ok(report); // nothing to measure
    }
    let tok = student
        .tokenizer
        .as_ref()
        .context("the student has no tokenizer")?;
    let text = distill::io::read_to_string(path)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text); // a UTF-8 byte-order mark
    let ids: Vec<i64> = tok.encode(text, true)?.into_iter().map(i64::from).collect();
    if ids.is_empty() {
        bail!("{}: no tokens to measure with", path.display());
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= map.width()) {
        bail!(
            "{}: token id {bad} is outside the {} ids that both models have rows for",
            path.display(),
            map.width()
        );
    }
    let len = seq_len
        .min(teacher.model.config.max_position_embeddings)
        .min(ids.len());
    let rows = (ids.len() / len).min(sequences);
    let ids = Tensor::f_from_slice(&ids[..rows * len])?
        .f_view([rows as i64, len as i64])?
        .f_to_device(teacher.model.device())?; // (rows, len)
    let batch = Batch::from_ids_labels(&ids, &ids)?;
    report.teacher_padding_mass = vocab::padding_mass(&teacher.model, &map, &batch)?;
    Ok(report)
}
