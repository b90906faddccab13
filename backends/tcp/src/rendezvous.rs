//! The tokio I/O around [`crate::nat`]: the rendezvous's connections and relays, a node's
//! signalling connection, punches and relay halves, and the listener that tells NAT traversal
//! connections from comms connections.

use crate::nat::{self, ConnId, Disposition, Event, Message, Role, MAGIC, MAX_BODY};
use comms_plugin_api::runtime::plugin_runtime;
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, oneshot, watch, Notify, Semaphore},
    task::JoinHandle,
};

/// Time between punch attempts after one failed at once (a NAT answered with a reset).
const PUNCH_INTERVAL: Duration = Duration::from_millis(150);
/// Time a dial waits for the dial port's registration once the node is registered.
const DIAL_PORT_WAIT: Duration = Duration::from_secs(2);
/// Time a new connection may take to show its first bytes (and a NAT traversal connection its
/// first message).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(5);
/// New connections classified at once; beyond that they go to the transport unclassified.
const MAX_CLASSIFYING: usize = 64;
/// Streams waiting for the acceptor.
pub(crate) const INCOMING_CAPACITY: usize = 64;
/// Messages waiting to be written on one signalling connection (the rendezvous's side).
const SIGNAL_QUEUE: usize = 64;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads one message body (after its `u16` length).
async fn read_message<R: AsyncReadExt + Unpin>(reader: &mut R) -> io::Result<Vec<u8>> {
    let length = usize::from(reader.read_u16().await?);
    if length == 0 || length > MAX_BODY {
        return Err(invalid(format!("NAT traversal message of {length} bytes")));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    Ok(body)
}

/// Reads [`MAGIC`] and the first message of a NAT traversal connection.
async fn read_opening(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut magic = [0; 4];
    stream.read_exact(&mut magic).await?;
    if magic != MAGIC {
        return Err(invalid("not a NAT traversal connection"));
    }
    read_message(stream).await
}

/// A listener that shares its port with the outgoing connections of NAT traversal
/// (`SO_REUSEADDR` and `SO_REUSEPORT` on all of them).
pub(crate) fn bind_shared(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = shared_socket(address)?;
    socket.listen(1024)
}

fn shared_socket(local: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(local)?;
    Ok(socket)
}

/// Connects from the listen port to `peer`.
async fn connect_from(local: SocketAddr, peer: SocketAddr) -> io::Result<TcpStream> {
    let local = match (local.ip().is_unspecified(), peer) {
        (true, SocketAddr::V4(_)) => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), local.port()),
        (true, SocketAddr::V6(_)) => SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), local.port()),
        (false, _) => local,
    };
    shared_socket(local)?.connect(peer).await
}

/// Aborts a task when dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A node's part in NAT traversal.
#[derive(Debug, Clone)]
pub(crate) enum NatRole {
    /// Behind NAT, registered with a rendezvous.
    Client(Arc<NatClient>),
    /// The rendezvous.
    Server(Arc<NatServer>),
}

/// What the acceptor needs for NAT traversal: the streams handed to it besides the listener's,
/// and the role that takes the NAT traversal connections the listener accepts.
#[derive(Debug)]
pub(crate) struct NatAcceptor {
    incoming: mpsc::Receiver<(TcpStream, String)>,
    sender: mpsc::Sender<(TcpStream, String)>,
    role: NatRole,
    classifying: Arc<Semaphore>,
    _tasks: Vec<AbortOnDrop>,
}

impl NatAcceptor {
    /// Starts `role`'s background task (a node's signalling connection, the rendezvous's timer).
    pub(crate) fn start(
        role: NatRole,
        incoming: mpsc::Receiver<(TcpStream, String)>,
        sender: mpsc::Sender<(TcpStream, String)>,
    ) -> Self {
        let tasks = match &role {
            NatRole::Client(client) => vec![
                plugin_runtime().spawn(Arc::clone(client).signalling()),
                plugin_runtime().spawn(Arc::clone(client).dial_registration()),
            ],
            NatRole::Server(server) => vec![plugin_runtime().spawn(Arc::clone(server).timer())],
        };
        Self {
            incoming,
            sender,
            role,
            classifying: Arc::new(Semaphore::new(MAX_CLASSIFYING)),
            _tasks: tasks.into_iter().map(AbortOnDrop).collect(),
        }
    }

