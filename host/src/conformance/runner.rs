//! Runs the cases one after the other: decides which apply, enforces the time limits, closes
//! what each case opened and turns the result into a [`CaseReport`].

use super::{
    cases::{Case, CASES, CREATE_TRANSPORT},
    harness::{CaseError, Harness},
    CaseOutcome, CaseReport, SuiteConfig, SuiteReport,
};
use comms_plugin_api::{host_side::PluginLibrary, Capabilities, TransportInfo};
use futures::FutureExt;
use std::{panic::AssertUnwindSafe, time::Instant};

/// A case as listed by [`cases`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaseDescription {
    /// The name reports use.
    pub name: &'static str,
    /// What it checks, in one sentence.
    pub summary: &'static str,
    /// The capabilities a transport must declare for the case to run.
    pub needs: Capabilities,
}

/// Every case, in the order the suite runs them.
pub fn cases() -> Vec<CaseDescription> {
    CASES
        .iter()
        .map(|case| CaseDescription { name: case.name, summary: case.summary, needs: case.needs })
        .collect()
}

/// Runs the suite against `library`; see the [module docs](super).
///
/// Must be awaited inside a tokio runtime, current-thread or multi-thread (it spawns one task
/// per receiving instance and uses tokio timers). Never panics because of the plugin: whatever
/// the plugin does shows up as a failed case. Takes about a second against the TCP plugin on a
/// laptop; at worst, `case_timeout` twice (case, then cleanup) per case.
pub async fn run_suite(library: &PluginLibrary, config: &SuiteConfig) -> SuiteReport {
    run_suite_with_progress(library, config, |_| {}).await
}

/// Like [`run_suite`], calling `progress` with each case's report as soon as it is known (for
/// printing while the suite runs).
pub async fn run_suite_with_progress(
    library: &PluginLibrary,
    config: &SuiteConfig,
    mut progress: impl FnMut(&CaseReport),
) -> SuiteReport {
    let mut report =
        SuiteReport { plugin: library.description().name.clone(), info: None, cases: Vec::new() };

    let (create, info) = run_case(library, config, &CREATE_TRANSPORT, None).await;
    progress(&create);
    let created = create.passed();
    report.info = info.clone();
    report.cases.push(create);

    for case in CASES.iter().filter(|case| case.name != CREATE_TRANSPORT.name && config.selects(case.name)) {
        let case_report = match (&info, created) {
            (Some(info), true) => match missing_capabilities(case.needs, info.capabilities) {
                Some(reason) => skipped(case, reason),
                None => run_case(library, config, case, Some(info.clone())).await.0,
            },
            _ => skipped(case, format!("no working transport instance (see {})", CREATE_TRANSPORT.name)),
        };
        progress(&case_report);
        report.cases.push(case_report);
    }
    report
}

/// Why a case does not apply to a transport with `declared` capabilities, if it does not:
/// `needs capability acknowledgements` (flags joined with "and").
pub(crate) fn missing_capabilities(needs: Capabilities, declared: Capabilities) -> Option<String> {
    let missing = Capabilities(needs.0 & !declared.0);
    match missing.names().as_slice() {
        [] => None,
        [one] => Some(format!("needs capability {one}")),
        several => Some(format!("needs capabilities {}", several.join(" and "))),
    }
}

fn skipped(case: &Case, reason: String) -> CaseReport {
    CaseReport {
        name: case.name,
        outcome: CaseOutcome::Skipped(reason),
        notes: Vec::new(),
        duration: Default::default(),
    }
}

/// Runs one case and its cleanup; also returns what `create_transport` found out.
async fn run_case(
    library: &PluginLibrary,
    config: &SuiteConfig,
    case: &Case,
    info: Option<TransportInfo>,
) -> (CaseReport, Option<TransportInfo>) {
    let started = Instant::now();
    let harness = Harness::new(library, config, info);
    let run = AssertUnwindSafe((case.run)(&harness)).catch_unwind();
    let mut outcome = match tokio::time::timeout(config.case_timeout, run).await {
        Ok(Ok(Ok(()))) => CaseOutcome::Passed,
        Ok(Ok(Err(CaseError::Failed(reason)))) => CaseOutcome::Failed(reason),
        Ok(Ok(Err(CaseError::Skipped(reason)))) => CaseOutcome::Skipped(reason),
        Ok(Err(panic)) => CaseOutcome::Failed(format!("the case itself panicked: {}", panic_text(&*panic))),
        Err(_) => CaseOutcome::Failed(format!(
            "did not finish within the case time limit of {}",
            super::harness::seconds(config.case_timeout)
        )),
    };
    let problems = harness.close_all(config.case_timeout).await;
    if !problems.is_empty() {
        let cleanup = format!("cleanup: {}", problems.join("; "));
        outcome = match outcome {
            CaseOutcome::Failed(reason) => CaseOutcome::Failed(format!("{reason}; {cleanup}")),
            _ => CaseOutcome::Failed(cleanup),
        };
    }
    let found = harness.found_info();
    let report =
        CaseReport { name: case.name, outcome, notes: harness.take_notes(), duration: started.elapsed() };
    (report, found)
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_runs_only_when_every_capability_it_needs_is_declared() {
        let acks = Capabilities::ACKNOWLEDGEMENTS;
        assert_eq!(missing_capabilities(Capabilities::NONE, Capabilities::NONE), None);
        assert_eq!(missing_capabilities(acks, acks | Capabilities::ORDERED), None);
        assert_eq!(
            missing_capabilities(acks, Capabilities::ORDERED).as_deref(),
            Some("needs capability acknowledgements")
        );
        assert_eq!(
            missing_capabilities(Capabilities::DURABLE | Capabilities::NATIVE_TOPICS, Capabilities::DURABLE)
                .as_deref(),
            Some("needs capability native-topics")
        );
        assert_eq!(
            missing_capabilities(acks | Capabilities::DURABLE, Capabilities::NONE).as_deref(),
            Some("needs capabilities acknowledgements and durable")
        );
    }

    #[test]
    fn the_case_list_starts_with_create_transport_and_names_are_unique() {
        let list = cases();
        assert_eq!(list[0].name, CREATE_TRANSPORT.name);
        let mut names: Vec<_> = list.iter().map(|case| case.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), list.len());
        let needing = |flag| list.iter().filter(|case| case.needs.contains(flag)).count();
        assert_eq!(needing(Capabilities::ACKNOWLEDGEMENTS), 1);
        assert_eq!(needing(Capabilities::DURABLE), 1);
        assert_eq!(needing(Capabilities::NATIVE_TOPICS), 2);
        assert_eq!(needing(Capabilities::ORDERED), 1);
    }
}
