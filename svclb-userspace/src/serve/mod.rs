//! The HTTP server behind /healthz, /metrics and the health check node
//! ports, on hyper.
//!
//! Load balancer probes, kubelet probes and Prometheus send one small GET per
//! connection, so each connection answers one request and closes
//! (`Connection: close`), with kube-proxy's header names and no Date header,
//! as svclb always answered. The health check node ports face the network,
//! so every server has [`Limits`]: a connection over the limit is closed at
//! once, unanswered, and each connection gets a time limit for sending its
//! request and reading the answer.

pub mod health_check_ports;
pub mod healthz;
pub mod metrics;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
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

/// What one server lets its clients take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; probes need a handful.
    pub max_connections: usize,
    /// From accepting a connection to having written the answer; slow or
    /// idle clients must not hold a connection slot.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A bound listener. Binding is separate from serving so the agent fails
/// at start-up when the port is taken, and tests can bind port 0 and ask
/// which port they got.
pub struct Server {
    listener: TcpListener,
    limits: Limits,
}

impl Server {
    pub async fn bind(addr: SocketAddr) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(Self::from_listener(listener))
    }

    /// Serve on a listener bound elsewhere (with socket options
    /// `bind` does not set).
    pub fn from_listener(listener: TcpListener) -> Self {
        Server {
            listener,
            limits: Limits::default(),
        }
    }

    /// Other limits than the defaults (tests use small ones).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener.local_addr().expect("bound listener address")
    }

    /// Answer every request with `handler(path)` (the query string removed),
    /// forever.
    pub async fn run<H>(self, handler: H)
    where
        H: Fn(&str) -> Response + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut http = http1::Builder::new();
        http.keep_alive(false)
            // A probe may shut down its sending side after the request.
            .half_close(true)
            .title_case_headers(true)
            .auto_date_header(false)
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.timeout);
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends pass; returning would leave the
                    // node without health checks for good.
                    tracing::warn!(addr = %self.local_addr(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Closing at once tells the client; leaving it in the backlog
            // would keep it waiting for nothing.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(addr = %self.local_addr(), "connection limit reached");
                continue;
            };
            let handler = handler.clone();
            let service = service_fn(move |request| {
                let response = respond(&request, handler.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let timeout = self.limits.timeout;
            tokio::spawn(async move {
                // Dropping the connection closes it.
                let _ = tokio::time::timeout(timeout, connection).await;
                drop(slot);
            });
        }
    }
}

/// The handler's answer for GET and HEAD of an origin-form target
/// (`/path?query`), 405 for other methods, 400 for other targets.
fn respond<H: Fn(&str) -> Response>(
    request: &Request<Incoming>,
    handler: &H,
) -> hyper::Response<Full<Bytes>> {
    let uri = request.uri();
    let origin_form =
        uri.scheme().is_none() && uri.authority().is_none() && uri.path().starts_with('/');
    let response = if !origin_form {
        Response::new(400, TEXT, "400 Bad Request\n")
    } else if matches!(*request.method(), Method::GET | Method::HEAD) {
        handler(uri.path())
    } else {
        Response::new(405, TEXT, "405 Method Not Allowed\n")
    };
    encode(response)
}

/// The headers in the order svclb always sent them. hyper leaves the body
/// out of answers to HEAD.
fn encode(response: Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder()
        .status(response.status)
        .header(CONTENT_TYPE, response.content_type)
        .header(CONTENT_LENGTH, response.body.len())
        .header(X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(CONNECTION, "close");
    if response.status == 405 {
        builder = builder.header(ALLOW, "GET, HEAD");
    }
    for (name, value) in response.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from(response.body)))
        .expect("handlers answer with valid status codes and header values")
}

/// The raw response to `request`, as the client reads it until the server
/// closes the connection (empty if it closes without answering).
#[cfg(test)]
pub(crate) async fn send_raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    String::from_utf8(raw).unwrap()
}

