//! The HTTP endpoint that serves a node's metrics: `GET /metrics`, one response per connection.
//!
//! Deliberately small rather than a web framework: Prometheus (and `curl`) need one request
//! line, one response with a length, and the connection closed. Limits that keep a bad client
//! from costing the node anything: a request head of at most 8 KiB, read within 5 s, and at most
//! 8 connections served at once (more wait in the kernel's accept queue).

use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};

/// Renders the metrics text, or `None` once the node is gone.
pub(crate) type Render = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The largest request head read (request line and headers).
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request and read the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;
/// The content type of the OpenMetrics text format, which Prometheus asks for and understands.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound metrics listener, not yet serving (bound before the node starts, so that a port in
/// use is a build error rather than a node without metrics).
#[derive(Debug)]
pub(crate) struct MetricsEndpoint {
    listener: TcpListener,
    address: SocketAddr,
}

impl MetricsEndpoint {
    /// Binds `address` (`[metrics] listen`).
    pub(crate) async fn bind(address: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        Ok(Self { listener, address })
    }

    /// The address it listens on (the port chosen when the config said 0).
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves what `render` returns until `shutdown` turns true (the node stopped).
    pub(crate) fn serve(
        self,
        render: Render,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
                let accepted = tokio::select! {
                    _ = shutdown.wait_for(|stopped| *stopped) => return,
                    accepted = self.listener.accept() => accepted,
                };
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(%error, address = %self.address, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    if let Err(error) = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, render)).await {
                        tracing::debug!(%error, "metrics endpoint: client too slow");
                    }
                    drop(permit);
                });
            }
        })
    }
}

/// Reads one request and writes its response.
async fn answer(mut stream: TcpStream, render: Render) {
    let (status, body) = match read_request_line(&mut stream).await {
        Err(reason) => ("400 Bad Request", format!("{reason}\n")),
        Ok((method, path)) => match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => match render() {
                Some(text) => ("200 OK", text),
                None => ("503 Service Unavailable", "the node has stopped\n".to_string()),
            },
            (_, "/metrics") => ("405 Method Not Allowed", "only GET\n".to_string()),
            _ => ("404 Not Found", "the metrics are at /metrics\n".to_string()),
        },
    };
    let content_type = if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // A client that went away needs no answer.
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads the request head (up to its blank line) and returns its method and path.
async fn read_request_line(stream: &mut TcpStream) -> Result<(String, String), String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(format!("request head over {MAX_REQUEST_HEAD} bytes"));
        }
        let read = stream.read(&mut chunk).await.map_err(|error| format!("reading the request: {error}"))?;
        if read == 0 {
            return Err("connection closed before the end of the request head".to_string());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let line = head.split(|byte| *byte == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(method), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
            // `GET /metrics?x=y` is `/metrics` too.
            let path = target.split('?').next().unwrap_or(target);
            Ok((method.to_string(), path.to_string()))
        }
        _ => Err("not an HTTP/1.x request line".to_string()),
    }
}
