//! Hugging Face folders: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), tokenizer files and `generation_config.json`; read and written.
use super::config::LlamaConfig;
use super::tokenizer::Tokenizer;
use crate::io::{self, read_to_string, write_atomic};
use crate::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// The safetensors files of a folder: the shards of the index, or the single `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if io::exists(&index)? {
        let v: Value = serde_json::from_str(&read_to_string(&index)?)
            .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .map(|f| f.as_str().map(|f| dir.join(f)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::config(&index, "weight_map", "values must be file names"))?;
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if io::exists(&single)? {
        return Ok(vec![single]);
    }
    Err(Error::format(
        dir,
        "no model.safetensors or model.safetensors.index.json in this folder",
    ))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// Every tensor of the folder's safetensors files, converted to f32 on the CPU, with the count of
/// tensors per stored dtype.
pub fn read_weights(dir: &Path) -> Result<(HashMap<String, Tensor>, BTreeMap<String, usize>)> {
    let mut out = HashMap::new();
    let mut dtypes = BTreeMap::new();
    for file in weight_files(dir)? {
        for (name, (t, dtype)) in read_file(&file)? {
            *dtypes.entry(format!("{dtype:?}")).or_insert(0) += 1;
            out.insert(name, t);
        }
    }
    Ok((out, dtypes))
}

fn read_file(file: &Path) -> Result<HashMap<String, (Tensor, Dtype)>> {
    let f = io::open_file(file)?;
    // SAFETY: read-only map of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io::error(file, e))?;
    parse_file(&mmap, file)
}

/// Every tensor of a safetensors file held in memory, as f32 on the CPU; `file` names it in errors.
/// The header is checked whole (offsets, lengths, shapes against the data) before any tensor is
/// made, so what this allocates is bounded by the bytes given.
pub fn parse_safetensors(bytes: &[u8], file: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(parse_file(bytes, file)?
        .into_iter()
        .map(|(k, (t, _))| (k, t))
        .collect())
}

fn parse_file(bytes: &[u8], file: &Path) -> Result<HashMap<String, (Tensor, Dtype)>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(file, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            Error::format(
                file,
                format!("tensor '{name}': dtype {:?} is not supported", view.dtype()),
            )
        })?;
        // safetensors has checked that the data's length is the shape's product times the dtype's
        // size; a dim beyond i64 can still hide behind another dim of 0
        let shape = view
            .shape()
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<std::result::Result<Vec<i64>, _>>()
            .map_err(|_| {
                Error::format(
                    file,
                    format!("tensor '{name}': shape {:?} is out of range", view.shape()),
                )
            })?;
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?;
        out.insert(name, (t, view.dtype()));
    }
    Ok(out)
}

/// Copy named tensors into every variable of `vs` (names equal checkpoint names). A missing tensor
/// or a shape mismatch is an error naming the tensor and `source`; extra tensors are ignored.
pub fn load_into(
    vs: &nn::VarStore,
    tensors: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vars {
            let t = tensors
                .get(&name)
                .ok_or_else(|| Error::format(source, format!("missing tensor '{name}'")))?;
            if t.size() != var.size() {
                return Err(Error::format(
                    source,
                    format!(
                        "tensor '{name}' has shape {:?}, the config needs {:?}",
                        t.size(),
                        var.size()
                    ),
                ));
            }
            var.f_copy_(&t.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
        }
        Ok(())
    })
}

/// Write named tensors as one f32 safetensors file (sorted by name, metadata format = pt), atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(sorted.len());
    for (name, var) in sorted {
        let t = var
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?
            .f_contiguous()?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values = Vec::<f32>::try_from(t.f_flatten(0, -1)?)?;
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((name.clone(), shape, bytes));
    }
    let views = data
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor '{n}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Invalid(format!("serialising safetensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// Every tensor of one safetensors file, as f32 on the CPU.
pub fn read_safetensors(file: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(read_file(file)?
        .into_iter()
        .map(|(k, (t, _))| (k, t))
        .collect())
}

/// Write the model as a Hugging Face folder that `transformers` loads unchanged: config.json,
/// model.safetensors (f32), generation_config.json and, when given, the tokenizer files.
pub fn save(
    dir: &Path,
    vs: &nn::VarStore,
    config: &LlamaConfig,
    tokenizer: Option<&Tokenizer>,
    generation_config: Option<&Value>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    write_safetensors(&dir.join("model.safetensors"), &vars)?;
    let cfg = serde_json::to_string_pretty(&config.to_hf_json()).expect("json serialises");
    write_atomic(&dir.join("config.json"), cfg.as_bytes())?;
    let gen = match generation_config {
        Some(g) => g.clone(),
        None => {
            let mut g = serde_json::Map::new();
            if let Some(b) = config.bos_token_id {
                g.insert("bos_token_id".into(), b.into());
            }
            match config.eos_token_ids.as_slice() {
                [] => {}
                [e] => {
                    g.insert("eos_token_id".into(), (*e).into());
                }
                many => {
                    g.insert("eos_token_id".into(), many.to_vec().into());
                }
            }
            Value::Object(g)
        }
    };
    write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)
            .expect("json serialises")
            .as_bytes(),
    )?;
    if let Some(t) = tokenizer {
        t.save(dir)?;
    }
    Ok(())
}
