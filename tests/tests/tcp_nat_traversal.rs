//! NAT traversal of the TCP plugin across real NATs: two private networks, each behind its own
//! nftables masquerade, and a public network with the rendezvous node (the network of
//! [`comms_tests::nat_network`], on `10.79.x.x`, beside the UDP test's `10.78.x.x`).
//!
//! `pub` runs the rendezvous (`comms run` with `rendezvous_server = true` on 10.79.0.1:7000).
//! `pb` runs `comms run --echo` registered as `tnat-b`; `pa` runs this test binary again
//! (filtered to [`node_behind_nat_a`]) registered as `tnat-a`, which sends [`MESSAGES`]
//! messages to `tnat-b@10.79.0.1:7000` and checks every echo comes back once and in order. The
//! NATs drop TCP segments addressed to themselves (so an early SYN creates no conntrack entry).
//!
//! nftables counters in `pub` tell the paths apart: the forward chain counts TCP segments
//! between the two NATs' public addresses (SYNs apart from the rest), the input chain counts
//! connections opened to the rendezvous (two per node: signalling and dial port; two more per
//! relayed connection).
//!
//! - Cone NATs (`masquerade`): the punch gets through (TCP simultaneous open), both directions
//!   flow directly, nothing is relayed.
//! - Symmetric NATs (`masquerade fully-random`): punching fails, every message still arrives,
//!   through the relay.
//!
//! Needs root, `ip` and `nft`: in CI (`CI=true`) a missing one is a failure, elsewhere the test
//! skips and says why.

use comms_tests::{
    artifacts,
    nat_network::{
        echo_through_the_nat, network_or_skip, run_test_process_in, tail, Nat, Network, Plan, Running,
    },
    scratch_dir, start_and_follow, start_and_wait_for, write_config,
};
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const MESSAGES: usize = 20;
const A_ID: &str = "tnat-a";
const B_ID: &str = "tnat-b";
const RENDEZVOUS: &str = "10.79.0.1:7000";
/// Tells the re-executed test binary that it is the node behind NAT A.
const CHILD_CONFIG_VARIABLE: &str = "COMMS_TCP_NAT_CHILD_CONFIG";
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(60);
/// Connections each node keeps to the rendezvous: signalling (from the listen port) and the
/// dial port's.
const KEPT_CONNECTIONS: u64 = 4;

fn plan() -> Plan {
    let counters = "table ip comms_nat_count {\n\
         \x20 chain forward {\n    type filter hook forward priority 0; policy accept;\n    \
         ip saddr 10.79.1.2 ip daddr 10.79.2.2 tcp flags & (syn | ack) == syn counter comment \"syn-ab\"\n    \
         ip saddr 10.79.2.2 ip daddr 10.79.1.2 tcp flags & (syn | ack) == syn counter comment \"syn-ba\"\n    \
         ip saddr 10.79.1.2 ip daddr 10.79.2.2 tcp flags & syn == 0 counter comment \"direct-ab\"\n    \
         ip saddr 10.79.2.2 ip daddr 10.79.1.2 tcp flags & syn == 0 counter comment \"direct-ba\"\n  }\n\
         \x20 chain input {\n    type filter hook input priority 0; policy accept;\n    \
         tcp dport 7000 tcp flags & (syn | ack) == syn counter comment \"rendezvous-connections\"\n  }\n}\n"
        .to_string();
    Plan { prefix: "comms-tnat", veth: "ct", octet: 79, protocol: "tcp", counters }
}

/// A node behind NAT: registered with the rendezvous, the other private node listed by its
/// address through the rendezvous.
fn private_config(id: &str, other: &str) -> String {
    format!(
        "[node]\nid = \"{id}\"\n\n[transports.tcp]\nlisten = \"0.0.0.0:7100\"\nrendezvous = \"{RENDEZVOUS}\"\n\n\
         [discovery]\npeers = [{{ id = \"{other}\", addresses = {{ tcp = \"{other}@{RENDEZVOUS}\" }} }}]\n"
    )
}

#[derive(Debug)]
struct Counts {
    syn_ab: u64,
    syn_ba: u64,
    direct_ab: (u64, u64),
    direct_ba: (u64, u64),
    rendezvous_connections: u64,
    relay_lines: usize,
}

