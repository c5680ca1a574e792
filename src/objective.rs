//! The objective: the weighted sum of the loss terms named in the run file,
//!   L = Σ_i w_i · term_i(student logits, teacher signal, labels, per-token weights)
//! each term a weighted mean over the positions it is given. Pure: it runs no model and no backward
//! pass (train/step.rs does); it takes the student's logits and the teacher's distribution at the
//! same positions, compared on their shared vocabulary prefix: a teacher signal mapped into the
//! student's ids (`teacher::vocab`) is W wide, and the prefix then cuts the student's padding rows
//! (ids ≥ W) from its logits, so both sides are renormalised over the same tokens. Stateful
//! terms (TAID's λ) live in their losses and are saved with the checkpoint.
//! From a teacher store (a sparse signal) the terms compare reduced distributions (the stored tokens
//! and one tail bucket, losses/reduced.rs), built once per call at the store's temperature, which
//! every term that reads the teacher must share (`check_sparse`).
//! Terms that read hidden states (`Reads::Hidden`, losses/hidden.rs) are not per position over the
//! vocabulary: `compute` leaves them at 0 and `compute_hidden` evaluates them, once per micro-batch,
//! on the states of the layers `hidden_layers` names, with the wiring set-up gave each
//! (`wire_hidden`: its layer pairs and projection). The two values add up to the objective.
//! A term may have a step window (`steps = [first, last]`, inclusive, optimizer steps from 1): once
//! the training loop has said which step it computes (`begin_step`), a term outside its window
//! contributes nothing (its part is 0, its state does not advance, and the train record logs it as
//! null). Without `begin_step` (evaluation, tests) every term counts. PACED's two stages are
//! `forward_kl` with `steps = [1, k]` and `reverse_kl` with `steps = [k + 1, total]`.
use crate::losses::hidden::HiddenInput;
use crate::losses::reduced::{same_temperature, Reduced};
use crate::losses::registry::{self, BuildContext, Loss, LossInput, LossSpec, Params, Reads};
use crate::teacher::TeacherDist;
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// One `[[loss]]` of the run file: a kind from the registry, its parameters, its weight; for a kind
/// that reads hidden states, the (student layer, teacher layer) pairs it was given (None = the
/// default map, settled at set-up: train/hidden.rs).
#[derive(Debug, Clone, PartialEq)]
pub struct LossTerm {
    pub spec: &'static LossSpec,
    pub params: Params,
    pub weight: f64,
    pub layers: Option<Vec<(usize, usize)>>,
    /// the optimizer steps (from 1, inclusive) at which the term counts; None = every step
    pub steps: Option<(usize, usize)>,
}

impl LossTerm {
    /// `kind` with (name, value) parameters, checked against the registry, and a weight > 0.
    pub fn new(
        kind: &str,
        given: &[(&str, f64)],
        weight: f64,
    ) -> std::result::Result<Self, String> {
        let spec = registry::spec(kind).ok_or_else(|| {
            format!(
                "unknown kind '{kind}', expected one of {}",
                registry::names()
            )
        })?;
        let params = spec.params(given)?;
        if !(weight.is_finite() && weight > 0.0) {
            return Err(format!("weight must be positive and finite, got {weight}"));
        }
        // the constructor's own checks (e.g. TAID's t_start ≤ t_end) run now, not at step 1
        (spec.build)(&params, &BuildContext { total_steps: 1 }).map_err(|e| e.to_string())?;
        Ok(LossTerm {
            spec,
            params,
            weight,
            layers: None,
            steps: None,
        })
    }

    /// The same term with an explicit layer map (a kind that reads hidden states; at least one pair).
    pub fn with_layers(self, layers: Vec<(usize, usize)>) -> std::result::Result<Self, String> {
        if self.spec.reads != Reads::Hidden {
            return Err(format!(
                "'layers' does not apply to '{}' (it compares output distributions)",
                self.spec.name
            ));
        }
        if layers.is_empty() {
            return Err("layers must list at least one [student, teacher] pair".into());
        }
        Ok(LossTerm {
            layers: Some(layers),
            ..self
        })
    }

