//! TCP throughput and latency of comms, compared with what a user would write by hand.
//!
//! Run it with
//!
//! ```text
//! cargo bench -p comms-tests --bench tcp_throughput
//! COMMS_BENCH_SCALE=0.1 cargo bench -p comms-tests --bench tcp_throughput   # quicker, noisier
//! ```
//!
//! `COMMS_BENCH_ONLY=az` runs only the variants with those letters (e.g. under a profiler), and
//! `COMMS_BENCH_PAYLOADS=64` only that payload size (a comma-separated list of byte counts).
//!
//! `COMMS_BENCH_PING_PONGS=N` sets the number of round trips whatever the scale.
//!
//! `COMMS_BENCH_PLUGIN_THREADS=N` gives the loaded plugin's runtime N worker threads (default:
//! the plugin's own default).
//!
//! `COMMS_BENCH_TCP_PLUGIN=/path/to/libcomms_tcp.so` measures that build of the plugin as a, d
//! and e instead of the one built from this tree (e.g. a copy made before a change, for a
//! before/after comparison in one run; it must speak this host's contract); b stays the crate
//! linked into the benchmark.
//!
//! It prints a table (to stdout; progress goes to stderr) with five variants, each over
//! loopback TCP, for payloads of 64 B, 1 KiB and 64 KiB:
//!
//! - **a**: the TCP plugin as users get it, `libcomms_tcp.so` loaded with
//!   [`PluginLibrary::load`], driven through the full [`Node`] API;
//! - **b**: the same plugin crate linked statically ([`PluginLibrary::linked`]), through the same
//!   `Node` API: the difference between a and b is the cost of loading it dynamically, and of
//!   the allocator (linked, the crate's default feature `own-allocator` is off, so b allocates
//!   with the program's allocator, glibc's, where the loaded library uses its own heap);
//! - **c**: plain tokio, no comms: a `TcpStream` pair (`TCP_NODELAY` on, like the plugin), frames
//!   written by hand as a `u32` big-endian length and the body, a 64 KiB `BufWriter` on the
//!   sending side (flushed at the end of a burst, or after each ping), a 64 KiB `BufReader` on the
//!   receiving side, each received body in its own `Vec<u8>` as an application would get it;
//! - **d**: the loaded `libcomms_tcp.so` without a `Node`: two transports driven through the
//!   host-side API ([`comms_plugin_api::host_side::LoadedTransport`]), one awaited `send` per
//!   message, `receive` in batches of up to 1024;
//! - **e**: as d, with batched sends: `LoadedTransport::send_batch` with [`BATCH`] messages per
//!   call (one call across the plugin boundary, one wake of the connection's writer);
//! - **f**: as a, the sender handing [`BATCH`] messages at a time to [`Node::send_raw_many`]
//!   and the receiver taking up to [`BATCH`] at a time with [`Node::receive_envelopes`] (what
//!   an application producing and draining bursts would do);
//! - **z**: libzmq 4.3 through the `zmq` crate, the peer a user would pick instead: PUSH/PULL
//!   for throughput, REQ/REP for round trips, each socket driven by a thread of its own (its API
//!   blocks), default high-water marks, each received message in its own `Vec<u8>`.
//!
//! Every variant sends one prepared payload buffer in every message, as a program sending one
//! buffer would and as the raw baseline writes every frame from one slice: d and e share one
//! [`comms_host::Payload`], a, b and f hand clones of one `Payload` to `send_raw` (a clone shares
//! the buffer). So the comparison is of the paths, not of allocating and filling payloads (which
//! an application producing fresh data pays with either library). Before 2026-12-04 a, b and f
//! copied the payload into each message: at 64 KiB that copy was 9 % of the workers' time.
//!
//! Two measurements per variant and payload:
//!
//! - **one-way throughput**: one sender sends N messages as fast as it can, one receiver counts
//!   them; the time runs from the first send to the last receive. The comms variants send with
//!   [`Node::send_raw`] (raw bytes with a `content-type` header, no serialization) and receive with
//!   [`Node::receive_envelope`] (no decoding), so both sides move the same bytes as the baseline.
//!   Reported as messages per second and MB/s of payload (1 MB = 10^6 bytes), the median of
//!   7 rounds (the spread between rounds is printed too: on a small machine it is wide);
//! - **ping-pong latency**: send one message, wait for the reply (the same payload back, with the
//!   request's id as correlation id for comms), repeat; reported as the 50th and 99th percentile
//!   of the round-trip time in microseconds, over all rounds.
//!
//! Message counts per round: 200,000 (64 B), 100,000 (1 KiB) and 10,000 (64 KiB) for
//! throughput, and 5,000 ping-pongs in all (none for e: a batch of one is a single send), each multiplied by the environment variable `COMMS_BENCH_SCALE` (a float,
//! default 1). Every variant first gets a short warm-up (connections dialled, buffers grown), and
//! the rounds alternate between the variants so that a slow phase of the machine hits them all.
//!
//! Everything runs on a tokio multi-thread runtime with 2 workers. The comms plugins also run
//! their own 2-worker runtime each, as they always do. Every step has a time limit: a stuck
//! benchmark ends with a message naming the step instead of hanging.
//!
//! After the table come the throughput ratios per payload size: a/b against the aim >= 0.95
//! (loading the plugin dynamically costs next to nothing), f/z and a/z against libzmq (aim for
//! f: >= 1.0 at 64 B and 1 KiB), f/c and a/c against the hand-written baseline (aim >= 0.8 at
//! 64 KiB), d/c, e/c and e/d (what batching buys at the boundary); then the round-trip ratios
//! (comms p50 against raw tokio, aim <= 2, and against libzmq, aim <= 1); then the threads of
//! the process, by name, and those of another process (this program run again) in which two
//! nodes load every in-tree plugin library (`comms_tests::every_plugin`; needs Redis and
//! RabbitMQ, else it says so).

