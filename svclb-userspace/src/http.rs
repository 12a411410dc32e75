//! The small HTTP/1.1 server behind the health and metrics endpoints.
//!
//! Load balancer probes, kubelet probes and Prometheus send one small GET per
//! connection, so this reads the request head, answers and closes: no
//! keep-alive, no request bodies. hyper is in the tree only as kube's client;
//! its server side for a handful of fixed paths would cost more than this file.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request head larger than this is not a probe.
const MAX_HEAD: usize = 8 * 1024;
/// Slow or idle clients must not hold a task forever.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Headers beyond the ones every response has.
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// What Go's http.NotFound answers, so unknown paths look like kube-proxy's.
    pub fn not_found() -> Self {
        Response::new(404, TEXT, "404 page not found\n")
    }
}

pub const TEXT: &str = "text/plain; charset=utf-8";

/// A bound listener. Binding is separate from serving so the agent fails
/// at start-up when the port is taken, and tests can bind port 0 and ask
/// which port they got.
pub struct Server {
    listener: TcpListener,
}

impl Server {
    pub async fn bind(addr: SocketAddr) -> Result<Self, HttpError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        Ok(Server { listener })
    }

    /// Serve on a listener bound elsewhere (with socket options
    /// `bind` does not set).
    pub fn from_listener(listener: TcpListener) -> Self {
        Server { listener }
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener.local_addr().expect("bound listener address")
    }

    /// Answer every request with `handler(path)` (the query string removed),
    /// forever. Each connection gets its own task.
    pub async fn run<H>(self, handler: H)
    where
        H: Fn(&str) -> Response + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(CLIENT_TIMEOUT, handle(stream, handler.as_ref()))
                                .await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends pass; returning would leave the
                    // node without health checks for good.
                    tracing::warn!(addr = %self.local_addr(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn handle<H: Fn(&str) -> Response>(mut stream: TcpStream, handler: &H) -> io::Result<()> {
    let head = read_head(&mut stream).await?;
    let (response, head_only) = match parse_request_line(&head) {
        None => (Response::new(400, TEXT, "400 Bad Request\n"), false),
        Some((method @ ("GET" | "HEAD"), path)) => (handler(path), method == "HEAD"),
        Some(_) => (Response::new(405, TEXT, "405 Method Not Allowed\n"), false),
    };
    stream.write_all(&encode(&response, head_only)).await?;
    stream.shutdown().await
}

/// Bytes up to the end of the request head (or what arrived before the
/// client stopped sending, or MAX_HEAD bytes).
async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// `METHOD /path?query HTTP/1.x` -> (method, path).
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some((method, path))
}

fn encode(response: &Response, head_only: bool) -> Vec<u8> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if response.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&response.body);
    }
    out.into_bytes()
}

/// A raw HTTP/1.1 client for the tests: sends `request` and returns
/// (status, headers lower-cased, body).
#[cfg(test)]
pub(crate) async fn send(addr: SocketAddr, request: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("response head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_ascii_lowercase(), v.to_owned())
        })
        .collect();
    (status, headers, body.to_owned())
}

#[cfg(test)]
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    send(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        // (request head, Some((method, path)) if it is a valid request line)
        type Case = (&'static [u8], Option<(&'static str, &'static str)>);
        let cases: &[Case] = &[
            (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                Some(("GET", "/healthz")),
            ),
            (
                b"HEAD /livez?verbose=1 HTTP/1.0\r\n\r\n",
                Some(("HEAD", "/livez")),
            ),
            (b"GET /metrics HTTP/1.1\r\n", Some(("GET", "/metrics"))),
            (b"GET /healthz HTTP/1.1", None),
            (b"GET healthz HTTP/1.1\r\n", None),
            (b"GET /healthz SPDY/3\r\n", None),
            (b"GET  /healthz HTTP/1.1\r\n", None),
            (b"\xff\xfe /x HTTP/1.1\r\n", None),
        ];
        for (head, want) in cases {
            assert_eq!(
                parse_request_line(head),
                *want,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    async fn start() -> SocketAddr {
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr();
        tokio::spawn(server.run(|path| match path {
            "/hello" => Response::new(200, TEXT, "hi"),
            _ => Response::not_found(),
        }));
        addr
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let addr = start().await;
        let (status, headers, body) = get(addr, "/hello?x=1").await;
        assert_eq!((status, body.as_str()), (200, "hi"));
        assert!(headers.contains(&("content-length".into(), "2".into())));
        assert!(headers.contains(&("content-type".into(), TEXT.into())));
        assert!(headers.contains(&("connection".into(), "close".into())));

        let (status, _, body) = get(addr, "/nope").await;
        assert_eq!((status, body.as_str()), (404, "404 page not found\n"));

        // HEAD: the GET's headers, no body.
        let (status, headers, body) = send(addr, "HEAD /hello HTTP/1.1\r\n\r\n").await;
        assert_eq!((status, body.as_str()), (200, ""));
        assert!(headers.contains(&("content-length".into(), "2".into())));

        let (status, headers, _) = send(addr, "POST /hello HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 405);
        assert!(headers.contains(&("allow".into(), "GET, HEAD".into())));

        let (status, _, _) = send(addr, "garbage\r\n\r\n").await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn bind_conflict_is_an_error() {
        let first = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let err = Server::bind(first.local_addr()).await.err().unwrap();
        assert!(err.to_string().starts_with("binding 127.0.0.1:"), "{err}");
    }
}
