//! The teacher's signal read from a store: for each row of a batch, its captured positions laid out
//! over the batch's flattened positions as a `SparseDist`. No teacher forward runs.
//!
//! Layout (B·T positions, K = the most kept tokens at any position of the batch): a target
//! position holds its kept ids and log-probabilities, padded to K with log p = −inf and the row's
//! first id; a position that is not a target holds a point mass on its first id (its weight is 0,
//! so it does not count; the values only have to be finite).
use super::reader::Store;
use super::select::Kept;
use crate::data::{Batch, IGNORE_INDEX};
use crate::teacher::{PreparedSignal, SparseDist, TeacherDist, TeacherSignal, VocabMap};
use crate::{Error, Result};
use tch::{Device, Tensor};

pub struct StoreSignal<'s> {
    store: &'s Store,
    vocab: &'s VocabMap,
}

impl<'s> StoreSignal<'s> {
    /// `vocab` takes the store's (teacher) ids to the student's (padding rows masked).
    pub fn new(store: &'s Store, vocab: &'s VocabMap) -> Self {
        StoreSignal { store, vocab }
    }
}

/// The batch's labels on the host, row by row.
pub fn host_labels(batch: &Batch) -> Result<Vec<Vec<i64>>> {
    let (b, t) = batch.shape();
    let flat = Vec::<i64>::try_from(batch.labels.f_flatten(0, 1)?.f_to_device(Device::Cpu)?)?;
    Ok((0..b as usize)
        .map(|r| flat[r * t as usize..(r + 1) * t as usize].to_vec())
        .collect())
}

/// Row `r`'s kept sets from the store, checked against the row's target positions.
pub fn stored_row(store: &Store, key: u64, labels: &[i64]) -> Result<Option<Vec<Kept>>> {
    let Some(rec) = store.get(key)? else {
        return Ok(None);
    };
    let targets: Vec<u32> = (0..labels.len())
        .filter(|&t| labels[t] != IGNORE_INDEX)
        .map(|t| t as u32)
        .collect();
    let range = rec.shard.positions(rec.row);
    if rec.shard.at[range.clone()] != targets[..] {
        return Err(Error::format(
            &store.dir,
            format!(
                "sequence {key:016x}: the store's target positions differ from the data's (a damaged store?)"
            ),
        ));
    }
    Ok(Some(range.map(|p| rec.shard.kept(p)).collect()))
}

/// A batch's sparse signal: (N, K) ids and log-probabilities, (N) log tail mass and log Z.
pub struct SparseBatch {
    indices: Tensor,
    logprobs: Tensor,
    log_tail: Tensor,
    log_z: Tensor,
    temperature: f64,
}

impl SparseBatch {
    /// From each row's kept sets (one per target position, in order, in the teacher's ids) and the
    /// rows' labels; `vocab` takes the ids to the student's.
    pub fn new(
        rows: &[Vec<Kept>],
        labels: &[Vec<i64>],
        temperature: f64,
        vocab: &VocabMap,
        device: Device,
    ) -> Result<SparseBatch> {
        let k = rows
            .iter()
            .flat_map(|r| r.iter().map(|p| p.ids.len()))
            .max()
            .unwrap_or(1)
            .max(1);
        let t = labels.first().map_or(0, |l| l.len());
        let n = rows.len() * t;
        let mut ids = vec![0i64; n * k];
        let mut lps = vec![f32::NEG_INFINITY; n * k];
        let mut tail = vec![f32::NEG_INFINITY; n];
        let mut log_z = vec![0f32; n];
        for (r, (kept, labels)) in rows.iter().zip(labels).enumerate() {
            let mut next = kept.iter();
            for (pos, &label) in labels.iter().enumerate() {
                let at = r * t + pos;
                let slot = &mut ids[at * k..(at + 1) * k];
                if label == IGNORE_INDEX {
                    lps[at * k] = 0.0; // a point mass on id 0: finite, never counted
                    continue;
                }
                let p = next.next().ok_or_else(|| {
                    Error::Invalid(format!(
                        "sparse batch: row {r} has fewer kept sets than targets"
                    ))
                })?;
                let first = p.ids[0] as i64;
                for (j, s) in slot.iter_mut().enumerate() {
                    *s = p.ids.get(j).map_or(first, |&x| x as i64);
                }
                lps[at * k..at * k + p.logprobs.len()].copy_from_slice(&p.logprobs);
                tail[at] = p.log_tail;
                log_z[at] = p.log_z;
            }
            if next.next().is_some() {
                return Err(Error::Invalid(format!(
                    "sparse batch: row {r} has more kept sets than targets"
                )));
            }
        }
        let nk = [n as i64, k as i64];
        let dist = vocab.apply(TeacherDist::Sparse(SparseDist {
            indices: Tensor::f_from_slice(&ids)?
                .f_view(nk)?
                .f_to_device(device)?,
            logprobs: Tensor::f_from_slice(&lps)?
                .f_view(nk)?
                .f_to_device(device)?,
            log_tail: Tensor::f_from_slice(&tail)?.f_to_device(device)?,
            log_z: Tensor::f_from_slice(&log_z)?.f_to_device(device)?,
            temperature,
        }))?;
        let TeacherDist::Sparse(d) = dist else {
            unreachable!("a vocabulary map keeps a sparse signal sparse")
        };
        Ok(SparseBatch {
            indices: d.indices,
            logprobs: d.logprobs,
            log_tail: d.log_tail,
            log_z: d.log_z,
            temperature,
        })
    }
}

impl PreparedSignal for SparseBatch {
    fn positions(&self, start: i64, len: i64) -> Result<TeacherDist> {
        Ok(TeacherDist::Sparse(SparseDist {
            indices: self.indices.f_narrow(0, start, len)?,
            logprobs: self.logprobs.f_narrow(0, start, len)?,
            log_tail: self.log_tail.f_narrow(0, start, len)?,
            log_z: self.log_z.f_narrow(0, start, len)?,
            temperature: self.temperature,
        }))
    }
    fn hidden(&self) -> &[Tensor] {
        &[]
    }
    fn len(&self) -> i64 {
        self.log_tail.size()[0]
    }
}

/// Refuse hidden states: a store holds the output distribution only.
pub fn no_hidden(hidden_layers: &[usize]) -> Result<()> {
    if hidden_layers.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(
            "a teacher store holds the teacher's output distribution, not its hidden states".into(),
        ))
    }
}

impl TeacherSignal for StoreSignal<'_> {
    fn prepare<'a>(
        &'a self,
        batch: &Batch,
        hidden_layers: &[usize],
    ) -> Result<Box<dyn PreparedSignal + 'a>> {
        no_hidden(hidden_layers)?;
        let labels = host_labels(batch)?;
        let mut rows = Vec::with_capacity(labels.len());
        for (key, l) in batch.keys.iter().zip(&labels) {
            rows.push(stored_row(self.store, *key, l)?.ok_or_else(|| {
                Error::format(
                    &self.store.dir,
                    format!("holds no capture of sequence {key:016x} (the run's data changed since the capture?)"),
                )
            })?);
        }
        Ok(Box::new(SparseBatch::new(
            &rows,
            &labels,
            self.store.header.selection.temperature,
            self.vocab,
            batch.ids.device(),
        )?))
    }

    fn vocab_size(&self) -> usize {
        self.store.header.vocab_rows
    }
}
