//! A small blocking HTTP/1.1 client over `std::net::TcpStream`, enough to talk JSON to an
//! OpenAI-compatible server on a local or private address (`verify --endpoint`): plain `http://`
//! only, one request per connection (`Connection: close`), bodies sized by `Content-Length`,
//! chunked transfer encoding, or the end of the connection.

use super::{HarnessError, HarnessResult};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long a request may take before the server counts as not answering.
const TIMEOUT: Duration = Duration::from_secs(600);

/// A base URL split into its parts: `http://HOST[:PORT]/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// Host name or address.
    pub host: String,
    /// Port (80 when the URL names none).
    pub port: u16,
    /// Path prefix without a trailing slash (e.g. `/v1`).
    pub path: String,
}

impl BaseUrl {
    /// Parses `http://HOST[:PORT][/PATH]`; anything else is a one-line error.
    pub fn parse(url: &str) -> HarnessResult<Self> {
        let bad = |why: &str| HarnessError::input(format!("--endpoint {url:?}: {why}"));
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err(bad(
                    "https is not supported; give the server's plain http:// address (e.g. http://127.0.0.1:8080/v1)",
                ))
            }
            _ => return Err(bad("expected http://HOST:PORT/v1")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad(&format!("the port {p:?} is not a number from 0 to 65535")))?,
            ),
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(BaseUrl {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
            path: path.into(),
        })
    }

    /// The URL as written back (for reports).
    pub fn display(&self) -> String {
        format!("http://{}:{}{}", self.host, self.port, self.path)
    }
}

/// One response: status code and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl Response {
    /// The body as JSON, or a one-line error naming `what` was asked.
    pub fn json(&self, what: &str) -> HarnessResult<serde_json::Value> {
        serde_json::from_str(&self.body).map_err(|_| {
            HarnessError::input(format!(
                "{what}: the server did not answer JSON (HTTP {}): {}",
                self.status,
                super::short(&self.body)
            ))
        })
    }
}

/// Sends `method path` (with the base URL's path prefix) and a JSON body, and reads the answer.
pub fn request(
    base: &BaseUrl,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> HarnessResult<Response> {
    let url = format!("{}{path}", base.display());
    let fail = |e: std::io::Error| HarnessError::input(format!("{method} {url}: {e}"));
    let addr = (base.host.as_str(), base.port)
        .to_socket_addrs()
        .map_err(fail)?
        .next()
        .ok_or_else(|| HarnessError::input(format!("{url}: the host has no address")))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| {
        HarnessError::input(format!(
            "{method} {url}: cannot connect ({e}); is the server running?"
        ))
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(fail)?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nAccept: application/json\r\nConnection: close\r\n",
        base.path, base.host, base.port
    );
    if body.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(fail)?;
    stream.write_all(payload.as_bytes()).map_err(fail)?;
    let mut raw = vec![];
    stream.read_to_end(&mut raw).map_err(fail)?;
    parse_response(&raw).map_err(|why| HarnessError::input(format!("{method} {url}: {why}")))
}

/// Parses a whole HTTP/1.x response.
fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("not an HTTP answer (no header end)")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: {}", super::short(status_line)))?;
    let (mut length, mut chunked) = (None, false);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("the body is shorter than its Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Joins the chunks of a chunked body.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = vec![];
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunked body ends early")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).ok_or("a chunk ends early")?);
        rest = rest.get(size + 2..).ok_or("a chunk ends early")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8080/v1/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/v1")
        );
        assert_eq!(BaseUrl::parse("http://localhost").unwrap().port, 80);
        assert_eq!(BaseUrl::parse("http://[::1]:9/v1").unwrap().host, "::1");
        for bad in [
            "https://x/v1",
            "127.0.0.1:8080",
            "http://:80",
            "http://h:99999/v1",
        ] {
            let e = BaseUrl::parse(bad).unwrap_err().to_string();
            assert!(!e.contains('\n') && e.contains("--endpoint"), "{e}");
        }
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
        let r = parse_response(
            b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x\r\n\":1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (400, "{\"a\":1}"));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"garbage").is_err());
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nnot json").unwrap();
        assert!(r
            .json("GET /models")
            .unwrap_err()
            .to_string()
            .contains("did not answer JSON"));
    }
}