/// A raw HTTP/1.1 client for the tests: sends `request` and returns
/// (status, headers lower-cased, body).
#[cfg(test)]
pub(crate) async fn send(addr: SocketAddr, request: &str) -> (u16, Vec<(String, String)>, String) {
    let raw = send_raw(addr, request.as_bytes()).await;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start_with(limits: Limits) -> SocketAddr {
        let server = Server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .with_limits(limits);
        let addr = server.local_addr();
        tokio::spawn(server.run(|path| match path {
            "/hello" => Response::new(200, TEXT, "hi"),
            _ => Response::not_found().with_header("X-Path", path),
        }));
        addr
    }

    async fn start() -> SocketAddr {
        start_with(Limits::default()).await
    }

    /// Which requests reach the handler, and with which path.
    #[tokio::test]
    async fn request_lines() {
        // (request, Some(path the handler sees) or None: not served)
        type Case = (&'static [u8], Option<&'static str>);
        let cases: &[Case] = &[
            (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                Some("/healthz"),
            ),
            (b"HEAD /livez?verbose=1 HTTP/1.0\r\n\r\n", Some("/livez")),
            (b"GET /metrics HTTP/1.1\r\n\r\n", Some("/metrics")),
            (b"GET /healthz HTTP/1.1", None),
            (b"GET healthz HTTP/1.1\r\n\r\n", None),
            (b"GET http://x/healthz HTTP/1.1\r\n\r\n", None),
            (b"GET /healthz SPDY/3\r\n\r\n", None),
            (b"GET  /healthz HTTP/1.1\r\n\r\n", None),
            (b"\xff\xfe /x HTTP/1.1\r\n\r\n", None),
        ];
        let addr = start().await;
        for (request, want) in cases {
            let raw = send_raw(addr, request).await;
            let served = raw
                .split("\r\n")
                .find_map(|line| line.strip_prefix("X-Path: "));
            assert_eq!(
                served,
                *want,
                "{:?}: {raw:?}",
                String::from_utf8_lossy(request)
            );
            if want.is_none() && !raw.is_empty() {
                assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{raw:?}");
            }
        }
    }

    /// The bytes svclb's hand-written server sent before hyper, kept.
    #[tokio::test]
    async fn responses_byte_for_byte() {
        let addr = start().await;
        let get = send_raw(addr, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(
            get,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\
             X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\nhi"
        );
        let head = send_raw(addr, b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(head, get.strip_suffix("hi").unwrap());
        let not_found = send_raw(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            not_found,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 19\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\
             X-Path: /nope\r\n\r\n404 page not found\n"
        );
        let post = send_raw(addr, b"POST /hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(
            post,
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 23\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\
             Allow: GET, HEAD\r\n\r\n405 Method Not Allowed\n"
        );
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

    /// Connections over the limit are closed unanswered; idle ones are
    /// closed after the timeout, and then probes are answered again.
    #[tokio::test]
    async fn idle_connections_are_limited_and_timed_out() {
        let timeout = Duration::from_millis(500);
        let addr = start_with(Limits {
            max_connections: 2,
            timeout,
        })
        .await;
        let started = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept both before the third arrives.
        tokio::time::sleep(Duration::from_millis(50)).await;

        let mut third = TcpStream::connect(addr).await.unwrap();
        let _ = third.write_all(b"GET /hello HTTP/1.1\r\n\r\n").await;
        let mut raw = Vec::new();
        let closed = tokio::time::timeout(timeout / 2, third.read_to_end(&mut raw)).await;
        assert!(closed.is_ok(), "over the limit but not closed at once");
        assert!(raw.is_empty(), "{:?}", String::from_utf8_lossy(&raw));

        for mut stream in idle {
            let mut raw = Vec::new();
            let closed = tokio::time::timeout(timeout * 4, stream.read_to_end(&mut raw)).await;
            assert!(closed.is_ok(), "idle connection still open");
            assert!(started.elapsed() >= timeout, "closed before the timeout");
        }
        assert_eq!(get(addr, "/hello").await.0, 200);
    }

    #[tokio::test]
    async fn bind_conflict_is_an_error() {
        let first = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let err = Server::bind(first.local_addr()).await.err().unwrap();
        assert!(err.to_string().starts_with("binding 127.0.0.1:"), "{err}");
    }
}