use comms_host::{Node, PluginLibrary};
use comms_tests::bench::{percentile_micros, scaled, step, NodePair, TransportPair};
use std::{
    collections::BTreeMap,
    io,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
};

/// Payload sizes measured, in bytes.
const PAYLOAD_SIZES: [usize; 3] = [64, 1024, 64 * 1024];
/// Messages per `send_batch` call of variant e.
const BATCH: usize = 256;
/// Throughput rounds per variant and payload; the median is reported.
const ROUNDS: usize = 7;
/// Buffer size of the hand-written baseline (the plugin batches writes up to 64 KiB and reads
/// through a 64 KiB buffer too).
const IO_BUFFER_BYTES: usize = 64 * 1024;
/// Largest frame the baseline accepts.
const MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;
/// Time limit of one step (setup, one warm-up, one round), multiplied by the scale when above 1.
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// Counts and limits, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    scale: f64,
    /// [`PAYLOAD_SIZES`], or those `COMMS_BENCH_PAYLOADS` lists.
    sizes: Vec<usize>,
    ping_pongs: usize,
    step_limit: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let scale = comms_tests::bench::scale("tcp_throughput");
        // COMMS_BENCH_PING_PONGS=N: that many round trips whatever the scale (a small scale and
        // many round trips make a run about round trips, e.g. to count wake-ups per round trip).
        let ping_pongs = std::env::var("COMMS_BENCH_PING_PONGS")
            .ok()
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| scaled(5_000, scale));
        let sizes = comms_tests::bench::payload_sizes("tcp_throughput", &PAYLOAD_SIZES);
        Self { scale, sizes, ping_pongs, step_limit: STEP_LIMIT.mul_f64(scale.max(1.0)) }
    }

    /// Messages per throughput round for one payload size.
    fn throughput_messages(&self, payload: usize) -> usize {
        let count = match payload {
            0..=64 => 200_000,
            65..=1024 => 100_000,
            _ => 10_000,
        };
        scaled(count, self.scale)
    }

    /// Messages of a throughput warm-up.
    fn throughput_warm_up(&self, payload: usize) -> usize {
        (self.throughput_messages(payload) / 10).max(1_000)
    }

    /// Ping-pongs of a warm-up.
    fn ping_pong_warm_up(&self) -> usize {
        (self.ping_pongs / 10).max(200)
    }

    /// Ping-pongs in round `round` (the total spread over the rounds).
    fn ping_pongs_in_round(&self, round: usize) -> usize {
        self.ping_pongs / ROUNDS + usize::from(round < self.ping_pongs % ROUNDS)
    }
}

