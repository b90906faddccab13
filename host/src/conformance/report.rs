//! What the suite found: one [`CaseReport`] per case, gathered in a [`SuiteReport`].

use comms_plugin_api::TransportInfo;
use std::{fmt, time::Duration};

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOutcome {
    /// Every check of the case held.
    Passed,
    /// A check failed; the text says which and what was seen (one line).
    Failed(String),
    /// The case does not apply to this transport; the text says why (one line), e.g.
    /// `needs capability acknowledgements`.
    Skipped(String),
}

/// One case: its name, outcome, remarks and how long it took (cleanup included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseReport {
    /// The case's name (snake case, stable: tests and scripts may refer to it).
    pub name: &'static str,
    /// Passed, failed or skipped.
    pub outcome: CaseOutcome,
    /// Observations that do not fail the case but a plugin author should know about (for
    /// example a declared limit that is not quite what the transport accepts).
    pub notes: Vec<String>,
    /// Wall-clock time of the case and its cleanup.
    pub duration: Duration,
}

impl CaseReport {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.outcome == CaseOutcome::Passed
    }

    /// Whether the case failed.
    pub fn failed(&self) -> bool {
        matches!(self.outcome, CaseOutcome::Failed(_))
    }

    /// Whether the case was skipped.
    pub fn skipped(&self) -> bool {
        matches!(self.outcome, CaseOutcome::Skipped(_))
    }
}

impl fmt::Display for CaseReport {
    /// One line: `PASS name`, `FAIL name: reason` or `SKIP name: reason`, notes in parentheses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            CaseOutcome::Passed => write!(f, "PASS {}", self.name)?,
            CaseOutcome::Failed(reason) => write!(f, "FAIL {}: {}", self.name, one_line(reason))?,
            CaseOutcome::Skipped(reason) => write!(f, "SKIP {}: {}", self.name, one_line(reason))?,
        }
        for note in &self.notes {
            write!(f, " (note: {})", one_line(note))?;
        }
        Ok(())
    }
}

/// The whole run against one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteReport {
    /// The plugin's name.
    pub plugin: String,
    /// What the first transport instance declared; `None` if none could be created.
    pub info: Option<TransportInfo>,
    /// The cases that ran or were skipped, in order. Cases excluded by the filter are absent.
    pub cases: Vec<CaseReport>,
}

impl SuiteReport {
    /// Whether nothing failed (skipped cases do not count against the plugin).
    pub fn passed(&self) -> bool {
        !self.cases.iter().any(CaseReport::failed)
    }

    /// The report of the case called `name`.
    pub fn case(&self, name: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|case| case.name == name)
    }

    /// Names of the cases that failed.
    pub fn failed_names(&self) -> Vec<&'static str> {
        self.cases.iter().filter(|case| case.failed()).map(|case| case.name).collect()
    }

    /// Names of the cases that were skipped.
    pub fn skipped_names(&self) -> Vec<&'static str> {
        self.cases.iter().filter(|case| case.skipped()).map(|case| case.name).collect()
    }

    /// `N passed, M failed, K skipped`.
    pub fn summary(&self) -> String {
        let count = |f: fn(&CaseReport) -> bool| self.cases.iter().filter(|case| f(case)).count();
        format!(
            "{} passed, {} failed, {} skipped",
            count(CaseReport::passed),
            count(CaseReport::failed),
            count(CaseReport::skipped)
        )
    }
}

impl fmt::Display for SuiteReport {
    /// One line per case, then the summary line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for case in &self.cases {
            writeln!(f, "{case}")?;
        }
        writeln!(f, "{}", self.summary())
    }
}

/// Reasons come from plugins too; a report line must stay one line.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r']).map(str::trim).filter(|part| !part.is_empty()).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &'static str, outcome: CaseOutcome) -> CaseReport {
        CaseReport { name, outcome, notes: Vec::new(), duration: Duration::ZERO }
    }

    #[test]
    fn lines_and_summary() {
        let mut report = SuiteReport {
            plugin: "x".into(),
            info: None,
            cases: vec![
                case("a", CaseOutcome::Passed),
                case("b", CaseOutcome::Failed("lost 3\nof 10".into())),
                case("c", CaseOutcome::Skipped("needs capability durable".into())),
            ],
        };
        report.cases[0].notes.push("a remark".into());
        assert_eq!(
            report.to_string(),
            "PASS a (note: a remark)\nFAIL b: lost 3; of 10\nSKIP c: needs capability durable\n\
             1 passed, 1 failed, 1 skipped\n"
        );
        assert!(!report.passed());
        assert_eq!(report.failed_names(), ["b"]);
        assert_eq!(report.skipped_names(), ["c"]);
        report.cases.remove(1);
        assert!(report.passed());
    }
}
