//! JSONL records, one per line:
//!   {"text": "..."}                                  every token a target
//!   {"prompt": "...", "response": "..."}             targets: the response (and EOS) only
//!   {"prompt", "response", "answer": "..."}          the same, with the checkable final answer of
//!                                                    the task (kept beside the example, not
//!                                                    trained on: PACED's pass rates)
//!   {"messages": [{"role": ..., "content": ...}]}    rendered with the chat template; targets: the
//!                                                    assistant turns only
//! Any of them may carry `"weight": w` (a number ≥ 0, default 1): the weight of its target tokens
//! in the objective (distilling step-by-step's λ on its rationale records); other keys are ignored
//! (e.g. the sampling record `distill generate-data` writes beside each answer).
//! A bad line stops the run before training with `file:line: what is wrong`.
use super::Example;
use crate::model::{Message, Tokenizer};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

pub fn read(path: &Path, tok: &Tokenizer, eos: Option<u32>) -> Result<Vec<Example>> {
    Ok(read_with_answers(path, tok, eos)?
        .into_iter()
        .map(|(e, _)| e)
        .collect())
}

/// The examples with each record's `"answer"` (None where it has none).
pub fn read_with_answers(
    path: &Path,
    tok: &Tokenizer,
    eos: Option<u32>,
) -> Result<Vec<(Example, Option<String>)>> {
    records(path, |_, v| Ok((record(v, tok, eos)?, answer(v)?)))
}

/// A record's `"answer"`: a string, on a {prompt, response} record only (the answer of a task
/// whose prompt the student can be given).
fn answer(v: &Value) -> Result<Option<String>> {
    match v.get("answer") {
        None => Ok(None),
        Some(Value::String(a)) if v.get("prompt").is_some() => Ok(Some(a.clone())),
        Some(Value::String(_)) => Err(Error::Invalid(
            "'answer' goes with {\"prompt\", \"response\"} records (the prompt is what the student answers)"
                .into(),
        )),
        Some(_) => Err(Error::Invalid("'answer' must be a string".into())),
    }
}

/// Each non-blank line of a JSONL file parsed and passed to `f` with its line number (from 1); an
/// error, the file's or `f`'s, becomes `file:line: what is wrong`.
pub fn records<T>(path: &Path, mut f: impl FnMut(usize, &Value) -> Result<T>) -> Result<Vec<T>> {
    let text = crate::io::read_to_string(path)?;
    // a UTF-8 byte-order mark (as some Windows editors write) is not part of the first record
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::Invalid(format!("{}:{}: {msg}", path.display(), i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        out.push(f(i + 1, &v).map_err(|e| at(e.to_string()))?);
    }
    Ok(out)
}

fn string_field<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("'{key}' must be a string"))
}

fn record(v: &Value, tok: &Tokenizer, eos: Option<u32>) -> Result<Example> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::Invalid("expected a JSON object".into()))?;
    let enc = |s: &str| tok.encode(s, false);
    let weight = match obj.get("weight") {
        None => 1.0,
        Some(w) => match w.as_f64() {
            Some(x) if x.is_finite() && x >= 0.0 && x <= f32::MAX as f64 => x as f32,
            _ => {
                return Err(Error::Invalid(format!(
                    "'weight' must be a finite number ≥ 0, got {w}"
                )))
            }
        },
    };
    let mut e = Example {
        ids: vec![],
        target: vec![],
        weight,
    };
    if obj.contains_key("text") {
        e.push(
            &enc(string_field(v, "text").map_err(Error::Invalid)?)?,
            true,
        );
        if let Some(eos) = eos {
            e.push(&[eos], true);
        }
    } else if obj.contains_key("prompt") || obj.contains_key("response") {
        e.push(
            &enc(string_field(v, "prompt").map_err(Error::Invalid)?)?,
            false,
        );
        e.push(
            &enc(string_field(v, "response").map_err(Error::Invalid)?)?,
            true,
        );
        if let Some(eos) = eos {
            e.push(&[eos], true);
        }
    } else if let Some(m) = obj.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(m.clone()).map_err(|err| {
            Error::Invalid(format!(
                "'messages' must be a list of {{role, content}}: {err}"
            ))
        })?;
        if messages.is_empty() {
            return Err(Error::Invalid("'messages' is empty".into()));
        }
        // Render growing prefixes: the text added by an assistant turn is a target, the rest is not.
        let mut rendered = String::new();
        for k in 0..messages.len() {
            let is_assistant = messages[k].role == "assistant";
            if is_assistant {
                // the generation prompt before the answer is context
                let with_prompt = tok.apply_chat_template(&messages[..k], true)?;
                if let Some(extra) = with_prompt.strip_prefix(&rendered) {
                    e.push(&enc(extra)?, false);
                    rendered = with_prompt;
                }
            }
            let next = tok.apply_chat_template(&messages[..=k], false)?;
            let added = next.strip_prefix(&rendered).ok_or_else(|| {
                Error::Invalid(
                    "the chat template does not render conversations incrementally".into(),
                )
            })?;
            e.push(&enc(added)?, is_assistant);
            rendered = next;
        }
    } else {
        return Err(Error::Invalid(
            "expected one of {\"text\"}, {\"prompt\", \"response\"} or {\"messages\"}".into(),
        ));
    }
    Ok(e)
}