    /// The same term counted only at optimizer steps first..=last (1 ≤ first ≤ last).
    pub fn with_steps(self, first: usize, last: usize) -> std::result::Result<Self, String> {
        if first == 0 || first > last {
            return Err(format!(
                "steps must be [first, last] with 1 ≤ first ≤ last, got [{first}, {last}]"
            ));
        }
        Ok(LossTerm {
            steps: Some((first, last)),
            ..self
        })
    }

    /// Whether the term counts at optimizer step `step` (from 1).
    pub fn active_at(&self, step: usize) -> bool {
        self.steps.is_none_or(|(a, b)| (a..=b).contains(&step))
    }

    /// "forward_kl(temperature=1)", "hidden(metric=cosine, layers=[[0, 2]])" for reports.
    pub fn describe(&self) -> String {
        let mut ps = self.params.describe(self.spec);
        if let Some(l) = &self.layers {
            let pairs: Vec<String> = l.iter().map(|(s, t)| format!("[{s}, {t}]")).collect();
            ps.push(format!("layers=[{}]", pairs.join(", ")));
        }
        if let Some((a, b)) = self.steps {
            ps.push(format!("steps=[{a}, {b}]"));
        }
        format!("{}({})", self.spec.name, ps.join(", "))
    }
}

/// A hidden-state term's wiring, settled at set-up: the (student layer, teacher layer) pairs it
/// compares and its projection (d_t, d_s), None when the widths agree.
#[derive(Debug)]
pub struct HiddenWiring {
    pub pairs: Vec<(usize, usize)>,
    pub projection: Option<Tensor>,
}

/// A wired hidden-state term as `run.json` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenMap {
    pub term: String,
    pub pairs: Vec<(usize, usize)>,
    pub projected: bool,
}

pub struct Objective {
    terms: Vec<(Box<dyn Loss>, f64)>,
    names: Vec<String>,
    /// per term: its wiring when it reads hidden states (set by `wire_hidden`)
    wiring: Vec<Option<HiddenWiring>>,
    /// per term: its step window (None = every step)
    windows: Vec<Option<(usize, usize)>>,
    /// the step being computed (`begin_step`); None = every term counts
    step: Option<usize>,
}

/// The total (with its graph) and each term's value (unweighted, detached).
pub struct ObjectiveValue {
    pub total: Tensor,
    pub parts: Vec<Tensor>,
}

impl Objective {
    pub fn new(terms: &[LossTerm], total_steps: usize) -> Result<Self> {
        let ctx = BuildContext { total_steps };
        let mut out = Vec::new();
        let mut names: Vec<String> = Vec::new();
        check_windows(terms, total_steps)
            .map_err(|i| Error::Invalid(format!("{}: {}", i.key, i.msg)))?;
        for t in terms {
            let base = t.spec.name.to_string();
            let n = names
                .iter()
                .filter(|x| x.split('#').next() == Some(&base))
                .count();
            names.push(if n == 0 {
                base
            } else {
                format!("{base}#{}", n + 1)
            });
            out.push(((t.spec.build)(&t.params, &ctx)?, t.weight));
        }
        let wiring = out.iter().map(|_| None).collect();
        Ok(Objective {
            terms: out,
            names,
            wiring,
            windows: terms.iter().map(|t| t.steps).collect(),
            step: None,
        })
    }

    /// The optimizer step (from 1) that the following `compute`s belong to: terms outside their
    /// step window contribute nothing until the next call.
    pub fn begin_step(&mut self, step: usize) {
        self.step = Some(step);
    }

    /// Whether term `i` counts at the current step (every term before `begin_step`).
    pub fn active(&self, i: usize) -> bool {
        match (self.step, self.windows.get(i).copied().flatten()) {
            (Some(s), Some((a, b))) => (a..=b).contains(&s),
            _ => true,
        }
    }

