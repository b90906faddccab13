//! NAT traversal of the UDP plugin across real NATs: two private networks, each behind its own
//! nftables masquerade, and a public network with the rendezvous node.
//!
//! ```text
//!  pa (192.168.1.2) -- na [masquerade] (10.78.1.2) --+
//!                                                    pub (router; rendezvous on 10.78.0.1:7000)
//!  pb (192.168.2.2) -- nb [masquerade] (10.78.2.2) --+
//! ```
//!
//! Five network namespaces joined by veth pairs. `pub` routes between the two NATs' public
//! sides and runs the rendezvous (`comms run` with `rendezvous_server = true`). `na` and `nb`
//! forward, masquerade what leaves their public side and drop every UDP datagram addressed to
//! themselves on it (a home router's firewall; it also keeps Linux from creating a conntrack entry
//! for an early punch, which would make the NAT pick another port for the way out). `pb` runs
//! `comms run --echo` registered with the rendezvous as `nat-b`; `pa` runs this test binary again
//! (filtered to [`node_behind_nat_a`]) registered as `nat-a`, which sends [`MESSAGES`] messages to
//! `nat-b@10.78.0.1:7000` (static discovery lists each private node by that address) and checks
//! every echo comes back once and in order.
//!
//! nftables counters in `pub` tell the paths apart: the forward chain counts UDP datagrams
//! between the two NATs' public addresses (direct), the input chain counts `RELAY` frames
//! arriving at the rendezvous (the first two bytes of the UDP payload are `0xCF 0x08`).
//!
//! - Cone NATs (`masquerade`: Linux keeps the source port, so the mapping is the same for every
//!   destination): the punch gets through, both directions flow directly (forward counters >=
//!   the messages each way), and no relay frame reaches the rendezvous.
//! - Symmetric NATs (`masquerade fully-random`: a new random port per destination): the punch
//!   cannot get through, every message still arrives, and relay frames are counted.
//! - The same with encrypted links (`[security] links = "noise"`, node ids bound to keys): the
//!   Noise session runs end to end through the relay (the node behind NAT A checks its
//!   `udp.handshakes` and `udp.nat.relayed_out` counters).
//!
//! The namespaces are deleted by a guard, also on panic; names carry the process id. Needs
//! root, `ip` and `nft`: in CI (`CI=true`) a missing one is a failure, elsewhere the test skips
//! and says why.

use comms_host::Node;
use comms_tests::{artifacts, scratch_dir, start_and_wait_for, write_config};
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const MESSAGES: usize = 20;
const A_ID: &str = "nat-a";
const B_ID: &str = "nat-b";
const RENDEZVOUS: &str = "10.78.0.1:7000";
/// Tells the re-executed test binary that it is the node behind NAT A.
const CHILD_CONFIG_VARIABLE: &str = "COMMS_UDP_NAT_CHILD_CONFIG";
/// The echo node's id, for the node behind NAT A (bound to a key with encrypted links).
const CHILD_PEER_VARIABLE: &str = "COMMS_UDP_NAT_CHILD_PEER";
/// Set for the node behind NAT A when links are encrypted and relayed: it checks its counters.
const CHILD_SEALED_VARIABLE: &str = "COMMS_UDP_NAT_CHILD_SEALED";
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(60);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Nat {
    /// `masquerade`: port-preserving, the same mapping for every destination.
    Cone,
    /// `masquerade fully-random`: a new random port per destination.
    Symmetric,
}

/// The five namespaces, deleted on drop (with their veth pairs and nftables tables).
struct Network {
    /// pub, na, nb, pa, pb.
    names: [String; 5],
    files: Vec<std::path::PathBuf>,
}

