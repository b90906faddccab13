//! Two private networks, each behind its own nftables masquerade, and a public network between
//! them, in five network namespaces: what the NAT traversal tests of the UDP and TCP transports
//! share (`tests/udp_nat_traversal.rs`, `tests/tcp_nat_traversal.rs`).
//!
//! ```text
//!  pa (192.168.1.2) -- na [masquerade] (10.<o>.1.2) --+
//!                                                    pub (router; 10.<o>.0.1 on its loopback)
//!  pb (192.168.2.2) -- nb [masquerade] (10.<o>.2.2) --+
//! ```
//!
//! `<o>` is [`Plan::octet`], so that tests of different transports can run at the same time.
//! The NATs (`na`, `nb`) forward, masquerade what leaves their public side and drop every
//! packet of [`Plan::protocol`] addressed to themselves on it (a home router's firewall, rule
//! comment `unsolicited`; it also keeps Linux from creating a conntrack entry for an early
//! punch, which would make the NAT pick another port for the way out). `pub` routes between
//! the NATs and gets [`Plan::counters`] (an nftables table whose rules carry comments, read
//! with [`Network::counter`]).
//!
//! The namespaces are deleted on drop, also on panic; names carry the process id. Needs root,
//! `ip` and `nft`: [`network_or_skip`] fails in CI (`CI=true`) without them and skips elsewhere.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Whether this runs in CI (`CI=true`), where a test must not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// Runs `program` with `args`; its standard error in the error if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("cannot run `{program}`: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// How the NATs map ports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Nat {
    /// `masquerade`: port-preserving, the same mapping for every destination.
    Cone,
    /// `masquerade fully-random`: a new random port per destination.
    Symmetric,
}

/// What differs between the tests that use a [`Network`].
#[derive(Clone, Debug)]
pub struct Plan {
    /// Namespace name prefix (`comms-nat` gives `comms-nat-<pid><tag>-pub`, ...).
    pub prefix: &'static str,
    /// Veth name prefix, two letters (interface names have at most 15 bytes).
    pub veth: &'static str,
    /// Second octet of the public addresses: `10.<octet>.0.1` is the public namespace's.
    pub octet: u8,
    /// `udp` or `tcp`: what the NATs drop when it is addressed to themselves.
    pub protocol: &'static str,
    /// The nftables table loaded into the public namespace (counters).
    pub counters: String,
}

impl Plan {
    /// The public address of NAT `side` (1 or 2): `10.<octet>.<side>.2`.
    pub fn nat_address(&self, side: u8) -> String {
        format!("10.{}.{side}.2", self.octet)
    }

    /// The address on the public namespace's loopback: `10.<octet>.0.1`.
    pub fn public_address(&self) -> String {
        format!("10.{}.0.1", self.octet)
    }
}

/// The five namespaces, deleted on drop (with their veth pairs and nftables tables).
#[derive(Debug)]
pub struct Network {
    /// pub, na, nb, pa, pb.
    pub names: [String; 5],
    files: Vec<PathBuf>,
}