    fn reads_hidden(loss: &dyn Loss) -> bool {
        loss.spec().reads == Reads::Hidden
    }

    /// Whether any term compares output distributions (the vocabulary-sized work is needed).
    pub fn reads_logits(&self) -> bool {
        self.terms
            .iter()
            .any(|(l, _)| !Self::reads_hidden(l.as_ref()))
    }

    /// The terms that read hidden states, by index (in run-file order).
    pub fn hidden_terms(&self) -> Vec<usize> {
        (0..self.terms.len())
            .filter(|&i| Self::reads_hidden(self.terms[i].0.as_ref()))
            .collect()
    }

    /// Give hidden-state term `term` its layer pairs and projection.
    pub fn wire_hidden(&mut self, term: usize, wiring: HiddenWiring) -> Result<()> {
        match self.terms.get(term) {
            Some((l, _)) if Self::reads_hidden(l.as_ref()) => {
                self.wiring[term] = Some(wiring);
                Ok(())
            }
            _ => Err(Error::Invalid(format!(
                "loss term {term} does not read hidden states"
            ))),
        }
    }

    /// Each wired hidden-state term: its name, its layer pairs, whether it has a projection.
    pub fn hidden_maps(&self) -> Vec<HiddenMap> {
        self.wiring
            .iter()
            .zip(&self.names)
            .filter_map(|(w, n)| {
                w.as_ref().map(|w| HiddenMap {
                    term: n.clone(),
                    pairs: w.pairs.clone(),
                    projected: w.projection.is_some(),
                })
            })
            .collect()
    }

    /// The student layers and the teacher layers whose states the hidden terms compare (each
    /// sorted, without repeats): what `compute_hidden` takes, in this order. Empty when there is
    /// no hidden term.
    pub fn hidden_layers(&self) -> (Vec<usize>, Vec<usize>) {
        let (mut s, mut t): (Vec<usize>, Vec<usize>) = self
            .wiring
            .iter()
            .flatten()
            .flat_map(|w| w.pairs.iter().copied())
            .unzip();
        for v in [&mut s, &mut t] {
            v.sort_unstable();
            v.dedup();
        }
        (s, t)
    }

    /// The hidden-state terms over one micro-batch. `student[i]` is the state after student layer
    /// `hidden_layers().0[i]`, (…, d_s) with its graph; `teacher[j]` after teacher layer
    /// `hidden_layers().1[j]`, (…, d_t); `weights` the leading shape (…). The parts of the other
    /// terms are 0.
    pub fn compute_hidden(
        &self,
        student: &[Tensor],
        teacher: &[Tensor],
        weights: &Tensor,
    ) -> Result<ObjectiveValue> {
        let (s_layers, t_layers) = self.hidden_layers();
        if student.len() != s_layers.len() || teacher.len() != t_layers.len() {
            return Err(Error::Invalid(format!(
                "hidden terms: {} student and {} teacher states given, the layer maps name {} and {}",
                student.len(),
                teacher.len(),
                s_layers.len(),
                t_layers.len()
            )));
        }
        let at = |layers: &[usize], l: usize| layers.binary_search(&l).expect("listed");
        let mut total = Tensor::f_zeros([], (Kind::Float, weights.device()))?;
        let mut parts = Vec::with_capacity(self.terms.len());
        for (i, ((loss, weight), name)) in self.terms.iter().zip(&self.names).enumerate() {
            if !Self::reads_hidden(loss.as_ref()) || !self.active(i) {
                parts.push(Tensor::f_zeros([], (Kind::Float, weights.device()))?);
                continue;
            }
            let w = self.wiring[i].as_ref().ok_or_else(|| {
                Error::Invalid(format!(
                    "loss term '{name}': its layer map was not settled (the training set-up wires \
                     hidden-state terms)"
                ))
            })?;
            let input = HiddenInput {
                pairs: w
                    .pairs
                    .iter()
                    .map(|&(s, t)| (&student[at(&s_layers, s)], &teacher[at(&t_layers, t)]))
                    .collect(),
                projection: w.projection.as_ref(),
                weights,
            };
            let value = loss.compute_hidden(&input)?.f_to_kind(Kind::Float)?;
            total = total.f_add(&value.f_mul_scalar(*weight)?)?;
            parts.push(value.f_detach()?);
        }
        Ok(ObjectiveValue { total, parts })
    }