    /// The next comms stream: from the listener (NAT traversal connections are taken aside) or
    /// handed over by NAT traversal (a punched or relayed incoming connection). Cancel-safe.
    pub(crate) async fn accept(&mut self, listener: &TcpListener) -> io::Result<(TcpStream, String)> {
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = accepted?;
                    let Ok(permit) = Arc::clone(&self.classifying).try_acquire_owned() else {
                        return Ok((stream, peer.to_string()));
                    };
                    let (role, sender) = (self.role.clone(), self.sender.clone());
                    plugin_runtime().spawn(async move {
                        classify(stream, peer, role, sender).await;
                        drop(permit);
                    });
                }
                Some(handed) = self.incoming.recv() => return Ok(handed),
            }
        }
    }
}

/// A comms connection goes to the acceptor; a NAT traversal one to `role`.
async fn classify(
    mut stream: TcpStream,
    peer: SocketAddr,
    role: NatRole,
    sender: mpsc::Sender<(TcpStream, String)>,
) {
    let mut first = [0u8; 1];
    let nat = matches!(
        tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.peek(&mut first)).await,
        Ok(Ok(1)) if first[0] == MAGIC[0]
    );
    if !nat {
        // A comms connection (its first byte is 0), or something the transport refuses.
        let _ = sender.send((stream, peer.to_string())).await;
        return;
    }
    let opening = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, read_opening(&mut stream)).await {
        Ok(Ok(body)) => body,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "tcp nat: bad connection closed");
            role.count_malformed();
            return;
        }
        Err(_) => {
            role.count_malformed();
            return;
        }
    };
    match role {
        NatRole::Client(client) => client.routed(stream, peer, &opening),
        NatRole::Server(server) => server.serve(stream, peer, opening).await,
    }
}

impl NatRole {
    /// The NAT traversal counters, as the transport's statistics name them.
    pub(crate) fn counters(&self) -> Vec<(&'static str, u64)> {
        match self {
            NatRole::Client(client) => {
                let stats = client.stats();
                vec![
                    ("tcp.nat.introductions", stats.introductions),
                    ("tcp.nat.punched", stats.punched),
                    ("tcp.nat.relayed", stats.relayed),
                    ("tcp.nat.dials_failed", stats.dials_failed),
                    ("tcp.nat.bad_punches", stats.bad_punches),
                    ("tcp.nat.malformed", stats.malformed),
                ]
            }
            NatRole::Server(server) => {
                let stats = server.stats();
                vec![
                    ("tcp.nat.registrations", stats.registrations),
                    ("tcp.nat.introductions", stats.introductions),
                    ("tcp.nat.relays", stats.relays),
                    ("tcp.nat.relays_open", server.relays_open()),
                    ("tcp.nat.refused", stats.refused),
                    ("tcp.nat.malformed", stats.malformed),
                ]
            }
        }
    }

    fn count_malformed(&self) {
        match self {
            NatRole::Client(client) => client.malformed.fetch_add(1, Relaxed),
            NatRole::Server(server) => server.malformed.fetch_add(1, Relaxed),
        };
    }
}

/// The rendezvous: its state machine, the writers of its signalling connections and the held
/// relay halves.
#[derive(Debug)]
pub(crate) struct NatServer {
    state: Mutex<nat::Server>,
    signalling: Mutex<HashMap<ConnId, mpsc::Sender<Vec<u8>>>>,
    held: Mutex<HashMap<ConnId, TcpStream>>,
    next_conn: AtomicU64,
    malformed: AtomicU64,
}

