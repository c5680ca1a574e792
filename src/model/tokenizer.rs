//! The tokenizer: Hugging Face `tokenizer.json` (crate `tokenizers`) plus what
//! `tokenizer_config.json` adds (special tokens, chat template); or the same built from GGUF metadata
//! (GPT-2-style byte-level BPE with merges). The chat template renders with minijinja.
//!
//! Long texts are encoded in pieces (`encode`): the `tokenizers` crate holds about 100–250 bytes per
//! input byte while it encodes (offsets, alignments, strings), so one 10 MB line would take 1–2.5 GB.
//! The pieces end where every pre-tokenizer accepted here splits anyway (`split_for_encoding`), so
//! the ids equal those of the whole text, and the memory is that of one piece.
use super::gguf::{GgufFile, Value as GValue};
use crate::io::{read_to_string, write_atomic};
use crate::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// the `tokenizer.json` text, written back unchanged on save
    json: String,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub model_max_length: Option<usize>,
    /// Set when long texts may be encoded in pieces (`pieces_are_exact`): the ids that
    /// `add_special_tokens` puts before and after a text.
    pieces: Option<Affixes>,
}

#[derive(Clone, Debug)]
struct Affixes {
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

/// Texts longer than this are encoded in pieces of at least this many bytes (see `encode`).
pub const PIECE_BYTES: usize = 256 * 1024;

/// The split patterns of the `llama-bpe` and `qwen2` pre-tokenizers (llama.cpp's names).
const LLAMA_BPE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Is byte `i` of `b` a split point: an ASCII letter or digit before it, and a space, tab, newline or
/// carriage return at it (see `pieces_are_exact` for why every accepted pre-tokenizer splits there).
fn is_split_point(b: &[u8], i: usize) -> bool {
    i > 0
        && i < b.len()
        && b[i - 1].is_ascii_alphanumeric()
        && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r')
}

/// `text` cut into pieces of at least `piece_bytes` bytes, each (but the last) ending at the first
/// split point after that length; a stretch without split points stays in one piece.
pub fn split_for_encoding(text: &str, piece_bytes: usize) -> Vec<&str> {
    let b = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < b.len() {
        let from = start.saturating_add(piece_bytes.max(1));
        let end = (from..b.len())
            .find(|&i| is_split_point(b, i))
            .unwrap_or(b.len());
        // a split point's byte is ASCII, so `end` is a char boundary
        pieces.push(&text[start..end]);
        start = end;
    }
    pieces
}

/// Whether encoding the pieces of `split_for_encoding` one by one gives the ids of the whole text,
/// judged from the `tokenizer.json` value. A split point (an ASCII letter or digit, then a space,
/// tab, newline or carriage return) is a split of every pre-tokenizer accepted here:
/// - GPT-2's pattern (`ByteLevel` with `use_regex`, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
///   ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`): the alternatives that can hold a letter or digit
///   (the contractions, ` ?\p{L}+`, ` ?\p{N}+`) take no whitespace after it, so the match holding
///   byte i−1 ends at i, in the whole text and in the piece alike (its run stops at the whitespace,
///   or at the piece's end); the only lookahead, in `\s+(?!\S)`, belongs to a whitespace-only
///   alternative, which cannot hold byte i−1; every character is matched by some alternative, so the
///   matches tile the text and the next one starts at i in both. No lookbehind exists.
/// - llama-bpe and qwen2's split patterns: the alternatives that can hold a letter or digit
///   (`(?i:'s|…)`, `[^\r\n\p{L}\p{N}]?\p{L}+`, `\p{N}{1,3}` or `\p{N}`) take no whitespace
///   after it either (`\p{N}{1,3}` groups digits from the start of their run, before i in both);
///   the argument is the same. Punctuation is not a split point: ` ?[^\s\p{L}\p{N}]+[\r\n]*`
///   takes the newlines after it.
/// - `Digits` splits around digits only, before the byte-level pattern.
/// - Added tokens are matched before the pre-tokenizer: none may contain whitespace (so none
///   crosses a split point) or strip whitespace or need word boundaries (lstrip, rstrip,
///   single_word), whose matches look across it.
/// - Normaliser: none, or NFC (which never composes across whitespace).
/// - No truncation, no padding, no BPE dropout.
///
/// Anything else (another pre-tokenizer, `add_prefix_space`, a normaliser such as a lowercase) is
/// not judged, and such tokenizers encode long texts whole.
fn pieces_are_exact(tj: &Value) -> bool {
    let is = |v: &Value, ty: &str| v.get("type").and_then(Value::as_str) == Some(ty);
    let flag = |v: &Value, key: &str| v.get(key).and_then(Value::as_bool);
    let byte_level = |v: &Value, regex: bool| {
        is(v, "ByteLevel")
            && flag(v, "add_prefix_space") == Some(false)
            && flag(v, "use_regex").unwrap_or(true) == regex
    };
    let pre = &tj["pre_tokenizer"];
    let steps: Vec<&Value> = if is(pre, "Sequence") {
        pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    } else {
        vec![pre]
    };
    let pre_ok = match steps.as_slice() {
        [b] => byte_level(b, true),
        [d, b] if is(d, "Digits") => byte_level(b, true),
        [sp, b] if is(sp, "Split") => {
            matches!(
                sp["pattern"]["Regex"].as_str(),
                Some(r) if r == LLAMA_BPE_REGEX || r == QWEN2_REGEX
            ) && sp["behavior"].as_str() == Some("Isolated")
                && flag(sp, "invert") != Some(true)
                && byte_level(b, false)
        }
        _ => false,
    };
    let normalizer_ok = tj["normalizer"].is_null() || is(&tj["normalizer"], "NFC");
    let added_ok = tj["added_tokens"].as_array().is_none_or(|a| {
        a.iter().all(|t| {
            let content = t["content"].as_str().unwrap_or(" ");
            !content.contains([' ', '\t', '\n', '\r'])
                && ["lstrip", "rstrip", "single_word"]
                    .iter()
                    .all(|k| flag(t, k) != Some(true))
        })
    });
    let post = &tj["post_processor"];
    let post_steps: Vec<&Value> = if is(post, "Sequence") {
        post["processors"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    } else {
        vec![post]
    };
    let post_ok = post_steps
        .iter()
        .all(|p| p.is_null() || is(p, "ByteLevel") || is(p, "TemplateProcessing"));
    let dropout_ok = tj["model"]["dropout"].as_f64().is_none_or(|d| d == 0.0);
    pre_ok
        && normalizer_ok
        && added_ok
        && post_ok
        && dropout_ok
        && tj["truncation"].is_null()
        && tj["padding"].is_null()
}

/// One turn of a conversation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// GPT-2 family pre-tokenizers by GGUF `tokenizer.ggml.pre` name.
pub(crate) fn pre_tokenizer_for(pre: &str, path: &Path) -> Result<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "gpt2" | "default" => byte_level(true),
        // SmolLM2 / StarCoder: single digits, then GPT-2 byte-level splitting.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(LLAMA_BPE_REGEX),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(QWEN2_REGEX),
            byte_level(false)]}),
        other => {
            return Err(Error::config(
                path,
                "tokenizer.ggml.pre",
                format!("pre-tokenizer '{other}' is not supported (supported: gpt2, smollm, llama-bpe, qwen2)"),
            ))
        }
    })
}