    /// Term names for logs: each kind's registry name, with a "#2" suffix for repeats.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether any term needs the teacher's distribution.
    pub fn needs_teacher(&self) -> bool {
        self.terms.iter().any(|(l, _)| l.needs_teacher())
    }

    /// Whether every term over the output distributions is a weighted mean of per-position values,
    /// so that `compute` can run over chunks of positions (token-selective KD's entropy quantile and
    /// Sinkhorn's transport plan span a micro-batch; hidden-state terms are not part of `compute`).
    pub fn chunkable(&self) -> bool {
        self.terms
            .iter()
            .filter(|(l, _)| !Self::reads_hidden(l.as_ref()))
            .all(|(l, _)| l.per_position())
    }

    /// Whether every term that reads the teacher is defined on a store's reduced distributions and
    /// reads the teacher at the store's `temperature` (a term without a temperature reads it at 1).
    /// The error names the term as `names()` does and says why.
    pub fn check_sparse(&self, temperature: f64) -> Result<()> {
        for ((loss, _), name) in self.terms.iter().zip(&self.names) {
            if !loss.needs_teacher() {
                continue;
            }
            if let Err(why) = loss.on_reduced() {
                return Err(Error::Invalid(format!(
                    "loss term '{name}' is not defined on a teacher store: {why}"
                )));
            }
            let (at, how) = match loss.teacher_temperature() {
                Some((param, t)) => (t, format!("{param} = {t}")),
                None => (1.0, "it has no temperature: T = 1".to_string()),
            };
            if !same_temperature(at, temperature) {
                return Err(Error::Invalid(format!(
                    "loss term '{name}' reads the teacher at temperature {at} ({how}), the teacher \
                     store was captured at temperature {temperature}: a divergence at another \
                     temperature is not exactly computable from a store, because the tail's mass at \
                     {at} depends on logits the store does not hold (capture the store at {at}, or \
                     give the term the store's temperature)"
                )));
            }
        }
        Ok(())
    }

    /// student: logits (…, Vs); teacher: the teacher's distribution at the same positions, or None
    /// when no term needs it; labels (…) with the ignore index where nothing is predicted; weights
    /// (…) f32 ≥ 0. A sparse teacher (a store's) has one row per position, in the flattened order
    /// of the leading shape, and ids in the student's vocabulary.
    pub fn compute(
        &self,
        student: &Tensor,
        teacher: Option<&TeacherDist>,
        labels: &Tensor,
        weights: &Tensor,
    ) -> Result<ObjectiveValue> {
        let teacher = teacher.filter(|_| self.needs_teacher());
        // the reduced pair, once for every term (all at the store's temperature)
        let reduced = match teacher {
            Some(TeacherDist::Sparse(sparse)) => {
                self.check_sparse(sparse.temperature)?;
                Some(Reduced::new(student, sparse)?)
            }
            _ => None,
        };
        let dense = match teacher {
            Some(TeacherDist::Dense(t)) => Some(t),
            _ => None,
        };
        self.compute_with(student, dense, reduced.as_ref(), labels, weights)
    }

    /// Whether every active term over the output distributions reads the student, on a store, only
    /// through the reduced pair (`Loss::reads_only_reduced`), so that `compute_on_reduced` may be
    /// used.
    pub fn reads_only_reduced(&self) -> bool {
        self.terms
            .iter()
            .enumerate()
            .filter(|(i, (l, _))| !Self::reads_hidden(l.as_ref()) && self.active(*i))
            .all(|(_, (l, _))| l.needs_teacher() && l.reads_only_reduced())
    }

