//! `distill generate MODEL --prompt TEXT`: stream a continuation (or a chat answer) to stdout.
use anyhow::{Context, Result};
use distill::generate::{generate, GenerateOptions};
use distill::model::{LoadedModel, Message};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    model: PathBuf,
    #[arg(long)]
    prompt: String,
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
}

pub fn run(a: Args, device: tch::Device) -> Result<()> {
    let m = super::load(&a.model, device)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop_ids: stop_ids(&m),
    };
    answer(&m, &a.prompt, a.chat, a.system.as_deref(), &opts)?;
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