impl Network {
    fn create(tag: char, nat: Nat) -> Result<Self, String> {
        let pid = std::process::id();
        let names = ["pub", "na", "nb", "pa", "pb"].map(|role| format!("comms-nat-{pid}{tag}-{role}"));
        let mut network = Self { names, files: Vec::new() };
        for name in &network.names {
            run("ip", &["netns", "add", name])?;
            run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        }
        let [public, na, nb, pa, pb] = network.names.clone();
        // Interface names: at most 15 bytes.
        let veth = |suffix: &str| format!("cn{pid}{tag}{suffix}");
        for (side, nat_ns, private_ns, subnet) in [("a", &na, &pa, 1), ("b", &nb, &pb, 2)] {
            let (private, nat_inside, nat_outside, router) = (
                veth(&format!("{side}0")),
                veth(&format!("{side}1")),
                veth(&format!("{side}2")),
                veth(&format!("{side}3")),
            );
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &private,
                    "netns",
                    private_ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &nat_inside,
                    "netns",
                    nat_ns,
                ],
            )?;
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &nat_outside,
                    "netns",
                    nat_ns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &router,
                    "netns",
                    &public,
                ],
            )?;
            let private_ip = format!("192.168.{subnet}.2/24");
            let nat_inside_ip = format!("192.168.{subnet}.1/24");
            let nat_outside_ip = format!("10.78.{subnet}.2/24");
            let router_ip = format!("10.78.{subnet}.1/24");
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
            run("ip", &["-n", nat_ns, "route", "add", "default", "via", &format!("10.78.{subnet}.1")])?;
            run("ip", &["netns", "exec", nat_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            let masquerade = match nat {
                Nat::Cone => "masquerade",
                Nat::Symmetric => "masquerade fully-random",
            };
            let rules = format!(
                "table ip comms_nat {{\n\
                 \x20 chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    \
                 oifname \"{nat_outside}\" {masquerade}\n  }}\n\
                 \x20 chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                 iifname \"{nat_outside}\" meta l4proto udp counter drop comment \"unsolicited\"\n  }}\n}}\n"
            );
            network.load_rules(nat_ns, &rules)?;
        }
        run("ip", &["-n", &public, "addr", "add", "10.78.0.1/32", "dev", "lo"])?;
        run("ip", &["netns", "exec", &public, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let counters = "table ip comms_nat_count {\n\
             \x20 chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
             ip saddr 10.78.1.2 ip daddr 10.78.2.2 meta l4proto udp counter comment \"direct-ab\"\n    \
             ip saddr 10.78.2.2 ip daddr 10.78.1.2 meta l4proto udp counter comment \"direct-ba\"\n  }\n\
             \x20 chain input {\n    type filter hook input priority 0; policy accept;\n    \
             udp dport 7000 @th,64,16 0xcf08 counter comment \"relay\"\n  }\n}\n";
        network.load_rules(&public, counters)?;
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
    fn counter(namespace: &str, comment: &str) -> Option<u64> {
        let output =
            Command::new("ip").args(["netns", "exec", namespace, "nft", "list", "ruleset"]).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().find(|line| line.contains(&format!("comment \"{comment}\"")))?;
        line.split("counter packets ").nth(1)?.split_whitespace().next()?.parse().ok()
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
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn network_or_skip(tag: char, nat: Nat) -> Option<Network> {
    let missing = [("ip", "-V"), ("nft", "--version")].into_iter().find(|(tool, version)| {
        !Command::new(tool)
            .arg(version)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let result = match missing {
        Some((tool, _)) => Err(format!("`{tool}` is not installed (.ci/run installs nftables)")),
        None => Network::create(tag, nat),
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

/// The ids of the two private nodes and, with encrypted links, the `[node]` and `[security]`
/// lines that give each its key.
struct Nodes {
    a: String,
    b: String,
    keys: Option<[String; 3]>,
}

impl Nodes {
    fn plain() -> Self {
        Nodes { a: A_ID.into(), b: B_ID.into(), keys: None }
    }

    /// Nodes with key files in `dir`, ids bound to them, allowing any key.
    fn encrypted(dir: &Path) -> Self {
        let mut ids = Vec::new();
        let keys = ["nat-rendezvous", A_ID, B_ID].map(|label| {
            let identity = comms_plugin_api::security::Identity::generate();
            let key_file = dir.join(format!("{label}.key"));
            identity.save_new(&key_file).unwrap();
            ids.push(identity.node_id(Some(label)).to_string());
            format!("key_file = {key_file:?}")
        });
        Nodes { a: ids[1].clone(), b: ids[2].clone(), keys: Some(keys) }
    }

    /// `[node]` of the node with this label, plus `[security]` with encrypted links.
    fn node_section(&self, index: usize, label: &str) -> String {
        match &self.keys {
            Some(keys) => format!(
                "[node]\nid = \"{label}\"\n{}\n\n[security]\nlinks = \"noise\"\nallow = [\"*\"]\n\n",
                keys[index]
            ),
            None => format!("[node]\nid = \"{label}\"\n\n"),
        }
    }

    /// A node behind NAT: registered with the rendezvous under its label, the other private
    /// node listed by its address through the rendezvous.
    fn private_config(&self, a_side: bool) -> String {
        let (index, label, other_label, other) =
            if a_side { (1, A_ID, B_ID, &self.b) } else { (2, B_ID, A_ID, &self.a) };
        format!(
            "{}[transports.udp]\nrendezvous = \"{RENDEZVOUS}\"\nrendezvous_name = \"{label}\"\n\n\
             [discovery]\npeers = [{{ id = \"{other}\", addresses = {{ udp = \"{other_label}@{RENDEZVOUS}\" }} }}]\n",
            self.node_section(index, label)
        )
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

struct Counts {
    direct_ab: u64,
    direct_ba: u64,
    relay: u64,
}

/// Runs the rendezvous, the echo node behind NAT B and the sender behind NAT A until the sender
/// has all its echoes; returns the counters.
fn exchange(network: &Network, label: &str, encrypted: bool) -> Counts {
    let artifacts = artifacts();
    let dir = scratch_dir(label);
    let [public, _, _, pa, pb] = &network.names;
    let nodes = if encrypted { Nodes::encrypted(&dir) } else { Nodes::plain() };

    let rendezvous_config = write_config(
        &dir,
        "rendezvous.toml",
        &format!(
            "{}[transports.udp]\nlisten = \"{RENDEZVOUS}\"\nrendezvous_server = true\n",
            nodes.node_section(0, "nat-rendezvous")
        ),
    );
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", public])
        .arg(&artifacts.comms_bin)
        .args(["run", "--config"])
        .arg(&rendezvous_config)
        .env("COMMS_PLUGIN_PATH", &artifacts.plugin_dir)
        .stdout(Stdio::null());
    let _rendezvous = Running(start_and_wait_for(command, "transport `udp`"));

    let echo_config = write_config(&dir, "echo.toml", &nodes.private_config(false));
    let echo_output = dir.join("echo.out");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", pb])
        .arg(&artifacts.comms_bin)
        .args(["run", "--echo", "--config"])
        .arg(&echo_config)
        .env("COMMS_PLUGIN_PATH", &artifacts.plugin_dir)
        .stdout(std::fs::File::create(&echo_output).unwrap());
    let _echo = Running(start_and_wait_for(command, "transport `udp`"));

    let sender_config = write_config(&dir, "sender.toml", &nodes.private_config(true));
    let sender_log = dir.join("sender.log");
    let log = std::fs::File::create(&sender_log).unwrap();
    let started = Instant::now();
    let mut sender = Running(
        Command::new("ip")
            .args(["netns", "exec", pa])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "node_behind_nat_a", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(CHILD_CONFIG_VARIABLE, &sender_config)
            .env(CHILD_PEER_VARIABLE, &nodes.b)
            .env(CHILD_SEALED_VARIABLE, if encrypted { "1" } else { "" })
            .env("COMMS_PLUGIN_PATH", &artifacts.plugin_dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let status = loop {
        if let Some(status) = sender.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < EXCHANGE_DEADLINE + Duration::from_secs(30),
            "the node behind NAT A did not finish; its log ends:\n{}",
            tail(&sender_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let counts = Counts {
        direct_ab: Network::counter(public, "direct-ab").unwrap_or(0),
        direct_ba: Network::counter(public, "direct-ba").unwrap_or(0),
        relay: Network::counter(public, "relay").expect("the relay counter"),
    };
    eprintln!(
        "{label}: the node behind NAT A finished in {:?} ({status}); direct a->b {} b->a {}, relay frames {}\n{}",
        started.elapsed(),
        counts.direct_ab,
        counts.direct_ba,
        counts.relay,
        tail(&sender_log)
    );
    assert!(status.success(), "the node behind NAT A failed; its log ends:\n{}", tail(&sender_log));
    let printed = std::fs::read_to_string(&echo_output).unwrap_or_default();
    let received: Vec<&str> =
        printed.lines().filter_map(|line| line.strip_prefix(&format!("{}: ", nodes.a) as &str)).collect();
    let expected: Vec<String> = (0..MESSAGES).map(message).collect();
    assert_eq!(received, expected, "the echo node received every message once and in order");
    counts
}

fn message(n: usize) -> String {
    format!("hello through the NAT {n}")
}

#[test]
fn behind_cone_nats_the_punch_gets_through_and_traffic_goes_direct() {
    let Some(network) = network_or_skip('c', Nat::Cone) else { return };
    let counts = exchange(&network, "udp-nat-cone", false);
    assert_eq!(counts.relay, 0, "nothing was relayed through the rendezvous");
    assert!(
        counts.direct_ab >= MESSAGES as u64 && counts.direct_ba >= MESSAGES as u64,
        "the messages and echoes went straight between the NATs: a->b {}, b->a {}",
        counts.direct_ab,
        counts.direct_ba
    );
    drop(network);
}

#[test]
fn behind_symmetric_nats_punching_fails_and_the_rendezvous_relays() {
    let Some(network) = network_or_skip('s', Nat::Symmetric) else { return };
    let dropped_before = Network::counter(&network.names[1], "unsolicited").unwrap_or(0);
    let counts = exchange(&network, "udp-nat-symmetric", false);
    assert!(counts.relay >= MESSAGES as u64, "the messages were relayed: {} relay frames", counts.relay);
    let dropped = Network::counter(&network.names[1], "unsolicited").unwrap_or(0) - dropped_before;
    assert!(dropped > 0, "NAT A dropped the punches that hit no mapping");
    drop(network);
}

#[test]
fn behind_symmetric_nats_encrypted_links_run_end_to_end_through_the_relay() {
    let Some(network) = network_or_skip('e', Nat::Symmetric) else { return };
    // The node behind NAT A checks that its session was set up and its datagrams relayed.
    let counts = exchange(&network, "udp-nat-encrypted", true);
    assert!(counts.relay >= MESSAGES as u64, "the messages were relayed: {} relay frames", counts.relay);
    drop(network);
}

/// The node behind NAT A, started by the tests above in its own process (a network namespace
/// belongs to a process). Does nothing when run on its own.
#[test]
#[ignore = "a helper process of the NAT traversal tests"]
fn node_behind_nat_a() {
    let Some(config) = std::env::var_os(CHILD_CONFIG_VARIABLE) else {
        eprintln!("not started by the NAT traversal test: nothing to do");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let deadline = tokio::time::Instant::now() + EXCHANGE_DEADLINE;
        let peer = std::env::var(CHILD_PEER_VARIABLE).unwrap_or_else(|_| B_ID.to_string());
        let node = Node::from_config(&config).await.unwrap_or_else(|error| panic!("{error}"));
        eprintln!("transports: {:?}", node.transports());
        let started = Instant::now();
        for n in 0..MESSAGES {
            node.send(peer.as_str(), &message(n)).await.unwrap();
        }
        let mut echoed = Vec::new();
        while echoed.len() < MESSAGES {
            let received = tokio::time::timeout_at(deadline, node.receive::<String>())
                .await
                .unwrap_or_else(|_| panic!("only {} of {MESSAGES} echoes arrived", echoed.len()))
                .unwrap();
            assert_eq!(received.from.as_str(), peer);
            echoed.push(received.message);
        }
        eprintln!("{MESSAGES} messages echoed in {:?}", started.elapsed());
        let expected: Vec<String> = (0..MESSAGES).map(message).collect();
        assert_eq!(echoed, expected, "every echo arrives once and in order");
        if std::env::var(CHILD_SEALED_VARIABLE).is_ok_and(|sealed| sealed == "1") {
            let metrics = node.metrics_text();
            let stat = |name: &str| {
                metrics
                    .lines()
                    .find(|line| {
                        line.starts_with("comms_transport_stat{")
                            && line.contains(&format!("name=\"{name}\""))
                    })
                    .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            eprintln!(
                "udp.handshakes {}, udp.nat.relayed_out {}",
                stat("udp.handshakes"),
                stat("udp.nat.relayed_out")
            );
            assert!(stat("udp.handshakes") >= 1.0, "a Noise session was set up:\n{metrics}");
            assert!(stat("udp.nat.relayed_out") >= MESSAGES as f64, "the datagrams were relayed:\n{metrics}");
        }
        node.close().await.unwrap();
    });
}