    /// The objective on a store's reduced pair whose student side was computed elsewhere
    /// (`Reduced::by_hand`), for an objective whose terms read nothing else of the student
    /// (`reads_only_reduced`; an error otherwise). The value and its graph reach the pair's
    /// student side only.
    pub fn compute_on_reduced(
        &self,
        reduced: &Reduced,
        labels: &Tensor,
        weights: &Tensor,
    ) -> Result<ObjectiveValue> {
        if !self.reads_only_reduced() {
            return Err(Error::Invalid(
                "the objective reads the student's logits beyond a store's reduced pair".into(),
            ));
        }
        self.check_sparse(reduced.temperature)?;
        self.compute_with(&reduced.student, None, Some(reduced), labels, weights)
    }

    /// `compute` once the teacher's side is known: its dense logits, or a store's reduced pair.
    fn compute_with(
        &self,
        student: &Tensor,
        dense: Option<&Tensor>,
        reduced: Option<&Reduced>,
        labels: &Tensor,
        weights: &Tensor,
    ) -> Result<ObjectiveValue> {
        // the shared vocabulary prefix (a store's ids are already the student's)
        let (s_shared, t_shared) = match (dense, reduced) {
            (Some(t), _) => {
                let last = |x: &Tensor| *x.size().last().unwrap_or(&0);
                let v = last(student).min(last(t));
                (
                    Some(student.f_narrow(-1, 0, v)?),
                    Some(t.f_narrow(-1, 0, v)?),
                )
            }
            (None, Some(_)) => (Some(student.shallow_clone()), None),
            (None, None) => (None, None),
        };
        // f32 for training's f32/bf16 logits; f64 when the student's logits are f64 (the tests'
        // references), so that the sum does not round what the terms computed in f64
        let kind = crate::losses::compute_kind(student);
        let mut total = Tensor::f_zeros([], (kind, student.device()))?;
        let mut parts = Vec::with_capacity(self.terms.len());
        for (i, (loss, weight)) in self.terms.iter().enumerate() {
            if Self::reads_hidden(loss.as_ref()) || !self.active(i) {
                // evaluated once per micro-batch by `compute_hidden`; or outside its step window
                parts.push(Tensor::f_zeros([], (Kind::Float, student.device()))?);
                continue;
            }
            let input = if loss.needs_teacher() {
                let s = s_shared.as_ref().ok_or_else(|| {
                    Error::Invalid(format!("{}: needs the teacher's logits", loss.spec().name))
                })?;
                LossInput {
                    student: s,
                    teacher: t_shared.as_ref(),
                    reduced,
                    labels,
                    weights,
                }
            } else {
                LossInput {
                    student,
                    teacher: None,
                    reduced: None,
                    labels,
                    weights,
                }
            };
            let value = if input.reduced.is_some() {
                // the reduced teacher holds −inf by design (padding slots, an empty tail)
                crate::losses::partial_support(|| loss.compute(&input))
            } else {
                loss.compute(&input)
            }?
            .f_to_kind(kind)?;
            total = total.f_add(&value.f_mul_scalar(*weight)?)?;
            parts.push(value.f_detach()?);
        }
        Ok(ObjectiveValue { total, parts })
    }

    /// After optimizer step `step`, whose terms had the (unweighted) values `parts`: advance the
    /// stateful terms, each with its own value (TAID's λ follows TAID's loss).
    pub fn after_step(&mut self, parts: &[f64], step: usize) {
        let active: Vec<bool> = (0..self.terms.len()).map(|i| self.active(i)).collect();
        for (((loss, _), &value), on) in self.terms.iter_mut().zip(parts).zip(active) {
            if on {
                loss.after_step(value, step);
            }
        }
    }

