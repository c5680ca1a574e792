//! `distill generate-data RUN.toml [--resume | --overwrite] [--set k=v …]`: the run file's
//! teacher answers the prompts of its `[generate_data]` section, its student scores the answers,
//! and the selected ones go to a JSONL file that `distill train` reads (see generate/data.rs).
use anyhow::{Context, Result};
use distill::config::RunConfig;
use distill::model::{self, LoadedModel};
use distill::student::{self, StudentInit};
use distill::teacher::vocab;

pub fn run(
    run_file: &std::path::Path,
    resume: bool,
    overwrite: bool,
    set: Vec<String>,
    threads: Option<i64>,
    device: Option<&str>,
) -> Result<()> {
    let mut cfg = RunConfig::load(run_file, &set)?;
    super::train::settle(&mut cfg, threads, device)?;
    let g = cfg.generate_data.clone().with_context(|| {
        format!(
            "{}: no [generate_data] section (prompts, out, samples, keep, …)",
            run_file.display()
        )
    })?;
    let device = cfg.run.device;
    distill::device::check_available(device)?;
    distill::teacher::ensemble::one_teacher_only(&cfg.teachers, "distill generate-data")?;
    let path = cfg.teacher.model_path("distill generate-data")?;
    let mut teacher =
        model::load(path, device).with_context(|| format!("teacher: {}", path.display()))?;
    let student: LoadedModel = match &cfg.student.init {
        StudentInit::Path(p) => {
            model::load(p, device).with_context(|| format!("student: {}", p.display()))?
        }
        StudentInit::FromTeacher { layers } => {
            student::from_teacher_layers(&teacher, layers, device)?
        }
        StudentInit::Teacher => {
            let all: Vec<usize> = (0..teacher.model.config.num_hidden_layers).collect();
            student::from_teacher_layers(&teacher, &all, device)?
        }
        StudentInit::Similarity {
            options,
            calibration,
        } => {
            let p = student::choose_layers(&teacher, options, calibration)?;
            student::from_teacher_layers(&teacher, &p.kept, device)?
        }
    };
    let mut student = student;
    student.model.set_compute_kind(cfg.student.dtype.kind());
    let t_kind = cfg.teacher.dtype.kind();
    if t_kind != tch::Kind::Float {
        teacher.vs.set_kind(t_kind);
    }
    teacher.model.set_compute_kind(t_kind);
    teacher.vs.freeze();
    // one tokenizer: the student scores the teacher's token ids as they are
    let (_, map) = vocab::check(&teacher, &student)?;
    if map.translates_ids() {
        anyhow::bail!(
            "generate-data: the student's tokenizer has tokens at other ids than the teacher's; it scores the teacher's answers in the teacher's ids (padding rows may differ)"
        );
    }
    let stop_ids = super::generate::stop_ids(&teacher);
    let s = distill::generate::data::run(&g, &teacher, &student, &stop_ids, resume, overwrite)?;
    if s.resumed_at > 0 {
        println!("resumed after {} prompts already written", s.resumed_at);
    }
    println!(
        "{} prompts, {} answers ({} new tokens) in {:.1} s; kept {} (keep {} of {} per prompt)",
        s.prompts, s.answers, s.new_tokens, s.seconds, s.kept, g.keep, g.samples
    );
    println!(
        "mean score (teacher − student mean log-prob per token): all {:.4}, kept {:.4}",
        s.mean_score_all, s.mean_score_kept
    );
    println!("out: {}", g.out.display());
    Ok(())
}
