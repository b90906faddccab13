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
        // The topic stream of `durable_topics = true`, if the test made one.
        let _ = jetstream_api(&self.server, &format!("$JS.API.STREAM.DELETE.{}-topics", self.stream), "");
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

const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A `nats-server` child process with JetStream, on a port and store directory of its own.
pub(crate) struct OwnNats {
    child: Option<std::process::Child>,
    port: u16,
    dir: std::path::PathBuf,
    /// Options beyond the address, port and store (authentication, TLS).
    options: Vec<String>,
}

impl OwnNats {
    /// Starts one, or returns `None` (and says why) when `nats-server` is not installed; in CI
    /// that is a failure.
    pub(crate) fn start(dir: &std::path::Path) -> Option<Self> {
        Self::start_with(dir, &[])
    }

    /// [`OwnNats::start`] with more `nats-server` options (`--user`, `--tls`, ...).
    pub(crate) fn start_with(dir: &std::path::Path, options: &[&str]) -> Option<Self> {
        let port = comms_tests::free_address().rsplit_once(':').unwrap().1.parse().unwrap();
        let options = options.iter().map(|option| option.to_string()).collect();
        let mut nats = Self { child: None, port, dir: dir.to_path_buf(), options };
        match nats.spawn() {
            Ok(()) => Some(nats),
            Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIPPED: cannot start {NATS_SERVER} ({error})");
                None
            }
            Err(error) => {
                panic!("cannot start {NATS_SERVER}, and in CI a broker test must not skip: {error}")
            }
        }
    }

    /// Starts the process (again, after [`OwnNats::kill`]) and waits until it listens.
    pub(crate) fn spawn(&mut self) -> std::io::Result<()> {
        let child = std::process::Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .args(&self.options)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let started = std::time::Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "nats-server did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills it as a crash would (SIGKILL: only what it wrote to its store survives).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}
