//! Several teachers at once (`[[teacher]]`, `[teachers] combine`): their next-token distributions
//! combined into one, in the student's vocabulary (each teacher's through its own `VocabMap`, all
//! cut to the narrowest width W). With teachers i = 1..M, logits z_i, p_i = softmax(z_i) (T = 1)
//! and weights w_i normalised to Σ w_i = 1, the signal's logits z at a position are
//!   probability: p = Σ_i w_i p_i                (a mixture), written relative to the first teacher
//!                z = z_1 + LSE_i(log w_i + log p_i − log p_1)      (softmax(z) = p exactly)
//!   log:         p ∝ Π_i p_i^{w_i}               (the normalised geometric mean)
//!                z = Σ_i w_i z_i                  (softmax(z) = softmax(Σ_i w_i log p_i) exactly)
//!   per_source:  z = z_{k(r)}, k(r) the teacher its `[[data.source]]` names for the position's row
//! The losses then apply their temperature to z: the combination is of the teachers' T = 1
//! distributions, tempered afterwards. Both forms give the teacher's own logits, bit for bit, when
//! every teacher is the same model with equal weights (0.5·z + 0.5·z = z; log ½ + log 2 = 0),
//! so two identical teachers train exactly as one. The first form needs finite logits (the live
//! teachers' are: a VocabMap cuts the padding rows away instead of masking them).
//!
//! Each teacher's share of the signal, over the counted target positions n (token weight > 0,
//! label y_n), is its posterior responsibility for the label in the mixture:
//!   share_i = mean_n  w_i p_i(y_n) / Σ_j w_j p_j(y_n)        (Σ_i share_i = 1)
//! and for per_source the share of positions it serves (w_i p_i replaced by 1 for the row's
//! teacher, 0 for the others). It is logged per step (that step's micro-batches) and per
//! evaluation (the validation set), with each teacher's own perplexity at evaluation.
//!
//! Dense only: a store (captured signal) of several teachers, a teacher-query budget and the
//! hidden-state terms (whose teacher layers would be whose?) are refused with several teachers.
use super::config::TeacherFile;
use super::{Live, PreparedSignal, TeacherDist, TeacherSignal, VocabMap, VocabReport};
use crate::config::{issue, Checked, Paths};
use crate::data::{Batch, DataConfig};
use crate::device::Dtype;
use crate::model::LoadedModel;
use crate::{Error, Result};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::cell::RefCell;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// The run file's `teacher` key: one `[teacher]` table, or `[[teacher]]` tables (several).
#[derive(Debug)]
pub enum TeacherSection {
    One(TeacherFile),
    Several(Vec<MemberFile>),
}

impl<'de> Deserialize<'de> for TeacherSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = TeacherSection;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [teacher] table or [[teacher]] tables")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                TeacherFile::deserialize(serde::de::value::MapAccessDeserializer::new(a))
                    .map(TeacherSection::One)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                Vec::<MemberFile>::deserialize(serde::de::value::SeqAccessDeserializer::new(a))
                    .map(TeacherSection::Several)
            }
        }
        d.deserialize_any(Either)
    }
}

/// One `[[teacher]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberFile {
    /// a Hugging Face folder or a .gguf file
    pub path: PathBuf,
    /// its relative weight (> 0); 1 when left out
    pub weight: Option<f64>,
    /// "f32" (default), "bf16" or "f16"
    pub dtype: Option<String>,
    /// what `[[data.source]] teacher` calls it (needed by `combine = "per_source"`)
    pub name: Option<String>,
    /// one teacher's keys, refused here with a reason
    pub store: Option<toml::Value>,
    pub write_back: Option<toml::Value>,
    pub budget: Option<toml::Value>,
    pub selection: Option<toml::Value>,
    pub unselected: Option<toml::Value>,
}

/// `[teachers]`: how several teachers are combined.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeachersFile {
    /// "probability" (default), "log" or "per_source"
    pub combine: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Combine {
    Probability,
    Log,
    /// source i's teacher
    PerSource(Vec<usize>),
}

