//! The host's structure as its docs describe it: the modules of the library depend on each other
//! without cycles (the facade on the driver, the driver on the engine, never back), and the
//! engine does no I/O: no tokio, no plugins, no clock.
//!
//! Read from the sources, so that a `use` that closes a circle fails here, with the circle named.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The library's top-level modules and, for each, the Rust files that make it up.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(source_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        // `main` and `cli` are the `comms` binary, a crate of its own.
        if ["lib", "main", "cli"].contains(&name.as_str()) {
            continue;
        }
        if path.is_dir() {
            let mut files = Vec::new();
            collect_rust_files(&path, &mut files);
            modules.entry(name).or_default().extend(files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            modules.entry(name).or_default().push(path);
        }
    }
    modules
}

fn collect_rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The source without comments (doc links name modules without depending on them) and without
/// `#[cfg(test)]` test modules in files named `tests.rs`.
fn code_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names `lib.rs` re-exports at the crate root, and the module each comes from.
fn root_reexports() -> BTreeMap<String, String> {
    let lib = code_of(&source_dir().join("lib.rs"));
    let mut names = BTreeMap::new();
    for statement in lib.split(';') {
        let statement = statement.trim();
        let Some(path) = statement.strip_prefix("pub use ") else { continue };
        let Some((module, items)) = path.split_once("::") else { continue };
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.rsplit("::").next().unwrap_or("").trim();
            if !name.is_empty() {
                names.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    names
}

/// The first identifier of `text`.
fn identifier(text: &str) -> &str {
    let end = text.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(text.len());
    &text[..end]
}

/// Every `crate::…` path's first segment, including each item of `crate::{a::…, b, …}`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (index, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        found.push(identifier(&group[index..]).to_string());
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.push(identifier(after).to_string());
        }
        rest = after;
    }
    found
}

fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let reexports = root_reexports();
    let mut graph = BTreeMap::new();
    for (module, files) in &modules {
        let mut uses = BTreeSet::new();
        for file in files {
            for name in crate_paths(&code_of(file)) {
                let target =
                    if modules.contains_key(&name) { Some(name) } else { reexports.get(&name).cloned() };
                if let Some(target) = target.filter(|target| target != module && modules.contains_key(target))
                {
                    uses.insert(target);
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A cycle through `graph`, if there is one, as the list of modules around it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    // The check below would pass vacuously if this could not fail.
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("node".to_string(), ["driver".to_string()].into()),
        ("driver".to_string(), ["engine".to_string()].into()),
        ("engine".to_string(), ["node".to_string()].into()),
    ]
    .into();
    assert_eq!(find_cycle(&graph).unwrap(), vec!["driver", "engine", "node", "driver"]);
    assert_eq!(
        crate_paths("use crate::{a::b, c, d::{e, f}};\nlet x = crate::g::h();"),
        vec!["a", "c", "d", "g"]
    );
}

#[test]
fn the_host_modules_depend_on_each_other_without_cycles() {
    let graph = dependency_graph();
    // The layers the crate docs describe.
    assert!(graph["node"].contains("driver"), "the facade drives the node through the driver: {graph:?}");
    assert!(graph["driver"].contains("engine"), "the driver runs the engine: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("host modules depend on each other in a circle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_engine_does_no_io() {
    let modules = modules();
    for file in modules["engine"].iter().filter(|file| !file.ends_with("tests.rs")) {
        let code = code_of(file);
        // Unit tests may read the clock to start their simulated time.
        let code = code.split("#[cfg(test)]").next().unwrap_or("");
        for forbidden in [
            "tokio",
            "Instant::now",
            "SystemTime",
            "std::net",
            "std::fs",
            "LoadedTransport",
            "crate::driver",
            "crate::node",
        ] {
            assert!(
                !code.contains(forbidden),
                "{} uses `{forbidden}`: the engine is sans-IO (time is passed in, actions are returned)",
                file.display()
            );
        }
    }
}
