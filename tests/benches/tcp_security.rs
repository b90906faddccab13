//! What encrypted links cost over TCP: the same two comms nodes with plain links and with Noise
//! links (`[comms_security] links = "noise"`), side by side.
//!
//! Run it with
//!
//! ```text
//! cargo bench -p comms-tests --bench tcp_security
//! COMMS_BENCH_SCALE=0.2 cargo bench -p comms-tests --bench tcp_security   # quicker, noisier
//! ```
//!
//! Both variants use the TCP plugin crate linked statically ([`PluginLibrary::linked`]; loading
//! it dynamically costs next to nothing, see the `tcp_throughput` benchmark) through the full
//! [`Node`] API, over loopback, with payloads of 64 B and 1 KiB:
//!
//! - **plain**: no link security;
//! - **noise**: Noise XX links (ChaCha20-Poly1305, BLAKE2s), both nodes with key-bound ids and
//!   each other's key on their allow-list. The handshake happens in the warm-up; what is measured
//!   is the steady state of an open link.
//!
//! Measurements, as in `tcp_throughput`: **one-way throughput** (N messages sent with
//! [`Node::send_raw`], counted with [`Node::receive_envelope`]; median of 7 rounds, msg/s and MB/s
//! of payload) and **ping-pong latency** (p50 and p99 of the round trip). Counts per round:
//! 200,000 (64 B) and 100,000 (1 KiB); 5,000 ping-pongs in all; each times `COMMS_BENCH_SCALE`.
//! Rounds alternate between the variants. After the table: the ratio noise/plain per payload
//! size, against the aim noise/plain >= 0.7 at 1 KiB.

use comms_host::{Node, PluginLibrary};
use comms_plugin_api::security::Identity;
use comms_tests::bench::{percentile_micros, scaled, step, NodePair};
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// Payload sizes measured, in bytes.
const PAYLOAD_SIZES: [usize; 2] = [64, 1024];
/// Throughput rounds per variant and payload; the median is reported.
const ROUNDS: usize = 7;
/// What the nodes say their payload is.
/// Time limit of one step, multiplied by the scale when above 1.
const STEP_LIMIT: Duration = Duration::from_secs(60);
/// The aim: encrypted links keep at least this share of plain throughput at 1 KiB.
const AIM: f64 = 0.7;

#[derive(Debug, Clone, Copy)]
struct Settings {
    scale: f64,
    ping_pongs: usize,
    step_limit: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let scale = comms_tests::bench::scale("tcp_security");
        Self { scale, ping_pongs: scaled(5_000, scale), step_limit: STEP_LIMIT.mul_f64(scale.max(1.0)) }
    }

    fn throughput_messages(&self, payload: usize) -> usize {
        scaled(if payload <= 64 { 200_000 } else { 100_000 }, self.scale)
    }

    fn throughput_warm_up(&self, payload: usize) -> usize {
        (self.throughput_messages(payload) / 10).max(1_000)
    }

    fn ping_pong_warm_up(&self) -> usize {
        (self.ping_pongs / 10).max(200)
    }

    fn ping_pongs_in_round(&self, round: usize) -> usize {
        self.ping_pongs / ROUNDS + usize::from(round < self.ping_pongs % ROUNDS)
    }
}

/// One side's node id and the `[comms_security]` table of its transport (empty when plain).
struct Side {
    id: String,
    security: String,
}

/// Ids and security tables for a sender and a receiver, with keys written to `dir` when
/// `noise`.
fn sides(tag: &str, noise: bool, dir: &Path) -> Result<(Side, Side), String> {
    if !noise {
        let side = |role: &str| Side { id: format!("{tag}-{role}"), security: String::new() };
        return Ok((side("sender"), side("receiver")));
    }
    let identities = [Identity::generate(), Identity::generate()];
    let mut sides = Vec::new();
    for (i, role) in ["sender", "receiver"].into_iter().enumerate() {
        let key_file = dir.join(format!("{tag}-{role}.key"));
        identities[i].save_new(&key_file).map_err(|error| error.to_string())?;
        let other = identities[1 - i].public_key().to_hex();
        sides.push(Side {
            id: identities[i].node_id(Some(&format!("{tag}-{role}"))).to_string(),
            security: format!(
                "\n[comms_security]\nlinks = \"noise\"\nkey_file = {:?}\nallow = [\"{other}\"]\n",
                key_file.display().to_string()
            ),
        });
    }
    let receiver = sides.pop().ok_or("two sides")?;
    let sender = sides.pop().ok_or("two sides")?;
    Ok((sender, receiver))
}

/// Two comms nodes over the TCP plugin: the sender sends to the receiver, which answers pings.
async fn start_pair(tag: &str, noise: bool, dir: &Path) -> Result<NodePair, String> {
    let library = PluginLibrary::linked::<comms_tcp::TcpPlugin>();
    let (sender_side, receiver_side) = sides(tag, noise, dir)?;
    let receiver_address = comms_tests::free_address();
    let sender = Node::builder(sender_side.id.as_str())
        .transport_library(
            "tcp",
            library.clone(),
            &format!("listen = \"127.0.0.1:0\"\n{}", sender_side.security),
        )
        .static_peer(&receiver_side.id, [("tcp", receiver_address.as_str())])
        .build()
        .await
        .map_err(|error| format!("building node {}: {error}", sender_side.id))?;
    let sender_address = sender.transports()[0].local_address.clone();
    let receiver = Node::builder(receiver_side.id.as_str())
        .transport_library(
            "tcp",
            library,
            &format!("listen = \"{receiver_address}\"\n{}", receiver_side.security),
        )
        .static_peer(&sender_side.id, [("tcp", sender_address.as_str())])
        .build()
        .await
        .map_err(|error| format!("building node {}: {error}", receiver_side.id))?;
    let encrypted =
        |node: &Node| node.transports()[0].capabilities.contains(comms_plugin_api::Capabilities::ENCRYPTED);
    if encrypted(&sender) != noise || encrypted(&receiver) != noise {
        return Err(format!("variant {tag}: the transports do not say encrypted = {noise}"));
    }
    Ok(NodePair::new(sender, receiver, &receiver_side.id))
}

