//! Two stream transports over TCP in one process: what a receiver's graceful close keeps.

use super::{Acceptor, StreamMedium, StreamSettings, StreamTransport};
use crate::{Destination, Envelope, MessageId, NodeId, UNDELIVERED_COUNTER};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

const LIMIT: Duration = Duration::from_secs(10);

/// Dials plain TCP (the TCP backend, without its host-driven sockets).
struct Tcp;

impl StreamMedium for Tcp {
    type Stream = TcpStream;

    async fn connect(&self, address: &str) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

struct Listener(TcpListener);

impl Acceptor for Listener {
    type Stream = TcpStream;

    async fn accept(&mut self) -> std::io::Result<(TcpStream, String)> {
        let (stream, peer) = self.0.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer.to_string()))
    }
}

/// A transport of node `node` listening on `listen`, with the default settings.
async fn start(node: &str, listen: &str) -> Arc<StreamTransport<Tcp>> {
    start_with(node, listen, StreamSettings::default()).await
}

async fn start_with(node: &str, listen: &str, settings: StreamSettings) -> Arc<StreamTransport<Tcp>> {
    let listener = TcpListener::bind(listen).await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let transport =
        StreamTransport::start("tcp", NodeId::new(node), settings, None, Tcp, Listener(listener), address);
    Arc::new(transport.unwrap())
}

fn envelope(n: u128) -> Envelope {
    Envelope::new(MessageId::from_u128(n), "a", Destination::node("b"), vec![n as u8; 100])
}

/// Receives from `transport` until it ends (closed, every connection drained), counting each
/// message in `received`; the ids received, in order.
fn drain(transport: &Arc<StreamTransport<Tcp>>, received: &Arc<AtomicUsize>) -> JoinHandle<Vec<u128>> {
    let (transport, received) = (Arc::clone(transport), Arc::clone(received));
    tokio::spawn(async move {
        let mut ids = Vec::new();
        loop {
            let batch = transport.receive(1000).await.unwrap();
            if batch.is_empty() {
                return ids;
            }
            received.fetch_add(batch.len(), Relaxed);
            ids.extend(batch.into_iter().map(|inbound| inbound.envelope.id.as_u128()));
        }
    })
}

/// Polls `done` until it holds (the transports' tasks make progress on their own).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn counter(transport: &StreamTransport<Tcp>, name: &str) -> Option<u64> {
    transport.stats().counters.into_iter().find(|(n, _)| n == name).map(|(_, value)| value)
}

/// Hot swap of the receiving transport under load: `a` streams numbered messages to address X;
/// after `b` received some thousands it closes (while its messages are still received), and a
/// new transport `b2` takes over X. Every number arrives at `b` or `b2` (a batch written again
/// after a reconnect may arrive twice), and `a` reports no failure. Several switch points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_closing_under_load_loses_nothing_its_peer_wrote() {
    const MESSAGES: u128 = 20_000;
    for switch_at in [2_000, 5_000, 8_000, 11_000, 14_000] {
        let a = start("a", "127.0.0.1:0").await;
        let b = start("b", "127.0.0.1:0").await;
        let to = b.local_address.clone();
        let sending = {
            let (a, to) = (Arc::clone(&a), to.clone());
            tokio::spawn(async move {
                for n in 0..MESSAGES {
                    a.send(&to, envelope(n)).await?;
                }
                Ok::<_, crate::PluginError>(())
            })
        };
        let received = Arc::new(AtomicUsize::new(0));
        let at_b = drain(&b, &received);
        eventually("b receives its share", || received.load(Relaxed) >= switch_at).await;
        // Its receive loop keeps running while close drains the connection.
        tokio::time::timeout(LIMIT, b.close()).await.expect("b closes in time").unwrap();
        let at_b = tokio::time::timeout(LIMIT, at_b).await.expect("b's receive ends").unwrap();

        // The same address, served by a new transport (a newer build of the plugin).
        let b2 = start("b2", &to).await;
        let at_b2 = drain(&b2, &received);
        tokio::time::timeout(LIMIT, sending).await.expect("a sends in time").unwrap().unwrap();
        eventually("a writes everything", || a.stats().send_queue_depth == 0).await;
        // b2's graceful close drains what a wrote.
        tokio::time::timeout(LIMIT, b2.close()).await.expect("b2 closes in time").unwrap();
        let at_b2 = tokio::time::timeout(LIMIT, at_b2).await.expect("b2's receive ends").unwrap();

        let mut copies = vec![0u32; MESSAGES as usize];
        for &id in at_b.iter().chain(&at_b2) {
            copies[id as usize] += 1;
        }
        let lost: Vec<usize> = (0..copies.len()).filter(|&n| copies[n] == 0).collect();
        let duplicates: u32 = copies.iter().map(|&c| c.saturating_sub(1)).sum();
        eprintln!(
            "switch at {switch_at}: b received {}, b2 {}; lost {}, duplicates {duplicates}",
            at_b.len(),
            at_b2.len(),
            lost.len()
        );
        assert!(lost.is_empty(), "switch at {switch_at}: {} lost, the first {:?}", lost.len(), lost.first());
        assert_eq!(counter(&a, UNDELIVERED_COUNTER), Some(0));
        assert_eq!(counter(&a, "tcp.messages.dropped"), Some(0));
        a.close().await.unwrap();
    }
}

