//! Tests that run part of themselves in other processes (to kill them with SIGKILL, or to have
//! several processes share a broker or a file): the child is the test binary itself, re-run with
//! `--exact child_process` and its role in an environment variable. The test binary holds a test
//! named `child_process` that does nothing unless that variable is set.
//!
//! A child reports to its parent on standard output, in lines that start with [`MARK`].

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Output lines of a child that the parent reads start with this.
pub const MARK: &str = "@@ ";

/// Starts this test binary as a child whose role variable `role_variable` is `role`, with the
/// other environment variables `vars`.
pub fn spawn(role_variable: &str, role: &str, vars: &[(&str, String)]) -> Child {
    let mut command = Command::new(std::env::current_exe().expect("the test binary"));
    command
        .args(["--exact", "child_process", "--nocapture", "--test-threads", "1"])
        .env(role_variable, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (name, value) in vars {
        command.env(name, value);
    }
    command.spawn().expect("start a child process")
}

/// Reads a child's marked lines until `until` says stop (or the output ends), then returns them.
pub fn read_marked(child: &mut Child, mut until: impl FnMut(&str) -> bool) -> Vec<String> {
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child output");
        // libtest may print `test child_process ... ` on the same line, before the mark.
        if let Some(marked) = line.find(MARK).map(|at| &line[at + MARK.len()..]) {
            lines.push(marked.to_string());
            if until(marked) {
                break;
            }
        }
    }
    lines
}

/// An environment variable the parent set for a child; panics naming it if it is missing.
pub fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set for a child"))
}

/// Waits for a child and fails the test if it did not exit successfully within 60 s.
pub fn finished_ok(mut child: Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("the child's status") {
            assert!(status.success(), "{what} exited with {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
