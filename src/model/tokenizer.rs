//! The tokenizer: Hugging Face `tokenizer.json` (crate `tokenizers`) plus what
//! `tokenizer_config.json` adds (special tokens, chat template); or the same built from GGUF metadata
//! (GPT-2-style byte-level BPE with merges). The chat template renders with minijinja.
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
fn pre_tokenizer_for(pre: &str, path: &Path) -> Result<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "gpt2" | "default" => byte_level(true),
        // SmolLM2 / StarCoder: single digits, then GPT-2 byte-level splitting.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
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
        Ok(Tokenizer {
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
        })
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

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
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
