//! Datagrams for the discovery plugins, over UDP (the default) or over TCP where UDP does not
//! pass (a network that filters it, a cloud without it between zones).
//!
//! The gossip and Kademlia discoveries are sans-IO state machines fed with `(address, datagram)`
//! pairs; [`DatagramCarrier`] is the socket around them, with the calls of a tokio `UdpSocket`
//! (`send_to`, `recv_from`, `try_recv_from`), so that their drivers do not care which one runs.
//!
//! ## Over TCP ([`Carrier::Tcp`])
//!
//! - The carrier listens on its address. `send_to` hands the datagram to a writer task of the
//!   destination (one connection per destination, opened on first use): it never waits for a
//!   connection, as a UDP send does not.
//! - A connection starts with a hello: the sender's reply address ([`DatagramCarrier::set_reply_address`],
//!   e.g. the advertised one), which is what `recv_from` reports as the sender of every datagram
//!   on it (the connection's own source port is an ephemeral one nobody listens on; an
//!   unspecified IP in it is replaced by the connection's). Like a UDP source address it is not
//!   authenticated; the authenticated discoveries check signatures.
//! - Then frames: `u32` big-endian length, the datagram. A frame over `max_datagram`, a bad
//!   hello, or nothing for [`IDLE_TIMEOUT`] closes the connection.
//! - Datagram semantics are kept: a datagram is lost (never retried) when the destination's
//!   queue of [`QUEUE_PER_PEER`] is full, when connecting fails (within [`CONNECT_TIMEOUT`]) or
//!   the connection breaks, and when the receive queue of [`RECEIVE_QUEUE`] is full; the next
//!   datagram to a destination whose writer ended opens a new connection. The protocols above
//!   already retry what they need.
//! - Bounds: [`MAX_PEERS`] destinations with writers and [`MAX_PEERS`] incoming connections at
//!   once (over it, a new destination's datagram is dropped and a new incoming connection
//!   closed); one frame buffer of at most `max_datagram` per connection.
//!
//! Dropping the carrier stops its listener, readers and writers.

use serde::Deserialize;
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, watch},
};

/// Datagrams waiting to be written to one destination over TCP.
pub const QUEUE_PER_PEER: usize = 256;
/// Datagrams received over TCP and not taken yet.
pub const RECEIVE_QUEUE: usize = 4096;
/// Destinations with a writer, and incoming connections, each at most.
pub const MAX_PEERS: usize = 1024;
/// How long a TCP connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A TCP connection without a datagram for this long is closed (either side).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Which socket a discovery's datagrams go through (`carrier = "udp"` or `"tcp"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    /// One UDP socket.
    #[default]
    Udp,
    /// A TCP listener and one connection per destination (see the module docs).
    Tcp,
}

impl std::fmt::Display for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Carrier::Udp => "udp",
            Carrier::Tcp => "tcp",
        })
    }
}

/// A socket for datagrams: UDP, or datagrams framed over TCP connections.
#[derive(Debug)]
pub struct DatagramCarrier {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Udp(UdpSocket),
    Tcp(Arc<TcpShared>),
}

#[derive(Debug)]
struct TcpShared {
    local: SocketAddr,
    max_datagram: usize,
    reply_address: OnceLock<SocketAddr>,
    writers: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    incoming: AtomicUsize,
    received: tokio::sync::Mutex<mpsc::Receiver<(SocketAddr, Vec<u8>)>>,
    shutdown: watch::Sender<bool>,
}

