//! Vocabulary and template reconciliation of a teacher and a student, before any capture or
//! training (`distill check`, and every run's set-up).
//!
//! Tokens are compared by their strings (each tokenizer's vocabulary with its added and special
//! tokens, `Tokenizer::id_tokens`): student id s and teacher id t are counterparts when they hold
//! the same string (the k-th id of a string on one side with the k-th on the other), or when both
//! are ids without a token at the same place. A padding row is an embedding row with no
//! counterpart (typically rows beyond the tokenizer: Qwen2.5's 152,064 rows for 151,665 tokens).
//! With W = 1 + the last student id that has a counterpart t(s), the teacher's distribution in the
//! student's ids is
//!   logits'[…, s] = logits[…, t(s)]   for s < W
//! so the teacher's padding rows drop out (their mass is reported; the softmax of the losses
//! renormalises the rest), and the student's rows from W on (its padding) lie beyond the width, where
//! the objective's shared prefix cuts them from the student too (renormalised over the rest): the
//! losses see the same tokens on both sides. Tokens on one side only are refused.
//!
//! Why a width of W and not the student's rows with −inf beyond: the step and evaluation run the
//! losses `trusted` (no host read for the teacher's −inf test), where a −inf column gives NaN. A
//! student id below W without a counterpart would need such a column: it is refused.
use super::{SparseDist, TeacherDist};
use crate::data::Batch;
use crate::model::{Llama, LoadedModel, Tokenizer};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How the two chat templates compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Templates {
    Same,
    Different,
    TeacherOnly,
    StudentOnly,
    Neither,
}

impl Templates {
    fn describe(self) -> &'static str {
        match self {
            Templates::Same => "same",
            Templates::Different => "differ",
            Templates::TeacherOnly => "teacher only",
            Templates::StudentOnly => "student only",
            Templates::Neither => "absent on both",
        }
    }
}

/// The teacher's probability mass on its padding rows, over some positions: the mass that the map
/// removes before the losses renormalise.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PaddingMass {
    pub mean: f64,
    pub max: f64,
    pub positions: usize,
}

/// A token at different ids on the two sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Remapped {
    pub token: String,
    pub teacher_id: u32,
    pub student_id: u32,
}

/// What the comparison found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VocabReport {
    /// the two `tokenizer.json` texts are byte-identical
    pub identical_tokenizers: bool,
    /// ids holding a token, on each side
    pub teacher_tokens: usize,
    pub student_tokens: usize,
    /// embedding rows
    pub teacher_rows: usize,
    pub student_rows: usize,
    /// rows without a counterpart (masked out of both distributions)
    pub teacher_padding_rows: usize,
    pub student_padding_rows: usize,
    /// W: the width of the teacher's distribution in the student's ids
    pub shared_ids: usize,
    /// student ids below W whose teacher counterpart has another id
    pub remapped: usize,
    /// the first (up to 5) of them
    pub remapped_first: Vec<Remapped>,
    pub templates: Templates,
    /// measured on some text, when the teacher has padding rows
    pub teacher_padding_mass: Option<PaddingMass>,
}

impl VocabReport {
    /// The one line every run prints and its report holds.
    pub fn summary(&self) -> String {
        let tokens = if self.identical_tokenizers {
            format!("identical tokenizers ({} tokens)", self.student_tokens)
        } else {
            format!("same {} tokens", self.student_tokens)
        };
        let mut s = format!(
            "vocabulary: {tokens}; rows teacher {} ({} padding), student {} ({} padding); {} remapped; chat templates {}",
            self.teacher_rows,
            self.teacher_padding_rows,
            self.student_rows,
            self.student_padding_rows,
            self.remapped,
            self.templates.describe()
        );
        if let Some(m) = &self.teacher_padding_mass {
            s += &format!(
                "; teacher mass on its padding rows mean {:.3e}, max {:.3e} ({} positions)",
                m.mean, m.max, m.positions
            );
        }
        s
    }

