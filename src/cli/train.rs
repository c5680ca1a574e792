//! `distill train RUN.toml [--resume | --overwrite] [--set k=v …]`, and the summary it prints.
use anyhow::Result;
use distill::config::RunConfig;
use distill::train::{TrainOptions, TrainSummary};
use std::path::Path;

/// The run file's device and threads, unless the command line gave them.
pub fn settle(cfg: &mut RunConfig, threads: Option<i64>, device: Option<&str>) -> Result<()> {
    if let Some(d) = device {
        cfg.run.device =
            distill::device::parse_device(d).map_err(|m| anyhow::anyhow!("--device: {m}"))?;
    }
    super::set_threads(threads, cfg.run.threads)
}

pub fn run(
    run_file: &Path,
    resume: bool,
    overwrite: bool,
    set: Vec<String>,
    threads: Option<i64>,
    device: Option<&str>,
) -> Result<()> {
    let mut cfg = RunConfig::load(run_file, &set)?;
    settle(&mut cfg, threads, device)?;
    let opts = TrainOptions {
        resume,
        overwrite,
        progress: true,
        run_file: Some(run_file.to_path_buf()),
    };
    let summary = distill::train::train(&cfg, &opts)?;
    // several processes: rank 0 speaks for the run
    if std::env::var("RANK").map_or(true, |r| r.trim() == "0") {
        print_summary(&summary);
    }
    Ok(())
}

pub fn print_summary(s: &TrainSummary) {
    println!(
        "\n{:<8} {:>12} {:>12} {:>10} {:>8}",
        "", "student ppl", "teacher ppl", "KL/token", "top-1"
    );
    let row = |name: &str, m: &distill::eval::DistillMetrics| {
        println!(
            "{name:<8} {:>12.3} {:>12.3} {:>10.4} {:>8.3}",
            m.student_ppl, m.teacher_ppl, m.kl, m.top1
        )
    };
    if let Some(b) = &s.before {
        row("before", b);
    }
    row("after", &s.after);
    println!(
        "\n{} steps ({} skipped) in {:.0} s",
        s.steps, s.skipped_steps, s.seconds
    );
    println!("student: {}", s.output.join("student").display());
    println!("report:  {}", s.output.join("report.md").display());
}