impl Combine {
    pub fn name(&self) -> &'static str {
        match self {
            Combine::Probability => "probability",
            Combine::Log => "log",
            Combine::PerSource(_) => "per_source",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// the name given, else "teacher.{i}"
    pub name: String,
    pub path: PathBuf,
    pub dtype: Dtype,
    /// normalised: Σ weights = 1
    pub weight: f64,
}

/// Several teachers, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TeachersConfig {
    pub members: Vec<Member>,
    pub combine: Combine,
}

impl TeachersConfig {
    /// What the fingerprint and run.json record.
    pub fn describe(&self) -> String {
        let m: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                format!(
                    "{} = {} ({}) × {}",
                    m.name,
                    m.path.display(),
                    m.dtype.name(),
                    m.weight
                )
            })
            .collect();
        let by = match &self.combine {
            Combine::PerSource(k) => format!(" {k:?}"),
            _ => String::new(),
        };
        format!("{}{by}: {}", self.combine.name(), m.join(", "))
    }
}

/// The run file's teacher key(s) → the first teacher (what every one-teacher path reads: the
/// student made of its layers, its tokenizer's template, run.json) and, with `[[teacher]]`, all of
/// them.
pub fn resolve(
    section: &TeacherSection,
    teachers: Option<&TeachersFile>,
    data: &DataConfig,
    paths: &Paths,
) -> Checked<(super::config::TeacherConfig, Option<TeachersConfig>)> {
    let named_source = data.sources.iter().position(|s| s.teacher.is_some());
    let list = match section {
        TeacherSection::One(t) => {
            if teachers.is_some() {
                return Err(issue(
                    "teachers",
                    "goes with several [[teacher]] tables, not one [teacher]",
                ));
            }
            if let Some(i) = named_source {
                return Err(issue(
                    format!("data.source.{i}.teacher"),
                    "names a teacher of [[teacher]] tables with [teachers] combine = \"per_source\"",
                ));
            }
            return Ok((t.resolve(paths)?, None));
        }
        TeacherSection::Several(list) => list,
    };
    if list.is_empty() {
        return Err(issue("teacher", "needs at least one [[teacher]]"));
    }
    let mut members: Vec<Member> = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let key = |k: &str| format!("teacher.{i}.{k}");
        for (k, given) in [
            ("store", m.store.is_some()),
            ("write_back", m.write_back.is_some()),
            ("budget", m.budget.is_some()),
            ("selection", m.selection.is_some()),
            ("unselected", m.unselected.is_some()),
        ] {
            if given {
                return Err(issue(
                    key(k),
                    "is a one-teacher key: with several [[teacher]] tables the teachers run live and every sequence sees them all (no store, no budget)",
                ));
            }
        }
        let weight = m.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0) {
            return Err(issue(
                key("weight"),
                format!("must be a finite number > 0, got {weight}"),
            ));
        }
        let dtype = match &m.dtype {
            Some(d) => Dtype::parse(d).map_err(|e| issue(key("dtype"), e))?,
            None => Dtype::F32,
        };
        let name = match &m.name {
            Some(n) if n.trim().is_empty() => return Err(issue(key("name"), "must not be empty")),
            Some(n) if members.iter().any(|x| x.name == *n) => {
                return Err(issue(
                    key("name"),
                    format!("'{n}' names two teachers; each needs its own name"),
                ))
            }
            Some(n) => n.clone(),
            None => format!("teacher.{i}"),
        };
        members.push(Member {
            name,
            path: paths.resolve(&m.path),
            dtype,
            weight,
        });
    }
    let total: f64 = members.iter().map(|m| m.weight).sum();
    for m in &mut members {
        m.weight /= total;
    }
    let combine = match teachers.and_then(|t| t.combine.as_deref()) {
        None | Some("probability") => Combine::Probability,
        Some("log") => Combine::Log,
        Some("per_source") => {
            if data.sources.is_empty() {
                return Err(issue(
                    "teachers.combine",
                    "\"per_source\" needs [[data.source]] tables, each naming its teacher",
                ));
            }
            let mut by = Vec::with_capacity(data.sources.len());
            for (i, s) in data.sources.iter().enumerate() {
                let key = format!("data.source.{i}.teacher");
                let Some(n) = &s.teacher else {
                    return Err(issue(
                        key,
                        "combine = \"per_source\": name this source's teacher (a [[teacher]] name)",
                    ));
                };
                let k = members.iter().position(|m| m.name == *n).ok_or_else(|| {
                    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
                    issue(
                        key,
                        format!(
                            "'{n}' is not a [[teacher]] name (the names: {})",
                            names.join(", ")
                        ),
                    )
                })?;
                by.push(k);
            }
            Combine::PerSource(by)
        }
        Some(other) => {
            return Err(issue(
                "teachers.combine",
                format!("unknown '{other}': expected probability, log or per_source"),
            ))
        }
    };
    if let (Some(i), false) = (named_source, matches!(combine, Combine::PerSource(_))) {
        return Err(issue(
            format!("data.source.{i}.teacher"),
            "is read with [teachers] combine = \"per_source\" only",
        ));
    }
    let first = &members[0];
    let one = super::config::TeacherConfig {
        path: Some(first.path.clone()),
        dtype: first.dtype,
        store: None,
        write_back: false,
        budget: None,
    };
    Ok((one, Some(TeachersConfig { members, combine })))
}

