//! Runs the cases one after the other: decides which apply, enforces the time limits, closes
//! what each case opened and turns the result into a [`CaseReport`].

use super::{
    cases::{Case, CASES, CREATE_TRANSPORT, NO_BLOCKING_POLLS},
    harness::{describe_blocking, CaseError, Harness},
    CaseOutcome, CaseReport, SuiteConfig, SuiteReport,
};
use comms_plugin_api::{
    host_side::{BlockingPoll, PluginLibrary},
    Capabilities, TransportInfo,
};
use futures::FutureExt;
use std::{
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

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

/// Every case as a Markdown table, in running order: its name, what it checks, and the
/// capabilities a transport must declare for it to run (`comms check --list` prints it, and
/// docs/writing-a-plugin.md carries a copy).
pub fn case_table() -> String {
    let mut table =
        String::from("| case | what it checks | runs when the transport declares |\n|---|---|---|\n");
    for case in cases() {
        let needs = match case.needs.names().as_slice() {
            [] => "always".to_string(),
            names => names.iter().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(" and "),
        };
        let summary = case.summary.replace('|', "\\|");
        table.push_str(&format!("| `{}` | {summary} | {needs} |\n", case.name));
    }
    table
}

/// Runs the suite against `library`; see the [module docs](super).
///
/// Must be awaited inside a tokio runtime, current-thread or multi-thread (it spawns one task
/// per receiving instance and uses tokio timers). Never panics because of the plugin: whatever
/// the plugin does shows up as a failed case. Takes a few seconds against the TCP plugin on a
/// laptop; at worst, `case_timeout` twice (case, then cleanup) per case. A plugin that holds the
/// host's thread for [`SuiteConfig::blocking_poll_limit`] in one poll stops the suite early:
/// the case fails at once, the later ones are not run, and `no_blocking_polls` fails.
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
    let plugin = library.description().name.clone();
    let mut report = SuiteReport { plugin: plugin.clone(), info: None, cases: Vec::new() };
    let mut blocking = BlockingRecord::default();

    let (create, info) = run_case(library, config, &CREATE_TRANSPORT, None, &mut blocking).await;
    progress(&create);
    let created = create.passed();
    report.info = info.clone();
    report.cases.push(create);

    for case in CASES.iter().filter(|case| case.name != CREATE_TRANSPORT.name && config.selects(case.name)) {
        let case_report = match (&blocking.stopped_by, &info, created) {
            (Some((blocked, during)), _, _) if case.name == NO_BLOCKING_POLLS.name => CaseReport {
                name: case.name,
                outcome: CaseOutcome::Failed(format!(
                    "{} (in {during}; the cases after it were not run)",
                    describe_blocking(&plugin, blocked)
                )),
                notes: Vec::new(),
                duration: Default::default(),
            },
            (Some(_), _, _) => skipped(
                case,
                format!(
                    "not run: plugin {plugin} blocks the host's threads (see {})",
                    NO_BLOCKING_POLLS.name
                ),
            ),
            (None, Some(info), true) => {
                match missing_capabilities(case.needs, info.capabilities | config.assume) {
                    Some(reason) => skipped(case, reason),
                    None => run_case(library, config, case, Some(info.clone()), &mut blocking).await.0,
                }
            }
            (None, _, _) => {
                skipped(case, format!("no working transport instance (see {})", CREATE_TRANSPORT.name))
            }
        };
        progress(&case_report);
        report.cases.push(case_report);
    }
    report
}

