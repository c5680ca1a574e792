//! The one list of loss kinds. Each loss file owns its `LossSpec`: its name (as the run file spells
//! it), its parameters with defaults and valid ranges, and how it is built; the run file, the
//! objective, the bench and the CLI take the list from `REGISTRY` and from nowhere else.
//!
//! A built loss is a `Loss`: it maps (student logits, teacher logits, labels, per-token weights),
//! all over the same flattened positions, to a scalar. It never runs a model and never reads the
//! run file. On a teacher store it receives the reduced pair instead of the teacher's logits
//! (`reduced.rs`), or says why it is not defined there (`Loss::on_reduced`). A kind that reads
//! hidden states (`Reads::Hidden`) maps mapped layer pairs instead (`Loss::compute_hidden`), once per
//! micro-batch; its run-file table also takes `layers = [[student, teacher], ...]`.
use super::Reduced;
use crate::{Error, Result};
use tch::Tensor;

/// Where a parameter's value may lie.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    /// (0, ∞)
    Positive,
    /// [0, ∞)
    NonNegative,
    /// [0, 1]
    Unit,
    /// (0, 1]
    UnitOpen,
    /// an integer ≥ 1
    Count,
    /// one of these names; the value is its index (the run file writes the name)
    Choice(&'static [&'static str]),
}

impl Range {
    pub fn contains(&self, x: f64) -> bool {
        x.is_finite()
            && match self {
                Range::Positive => x > 0.0,
                Range::NonNegative => x >= 0.0,
                Range::Unit => (0.0..=1.0).contains(&x),
                Range::UnitOpen => x > 0.0 && x <= 1.0,
                Range::Count => x >= 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64,
                Range::Choice(names) => x >= 0.0 && x.fract() == 0.0 && x < names.len() as f64,
            }
    }
    pub fn describe(&self) -> String {
        match self {
            Range::Positive => "positive".into(),
            Range::NonNegative => "≥ 0".into(),
            Range::Unit => "in [0, 1]".into(),
            Range::UnitOpen => "in (0, 1]".into(),
            Range::Count => "an integer ≥ 1".into(),
            Range::Choice(names) => format!("one of {}", names.join(", ")),
        }
    }
    /// The name a `Choice` value stands for (None for other ranges or an index out of range).
    pub fn name_of(&self, x: f64) -> Option<&'static str> {
        match self {
            Range::Choice(names) if self.contains(x) => Some(names[x as usize]),
            _ => None,
        }
    }
    /// The value of a `Choice` name.
    pub fn index_of(&self, name: &str) -> Option<f64> {
        match self {
            Range::Choice(names) => names.iter().position(|n| *n == name).map(|i| i as f64),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub default: f64,
    pub range: Range,
    pub doc: &'static str,
}

/// The temperature T that divides both logits (every divergence with a temperature uses this one).
pub const TEMPERATURE: ParamSpec = ParamSpec {
    name: "temperature",
    default: 1.0,
    range: Range::Positive,
    doc: "divides student and teacher logits before the softmax",
};

/// What a loss needs to be built besides its parameters.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext {
    /// optimizer steps of the whole run (TAID's schedule)
    pub total_steps: usize,
}

/// What a loss kind compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// the output distributions (logits, or a store's reduced pair), per position
    Logits,
    /// hidden states of mapped layer pairs (`hidden.rs`), once per micro-batch
    Hidden,
}

pub struct LossSpec {
    pub name: &'static str,
    /// one line: the formula
    pub summary: &'static str,
    pub params: &'static [ParamSpec],
    pub reads: Reads,
    pub build: fn(&Params, &BuildContext) -> Result<Box<dyn Loss>>,
}

impl PartialEq for LossSpec {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Debug for LossSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// A loss's parameters: every one of its spec's, given or defaulted, each checked against its range.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    values: Vec<(&'static str, f64)>,
}