/// With several teachers, a command that reads one teacher refuses (`what` names it).
pub fn one_teacher_only(teachers: &Option<TeachersConfig>, what: &str) -> Result<()> {
    match teachers {
        Some(t) if t.members.len() > 1 => Err(Error::Invalid(format!(
            "teacher: {what} reads one teacher; the run file has {} [[teacher]] tables",
            t.members.len()
        ))),
        _ => Ok(()),
    }
}

/// Σ_n share_{i,n} and the number of positions n, accumulated on the device.
#[derive(Default)]
pub struct Shares {
    sum: Option<Tensor>,
    count: Option<Tensor>,
}

impl Shares {
    fn add(&mut self, sum: Tensor, count: Tensor) -> Result<()> {
        self.sum = Some(match self.sum.take() {
            Some(s) => s.f_add(&sum)?,
            None => sum,
        });
        self.count = Some(match self.count.take() {
            Some(c) => c.f_add(&count)?,
            None => count,
        });
        Ok(())
    }

    /// The mean share of each teacher since the last `take` (None when no position was counted).
    pub fn take(&mut self) -> Result<Option<Vec<f64>>> {
        let (Some(s), Some(c)) = (self.sum.take(), self.count.take()) else {
            return Ok(None);
        };
        let n = c.f_double_value(&[])?;
        if n == 0.0 {
            return Ok(None);
        }
        Ok(Some(
            Vec::<f64>::try_from(s.f_to_device(Device::Cpu)?)?
                .into_iter()
                .map(|x| x / n)
                .collect(),
        ))
    }
}

/// The run's teachers after the first (which the run loads as its one teacher), with their
/// vocabulary maps, and the shares counted.
pub struct Teachers {
    pub config: TeachersConfig,
    /// members 2..M: the model and its map into the student's ids
    pub others: Vec<(LoadedModel, VocabMap)>,
    pub reports: Vec<VocabReport>,
    pub shares: RefCell<Shares>,
}

impl Teachers {
    /// Load members 2..M (frozen, in their dtypes) and check each one's vocabulary against the
    /// student's (`vocab::check`: the same tokens, or refused).
    pub fn load(config: &TeachersConfig, student: &LoadedModel, device: Device) -> Result<Self> {
        let mut others = Vec::new();
        let mut reports = Vec::new();
        for (i, m) in config.members.iter().enumerate().skip(1) {
            let at = |e: Error| {
                Error::Invalid(format!(
                    "teacher.{i} ({}, path {}): {e}",
                    m.name,
                    m.path.display()
                ))
            };
            let mut t = crate::model::load(&m.path, device).map_err(at)?;
            let kind = m.dtype.kind();
            if kind != Kind::Float {
                t.vs.set_kind(kind);
            }
            t.model.set_compute_kind(kind);
            t.vs.freeze();
            let (report, map) = super::vocab::check(&t, student).map_err(at)?;
            others.push((t, map));
            reports.push(report);
        }
        Ok(Teachers {
            config: config.clone(),
            others,
            reports,
            shares: RefCell::new(Shares::default()),
        })
    }