    /// Values the terms log each step, grouped by name (e.g. "taid_lambda": [λ of each TAID term]).
    pub fn log_values(&self) -> Vec<(&'static str, Vec<f64>)> {
        let mut out: Vec<(&'static str, Vec<f64>)> = Vec::new();
        for (name, v) in self.terms.iter().filter_map(|(l, _)| l.log_value()) {
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, vs)) => vs.push(v),
                None => out.push((name, vec![v])),
            }
        }
        out
    }

    /// Each term's state (None for stateless terms), for the checkpoint.
    pub fn state(&self) -> Vec<Option<serde_json::Value>> {
        self.terms.iter().map(|(l, _)| l.state()).collect()
    }

    pub fn restore(&mut self, state: &[Option<serde_json::Value>]) -> Result<()> {
        if state.len() != self.terms.len() {
            return Err(Error::Invalid(format!(
                "checkpoint has {} loss terms, the run file {}",
                state.len(),
                self.terms.len()
            )));
        }
        for ((loss, _), s) in self.terms.iter_mut().zip(state) {
            if let Some(s) = s {
                loss.restore(s)?;
            }
        }
        Ok(())
    }
}

/// The run file's `[[loss]]` tables: `kind`, `weight` (1 by default, > 0) and the kind's own
/// parameters, each checked against the registry (a `Choice` parameter written as its name), and
/// for a kind that reads hidden states `layers = [[student, teacher], ...]`; `steps = [first, last]`
/// (optional, inclusive, from 1) limits the term to those optimizer steps. At least one term.
pub fn loss_terms(tables: &[toml::Table]) -> crate::config::Checked<Vec<LossTerm>> {
    use crate::config::issue;
    if tables.is_empty() {
        return Err(issue(
            "loss",
            format!(
                "at least one [[loss]] term is needed (kinds: {})",
                registry::names()
            ),
        ));
    }
    let number = |key: &str, v: &toml::Value| -> crate::config::Checked<f64> {
        match v {
            toml::Value::Float(x) => Ok(*x),
            toml::Value::Integer(x) => Ok(*x as f64),
            other => Err(issue(
                key,
                format!("invalid type: {}, expected a number", other.type_str()),
            )),
        }
    };
    let mut terms = Vec::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        let at = |k: &str| format!("loss.{i}.{k}");
        let kind = match t.get("kind") {
            Some(toml::Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(issue(
                    at("kind"),
                    format!("invalid type: {}, expected a string", other.type_str()),
                ))
            }
            None => {
                return Err(issue(
                    format!("loss.{i}"),
                    format!("missing field 'kind' (one of {})", registry::names()),
                ))
            }
        };
        let spec = registry::spec(kind).ok_or_else(|| {
            issue(
                at("kind"),
                format!(
                    "unknown kind '{kind}', expected one of {}",
                    registry::names()
                ),
            )
        })?;
        let weight = match t.get("weight") {
            Some(v) => number(&at("weight"), v)?,
            None => 1.0,
        };
        let mut given = Vec::new();
        let mut layers = None;
        let steps = match t.get("steps") {
            Some(v) => Some(step_window(&at("steps"), v)?),
            None => None,
        };
        for (k, v) in t
            .iter()
            .filter(|(k, _)| *k != "kind" && *k != "weight" && *k != "steps")
        {
            if k == "layers" && spec.reads == Reads::Hidden {
                layers = Some(layer_pairs(&at(k), v)?);
                continue;
            }
            if !spec.params.iter().any(|p| p.name == k) {
                let known = registry::REGISTRY.iter().any(|s| {
                    s.params.iter().any(|p| p.name == k)
                        || (k == "layers" && s.reads == Reads::Hidden)
                });
                let mut takes: Vec<&str> = spec.params.iter().map(|p| p.name).collect();
                if spec.reads == Reads::Hidden {
                    takes.push("layers");
                }
                let takes = if takes.is_empty() {
                    "nothing".to_string()
                } else {
                    takes.join(", ")
                };
                return Err(issue(
                    at(k),
                    if known {
                        format!("'{k}' does not apply to '{kind}' (it takes: {takes})")
                    } else {
                        format!("unknown field '{k}', expected one of kind, weight, steps, {takes}")
                    },
                ));
            }
            let range = spec
                .params
                .iter()
                .find(|p| p.name == k)
                .expect("checked above")
                .range;
            let value = match (range, v) {
                (registry::Range::Choice(names), toml::Value::String(name)) => {
                    range.index_of(name).ok_or_else(|| {
                        issue(
                            at(k),
                            format!("'{name}' is not one of {}", names.join(", ")),
                        )
                    })?
                }
                (registry::Range::Choice(names), other) => {
                    return Err(issue(
                        at(k),
                        format!(
                            "invalid type: {}, expected a string, one of {}",
                            other.type_str(),
                            names.join(", ")
                        ),
                    ))
                }
                _ => number(&at(k), v)?,
            };
            given.push((k.as_str(), value));
        }
        let term = LossTerm::new(kind, &given, weight).map_err(|m| {
            // name the parameter the message is about when there is one
            let key = given
                .iter()
                .map(|(k, _)| *k)
                .chain(["weight"])
                .find(|k| m.starts_with(&format!("{k} ")))
                .map_or_else(|| at("kind"), at);
            issue(key, m)
        })?;
        let term = match layers {
            Some(l) => term.with_layers(l).map_err(|m| issue(at("layers"), m))?,
            None => term,
        };
        let term = match steps {
            Some((a, b)) => term.with_steps(a, b).map_err(|m| issue(at("steps"), m))?,
            None => term,
        };
        terms.push(term);
    }
    Ok(terms)
}