/// Two comms nodes over the TCP plugin: the sender sends to the receiver, which answers pings.
async fn start_comms_pair(tag: &str, library: PluginLibrary) -> Result<NodePair, String> {
    let sender_id = format!("{tag}-sender");
    let receiver_id = format!("{tag}-receiver");
    // The receiver's address is chosen first so that each node can name the other at build time.
    let receiver_address = comms_tests::free_address();
    let sender = Node::builder(sender_id.as_str())
        .transport_library("tcp", library.clone(), r#"listen = "127.0.0.1:0""#)
        .static_peer(&receiver_id, [("tcp", receiver_address.as_str())])
        .build()
        .await
        .map_err(|error| format!("building node {sender_id}: {error}"))?;
    let sender_address = sender.transports()[0].local_address.clone();
    let receiver = Node::builder(receiver_id.as_str())
        .transport_library("tcp", library, &format!("listen = \"{receiver_address}\""))
        .static_peer(&sender_id, [("tcp", sender_address.as_str())])
        .build()
        .await
        .map_err(|error| format!("building node {receiver_id}: {error}"))?;
    Ok(NodePair::new(sender, receiver, &receiver_id))
}

type Reader = BufReader<OwnedReadHalf>;
type Writer = BufWriter<OwnedWriteHalf>;

/// The baseline: one TCP connection, frames written and read by hand.
struct RawPair {
    client_read: Reader,
    client_write: Writer,
    /// The accepting side; lent to a task for each measurement.
    server: Option<(Reader, Writer)>,
}

impl RawPair {
    async fn start() -> Result<Self, String> {
        let listener =
            TcpListener::bind("127.0.0.1:0").await.map_err(|error| format!("listening: {error}"))?;
        let address = listener.local_addr().map_err(|error| error.to_string())?;
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let client = client.map_err(|error| format!("connecting: {error}"))?;
        let (server, _) = accepted.map_err(|error| format!("accepting: {error}"))?;
        let halves = |stream: TcpStream| -> io::Result<(Reader, Writer)> {
            stream.set_nodelay(true)?;
            let (read, write) = stream.into_split();
            Ok((
                BufReader::with_capacity(IO_BUFFER_BYTES, read),
                BufWriter::with_capacity(IO_BUFFER_BYTES, write),
            ))
        };
        let (client_read, client_write) = halves(client).map_err(|error| error.to_string())?;
        let server = halves(server).map_err(|error| error.to_string())?;
        Ok(Self { client_read, client_write, server: Some(server) })
    }

    fn take_server(&mut self) -> Result<(Reader, Writer), String> {
        self.server.take().ok_or_else(|| "the server side was lost by an earlier failure".to_string())
    }

    async fn throughput(&mut self, count: usize, payload: &[u8]) -> Result<Duration, String> {
        let (mut read, write) = self.take_server()?;
        let expected = payload.len();
        let counter = tokio::spawn(async move {
            for n in 0..count {
                let body =
                    read_frame(&mut read).await.map_err(|error| format!("receiving message {n}: {error}"))?;
                if body.len() != expected {
                    return Err(format!("message {n} has {} bytes, expected {expected}", body.len()));
                }
            }
            Ok((Instant::now(), read))
        });
        let start = Instant::now();
        for n in 0..count {
            write_frame(&mut self.client_write, payload)
                .await
                .map_err(|error| format!("sending message {n}: {error}"))?;
        }
        self.client_write.flush().await.map_err(|error| format!("flushing: {error}"))?;
        let (end, read) = counter.await.map_err(|error| format!("receiving task: {error}"))??;
        self.server = Some((read, write));
        Ok(end - start)
    }

    async fn ping_pong(
        &mut self,
        count: usize,
        payload: &[u8],
        rtts: &mut Vec<Duration>,
    ) -> Result<(), String> {
        let (mut read, mut write) = self.take_server()?;
        let echo = tokio::spawn(async move {
            for n in 0..count {
                let ping =
                    read_frame(&mut read).await.map_err(|error| format!("receiving ping {n}: {error}"))?;
                write_frame(&mut write, &ping).await.map_err(|error| format!("sending pong {n}: {error}"))?;
                write.flush().await.map_err(|error| format!("sending pong {n}: {error}"))?;
            }
            Ok::<_, String>((read, write))
        });
        for n in 0..count {
            let start = Instant::now();
            write_frame(&mut self.client_write, payload)
                .await
                .map_err(|error| format!("sending ping {n}: {error}"))?;
            self.client_write.flush().await.map_err(|error| format!("sending ping {n}: {error}"))?;
            let pong = read_frame(&mut self.client_read)
                .await
                .map_err(|error| format!("receiving pong {n}: {error}"))?;
            rtts.push(start.elapsed());
            if pong.len() != payload.len() {
                return Err(format!("pong {n} has {} bytes, expected {}", pong.len(), payload.len()));
            }
        }
        self.server = Some(echo.await.map_err(|error| format!("echo task: {error}"))??);
        Ok(())
    }
}

async fn write_frame(writer: &mut Writer, body: &[u8]) -> io::Result<()> {
    let length = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
    writer.write_all(&length.to_be_bytes()).await?;
    writer.write_all(body).await
}

async fn read_frame(reader: &mut Reader) -> io::Result<Vec<u8>> {
    let length = reader.read_u32().await?;
    if length > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {length} bytes is too large"),
        ));
    }
    let mut body = vec![0; length as usize];
    reader.read_exact(&mut body).await?;
    Ok(body)
}

