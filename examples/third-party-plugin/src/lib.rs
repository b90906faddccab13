//! # comms-uds: a third-party comms plugin
//!
//! A transport over Unix-domain sockets, written the way anyone outside the comms repository
//! would write a plugin: one crate, depending on `comms-plugin-api` only, built with
//! `crate-type = ["cdylib"]`, loaded by the host as `libcomms_uds.so`.
//!
//! All of the protocol work (hello handshake, frames, batching, reconnect, bounded queues) comes
//! from [`comms_plugin_api::stream_transport`]; this crate only says how to listen on and dial a
//! socket path. Its connected sockets go to the host's reactor when the host drives plugin
//! sockets (contract 1.1, [`comms_plugin_api::host_driven`]), so a message wakes the host's
//! thread only.
//!
//! ```toml
//! [transports.uds]
//! listen = "/tmp/alice.sock"   # default: $TMPDIR/comms-<node id>.sock
//! ```
//!
//! An existing socket file at `listen` is replaced (a previous run that crashed leaves one
//! behind); the file is removed again when the transport stops listening.

use comms_plugin_api::{
    async_trait, export_plugin,
    host_driven::{self, HostDrivenStream},
    stream_transport::{Acceptor, StreamMedium, StreamSettings, StreamTransport},
    Plugin, PluginError, Provides, Setup, Transport,
};
use std::{io, path::PathBuf, sync::Arc};
use tokio::net::{UnixListener, UnixStream};

/// The plugin.
#[derive(Debug)]
pub struct UdsPlugin;

#[async_trait]
impl Plugin for UdsPlugin {
    const NAME: &'static str = "uds";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Unix-domain socket transport (example third-party plugin)";
    const PROVIDES: Provides = Provides::TRANSPORT;
    // The host drives the sockets (host_driven::adopt): this runtime only accepts and dials.
    const WORKER_THREADS: usize = 1;

    async fn new_transport(setup: Setup) -> Result<Arc<dyn Transport>, PluginError> {
        let settings: StreamSettings = setup.config()?;
        // Encrypted links come for free: the stream transport runs the Noise handshake. Built
        // without this crate's `noise` feature, a node asking for them gets an error naming it.
        let security = setup.link_security()?;
        let path = match &settings.listen {
            Some(path) => PathBuf::from(path),
            None => std::env::temp_dir().join(format!("comms-{}.sock", setup.node_id)),
        };
        // A stale socket file from an earlier run would make bind fail.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|error| {
            PluginError::invalid_config(format!("key `listen`: cannot listen on {}: {error}", path.display()))
        })?;
        let address = path.display().to_string();
        let acceptor = UdsAcceptor { listener, path };
        Ok(Arc::new(StreamTransport::start(
            "uds",
            setup.node_id,
            settings,
            security,
            UdsDialer,
            acceptor,
            address,
        )?))
    }
}

export_plugin!(UdsPlugin);

/// Dials socket paths.
#[derive(Debug)]
pub struct UdsDialer;

impl StreamMedium for UdsDialer {
    type Stream = HostDrivenStream<UnixStream>;

    async fn connect(&self, address: &str) -> io::Result<Self::Stream> {
        host_driven::adopt(UnixStream::connect(address).await?)
    }
}

/// The listener; owns the socket file and removes it when the transport stops listening.
struct UdsAcceptor {
    listener: UnixListener,
    path: PathBuf,
}

impl Acceptor for UdsAcceptor {
    type Stream = HostDrivenStream<UnixStream>;

    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, _) = self.listener.accept().await?;
        Ok((host_driven::adopt(stream)?, "unix socket peer".to_string()))
    }
}

impl Drop for UdsAcceptor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