    /// Refuse what one combined signal cannot serve: hidden-state terms (`hidden` names them).
    pub fn check_objective(&self, hidden: &[String]) -> Result<()> {
        if let Some(h) = hidden.first() {
            return Err(Error::Invalid(format!(
                "loss '{h}': a hidden-state term reads one teacher's layers; with several [[teacher]] tables it is refused"
            )));
        }
        Ok(())
    }

    /// Every token id the data holds must lie below each teacher's width, and a sequence within
    /// each teacher's context.
    pub fn check_ids(&self, max_id: u32, seq_len: usize) -> Result<()> {
        for ((t, map), m) in self.others.iter().zip(self.config.members.iter().skip(1)) {
            let context = t.model.config.max_position_embeddings;
            if seq_len > context {
                return Err(Error::Invalid(format!(
                    "data.seq_len = {seq_len} exceeds teacher {}'s context of {context} positions",
                    m.name
                )));
            }
            if max_id as usize >= map.width() {
                return Err(Error::Invalid(format!(
                    "teacher {} ({}): token id {max_id} is outside the {} ids it shares with the student",
                    m.name,
                    t.source.display(),
                    map.width()
                )));
            }
        }
        Ok(())
    }

    /// The combined signal: `first` is the run's one teacher (member 1).
    pub fn signal<'a>(&'a self, first: Live<'a>) -> Ensemble<'a> {
        let mut members = vec![first];
        members.extend(
            self.others
                .iter()
                .map(|(t, map)| Live::new(&t.model).with_vocab(map)),
        );
        Ensemble {
            members,
            weights: self.config.members.iter().map(|m| m.weight).collect(),
            combine: &self.config.combine,
            shares: Some(&self.shares),
        }
    }

    /// Each member alone (member 1 is `first`), for its own evaluation.
    pub fn each<'a>(&'a self, first: Live<'a>) -> Vec<Live<'a>> {
        self.signal(first).members
    }
}

/// Several live teachers combined (the formulas at the top).
pub struct Ensemble<'a> {
    members: Vec<Live<'a>>,
    /// normalised
    weights: Vec<f64>,
    combine: &'a Combine,
    shares: Option<&'a RefCell<Shares>>,
}

impl<'a> Ensemble<'a> {
    /// `weights` are normalised here; `shares`, when given, counts each teacher's share.
    pub fn new(
        members: Vec<Live<'a>>,
        weights: &[f64],
        combine: &'a Combine,
        shares: Option<&'a RefCell<Shares>>,
    ) -> Result<Self> {
        if members.is_empty() || members.len() != weights.len() {
            return Err(Error::Invalid(format!(
                "ensemble: {} teachers and {} weights",
                members.len(),
                weights.len()
            )));
        }
        let total: f64 = weights.iter().sum();
        Ok(Ensemble {
            members,
            weights: weights.iter().map(|w| w / total).collect(),
            combine,
            shares,
        })
    }
}

struct EnsembleBatch<'a> {
    parts: Vec<Box<dyn PreparedSignal + 'a>>,
    weights: &'a [f64],
    combine: &'a Combine,
    shares: Option<&'a RefCell<Shares>>,
    /// (N) labels and token weights
    labels: Tensor,
    token_weights: Tensor,
    /// per_source: (B) the teacher of each row
    row_teacher: Option<Tensor>,
    /// T
    seq_len: i64,
    width: i64,
}

