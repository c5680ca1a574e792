//! `distill convert MODEL OUT [--layers …] [--type f16|q8_0|q4_k]`: a Hugging Face folder, or a GGUF
//! file for llama.cpp when OUT ends in `.gguf`, from a GGUF or HF model, or a student made of some of
//! its layers.
use anyhow::{bail, Context, Result};
use distill::model::gguf_write::OutType;
use std::path::Path;

/// The weight type of a GGUF output.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
#[allow(non_camel_case_types)]
pub enum GgufType {
    #[value(name = "f16")]
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4_K,
}

impl From<GgufType> for OutType {
    fn from(t: GgufType) -> Self {
        match t {
            GgufType::F16 => OutType::F16,
            GgufType::Q8_0 => OutType::Q8_0,
            GgufType::Q4_K => OutType::Q4_K,
        }
    }
}

pub fn run(
    model: &Path,
    out: &Path,
    layers: Option<&[usize]>,
    ty: Option<GgufType>,
    device: tch::Device,
) -> Result<()> {
    let gguf = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if gguf {
        if out.exists() {
            bail!(
                "{}: already exists; remove it or choose another name",
                out.display()
            );
        }
    } else {
        if ty.is_some() {
            bail!(
                "--type applies to GGUF output: name the output file '….gguf' ({} is a folder)",
                out.display()
            );
        }
        if out.join("config.json").exists() || out.is_file() {
            bail!(
                "{}: already holds a model; choose an empty folder",
                out.display()
            );
        }
    }
    let mut m = super::load(model, device)?;
    if let Some(layers) = layers {
        m = distill::student::from_teacher_layers(&m, layers, device)?;
    }
    if gguf {
        let ty = OutType::from(ty.unwrap_or(GgufType::F16));
        let w = m
            .save_gguf(out, ty)
            .with_context(|| format!("writing {}", out.display()))?;
        let types: Vec<String> = w.types.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
        println!(
            "wrote {} ({}, {:.1} MB; tensors: {})",
            out.display(),
            ty.name(),
            w.bytes as f64 / 1e6,
            types.join(", ")
        );
        return Ok(());
    }
    m.save_hf(out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