struct Row {
    variant: &'static str,
    payload: usize,
    messages_per_second: f64,
    megabytes_per_second: f64,
    p50_micros: f64,
    p99_micros: f64,
    round_range: (f64, f64),
}

async fn run(settings: Settings) -> Result<Vec<Row>, String> {
    let limit = settings.step_limit;
    let dir = comms_tests::scratch_dir("bench-tcp-security");
    let variants = [
        ("plain", step("starting plain", limit, start_pair("plain", false, &dir)).await?),
        ("noise", step("starting noise", limit, start_pair("noise", true, &dir)).await?),
    ];
    let mut rows = Vec::new();
    for size in PAYLOAD_SIZES {
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let count = settings.throughput_messages(size);
        for (label, pair) in &variants {
            eprintln!("warming up {label} with {size} B payloads");
            let what = format!("{label}, {size} B: warm-up");
            step(&what, limit, pair.throughput(settings.throughput_warm_up(size), &payload)).await?;
            step(&what, limit, pair.ping_pong(settings.ping_pong_warm_up(), &payload, &mut Vec::new()))
                .await?;
        }
        let mut durations = vec![Vec::new(); variants.len()];
        let mut rtts = vec![Vec::new(); variants.len()];
        for round in 0..ROUNDS {
            eprintln!("{size} B payloads: round {} of {ROUNDS}", round + 1);
            for (i, (label, pair)) in variants.iter().enumerate() {
                let what = format!("{label}, {size} B: throughput round {}", round + 1);
                durations[i].push(step(&what, limit, pair.throughput(count, &payload)).await?);
            }
            for (i, (label, pair)) in variants.iter().enumerate() {
                let what = format!("{label}, {size} B: ping-pong round {}", round + 1);
                let pings = settings.ping_pongs_in_round(round);
                step(&what, limit, pair.ping_pong(pings, &payload, &mut rtts[i])).await?;
            }
        }
        for (i, (label, _)) in variants.iter().enumerate() {
            durations[i].sort();
            rtts[i].sort();
            let median = durations[i][durations[i].len() / 2].as_secs_f64();
            let messages_per_second = count as f64 / median;
            rows.push(Row {
                variant: label,
                payload: size,
                messages_per_second,
                megabytes_per_second: messages_per_second * size as f64 / 1e6,
                p50_micros: percentile_micros(&rtts[i], 50),
                p99_micros: percentile_micros(&rtts[i], 99),
                round_range: (
                    count as f64 / durations[i][durations[i].len() - 1].as_secs_f64(),
                    count as f64 / durations[i][0].as_secs_f64(),
                ),
            });
        }
    }
    for (label, pair) in &variants {
        step(&format!("closing {label}"), limit, pair.close()).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

fn print_report(settings: &Settings, rows: &[Row]) {
    println!();
    println!(
        "TCP over loopback, plain vs Noise links; throughput: median of {ROUNDS} rounds of {} (64 B) / {} (1 KiB) \
         messages; latency: {} ping-pongs (COMMS_BENCH_SCALE={})",
        settings.throughput_messages(64),
        settings.throughput_messages(1024),
        settings.ping_pongs,
        settings.scale
    );
    println!();
    println!(
        "| {:<7} | {:>7} | {:>11} | {:>8} | {:>8} | {:>8} |",
        "links", "payload", "msg/s", "MB/s", "p50 µs", "p99 µs"
    );
    println!("|{:-<9}|{:->9}|{:->13}|{:->10}|{:->10}|{:->10}|", "", "", "", "", "", "");
    for row in rows {
        println!(
            "| {:<7} | {:>5} B | {:>11.0} | {:>8.1} | {:>8.1} | {:>8.1} |",
            row.variant,
            row.payload,
            row.messages_per_second,
            row.megabytes_per_second,
            row.p50_micros,
            row.p99_micros
        );
    }
    println!();
    let find =
        |variant: &str, size: usize| rows.iter().find(|row| row.payload == size && row.variant == variant);
    for size in PAYLOAD_SIZES {
        let (Some(plain), Some(noise)) = (find("plain", size), find("noise", size)) else { continue };
        let ratio = noise.messages_per_second / plain.messages_per_second;
        let aim = if size == 1024 {
            format!(" (aim >= {AIM}: {})", if ratio >= AIM { "met" } else { "not met" })
        } else {
            String::new()
        };
        println!(
            "{size:>4} B: throughput noise/plain = {ratio:.3}{aim}; p50 latency noise/plain = {:.2}",
            noise.p50_micros / plain.p50_micros
        );
    }
    println!();
    println!("throughput spread between rounds (slowest .. fastest msg/s):");
    for row in rows {
        let (slowest, fastest) = row.round_range;
        println!("  {:<7} {:>5} B: {slowest:>11.0} .. {fastest:.0}", row.variant, row.payload);
    }
}

fn main() {
    let settings = Settings::from_env();
    let started = Instant::now();
    let rows = comms_tests::bench::run_on_two_workers("tcp_security", run(settings));
    print_report(&settings, &rows);
    println!();
    println!("measured in {:.1} s", started.elapsed().as_secs_f64());
}
