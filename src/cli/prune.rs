//! `distill prune TEACHER --keep N --data CALIB [--out DIR]`: measure how much each run of the
//! teacher's consecutive layers changes its hidden state on calibration text, print the candidates
//! and their scores, remove the most redundant runs until N layers remain, and write the student
//! folder (see distill::student::prune for the score and the strategies).
use anyhow::{bail, Context, Result};
use distill::student::{self, prune, Calibration, PruneOptions, Strategy};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The teacher (HF folder or .gguf)
    teacher: PathBuf,
    /// How many of the teacher's layers the student keeps
    #[arg(long)]
    keep: usize,
    /// Calibration text: a file, or a folder of text files (read in name order)
    #[arg(long)]
    data: PathBuf,
    /// Write the student here (an HF folder); without it, only the choice is printed
    #[arg(long)]
    out: Option<PathBuf>,
    /// Calibration windows
    #[arg(long, default_value_t = student::calibration::DEFAULT_SEQUENCES)]
    sequences: usize,
    /// Tokens a calibration window
    #[arg(long, default_value_t = student::calibration::DEFAULT_SEQ_LEN)]
    seq_len: usize,
    /// perplexity[:K] (the K runs of L − N layers of smallest d, judged by calibration
    /// perplexity), one-shot (one run of L − N layers), iterative (one layer a round, measured
    /// again), iterative:K (runs of K), independent (the L − N layers scored alone)
    #[arg(long, default_value_t = prune::DEFAULT_STRATEGY.name())]
    strategy: String,
    /// Allow removing the teacher's first and last layer (kept by default)
    #[arg(long)]
    remove_ends: bool,
    /// Print the choice and every candidate's score as JSON instead of the table
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, device: tch::Device) -> Result<()> {
    if a.keep == 0 {
        bail!("--keep 0: a student needs at least one layer");
    }
    if a.sequences == 0 || a.seq_len == 0 {
        bail!("--sequences and --seq-len must be at least 1");
    }
    let strategy = Strategy::parse(&a.strategy).map_err(|m| anyhow::anyhow!("--strategy: {m}"))?;
    if let Some(out) = &a.out {
        if out.join("config.json").exists() || out.is_file() {
            bail!(
                "{}: already holds a model; choose an empty folder",
                out.display()
            );
        }
    }
    // a missing calibration file is reported before the teacher is loaded
    distill::data::files_of(&a.data).context("--data")?;
    let teacher = super::load(&a.teacher, device)?;
    let layers = teacher.model.config.num_hidden_layers;
    prune::check_keep(a.keep, layers).map_err(|m| anyhow::anyhow!("--keep {}: {m}", a.keep))?;
    let options = PruneOptions {
        keep: a.keep,
        strategy,
        keep_ends: !a.remove_ends,
    };
    let calibration = Calibration {
        path: a.data.clone(),
        sequences: a.sequences,
        seq_len: a.seq_len,
    };
    let p = student::choose_layers(&teacher, &options, &calibration).context("--data")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", p.table());
    }
    if let Some(out) = &a.out {
        let s = student::from_teacher_layers(&teacher, &p.kept, device)?;
        s.save_hf(out)
            .with_context(|| format!("writing {}", out.display()))?;
        if !a.json {
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}
