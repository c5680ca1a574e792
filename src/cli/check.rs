//! `distill check TEACHER STUDENT [--data FILE] [--sequences N] [--seq-len N]`: the vocabulary and
//! template reconciliation a run makes at its start (`teacher::vocab`), on its own: tokenizers
//! compared token by token, padding rows, remapped ids, chat templates; with --data, the teacher's
//! mass on its padding rows over the first N windows of that text. Exit 0 when the pair can be
//! distilled, 2 (an error line listing the first differing tokens) when it cannot.
use anyhow::{bail, Context, Result};
use distill::data::Batch;
use distill::model::LoadedModel;
use distill::teacher::vocab::{self, VocabReport};
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    teacher: PathBuf,
    student: PathBuf,
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
    Ok(())
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
