//! `unipeer bench ...`: benchmarks that print a table, with ratios against a baseline run in
//! the same invocation. Every row with a target carries a verdict computed from what was
//! measured; a series with no samples is never shown as a number, and its verdict fails.

pub mod apps;
pub mod auth;
pub mod boot;
pub mod cluster;
pub mod directory;
pub mod jobs;
pub mod linux_baseline;
pub mod overlay;
pub mod plot;
pub mod redis_benchmark;

use std::fmt;

/// The verdict of a target row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    Missed,
    /// Nothing was measured (an empty series, a figure the run could not take): a failure.
    NoSamples,
}

impl Verdict {
    /// `Met` when `value` was measured and satisfies `target`.
    pub fn of(value: Option<f64>, target: impl Fn(f64) -> bool) -> Verdict {
        match value {
            None => Verdict::NoSamples,
            Some(v) if v.is_finite() && target(v) => Verdict::Met,
            Some(_) => Verdict::Missed,
        }
    }

    pub fn met(self) -> bool {
        self == Verdict::Met
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NoSamples => "no samples: MISSED",
        })
    }
}

/// A measured value for a table cell, or "no samples".
pub fn cell(value: Option<f64>, fmt: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "no samples".to_string(), fmt)
}

/// The rows of a run whose series were empty: the run fails once its table is printed.
#[derive(Debug, Default)]
pub struct Unmeasured(pub Vec<String>);

impl Unmeasured {
    pub fn note(&mut self, row: &str, v: Verdict) {
        if v == Verdict::NoSamples {
            self.0.push(row.to_string());
        }
    }

    /// An error naming every row that measured nothing, if any.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("no samples for: {}", self.0.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_series_fails_and_a_nan_is_no_pass() {
        assert_eq!(Verdict::of(None, |_| true), Verdict::NoSamples);
        assert_eq!(Verdict::of(Some(f64::NAN), |_| true), Verdict::Missed);
        assert_eq!(Verdict::of(Some(1.2), |v| v <= 1.5), Verdict::Met);
        assert_eq!(Verdict::of(Some(1.6), |v| v <= 1.5), Verdict::Missed);
        assert_eq!(cell(None, |v| format!("{v:.1}")), "no samples");
        let mut u = Unmeasured::default();
        u.note("a", Verdict::Met);
        assert!(u.check().is_ok());
        u.note("re-dispatch", Verdict::NoSamples);
        assert!(u.check().unwrap_err().to_string().contains("re-dispatch"));
    }
}