/// The drain is bounded: a receiver whose host stops taking messages (its receive queue full,
/// the sender still writing) cuts the connection at `close_timeout_ms`, hands over what it
/// buffered, and its receive ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_nobody_receives_is_cut_at_close_timeout() {
    let settings = StreamSettings { close_timeout_ms: 300, receive_queue_capacity: 64, ..Default::default() };
    let b = start_with("b", "127.0.0.1:0", settings).await;
    let a = start("a", "127.0.0.1:0").await;
    let to = b.local_address.clone();
    let sending = {
        let (a, to) = (Arc::clone(&a), to.clone());
        tokio::spawn(async move {
            for n in 0..1_000_000 {
                if a.send(&to, envelope(n)).await.is_err() {
                    return;
                }
            }
        })
    };
    eventually("b's receive queue fills", || b.stats().receive_queue_depth == 64).await;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(LIMIT, b.close()).await.expect("close is bounded").unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "close took {took:?}");
    let mut buffered = 0;
    loop {
        let batch = tokio::time::timeout(LIMIT, b.receive(1000)).await.expect("receive ends").unwrap();
        if batch.is_empty() {
            break;
        }
        buffered += batch.len();
    }
    assert!(buffered >= 64, "what was buffered is handed over: {buffered}");
    sending.abort();
    let _ = a.close().await;
}

/// A peer that never stops sending: every read of its stream is ready at once with whole
/// envelope frames (after its hello), until the test stops it (or, should the test not, after
/// [`Flood::LASTS`]), when it ends. What the transport writes back is watched for the GOODBYE.
struct Flood {
    /// Whole frames, served again and again from `offset`.
    frames: Vec<u8>,
    offset: usize,
    /// The hello, what is left of it.
    hello: Vec<u8>,
    ends_at: std::time::Instant,
    seen: Arc<FloodSeen>,
}

#[derive(Default)]
struct FloodSeen {
    /// When the transport wrote a GOODBYE while the flood still ran.
    goodbye: std::sync::Mutex<Option<std::time::Instant>>,
    /// The test has seen what it waited for: the flood ends.
    stopped: std::sync::atomic::AtomicBool,
}

impl Flood {
    /// Longer than the test waits for anything ([`LIMIT`]).
    const LASTS: Duration = Duration::from_secs(60);

    fn flooding(&self) -> bool {
        !self.seen.stopped.load(Relaxed) && std::time::Instant::now() < self.ends_at
    }

    fn new(seen: Arc<FloodSeen>) -> Self {
        let mut frames = Vec::new();
        for n in 0..1000 {
            super::protocol::append_envelope_frame(&envelope(n), &mut frames).unwrap();
        }
        Self {
            frames,
            offset: 0,
            hello: super::protocol::hello_frame(&NodeId::new("a")),
            ends_at: std::time::Instant::now() + Self::LASTS,
            seen,
        }
    }
}

impl tokio::io::AsyncRead for Flood {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.hello.is_empty() {
            let n = self.hello.len().min(buf.remaining());
            buf.put_slice(&self.hello[..n]);
            self.hello.drain(..n);
        } else if self.flooding() {
            let this = &mut *self;
            let part = &this.frames[this.offset..];
            let n = part.len().min(buf.remaining());
            buf.put_slice(&part[..n]);
            this.offset = (this.offset + n) % this.frames.len();
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Flood {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // The GOODBYE alone or in one write with other frames.
        let goodbye = super::protocol::goodbye_frame();
        if self.flooding() && buf.windows(goodbye.len()).any(|window| window == goodbye) {
            let now = std::time::Instant::now();
            self.seen.goodbye.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_or_insert(now);
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Hands out one [`Flood`], then waits for ever.
struct FloodAcceptor(Option<Flood>);

impl Acceptor for FloodAcceptor {
    type Stream = Flood;

    async fn accept(&mut self) -> std::io::Result<(Flood, String)> {
        match self.0.take() {
            Some(flood) => Ok((flood, "flood".to_string())),
            None => std::future::pending().await,
        }
    }
}

/// A close reaches a connection whose peer never stops sending (its bytes are always there, so
/// the read never waits): the peer is told goodbye while it still sends, and the connection
/// ends at the close deadline (300 ms) while the flood goes on (until the test stops it). The
/// reader polls the waits that end a connection when its read waits, when the receive queue is
/// full, and after 64 reads in a row that did not wait (it yields, then polls them). Without
/// the last, the connection ran until the flood stopped (4.9 s after the close, with a flood of
/// 5 s); the goodbye came from the full queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_stops_sending_is_told_goodbye_and_cut_at_the_close_deadline() {
    let seen = Arc::new(FloodSeen::default());
    let settings = StreamSettings {
        receive_queue_capacity: 1 << 16,
        close_timeout_ms: 300,
        ..StreamSettings::default()
    };
    let acceptor = FloodAcceptor(Some(Flood::new(Arc::clone(&seen))));
    let transport =
        StreamTransport::start("tcp", NodeId::new("b"), settings, None, Tcp, acceptor, "flood".to_string());
    let transport = Arc::new(transport.unwrap());
    let received = Arc::new(AtomicUsize::new(0));
    let drained = drain(&transport, &received);
    eventually("the flood arrives", || received.load(Relaxed) > 0).await;
    let closing = std::time::Instant::now();
    let _ = tokio::time::timeout(LIMIT, transport.close()).await.expect("close ends");
    let goodbye = *seen.goodbye.lock().unwrap();
    let goodbye = goodbye.expect("the flooding peer was told goodbye while it still sent");
    let after = goodbye.saturating_duration_since(closing);
    assert!(after < Duration::from_secs(1), "the goodbye came {after:?} after the close began");
    tokio::time::timeout(LIMIT, drained)
        .await
        .expect("receiving ends after the close, while the peer still sends")
        .unwrap();
    seen.stopped.store(true, Relaxed);
}