impl Params {
    /// The value of `name` (a parameter of the spec the params were made for).
    pub fn get(&self, name: &str) -> f64 {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("loss parameter '{name}' is not in its spec"))
    }
    pub fn count(&self, name: &str) -> usize {
        self.get(name) as usize
    }
    /// The (name, value) pairs as the run file writes them: a `Choice` by its name.
    pub fn describe(&self, spec: &LossSpec) -> Vec<String> {
        self.values
            .iter()
            .map(|(n, v)| {
                match spec
                    .params
                    .iter()
                    .find(|p| p.name == *n)
                    .and_then(|p| p.range.name_of(*v))
                {
                    Some(name) => format!("{n}={name}"),
                    None => format!("{n}={v}"),
                }
            })
            .collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.values.iter().copied()
    }
}

impl LossSpec {
    /// Fill in defaults and check `given` (name, value) pairs: unknown names and values out of range
    /// are refused with a message that names the parameter.
    pub fn params(&self, given: &[(&str, f64)]) -> std::result::Result<Params, String> {
        for (name, _) in given {
            if !self.params.iter().any(|p| p.name == *name) {
                let takes: Vec<&str> = self.params.iter().map(|p| p.name).collect();
                return Err(format!(
                    "'{name}' does not apply (it takes: {})",
                    if takes.is_empty() {
                        "nothing".to_string()
                    } else {
                        takes.join(", ")
                    }
                ));
            }
        }
        let mut values = Vec::with_capacity(self.params.len());
        for p in self.params {
            let v = given
                .iter()
                .rev()
                .find(|(n, _)| *n == p.name)
                .map_or(p.default, |(_, v)| *v);
            if !p.range.contains(v) {
                return Err(format!(
                    "{} must be {}, got {v}",
                    p.name,
                    p.range.describe()
                ));
            }
            values.push((p.name, v));
        }
        Ok(Params { values })
    }

    /// The spec's defaults.
    pub fn defaults(&self) -> Params {
        self.params(&[]).expect("defaults lie in their ranges")
    }
}

/// What a loss sees: the same positions in all, flattened or not. `student` and `teacher` are
/// logits `[..., V]` over the shared vocabulary; `labels` `[...]` (the ignore index where nothing is
/// predicted); `weights` `[...]` f32 ≥ 0. From a teacher store, `teacher` is None and `reduced` holds
/// the reduced pair at the store's temperature (`student` stays the student's logits, for the parts
/// that need no teacher: a cross-entropy, the student's entropy).
pub struct LossInput<'a> {
    pub student: &'a Tensor,
    pub teacher: Option<&'a Tensor>,
    pub reduced: Option<&'a Reduced>,
    pub labels: &'a Tensor,
    pub weights: &'a Tensor,
}

impl LossInput<'_> {
    /// The teacher's logits, for losses that need them.
    pub fn teacher(&self, name: &str) -> Result<&Tensor> {
        self.teacher.ok_or_else(|| {
            Error::Invalid(if self.reduced.is_some() {
                format!("{name}: needs the teacher's full logits; the teacher signal is a store's")
            } else {
                format!("{name}: needs the teacher's logits")
            })
        })
    }

    /// The store's reduced pair, for a loss that reads the teacher at `temperature` (None for a
    /// dense teacher). A pair reduced at another temperature is refused: the loss's division by its
    /// own T would turn T·log p̃ into a sharpened p̃, not the distribution at that temperature.
    pub fn reduced_at(&self, name: &str, temperature: f64) -> Result<Option<&Reduced>> {
        match self.reduced {
            Some(r) if !super::reduced::same_temperature(r.temperature, temperature) => {
                Err(Error::Invalid(format!(
                    "{name}: reads the teacher at temperature {temperature}, the store's signal is \
                     at {}",
                    r.temperature
                )))
            }
            r => Ok(r),
        }
    }

    /// The (student, teacher) logits a divergence at `temperature` compares: the reduced pair
    /// T·log q̃, T·log p̃ `[..., K+1]` on a store, else the student's and the teacher's logits.
    pub fn pair(&self, name: &str, temperature: f64) -> Result<(&Tensor, &Tensor)> {
        match self.reduced_at(name, temperature)? {
            Some(r) => Ok((&r.student, &r.teacher)),
            None => Ok((self.student, self.teacher(name)?)),
        }
    }
}

