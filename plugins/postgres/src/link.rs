//! One connection to PostgreSQL that outlives the server's connections: connects with backoff,
//! listens to this instance's notification channels, and reconnects when the connection is lost
//! (a server restart, `pg_terminate_backend`, a network cut).
//!
//! One connection per transport or discovery instance, shared by all of its operations:
//! tokio-postgres pipelines concurrent queries on it, every statement the plugin runs is a
//! transaction of its own, and the server's `max_connections` (100 by default) is then a bound
//! on instances, not on concurrent operations. The connection is also the one that `LISTEN`s, so
//! a notification and the rows it announces come the same way.
//!
//! A connection to one server (plain or TLS) is dialled by the plugin and handed to the host's
//! reactor, and its task runs on the host's executor (contract 1.1's host-driven I/O, as the
//! Redis plugin does; see [`Link::dial_for_the_host`]): a statement's reply then wakes the host
//! thread that waits for it. Measured with the PostgreSQL benchmark's comms phases (2026-12-05):
//! 43 % fewer context switches in the process (29,000 to 17,000 for the same messages), the
//! same throughput. Polled from anywhere but a host runtime, the plugin keeps its sockets.

use crate::config::{describe, PostgresConfig};
use comms_plugin_api::{
    backoff::Backoff,
    host_driven::{self, HostDrivenStream},
    runtime,
    tls::{verification_failure, TlsMaterial},
    ErrorCode, IncidentCounters, PluginError,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use socket2::{SockRef, TcpKeepalive};
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};
use tokio::sync::Notify;
use tokio_postgres::{
    config::Host, tls::MakeTlsConnect, types::ToSql, AsyncMessage, Client, NoTls, Row, Statement,
};

/// A connection with the statements prepared on it: each of the plugin's statements is parsed
/// and planned once per connection, not once per call (which would also cost a round trip).
#[derive(Debug)]
pub(crate) struct Connection {
    client: Client,
    /// Bounded by the plugin's own statements (a fixed set of texts), never by input.
    prepared: Mutex<HashMap<String, Statement>>,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Connection {
    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Runs a statement, returning the number of rows it changed.
    pub(crate) async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.execute(&statement, params).await
    }

    /// Runs a statement, returning its rows.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query(&statement, params).await
    }

    /// Runs a statement that returns exactly one row.
    pub(crate) async fn query_one(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query_one(&statement, params).await
    }

    /// Runs statements without parameters (simple query protocol).
    pub(crate) async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// What a link's connections are for, which decides how each is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Sends and subscriptions: a statement returns once its commit is flushed to the server's
    /// disk (`synchronous_commit`, the server's default), so a send that returned survives a
    /// crash of the server.
    Sending,
    /// Claims and settlements of one mailbox. Their commits are not waited for
    /// (`synchronous_commit = off`): losing one in a crash of the server only means a message is
    /// delivered again, and a flush costs milliseconds that every message would pay twice more.
    /// Their plans are pinned to index walks (see [`Purpose::session_settings`]).
    Receiving,
    /// Heartbeats and reads of the registry: commits not waited for, as for `Receiving`.
    Registry,
}

impl Purpose {
    /// The statements that set up a new connection.
    ///
    /// Every connection: the plugin notifies receivers itself, after its writes commit (see the
    /// mailbox trigger in schema.rs for why).
    ///
    /// Receiving: no sequential scans and no sorts, so that a claim walks the mailbox's
    /// (recipient, id) index, stops after one batch and updates the rows it took through the
    /// primary key, whatever the planner believes about the table. The plugin's statements are
    /// prepared once per connection, and PostgreSQL keeps a generic plan made while the table
    /// was small (or never analyzed: autovacuum off) for good. Measured with the benchmark's
    /// one-way phase (2026-12-07, backlogs of up to 15,000 rows), such plans read the whole
    /// backlog on every claim, to sort it or to find the claimed rows again (a claim of 256
    /// took 15 to 58 ms instead of about 1); in three alternating pairs of four runs of 30,000
    /// messages comms went from 13,500 to 19,900 msg/s to 18,200 to 26,500 (raw tokio-postgres
    /// 16,100 to 32,600). Every statement on this connection has an index to use. JIT off: a
    /// disabled plan kind counts as a huge cost, which would otherwise buy a compilation (a
    /// quarter of a second) for any statement left with one.
    fn session_settings(self) -> &'static str {
        match self {
            Purpose::Sending => "SET comms.notify = 'off';",
            Purpose::Receiving => {
                "SET comms.notify = 'off'; SET synchronous_commit = off; \
                 SET enable_seqscan = off; SET enable_sort = off; SET jit = off;"
            }
            Purpose::Registry => "SET comms.notify = 'off'; SET synchronous_commit = off;",
        }
    }
}

