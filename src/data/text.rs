//! Plain text: each file is one document, every token a target, EOS appended. A long file is
//! tokenised in pieces by `Tokenizer::encode` (the ids of the whole text, the memory of one piece).
use super::Example;
use crate::model::Tokenizer;
use crate::{Error, Result};
use std::path::Path;

pub fn read(path: &Path, tok: &Tokenizer, eos: Option<u32>) -> Result<Vec<Example>> {
    let mut bytes = crate::io::read(path)?;
    // a UTF-8 byte-order mark (as some Windows editors write) is not text
    if bytes.starts_with("\u{feff}".as_bytes()) {
        bytes.drain(..3);
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "not UTF-8 text (first bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    let mut e = Example {
        ids: vec![],
        target: vec![],
        weight: 1.0,
    };
    e.push(
        &tok.encode(&text, false)
            .map_err(|err| Error::format(path, err.to_string()))?,
        true,
    );
    if let Some(eos) = eos {
        e.push(&[eos], true);
    }
    Ok(vec![e])
}
