//! `distill eval MODEL --data FILE`: perplexity over consecutive windows of a text file.
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
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
    let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
    let text = distill::io::read_to_string(&a.data)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text); // a UTF-8 byte-order mark
    let mut ids = tok.encode(text, true)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    let window = a.seq_len.min(m.model.config.max_position_embeddings);
    let p = distill::eval::perplexity(&m.model, &ids, window, a.batch)
        .with_context(|| format!("evaluating on {}", a.data.display()))?;
    println!("perplexity: {:.6}", p.value());
    println!("tokens: {}", p.tokens);
    println!("tokens/s: {:.1}", p.tokens as f64 / p.seconds);
    Ok(())
}