/// The connection of one instance; see the module docs.
#[derive(Debug)]
pub(crate) struct Link {
    settings: tokio_postgres::Config,
    /// TLS to the server, when `ca_file` is set.
    tls: Option<Tls>,
    described: String,
    backoff: Backoff,
    current: Mutex<Option<Arc<Connection>>>,
    /// Held while (re)connecting, so that concurrent operations that all lost the connection
    /// open one new connection, not one each.
    reconnecting: tokio::sync::Mutex<()>,
    /// Channels to `LISTEN` on, again after each reconnect.
    channels: Mutex<Vec<String>>,
    /// Woken by every notification on those channels, and after each reconnect (notifications
    /// sent while disconnected are lost, so a waiting receiver must look for itself).
    wake: Arc<Notify>,
    counters: Arc<IncidentCounters>,
    /// Set once closed: no reconnect after that.
    closed: std::sync::atomic::AtomicBool,
    /// What the connections are set up for.
    purpose: Purpose,
    /// Whether a connection was made before: the next one is a reconnect.
    connected_before: std::sync::atomic::AtomicBool,
}

/// A socket [`Link::dial_for_the_host`] opened.
enum Dialled {
    Tcp(HostDrivenStream<tokio::net::TcpStream>),
    #[cfg(unix)]
    Unix(HostDrivenStream<tokio::net::UnixStream>),
}

/// Why one connection attempt failed.
enum ConnectFailure {
    /// The TLS handshake refused a certificate: another attempt would fail the same way.
    Refused(String),
    /// Anything else (the server down or restarting, a timeout): worth another attempt.
    Failed(String),
}

/// The rustls connector of a link with `ca_file`: roots from that file only (a private CA, as
/// with libpq's `sslrootcert`), and the client certificate when one is configured.
#[derive(Clone)]
struct Tls(tokio_postgres_rustls::MakeRustlsConnect);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(rustls)")
    }
}

impl Tls {
    fn new(material: &TlsMaterial) -> Result<Self, PluginError> {
        let invalid = |key: &str, error: &dyn std::fmt::Display| {
            PluginError::invalid_config(format!("key `{key}`: {error}"))
        };
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(material.ca.as_deref().unwrap_or_default()) {
            let certificate = certificate.map_err(|error| invalid("ca_file", &error))?;
            roots.add(certificate).map_err(|error| invalid("ca_file", &error))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| invalid("ca_file", &error))?
            .with_root_certificates(roots);
        let config = match &material.client {
            Some(identity) => {
                let chain = CertificateDer::pem_slice_iter(&identity.cert_chain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| invalid("client_cert_file", &error))?;
                // The key file's content is never quoted: only that it was refused.
                let key = PrivateKeyDer::from_pem_slice(&identity.key)
                    .map_err(|_| invalid("client_key_file", &"not a PEM private key"))?;
                builder.with_client_auth_cert(chain, key).map_err(|error| {
                    invalid("client_key_file", &format!("does not fit the certificate ({error})"))
                })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Self(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }
}

/// The connection's own task: it carries every query of the client and hands notifications
/// over as wake-ups (a Notify holds at most one: nothing queues up).
async fn watch_connection<S, T>(mut connection: tokio_postgres::Connection<S, T>, wake: Arc<Notify>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                tracing::debug!(%error, "PostgreSQL connection ended");
                break;
            }
            None => break,
        }
    }
    // A waiting receiver would hear nothing more: wake it, so that it reconnects (or sees that
    // the link was closed).
    wake.notify_one();
}