/// libzmq: PUSH/PULL and REQ/REP socket pairs over loopback TCP. The sockets are lent to
/// blocking threads for each measurement.
struct ZmqPair {
    _context: zmq::Context,
    // In mutexes only so that the pair can be shared like the other harnesses (a libzmq socket
    // may move between threads, not be shared); never contended.
    push_pull: std::sync::Mutex<Option<(zmq::Socket, zmq::Socket)>>,
    req_rep: std::sync::Mutex<Option<(zmq::Socket, zmq::Socket)>>,
}

fn zmq_error(what: &str) -> impl Fn(zmq::Error) -> String + '_ {
    move |error| format!("libzmq, {what}: {error}")
}

impl ZmqPair {
    fn start() -> Result<Self, String> {
        let context = zmq::Context::new();
        let connected = |server: zmq::SocketType, client: zmq::SocketType| -> Result<_, String> {
            let bound = context.socket(server).map_err(zmq_error("socket"))?;
            bound.bind("tcp://127.0.0.1:*").map_err(zmq_error("bind"))?;
            let endpoint = bound
                .get_last_endpoint()
                .map_err(zmq_error("endpoint"))?
                .map_err(|_| "libzmq: endpoint is not UTF-8".to_string())?;
            let connecting = context.socket(client).map_err(zmq_error("socket"))?;
            connecting.connect(&endpoint).map_err(zmq_error("connect"))?;
            Ok((connecting, bound))
        };
        let push_pull = connected(zmq::PULL, zmq::PUSH)?;
        let req_rep = connected(zmq::REP, zmq::REQ)?;
        Ok(Self {
            _context: context,
            push_pull: std::sync::Mutex::new(Some(push_pull)),
            req_rep: std::sync::Mutex::new(Some(req_rep)),
        })
    }