/// What the suite saw of polls that held the host's thread.
#[derive(Debug, Default)]
struct BlockingRecord {
    /// The longest so far, and the case it happened in.
    longest: Option<(BlockingPoll, &'static str)>,
    /// The first at or over the limit, which stopped the suite.
    stopped_by: Option<(BlockingPoll, &'static str)>,
}

impl BlockingRecord {
    fn record(&mut self, blocked: BlockingPoll, case: &'static str, limit: Duration) {
        if self.longest.is_none_or(|(longest, _)| longest.duration < blocked.duration) {
            self.longest = Some((blocked, case));
        }
        if blocked.duration >= limit && self.stopped_by.is_none() {
            self.stopped_by = Some((blocked, case));
        }
    }
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

/// Resolves with the first poll of the case's instances that held a thread for the limit.
async fn first_blocking_poll(harness: &Harness) -> BlockingPoll {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        if let Some(blocked) = harness.longest_blocking_poll() {
            if blocked.duration >= harness.blocking_poll_limit() {
                return blocked;
            }
        }
    }
}

/// How a case stopped for a blocking poll ends its reason.
const STOPPED: &str = " (the case was stopped there)";

/// How often the runner looks at the poll watches of a running case.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// Runs one case and its cleanup; also returns what `create_transport` found out.
async fn run_case(
    library: &PluginLibrary,
    config: &SuiteConfig,
    case: &Case,
    info: Option<TransportInfo>,
    blocking: &mut BlockingRecord,
) -> (CaseReport, Option<TransportInfo>) {
    let started = Instant::now();
    let plugin = library.description().name.clone();
    let harness = Harness::new(library, config, info).with_earlier_blocking(blocking.longest);
    let run = AssertUnwindSafe((case.run)(&harness)).catch_unwind();
    let mut outcome = tokio::select! {
        biased;
        result = tokio::time::timeout(config.case_timeout, run) => match result {
            Ok(Ok(Ok(()))) => CaseOutcome::Passed,
            Ok(Ok(Err(CaseError::Failed(reason)))) => CaseOutcome::Failed(reason),
            Ok(Ok(Err(CaseError::Skipped(reason)))) => CaseOutcome::Skipped(reason),
            Ok(Err(panic)) => {
                CaseOutcome::Failed(format!("the case itself panicked: {}", panic_text(&*panic)))
            }
            Err(_) => CaseOutcome::Failed(format!(
                "did not finish within the case time limit of {}",
                super::harness::seconds(config.case_timeout)
            )),
        },
        blocked = first_blocking_poll(&harness) => {
            CaseOutcome::Failed(format!("{}{STOPPED}", describe_blocking(&plugin, &blocked)))
        }
    };
    let over_limit =
        |h: &Harness| h.longest_blocking_poll().filter(|b| b.duration >= config.blocking_poll_limit);
    if over_limit(&harness).is_some() {
        // Each further receive would hold the thread again until the cleanup closes it.
        harness.stop_receiving();
    }
    let problems = harness.close_all(config.case_timeout).await;
    if !problems.is_empty() {
        let cleanup = format!("cleanup: {}", problems.join("; "));
        outcome = match outcome {
            CaseOutcome::Failed(reason) => CaseOutcome::Failed(format!("{reason}; {cleanup}")),
            _ => CaseOutcome::Failed(cleanup),
        };
    }
    let notes = harness.take_notes();
    if let Some(blocked) = harness.longest_blocking_poll() {
        blocking.record(blocked, case.name, config.blocking_poll_limit);
        let described = describe_blocking(&plugin, &blocked);
        if blocked.duration >= config.blocking_poll_limit {
            outcome = match outcome {
                CaseOutcome::Failed(reason) if reason.ends_with(STOPPED) => CaseOutcome::Failed(reason),
                // What else went wrong is likely a consequence.
                CaseOutcome::Failed(reason) => CaseOutcome::Failed(format!("{described}; {reason}")),
                _ => CaseOutcome::Failed(described),
            };
        }
    }
    let found = harness.found_info();
    let report = CaseReport { name: case.name, outcome, notes, duration: started.elapsed() };
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
        assert_eq!(list.last().map(|case| case.name), Some(NO_BLOCKING_POLLS.name), "it sums up the run");
    }

    /// Every flag a plugin can declare turns on at least one case of its own: a flag added to
    /// `Capabilities` (and named in `Capabilities::names`) without a case fails here.
    #[test]
    fn every_capability_has_a_case() {
        let list = cases();
        let flags = (0..64).map(|bit| Capabilities(1 << bit)).filter(|flag| !flag.names().is_empty());
        let mut seen = 0;
        for flag in flags {
            seen += 1;
            let turned_on: Vec<_> =
                list.iter().filter(|case| case.needs.contains(flag)).map(|case| case.name).collect();
            assert!(!turned_on.is_empty(), "no conformance case checks the capability {:?}", flag.names());
        }
        assert_eq!(
            seen, 7,
            "ordered, acknowledgements, durable, native-topics, reliable, encrypted, batched-send"
        );
        let table = case_table();
        for case in &list {
            assert!(table.contains(&format!("| `{}` |", case.name)), "{table}");
        }
        assert!(table.contains("| `reliable_delivery` | "), "{table}");
        assert!(table.lines().all(|line| line.starts_with('|')), "{table}");
    }
}
