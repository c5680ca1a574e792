//! The hybrid teacher: a store serves the rows it holds, the live teacher the rest (new or changed
//! data). Per batch:
//!   every row stored  → the store's sparse signal, no teacher forward;
//!   no row stored     → the live teacher's dense logits, exactly as without a store (with
//!                       write-back: reduced as below);
//!   some rows stored  → the live teacher runs on the missing rows only, their distributions reduced
//!                       by the store's own selection (and quantisation), so the batch is sparse.
//! With write-back, the rows the live teacher computed are added to the store (its selection), and
//! serve from it in later runs. The share of rows served by the store is counted for the logs.
use super::store::select::select_rows;
use super::store::shard::SeqRecord;
use super::store::signal::{host_labels, no_hidden, stored_row, SparseBatch};
use super::store::{Store, StoreWriter};
use super::{Live, PreparedSignal, TeacherSignal, VocabMap};
use crate::data::{Batch, IGNORE_INDEX};
use crate::Result;
use std::cell::RefCell;
use tch::{Device, Tensor};

/// What outlives a step: rows counted, and the writer for write-back.
#[derive(Default)]
pub struct HybridState {
    pub from_store: u64,
    pub from_live: u64,
    pub writer: Option<StoreWriter>,
}

impl HybridState {
    /// The share of rows the store served (1 when nothing was asked yet).
    pub fn store_fraction(&self) -> f64 {
        let n = self.from_store + self.from_live;
        if n == 0 {
            1.0
        } else {
            self.from_store as f64 / n as f64
        }
    }
}

pub struct Hybrid<'a> {
    store: &'a Store,
    live: Live<'a>,
    state: &'a RefCell<HybridState>,
    vocab: &'a VocabMap,
}

impl<'a> Hybrid<'a> {
    /// `live` must give the same ids as the store (its vocabulary map translates no ids: padding
    /// rows may differ, and `vocab` masks them in the store's rows).
    pub fn new(
        store: &'a Store,
        live: Live<'a>,
        state: &'a RefCell<HybridState>,
        vocab: &'a VocabMap,
    ) -> Self {
        Hybrid {
            store,
            live,
            state,
            vocab,
        }
    }

    /// Add live-computed rows to the store (when writing back).
    fn write_back(
        &self,
        batch: &Batch,
        rows: &[usize],
        kept: Vec<Vec<super::store::select::Kept>>,
        labels: &[Vec<i64>],
    ) -> Result<()> {
        let mut st = self.state.borrow_mut();
        let Some(w) = st.writer.as_mut() else {
            return Ok(());
        };
        let (_, t) = batch.shape();
        let ids = Vec::<i64>::try_from(batch.ids.f_flatten(0, 1)?.f_to_device(Device::Cpu)?)?;
        for ((&r, kept), l) in rows.iter().zip(kept).zip(labels) {
            let tokens = ids[r * t as usize..(r + 1) * t as usize]
                .iter()
                .map(|&x| x as u32)
                .collect();
            let at = (0..l.len())
                .filter(|&p| l[p] != IGNORE_INDEX)
                .map(|p| p as u32)
                .collect();
            w.add(SeqRecord {
                key: batch.keys[r],
                tokens,
                at,
                kept,
            })?;
        }
        Ok(())
    }
}

impl TeacherSignal for Hybrid<'_> {
    fn prepare<'b>(
        &'b self,
        batch: &Batch,
        hidden_layers: &[usize],
    ) -> Result<Box<dyn PreparedSignal + 'b>> {
        no_hidden(hidden_layers)?;
        let labels = host_labels(batch)?;
        let mut stored = Vec::with_capacity(labels.len());
        for (key, l) in batch.keys.iter().zip(&labels) {
            stored.push(stored_row(self.store, *key, l)?);
        }
        let missing: Vec<usize> = (0..stored.len()).filter(|&r| stored[r].is_none()).collect();
        {
            let mut st = self.state.borrow_mut();
            st.from_store += (stored.len() - missing.len()) as u64;
            st.from_live += missing.len() as u64;
        }
        let sel = self.store.header.selection;
        let device = batch.ids.device();
        if missing.is_empty() {
            let rows: Vec<_> = stored
                .into_iter()
                .map(|r| r.expect("every row stored"))
                .collect();
            return Ok(Box::new(SparseBatch::new(
                &rows,
                &labels,
                sel.temperature,
                self.vocab,
                device,
            )?));
        }
        // no row stored, nothing written back: exactly the live teacher
        if missing.len() == stored.len() && self.state.borrow().writer.is_none() {
            return self.live.prepare(batch, hidden_layers);
        }
        // the live teacher on the missing rows only, reduced as the store reduces (with write-back
        // every live row is, so that a row reads the same before and after it is written: a resumed
        // run that finds it in the store trains exactly as the run that wrote it)
        let at = Tensor::f_from_slice(&missing.iter().map(|&r| r as i64).collect::<Vec<_>>())?
            .f_to_device(device)?;
        let sub = Batch::from_ids_labels(
            &batch.ids.f_index_select(0, &at)?,
            &batch.labels.f_index_select(0, &at)?,
        )?;
        let sub_labels: Vec<Vec<i64>> = missing.iter().map(|&r| labels[r].clone()).collect();
        let live = self.live.prepare(&sub, hidden_layers)?;
        let dense = live.positions(0, live.len())?;
        let sub_keys: Vec<u64> = missing.iter().map(|&r| batch.keys[r]).collect();
        let fresh = select_rows(dense.dense()?, &sub_labels, &sub_keys, &sel, true)?;
        self.write_back(batch, &missing, fresh.clone(), &sub_labels)?;
        let mut fresh = fresh.into_iter();
        let rows: Vec<_> = stored
            .into_iter()
            .map(|r| r.unwrap_or_else(|| fresh.next().expect("one selection per missing row")))
            .collect();
        Ok(Box::new(SparseBatch::new(
            &rows,
            &labels,
            sel.temperature,
            self.vocab,
            device,
        )?))
    }

    fn vocab_size(&self) -> usize {
        self.live.vocab_size()
    }
}
