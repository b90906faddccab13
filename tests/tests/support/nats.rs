//! What the NATS tests share, included by each of them with `#[path = "support/nats.rs"] mod
//! support;`: names of a test's own on the NATS server, deleted when the test ends, through a
//! few lines of the NATS text protocol (no client library in the tests crate).
//!
//! In a subdirectory, so that cargo does not take it for a test target of its own.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

/// A stream, subject prefix and key-value bucket of one test's own.
pub(crate) struct Deployment {
    /// JetStream stream of the transport (`stream` key).
    pub(crate) stream: String,
    /// Subject prefix (`prefix` key).
    pub(crate) prefix: String,
    /// Key-value bucket of the discovery (`bucket` key).
    pub(crate) bucket: String,
    /// The server: `host:port`.
    pub(crate) server: String,
}

impl Deployment {
    /// Fresh names for the test `name` on the server at `server`.
    pub(crate) fn new(server: &str, name: &str) -> Self {
        let unique = format!("{}_{:06x}_{name}", std::process::id(), rand::random::<u32>() & 0xff_ffff);
        Self {
            stream: format!("comms_test_{unique}"),
            prefix: format!("t{unique}"),
            bucket: format!("comms_test_nodes_{unique}"),
            server: server.to_string(),
        }
    }

    /// A transport table: url, stream and prefix, then `extra`.
    pub(crate) fn transport_config(&self, extra: &str) -> String {
        format!(
            "url = \"nats://{}\"\nstream = \"{}\"\nprefix = \"{}\"\n{extra}",
            self.server, self.stream, self.prefix
        )
    }

    /// A discovery table (without `plugin`): url and bucket, then `extra`.
    pub(crate) fn discovery_config(&self, extra: &str) -> String {
        format!("url = \"nats://{}\"\nbucket = \"{}\"\n{extra}", self.server, self.bucket)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // Best effort: the server may be gone (a fault test stopped it).
        let _ = jetstream_api(&self.server, &format!("$JS.API.STREAM.DELETE.{}", self.stream), "");
        let _ = jetstream_api(&self.server, &format!("$JS.API.STREAM.DELETE.KV_{}", self.bucket), "");
    }
}

/// Sends one JetStream API request (`subject`, JSON `body`) and returns the JSON answer.
pub(crate) fn jetstream_api(server: &str, subject: &str, body: &str) -> std::io::Result<String> {
    let stream = TcpStream::connect(server)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?; // INFO
    write!(
        writer,
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB _INBOX.comms_tests 1\r\nPUB {subject} _INBOX.comms_tests {}\r\n{body}\r\n",
        body.len()
    )?;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("the server closed the connection"));
        }
        if line.starts_with("PING") {
            writer.write_all(b"PONG\r\n")?;
        } else if line.starts_with("-ERR") {
            return Err(std::io::Error::other(line.trim().to_string()));
        } else if let Some(rest) = line.strip_prefix("MSG ") {
            let size: usize = rest.split_whitespace().last().and_then(|n| n.parse().ok()).unwrap_or(0);
            let mut answer = vec![0; size + 2];
            reader.read_exact(&mut answer)?;
            answer.truncate(size);
            return Ok(String::from_utf8_lossy(&answer).into_owned());
        }
    }
}