    /// A few lines for `distill check`, the summary last.
    pub fn lines(&self, teacher: &Path, student: &Path) -> Vec<String> {
        let line = |label: &str, text: String| format!("{:<16}{text}", format!("{label}:"));
        let side = |p: &Path, tokens: usize, rows: usize, pad: usize| {
            format!(
                "{} — {tokens} tokens, {rows} embedding rows, {pad} padding rows (masked)",
                p.display()
            )
        };
        let mut out = vec![
            line(
                "teacher",
                side(
                    teacher,
                    self.teacher_tokens,
                    self.teacher_rows,
                    self.teacher_padding_rows,
                ),
            ),
            line(
                "student",
                side(
                    student,
                    self.student_tokens,
                    self.student_rows,
                    self.student_padding_rows,
                ),
            ),
        ];
        let tokens = if self.identical_tokenizers {
            "identical tokenizers".to_string()
        } else if self.remapped == 0 {
            "the same tokens at the same ids (the tokenizer files differ)".to_string()
        } else {
            let first: Vec<String> = self
                .remapped_first
                .iter()
                .map(|r| {
                    format!(
                        "{:?} (teacher {} → student {})",
                        r.token, r.teacher_id, r.student_id
                    )
                })
                .collect();
            format!(
                "the same tokens, {} at other ids (remapped), first: {}",
                self.remapped,
                first.join(", ")
            )
        };
        out.push(line("tokens", tokens));
        out.push(line(
            "chat templates",
            self.templates.describe().to_string(),
        ));
        if let Some(m) = &self.teacher_padding_mass {
            out.push(line(
                "padding mass",
                format!(
                    "the teacher's on its padding rows: mean {:.6}, max {:.6} over {} positions",
                    m.mean, m.max, m.positions
                ),
            ));
        }
        out.push(self.summary());
        out
    }
}

/// The teacher's distribution in the student's ids, and the student's ids in the teacher's.
#[derive(Debug)]
pub struct VocabMap {
    /// W
    width: usize,
    teacher_rows: usize,
    /// t(s) == s for every s < W: ids need no translation, the distribution at most a narrow
    prefix: bool,
    /// (W) i64: t(s)
    s2t: Tensor,
    /// (teacher rows) i64: s(t), −1 for a teacher padding row
    t2s: Tensor,
    /// (P) i64: the teacher's padding rows
    teacher_padding: Tensor,
}

/// One side of the comparison: where it came from, its tokenizer, its embedding rows.
pub struct Side<'a> {
    pub source: &'a Path,
    pub tokenizer: &'a Tokenizer,
    pub rows: usize,
}

/// Compare a teacher and a student model (their tokenizers, embedding rows and chat templates);
/// the map lies on the teacher's device.
pub fn check(teacher: &LoadedModel, student: &LoadedModel) -> Result<(VocabReport, VocabMap)> {
    let (tt, st) = match (&teacher.tokenizer, &student.tokenizer) {
        (Some(a), Some(b)) => (a, b),
        (None, _) => {
            return Err(Error::format(
                &teacher.source,
                "the teacher has no tokenizer",
            ))
        }
        (_, None) => {
            return Err(Error::format(
                &student.source,
                "the student has no tokenizer",
            ))
        }
    };
    let (report, map) = compare(
        Side {
            source: &teacher.source,
            tokenizer: tt,
            rows: teacher.model.config.vocab_size,
        },
        Side {
            source: &student.source,
            tokenizer: st,
            rows: student.model.config.vocab_size,
        },
    )?;
    Ok((report, map.to_device(teacher.model.device())?))
}

/// Ids holding each token string, ascending.
fn ids_by_token(table: &[Option<String>]) -> HashMap<&str, Vec<u32>> {
    let mut by: HashMap<&str, Vec<u32>> = HashMap::with_capacity(table.len());
    for (i, t) in table.iter().enumerate() {
        if let Some(t) = t {
            by.entry(t.as_str()).or_default().push(i as u32);
        }
    }
    by
}

