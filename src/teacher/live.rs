//! The live teacher: its forward pass run for each batch, without a graph. The trunk runs once per
//! batch (`prepare`); the head runs per range of positions, so the step can form the teacher's
//! vocabulary-sized logits one chunk at a time, like the student's. With a vocabulary map
//! (`with_vocab`) the batch's ids are the student's: they are translated to the teacher's before
//! its forward pass when a token sits at another id, and the distributions come back in the
//! student's ids (`VocabMap::apply`; nothing is copied when the map is the identity).
use super::vocab::VocabMap;
use super::{PreparedSignal, TeacherDist, TeacherSignal};
use crate::data::Batch;
use crate::model::Llama;
use crate::Result;
use tch::Tensor;

pub struct Live<'m> {
    model: &'m Llama,
    vocab: Option<&'m VocabMap>,
}

impl<'m> Live<'m> {
    /// The teacher's weights must be frozen (its own `VarStore`, `freeze()`d) by the caller.
    pub fn new(model: &'m Llama) -> Self {
        Live { model, vocab: None }
    }

    /// Batches hold the student's ids; distributions are returned in them.
    pub fn with_vocab(self, map: &'m VocabMap) -> Self {
        Live {
            vocab: Some(map),
            ..self
        }
    }
}

struct LiveBatch<'a> {
    model: &'a Llama,
    vocab: Option<&'a VocabMap>,
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
        let ids = match self.vocab {
            Some(m) => m.teacher_ids(&batch.ids)?, // (B, T), the teacher's ids
            None => batch.ids.shallow_clone(),
        };
        let out = tch::no_grad(|| self.model.forward_trunk(&ids, hidden_layers))?;
        Ok(Box::new(LiveBatch {
            model: self.model,
            vocab: self.vocab,
            last: out.last.f_flatten(0, 1)?, // (N, d)
            layers: out.layers,
        }))
    }

    fn vocab_size(&self) -> usize {
        self.vocab
            .map_or(self.model.config.vocab_size, VocabMap::width)
    }
}

impl PreparedSignal for LiveBatch<'_> {
    fn positions(&self, start: i64, len: i64) -> Result<TeacherDist> {
        let h = self.last.f_narrow(0, start, len)?; // (len, d)
        let dist = TeacherDist::Dense(tch::no_grad(|| self.model.head(&h))?); // (len, Vt)
        match self.vocab {
            Some(m) => m.apply(dist), // (len, W)
            None => Ok(dist),
        }
    }

    fn hidden(&self) -> &[Tensor] {
        &self.layers
    }

    fn len(&self) -> i64 {
        self.last.size()[0]
    }
}
