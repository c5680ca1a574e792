//! `distill eval MODEL --data FILE`: perplexity over consecutive windows of a text file.
//! `distill eval MODEL --run RUN.toml`: the distillation metrics of MODEL against the run's live
//! teacher on the run's validation sequences (what a run reports at its evaluations), e.g. to judge
//! a student trained from a store by the full teacher.
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    model: PathBuf,
    #[arg(long, required_unless_present = "run", conflicts_with = "run")]
    data: Option<PathBuf>,
    /// Judge MODEL as the run's student: its teacher (live), its validation data
    #[arg(long)]
    run: Option<PathBuf>,
    /// Window length in tokens (capped at the model's context)
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Evaluate only the first N tokens of the file
    #[arg(long)]
    max_tokens: Option<usize>,
}

pub fn run(a: Args, device: tch::Device) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let m = super::load(&a.model, device)?;
    if let Some(run) = &a.run {
        return against_teacher(&m, run, device);
    }
    let data = a.data.as_ref().context("--data or --run")?;
    let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
    let text = distill::io::read_to_string(data)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text); // a UTF-8 byte-order mark
    let mut ids = tok.encode(text, true)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    let window = a.seq_len.min(m.model.config.max_position_embeddings);
    let p = distill::eval::perplexity(&m.model, &ids, window, a.batch)
        .with_context(|| format!("evaluating on {}", data.display()))?;
    println!("perplexity: {:.6}", p.value());
    println!("tokens: {}", p.tokens);
    println!("tokens/s: {:.1}", p.tokens as f64 / p.seconds);
    Ok(())
}

fn against_teacher(
    m: &distill::model::LoadedModel,
    run: &std::path::Path,
    device: tch::Device,
) -> Result<()> {
    let mut cfg = distill::config::RunConfig::load(run, &[])?;
    cfg.run.device = device;
    let teacher = distill::teacher::store::capture::load_teacher(&cfg, "eval --run")?;
    let (_, map) = distill::teacher::vocab::check(&teacher, m)?;
    let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
    let ds = distill::data::load(&cfg.data, tok, distill::model::eos_id(m))?;
    let live = distill::teacher::Live::new(&teacher.model).with_vocab(&map);
    let r = distill::eval::distill_metrics(&live, &m.model, &ds.validation, cfg.optim.micro_batch)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