impl DatagramCarrier {
    /// Binds `address` with `carrier`; over TCP, datagrams longer than `max_datagram` are
    /// refused. Must run inside a tokio runtime.
    pub async fn bind(carrier: Carrier, address: SocketAddr, max_datagram: usize) -> io::Result<Self> {
        let inner = match carrier {
            Carrier::Udp => Inner::Udp(UdpSocket::bind(address).await?),
            Carrier::Tcp => {
                let listener = TcpListener::bind(address).await?;
                let (deliver, received) = mpsc::channel(RECEIVE_QUEUE);
                let shared = Arc::new(TcpShared {
                    local: listener.local_addr()?,
                    max_datagram,
                    reply_address: OnceLock::new(),
                    writers: Mutex::new(HashMap::new()),
                    incoming: AtomicUsize::new(0),
                    received: tokio::sync::Mutex::new(received),
                    shutdown: watch::channel(false).0,
                });
                tokio::spawn(accept_loop(listener, Arc::clone(&shared), deliver));
                Inner::Tcp(shared)
            }
        };
        Ok(Self { inner })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            Inner::Udp(socket) => socket.local_addr(),
            Inner::Tcp(shared) => Ok(shared.local),
        }
    }

    /// Over TCP: the address this carrier's connections tell their receivers to reply to (the
    /// advertised one); default the bound address. Set once; later calls change nothing. Over
    /// UDP the source address of the socket is the reply address.
    pub fn set_reply_address(&self, address: SocketAddr) {
        if let Inner::Tcp(shared) = &self.inner {
            let _ = shared.reply_address.set(address);
        }
    }

    /// Sends `datagram` to `to`. Over TCP it is queued for the destination's connection and
    /// `Ok` means queued, not written (as a UDP send means handed to the kernel).
    pub async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        match &self.inner {
            Inner::Udp(socket) => socket.send_to(datagram, to).await.map(drop),
            Inner::Tcp(shared) => shared.queue(datagram, to),
        }
    }

    /// Waits for the next datagram; copies it into `buffer` (truncated to its length, as UDP
    /// does) and returns its length and its sender's reply address.
    pub async fn recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match &self.inner {
            Inner::Udp(socket) => socket.recv_from(buffer).await,
            Inner::Tcp(shared) => {
                let next = shared.received.lock().await.recv().await;
                let (from, datagram) = next.ok_or_else(|| io::Error::other("the carrier is closed"))?;
                Ok((copy_into(buffer, &datagram), from))
            }
        }
    }

    /// A datagram already waiting, or `WouldBlock`.
    pub fn try_recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match &self.inner {
            Inner::Udp(socket) => socket.try_recv_from(buffer),
            Inner::Tcp(shared) => {
                let would_block = || io::Error::from(io::ErrorKind::WouldBlock);
                let mut received = shared.received.try_lock().map_err(|_| would_block())?;
                let (from, datagram) = received.try_recv().map_err(|_| would_block())?;
                Ok((copy_into(buffer, &datagram), from))
            }
        }
    }
}

impl Drop for DatagramCarrier {
    fn drop(&mut self) {
        if let Inner::Tcp(shared) = &self.inner {
            shared.shutdown.send_replace(true);
            // Writers end once their queues are dropped.
            shared.writers.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
        }
    }
}

fn copy_into(buffer: &mut [u8], datagram: &[u8]) -> usize {
    let n = datagram.len().min(buffer.len());
    buffer[..n].copy_from_slice(&datagram[..n]);
    n
}

impl TcpShared {
    fn queue(self: &Arc<Self>, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        if datagram.len() > self.max_datagram {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a datagram of {} bytes is over max_datagram {}", datagram.len(), self.max_datagram),
            ));
        }
        let mut writers = self.writers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let queue = match writers.get(&to) {
            Some(queue) if !queue.is_closed() => queue.clone(),
            _ => {
                writers.retain(|_, queue| !queue.is_closed());
                if writers.len() >= MAX_PEERS {
                    return Err(io::Error::other(format!(
                        "{MAX_PEERS} destinations have connections already; datagram to {to} dropped"
                    )));
                }
                let (queue, datagrams) = mpsc::channel(QUEUE_PER_PEER);
                writers.insert(to, queue.clone());
                tokio::spawn(write_loop(Arc::clone(self), to, datagrams));
                queue
            }
        };
        // Full: lost, as a UDP datagram the kernel could not buffer.
        let _ = queue.try_send(datagram.to_vec());
        Ok(())
    }

    fn reply_address(&self) -> SocketAddr {
        *self.reply_address.get().unwrap_or(&self.local)
    }
}

