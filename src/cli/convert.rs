//! `distill convert MODEL OUT_DIR [--layers …]`: a Hugging Face folder from a GGUF or HF model, or
//! a student made of some of its layers.
use anyhow::{bail, Context, Result};
use std::path::Path;

pub fn run(
    model: &Path,
    out_dir: &Path,
    layers: Option<&[usize]>,
    device: tch::Device,
) -> Result<()> {
    if out_dir.join("config.json").exists() || out_dir.is_file() {
        bail!(
            "{}: already holds a model; choose an empty folder",
            out_dir.display()
        );
    }
    let mut m = super::load(model, device)?;
    if let Some(layers) = layers {
        m = distill::student::from_teacher_layers(&m, layers, device)?;
    }
    m.save_hf(out_dir)
        .with_context(|| format!("writing {}", out_dir.display()))?;
    println!("wrote {}", out_dir.display());
    Ok(())
}
