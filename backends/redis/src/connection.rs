//! Command connections to Redis whose sockets the host drives (contract 1.1).
//!
//! Why not redis-rs' `ConnectionManager` alone: it dials its own sockets and runs each
//! connection's driver on this library's tokio runtime, so every reply wakes a plugin thread,
//! which then wakes the host thread waiting for the reply: two thread wake-ups per command. For
//! a plain `redis://` (TCP) or `redis+unix://` URL this module dials the socket itself, hands it
//! to the host's reactor ([`host_driven::adopt`]) and runs the connection's driver on the host's
//! executor ([`runtime::spawn`]): a reply then wakes the host thread that waits for it, as with
//! redis-rs linked into the program. A host that declines (1.0, or a call from a plugin thread)
//! leaves the socket and the driver with the plugin: the same connection, the old cost.
//!
//! TLS (`rediss://`) keeps the `ConnectionManager`: redis-rs does not offer its TLS handshake
//! over a stream it did not dial.
//!
//! Reconnecting is what `ConnectionManager` does: a command that fails because the connection
//! broke returns its error (the callers retry with their own backoff) and the next command dials
//! a new connection, one dial at a time for all the clones of a [`Connection`].

use comms_plugin_api::{
    host_driven,
    runtime::{self, Task},
};
use redis::{
    aio::{ConnectionLike, ConnectionManager, MultiplexedConnection},
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline, RedisError, RedisFuture,
    RedisResult, Value,
};
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};
use tokio::io::{AsyncRead, AsyncWrite};

/// A connection for commands, cheap to clone (clones share the connection), reconnecting after
/// a failure. Used like any redis-rs async connection (`query_async(&mut connection)`).
#[derive(Clone)]
pub(crate) enum Connection {
    /// `rediss://`: redis-rs' reconnecting manager, on the plugin's runtime.
    Managed(ConnectionManager),
    /// Plain TCP or Unix socket: dialled here, driven by the host when it offers to.
    Direct(Direct),
}

impl Connection {
    /// Whether `info` is a connection [`Direct`] can make (not TLS).
    pub(crate) fn is_direct(info: &ConnectionInfo) -> bool {
        matches!(info.addr, ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(_))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Managed(manager) => manager.req_packed_command(cmd),
            Self::Direct(direct) => Box::pin(direct.send_command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Managed(manager) => manager.req_packed_commands(cmd, offset, count),
            Self::Direct(direct) => Box::pin(direct.send_pipeline(cmd, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Managed(manager) => manager.get_db(),
            Self::Direct(direct) => direct.shared.info.redis.db,
        }
    }
}

/// A reconnecting multiplexed connection over a socket this plugin dials (see the module
/// documentation).
#[derive(Clone)]
pub(crate) struct Direct {
    shared: Arc<DirectShared>,
    /// This clone's copy of the connection and its generation: used as long as the generation is
    /// current, so that a command costs no lock.
    current: Option<(u64, MultiplexedConnection)>,
}

struct DirectShared {
    info: ConnectionInfo,
    response_timeout: Duration,
    connect_timeout: Duration,
    /// `state.generation`, readable without the lock.
    generation: AtomicU64,
    state: Mutex<State>,
    /// Held while dialling, so that the clones that notice a broken connection together dial
    /// one new connection, not one each.
    dialling: tokio::sync::Mutex<()>,
}

/// The connection now; `None` after it broke, until a command dials a new one.
struct State {
    /// Changes whenever `connection` does.
    generation: u64,
    connection: Option<MultiplexedConnection>,
    /// The task that writes the connection's commands and reads its replies.
    driver: Option<Task>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update leaves the state consistent, even after a panic.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether `error` means the connection is unusable and the next command needs a new one (what
/// makes `ConnectionManager` reconnect).
fn is_broken(error: &RedisError) -> bool {
    error.is_unrecoverable_error() || error.is_connection_dropped()
}

impl Direct {
    /// Dials one connection (no retries: the caller has its own backoff) within
    /// `connect_timeout`, handshake included. `response_timeout` bounds every command.
    pub(crate) async fn open(
        info: ConnectionInfo,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let shared = DirectShared {
            info,
            response_timeout,
            connect_timeout,
            generation: AtomicU64::new(0),
            state: Mutex::new(State { generation: 0, connection: None, driver: None }),
            dialling: tokio::sync::Mutex::new(()),
        };
        let (connection, driver) = shared.dial().await?;
        {
            let mut state = lock(&shared.state);
            state.connection = Some(connection.clone());
            state.driver = Some(driver);
        }
        Ok(Self { shared: Arc::new(shared), current: Some((0, connection)) })
    }

    /// The connection to use now and its generation: this clone's copy while it is current,
    /// else the shared one, else a new one.
    async fn connection(&mut self) -> RedisResult<(u64, &mut MultiplexedConnection)> {
        let latest = self.shared.generation.load(Ordering::Acquire);
        let current = match self.current.take() {
            Some((generation, connection)) if generation == latest => (generation, connection),
            _ => self.shared.connection().await?,
        };
        let (generation, connection) = self.current.insert(current);
        Ok((*generation, connection))
    }

    /// Forgets the connection of `generation` if `result` says it broke.
    fn check<T>(&mut self, generation: u64, result: &RedisResult<T>) {
        if let Err(error) = result {
            if is_broken(error) {
                self.current = None;
                self.shared.broken(generation);
            }
        }
    }

    async fn send_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, connection) = self.connection().await?;
        let result = connection.send_packed_command(cmd).await;
        self.check(generation, &result);
        result
    }

    async fn send_pipeline(
        &mut self,
        cmd: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, connection) = self.connection().await?;
        let result = connection.send_packed_commands(cmd, offset, count).await;
        self.check(generation, &result);
        result
    }
}

impl DirectShared {
    /// The live connection, if there is one.
    fn live(&self) -> Option<(u64, MultiplexedConnection)> {
        let state = lock(&self.state);
        state.connection.clone().map(|connection| (state.generation, connection))
    }