    async fn throughput(&mut self, count: usize, payload: &[u8]) -> Result<Duration, String> {
        let taken = self.push_pull.lock().map_err(|_| "libzmq sockets poisoned")?.take();
        let (push, pull) = taken.ok_or("libzmq sockets lost by an earlier failure")?;
        let expected = payload.len();
        let counter = tokio::task::spawn_blocking(move || {
            for n in 0..count {
                let body = pull.recv_bytes(0).map_err(zmq_error("receiving"))?;
                if body.len() != expected {
                    return Err(format!("message {n} has {} bytes, expected {expected}", body.len()));
                }
            }
            Ok((Instant::now(), pull))
        });
        let payload = payload.to_vec();
        let sender = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            for _ in 0..count {
                push.send(&payload[..], 0).map_err(zmq_error("sending"))?;
            }
            Ok::<_, String>((start, push))
        });
        let (start, push) = sender.await.map_err(|error| format!("libzmq sender: {error}"))??;
        let (end, pull) = counter.await.map_err(|error| format!("libzmq receiver: {error}"))??;
        *self.push_pull.lock().map_err(|_| "libzmq sockets poisoned")? = Some((push, pull));
        Ok(end - start)
    }

    async fn ping_pong(
        &mut self,
        count: usize,
        payload: &[u8],
        rtts: &mut Vec<Duration>,
    ) -> Result<(), String> {
        let taken = self.req_rep.lock().map_err(|_| "libzmq sockets poisoned")?.take();
        let (req, rep) = taken.ok_or("libzmq sockets lost by an earlier failure")?;
        let echo = tokio::task::spawn_blocking(move || {
            for _ in 0..count {
                let ping = rep.recv_bytes(0).map_err(zmq_error("receiving a ping"))?;
                rep.send(ping, 0).map_err(zmq_error("sending a pong"))?;
            }
            Ok::<_, String>(rep)
        });
        let payload = payload.to_vec();
        let pinger = tokio::task::spawn_blocking(move || {
            let mut times = Vec::with_capacity(count);
            for n in 0..count {
                let start = Instant::now();
                req.send(&payload[..], 0).map_err(zmq_error("sending a ping"))?;
                let pong = req.recv_bytes(0).map_err(zmq_error("receiving a pong"))?;
                times.push(start.elapsed());
                if pong.len() != payload.len() {
                    return Err(format!("pong {n} has {} bytes, expected {}", pong.len(), payload.len()));
                }
            }
            Ok((times, req))
        });
        let (times, req) = pinger.await.map_err(|error| format!("libzmq pinger: {error}"))??;
        let rep = echo.await.map_err(|error| format!("libzmq echo: {error}"))??;
        rtts.extend(times);
        *self.req_rep.lock().map_err(|_| "libzmq sockets poisoned")? = Some((req, rep));
        Ok(())
    }
}

/// One column of the comparison.
enum Harness {
    /// Two nodes: single awaited sends (`None`) or `send_raw_many` batches of that many.
    Comms(NodePair, Option<usize>),
    Raw(RawPair),
    Zmq(ZmqPair),
    /// Transports without a node: single sends (`None`) or batches of that many.
    Transport(TransportPair, Option<usize>),
}

impl Harness {
    async fn throughput(&mut self, count: usize, payload: &[u8]) -> Result<Duration, String> {
        match self {
            Self::Comms(pair, None) => pair.throughput(count, payload).await,
            Self::Comms(pair, Some(batch)) => pair.throughput_batched(count, payload, *batch).await,
            Self::Raw(pair) => pair.throughput(count, payload).await,
            Self::Zmq(pair) => pair.throughput(count, payload).await,
            Self::Transport(pair, batch) => pair.throughput(count, payload, *batch).await,
        }
    }

    /// Whether round trips are measured (not for batched sends: a batch of one is a send).
    fn pings(&self) -> bool {
        !matches!(self, Self::Transport(_, Some(_)) | Self::Comms(_, Some(_)))
    }

    async fn ping_pong(
        &mut self,
        count: usize,
        payload: &[u8],
        rtts: &mut Vec<Duration>,
    ) -> Result<(), String> {
        match self {
            Self::Comms(pair, None) => pair.ping_pong(count, payload, rtts).await,
            Self::Raw(pair) => pair.ping_pong(count, payload, rtts).await,
            Self::Zmq(pair) => pair.ping_pong(count, payload, rtts).await,
            Self::Transport(pair, None) => pair.ping_pong(count, payload, rtts).await,
            Self::Transport(_, Some(_)) | Self::Comms(_, Some(_)) => Ok(()),
        }
    }

