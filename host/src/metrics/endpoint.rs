//! The HTTP endpoint that serves a node's metrics and its status page, one response per
//! connection:
//!
//! | request | response |
//! |---|---|
//! | `GET /` | the status page (`status_page.html`: HTML, CSS and JavaScript in one file, nothing loaded from elsewhere) |
//! | `GET /status.json` | the node's `NodeStatus` as JSON, with `peer_transports` (peer id → transport names) |
//! | `GET /history.json` | the last 10 minutes, one sample a second (see `history.rs`) |
//! | `GET /metrics` | the OpenMetrics text Prometheus scrapes |
//!
//! Anything else is a 404 naming these paths; another method on one of them is a 405. Every
//! response is read-only: nothing here changes the node. There is no authentication either,
//! which is why `[metrics] listen` belongs on loopback or a private address.
//!
//! Deliberately small rather than a web framework: Prometheus, `curl` and the page's own
//! `fetch` need one request line, one response with a length, and the connection closed. Limits
//! that keep a bad client from costing the node anything: a request head of at most 8 KiB, read
//! within 5 s, and at most 8 connections served at once (more wait in the kernel's accept queue).
//! The page's headers forbid it to load or send anything outside this endpoint, or to be framed
//! by another site (`Content-Security-Policy`), as a second line of defence behind the page
//! itself, which writes what peers name (ids, services, topics) as text, never as markup.

use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};

/// The documents the endpoint serves, each rendered when asked; `None` once the node is gone
/// (answered with 503).
pub(crate) trait Documents: Send + Sync + 'static {
    /// The metrics in the OpenMetrics text format.
    fn metrics(&self) -> Option<String>;
    /// The node's status as JSON.
    fn status_json(&self) -> Option<String>;
    /// The history of samples as JSON.
    fn history_json(&self) -> Option<String>;
}

/// What a [`MetricsEndpoint`] serves.
pub(crate) type Render = Arc<dyn Documents>;

/// The status page, served as is.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// The largest request head read (request line and headers).
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request and read the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;
/// The content type of the OpenMetrics text format, which Prometheus asks for and understands.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
/// The page runs its own inline script and style and fetches from this endpoint; nothing else
/// (no other host, no images, no forms, no frames around it).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";
/// The answer to a path the endpoint does not serve.
const NOT_FOUND: &str = "not found; this endpoint serves / (the status page), /status.json, \
     /history.json and /metrics\n";

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

    /// Serves `documents` until `shutdown` turns true (the node stopped).
    pub(crate) fn serve(
        self,
        documents: Render,
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
                let documents = Arc::clone(&documents);
                tokio::spawn(async move {
                    if let Err(error) = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, documents)).await
                    {
                        tracing::debug!(%error, "metrics endpoint: client too slow");
                    }
                    drop(permit);
                });
            }
        })
    }
}

/// A response: its status line, content type and body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn new(status: &'static str, content_type: &'static str, body: impl Into<String>) -> Self {
        Self { status, content_type, body: body.into() }
    }
}

/// The documents served, by path.
#[derive(Debug, Clone, Copy)]
enum Document {
    Page,
    Status,
    History,
    Metrics,
}

impl Document {
    fn at(path: &str) -> Option<Self> {
        match path {
            "/" => Some(Self::Page),
            "/status.json" => Some(Self::Status),
            "/history.json" => Some(Self::History),
            "/metrics" => Some(Self::Metrics),
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Page => HTML,
            Self::Status | Self::History => JSON,
            Self::Metrics => OPENMETRICS,
        }
    }

    /// The document now; `None` once the node is gone. The page itself is static (it reads the
    /// rest), so it loads even then and says that the node does not answer.
    fn render(self, documents: &dyn Documents) -> Option<String> {
        match self {
            Self::Page => Some(STATUS_PAGE.to_string()),
            Self::Status => documents.status_json(),
            Self::History => documents.history_json(),
            Self::Metrics => documents.metrics(),
        }
    }
}

/// The response to `method` on `path`.
fn respond(method: &str, path: &str, documents: &dyn Documents) -> Response {
    let Some(document) = Document::at(path) else {
        return Response::new("404 Not Found", TEXT, NOT_FOUND);
    };
    if method != "GET" {
        return Response::new("405 Method Not Allowed", TEXT, "only GET: this endpoint is read-only\n");
    }
    match document.render(documents) {
        Some(body) => Response::new("200 OK", document.content_type(), body),
        None => Response::new("503 Service Unavailable", TEXT, "the node has stopped\n"),
    }
}

/// Reads one request and writes its response.
async fn answer(mut stream: TcpStream, documents: Render) {
    let response = match read_request_line(&mut stream).await {
        Err(reason) => Response::new("400 Bad Request", TEXT, format!("{reason}\n")),
        Ok((method, path)) => respond(&method, &path, documents.as_ref()),
    };
    let Response { status, content_type, body } = response;
    let allow = if status.starts_with("405") { "Allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: {CONTENT_SECURITY_POLICY}\r\nConnection: close\r\n\r\n",
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
            // `GET /metrics?x=y` is `/metrics` too (and `/?refresh` is `/`).
            let path = target.split('?').next().unwrap_or(target);
            Ok((method.to_string(), path.to_string()))
        }
        _ => Err("not an HTTP/1.x request line".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that answers with fixed documents, or a stopped one.
    struct Fixed(bool);

    impl Documents for Fixed {
        fn metrics(&self) -> Option<String> {
            self.0.then(|| "# EOF\n".to_string())
        }
        fn status_json(&self) -> Option<String> {
            self.0.then(|| "{\"id\":\"a\"}".to_string())
        }
        fn history_json(&self) -> Option<String> {
            self.0.then(|| "{\"samples\":[]}".to_string())
        }
    }

    #[test]
    fn each_path_has_its_document_and_content_type() {
        let running = Fixed(true);
        let page = respond("GET", "/", &running);
        assert_eq!((page.status, page.content_type), ("200 OK", HTML));
        assert!(page.body.starts_with("<!DOCTYPE html>"), "{}", &page.body[..40]);
        assert_eq!(respond("GET", "/status.json", &running), Response::new("200 OK", JSON, "{\"id\":\"a\"}"));
        assert_eq!(respond("GET", "/history.json", &running).body, "{\"samples\":[]}");
        assert_eq!(respond("GET", "/metrics", &running), Response::new("200 OK", OPENMETRICS, "# EOF\n"));
    }

    #[test]
    fn the_endpoint_is_read_only_and_names_its_paths_on_a_404() {
        let running = Fixed(true);
        for path in ["/", "/status.json", "/history.json", "/metrics"] {
            assert_eq!(respond("POST", path, &running).status, "405 Method Not Allowed", "{path}");
        }
        let missing = respond("GET", "/admin", &running);
        assert_eq!((missing.status, missing.content_type), ("404 Not Found", TEXT));
        for path in ["/status.json", "/history.json", "/metrics"] {
            assert!(missing.body.contains(path), "{}", missing.body);
        }
    }

    #[test]
    fn a_stopped_node_answers_503_but_the_page_itself_still_loads() {
        let stopped = Fixed(false);
        assert_eq!(respond("GET", "/status.json", &stopped).status, "503 Service Unavailable");
        assert_eq!(respond("GET", "/metrics", &stopped).status, "503 Service Unavailable");
        assert_eq!(
            respond("GET", "/", &stopped).status,
            "200 OK",
            "the page reports the node as unreachable"
        );
    }
}