impl NatServer {
    pub(crate) fn new(config: nat::Config) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(nat::Server::new(config)),
            signalling: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            malformed: AtomicU64::new(0),
        })
    }

    /// Counters: the state machine's, plus connections that did not open properly.
    pub(crate) fn stats(&self) -> nat::ServerStats {
        let mut stats = lock(&self.state).stats().clone();
        stats.malformed += self.malformed.load(Relaxed);
        stats
    }

    /// Relays spliced or waiting for their second half now.
    fn relays_open(&self) -> u64 {
        lock(&self.state).relay_count() as u64
    }

    /// Hands out what the state machine queued: messages to signalling connections, closes.
    fn flush(&self) {
        let mut state = lock(&self.state);
        let signalling = lock(&self.signalling);
        while let Some((conn, bytes)) = state.poll_transmit() {
            if let Some(writer) = signalling.get(&conn) {
                // A connection that does not read its messages loses them (and is closed by
                // its writer's end below if it stays that way).
                let _ = writer.try_send(bytes);
            }
        }
        drop(signalling);
        while let Some(conn) = state.poll_close() {
            lock(&self.held).remove(&conn);
            lock(&self.signalling).remove(&conn);
        }
    }

    async fn timer(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            lock(&self.state).handle_timeout(Instant::now());
            self.flush();
        }
    }

    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, opening: Vec<u8>) {
        let conn = self.next_conn.fetch_add(1, Relaxed);
        let (sender, receiver) = mpsc::channel(SIGNAL_QUEUE);
        // What the opening queues (a registration's answer, a relay request to the target) may
        // be handed out by another task's flush (the timer's, another connection's) as soon as
        // the state is unlocked. So the connection is made known where that flush looks for it
        // (a signalling writer, a held relay half) before the state is unlocked: otherwise the
        // answer would be dropped (the node waiting a keepalive to register again) or the
        // target's relay half would find no dialler's half to splice with.
        let (disposition, stream) = {
            let mut state = lock(&self.state);
            let disposition = state.handle_message(conn, peer, &opening, Instant::now());
            let stream = match disposition {
                Disposition::Keep => {
                    lock(&self.signalling).insert(conn, sender);
                    Some(stream)
                }
                Disposition::Hold => {
                    lock(&self.held).insert(conn, stream);
                    None
                }
                Disposition::Splice { .. } | Disposition::Close => Some(stream),
            };
            (disposition, stream)
        };
        match (disposition, stream) {
            (Disposition::Keep, Some(stream)) => {
                self.flush();
                let (mut reader, writer) = stream.into_split();
                let writing = plugin_runtime().spawn(write_messages(writer, receiver));
                let _writing = AbortOnDrop(writing);
                while let Ok(body) = read_message(&mut reader).await {
                    let disposition = lock(&self.state).handle_message(conn, peer, &body, Instant::now());
                    self.flush();
                    if disposition != Disposition::Keep {
                        break;
                    }
                }
                lock(&self.signalling).remove(&conn);
                lock(&self.state).handle_closed(conn);
                self.flush();
            }
            (Disposition::Splice { dial, token }, Some(mut stream)) => {
                self.flush();
                let held = lock(&self.held).remove(&dial);
                if let Some(mut dialler) = held {
                    tracing::info!(token, "tcp nat: relaying a connection");
                    if dialler.write_all(&nat::encode(&Message::RelayReady)).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut dialler, &mut stream).await;
                    }
                }
                lock(&self.state).relay_ended(token);
                self.flush();
            }
            // A held relay half (the target's half splices it, or the timer closes it), or a
            // closed connection: hand out what the state machine queued (a relay request, a
            // refusal) before closing.
            _ => self.flush(),
        }
    }
}

