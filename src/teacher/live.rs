//! The live teacher: its forward pass run for each batch, without a graph. The trunk runs once per
//! batch (`prepare`); the head runs per range of positions, so the step can form the teacher's
//! vocabulary-sized logits one chunk at a time, like the student's.
use super::{PreparedSignal, TeacherDist, TeacherSignal};
use crate::data::Batch;
use crate::model::Llama;
use crate::Result;
use tch::Tensor;

pub struct Live<'m> {
    model: &'m Llama,
}

impl<'m> Live<'m> {
    /// The teacher's weights must be frozen (its own `VarStore`, `freeze()`d) by the caller.
    pub fn new(model: &'m Llama) -> Self {
        Live { model }
    }
}

struct LiveBatch<'a> {
    model: &'a Llama,
    /// the final normed hidden state, flattened: (B·T, d)
    last: Tensor,
    layers: Vec<Tensor>,
}

impl TeacherSignal for Live<'_> {
    fn prepare<'a>(
        &'a self,
        batch: &Batch,
        hidden_layers: &[usize],
    ) -> Result<Box<dyn PreparedSignal + 'a>> {
        let out = tch::no_grad(|| self.model.forward_trunk(&batch.ids, hidden_layers))?;
        Ok(Box::new(LiveBatch {
            model: self.model,
            last: out.last.f_flatten(0, 1)?, // (N, d)
            layers: out.layers,
        }))
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }
}

impl PreparedSignal for LiveBatch<'_> {
    fn positions(&self, start: i64, len: i64) -> Result<TeacherDist> {
        let h = self.last.f_narrow(0, start, len)?; // (len, d)
        Ok(TeacherDist::Dense(tch::no_grad(|| self.model.head(&h))?)) // (len, V)
    }

    fn hidden(&self) -> &[Tensor] {
        &self.layers
    }

    fn len(&self) -> i64 {
        self.last.size()[0]
    }
}
