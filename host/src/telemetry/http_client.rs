//! The smallest HTTP/1.1 client the OTLP exporter needs: one `POST` per batch over a new plain
//! TCP connection (`Connection: close`), the answer read to its end.
//!
//! Why not reqwest or hyper: the exporter posts a batch every few seconds from a thread of its
//! own, so connection reuse buys nothing, and this keeps the feature's build small. Blocking I/O
//! is fine there: the SDK's batch processor runs each export on its own thread
//! (`futures_executor::block_on`), never on the application's runtime.

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

/// The largest answer read; a collector's is a few bytes.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// Posts to one `http://` endpoint.
#[derive(Debug)]
pub(super) struct PlainHttpClient {
    timeout: Duration,
}

impl PlainHttpClient {
    /// Checks that `endpoint` is a URL this client can post to.
    pub(super) fn new(endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let uri: http::Uri = endpoint.parse().map_err(|error| format!("not a URL ({error})"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err("https is not supported: the exporter speaks plain HTTP; run a collector beside \
                            the node (http://127.0.0.1:4318) and let it forward over TLS"
                    .to_string())
            }
            _ => return Err("the URL must start with http://".to_string()),
        }
        if uri.host().is_none() {
            return Err("the URL names no host".to_string());
        }
        Ok(Self { timeout })
    }

    fn post(&self, request: &Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let uri = request.uri();
        let host = uri.host().ok_or("the URL names no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let address = (host.trim_start_matches('[').trim_end_matches(']'), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| format!("{host} does not resolve"))?;
        let mut stream = TcpStream::connect_timeout(&address, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;

        let path = uri.path_and_query().map_or("/", |path| path.as_str());
        let authority = uri.authority().map_or(host, |authority| authority.as_str());
        let mut head =
            format!("{} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n", request.method());
        for (name, value) in request.headers() {
            if name != "content-length" && name != "connection" && name != "host" {
                head.push_str(&format!("{name}: {}\r\n", value.to_str()?));
            }
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", request.body().len()));
        stream.write_all(head.as_bytes())?;
        stream.write_all(request.body())?;
        stream.flush()?;

        let mut answer = Vec::new();
        stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut answer)?;
        parse_response(&answer)
    }
}

#[async_trait::async_trait]
impl HttpClient for PlainHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        self.post(&request)
    }
}

/// Status line, headers, and the body (as sent, or de-chunked).
fn parse_response(answer: &[u8]) -> Result<Response<Bytes>, HttpError> {
    let end_of_head = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("the collector's answer has no complete header")?;
    let head = std::str::from_utf8(&answer[..end_of_head])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP status line: {status_line:?}"))?;
    let mut response = Response::builder().status(status);
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
        response = response.header(name, value);
    }
    let rest = &answer[end_of_head + 4..];
    let body =
        if chunked { dechunk(rest)? } else { rest[..length.unwrap_or(rest.len()).min(rest.len())].to_vec() };
    Ok(response.body(Bytes::from(body))?)
}

/// The body of a `Transfer-Encoding: chunked` answer.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line_end =
            rest.windows(2).position(|window| window == b"\r\n").ok_or("a chunk size line is cut short")?;
        let size_text = std::str::from_utf8(&rest[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16)?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("a chunk is cut short")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_a_length_chunks_or_neither_are_read() {
        let plain = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(plain.status(), 200);
        assert_eq!(plain.body().as_ref(), b"abc");
        let chunked =
            parse_response(b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!(chunked.status(), 400);
        assert_eq!(chunked.body().as_ref(), b"abcde");
        let until_close = parse_response(b"HTTP/1.0 202 Accepted\r\n\r\nxyz").unwrap();
        assert_eq!((until_close.status().as_u16(), until_close.body().as_ref()), (202, &b"xyz"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab").is_err());
    }

    #[test]
    fn only_plain_http_urls_are_taken() {
        let timeout = Duration::from_secs(1);
        assert!(PlainHttpClient::new("http://127.0.0.1:4318/v1/traces", timeout).is_ok());
        assert!(PlainHttpClient::new("http://[::1]:4318/v1/traces", timeout).is_ok());
        let https = PlainHttpClient::new("https://collector:4318/v1/traces", timeout).unwrap_err();
        assert!(https.contains("https is not supported"), "{https}");
        assert!(PlainHttpClient::new("collector:4318", timeout).is_err());
        assert!(PlainHttpClient::new("not a url", timeout).is_err());
    }
}
