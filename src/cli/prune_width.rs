//! `distill prune-width TEACHER --hidden-size N [--intermediate-size M] [--heads H [--kv-heads K]]
//! (--data CALIB | --random [--seed S]) --out DIR`: a narrower student from the teacher's most
//! important channels on calibration text (or channels drawn at random), as a Hugging Face folder.
//! The ranking and the slicing are `distill::prune_width`.
use anyhow::{bail, Context, Result};
use distill::prune_width::{self, WidthSpec};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    teacher: PathBuf,
    /// The student's hidden size (default: the teacher's)
    #[arg(long)]
    hidden_size: Option<usize>,
    /// The student's MLP size (default: the teacher's)
    #[arg(long)]
    intermediate_size: Option<usize>,
    /// The student's attention (query) heads (default: the teacher's)
    #[arg(long)]
    heads: Option<usize>,
    /// The student's key/value heads (default: heads over the teacher's group size)
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Calibration text: channels ranked by activation magnitude over its first --max-tokens
    #[arg(long, required_unless_present = "random", conflicts_with = "random")]
    data: Option<PathBuf>,
    /// Keep channels drawn at random (seeded) instead of the most important
    #[arg(long)]
    random: bool,
    #[arg(long, default_value_t = 0, requires = "random")]
    seed: i64,
    /// Calibration tokens used
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Calibration window length in tokens (capped at the model's context)
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args, device: tch::Device) -> Result<()> {
    if a.out.join("config.json").exists() || a.out.is_file() {
        bail!(
            "{}: already holds a model; choose an empty folder",
            a.out.display()
        );
    }
    if a.seq_len == 0 || a.max_tokens == 0 {
        bail!("--seq-len and --max-tokens must be at least 1");
    }
    let m = super::load(&a.teacher, device)?;
    let c = &m.model.config;
    let spec = WidthSpec::resolve(c, a.hidden_size, a.intermediate_size, a.heads, a.kv_heads)?;
    let imp = match &a.data {
        None => prune_width::random_importance(c, a.seed)?,
        Some(data) => {
            let tok = m.tokenizer.as_ref().context(
                "the teacher has no tokenizer: calibration text needs one (or --random)",
            )?;
            let text = distill::io::read_to_string(data)?;
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            let mut ids: Vec<i64> = tok.encode(text, true)?.iter().map(|&i| i as i64).collect();
            ids.truncate(a.max_tokens);
            if ids.is_empty() {
                bail!("{}: no calibration tokens", data.display());
            }
            let window = a.seq_len.min(c.max_position_embeddings);
            let windows: Vec<Vec<i64>> = ids.chunks(window).map(|w| w.to_vec()).collect();
            prune_width::importance(&m.model, &windows)
                .with_context(|| format!("calibrating on {}", data.display()))?
        }
    };
    let student = prune_width::prune(&m, &spec, &imp)?;
    student
        .save_hf(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {}: hidden {} of {}, intermediate {} of {}, heads {} of {} (kv {} of {}), {}",
        a.out.display(),
        spec.hidden_size,
        c.hidden_size,
        spec.intermediate_size,
        c.intermediate_size,
        spec.heads,
        c.num_attention_heads,
        spec.kv_heads,
        c.num_key_value_heads,
        if a.random {
            "at random"
        } else {
            "by importance"
        }
    );
    Ok(())
}
