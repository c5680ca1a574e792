//! The run file as text: `--set` overrides, the line of a key, paths relative to the file.
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// `~/…` from $HOME; a relative path from the run file's folder.
pub fn expand_path(p: &Path, base: &Path) -> PathBuf {
    if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), std::env::var_os("HOME")) {
        return PathBuf::from(home).join(rest);
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// 1-based line of a byte offset in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where the key `path` ("optim.lr", "loss.0.kind") is written in `text`; for a key that
/// is not written (a default), the line of the nearest written section above it.
pub fn line_of_key(text: &str, path: &str) -> Option<usize> {
    let doc = DeTable::parse(text).ok()?;
    let mut table: &DeTable = doc.get_ref();
    let mut found: Option<usize> = None;
    let parts: Vec<&str> = path.split('.').collect();
    let mut i = 0;
    while i < parts.len() {
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == parts[i]) else {
            break;
        };
        found = Some(line_of(text, k.span().start));
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            DeValue::Array(a) => {
                let Some(idx) = parts.get(i + 1).and_then(|x| x.parse::<usize>().ok()) else {
                    break;
                };
                match a.get(idx).map(|x| (x.span(), x.get_ref())) {
                    Some((span, DeValue::Table(t))) => {
                        found = Some(line_of(text, span.start));
                        table = t;
                        i += 1;
                    }
                    _ => break,
                }
            }
            _ => break,
        }
        i += 1;
    }
    found
}

/// Turn a toml error into `file:line: message` (message without toml's source excerpt).
pub fn toml_error(label: &str, text: Option<&str>, e: &toml::de::Error) -> Error {
    let msg = e.message().replace('`', "'");
    let msg = msg.trim_end_matches('\n');
    match (text, e.span()) {
        (Some(t), Some(span)) => {
            Error::Invalid(format!("{label}:{}: {msg}", line_of(t, span.start)))
        }
        _ => Error::Invalid(format!("{label}: {msg}")),
    }
}

/// One `--set key.path=value`: the key and its value, read as TOML (numbers, booleans, arrays,
/// strings in quotes) or taken as a bare string.
pub fn parse_override(o: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = o.split_once('=').ok_or_else(|| {
        Error::Invalid(format!("--set {o}: expected KEY=VALUE, e.g. optim.lr=1e-4"))
    })?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(Error::Invalid(format!(
            "--set {o}: '{key}' is not a key path such as optim.lr"
        )));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    Ok((key.to_string(), value))
}

/// Apply `--set` overrides to a TOML table.
pub fn apply_overrides(table: &mut toml::Table, overrides: &[String]) -> Result<()> {
    for o in overrides {
        let (key, value) = parse_override(o)?;
        let parts: Vec<&str> = key.split('.').collect();
        let mut cur = &mut *table;
        for p in &parts[..parts.len() - 1] {
            let entry = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = entry
                .as_table_mut()
                .ok_or_else(|| Error::Invalid(format!("--set {o}: '{p}' is not a section")))?;
        }
        cur.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(())
}