/// The hello: the reply address in [`crate::socket_address::encode_binary`]'s form.
fn encode_hello(address: SocketAddr) -> Vec<u8> {
    let mut hello = Vec::with_capacity(19);
    crate::socket_address::encode_binary(&mut hello, address);
    hello
}

async fn read_hello(stream: &mut TcpStream) -> io::Result<SocketAddr> {
    // Family byte first: it says how many bytes the rest of the hello has.
    let mut hello = [0u8; 19];
    hello[0] = stream.read_u8().await?;
    let length = match hello[0] {
        4 => 1 + 4 + 2,
        6 => 1 + 16 + 2,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "not a datagram carrier hello")),
    };
    stream.read_exact(&mut hello[1..length]).await?;
    let (address, _) = crate::socket_address::decode_binary(&hello[..length])
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, format!("bad hello: {error:?}")))?;
    Ok(address)
}

async fn write_loop(shared: Arc<TcpShared>, to: SocketAddr, mut datagrams: mpsc::Receiver<Vec<u8>>) {
    let mut shutdown = shared.shutdown.subscribe();
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await;
    let Ok(Ok(mut stream)) = connected else {
        tracing::debug!("datagram carrier: cannot connect to {to}; its queued datagrams are lost");
        return;
    };
    let _ = stream.set_nodelay(true);
    if stream.write_all(&encode_hello(shared.reply_address())).await.is_err() {
        return;
    }
    let mut frame = Vec::new();
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(IDLE_TIMEOUT, datagrams.recv()) => next,
            _ = shutdown.wait_for(|closing| *closing) => return,
        };
        let Ok(Some(datagram)) = next else { return };
        // What else is queued goes in the same write.
        frame.clear();
        let mut next = Some(datagram);
        while let Some(datagram) = next {
            frame.extend_from_slice(&(datagram.len() as u32).to_be_bytes());
            frame.extend_from_slice(&datagram);
            next = datagrams.try_recv().ok();
        }
        if let Err(error) = stream.write_all(&frame).await {
            tracing::debug!(
                "datagram carrier: writing to {to} failed: {error}; its queued datagrams are lost"
            );
            return;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<TcpShared>,
    deliver: mpsc::Sender<(SocketAddr, Vec<u8>)>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|closing| *closing) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!("datagram carrier: accepting failed: {error}");
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.incoming.fetch_add(1, Ordering::AcqRel) >= MAX_PEERS {
            shared.incoming.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (shared, deliver) = (Arc::clone(&shared), deliver.clone());
        tokio::spawn(async move {
            let mut shutdown = shared.shutdown.subscribe();
            tokio::select! {
                result = read_loop(stream, shared.max_datagram, &deliver) => {
                    if let Err(error) = result {
                        tracing::debug!("datagram carrier: an incoming connection ended: {error}");
                    }
                }
                _ = shutdown.wait_for(|closing| *closing) => {}
            }
            shared.incoming.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn read_loop(
    mut stream: TcpStream,
    max_datagram: usize,
    deliver: &mpsc::Sender<(SocketAddr, Vec<u8>)>,
) -> io::Result<()> {
    let idle = || io::Error::new(io::ErrorKind::TimedOut, "idle");
    let mut from =
        tokio::time::timeout(IDLE_TIMEOUT, read_hello(&mut stream)).await.map_err(|_| idle())??;
    // A sender bound to an unspecified address (`0.0.0.0`) is reached at the address its
    // connection came from, as its UDP datagrams would say.
    if from.ip().is_unspecified() {
        from.set_ip(stream.peer_addr()?.ip());
    }
    loop {
        let length = match tokio::time::timeout(IDLE_TIMEOUT, stream.read_u32()).await {
            Err(_) => return Err(idle()),
            Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(result) => result? as usize,
        };
        if length > max_datagram {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame of {length} bytes from {from} is over max_datagram {max_datagram}"),
            ));
        }
        let mut datagram = vec![0u8; length];
        tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut datagram)).await.map_err(|_| idle())??;
        match deliver.try_send((from, datagram)) {
            // Full: lost, as a UDP datagram the socket buffer could not hold.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn tcp(max: usize) -> DatagramCarrier {
        DatagramCarrier::bind(Carrier::Tcp, "127.0.0.1:0".parse().unwrap(), max).await.unwrap()
    }

    async fn next(carrier: &DatagramCarrier) -> (Vec<u8>, SocketAddr) {
        let mut buffer = [0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), carrier.recv_from(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        (buffer[..n].to_vec(), from)
    }

    #[tokio::test]
    async fn datagrams_cross_tcp_in_order_with_the_reply_address_as_sender() {
        let (a, b) = (tcp(1400).await, tcp(1400).await);
        let advertised: SocketAddr = "127.0.0.1:4999".parse().unwrap();
        a.set_reply_address(advertised);
        for n in 0..100u8 {
            a.send_to(&[n; 300], b.local_addr().unwrap()).await.unwrap();
        }
        for n in 0..100u8 {
            assert_eq!(next(&b).await, (vec![n; 300], advertised));
        }
        // The answer goes back over a connection of b's own, from b's bound address.
        b.send_to(b"pong", a.local_addr().unwrap()).await.unwrap();
        assert_eq!(next(&a).await, (b"pong".to_vec(), b.local_addr().unwrap()));
        let mut buffer = [0u8; 8];
        assert_eq!(a.try_recv_from(&mut buffer).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[tokio::test]
    async fn an_unreachable_destination_does_not_block_and_an_oversized_datagram_is_refused() {
        let a = tcp(100).await;
        // A port nobody listens on: queued at once, lost later.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        tokio::time::timeout(Duration::from_millis(100), a.send_to(b"lost", dead)).await.unwrap().unwrap();
        let error = a.send_to(&[0; 101], dead).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_frame_over_max_datagram_closes_the_connection() {
        let b = tcp(64).await;
        let mut raw = TcpStream::connect(b.local_addr().unwrap()).await.unwrap();
        raw.write_all(&encode_hello("127.0.0.1:1".parse().unwrap())).await.unwrap();
        raw.write_all(&10u32.to_be_bytes()).await.unwrap();
        raw.write_all(b"0123456789").await.unwrap();
        raw.write_all(&65u32.to_be_bytes()).await.unwrap();
        assert_eq!(next(&b).await, (b"0123456789".to_vec(), "127.0.0.1:1".parse().unwrap()));
        // The reader closed the connection: the peer reads the end.
        let mut rest = Vec::new();
        // Ends (EOF or a reset) instead of waiting out the timeout.
        let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        let mut buffer = [0u8; 8];
        assert!(b.try_recv_from(&mut buffer).is_err(), "nothing after the oversized frame is delivered");
    }

    #[tokio::test]
    async fn udp_is_the_default_and_behaves_as_a_socket() {
        assert_eq!(Carrier::default(), Carrier::Udp);
        let a = DatagramCarrier::bind(Carrier::Udp, "127.0.0.1:0".parse().unwrap(), 1400).await.unwrap();
        let b = DatagramCarrier::bind(Carrier::Udp, "127.0.0.1:0".parse().unwrap(), 1400).await.unwrap();
        a.send_to(b"hi", b.local_addr().unwrap()).await.unwrap();
        assert_eq!(next(&b).await, (b"hi".to_vec(), a.local_addr().unwrap()));
    }
}