/// Compare two tokenizers with their models' embedding rows; refuse tokens on one side only.
pub fn compare(teacher: Side, student: Side) -> Result<(VocabReport, VocabMap)> {
    let (t_tab, s_tab) = (teacher.tokenizer.id_tokens(), student.tokenizer.id_tokens());
    let (t_by, s_by) = (ids_by_token(&t_tab), ids_by_token(&s_tab));
    // tokens on one side only: (token, teacher id, student id), in id order
    let mut only: Vec<(&str, Option<u32>, Option<u32>)> = Vec::new();
    let (mut n_teacher_only, mut n_student_only) = (0, 0);
    for (tok, ids) in &t_by {
        let n = s_by.get(tok).map_or(0, Vec::len);
        for &i in ids.iter().skip(n) {
            only.push((tok, Some(i), None));
            n_teacher_only += 1;
        }
    }
    for (tok, ids) in &s_by {
        let n = t_by.get(tok).map_or(0, Vec::len);
        for &i in ids.iter().skip(n) {
            only.push((tok, None, Some(i)));
            n_student_only += 1;
        }
    }
    if !only.is_empty() {
        only.sort_by_key(|(tok, t, s)| (t.or(*s), *tok));
        let id = |x: Option<u32>| x.map_or_else(|| "none".to_string(), |i| i.to_string());
        let first: Vec<String> = only
            .iter()
            .take(5)
            .map(|(tok, t, s)| format!("{tok:?} (teacher {}, student {})", id(*t), id(*s)))
            .collect();
        return Err(Error::Invalid(format!(
            "the student's tokenizer ({}) differs from the teacher's ({}): {n_teacher_only} tokens only in the teacher's, \
             {n_student_only} only in the student's; first: {}; cross-tokenizer distillation is not supported",
            student.source.display(),
            teacher.source.display(),
            first.join(", ")
        )));
    }
    // t(s) for every student row
    let t_of = |s: usize| -> Option<u32> {
        match s_tab.get(s) {
            Some(Some(tok)) => {
                let k = s_by[tok.as_str()]
                    .iter()
                    .position(|&i| i as usize == s)
                    .expect("s holds tok");
                Some(t_by[tok.as_str()][k])
            }
            // an id without a token: paired with the same id when the teacher has none there either
            Some(None) => matches!(t_tab.get(s), Some(None)).then_some(s as u32),
            None => None, // beyond the student's tokenizer
        }
        .filter(|&t| (t as usize) < teacher.rows)
    };
    let pairs: Vec<Option<u32>> = (0..student.rows).map(t_of).collect();
    let width = pairs.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
    if let Some(s) = pairs[..width].iter().position(Option::is_none) {
        let what = match s_tab.get(s) {
            Some(Some(tok)) => format!(
                "token {tok:?}, whose teacher id lies beyond the teacher's {} embedding rows",
                teacher.rows
            ),
            _ => "no token".to_string(),
        };
        return Err(Error::Invalid(format!(
            "{}: student id {s} ({what}) has no teacher counterpart but lies before the last shared id {}: \
             such a vocabulary is not supported",
            student.source.display(),
            width - 1
        )));
    }
    let s2t: Vec<i64> = pairs[..width]
        .iter()
        .map(|t| t.expect("checked above") as i64)
        .collect();
    let mut t2s = vec![-1i64; teacher.rows];
    for (s, &t) in s2t.iter().enumerate() {
        t2s[t as usize] = s as i64;
    }
    let teacher_padding: Vec<i64> = (0..teacher.rows as i64)
        .filter(|&t| t2s[t as usize] < 0)
        .collect();
    let remapped: Vec<usize> = (0..width).filter(|&s| s2t[s] != s as i64).collect();
    let remapped_first = remapped
        .iter()
        .take(5)
        .map(|&s| Remapped {
            token: s_tab.get(s).cloned().flatten().unwrap_or_default(),
            teacher_id: s2t[s] as u32,
            student_id: s as u32,
        })
        .collect();
    let templates = match (
        &teacher.tokenizer.chat_template,
        &student.tokenizer.chat_template,
    ) {
        (Some(a), Some(b)) if a == b => Templates::Same,
        (Some(_), Some(_)) => Templates::Different,
        (Some(_), None) => Templates::TeacherOnly,
        (None, Some(_)) => Templates::StudentOnly,
        (None, None) => Templates::Neither,
    };
    let report = VocabReport {
        identical_tokenizers: teacher.tokenizer.json() == student.tokenizer.json(),
        teacher_tokens: t_tab.iter().flatten().count(),
        student_tokens: s_tab.iter().flatten().count(),
        teacher_rows: teacher.rows,
        student_rows: student.rows,
        teacher_padding_rows: teacher_padding.len(),
        student_padding_rows: student.rows - width,
        shared_ids: width,
        remapped: remapped.len(),
        remapped_first,
        templates,
        teacher_padding_mass: None,
    };
    let map = VocabMap {
        width,
        teacher_rows: teacher.rows,
        prefix: remapped.is_empty(),
        s2t: Tensor::f_from_slice(&s2t)?,
        t2s: Tensor::f_from_slice(&t2s)?,
        teacher_padding: Tensor::f_from_slice(&teacher_padding)?,
    };
    Ok((report, map))
}

impl VocabMap {
    /// The map's lookups on `device`.
    pub fn to_device(self, device: Device) -> Result<Self> {
        Ok(VocabMap {
            s2t: self.s2t.f_to_device(device)?,
            t2s: self.t2s.f_to_device(device)?,
            teacher_padding: self.teacher_padding.f_to_device(device)?,
            ..self
        })
    }

    /// W: the width of the teacher's distribution in the student's ids; every student id the
    /// data may hold lies below it.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The teacher's distribution passes unchanged (same ids, no padding rows on the teacher).
    pub fn is_identity(&self) -> bool {
        self.prefix && self.width == self.teacher_rows
    }

    /// Whether student ids must be translated before the teacher's forward pass.
    pub fn translates_ids(&self) -> bool {
        !self.prefix
    }

    pub fn teacher_padding_rows(&self) -> usize {
        self.teacher_padding.size()[0] as usize
    }

