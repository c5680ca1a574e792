//! Checkpoints: `OUTPUT/checkpoints/step-00000100/` holds the student as a Hugging Face folder,
//! `optimizer.safetensors` (AdamW moments), the run's other trained tensors when it has some
//! (`projection.safetensors`: hidden-state projections; `replay.json`: DistiLLM's replay buffer)
//! and `state.json` (`TrainState`). A checkpoint is written
//! into a hidden `.partial-…` folder, every file fsynced, `state.json` last, then renamed into place:
//! a folder named `step-…` is always complete. Only the newest `keep_last` are kept.
use super::optim::AdamW;
use super::state::TrainState;
use crate::io::{read_to_string, write_atomic};
use crate::model::{hf, LoadedModel};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

pub fn dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Complete checkpoints, oldest first.
pub fn list(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let d = dir(output);
    if !d.exists() {
        return Ok(vec![]);
    }
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(&d)
        .map_err(|e| Error::io(&d, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            step_of(&name).map(|s| (s, e.path()))
        })
        .filter(|(_, p)| p.join("state.json").exists())
        .collect();
    out.sort();
    Ok(out)
}

pub fn latest(output: &Path) -> Result<Option<PathBuf>> {
    Ok(list(output)?.pop().map(|(_, p)| p))
}

/// Folders named like checkpoints that are not complete ones (no `state.json`): what a resume
/// would otherwise silently pass over.
pub fn incomplete(output: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir(output)) else {
        return vec![];
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| step_of(&e.file_name().to_string_lossy()).is_some())
        .map(|e| e.path())
        .filter(|p| !p.join("state.json").exists())
        .collect();
    out.sort();
    out
}

/// `extra`: further files of named tensors to write beside the optimizer's (file name, tensors);
/// `files`: further files as bytes (file name, contents).
#[allow(clippy::too_many_arguments)]
pub fn save(
    output: &Path,
    student: &LoadedModel,
    extra: &[(&str, Vec<(String, tch::Tensor)>)],
    files: &[(&str, Vec<u8>)],
    opt: &AdamW,
    state: &TrainState,
    keep_last: usize,
    faults: &super::faults::Faults,
) -> Result<PathBuf> {
    let d = dir(output);
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    let name = format!("step-{:08}", state.step);
    let partial = d.join(format!(".partial-{name}"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    student.save_hf(&partial)?;
    faults.during_save();
    hf::write_safetensors(&partial.join("optimizer.safetensors"), &opt.state_tensors())?;
    for (file, tensors) in extra {
        hf::write_safetensors(&partial.join(file), tensors)?;
    }
    for (file, bytes) in files {
        write_atomic(&partial.join(file), bytes)?;
    }
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    write_atomic(&partial.join("state.json"), json.as_bytes())?;
    let final_dir = d.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&partial, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if let Ok(f) = std::fs::File::open(&d) {
        let _ = f.sync_all();
    }
    let all = list(output)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep_last)) {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(final_dir)
}

pub fn read_state(checkpoint: &Path) -> Result<TrainState> {
    let p = checkpoint.join("state.json");
    serde_json::from_str(&read_to_string(&p)?)
        .map_err(|e| Error::format(&p, format!("not a training state: {e}")))
}