/// Whether `error` means the connection is gone (and a new one may succeed), as opposed to an
/// error of the statement itself.
fn connection_lost(error: &tokio_postgres::Error, client: &Connection) -> bool {
    if error.is_closed() || client.is_closed() {
        return true;
    }
    // 08: connection exception; 57P01-57P03: the server is shutting down or terminated us.
    error.code().is_some_and(|state| {
        let code = state.code();
        code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
    })
}

/// An error naming what failed and where; never the password.
pub(crate) fn db_error(link: &Link, what: &str, error: tokio_postgres::Error) -> PluginError {
    // `Display` of a server error is only "db error"; the server's message is the useful part.
    let detail = match error.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => error.to_string(),
    };
    let message = format!("{what} on PostgreSQL {}: {detail}", link.described);
    if error.is_closed() || error.code().is_some_and(|state| state.code().starts_with("08")) {
        PluginError::retryable(ErrorCode::UNREACHABLE, message)
    } else {
        PluginError::new(ErrorCode::OTHER, message)
    }
}

impl Link {
    /// A link that connects on first use (with backoff: `connect_attempts` tries), its
    /// connections set up for `purpose`.
    pub(crate) fn lazy(
        config: &PostgresConfig,
        purpose: Purpose,
        counters: Arc<IncidentCounters>,
    ) -> Result<Self, PluginError> {
        let settings = config.validate()?;
        let tls = match config.tls_files().read()? {
            Some(material) => Some(Tls::new(&material)?),
            None => None,
        };
        Ok(Self {
            described: describe(&settings),
            settings,
            tls,
            backoff: config.backoff(),
            current: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(()),
            channels: Mutex::new(Vec::new()),
            wake: Arc::new(Notify::new()),
            counters,
            closed: std::sync::atomic::AtomicBool::new(false),
            purpose,
            connected_before: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A link that is connected now, so that a server that cannot be reached fails the open.
    pub(crate) async fn open(
        config: &PostgresConfig,
        purpose: Purpose,
        counters: Arc<IncidentCounters>,
    ) -> Result<Self, PluginError> {
        let link = Self::lazy(config, purpose, counters)?;
        link.client().await?;
        Ok(link)
    }

    /// `user@host:port/dbname`, for messages.
    pub(crate) fn described(&self) -> &str {
        &self.described
    }

    /// Woken by notifications and reconnects; see the field.
    pub(crate) fn wake(&self) -> &Notify {
        &self.wake
    }

    /// Adds a channel to listen to, now and after every reconnect.
    pub(crate) async fn listen(&self, channel: String) -> Result<(), PluginError> {
        {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            if channels.contains(&channel) {
                return Ok(());
            }
            channels.push(channel.clone());
        }
        let statement = format!("LISTEN \"{channel}\"");
        self.run("listening for notifications", move |client| {
            let statement = statement.clone();
            async move { client.batch_execute(&statement).await }
        })
        .await
    }

    /// Stops reconnecting and drops the connection (which closes it).
    pub(crate) fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.current.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A separate connection, not shared and not listening: for a transaction.
    pub(crate) async fn dedicated(&self) -> Result<Client, PluginError> {
        self.connect_with_backoff(false).await
    }

    /// The current connection, or a new one if it was lost.
    pub(crate) async fn client(&self) -> Result<Arc<Connection>, PluginError> {
        if let Some(client) = self.live() {
            return Ok(client);
        }
        let _reconnecting = self.reconnecting.lock().await;
        // Another operation may have reconnected while this one waited.
        if let Some(client) = self.live() {
            return Ok(client);
        }
        if self.is_closed() {
            return Err(PluginError::closed(&format!("the PostgreSQL connection to {}", self.described)));
        }
        let client = self.connect_with_backoff(true).await?;
        let client = Arc::new(Connection { client, prepared: Mutex::new(HashMap::new()) });
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&client));
        if self.connected_before.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.counters.reconnected();
            tracing::info!(server = %self.described, "reconnected to PostgreSQL");
        }
        // Whatever was announced while disconnected was not heard.
        self.wake.notify_one();
        Ok(client)
    }