impl TeacherSignal for Ensemble<'_> {
    fn prepare<'b>(
        &'b self,
        batch: &Batch,
        hidden_layers: &[usize],
    ) -> Result<Box<dyn PreparedSignal + 'b>> {
        if !hidden_layers.is_empty() {
            return Err(Error::Invalid(
                "several teachers: hidden states are not combined".into(),
            ));
        }
        let row_teacher = match self.combine {
            Combine::PerSource(by) => {
                let d = batch.domains.as_ref().ok_or_else(|| {
                    Error::Invalid(
                        "teachers.combine = \"per_source\": this batch's rows carry no source"
                            .into(),
                    )
                })?;
                let k = d
                    .iter()
                    .map(|&d| {
                        by.get(d as usize).map(|&k| k as i64).ok_or_else(|| {
                            Error::Invalid(format!(
                                "per_source: row of source {d}, {} named",
                                by.len()
                            ))
                        })
                    })
                    .collect::<Result<Vec<i64>>>()?;
                Some(Tensor::f_from_slice(&k)?.f_to_device(batch.ids.device())?)
            }
            _ => None,
        };
        let parts = self
            .members
            .iter()
            .map(|m| m.prepare(batch, &[]))
            .collect::<Result<Vec<_>>>()?;
        let (labels, token_weights) = batch.flat_targets()?;
        Ok(Box::new(EnsembleBatch {
            parts,
            weights: &self.weights,
            combine: self.combine,
            shares: self.shares,
            labels,
            token_weights,
            row_teacher,
            seq_len: batch.ids.size()[1],
            width: self.vocab_size() as i64,
        }))
    }

    fn vocab_size(&self) -> usize {
        self.members
            .iter()
            .map(|m| m.vocab_size())
            .min()
            .unwrap_or(0)
    }
}

impl EnsembleBatch<'_> {
    /// Each position's teacher index (per_source): (len) i64.
    fn position_teacher(&self, start: i64, len: i64) -> Result<Option<Tensor>> {
        let Some(rows) = &self.row_teacher else {
            return Ok(None);
        };
        let device = rows.device();
        let pos = Tensor::f_arange_start(start, start + len, (Kind::Int64, device))?;
        let row = pos.f_floor_divide_scalar(self.seq_len)?;
        Ok(Some(rows.f_index_select(0, &row)?))
    }

    /// Add the positions' shares: r (len, M) per position, counted where the token weight is > 0.
    fn count(&self, r: &Tensor, start: i64, len: i64) -> Result<()> {
        let Some(cell) = self.shares else {
            return Ok(());
        };
        let w = self.token_weights.f_narrow(0, start, len)?; // (len)
        let counted = w
            .f_gt(0.0)?
            .f_logical_and(&self.labels.f_narrow(0, start, len)?.f_ge(0)?)?
            .f_to_kind(Kind::Double)?; // (len)
        let sum = r
            .f_to_kind(Kind::Double)?
            .f_mul(&counted.f_unsqueeze(-1)?)?
            .f_sum_dim_intlist(0, false, Kind::Double)?; // (M)
        let n = counted.f_sum(Kind::Double)?;
        cell.borrow_mut().add(sum, n)
    }
}