    /// The live connection, or a new one if it broke.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let _dialling = self.dialling.lock().await;
        // Another clone may have dialled while this one waited.
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let (connection, driver) = self.dial().await?;
        let mut state = lock(&self.state);
        state.generation += 1;
        self.generation.store(state.generation, Ordering::Release);
        state.connection = Some(connection.clone());
        if let Some(mut old) = state.driver.replace(driver) {
            old.abort();
        }
        Ok((state.generation, connection))
    }

    /// Drops the connection of `generation` (unless it was replaced already): the next command
    /// dials a new one.
    fn broken(&self, generation: u64) {
        let mut state = lock(&self.state);
        if state.generation != generation || state.connection.is_none() {
            return;
        }
        state.connection = None;
        state.generation += 1;
        self.generation.store(state.generation, Ordering::Release);
        // Closes the socket if the driver has not ended on its own.
        if let Some(mut driver) = state.driver.take() {
            driver.abort();
        }
    }

    /// Dials the socket, hands it to the host, makes the Redis handshake and starts the driver.
    async fn dial(&self) -> RedisResult<(MultiplexedConnection, Task)> {
        let dial = async {
            match &self.info.addr {
                ConnectionAddr::Tcp(host, port) => {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    // As redis-rs' own sockets (feature `tcp_nodelay`): a command is not held back.
                    stream.set_nodelay(true)?;
                    self.start(host_driven::adopt(stream)?).await
                }
                #[cfg(unix)]
                ConnectionAddr::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    self.start(host_driven::adopt(stream)?).await
                }
                _ => Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "only plain TCP and Unix-socket connections are dialled by the plugin",
                ))),
            }
        };
        tokio::time::timeout(self.connect_timeout, dial)
            .await
            .unwrap_or_else(|_| Err(RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))))
    }

    async fn start<S>(&self, stream: S) -> RedisResult<(MultiplexedConnection, Task)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = AsyncConnectionConfig::new().set_response_timeout(self.response_timeout);
        let (connection, driver) =
            MultiplexedConnection::new_with_config(&self.info.redis, stream, config).await?;
        Ok((connection, runtime::spawn(driver)))
    }
}

impl Drop for DirectShared {
    /// Closes the socket now: the driver would otherwise keep it until a blocking command in
    /// flight (an `XREADGROUP ... BLOCK`) is answered.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(mut driver) = state.driver.take() {
            driver.abort();
        }
    }
}
