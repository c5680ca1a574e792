//! The hidden-state terms' wiring (losses/hidden.rs), settled at set-up from the two models:
//! - the layer map: the pairs the run file gives (`layers = [[s, t], ...]`), else the layer each
//!   student layer was copied from (`student.from_teacher.layers`: student layer k ↔ teacher layer
//!   layers[k]), else a uniform map, student layer k ↔ teacher layer ⌊(k + 1)·n_t / n_s⌋ − 1 (at
//!   least 0): TinyBERT's g(m) = m·n_t/n_s with 1-based layers, so the last layers face each other;
//! - the projection P (d_t, d_s) of each term whose widths differ: a learned matrix, one per term,
//!   shared by its pairs, in its own `VarStore` (`loss.{i}.projection.weight`, i = the `[[loss]]`
//!   index), trained by the run's AdamW with the student, saved in every checkpoint and beside the
//!   student at the end (`OUTPUT/projection.safetensors`), never inside `OUTPUT/student/` (the
//!   exported model holds the student alone). Initialised as `torch.nn.Linear` does without bias,
//!   uniform in ±1/√d_s, drawn from SplitMix64 seeded by the run's seed and the term's index, so a
//!   run is reproducible and a resumed run reads it back from its checkpoint. Equal widths take no
//!   projection (the identity).
use crate::generate::SplitMix64;
use crate::model::LlamaConfig;
use crate::objective::{HiddenWiring, LossTerm, Objective};
use crate::{Error, Result};
use std::path::Path;
use tch::{nn, Device, Tensor};

/// The file that holds the projections, in a checkpoint and in the output folder.
pub const FILE: &str = "projection.safetensors";

/// The default (student layer, teacher layer) pairs: every student layer with the teacher layer it
/// was copied from, or with the uniform map when it was not copied.
pub fn default_layer_map(
    student_layers: usize,
    teacher_layers: usize,
    copied_from: Option<&[usize]>,
) -> Vec<(usize, usize)> {
    match copied_from {
        Some(from) => from.iter().copied().enumerate().collect(),
        None => (0..student_layers)
            .map(|k| {
                let t = ((k + 1) * teacher_layers / student_layers.max(1)).max(1) - 1;
                (k, t)
            })
            .collect(),
    }
}

/// The learned projections of a run's hidden-state terms (only those whose widths differ).
pub struct Projections {
    pub vs: nn::VarStore,
}

impl Projections {
    /// Every projection by name, for a safetensors file.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Read them back from a checkpoint folder.
    pub fn load(&self, checkpoint: &Path) -> Result<()> {
        let file = checkpoint.join(FILE);
        crate::model::hf::load_into(&self.vs, &crate::model::hf::read_safetensors(&file)?, &file)
    }
}

/// P (d_t, d_s) uniform in ±1/√d_s, from the seed and the term's index.
fn initial_projection(d_t: usize, d_s: usize, seed: u64, term: usize) -> Tensor {
    let mut rng = SplitMix64::new(
        seed ^ 0x6869_6464_656E_5052 ^ (term as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let bound = 1.0 / (d_s as f64).sqrt();
    let values: Vec<f32> = (0..d_t * d_s)
        .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
        .collect();
    Tensor::from_slice(&values).view([d_t as i64, d_s as i64])
}

/// Give each hidden-state term of `objective` (built from `terms`, in the same order) its layer
/// pairs and projection. Layers out of range are refused naming the term's key
/// (`loss.1.layers`). Returns the learned projections, None when no term needs one.
pub fn wire(
    objective: &mut Objective,
    terms: &[LossTerm],
    student: &LlamaConfig,
    teacher: &LlamaConfig,
    copied_from: Option<&[usize]>,
    seed: u64,
    device: Device,
) -> Result<Option<Projections>> {
    let (n_s, n_t) = (student.num_hidden_layers, teacher.num_hidden_layers);
    let (d_s, d_t) = (student.hidden_size, teacher.hidden_size);
    let vs = nn::VarStore::new(device);
    for i in objective.hidden_terms() {
        let term = terms.get(i).ok_or_else(|| {
            Error::Invalid(format!("loss term {i}: not among the run file's terms"))
        })?;
        let key = format!("loss.{i}.layers");
        let pairs = match &term.layers {
            Some(p) => p.clone(),
            None => default_layer_map(n_s, n_t, copied_from),
        };
        for &(s, t) in &pairs {
            if s >= n_s {
                return Err(Error::Invalid(format!(
                    "{key}: student layer {s} does not exist (the student has layers 0..{})",
                    n_s.saturating_sub(1)
                )));
            }
            if t >= n_t {
                return Err(Error::Invalid(format!(
                    "{key}: teacher layer {t} does not exist (the teacher has layers 0..{})",
                    n_t.saturating_sub(1)
                )));
            }
        }
        let projection = if d_s == d_t {
            None
        } else {
            let init = initial_projection(d_t, d_s, seed, i).f_to_device(device)?;
            Some(
                vs.root()
                    .sub("loss")
                    .sub(i)
                    .sub("projection")
                    .f_var_copy("weight", &init)?,
            )
        };
        objective.wire_hidden(i, HiddenWiring { pairs, projection })?;
    }
    Ok((!vs.variables().is_empty()).then_some(Projections { vs }))
}
