//! Prompt files for generation (JSONL, one record per line):
//!   {"prompt": "..."}                                   plain text, or a user turn with `chat`
//!   {"messages": [{"role": ..., "content": ...}, ...]}  a conversation without its final answer
//!                                                       (the last turn is not the assistant's)
//! either with an optional `"answer": "..."`: the checkable answer of the task (kept, not shown to
//! the model). A bad line gives `file:line: what is wrong`.
use crate::model::{Message, Tokenizer};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// the prompt as the model sees it (a chat template applied)
    pub text: String,
    pub ids: Vec<u32>,
    pub answer: Option<String>,
    /// the file's line (from 1)
    pub line: usize,
}

/// Read a prompt file; `chat` wraps `{"prompt"}` records as a user turn of the chat template.
pub fn read(path: &Path, tok: &Tokenizer, chat: bool) -> Result<Vec<Prompt>> {
    let out = super::jsonl::records(path, |line, v| {
        let mut p = record(v, tok, chat)?;
        p.line = line;
        Ok(p)
    })?;
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no prompts (one JSON record per line)",
            path.display()
        )));
    }
    Ok(out)
}

fn record(v: &Value, tok: &Tokenizer, chat: bool) -> Result<Prompt> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::Invalid("expected a JSON object".into()))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["prompt", "messages", "answer"].contains(&k.as_str()))
    {
        return Err(Error::Invalid(format!(
            "unknown key '{k}' (a prompt record has \"prompt\" or \"messages\", and may have \"answer\")"
        )));
    }
    let answer = match obj.get("answer") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(Error::Invalid("'answer' must be a string".into())),
    };
    let messages = match (obj.get("prompt"), obj.get("messages")) {
        (Some(_), Some(_)) => {
            return Err(Error::Invalid(
                "has both \"prompt\" and \"messages\": give one".into(),
            ))
        }
        (None, None) => {
            return Err(Error::Invalid(
                "expected {\"prompt\"} or {\"messages\"} (and optionally \"answer\")".into(),
            ))
        }
        (Some(p), None) => {
            let p = p
                .as_str()
                .ok_or_else(|| Error::Invalid("'prompt' must be a string".into()))?;
            if p.is_empty() {
                return Err(Error::Invalid("'prompt' is empty".into()));
            }
            if !chat {
                return Ok(Prompt {
                    text: p.to_string(),
                    ids: tok.encode(p, true)?,
                    answer,
                    line: 0,
                });
            }
            vec![Message {
                role: "user".into(),
                content: p.into(),
            }]
        }
        (None, Some(m)) => {
            let m: Vec<Message> = serde_json::from_value(m.clone()).map_err(|e| {
                Error::Invalid(format!(
                    "'messages' must be a list of {{role, content}}: {e}"
                ))
            })?;
            match m.last() {
                None => return Err(Error::Invalid("'messages' is empty".into())),
                Some(last) if last.role == "assistant" => {
                    return Err(Error::Invalid(
                        "the last message is the assistant's: a prompt ends before the answer"
                            .into(),
                    ))
                }
                Some(_) => m,
            }
        }
    };
    let text = tok.apply_chat_template(&messages, true)?;
    Ok(Prompt {
        ids: tok.encode(&text, false)?,
        text,
        answer,
        line: 0,
    })
}
