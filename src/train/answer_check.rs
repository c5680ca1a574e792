//! Whether a sampled answer is right: the check of a task with a checkable final answer (PACED's
//! pass rates). `sample` is the student's text after the prompt, already ended at a stop id.
//!   exact           the sample's first line, trimmed, equals the answer, trimmed
//!   numeric         the last number in the sample equals the answer's number within 1e-6
//!                   relative: |x − a| ≤ 1e-6 · max(|x|, |a|) (so 0 only equals 0)
//!   regex:PATTERN   the first match of PATTERN in the sample: its first capture group (the whole
//!                   match when the pattern has no group), trimmed, equals the answer, trimmed
//! A number is an optional sign, digits with an optional fraction, and an optional exponent;
//! thousands separators are not read ("1,000" is the numbers 1 and 000).
use regex::Regex;

#[derive(Debug, Clone)]
pub enum AnswerCheck {
    Exact,
    Numeric,
    Regex(Regex),
}

impl PartialEq for AnswerCheck {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// Relative tolerance of `numeric`.
pub const NUMERIC_TOLERANCE: f64 = 1e-6;

fn number_pattern() -> Regex {
    Regex::new(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?").expect("a valid pattern")
}

/// The last number written in `text`, if any.
pub fn last_number(text: &str) -> Option<f64> {
    number_pattern()
        .find_iter(text)
        .filter_map(|m| m.as_str().parse::<f64>().ok())
        .last()
}

impl AnswerCheck {
    /// "exact", "numeric" or "regex:PATTERN"; Err says what is wrong (an invalid pattern by the
    /// regex crate's message).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(AnswerCheck::Exact),
            "numeric" => Ok(AnswerCheck::Numeric),
            _ => match s.strip_prefix("regex:") {
                Some("") => Err("'regex:' needs a pattern after the colon".into()),
                Some(p) => Regex::new(p).map(AnswerCheck::Regex).map_err(|e| {
                    // the regex crate's message spans lines: one line for the error
                    let msg: Vec<String> =
                        e.to_string().split_whitespace().map(String::from).collect();
                    format!("invalid regular expression {p:?}: {}", msg.join(" "))
                }),
                None => Err(format!("'{s}' is not one of exact, numeric, regex:PATTERN")),
            },
        }
    }

    /// The check as the run file writes it.
    pub fn name(&self) -> String {
        match self {
            AnswerCheck::Exact => "exact".into(),
            AnswerCheck::Numeric => "numeric".into(),
            AnswerCheck::Regex(r) => format!("regex:{}", r.as_str()),
        }
    }

    /// Whether `sample` gives `answer`.
    pub fn passes(&self, sample: &str, answer: &str) -> bool {
        match self {
            AnswerCheck::Exact => sample.lines().next().unwrap_or("").trim() == answer.trim(),
            AnswerCheck::Numeric => {
                let want = answer
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .or_else(|| last_number(answer));
                match (last_number(sample), want) {
                    (Some(x), Some(a)) => {
                        x == a || (x - a).abs() <= NUMERIC_TOLERANCE * x.abs().max(a.abs())
                    }
                    _ => false,
                }
            }
            AnswerCheck::Regex(r) => r.captures(sample).is_some_and(|c| {
                let m = c.get(1).or_else(|| c.get(0)).map_or("", |m| m.as_str());
                m.trim() == answer.trim()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_compares_the_trimmed_first_line() {
        let c = AnswerCheck::parse("exact").unwrap();
        assert!(c.passes(" 68\nQ: 1 + 1 = ?", "68"));
        assert!(c.passes("68", " 68 "));
        assert!(!c.passes(" 680", "68"));
        assert!(!c.passes("\n68", "68")); // the first line is empty
        assert!(!c.passes("", "68"));
    }

    #[test]
    fn numeric_reads_the_last_number_within_a_relative_tolerance() {
        let c = AnswerCheck::parse("numeric").unwrap();
        assert!(c.passes("so 2 + 3 = 5", "5"));
        assert!(c.passes("the answer is 5.0000001", "5"));
        assert!(!c.passes("the answer is 5.0001", "5"));
        assert!(c.passes("x = -12", "-12"));
        assert!(!c.passes("x = 12", "-12"));
        assert!(c.passes("1e3", "1000"));
        assert!(c.passes("0", "0"));
        assert!(!c.passes("1e-9", "0")); // relative to max(|x|, |a|): 0 only equals 0
        assert!(!c.passes("5 then 6", "5")); // the last number counts
        assert!(!c.passes("no number", "5"));
        assert!(!c.passes("5", "five"));
        assert_eq!(last_number("a 3.5 b .25 c"), Some(0.25));
    }

    #[test]
    fn regex_compares_the_first_group_or_the_whole_match() {
        let c = AnswerCheck::parse(r"regex:answer is (\w+)").unwrap();
        assert!(c.passes("the answer is 42.", "42"));
        assert!(!c.passes("the answer is 43, not 42", "42")); // the first match
        assert!(!c.passes("no match", "42"));
        let whole = AnswerCheck::parse(r"regex:\d+").unwrap();
        assert!(whole.passes("x 17 y 18", "17"));
        assert!(AnswerCheck::parse("regex:(")
            .unwrap_err()
            .contains("invalid regular"));
        assert!(AnswerCheck::parse("regex:").is_err());
        assert!(AnswerCheck::parse("fuzzy")
            .unwrap_err()
            .contains("not one of"));
        assert_eq!(whole.name(), r"regex:\d+");
    }
}