impl Tokenizer {
    /// Build from the `tokenizer.json` text and the optional `tokenizer_config.json` value.
    pub fn from_json(json_text: String, config: Option<&Value>, path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json_text.as_bytes())
            .map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))?;
        let pieces_ok = serde_json::from_str::<Value>(&json_text)
            .map(|v| pieces_are_exact(&v))
            .unwrap_or(false);
        let cfg = |k: &str| config.and_then(|c| c.get(k));
        let chat_template = match cfg("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let mut tok = Tokenizer {
            inner,
            json: json_text,
            chat_template,
            bos_token: token_string(cfg("bos_token")),
            eos_token: token_string(cfg("eos_token")),
            pad_token: token_string(cfg("pad_token")),
            unk_token: token_string(cfg("unk_token")),
            model_max_length: cfg("model_max_length")
                .and_then(Value::as_u64)
                .map(|x| x as usize),
            pieces: None,
        };
        if pieces_ok {
            tok.pieces = tok.special_affixes()?;
        }
        Ok(tok)
    }

    /// The ids `add_special_tokens` puts before and after a text (a post-processor's template),
    /// found by encoding one letter with and without them; None when the letter's ids do not
    /// appear whole inside the longer encoding.
    fn special_affixes(&self) -> Result<Option<Affixes>> {
        let (with, without) = (
            self.encode_whole("a", true)?,
            self.encode_whole("a", false)?,
        );
        if without.is_empty() || with.len() < without.len() {
            return Ok(None);
        }
        Ok((0..=with.len() - without.len())
            .find(|&k| with[k..k + without.len()] == without[..])
            .map(|k| Affixes {
                prefix: with[..k].to_vec(),
                suffix: with[k + without.len()..].to_vec(),
            }))
    }

    /// Read `tokenizer.json` (+ `tokenizer_config.json`, and `chat_template.jinja` if present) from a
    /// Hugging Face folder; None when the folder has no tokenizer.json.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Ok(None);
        }
        let text = read_to_string(&tj)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            Some(
                serde_json::from_str::<Value>(&read_to_string(&cfg_path)?)
                    .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?,
            )
        } else {
            None
        };
        let mut tok = Self::from_json(text, cfg.as_ref(), &tj)?;
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.exists() {
            tok.chat_template = Some(read_to_string(&jinja)?);
        }
        Ok(Some(tok))
    }

    /// Build from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path.as_path();
        let key_err = |k: &str, m: &str| Error::config(path, k, m.to_string());
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(GValue::as_str)
            .ok_or_else(|| key_err("tokenizer.ggml.model", "missing"))?;
        if model != "gpt2" {
            return Err(key_err(
                "tokenizer.ggml.model",
                &format!("tokenizer model '{model}' is not supported (only GPT-2-style byte-level BPE, 'gpt2')"),
            ));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            g.get(k)
                .and_then(GValue::as_array)
                .ok_or_else(|| key_err(k, "missing or not an array"))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| key_err(k, "expected strings"))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(GValue::as_array)
        {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(GValue::as_str)
            .unwrap_or("gpt2");
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // control (3) and user-defined (4) tokens are added tokens; control ones are special.
        let added: Vec<Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
            .map(|(i, (t, &ty))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": ty != 3, "special": ty == 3})
            })
            .collect();
        let id_tok = |k: &str| {
            g.get(k)
                .and_then(GValue::as_u64)
                .and_then(|i| tokens.get(i as usize).cloned())
        };
        let bos = id_tok("tokenizer.ggml.bos_token_id");
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(GValue::as_bool)
            .unwrap_or(false);
        let byte_level_pp = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post_processor = match (&bos, add_bos) {
            (Some(b), true) => json!({"type": "Sequence", "processors": [byte_level_pp, {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [tokens.iter().position(|t| t == b)], "tokens": [b]}}}]}),
            _ => byte_level_pp,
        };
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer_for(pre, path)?,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let mut cfg = serde_json::Map::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            if let Some(t) = id_tok(key) {
                cfg.insert(name.into(), json!(t));
            }
        }
        if let Some(t) = g.get("tokenizer.chat_template").and_then(GValue::as_str) {
            cfg.insert("chat_template".into(), json!(t));
        }
        if let Some(n) = g
            .get(&format!(
                "{}.context_length",
                g.get("general.architecture")
                    .and_then(GValue::as_str)
                    .unwrap_or("llama")
            ))
            .and_then(GValue::as_u64)
        {
            cfg.insert("model_max_length".into(), json!(n));
        }
        let text = serde_json::to_string(&tj).expect("json serialises");
        Self::from_json(text, Some(&Value::Object(cfg)), path)
    }

    /// A byte-level tokenizer without merges (ids 0–255 are the bytes, then `specials`), with a
    /// ChatML chat template: for tests and toy models, where a real vocabulary is not wanted.
    pub fn byte_level(specials: &[&str]) -> Result<Self> {
        // GPT-2's printable stand-ins for the 256 bytes
        let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut chars = printable.clone();
        let mut extra = 0;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                printable.push(b);
                chars.push(256 + extra);
                extra += 1;
            }
        }
        let mut by_byte: Vec<(u32, char)> = printable
            .iter()
            .zip(&chars)
            .map(|(&b, &c)| (b, char::from_u32(c).expect("valid char")))
            .collect();
        by_byte.sort();
        let mut vocab = serde_json::Map::new();
        for (b, c) in &by_byte {
            vocab.insert(c.to_string(), json!(b));
        }
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, t)| {
                vocab.insert(t.to_string(), json!(256 + i));
                json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []},
        });
        let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let cfg = json!({"eos_token": specials.first(), "chat_template": template});
        Self::from_json(
            serde_json::to_string(&tj).expect("json"),
            Some(&cfg),
            Path::new("<byte-level>"),
        )
    }

    /// The ids of `text`, with the special tokens of the post-processor when `add_special_tokens`.
    /// A text longer than `PIECE_BYTES` is encoded in pieces (the same ids, the memory of one
    /// piece) when the tokenizer allows it (`encodes_in_pieces`), else whole.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.encode_in_pieces(text, add_special_tokens, PIECE_BYTES)
    }

    /// `encode` with pieces of at least `piece_bytes` bytes (`split_for_encoding`); the whole text
    /// in one call when it is no longer than that or the tokenizer does not allow pieces.
    pub fn encode_in_pieces(
        &self,
        text: &str,
        add_special_tokens: bool,
        piece_bytes: usize,
    ) -> Result<Vec<u32>> {
        let affixes = match &self.pieces {
            Some(a) if text.len() > piece_bytes => a,
            _ => return self.encode_whole(text, add_special_tokens),
        };
        let mut ids = Vec::new();
        if add_special_tokens {
            ids.extend_from_slice(&affixes.prefix);
        }
        for piece in split_for_encoding(text, piece_bytes) {
            ids.extend(self.encode_whole(piece, false)?);
        }
        if add_special_tokens {
            ids.extend_from_slice(&affixes.suffix);
        }
        Ok(ids)
    }

    /// The ids of `text` from one call of the underlying tokenizer, whatever its length.
    pub fn encode_whole(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Whether long texts are encoded in pieces (see `pieces_are_exact` for the tokenizers that are).
    pub fn encodes_in_pieces(&self) -> bool {
        self.pieces.is_some()
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer can produce (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token string of every id from 0 to the largest id (added and special tokens included;
    /// an added token wins over the base vocabulary at its id); None for an id without a token.
    pub fn id_tokens(&self) -> Vec<Option<String>> {
        let end = self
            .inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        (0..end as u32).map(|i| self.inner.id_to_token(i)).collect()
    }

    /// The `tokenizer.json` text (byte-identical to what was read or built).
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Render `messages` with the chat template, as `apply_chat_template(..., tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", tpl)
            .map_err(|e| Error::Tokenizer(format!("chat template does not parse: {e}")))?;
        let t = env.get_template("chat").expect("just added");
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Tokenizer(format!("chat template failed: {e}")))
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join("tokenizer.json"), self.json.as_bytes())?;
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            if let Some(v) = v {
                cfg.insert(k.into(), json!(v));
            }
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), json!(n));
        }
        let text = serde_json::to_string_pretty(&Value::Object(cfg)).expect("json serialises");
        write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }
}
