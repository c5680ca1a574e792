//! `distill generate MODEL --prompt TEXT`: stream a continuation (or a chat answer) to stdout.
//! `distill generate MODEL --prompts FILE.jsonl [--batch N] [--out OUT.jsonl]`: answer every
//! prompt of a file, N at a time in one batch, one JSON line each, in the file's order.
use anyhow::{bail, Context, Result};
use distill::data::prompts::{self, Prompt};
use distill::generate::{generate, generate_batch, GenerateOptions, SplitMix64};
use distill::model::{LoadedModel, Message};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    model: PathBuf,
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    prompt: Option<String>,
    /// A JSONL file of prompts ({"prompt"} or {"messages"}, optionally with "answer")
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// With --prompts: how many prompts generate together (one padded batch)
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// With --prompts: write the JSONL here instead of stdout
    #[arg(long, requires = "prompts")]
    out: Option<PathBuf>,
    /// Wrap the prompt as a user turn with the model's chat template
    #[arg(long)]
    chat: bool,
    /// System message (with --chat)
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Never stop at an end-of-sequence token: every answer gets --max-new-tokens (benchmarks)
    #[arg(long)]
    ignore_eos: bool,
}

pub fn run(a: Args, device: tch::Device) -> Result<()> {
    let m = super::load(&a.model, device)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop_ids: if a.ignore_eos { vec![] } else { stop_ids(&m) },
    };
    match (&a.prompt, &a.prompts) {
        (Some(p), _) => {
            answer(&m, p, a.chat, a.system.as_deref(), &opts)?;
        }
        (None, Some(file)) => {
            if a.system.is_some() {
                bail!("--system goes with --prompt; in a prompt file, give a system message in \"messages\"");
            }
            if a.batch == 0 {
                bail!("--batch must be at least 1");
            }
            let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
            let ps = prompts::read(file, tok, a.chat)?;
            let mut out: Box<dyn Write> = match &a.out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            answer_all(&m, &ps, a.batch, &opts, &mut out)?;
            out.flush()?;
        }
        (None, None) => unreachable!("clap requires one"),
    }
    Ok(())
}

/// Row `index`'s sampling seed: a SplitMix64 draw from the run's seed and the prompt's index, so
/// a prompt's sample does not depend on the batch it lands in.
pub fn row_seed(seed: u64, index: usize) -> u64 {
    SplitMix64::new(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// Every prompt, `batch` at a time; one JSON line per prompt, in order; the throughput to stderr.
fn answer_all(
    m: &LoadedModel,
    ps: &[Prompt],
    batch: usize,
    opts: &GenerateOptions,
    out: &mut dyn Write,
) -> Result<()> {
    let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
    let started = Instant::now();
    let mut new_tokens = 0usize;
    for (c, chunk) in ps.chunks(batch).enumerate() {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let seeds: Vec<u64> = (0..chunk.len())
            .map(|k| row_seed(opts.seed, c * batch + k))
            .collect();
        let gen =
            generate_batch(&m.model, &ids, &seeds, opts, |_, _| Ok(())).with_context(|| {
                format!(
                    "prompts of lines {}..={}",
                    chunk[0].line,
                    chunk[chunk.len() - 1].line
                )
            })?;
        for (p, g) in chunk.iter().zip(gen) {
            new_tokens += g.tokens.len();
            let mut rec = json!({
                "line": p.line,
                "prompt": p.text,
                "completion": tok.decode(&g.tokens, true)?,
                "tokens": g.tokens.len(),
                "finish": g.finish.as_str(),
            });
            if let Some(a) = &p.answer {
                rec["answer"] = json!(a);
            }
            writeln!(out, "{rec}")?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "generated {new_tokens} tokens for {} prompts in {secs:.1} s ({:.1} tokens/s, batch {batch})",
        ps.len(),
        new_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// The ids that end a generation: the config's EOS ids and the tokenizer's EOS token.
pub fn stop_ids(m: &LoadedModel) -> Vec<u32> {
    let mut ids = m.model.config.eos_token_ids.clone();
    if let Some(t) = &m.tokenizer {
        if let Some(id) = t.eos_token.as_deref().and_then(|e| t.token_to_id(e)) {
            ids.push(id);
        }
    }
    ids
}

/// Generate after `prompt` (as a chat user turn with `chat`), streaming whole characters to
/// stdout; returns the text.
pub fn answer(
    m: &LoadedModel,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
    opts: &GenerateOptions,
) -> Result<String> {
    let tok = m.tokenizer.as_ref().context("the model has no tokenizer")?;
    let text = if chat {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message {
                role: "system".into(),
                content: s.into(),
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: prompt.into(),
        });
        tok.apply_chat_template(&messages, true)?
    } else {
        prompt.to_string()
    };
    let ids = tok.encode(&text, !chat)?;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    generate(&m.model, &ids, opts, |id| {
        generated.push(id);
        let s = tok.decode(&generated, true)?;
        // print only complete characters: a trailing U+FFFD may be a partial UTF-8 sequence
        if !s.ends_with('\u{FFFD}') && s.len() > printed && s.is_char_boundary(printed) {
            let _ = write!(stdout, "{}", &s[printed..]);
            let _ = stdout.flush();
            printed = s.len();
        }
        Ok(())
    })?;
    let s = tok.decode(&generated, true)?;
    if s.len() > printed && s.is_char_boundary(printed) {
        print!("{}", &s[printed..]);
    }
    println!();
    Ok(s)
}