impl PreparedSignal for EnsembleBatch<'_> {
    fn positions(&self, start: i64, len: i64) -> Result<TeacherDist> {
        // each teacher's logits in the student's ids, cut to the common width: (len, W) f32
        let z = self
            .parts
            .iter()
            .map(|p| -> Result<Tensor> {
                Ok(p.positions(start, len)?
                    .dense()?
                    .f_narrow(1, 0, self.width)?
                    .f_to_kind(Kind::Float)?)
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let m = z.len() as i64;
        tch::no_grad(|| -> Result<TeacherDist> {
            let safe = self
                .labels
                .f_narrow(0, start, len)?
                .f_clamp_min(0)?
                .f_unsqueeze(-1)?; // (len, 1)
            let (out, r) = match self.combine {
                Combine::Log => {
                    let mut out = z[0].f_mul_scalar(self.weights[0])?;
                    for (zi, &wi) in z.iter().zip(self.weights).skip(1) {
                        out = out.f_add(&zi.f_mul_scalar(wi)?)?;
                    }
                    (out, self.responsibility(&z, &safe)?)
                }
                Combine::Probability => {
                    let lp = z
                        .iter()
                        .map(|zi| zi.f_log_softmax(-1, Kind::Float))
                        .collect::<std::result::Result<Vec<Tensor>, _>>()?;
                    // a_i = log w_i + log p_i − log p_1: (M, len, W)
                    let a = Tensor::f_stack(
                        &lp.iter()
                            .zip(self.weights)
                            .map(|(l, &w)| l.f_sub(&lp[0])?.f_add_scalar(w.ln()))
                            .collect::<std::result::Result<Vec<Tensor>, _>>()?,
                        0,
                    )?;
                    let top = a.f_amax(&[0i64][..], true)?; // (1, len, W)
                    let lse = a
                        .f_sub(&top)?
                        .f_exp()?
                        .f_sum_dim_intlist(0, false, Kind::Float)?
                        .f_log()?
                        .f_add(&top.f_squeeze_dim(0)?)?; // (len, W)
                    let r = log_responsibility(&lp, self.weights, &safe)?.f_exp()?;
                    (z[0].f_add(&lse)?, r)
                }
                Combine::PerSource(_) => {
                    let k = self.position_teacher(start, len)?.expect("per_source rows"); // (len)
                    let mut out = z[0].shallow_clone();
                    for (i, zi) in z.iter().enumerate().skip(1) {
                        let here = k.f_eq(i as i64)?.f_unsqueeze(-1)?; // (len, 1)
                        out = zi.f_where_self(&here, &out)?;
                    }
                    let r = k.f_one_hot(m)?.f_to_kind(Kind::Float)?; // (len, M)
                    (out, r)
                }
            };
            self.count(&r, start, len)?;
            Ok(TeacherDist::Dense(out))
        })
    }

    fn hidden(&self) -> &[Tensor] {
        &[]
    }

    fn len(&self) -> i64 {
        self.parts[0].len()
    }
}

impl EnsembleBatch<'_> {
    fn responsibility(&self, z: &[Tensor], safe: &Tensor) -> Result<Tensor> {
        let lp = z
            .iter()
            .map(|zi| zi.f_log_softmax(-1, Kind::Float))
            .collect::<std::result::Result<Vec<Tensor>, _>>()?;
        Ok(log_responsibility(&lp, self.weights, safe)?.f_exp()?)
    }
}

/// log r_i = log w_i + log p_i(y) − LSE_j(log w_j + log p_j(y)): (len, M).
fn log_responsibility(lp: &[Tensor], weights: &[f64], safe: &Tensor) -> Result<Tensor> {
    let a = Tensor::f_cat(
        &lp.iter()
            .zip(weights)
            .map(|(l, &w)| l.f_gather(-1, safe, false)?.f_add_scalar(w.ln()))
            .collect::<std::result::Result<Vec<Tensor>, _>>()?,
        -1,
    )?; // (len, M)
    Ok(a.f_log_softmax(-1, Kind::Float)?)
}

/// The eval record's `teachers`: per teacher its name, weight, share of the signal on the
/// validation set (counted by the evaluation just run) and its own perplexity there.
pub fn eval_record(
    t: &Teachers,
    first: Live<'_>,
    student: &crate::model::Llama,
    validation: &[crate::data::Sequence],
    micro_batch: usize,
) -> Result<serde_json::Value> {
    let shares = t.shares.borrow_mut().take()?;
    let mut out = Vec::with_capacity(t.config.members.len());
    for (i, (live, m)) in t.each(first).iter().zip(&t.config.members).enumerate() {
        let own = crate::eval::distill_metrics(live, student, validation, micro_batch)?;
        out.push(serde_json::json!({"name": m.name, "weight": m.weight,
            "share": shares.as_ref().map(|s| s[i]), "ppl": own.teacher_ppl}));
    }
    Ok(serde_json::Value::Array(out))
}
