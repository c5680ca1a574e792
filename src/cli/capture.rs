//! `distill capture RUN.toml [--out DIR] [--append] [--steps N] [--set k=v …]`: the teacher's
//! distribution over the run's data, written once as a teacher store. Under torchrun's variables
//! (or `distill launch --nproc N capture …`) each process captures its share into shards of the
//! same store (teacher/store/parallel.rs); rank 0 prints the summary.
use anyhow::Result;
use distill::config::RunConfig;
use distill::teacher::store::{capture_on, parallel, CaptureOptions};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    pub(super) run_file: PathBuf,
    /// Where to write the store (default: the run file's teacher.store)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Add this data's sequences to a store that holds other data
    #[arg(long)]
    append: bool,
    /// Capture only the training sequences the run's first N steps visit (and the validation ones)
    #[arg(long)]
    steps: Option<usize>,
    /// Capture only this share of the training sequences, in (0, 1] (a teacher-query budget;
    /// default: the run file's teacher.budget)
    #[arg(long)]
    budget: Option<f64>,
    /// How the budget's sequences are chosen: uncertainty, rad, kd3 or random (default: the run
    /// file's teacher.selection)
    #[arg(long)]
    selection: Option<String>,
    /// Also time a bare teacher forward of each batch just before capturing it, and print both rates
    #[arg(long)]
    compare_forward: bool,
    /// Override a key of the run file, e.g. --set capture.coverage=0.99 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub fn run(args: Args, threads: Option<i64>, device: Option<&str>) -> Result<()> {
    let mut cfg = RunConfig::load(&args.run_file, &args.set)?;
    super::train::settle(&mut cfg, threads, device)?;
    distill::teacher::ensemble::one_teacher_only(&cfg.teachers, "a store (distill capture)")?;
    // the flags over the run file's keys
    let budget = match (args.budget, &args.selection) {
        (None, None) => None,
        (share, sel) => {
            let file = cfg.teacher.budget;
            let share = share.or(file.map(|b| b.share));
            let sel = sel.clone().or(file.map(|b| b.selection.name().to_string()));
            distill::teacher::budget::Budget::resolve(share, sel.as_deref(), None).map_err(|i| {
                anyhow::anyhow!("--{}: {}", i.key.trim_start_matches("teacher."), i.msg)
            })?
        }
    };
    let opts = CaptureOptions {
        budget,
        out: args.out,
        append: args.append,
        steps: args.steps,
        progress: true,
        compare_forward: args.compare_forward,
    };
    let world = parallel::join(&mut cfg, &opts)?;
    let s = capture_on(&world, &cfg, &cfg.capture, &opts)?;
    if !world.is_main() {
        return Ok(());
    }
    let h = &s.header;
    println!(
        "captured {} sequences ({} positions) in {:.1} s ({:.1} s capturing): {:.1} tokens/s{}",
        s.captured,
        s.positions,
        s.seconds,
        s.loop_seconds,
        s.tokens as f64 / s.loop_seconds.max(1e-9),
        if s.already > 0 {
            format!("; {} were already in the store", s.already)
        } else {
            String::new()
        }
    );
    if let Some(f) = s.forward_seconds {
        let (c, b) = (
            s.tokens as f64 / s.loop_seconds.max(1e-9),
            s.tokens as f64 / f.max(1e-9),
        );
        println!(
            "bare teacher forward over the same batches: {b:.1} tokens/s; capture at {:.2}x of it",
            c / b
        );
    }
    println!(
        "store {}: {} sequences, {} positions, {:.1} bytes/token",
        show(&s.dir),
        h.sequences(),
        h.positions(),
        h.bytes() as f64 / h.positions().max(1) as f64
    );
    Ok(())
}

fn show(p: &Path) -> String {
    p.display().to_string()
}