/// The terms' step windows against a run of `total` steps: none ends after it, and every step has
/// at least one term that counts.
pub fn check_windows(terms: &[LossTerm], total: usize) -> crate::config::Checked<()> {
    use crate::config::issue;
    for (i, t) in terms.iter().enumerate() {
        if let Some((_, last)) = t.steps.filter(|&(_, last)| last > total) {
            return Err(issue(
                format!("loss.{i}.steps"),
                format!("ends at step {last}, after the run's {total} steps"),
            ));
        }
    }
    if let Some(step) = (1..=total).find(|&s| !terms.iter().any(|t| t.active_at(s))) {
        return Err(issue(
            "loss",
            format!("no [[loss]] term counts at step {step} (the 'steps' windows leave it out)"),
        ));
    }
    Ok(())
}

/// `steps = [first, last]`: two integers ≥ 1 (checked against each other by `with_steps`).
fn step_window(key: &str, v: &toml::Value) -> crate::config::Checked<(usize, usize)> {
    use crate::config::issue;
    let bad = || {
        issue(
            key,
            "expected [first, last]: the optimizer steps (from 1, inclusive) at which the term counts",
        )
    };
    match v {
        toml::Value::Array(a) if a.len() == 2 => {
            let n = |x: &toml::Value| match x {
                toml::Value::Integer(i) if *i >= 1 && *i <= u32::MAX as i64 => Ok(*i as usize),
                _ => Err(bad()),
            };
            Ok((n(&a[0])?, n(&a[1])?))
        }
        _ => Err(bad()),
    }
}

/// `layers = [[s, t], ...]`: pairs of layer indices (student, teacher), at least one.
fn layer_pairs(key: &str, v: &toml::Value) -> crate::config::Checked<Vec<(usize, usize)>> {
    use crate::config::issue;
    let bad = || {
        issue(
            key,
            "expected a list of [student layer, teacher layer] pairs of integers ≥ 0, e.g. \
             [[0, 1], [1, 3]]",
        )
    };
    let toml::Value::Array(items) = v else {
        return Err(bad());
    };
    let index = |x: &toml::Value| match x {
        toml::Value::Integer(i) if *i >= 0 && *i <= u32::MAX as i64 => Ok(*i as usize),
        _ => Err(bad()),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            toml::Value::Array(p) if p.len() == 2 => out.push((index(&p[0])?, index(&p[1])?)),
            _ => return Err(bad()),
        }
    }
    if out.is_empty() {
        return Err(issue(key, "must list at least one [student, teacher] pair"));
    }
    Ok(out)
}