/// A built loss term.
pub trait Loss: Send + std::fmt::Debug {
    fn spec(&self) -> &'static LossSpec;
    /// The weighted mean of the loss over the input's positions.
    fn compute(&self, x: &LossInput) -> Result<Tensor>;
    /// Whether the teacher's distribution is needed at all.
    fn needs_teacher(&self) -> bool {
        true
    }
    /// Whether the loss is defined on a store's reduced distributions (the stored tokens and one
    /// tail bucket, `reduced.rs`); Err(why) when it is not.
    fn on_reduced(&self) -> std::result::Result<(), &'static str> {
        Ok(())
    }
    /// Whether, on a store, the loss reads the student only through the reduced pair (never the
    /// student's logits themselves), so that the pair's student side may be computed by hand
    /// (`reduced::ByHand`).
    fn reads_only_reduced(&self) -> bool {
        false
    }
    /// The parameter (name, value) that sets the temperature at which the loss reads the teacher's
    /// distribution; None for a loss that reads it at T = 1 and has no such parameter.
    fn teacher_temperature(&self) -> Option<(&'static str, f64)> {
        None
    }
    /// Whether the value is a weighted mean of independent per-position values, so that the
    /// objective may be computed over chunks of positions.
    fn per_position(&self) -> bool {
        true
    }
    /// State to carry across steps and checkpoints (TAID's λ), as JSON.
    fn state(&self) -> Option<serde_json::Value> {
        None
    }
    fn restore(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// After optimizer step `step` whose value of this term was `value`.
    fn after_step(&mut self, _value: f64, _step: usize) {}
    /// A value worth logging each step (name, value), e.g. TAID's λ.
    fn log_value(&self) -> Option<(&'static str, f64)> {
        None
    }
    /// For a kind that reads hidden states (`Reads::Hidden`): its value over mapped layer pairs.
    fn compute_hidden(&self, _x: &super::hidden::HiddenInput) -> Result<Tensor> {
        Err(Error::Invalid(format!(
            "{}: compares output distributions, not hidden states",
            self.spec().name
        )))
    }
}

/// Every loss kind the run file accepts, in the order the README lists them.
pub const REGISTRY: &[&LossSpec] = &[
    &super::hinton::CROSS_ENTROPY,
    &super::kl::FORWARD_KL,
    &super::kl::REVERSE_KL,
    &super::jsd::JSD,
    &super::skew::SKEW_KL,
    &super::skew::SKEW_REVERSE_KL,
    &super::tvd::TVD,
    &super::akl::ADAPTIVE_KL,
    &super::hinton::HINTON,
    &super::pld::PLD,
    &super::taid::TAID,
    &super::token_selective::TOKEN_SELECTIVE,
    &super::sinkhorn::SINKHORN,
    &super::hidden::HIDDEN,
];

/// The spec of a loss kind by its run-file name.
pub fn spec(name: &str) -> Option<&'static LossSpec> {
    REGISTRY.iter().copied().find(|s| s.name == name)
}

/// Every kind's name, comma-separated (for error messages).
pub fn names() -> String {
    REGISTRY
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Build a loss by name with (name, value) parameters.
pub fn build(name: &str, given: &[(&str, f64)], ctx: &BuildContext) -> Result<Box<dyn Loss>> {
    let spec = spec(name).ok_or_else(|| {
        Error::Invalid(format!(
            "unknown loss kind '{name}', expected one of {}",
            names()
        ))
    })?;
    let params = spec
        .params(given)
        .map_err(|m| Error::Invalid(format!("{name}: {m}")))?;
    (spec.build)(&params, ctx)
}
