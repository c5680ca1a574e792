//! A `Batch`: the rows that one micro-step trains on, in the form every later stage takes (the
//! teacher signal, the step, the objective, evaluation):
//!   ids      (B, T) i64   token ids
//!   labels   (B, T) i64   the next token where it is predicted, `IGNORE_INDEX` elsewhere
//!   weights  (B, T) f32   per-token weight (1 on targets, 0 elsewhere by default)
//!   rows     B            each row's sequence index in its dataset (the key of any per-example
//!                         store), with `spans` giving its documents and offsets
//!   domains  B            the data source of each row, when the run has several
//! The host copy of the weights lets the step share a micro-batch among chunks without reading
//! anything back from the device.
use super::packing::{Sequence, Span};
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct Batch {
    pub ids: Tensor,
    pub labels: Tensor,
    pub weights: Tensor,
    pub rows: Vec<usize>,
    pub spans: Vec<Vec<Span>>,
    pub domains: Option<Vec<u32>>,
    /// each row's `Sequence::key` (what a teacher store looks it up by)
    pub keys: Vec<u64>,
    host_weights: Vec<f32>,
}

impl Batch {
    /// The rows `rows` of `seqs`, on `device`.
    pub fn new(seqs: &[Sequence], rows: &[usize], device: Device) -> Result<Batch> {
        let first = rows
            .first()
            .and_then(|&r| seqs.get(r))
            .ok_or_else(|| Error::Invalid("a batch needs at least one existing row".into()))?;
        let t = first.ids.len();
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut labels = Vec::with_capacity(rows.len() * t);
        let mut weights = Vec::with_capacity(rows.len() * t);
        let mut spans = Vec::with_capacity(rows.len());
        let mut domains = Vec::with_capacity(rows.len());
        let mut keys = Vec::with_capacity(rows.len());
        for &r in rows {
            let s = seqs.get(r).ok_or_else(|| {
                Error::Invalid(format!(
                    "batch row {r} is outside the {} sequences",
                    seqs.len()
                ))
            })?;
            if s.ids.len() != t {
                return Err(Error::Shape(format!(
                    "batch: sequence {r} has {} tokens, the first row {t}",
                    s.ids.len()
                )));
            }
            ids.extend(s.ids.iter().map(|&x| x as i64));
            labels.extend_from_slice(&s.labels);
            weights.extend_from_slice(&s.weights);
            spans.push(s.spans.clone());
            domains.extend(s.domain);
            keys.push(s.key());
        }
        let shape = [rows.len() as i64, t as i64];
        Ok(Batch {
            ids: Tensor::f_from_slice(&ids)?
                .f_view(shape)?
                .f_to_device(device)?,
            labels: Tensor::f_from_slice(&labels)?
                .f_view(shape)?
                .f_to_device(device)?,
            weights: Tensor::f_from_slice(&weights)?
                .f_view(shape)?
                .f_to_device(device)?,
            rows: rows.to_vec(),
            spans,
            domains: (domains.len() == rows.len()).then_some(domains),
            keys,
            host_weights: weights,
        })
    }

    /// A batch of given ids and labels (B, T), weights 1 where the label counts; rows numbered
    /// 0..B with no recorded origin (benchmarks, tests).
    pub fn from_ids_labels(ids: &Tensor, labels: &Tensor) -> Result<Batch> {
        if ids.size() != labels.size() || ids.dim() != 2 {
            return Err(Error::Shape(format!(
                "batch: 'labels' has shape {:?}, 'ids' {:?}; expected one (B, T) shape",
                labels.size(),
                ids.size()
            )));
        }
        let host: Vec<i64> =
            Vec::<i64>::try_from(labels.f_flatten(0, 1)?.f_to_device(Device::Cpu)?)?;
        let host_weights: Vec<f32> = host
            .iter()
            .map(|&l| if l == super::IGNORE_INDEX { 0.0 } else { 1.0 })
            .collect();
        let b = ids.size()[0] as usize;
        let host_ids: Vec<i64> =
            Vec::<i64>::try_from(ids.f_flatten(0, 1)?.f_to_device(Device::Cpu)?)?;
        let t = ids.size()[1] as usize;
        let keys = (0..b)
            .map(|r| {
                let ids: Vec<u32> = host_ids[r * t..(r + 1) * t]
                    .iter()
                    .map(|&x| x as u32)
                    .collect();
                crate::fingerprint::Fnv64::default()
                    .u32s(&ids)
                    .i64s(&host[r * t..(r + 1) * t])
                    .finish()
            })
            .collect();
        Ok(Batch {
            ids: ids.f_to_kind(Kind::Int64)?,
            labels: labels.f_to_kind(Kind::Int64)?,
            weights: Tensor::f_from_slice(&host_weights)?
                .f_view_as(labels)?
                .f_to_device(ids.device())?,
            rows: (0..b).collect(),
            spans: vec![vec![]; b],
            domains: None,
            keys,
            host_weights,
        })
    }

    /// Replace the per-token weights (B·T values, row-major, each finite and ≥ 0).
    pub fn set_weights(&mut self, weights: &[f32]) -> Result<()> {
        let (b, t) = self.shape();
        if weights.len() as i64 != b * t {
            return Err(Error::Shape(format!(
                "batch: {} weights for a batch of {b} × {t} positions",
                weights.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(Error::Invalid(format!(
                "batch: a per-token weight must be finite and ≥ 0, got {w}"
            )));
        }
        self.weights = Tensor::f_from_slice(weights)?
            .f_view([b, t])?
            .f_to_device(self.ids.device())?;
        self.host_weights = weights.to_vec();
        Ok(())
    }

    /// Every sequence of `seqs` in order, as one batch.
    pub fn all(seqs: &[Sequence], device: Device) -> Result<Batch> {
        Batch::new(seqs, &(0..seqs.len()).collect::<Vec<_>>(), device)
    }

    /// (B, T)
    pub fn shape(&self) -> (i64, i64) {
        let s = self.ids.size();
        (s[0], s[1])
    }

    /// The weights flattened over (B·T), on the host.
    pub fn host_weights(&self) -> &[f32] {
        &self.host_weights
    }

    /// Σ w over positions [start, start + len) of the flattened batch (f64 on the host).
    pub fn weight_sum(&self, start: usize, len: usize) -> f64 {
        self.host_weights[start..start + len]
            .iter()
            .map(|&w| w as f64)
            .sum()
    }

    /// Positions whose weight is not 0 (the tokens this batch trains on).
    pub fn counted(&self) -> usize {
        self.host_weights.iter().filter(|&&w| w != 0.0).count()
    }

    /// Labels and weights flattened to (B·T).
    pub fn flat_targets(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.labels.f_flatten(0, 1)?,
            self.weights.f_to_kind(Kind::Float)?.f_flatten(0, 1)?,
        ))
    }
}
