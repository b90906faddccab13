//! The threads of this process, by name (Linux: `/proc/self/task`): what the thread budget
//! tests assert and the benchmarks print.

use std::collections::BTreeMap;

/// How many threads of this process have each name, in name order. Names are what the kernel
/// keeps (`comm`, at most 15 bytes): `comms-<plugin>` for a plugin runtime's workers,
/// `tokio-rt-worker` for the application's, the test's own name for the main thread.
pub fn by_name() -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            // A thread that ended since the listing has no `comm` any more: not counted.
            if let Ok(name) = std::fs::read_to_string(task.path().join("comm")) {
                *counts.entry(name.trim().to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// `after` less `before`, name by name (names with no more threads than before left out).
pub fn started_between(
    before: &BTreeMap<String, usize>,
    after: &BTreeMap<String, usize>,
) -> BTreeMap<String, usize> {
    after
        .iter()
        .filter_map(|(name, &count)| {
            let new = count.saturating_sub(before.get(name).copied().unwrap_or(0));
            (new > 0).then(|| (name.clone(), new))
        })
        .collect()
}

/// One line: `total (name xN, ...)`.
pub fn describe(threads: &BTreeMap<String, usize>) -> String {
    let total: usize = threads.values().sum();
    let names: Vec<String> = threads.iter().map(|(name, count)| format!("{name} x{count}")).collect();
    format!("{total} ({})", names.join(", "))
}

/// The threads started since `before` (a [`by_name`]), by name, without the
/// application's runtime's (`tokio-rt-worker`: the host runs on the application's runtime and
/// uses its blocking threads, which are the application's to size).
pub fn plugin_threads_started(before: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    let mut started = started_between(before, &by_name());
    started.remove("tokio-rt-worker");
    started
}
