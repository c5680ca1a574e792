//! Distilling step-by-step (Hsieh et al. 2023, "Distilling Step-by-Step! Outperforming Larger
//! Language Models with Less Training Data and Smaller Model Sizes"): the teacher writes a
//! rationale for each labelled example, given its label (the paper's rationale prompts hold the
//! label; here a template `rationale_template` with `{input}` and `{label}`), and the student learns
//! two tasks told apart by a prefix:
//!   {"prompt": "[label] " + input,     "response": label}
//!   {"prompt": "[rationale] " + input, "response": rationale, "weight": λ}
//!   L = L_label + λ · L_rationale                                              (paper, eq. 3)
//! Difference: the objective is a weighted mean over the tokens of a batch (Σ w·ℓ / Σ w), so λ
//! weighs each rationale token against each label token within a batch; the paper averages each
//! task over its own examples and adds the two means. With equal token counts the two agree up to
//! the factor 1 / (1 + λ).
use serde_json::{json, Value};

pub const LABEL_PREFIX: &str = "[label] ";
pub const RATIONALE_PREFIX: &str = "[rationale] ";

/// The template's places, each of which it must hold once or more.
pub const PLACES: [&str; 2] = ["{input}", "{label}"];

/// The teacher's prompt for one example: the template with `{input}` and `{label}` filled in
/// (one pass, so text inside the input is never read as a place).
pub fn fill(template: &str, input: &str, label: &str) -> String {
    let mut out = String::with_capacity(template.len() + input.len() + label.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix(PLACES[0]) {
            out.push_str(input);
            rest = t;
        } else if let Some(t) = tail.strip_prefix(PLACES[1]) {
            out.push_str(label);
            rest = t;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The label task's record of an example.
pub fn label_record(input: &str, label: &str) -> Value {
    json!({
        "prompt": format!("{LABEL_PREFIX}{input}"),
        "response": label,
        "task": "label",
    })
}

/// The rationale task's record of an example, weighted λ.
pub fn rationale_record(input: &str, rationale: &str, weight: f64) -> Value {
    json!({
        "prompt": format!("{RATIONALE_PREFIX}{input}"),
        "response": rationale,
        "weight": weight,
        "task": "rationale",
    })
}