    /// Student ids (any shape, each below `width`) → the teacher's ids for the same tokens; the
    /// same tensor when no token moved.
    pub fn teacher_ids(&self, ids: &Tensor) -> Result<Tensor> {
        if self.prefix {
            return Ok(ids.shallow_clone());
        }
        let s2t = self.s2t.f_to_device(ids.device())?;
        Ok(s2t
            .f_index_select(0, &ids.f_flatten(0, -1)?.f_to_kind(Kind::Int64)?)?
            .f_view_as(ids)?)
    }

    /// The teacher's distribution (over its rows) in the student's ids (width W):
    /// dense logits (…, Vt) → (…, W), unchanged (the same tensor) when the map is the identity, a
    /// narrow (a view) when only padding rows go, a gather of columns otherwise; a sparse top-k
    /// keeps its shape, each index turned into the student's id, and a slot whose teacher id has no
    /// student counterpart gets log-probability −inf and the index of the row's first valid slot
    /// (the tail mass and log-normaliser are left as they are).
    pub fn apply(&self, dist: TeacherDist) -> Result<TeacherDist> {
        if self.is_identity() {
            return Ok(dist);
        }
        match dist {
            TeacherDist::Dense(t) => {
                let v = *t.size().last().unwrap_or(&0);
                if v != self.teacher_rows as i64 {
                    return Err(Error::Shape(format!(
                        "vocab map: 'teacher' has {v} columns, the map was made for {} rows",
                        self.teacher_rows
                    )));
                }
                Ok(TeacherDist::Dense(if self.prefix {
                    t.f_narrow(-1, 0, self.width as i64)?
                } else {
                    let s2t = self.s2t.f_to_device(t.device())?;
                    t.f_index_select(-1, &s2t)?
                }))
            }
            TeacherDist::Sparse(sp) => Ok(TeacherDist::Sparse(self.apply_sparse(sp)?)),
        }
    }

    fn apply_sparse(&self, sp: SparseDist) -> Result<SparseDist> {
        let size = sp.indices.size();
        if size.len() != 2 || sp.logprobs.size() != size {
            return Err(Error::Shape(format!(
                "vocab map: sparse 'indices' has shape {size:?}, 'logprobs' {:?}; expected one (N, K)",
                sp.logprobs.size()
            )));
        }
        if size[1] == 0 {
            return Ok(sp);
        }
        let t2s = self.t2s.f_to_device(sp.indices.device())?;
        let mapped = t2s
            .f_index_select(0, &sp.indices.f_flatten(0, -1)?)?
            .f_view(size.as_slice())?; // (N, K), −1 where none
        let valid = mapped.f_ge(0)?;
        // argmax returns the first maximal index: the row's first valid slot
        let first = valid.f_to_kind(Kind::Int64)?.f_argmax(1, true)?; // (N, 1)
        let fill = mapped.f_gather(1, &first, false)?.f_clamp_min(0)?; // (N, 1)
        Ok(SparseDist {
            indices: mapped.f_where_self(&valid, &fill.f_expand_as(&mapped)?)?,
            logprobs: sp
                .logprobs
                .f_masked_fill(&valid.f_logical_not()?, f64::NEG_INFINITY)?,
            ..sp
        })
    }
}

/// The teacher's probability mass on its padding rows, Σ_{t padding} softmax(logits)[t], at the
/// positions of `batch` (student ids) that count (weight > 0; every position when none does);
/// None when the teacher has no padding rows (nothing is run then). One forward pass per row.
pub fn padding_mass(teacher: &Llama, map: &VocabMap, batch: &Batch) -> Result<Option<PaddingMass>> {
    if map.teacher_padding_rows() == 0 {
        return Ok(None);
    }
    let ids = map.teacher_ids(&batch.ids)?; // (B, T)
    let padding = map.teacher_padding.f_to_device(ids.device())?;
    let mut mass = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for b in 0..ids.size()[0] {
            let logits = teacher.forward(&ids.f_narrow(0, b, 1)?)?.f_squeeze_dim(0)?; // (T, Vt)
            let m = logits
                .f_log_softmax(-1, Kind::Float)?
                .f_index_select(-1, &padding)? // (T, P)
                .f_logsumexp([-1], false)?
                .f_exp()?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?; // (T)
            mass.extend(Vec::<f64>::try_from(m)?);
        }
        Ok(())
    })?;
    let w = batch.host_weights();
    let any = w.iter().any(|&x| x != 0.0);
    let kept: Vec<f64> = mass
        .iter()
        .zip(w)
        .filter(|(_, &x)| !any || x != 0.0)
        .map(|(&m, _)| m)
        .collect();
    if kept.is_empty() {
        return Ok(None);
    }
    Ok(Some(PaddingMass {
        mean: kept.iter().sum::<f64>() / kept.len() as f64,
        max: kept.iter().copied().fold(0.0, f64::max),
        positions: kept.len(),
    }))
}