    fn live(&self) -> Option<Arc<Connection>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone().filter(|client| !client.is_closed())
    }

    /// Forgets `client` if it is still the current one (it lost its connection).
    fn forget(&self, client: &Arc<Connection>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|held| Arc::ptr_eq(held, client)) {
            *current = None;
        }
    }

    async fn connect_with_backoff(&self, listening: bool) -> Result<Client, PluginError> {
        let result = self
            .backoff
            .retry(|attempt| async move {
                match self.connect_once(listening).await {
                    Ok(client) => Ok(Ok(client)),
                    // A certificate that does not verify: retrying cannot help.
                    Err(ConnectFailure::Refused(reason)) => Ok(Err(reason)),
                    Err(ConnectFailure::Failed(error)) => {
                        tracing::debug!(server = %self.described, attempt, %error, "connecting to PostgreSQL failed");
                        Err(error)
                    }
                }
            })
            .await;
        match result {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(reason)) => Err(PluginError::new(
                ErrorCode::UNREACHABLE,
                format!(
                    "cannot connect to PostgreSQL at {}: TLS failed: {reason} (check `ca_file`, the server's \
                     certificate and the host name in `url`)",
                    self.described
                ),
            )),
            Err((error, attempts)) => Err(PluginError::retryable(
                ErrorCode::UNREACHABLE,
                format!(
                    "cannot connect to PostgreSQL at {} after {attempts} attempts: {error}",
                    self.described
                ),
            )),
        }
    }

    async fn connect_once(&self, listening: bool) -> Result<Client, ConnectFailure> {
        let client = match self.dial_for_the_host().await {
            Some(dialled) => dialled?,
            None => match &self.tls {
                Some(tls) => {
                    let (client, connection) =
                        self.settings.connect(tls.0.clone()).await.map_err(|error| self.failure(error))?;
                    tokio::spawn(watch_connection(connection, Arc::clone(&self.wake)));
                    client
                }
                None => {
                    let (client, connection) =
                        self.settings.connect(NoTls).await.map_err(|error| self.failure(error))?;
                    tokio::spawn(watch_connection(connection, Arc::clone(&self.wake)));
                    client
                }
            },
        };
        let mut statement = self.purpose.session_settings().to_string();
        if listening {
            let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner()).clone();
            statement.extend(channels.iter().map(|channel| format!("LISTEN \"{channel}\";")));
        }
        client.batch_execute(&statement).await.map_err(|error| {
            ConnectFailure::Failed(db_error(self, "setting up the connection", error).message)
        })?;
        Ok(client)
    }

    /// A failed connection attempt: a certificate refused (no use trying again) or anything else.
    fn failure(&self, error: tokio_postgres::Error) -> ConnectFailure {
        match verification_failure(&error) {
            Some(reason) => ConnectFailure::Refused(reason),
            None => ConnectFailure::Failed(db_error(self, "connecting", error).message),
        }
    }

    /// Dials the server itself and hands the socket to the host's reactor
    /// ([`host_driven::adopt`]), with the connection's task on the host's executor
    /// ([`runtime::spawn`]): a reply then wakes the host thread that waits for it, not a thread
    /// of the plugin's runtime that would then wake the host's (two thread wake-ups per
    /// statement, which a batch's commit waits for). TLS (with `ca_file`) runs over the host's
    /// socket the same way. Only for one server (one host, at most one port, no `hostaddr`, no
    /// `tcp_user_timeout`): `None` otherwise, and tokio-postgres dials (the failover between
    /// several hosts stays its own).
    async fn dial_for_the_host(&self) -> Option<Result<Client, ConnectFailure>> {
        let settings = &self.settings;
        let [host] = settings.get_hosts() else { return None };
        if settings.get_ports().len() > 1
            || !settings.get_hostaddrs().is_empty()
            || settings.get_tcp_user_timeout().is_some()
        {
            return None;
        }
        let port = settings.get_ports().first().copied().unwrap_or(5432);
        let dial = async {
            match host {
                Host::Tcp(name) => {
                    let stream = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
                    // As tokio-postgres sets its own sockets: a statement is not held back, and
                    // the connection's keepalive is as configured.
                    stream.set_nodelay(true)?;
                    if settings.get_keepalives() {
                        let mut keepalive = TcpKeepalive::new().with_time(settings.get_keepalives_idle());
                        if let Some(interval) = settings.get_keepalives_interval() {
                            keepalive = keepalive.with_interval(interval);
                        }
                        if let Some(retries) = settings.get_keepalives_retries() {
                            keepalive = keepalive.with_retries(retries);
                        }
                        SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
                    }
                    Ok(Dialled::Tcp(host_driven::adopt(stream)?))
                }
                #[cfg(unix)]
                Host::Unix(directory) => {
                    let path = directory.join(format!(".s.PGSQL.{port}"));
                    Ok(Dialled::Unix(host_driven::adopt(tokio::net::UnixStream::connect(path).await?)?))
                }
            }
        };
        let dialled: std::io::Result<Dialled> = match settings.get_connect_timeout() {
            Some(limit) => tokio::time::timeout(*limit, dial).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within connect_timeout"))
            }),
            None => dial.await,
        };
        let failed = |error: &dyn std::fmt::Display| {
            ConnectFailure::Failed(format!("connecting to PostgreSQL at {}: {error}", self.described))
        };
        // The name the server's certificate must carry, as tokio-postgres passes it.
        let domain = match host {
            Host::Tcp(name) => name.as_str(),
            #[cfg(unix)]
            Host::Unix(_) => "",
        };
        let started = match dialled {
            Ok(Dialled::Tcp(stream)) => self.start(stream, domain).await,
            #[cfg(unix)]
            Ok(Dialled::Unix(stream)) => self.start(stream, domain).await,
            Err(error) => return Some(Err(failed(&error))),
        };
        Some(started.map_err(|error| self.failure(error)))
    }

    /// Opens a session (over TLS when the link has it) on a dialled stream and runs its
    /// connection's task on the host's executor (see [`Link::dial_for_the_host`]).
    async fn start<S>(&self, stream: S, domain: &str) -> Result<Client, tokio_postgres::Error>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync + 'static,
    {
        let wake = Arc::clone(&self.wake);
        let client = match &self.tls {
            Some(tls) => {
                let Ok(connector) = MakeTlsConnect::<S>::make_tls_connect(&mut tls.0.clone(), domain);
                let (client, connection) = self.settings.connect_raw(stream, connector).await?;
                drop(runtime::spawn(watch_connection(connection, wake)));
                client
            }
            None => {
                let (client, connection) = self.settings.connect_raw(stream, NoTls).await?;
                drop(runtime::spawn(watch_connection(connection, wake)));
                client
            }
        };
        Ok(client)
    }

    /// Runs `operation` on the connection; if the connection was lost, reconnects (with
    /// backoff) and runs it once more. So an operation may run twice: every statement the
    /// plugin runs this way is safe to repeat, or (a send) leaves at worst a duplicate, which
    /// at-least-once delivery allows.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, operation: F) -> Result<T, PluginError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let mut retried = false;
        loop {
            let client = self.client().await?;
            match operation(Arc::clone(&client)).await {
                Ok(value) => return Ok(value),
                Err(error) if !retried && !self.is_closed() && connection_lost(&error, &client) => {
                    tracing::info!(server = %self.described, %error, "PostgreSQL connection lost; reconnecting");
                    self.counters.failed();
                    self.forget(&client);
                    retried = true;
                }
                Err(error) => return Err(db_error(self, what, error)),
            }
        }
    }
}