async fn write_messages(mut writer: tokio::net::tcp::OwnedWriteHalf, mut messages: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = messages.recv().await {
        if writer.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// What a dial waits for: the introduction (token, the peer's reflexive address, the punch
/// deadline) or why there is none.
type Introduction = Result<(u64, SocketAddr, Instant), String>;

/// A node behind NAT: its state machine, its signalling connection's task, and the dials and
/// punches in progress.
#[derive(Debug)]
pub(crate) struct NatClient {
    state: Mutex<nat::Client>,
    wake: Notify,
    registered: watch::Sender<bool>,
    /// The rendezvous acknowledged the dial port (dials wait for it: before, the target would
    /// punch towards the listen port's mapping).
    dial_registered: watch::Sender<bool>,
    /// The rendezvous as configured (`host:port`) and resolved.
    rendezvous_text: String,
    rendezvous: SocketAddr,
    /// The listen address: the signalling connection and the target's punches are made from
    /// its port.
    local: SocketAddr,
    /// The dial port (same IP): the dialler's punches are made from it.
    dial_local: SocketAddr,
    /// Keeps the dial port reserved while no connection uses it.
    _dial_port: TcpSocket,
    keepalive: Duration,
    connect_timeout: Duration,
    /// Whether to punch at all (tests of the relay turn it off).
    punch: bool,
    waiting: Mutex<HashMap<String, Vec<oneshot::Sender<Introduction>>>>,
    /// Punches in progress: where the listener hands a punched connection it accepted.
    routes: Mutex<HashMap<u64, oneshot::Sender<TcpStream>>>,
    incoming: mpsc::Sender<(TcpStream, String)>,
    malformed: AtomicU64,
}

/// How a node behind NAT was configured.
#[derive(Debug)]
pub(crate) struct ClientSetup {
    pub(crate) config: nat::Config,
    pub(crate) name: String,
    pub(crate) rendezvous_text: String,
    pub(crate) rendezvous: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) connect_timeout: Duration,
    pub(crate) punch: bool,
}

impl NatClient {
    pub(crate) fn new(
        setup: ClientSetup,
        incoming: mpsc::Sender<(TcpStream, String)>,
    ) -> io::Result<Arc<Self>> {
        let keepalive = setup.config.keepalive;
        let dial_port = shared_socket(SocketAddr::new(setup.local.ip(), 0))?;
        let dial_local = dial_port.local_addr()?;
        let state = nat::Client::new(setup.config, setup.name.as_bytes())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            wake: Notify::new(),
            registered: watch::Sender::new(false),
            dial_registered: watch::Sender::new(false),
            rendezvous_text: setup.rendezvous_text,
            rendezvous: setup.rendezvous,
            local: setup.local,
            dial_local,
            _dial_port: dial_port,
            keepalive,
            connect_timeout: setup.connect_timeout,
            punch: setup.punch,
            waiting: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            incoming,
            malformed: AtomicU64::new(0),
        }))
    }

    /// Counters: the state machine's, plus connections that did not open properly.
    pub(crate) fn stats(&self) -> nat::ClientStats {
        let mut stats = lock(&self.state).stats().clone();
        stats.malformed += self.malformed.load(Relaxed);
        stats
    }

    /// Whether `rendezvous` (from a `name@rendezvous` address) is this node's rendezvous.
    pub(crate) fn is_my_rendezvous(&self, rendezvous: &str) -> bool {
        rendezvous == self.rendezvous_text
            || rendezvous.parse::<SocketAddr>().is_ok_and(|a| a == self.rendezvous)
    }

    /// Keeps the signalling connection open (reconnecting with a backoff) and dispatches what
    /// the rendezvous says.
    async fn signalling(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let result = self.signal_once().await;
            lock(&self.state).handle_disconnected();
            self.registered.send_replace(false);
            self.dispatch();
            if let Err(error) = result {
                tracing::warn!(rendezvous = %self.rendezvous, %error, "tcp nat: rendezvous connection lost; connecting again");
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Keeps a connection from the dial port to the rendezvous open (registered with
    /// `REGISTER_DIAL` once the node is registered), so that the rendezvous knows the port's
    /// mapping and the NAT keeps it.
    async fn dial_registration(self: Arc<Self>) {
        loop {
            let mut registered = self.registered.subscribe();
            if registered.wait_for(|registered| *registered).await.is_err() {
                return;
            }
            let result = self.dial_registration_once().await;
            self.dial_registered.send_replace(false);
            if let Err(error) = result {
                tracing::debug!(%error, "tcp nat: dial port connection to the rendezvous lost");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn dial_registration_once(&self) -> io::Result<()> {
        let stream =
            tokio::time::timeout(self.connect_timeout, connect_from(self.dial_local, self.rendezvous))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        let (mut reader, mut writer) = stream.into_split();
        let message = lock(&self.state).register_dial_message();
        writer.write_all(&nat::opening(&message)).await?;
        let renew = async {
            loop {
                tokio::time::sleep(self.keepalive).await;
                writer.write_all(&nat::encode(&message)).await?;
            }
        };
        let answers = async {
            loop {
                let body = read_message(&mut reader).await?;
                if !matches!(nat::parse(&body), Some(Message::Registered { .. })) {
                    return Err::<(), _>(invalid("the rendezvous refused the dial port"));
                }
                self.dial_registered.send_replace(true);
            }
        };
        tokio::select! {
            result = renew => result,
            result = answers => result,
        }
    }

    async fn signal_once(self: &Arc<Self>) -> io::Result<()> {
        let stream = tokio::time::timeout(self.connect_timeout, connect_from(self.local, self.rendezvous))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        let (mut reader, mut writer) = stream.into_split();
        let opening = lock(&self.state).register_opening();
        writer.write_all(&opening).await?;
        lock(&self.state).handle_connected(Instant::now());
        // Messages are read by a task of their own (reading is then never cancelled halfway).
        let (bodies_sender, mut bodies) = mpsc::channel::<io::Result<Vec<u8>>>(16);
        let _reading = AbortOnDrop(plugin_runtime().spawn(async move {
            loop {
                let body = read_message(&mut reader).await;
                let failed = body.is_err();
                if bodies_sender.send(body).await.is_err() || failed {
                    return;
                }
            }
        }));
        loop {
            let wake_at = lock(&self.state).poll_timeout();
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                body = bodies.recv() => {
                    let body = body.unwrap_or_else(|| Err(io::ErrorKind::UnexpectedEof.into()))?;
                    if !lock(&self.state).handle_message(&body, Instant::now()) {
                        return Err(invalid("unexpected message from the rendezvous"));
                    }
                }
                () = self.wake.notified() => {}
                () = sleep => lock(&self.state).handle_timeout(Instant::now()),
            }
            let transmits: Vec<Vec<u8>> = std::iter::from_fn(|| lock(&self.state).poll_transmit()).collect();
            for bytes in transmits {
                writer.write_all(&bytes).await?;
            }
            self.dispatch();
        }
    }

    fn dispatch(self: &Arc<Self>) {
        let events: Vec<Event> = std::iter::from_fn(|| lock(&self.state).poll_event()).collect();
        for event in events {
            match event {
                Event::Registered { reflexive } => {
                    tracing::info!(rendezvous = %self.rendezvous, %reflexive, "tcp nat: registered with the rendezvous");
                    self.registered.send_replace(true);
                }
                Event::Punch { name, token, role: Role::Dialler, address, deadline } => {
                    let mut waiters = lock(&self.waiting).remove(&name).unwrap_or_default().into_iter();
                    if let Some(first) = waiters.next() {
                        let _ = first.send(Ok((token, address, deadline)));
                    }
                    for other in waiters {
                        let _ = other.send(Err("another connection to the node was being set up".into()));
                    }
                }
                Event::Punch { name, token, role: Role::Target, address, deadline } => {
                    let client = Arc::clone(self);
                    plugin_runtime().spawn(async move {
                        if let Some(stream) = client.punch(token, Role::Target, address, deadline).await {
                            tracing::info!(peer = %name, %address, "tcp nat: punched an incoming connection");
                            let _ = client.incoming.send((stream, address.to_string())).await;
                        }
                    });
                }
                Event::DialFailed { name, reason } => {
                    for waiter in lock(&self.waiting).remove(&name).unwrap_or_default() {
                        let _ = waiter.send(Err(reason.to_string()));
                    }
                }
                Event::RelayRequested { token } => {
                    let client = Arc::clone(self);
                    plugin_runtime().spawn(async move {
                        match client.relay_half(Message::RelayAccept { token }).await {
                            Ok(stream) => {
                                tracing::info!(rendezvous = %client.rendezvous, "tcp nat: incoming connection relayed");
                                let peer = format!("relay:{}", client.rendezvous);
                                let _ = client.incoming.send((stream, peer)).await;
                            }
                            Err(error) => tracing::warn!(%error, "tcp nat: cannot open the relay half"),
                        }
                    });
                }
            }
        }
    }

    /// A NAT traversal connection the listener accepted: a punched connection the peer's SYN
    /// made (it goes to the punch in progress), anything else is refused.
    fn routed(&self, mut stream: TcpStream, peer: SocketAddr, opening: &[u8]) {
        let Some(Message::Punch { token, role }) = nat::parse(opening) else {
            self.malformed.fetch_add(1, Relaxed);
            return;
        };
        // The introduction reaches the state before its punch task has registered its route.
        // Taking the greeting then would mark the punch done and drop the connection (the peer,
        // having punched, would send into a closed connection): refuse it instead, untouched,
        // and the peer's next attempt finds the route.
        if !lock(&self.routes).contains_key(&token) {
            tracing::debug!(%peer, "tcp nat: punched connection before its punch was ready refused");
            lock(&self.state).early_greeting();
            return;
        }
        if lock(&self.state).handle_greeting(token, role, Instant::now()).is_none() {
            tracing::debug!(%peer, "tcp nat: punched connection with an unknown token refused");
            return;
        }
        if let Some(route) = lock(&self.routes).remove(&token) {
            // The punch writes its greeting once it takes the stream.
            if let Err(unrouted) = route.send(stream) {
                stream = unrouted;
                drop(stream);
            }
        }
    }

    /// Dials the node registered as `name` at this node's rendezvous: a punched connection, or
    /// relayed if punching fails.
    pub(crate) async fn dial(self: &Arc<Self>, name: &str) -> io::Result<TcpStream> {
        let mut registered = self.registered.subscribe();
        tokio::time::timeout(self.connect_timeout, registered.wait_for(|registered| *registered))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "not registered with the rendezvous yet"))?
            .map_err(|_| io::Error::other("closed"))?;
        // Without the dial port's registration the punch cannot work (the relay still does):
        // wait a little for it.
        let mut dial_registered = self.dial_registered.subscribe();
        let _ =
            tokio::time::timeout(DIAL_PORT_WAIT, dial_registered.wait_for(|registered| *registered)).await;
        let (sender, receiver) = oneshot::channel();
        {
            let mut state = lock(&self.state);
            state.dial(name.as_bytes(), Instant::now()).map_err(|error| {
                io::Error::new(io::ErrorKind::ConnectionRefused, format!("{name}: {error}"))
            })?;
            lock(&self.waiting).entry(name.to_string()).or_default().push(sender);
        }
        self.wake.notify_one();
        let (token, address, deadline) =
            receiver.await.map_err(|_| io::Error::other("the rendezvous connection closed"))?.map_err(
                |reason| io::Error::new(io::ErrorKind::ConnectionRefused, format!("{name}: {reason}")),
            )?;
        if let Some(stream) = self.punch(token, Role::Dialler, address, deadline).await {
            tracing::info!(peer = name, %address, "tcp nat: punched an outgoing connection");
            return Ok(stream);
        }
        lock(&self.state).relaying(token);
        let stream = self.relay_half(Message::RelayDial { token }).await?;
        tracing::info!(peer = name, rendezvous = %self.rendezvous, "tcp nat: outgoing connection relayed");
        Ok(stream)
    }

    /// Opens a relay half at the rendezvous; the dialler's waits for `RELAY_READY`.
    async fn relay_half(&self, opening: Message) -> io::Result<TcpStream> {
        let dialler = matches!(opening, Message::RelayDial { .. });
        let timeout = self.connect_timeout;
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(self.rendezvous))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the rendezvous did not answer"))??;
        stream.write_all(&nat::opening(&opening)).await?;
        if dialler {
            let ready =
                tokio::time::timeout(timeout + nat::Config::default().relay_wait, read_message(&mut stream))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the relay was not ready in time"))?
                    .map_err(|error| {
                        io::Error::new(io::ErrorKind::ConnectionRefused, format!("relay refused: {error}"))
                    })?;
            if nat::parse(&ready) != Some(Message::RelayReady) {
                return Err(invalid("the rendezvous did not open the relay"));
            }
        }
        Ok(stream)
    }

    /// Punches towards `address` until `deadline`: connects from the listen port again and
    /// again, and takes a connection the listener accepted for this token. Both ends greet with
    /// the token and their role.
    async fn punch(
        &self,
        token: u64,
        role: Role,
        address: SocketAddr,
        deadline: Instant,
    ) -> Option<TcpStream> {
        if !self.punch {
            return None;
        }
        let local = match role {
            Role::Dialler => self.dial_local,
            Role::Target => self.local,
        };
        let (route, routed) = oneshot::channel();
        lock(&self.routes).insert(token, route);
        let mut routed = Some(routed);
        let greeting = nat::opening(&Message::Punch { token, role });
        let deadline = tokio::time::Instant::from(deadline);
        let result = loop {
            if !lock(&self.state).punching(token, Instant::now()) && routed.is_none() {
                break None;
            }
            let attempt = async {
                match connect_from(local, address).await {
                    Ok(stream) => Some(stream),
                    Err(_) => {
                        // Refused at once (a reset from the NAT): try again a little later.
                        tokio::time::sleep(PUNCH_INTERVAL).await;
                        None
                    }
                }
            };
            let from_listener = async {
                match routed.as_mut() {
                    Some(receiver) => receiver.await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                stream = from_listener => {
                    routed = None;
                    if let Some(mut stream) = stream {
                        // The peer's greeting was checked by the listener.
                        if stream.write_all(&greeting).await.is_ok() {
                            break Some(stream);
                        }
                    }
                }
                attempt = tokio::time::timeout_at(deadline, attempt) => match attempt {
                    Ok(Some(stream)) => {
                        if let Some(stream) = self.greet(stream, token, &greeting, deadline).await {
                            break Some(stream);
                        }
                        // Refused after connecting (the peer's punch not ready yet): pause
                        // as after a reset, not a tight loop of connections.
                        tokio::time::sleep(PUNCH_INTERVAL).await;
                    }
                    Ok(None) => {}
                    Err(_) => break None,
                },
            }
            if tokio::time::Instant::now() >= deadline {
                break None;
            }
        };
        lock(&self.routes).remove(&token);
        result
    }

    /// Exchanges greetings on a connection a punch attempt opened.
    async fn greet(
        &self,
        mut stream: TcpStream,
        token: u64,
        greeting: &[u8],
        deadline: tokio::time::Instant,
    ) -> Option<TcpStream> {
        stream.write_all(greeting).await.ok()?;
        let limit = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        let opening = tokio::time::timeout_at(limit, read_opening(&mut stream)).await.ok()?.ok()?;
        match nat::parse(&opening) {
            Some(Message::Punch { token: theirs, role }) if theirs == token => {
                lock(&self.state).handle_greeting(token, role, Instant::now())?;
                Some(stream)
            }
            _ => {
                self.malformed.fetch_add(1, Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The listener's hand-over of a punched connection, at the moment the loopback tests
    //! cannot choose: before the punch task is ready for it.
    use super::*;

    async fn connection(listener: &TcpListener) -> (TcpStream, TcpStream, SocketAddr) {
        let dialled = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        (dialled, accepted, peer)
    }

    /// Every node that registers is answered, however the rendezvous's other work interleaves
    /// with it: here another thread hands out queued messages without pause (as the timer and
    /// the other connections do) while many nodes register at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_registration_is_answered_while_other_connections_flush() {
        const NODES: usize = 200;
        let server = NatServer::new(nat::Config::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flusher = {
            let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    server.flush();
                }
            })
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let accepting = {
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                loop {
                    let (mut stream, peer) = listener.accept().await.unwrap();
                    let server = Arc::clone(&server);
                    tokio::spawn(async move {
                        let opening = read_opening(&mut stream).await.unwrap();
                        server.serve(stream, peer, opening).await;
                    });
                }
            })
        };
        let nodes: Vec<_> = (0..NODES)
            .map(|n| {
                tokio::spawn(async move {
                    let mut stream = TcpStream::connect(at).await.unwrap();
                    let name = format!("node-{n}").into_bytes();
                    stream.write_all(&nat::opening(&Message::Register { name })).await.unwrap();
                    let answer = tokio::time::timeout(Duration::from_secs(5), read_message(&mut stream)).await;
                    (matches!(answer, Ok(Ok(ref body)) if matches!(nat::parse(body), Some(Message::Registered { .. }))), stream)
                })
            })
            .collect();
        let mut unanswered = 0;
        let mut streams = Vec::new();
        for node in nodes {
            let (answered, stream) = node.await.unwrap();
            unanswered += usize::from(!answered);
            streams.push(stream);
        }
        stop.store(true, Relaxed);
        flusher.join().unwrap();
        accepting.abort();
        assert_eq!(unanswered, 0, "registrations the rendezvous did not answer, of {NODES}");
        assert_eq!(server.stats().registrations, NODES as u64);
    }

    #[tokio::test]
    async fn a_punched_connection_before_its_punch_is_ready_is_refused_and_the_punch_goes_on() {
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let setup = ClientSetup {
            config: nat::Config::default(),
            name: "b".into(),
            rendezvous_text: unused.to_string(),
            rendezvous: unused,
            local: "127.0.0.1:0".parse().unwrap(),
            connect_timeout: Duration::from_secs(1),
            punch: true,
        };
        let client = NatClient::new(setup, mpsc::channel(1).0).unwrap();
        // The introduction has reached the state machine; the punch task has not started.
        let token = 7;
        let introduction = nat::encode(&Message::Introduce {
            token,
            role: Role::Target,
            address: unused,
            name: b"a".to_vec(),
        });
        assert!(lock(&client.state).handle_message(&introduction[2..], Instant::now()));
        let greeting = nat::encode(&Message::Punch { token, role: Role::Dialler });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();

        let (mut dialler, accepted, peer) = connection(&listener).await;
        client.routed(accepted, peer, &greeting[2..]);
        assert!(lock(&client.state).punching(token, Instant::now()), "the punch is not marked done");
        assert_eq!((client.stats().punched, client.stats().bad_punches), (0, 1));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), dialler.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0))), "the early connection is closed: {closed:?}");

        // The punch task is ready: the peer's next attempt is handed to it.
        let (route, routed) = oneshot::channel();
        lock(&client.routes).insert(token, route);
        let (_dialler, accepted, peer) = connection(&listener).await;
        let accepted_port = accepted.local_addr().unwrap().port();
        client.routed(accepted, peer, &greeting[2..]);
        let handed = routed.await.expect("the connection goes to the punch");
        assert_eq!(handed.local_addr().unwrap().port(), accepted_port);
        assert!(!lock(&client.state).punching(token, Instant::now()));
        assert_eq!((client.stats().punched, client.stats().bad_punches), (1, 1));
    }
}