    async fn close(&self) -> Result<(), String> {
        match self {
            Self::Comms(pair, _) => pair.close().await,
            Self::Raw(_) | Self::Zmq(_) => Ok(()),
            Self::Transport(pair, _) => pair.close().await,
        }
    }
}

struct Variant {
    label: &'static str,
    harness: Harness,
}

/// One line of the table.
#[derive(Debug)]
struct Row {
    variant: &'static str,
    payload: usize,
    messages_per_second: f64,
    megabytes_per_second: f64,
    p50_micros: f64,
    p99_micros: f64,
    /// Slowest and fastest throughput round, in messages per second.
    round_range: (f64, f64),
}

async fn run(
    settings: Settings,
    dynamic: PluginLibrary,
) -> Result<(Vec<Row>, BTreeMap<String, usize>), String> {
    let limit = settings.step_limit;
    let linked = PluginLibrary::linked::<comms_tcp::TcpPlugin>();
    let listen = r#"listen = "127.0.0.1:0""#;
    let single =
        step("starting variant d", limit, TransportPair::start(&dynamic, "tcp", listen, listen)).await?;
    let batched =
        step("starting variant e", limit, TransportPair::start(&dynamic, "tcp", listen, listen)).await?;
    let mut variants = vec![
        Variant {
            label: "a: comms, loaded .so",
            harness: Harness::Comms(
                step("starting variant a", limit, start_comms_pair("loaded", dynamic.clone())).await?,
                None,
            ),
        },
        Variant {
            label: "b: comms, linked",
            harness: Harness::Comms(
                step("starting variant b", limit, start_comms_pair("linked", linked)).await?,
                None,
            ),
        },
        Variant {
            label: "c: raw tokio",
            harness: Harness::Raw(step("starting variant c", limit, RawPair::start()).await?),
        },
        Variant { label: "d: transport, send", harness: Harness::Transport(single, None) },
        Variant { label: "e: transport, batch", harness: Harness::Transport(batched, Some(BATCH)) },
        Variant {
            label: "f: comms, send_many",
            harness: Harness::Comms(
                step("starting variant f", limit, start_comms_pair("batched", dynamic)).await?,
                Some(BATCH),
            ),
        },
        Variant { label: "z: libzmq", harness: Harness::Zmq(ZmqPair::start()?) },
    ];
    // COMMS_BENCH_ONLY=af: only the variants whose letters are listed (for a profile of one).
    if let Ok(only) = std::env::var("COMMS_BENCH_ONLY") {
        variants.retain(|variant| only.contains(&variant.label[..1]));
    }
    let threads = comms_tests::threads::by_name();
    let mut rows = Vec::new();
    for &size in &settings.sizes {
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let count = settings.throughput_messages(size);
        for variant in &mut variants {
            eprintln!("warming up {} with {size} B payloads", variant.label);
            let what = format!("{}, {size} B: throughput warm-up", variant.label);
            step(&what, limit, variant.harness.throughput(settings.throughput_warm_up(size), &payload))
                .await?;
            if !variant.harness.pings() {
                continue;
            }
            let what = format!("{}, {size} B: ping-pong warm-up", variant.label);
            let mut ignored = Vec::new();
            step(
                &what,
                limit,
                variant.harness.ping_pong(settings.ping_pong_warm_up(), &payload, &mut ignored),
            )
            .await?;
        }
        let mut durations = vec![Vec::new(); variants.len()];
        let mut rtts = vec![Vec::new(); variants.len()];
        for round in 0..ROUNDS {
            eprintln!("{size} B payloads: round {} of {ROUNDS}", round + 1);
            for (i, variant) in variants.iter_mut().enumerate() {
                let what = format!("{}, {size} B: throughput round {}", variant.label, round + 1);
                durations[i].push(step(&what, limit, variant.harness.throughput(count, &payload)).await?);
            }
            for (i, variant) in variants.iter_mut().enumerate().filter(|(_, variant)| variant.harness.pings())
            {
                let what = format!("{}, {size} B: ping-pong round {}", variant.label, round + 1);
                let pings = settings.ping_pongs_in_round(round);
                step(&what, limit, variant.harness.ping_pong(pings, &payload, &mut rtts[i])).await?;
            }
        }
        for (i, variant) in variants.iter().enumerate() {
            durations[i].sort();
            rtts[i].sort();
            let median = durations[i][durations[i].len() / 2].as_secs_f64();
            let messages_per_second = count as f64 / median;
            rows.push(Row {
                variant: variant.label,
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
    // By `&mut`: a libzmq socket may move between threads but not be shared.
    for variant in &mut variants {
        step(&format!("closing {}", variant.label), limit, variant.harness.close()).await?;
    }
    Ok((rows, threads))
}

fn print_report(settings: &Settings, rows: &[Row], threads: &BTreeMap<String, usize>) {
    println!();
    println!(
        "TCP over loopback; throughput: median of {ROUNDS} rounds of {} (64 B) / {} (1 KiB) / {} (64 KiB) \
         messages; latency: {} ping-pongs; e sends batches of {BATCH} (COMMS_BENCH_SCALE={})",
        settings.throughput_messages(64),
        settings.throughput_messages(1024),
        settings.throughput_messages(64 * 1024),
        settings.ping_pongs,
        settings.scale
    );
    println!();
    println!(
        "| {:<22} | {:>7} | {:>11} | {:>8} | {:>8} | {:>8} |",
        "variant", "payload", "msg/s", "MB/s", "p50 µs", "p99 µs"
    );
    println!("|{:-<24}|{:->9}|{:->13}|{:->10}|{:->10}|{:->10}|", "", "", "", "", "", "");
    for row in rows {
        println!(
            "| {:<22} | {:>7} | {:>11.0} | {:>8.1} | {:>8} | {:>8} |",
            row.variant,
            size_label(row.payload),
            row.messages_per_second,
            row.megabytes_per_second,
            micros(row.p50_micros),
            micros(row.p99_micros)
        );
    }
    println!();
    let rate = |prefix: &str, size: usize| {
        rows.iter()
            .find(|row| row.payload == size && row.variant.starts_with(prefix))
            .map_or(f64::NAN, |row| row.messages_per_second)
    };
    // A ratio with a variant left out (COMMS_BENCH_ONLY) is NaN: neither met nor missed.
    let verdict = |ratio: f64, aim: f64| match ratio {
        ratio if ratio.is_nan() => "not measured",
        ratio if ratio >= aim => "met",
        _ => "not met",
    };
    for &size in &settings.sizes {
        let (a, b, c) = (rate("a:", size), rate("b:", size), rate("c:", size));
        let (d, e, f, z) = (rate("d:", size), rate("e:", size), rate("f:", size), rate("z:", size));
        println!(
            "{:>7} throughput: f/z = {:.3}, a/z = {:.3} (libzmq; aim f >= 1.0 at 64 B and 1 KiB); \
             f/c = {:.3}, a/c = {:.3} (raw tokio; aim >= 0.8 at 64 KiB); a/b = {:.3} (aim >= 0.95: {}); \
             d/c = {:.3}, e/c = {:.3}, e/d = {:.2}",
            size_label(size),
            f / z,
            a / z,
            f / c,
            a / c,
            a / b,
            verdict(a / b, 0.95),
            d / c,
            e / c,
            e / d
        );
    }
    let p50 = |prefix: &str, size: usize| {
        rows.iter()
            .find(|row| row.payload == size && row.variant.starts_with(prefix))
            .map_or(f64::NAN, |row| row.p50_micros)
    };
    for &size in &settings.sizes {
        let (a, c, z) = (p50("a:", size), p50("c:", size), p50("z:", size));
        println!(
            "{:>7} round trip p50: a/c = {:.2} (aim <= 2: {}), a/z = {:.2} (aim <= 1: {})",
            size_label(size),
            a / c,
            verdict(2.0 / (a / c), 1.0),
            a / z,
            verdict(1.0 / (a / z), 1.0)
        );
    }
    println!();
    println!(
        "threads in this process with every variant running: {}",
        comms_tests::threads::describe(threads)
    );
    println!("threads with every in-tree plugin loaded (another process): {}", every_plugin_threads());
    println!();
    println!("throughput spread between rounds (slowest .. fastest msg/s):");
    for row in rows {
        let (slowest, fastest) = row.round_range;
        println!("  {:<22} {:>7}: {slowest:>11.0} .. {fastest:.0}", row.variant, size_label(row.payload));
    }
}

/// A latency for the table; "-" where none was measured.
fn micros(value: f64) -> String {
    match value.is_nan() {
        true => "-".to_string(),
        false => format!("{value:.1}"),
    }
}

/// "64 B", "1 KiB", "64 KiB".
fn size_label(bytes: usize) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        _ => format!("{} KiB", bytes / 1024),
    }
}

/// Set in the child process that measures [`every_plugin_threads`].
const EVERY_PLUGIN_CHILD: &str = "COMMS_BENCH_EVERY_PLUGIN_CHILD";

/// The threads of a fresh process (this program, run again) with two nodes that load every
/// in-tree plugin library (`comms_tests::every_plugin`), or why they were not measured.
fn every_plugin_threads() -> String {
    let child = std::process::Command::new(std::env::current_exe().unwrap_or_default())
        .env(EVERY_PLUGIN_CHILD, "1")
        .stderr(std::process::Stdio::inherit())
        .output();
    match child {
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_string(),
        Err(error) => format!("not measured: cannot run this program again: {error}"),
    }
}

/// The child's part: start the nodes, print one line, stop. The plugins' runtimes are started
/// by the nodes' first use of them, so the count is taken with the nodes running.
fn every_plugin_child() {
    let redis = comms_tests::REDIS;
    let brokers = [redis, "127.0.0.1:5672"];
    if let Some(down) = brokers.iter().find(|address| std::net::TcpStream::connect(address).is_err()) {
        println!("not measured: no broker at {down} (Redis and RabbitMQ are needed)");
        return;
    }
    let line = comms_tests::bench::run_on_two_workers("tcp_throughput", async {
        let before = comms_tests::threads::by_name();
        let everything = comms_tests::every_plugin::EveryPlugin::start("bench-threads").await?;
        // Opening SQLite and RabbitMQ connections runs on blocking threads, which end after
        // 10 s idle (tokio's keep-alive): counted once they have, as a running node has them.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let started = comms_tests::threads::plugin_threads_started(&before);
        let in_process: usize = comms_tests::threads::by_name().values().sum();
        everything.close().await?;
        Ok(format!(
            "{} started by two nodes; {in_process} in that process",
            comms_tests::threads::describe(&started)
        ))
    });
    println!("{line}");
}

fn main() {
    if std::env::var_os(EVERY_PLUGIN_CHILD).is_some() {
        return every_plugin_child();
    }
    let settings = Settings::from_env();
    let tcp_plugin = match std::env::var_os("COMMS_BENCH_TCP_PLUGIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => {
            eprintln!("building the plugin libraries (comms_tests::artifacts)...");
            comms_tests::artifacts().tcp_plugin.clone()
        }
    };
    let plugin_threads = comms_tests::bench::plugin_threads("tcp_throughput");
    let dynamic = PluginLibrary::load_with_threads(&tcp_plugin, plugin_threads)
        .unwrap_or_else(|error| fail(&format!("loading {}: {error}", tcp_plugin.display())));
    let started = Instant::now();
    let (rows, threads) =
        comms_tests::bench::run_on_two_workers("tcp_throughput", run(settings.clone(), dynamic));
    print_report(&settings, &rows, &threads);
    println!();
    println!("measured in {:.1} s", started.elapsed().as_secs_f64());
}

/// Ends the benchmark with a message, without waiting for tasks that may be stuck.
fn fail(message: &str) -> ! {
    comms_tests::bench::fail("tcp_throughput", message)
}