/// Runs the rendezvous, the echo node behind NAT B and the sender behind NAT A until the sender
/// has all its echoes; returns the counters.
fn exchange(network: &Network, label: &str) -> Counts {
    let artifacts = artifacts();
    let dir = scratch_dir(label);
    let [public, _, _, pa, pb] = &network.names;

    let rendezvous_config = write_config(
        &dir,
        "rendezvous.toml",
        &format!(
            "[node]\nid = \"tnat-rendezvous\"\n\n[transports.tcp]\nlisten = \"{RENDEZVOUS}\"\nrendezvous_server = true\n"
        ),
    );
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", public])
        .arg(&artifacts.comms_bin)
        .args(["run", "--config"])
        .arg(&rendezvous_config)
        .env("COMMS_PLUGIN_PATH", &artifacts.plugin_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    let (rendezvous, rendezvous_log) = start_and_follow(command, "transport `tcp`");
    let _rendezvous = Running(rendezvous);

    let echo_config = write_config(&dir, "echo.toml", &private_config(B_ID, A_ID));
    let echo_output = dir.join("echo.out");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", pb])
        .arg(&artifacts.comms_bin)
        .args(["run", "--echo", "--config"])
        .arg(&echo_config)
        .env("COMMS_PLUGIN_PATH", &artifacts.plugin_dir)
        .stdout(std::fs::File::create(&echo_output).unwrap());
    let _echo = Running(start_and_wait_for(command, "transport `tcp`"));

    let sender_config = write_config(&dir, "sender.toml", &private_config(A_ID, B_ID));
    let sender_log = dir.join("sender.log");
    let started = Instant::now();
    let status = run_test_process_in(
        pa,
        "node_behind_nat_a",
        &[
            (CHILD_CONFIG_VARIABLE, sender_config.as_ref()),
            ("COMMS_PLUGIN_PATH", artifacts.plugin_dir.as_ref()),
        ],
        &sender_log,
        EXCHANGE_DEADLINE + Duration::from_secs(30),
    );
    let relay_lines = rendezvous_log.try_iter().filter(|line| line.contains("tcp nat: relaying")).count();
    let counts = Counts {
        syn_ab: Network::counter(public, "syn-ab").unwrap_or(0),
        syn_ba: Network::counter(public, "syn-ba").unwrap_or(0),
        direct_ab: Network::counters(public, "direct-ab").unwrap_or_default(),
        direct_ba: Network::counters(public, "direct-ba").unwrap_or_default(),
        rendezvous_connections: Network::counter(public, "rendezvous-connections")
            .expect("the rendezvous connection counter"),
        relay_lines,
    };
    eprintln!(
        "{label}: the node behind NAT A finished in {:?} ({status}); {counts:?}\n{}",
        started.elapsed(),
        tail(&sender_log)
    );
    assert!(status.success(), "the node behind NAT A failed; its log ends:\n{}", tail(&sender_log));
    let printed = std::fs::read_to_string(&echo_output).unwrap_or_default();
    let received: Vec<&str> =
        printed.lines().filter_map(|line| line.strip_prefix(&format!("{A_ID}: ") as &str)).collect();
    let expected: Vec<String> = (0..MESSAGES).map(message).collect();
    assert_eq!(received, expected, "the echo node received every message once and in order");
    counts
}

fn message(n: usize) -> String {
    format!("hello through the NAT {n}")
}

#[test]
fn behind_cone_nats_the_punch_gets_through_and_traffic_goes_direct() {
    let plan = plan();
    let Some(network) = network_or_skip(&plan, 'c', Nat::Cone) else { return };
    let counts = exchange(&network, "tcp-nat-cone");
    assert_eq!(counts.relay_lines, 0, "nothing was relayed through the rendezvous");
    assert_eq!(
        counts.rendezvous_connections, KEPT_CONNECTIONS,
        "no relay connection was opened to the rendezvous"
    );
    let payload = (MESSAGES * message(0).len()) as u64;
    assert!(
        counts.direct_ab.1 >= payload && counts.direct_ba.1 >= payload,
        "the messages and echoes went straight between the NATs: a->b {:?}, b->a {:?} (packets, bytes)",
        counts.direct_ab,
        counts.direct_ba
    );
    drop(network);
}

#[test]
fn behind_symmetric_nats_punching_fails_and_the_rendezvous_relays() {
    let plan = plan();
    let Some(network) = network_or_skip(&plan, 's', Nat::Symmetric) else { return };
    let dropped_before = Network::counter(&network.names[1], "unsolicited").unwrap_or(0);
    let counts = exchange(&network, "tcp-nat-symmetric");
    assert!(counts.syn_ab + counts.syn_ba > 0, "the nodes tried to punch");
    assert_eq!((counts.direct_ab.0, counts.direct_ba.0), (0, 0), "no punched connection got established");
    assert!(
        counts.rendezvous_connections >= KEPT_CONNECTIONS + 4,
        "two relayed connections (two halves each) were opened to the rendezvous: {} connections",
        counts.rendezvous_connections
    );
    let dropped = Network::counter(&network.names[1], "unsolicited").unwrap_or(0) - dropped_before;
    assert!(dropped > 0, "NAT A dropped the punches that hit no mapping");
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
    let messages: Vec<String> = (0..MESSAGES).map(message).collect();
    echo_through_the_nat(&config, B_ID, &messages, EXCHANGE_DEADLINE, |_| {});
}
