//! A loopback relay the suite can put between two instances whose address is `ip:port`: it
//! forwards TCP connections and UDP datagrams on one port number to the receiver's address, can
//! cut the link for a while (the cases `reliable_delivery` and `encrypted_links` use it), and
//! keeps the first bytes that went through towards the receiver (to look for plaintext).
//!
//! It knows nothing of the transport: a transport whose address is `ip:port` of a TCP listener
//! or a UDP socket, and that answers a peer on the connection or at the source address it came
//! from, works through it. Anything else (a unix socket path, a broker queue name, a transport
//! that dials back the address a peer announces) does not, and the cases then say so and skip
//! what needs the relay.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::{AbortHandle, JoinSet},
};

/// Bytes towards the receiver kept for [`Relay::carried`].
const KEPT_BYTES: usize = 4 << 20;

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_536;

/// Tries at finding a port number free for both TCP and UDP.
const BIND_ATTEMPTS: usize = 20;

#[derive(Debug, Default)]
struct Shared {
    down: AtomicBool,
    /// TCP connections in progress, aborted by a cut.
    connections: Mutex<Vec<AbortHandle>>,
    /// The first [`KEPT_BYTES`] that went towards the receiver.
    carried: Mutex<Vec<u8>>,
}

impl Shared {
    fn keep(&self, bytes: &[u8]) {
        let mut carried = self.carried.lock().unwrap_or_else(|p| p.into_inner());
        let room = KEPT_BYTES.saturating_sub(carried.len());
        carried.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub(crate) struct Relay {
    address: SocketAddr,
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl Relay {
    /// Starts relaying `127.0.0.1:<port>` (TCP and UDP) to `target`.
    pub(crate) async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let (listener, socket) = bind_both().await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, target, Arc::clone(&shared)));
        tasks.spawn(datagram_loop(Arc::new(socket), target, Arc::clone(&shared)));
        Ok(Self { address, shared, tasks })
    }

    /// The address to send to instead of the receiver's.
    pub(crate) fn address(&self) -> String {
        self.address.to_string()
    }

    /// Cuts the link: open TCP connections are dropped, new ones are accepted and closed at
    /// once, datagrams are dropped both ways, until [`Relay::restore`].
    pub(crate) fn cut(&self) {
        self.shared.down.store(true, Ordering::Release);
        for connection in
            std::mem::take(&mut *self.shared.connections.lock().unwrap_or_else(|p| p.into_inner()))
        {
            connection.abort();
        }
    }

    /// Ends a [`Relay::cut`].
    pub(crate) fn restore(&self) {
        self.shared.down.store(false, Ordering::Release);
    }

    /// Whether `needle` is among the bytes that went towards the receiver (the first 4 MiB).
    pub(crate) fn carried(&self, needle: &[u8]) -> bool {
        let carried = self.shared.carried.lock().unwrap_or_else(|p| p.into_inner());
        !needle.is_empty() && carried.windows(needle.len()).any(|window| window == needle)
    }

    /// How many bytes went towards the receiver (counted up to 4 MiB).
    pub(crate) fn carried_len(&self) -> usize {
        self.shared.carried.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.tasks.abort_all();
    }
}

/// A TCP listener and a UDP socket on the same loopback port.
async fn bind_both() -> std::io::Result<(TcpListener, UdpSocket)> {
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS {
        let listener = TcpListener::bind(loopback).await?;
        match UdpSocket::bind(listener.local_addr()?).await {
            Ok(socket) => return Ok((listener, socket)),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both TCP and UDP")))
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, most likely: give the others a moment.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        if shared.is_down() {
            drop(client);
            continue;
        }
        let handle = connections.spawn(relay_connection(client, target, Arc::clone(&shared)));
        let mut open = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|connection| !connection.is_finished());
        open.push(handle);
        // Reap finished ones so that the set does not grow with every connection.
        while connections.try_join_next().is_some() {}
    }
}

async fn relay_connection(mut client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let Ok(mut upstream) = TcpStream::connect(target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let towards_receiver = async {
        let mut buffer = vec![0; 64 << 10];
        loop {
            match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    shared.keep(&buffer[..n]);
                    if upstream_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = upstream_write.shutdown().await;
    };
    let towards_sender = async {
        let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    futures::future::join(towards_receiver, towards_sender).await;
}

/// Datagrams from each client go out through a socket of its own, so that the answers can be
/// told apart and sent back to the right client.
async fn datagram_loop(socket: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shared>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut answers = JoinSet::new();
    let mut buffer = vec![0; MAX_DATAGRAM];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buffer).await else { continue };
        if shared.is_down() {
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(upstream) => Arc::clone(upstream),
            None => {
                let any = SocketAddr::new(
                    if target.is_ipv4() {
                        Ipv4Addr::UNSPECIFIED.into()
                    } else {
                        std::net::Ipv6Addr::UNSPECIFIED.into()
                    },
                    0,
                );
                let Ok(upstream) = UdpSocket::bind(any).await else { continue };
                let upstream = Arc::new(upstream);
                answers.spawn(answer_loop(
                    Arc::clone(&upstream),
                    Arc::clone(&socket),
                    client,
                    Arc::clone(&shared),
                ));
                upstreams.insert(client, Arc::clone(&upstream));
                upstream
            }
        };
        shared.keep(&buffer[..n]);
        let _ = upstream.send_to(&buffer[..n], target).await;
    }
}

async fn answer_loop(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut buffer = vec![0; MAX_DATAGRAM];
    loop {
        let Ok(n) = upstream.recv(&mut buffer).await else { continue };
        if !shared.is_down() {
            let _ = socket.send_to(&buffer[..n], client).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn relays_tcp_and_udp_and_cuts_both() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo = UdpSocket::bind(server.local_addr().unwrap()).await;
        let target = server.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = server.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        let relay = Relay::start(target).await.unwrap();

        let mut stream = TcpStream::connect(relay.address()).await.unwrap();
        stream.write_all(b"secret words").await.unwrap();
        let mut back = [0; 12];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"secret words");
        assert!(relay.carried(b"secret"));
        assert!(!relay.carried(b"never sent"));

        if let Ok(echo) = echo {
            tokio::spawn(async move {
                let mut buffer = [0; 100];
                loop {
                    let (n, from) = echo.recv_from(&mut buffer).await.unwrap();
                    echo.send_to(&buffer[..n], from).await.unwrap();
                }
            });
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.send_to(b"datagram", relay.address()).await.unwrap();
            let mut buffer = [0; 100];
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buffer[..n], b"datagram");

            relay.cut();
            client.send_to(b"lost", relay.address()).await.unwrap();
            let lost = tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buffer)).await;
            assert!(lost.is_err(), "nothing crosses a cut relay");
            relay.restore();
        }

        relay.cut();
        let mut buffer = [0; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "the connection was dropped: {read:?}");
        relay.restore();
        let mut again = TcpStream::connect(relay.address()).await.unwrap();
        again.write_all(b"ping").await.unwrap();
        again.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"ping");
    }
}
