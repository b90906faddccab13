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

use comms_tests::{
    artifacts,
    nat_network::{
        echo_through_the_nat, network_or_skip, run_test_process_in, tail, Nat, Network, Plan, Running,
    },
    scratch_dir, start_and_wait_for, write_config,
};
use std::{
    path::Path,
    process::{Command, Stdio},
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

/// The five namespaces of this test (`comms-nat-*`, `10.78.x.x`, apart from the TCP test's)
/// and the counters in `pub`.
fn plan() -> Plan {
    Plan {
        prefix: "comms-nat",
        veth: "cn",
        octet: 78,
        protocol: "udp",
        counters: "table ip comms_nat_count {\n\
             \x20 chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
             ip saddr 10.78.1.2 ip daddr 10.78.2.2 meta l4proto udp counter comment \"direct-ab\"\n    \
             ip saddr 10.78.2.2 ip daddr 10.78.1.2 meta l4proto udp counter comment \"direct-ba\"\n  }\n\
             \x20 chain input {\n    type filter hook input priority 0; policy accept;\n    \
             udp dport 7000 @th,64,16 0xcf08 counter comment \"relay\"\n  }\n}\n"
            .to_string(),
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
    let started = Instant::now();
    let status = run_test_process_in(
        pa,
        "node_behind_nat_a",
        &[
            (CHILD_CONFIG_VARIABLE, sender_config.as_ref()),
            (CHILD_PEER_VARIABLE, nodes.b.as_ref()),
            (CHILD_SEALED_VARIABLE, (if encrypted { "1" } else { "" }).as_ref()),
            ("COMMS_PLUGIN_PATH", artifacts.plugin_dir.as_ref()),
        ],
        &sender_log,
        EXCHANGE_DEADLINE + Duration::from_secs(30),
    );
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
    let Some(network) = network_or_skip(&plan(), 'c', Nat::Cone) else { return };
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
    let Some(network) = network_or_skip(&plan(), 's', Nat::Symmetric) else { return };
    let dropped_before = Network::counter(&network.names[1], "unsolicited").unwrap_or(0);
    let counts = exchange(&network, "udp-nat-symmetric", false);
    assert!(counts.relay >= MESSAGES as u64, "the messages were relayed: {} relay frames", counts.relay);
    let dropped = Network::counter(&network.names[1], "unsolicited").unwrap_or(0) - dropped_before;
    assert!(dropped > 0, "NAT A dropped the punches that hit no mapping");
    drop(network);
}

#[test]
fn behind_symmetric_nats_encrypted_links_run_end_to_end_through_the_relay() {
    let Some(network) = network_or_skip(&plan(), 'e', Nat::Symmetric) else { return };
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
    let peer = std::env::var(CHILD_PEER_VARIABLE).unwrap_or_else(|_| B_ID.to_string());
    let sealed = std::env::var(CHILD_SEALED_VARIABLE).is_ok_and(|sealed| sealed == "1");
    let messages: Vec<String> = (0..MESSAGES).map(message).collect();
    echo_through_the_nat(&config, &peer, &messages, EXCHANGE_DEADLINE, |node| {
        if !sealed {
            return;
        }
        let metrics = node.metrics_text();
        let stat = |name: &str| {
            metrics
                .lines()
                .find(|line| {
                    line.starts_with("comms_transport_stat{") && line.contains(&format!("name=\"{name}\""))
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
    });
}