impl Network {
    /// Creates the namespaces of `plan`, `tag` telling apart networks of one process.
    pub fn create(plan: &Plan, tag: char, nat: Nat) -> Result<Self, String> {
        let pid = std::process::id();
        let prefix = plan.prefix;
        let names = ["pub", "na", "nb", "pa", "pb"].map(|role| format!("{prefix}-{pid}{tag}-{role}"));
        let mut network = Self { names, files: Vec::new() };
        for name in &network.names {
            run("ip", &["netns", "add", name])?;
            run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        }
        let [public, na, nb, pa, pb] = network.names.clone();
        let veth = |suffix: &str| format!("{}{pid}{tag}{suffix}", plan.veth);
        let octet = plan.octet;
        for (side, nat_ns, private_ns, subnet) in [("a", &na, &pa, 1), ("b", &nb, &pb, 2)] {
            let (private, nat_inside, nat_outside, router) = (
                veth(&format!("{side}0")),
                veth(&format!("{side}1")),
                veth(&format!("{side}2")),
                veth(&format!("{side}3")),
            );
            for (one, one_ns, other, other_ns) in
                [(&private, private_ns, &nat_inside, nat_ns), (&nat_outside, nat_ns, &router, &public)]
            {
                run(
                    "ip",
                    &[
                        "link", "add", one, "netns", one_ns, "type", "veth", "peer", "name", other, "netns",
                        other_ns,
                    ],
                )?;
            }
            let private_ip = format!("192.168.{subnet}.2/24");
            let nat_inside_ip = format!("192.168.{subnet}.1/24");
            let nat_outside_ip = format!("10.{octet}.{subnet}.2/24");
            let router_ip = format!("10.{octet}.{subnet}.1/24");
            for (namespace, interface, address) in [
                (private_ns, &private, &private_ip),
                (nat_ns, &nat_inside, &nat_inside_ip),
                (nat_ns, &nat_outside, &nat_outside_ip),
                (&public, &router, &router_ip),
            ] {
                run("ip", &["-n", namespace, "addr", "add", address, "dev", interface])?;
                run("ip", &["-n", namespace, "link", "set", interface, "up"])?;
            }
            run("ip", &["-n", private_ns, "route", "add", "default", "via", &format!("192.168.{subnet}.1")])?;
            run("ip", &["-n", nat_ns, "route", "add", "default", "via", &format!("10.{octet}.{subnet}.1")])?;
            run("ip", &["netns", "exec", nat_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            let masquerade = match nat {
                Nat::Cone => "masquerade",
                Nat::Symmetric => "masquerade fully-random",
            };
            let protocol = plan.protocol;
            let rules = format!(
                "table ip comms_nat {{\n\
                 \x20 chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    \
                 oifname \"{nat_outside}\" {masquerade}\n  }}\n\
                 \x20 chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                 iifname \"{nat_outside}\" meta l4proto {protocol} counter drop comment \"unsolicited\"\n  }}\n}}\n"
            );
            network.load_rules(nat_ns, &rules)?;
        }
        run("ip", &["-n", &public, "addr", "add", &format!("{}/32", plan.public_address()), "dev", "lo"])?;
        run("ip", &["netns", "exec", &public, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        network.load_rules(&public, &plan.counters)?;
        network.wait_until_links_are_up()?;
        Ok(network)
    }

    fn load_rules(&mut self, namespace: &str, rules: &str) -> Result<(), String> {
        let path = std::env::temp_dir().join(format!("{namespace}.nft"));
        std::fs::write(&path, rules).map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        self.files.push(path.clone());
        run("ip", &["netns", "exec", namespace, "nft", "-f", &path.to_string_lossy()])
    }

    /// Waits until every veth is up (the kernel brings a veth's carrier up asynchronously; until
    /// then it drops what is sent).
    fn wait_until_links_are_up(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for namespace in &self.names {
            loop {
                let output = Command::new("ip")
                    .args(["-n", namespace, "-o", "link", "show", "type", "veth"])
                    .output()
                    .map_err(|error| format!("cannot run `ip`: {error}"))?;
                let links = String::from_utf8_lossy(&output.stdout);
                if links.lines().all(|link| link.contains("state UP")) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("the veths in {namespace} did not come up: {links}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The packets counted by the rule with `comment` in `namespace`.
    pub fn counter(namespace: &str, comment: &str) -> Option<u64> {
        Self::counters(namespace, comment).map(|(packets, _)| packets)
    }

    /// The packets and bytes counted by the rule with `comment` in `namespace`.
    pub fn counters(namespace: &str, comment: &str) -> Option<(u64, u64)> {
        let output =
            Command::new("ip").args(["netns", "exec", namespace, "nft", "list", "ruleset"]).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().find(|line| line.contains(&format!("comment \"{comment}\"")))?;
        let mut words = line.split("counter packets ").nth(1)?.split_whitespace();
        let packets = words.next()?.parse().ok()?;
        let bytes = match (words.next(), words.next()) {
            (Some("bytes"), Some(bytes)) => bytes.parse().ok()?,
            _ => 0,
        };
        Some((packets, bytes))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for name in &self.names {
            if let Err(error) = run("ip", &["netns", "delete", name]) {
                eprintln!("cleanup: {error}");
            }
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Why the namespace tests cannot run here, if `ip` or `nft` is missing.
pub fn missing_tool() -> Option<String> {
    let missing = [("ip", "-V"), ("nft", "--version")].into_iter().find(|(tool, version)| {
        !Command::new(tool)
            .arg(version)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    missing.map(|(tool, _)| format!("`{tool}` is not installed (.ci/run installs nftables)"))
}

/// The network of `plan`, or `None` (with the reason printed) where it cannot be set up outside
/// CI; in CI that is a panic.
pub fn network_or_skip(plan: &Plan, tag: char, nat: Nat) -> Option<Network> {
    let result = match missing_tool() {
        Some(why) => Err(why),
        None => Network::create(plan, tag, nat),
    };
    match result {
        Ok(network) => Some(network),
        Err(why) if in_ci() => {
            panic!("network namespaces with NAT cannot be set up, and in CI this test must not skip: {why}")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED: network namespaces with NAT cannot be set up (needs root, ip and nft): {why}"
            );
            None
        }
    }
}

/// The last 30 lines of the file at `path`.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs the current test binary again inside `namespace`, filtered to the `#[ignore]`d helper
/// test `test_name` (a network namespace belongs to a process), with `variables` set and its
/// output in `log`; waits until it exits, at most `deadline`, and returns its exit status. A
/// helper process that does not finish in time is killed and fails the test with its log.
pub fn run_test_process_in(
    namespace: &str,
    test_name: &str,
    variables: &[(&str, &std::ffi::OsStr)],
    log: &Path,
    deadline: Duration,
) -> std::process::ExitStatus {
    let file = std::fs::File::create(log).expect("the helper process's log file");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", namespace])
        .arg(std::env::current_exe().expect("the test binary's path"))
        .args(["--exact", test_name, "--ignored", "--nocapture", "--test-threads", "1"])
        .stdout(file.try_clone().expect("the log file"))
        .stderr(file);
    for (name, value) in variables {
        command.env(name, value);
    }
    let started = Instant::now();
    let mut process = Running(command.spawn().expect("starting the helper process"));
    loop {
        if let Some(status) = process.0.try_wait().expect("waiting for the helper process") {
            return status;
        }
        assert!(
            started.elapsed() < deadline,
            "`{test_name}` in namespace {namespace} did not finish within {deadline:?}; its log ends:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node behind NAT A of the NAT traversal tests, in the process [`run_test_process_in`]
/// started: a node from `config` sends each of `messages` to `peer` and waits until every echo
/// came back from `peer`, once and in order, within `deadline`; then `check` looks at the node
/// (e.g. its metrics) before it closes.
pub fn echo_through_the_nat(
    config: &std::ffi::OsStr,
    peer: &str,
    messages: &[String],
    deadline: Duration,
    check: impl FnOnce(&comms_host::Node),
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let deadline = tokio::time::Instant::now() + deadline;
        let node = comms_host::Node::from_config(config).await.unwrap_or_else(|error| panic!("{error}"));
        eprintln!("transports: {:?}", node.transports());
        let started = Instant::now();
        for message in messages {
            node.send(peer, message).await.expect("send");
        }
        let mut echoed = Vec::new();
        while echoed.len() < messages.len() {
            let received = tokio::time::timeout_at(deadline, node.receive::<String>())
                .await
                .unwrap_or_else(|_| panic!("only {} of {} echoes arrived", echoed.len(), messages.len()))
                .expect("receive");
            assert_eq!(received.from.as_str(), peer);
            echoed.push(received.message);
        }
        eprintln!("{} messages echoed in {:?}", messages.len(), started.elapsed());
        assert_eq!(echoed, messages, "every echo arrives once and in order");
        check(&node);
        node.close().await.expect("close");
    });
}
