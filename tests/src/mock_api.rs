//! A Kubernetes API server at the HTTP level, just enough for kube-rs
//! watchers of Services, EndpointSlices and Nodes: list responses with a
//! resourceVersion and `?watch=true` streams of newline-delimited JSON
//! events, driven by the test (push events, bookmarks, disconnects, 410
//! Gone, failing requests).
//!
//! It speaks plain HTTP/1.1, one request per connection (`Connection:
//! close`), on 127.0.0.1 only: the host's, or a node's network namespace's
//! ([`MockApi::start_in`]) for an agent running there. Watches end after
//! their `timeoutSeconds`, as the API server's do. The server can go away
//! (its listener closed, every connection cut) and come back on the same
//! address. The API is synchronous so tests can be plain `#[test]`s; the
//! server runs on its own runtime, stopped on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The collections the mock serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

pub const ALL: [Resource; 3] = [
    Resource::Services,
    Resource::EndpointSlices,
    Resource::Nodes,
];

impl Resource {
    fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::Nodes => "/api/v1/nodes",
        }
    }

    fn of_kind(kind: &str) -> Resource {
        match kind {
            "Service" => Resource::Services,
            "EndpointSlice" => Resource::EndpointSlices,
            "Node" => Resource::Nodes,
            _ => panic!("the mock API serves no {kind}"),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How the mock answers requests for a collection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Normally.
    #[default]
    None,
    /// With this HTTP status and a Status body.
    Status(u16),
    /// By closing the connection without a response (server unreachable).
    Hangup,
    /// Watches: a 200 response, then nothing at all (no events, no
    /// bookmarks, no end at their timeout) while the connection stays
    /// open; live watches fall silent the same way and stay so after the
    /// fault is cleared. Lists are answered normally.
    Stall,
}

/// Requests answered for one collection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub lists: usize,
    pub watches: usize,
    /// Requests answered with a Fault.
    pub failed: usize,
    /// Watches answered with 410 Gone.
    pub gone: usize,
}

/// What a request selects, as the API server reads its query: a field
/// selector on the name (the Node watch uses it) and label selectors of
/// the form `!key` (kube-proxy's and svclb's Service and EndpointSlice
/// watches use them). Anything else panics: the mock would answer wrongly.
#[derive(Clone, Default)]
struct Selector {
    name: Option<String>,
    without_labels: Vec<String>,
}

impl Selector {
    fn parse(query: &BTreeMap<String, String>) -> Selector {
        let name = query.get("fieldSelector").map(|s| {
            let name = s.strip_prefix("metadata.name=");
            name.expect("unsupported fieldSelector").to_string()
        });
        let without_labels = (query.get("labelSelector").into_iter())
            .flat_map(|s| s.split(','))
            .map(|req| {
                let key = req.strip_prefix('!');
                key.expect("unsupported labelSelector").to_string()
            })
            .collect();
        Selector {
            name,
            without_labels,
        }
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        (self.name.is_none() || meta["name"].as_str() == self.name.as_deref())
            && (self.without_labels.iter()).all(|l| meta["labels"].get(l).is_none())
    }

    /// The event a watch with this selector gets for a change (None: none),
    /// as the API server sends it: an object that starts or stops matching
    /// is ADDED or DELETED for that watch.
    fn event(&self, kind: &'static str, obj: &Value, old: Option<&Value>) -> Option<&'static str> {
        let now = kind != "DELETED" && self.matches(obj);
        let before = match kind {
            "DELETED" => self.matches(obj),
            _ => old.is_some_and(|o| self.matches(o)),
        };
        match (before, now) {
            (false, true) => Some("ADDED"),
            (true, true) => Some("MODIFIED"),
            (true, false) => Some("DELETED"),
            (false, false) => None,
        }
    }
}

/// A live watch connection: what it selects, and where its event lines go.
struct Watcher {
    selector: Selector,
    tx: mpsc::UnboundedSender<String>,
}

struct Change {
    rv: u64,
    kind: &'static str,
    obj: Value,
    old: Option<Value>,
}

#[derive(Default)]
struct Collection {
    /// (namespace, name) -> object, with its resourceVersion.
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, event type, object, the object before).
    log: Vec<Change>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    compacted: u64,
    watchers: Vec<Watcher>,
    /// Watches that get nothing any more (Fault::Stall), held open.
    stalled: Vec<Watcher>,
    fault: Fault,
    counts: Counts,
    /// Every labelSelector the collection's requests carried.
    label_selectors: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion handed out, across collections like etcd's.
    rv: u64,
    collections: [Collection; 3],
    /// Events the clients created or patched (events.k8s.io/v1), in order.
    events: Vec<Value>,
    /// When each request answered normally (not with a Fault) came in.
    answered: Vec<Instant>,
}

impl State {
    fn collection(&mut self, r: Resource) -> &mut Collection {
        &mut self.collections[r.index()]
    }
}

pub struct MockApi {
    addr: SocketAddr,
    /// The network namespace it listens in (None: this process's).
    netns: Option<PathBuf>,
    state: Arc<Mutex<State>>,
    /// The accept loop, which owns the listener; None while stopped.
    listening: Mutex<Option<JoinHandle<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl MockApi {
    /// A server on 127.0.0.1 of this process's network namespace.
    pub fn start() -> MockApi {
        Self::start_on(None)
    }

    /// A server on 127.0.0.1 in the network namespace bound at `netns`
    /// (e.g. a node's, for the agent running there).
    pub fn start_in(netns: &Path) -> MockApi {
        Self::start_on(Some(netns))
    }

    fn start_on(netns: Option<&Path>) -> MockApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("mock API runtime");
        let listener = bind(netns, "127.0.0.1:0".parse().unwrap());
        let mock = MockApi {
            addr: listener.local_addr().unwrap(),
            netns: netns.map(Path::to_path_buf),
            state: Arc::new(Mutex::new(State {
                rv: 1,
                ..State::default()
            })),
            listening: Mutex::new(None),
            runtime: Some(runtime),
        };
        mock.listen(listener);
        mock
    }

    fn listen(&self, listener: std::net::TcpListener) {
        let runtime = self.runtime.as_ref().unwrap();
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(listener).expect("registering the listener")
        };
        let shared = self.state.clone();
        let task = runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, shared.clone()));
            }
        });
        *self.listening.lock().unwrap() = Some(task);
    }

    /// The server goes away as a killed process would: its listener is
    /// closed (connections are refused) and every open connection is cut.
    /// Its objects stay for [`Self::restart`].
    pub fn stop(&self) {
        let task = self.listening.lock().unwrap().take();
        let task = task.expect("the mock API is not running");
        task.abort();
        // The listener is closed once the aborted task is dropped.
        let _ = self.runtime.as_ref().unwrap().block_on(task);
        let mut state = self.state();
        for c in &mut state.collections {
            c.watchers.clear();
            c.stalled.clear();
        }
    }

    /// Listens again on the same address after [`Self::stop`].
    pub fn restart(&self) {
        self.listen(bind(self.netns.as_deref(), self.addr));
    }

    /// When the first request at or after `since` was answered normally.
    pub fn first_answer_since(&self, since: Instant) -> Option<Instant> {
        let state = self.state();
        state.answered.iter().copied().find(|t| *t >= since)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server: plain HTTP, no credentials.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: mock\n  cluster:\n    server: {}\n\
             users:\n- name: mock\n  user: {{}}\n\
             contexts:\n- name: mock\n  context:\n    cluster: mock\n    user: mock\n\
             current-context: mock\n",
            self.url()
        )
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Creates or replaces an object (its `kind` picks the collection):
    /// ADDED or MODIFIED to the watchers.
    pub fn apply(&self, mut obj: Value) {
        let r = Resource::of_kind(obj["kind"].as_str().expect("object without kind"));
        let mut state = self.state();
        state.rv += 1;
        let rv = state.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = state.collection(r);
        let old = c.objects.insert(key(&obj), obj.clone());
        let kind = if old.is_none() { "ADDED" } else { "MODIFIED" };
        c.record(Change { rv, kind, obj, old });
    }

    /// Deletes an object: DELETED to the watchers.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let r = Resource::of_kind(kind);
        let mut state = self.state();
        state.rv += 1;
        let rv = state.rv;
        let c = state.collection(r);
        let mut obj = (c.objects.remove(&(namespace.to_string(), name.to_string())))
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} to delete"));
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.record(Change {
            rv,
            kind: "DELETED",
            obj,
            old: None,
        });
    }

    /// Sends a BOOKMARK with the current resourceVersion to r's watchers.
    pub fn bookmark(&self, r: Resource) {
        let mut state = self.state();
        let rv = state.rv;
        let obj = json!({
            "kind": r.kind(),
            "apiVersion": r.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
        });
        let line = event_line("BOOKMARK", &obj);
        let c = state.collection(r);
        c.watchers.retain(|w| w.tx.send(line.clone()).is_ok());
    }

    /// Breaks r's watch connections (no final chunk: a lost connection).
    pub fn disconnect(&self, r: Resource) {
        let mut state = self.state();
        let c = state.collection(r);
        c.watchers.clear();
        c.stalled.clear();
    }

    /// Forgets r's history, as etcd compaction does: every watch that
    /// resumes from before now gets 410 Gone, so its client relists. Live
    /// watches are cut so that they resume.
    pub fn expire(&self, r: Resource) {
        let mut state = self.state();
        state.rv += 1;
        let rv = state.rv;
        let c = state.collection(r);
        c.compacted = rv;
        c.log.clear();
        c.watchers.clear();
    }

    /// Answers r's requests with `fault` from now on (Fault::None: normally).
    /// Watches already streaming are cut for Hangup and Status, silenced
    /// for Stall.
    pub fn set_fault(&self, r: Resource, fault: Fault) {
        let mut state = self.state();
        let c = state.collection(r);
        c.fault = fault;
        match fault {
            Fault::None => {}
            Fault::Stall => {
                for w in std::mem::take(&mut c.watchers) {
                    // Tells the connection to send nothing more, not even
                    // the end at its timeout.
                    let _ = w.tx.send(String::new());
                    c.stalled.push(w);
                }
            }
            Fault::Hangup | Fault::Status(_) => c.watchers.clear(),
        }
    }

    pub fn counts(&self, r: Resource) -> Counts {
        self.state().collection(r).counts
    }

    /// The events clients created or patched, in order.
    pub fn events(&self) -> Vec<Value> {
        self.state().events.clone()
    }

    /// The label selectors r's lists and watches asked for.
    pub fn label_selectors(&self, r: Resource) -> BTreeSet<String> {
        self.state().collection(r).label_selectors.clone()
    }

    /// Live watch connections of r.
    pub fn watchers(&self, r: Resource) -> usize {
        let mut state = self.state();
        let c = state.collection(r);
        c.watchers.retain(|w| !w.tx.is_closed());
        c.watchers.len()
    }
}

impl Drop for MockApi {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Collection {
    fn record(&mut self, change: Change) {
        self.watchers
            .retain(|w| match change.line_for(&w.selector) {
                Some(line) => w.tx.send(line).is_ok(),
                None => true,
            });
        self.log.push(change);
    }
}

impl Change {
    fn line_for(&self, selector: &Selector) -> Option<String> {
        let kind = selector.event(self.kind, &self.obj, self.old.as_ref())?;
        Some(event_line(kind, &self.obj))
    }
}

fn key(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    let namespace = meta["namespace"].as_str().unwrap_or("").to_string();
    let name = meta["name"]
        .as_str()
        .expect("object without name")
        .to_string();
    (namespace, name)
}

fn event_line(kind: &str, obj: &Value) -> String {
    format!("{}\n", json!({"type": kind, "object": obj}))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// What to send back for a request.
enum Answer {
    /// Close the connection without a response.
    Hangup,
    /// A complete JSON response.
    Json(u16, Value),
    /// A watch stream: these lines, then (when given) what the channel
    /// brings until it is closed or the timeout (when given) ends it.
    Watch(
        Vec<String>,
        Option<mpsc::UnboundedReceiver<String>>,
        Option<Duration>,
    ),
}

/// One request, one response, then the connection closes.
async fn serve(mut conn: TcpStream, state: Arc<Mutex<State>>) {
    let Some((method, target, body)) = read_request(&mut conn).await else {
        return;
    };
    let answer = match method.as_str() {
        "GET" => answer(&target, &mut state.lock().unwrap()),
        _ => write(&method, &target, &body, &mut state.lock().unwrap()),
    };
    let _ = match answer {
        Answer::Hangup => Ok(()),
        Answer::Json(code, body) => respond(&mut conn, code, &body).await,
        Answer::Watch(first, live, timeout) => stream(&mut conn, first, live, timeout).await,
    };
}

fn answer(target: &str, state: &mut State) -> Answer {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let Some(r) = ALL.into_iter().find(|r| r.path() == path) else {
        let body = status(404, "NotFound", &format!("the mock serves no {path}"));
        return Answer::Json(404, body);
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let selector = Selector::parse(&query);
    if let Some(labels) = query.get("labelSelector") {
        state.collection(r).label_selectors.insert(labels.clone());
    }
    let rv = state.rv;
    if !matches!(state.collection(r).fault, Fault::Hangup | Fault::Status(_)) {
        state.answered.push(Instant::now());
    }
    let c = state.collection(r);
    match c.fault {
        Fault::None | Fault::Stall => {}
        Fault::Hangup => {
            c.counts.failed += 1;
            return Answer::Hangup;
        }
        Fault::Status(code) => {
            c.counts.failed += 1;
            return Answer::Json(code, status(code, "InternalError", "injected by the test"));
        }
    }
    if !watch {
        c.counts.lists += 1;
        let items: Vec<Value> = c
            .objects
            .values()
            .filter(|o| selector.matches(o))
            .cloned()
            .collect();
        let list = json!({
            "kind": format!("{}List", r.kind()),
            "apiVersion": r.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        return Answer::Json(200, list);
    }
    c.counts.watches += 1;
    let from: u64 = (query.get("resourceVersion"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // As the API server does for an expired resourceVersion: 200, then an
    // ERROR event with a 410 Status, then the end of the stream.
    if from < c.compacted {
        c.counts.gone += 1;
        let message = format!("too old resource version: {from} ({rv})");
        let line = event_line("ERROR", &status(410, "Expired", &message));
        return Answer::Watch(vec![line], None, None);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    if c.fault == Fault::Stall {
        c.stalled.push(Watcher { selector, tx });
        return Answer::Watch(Vec::new(), Some(rx), None);
    }
    let timeout = (query.get("timeoutSeconds"))
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    // Replaying and registering under one lock: no event is missed or doubled.
    let replay: Vec<String> = (c.log.iter())
        .filter(|change| change.rv > from)
        .filter_map(|change| change.line_for(&selector))
        .collect();
    c.watchers.push(Watcher { selector, tx });
    Answer::Watch(replay, Some(rx), timeout)
}

/// Creating (POST) or patching (PATCH) an event is the only write the mock
/// takes: the agent's event recorder does both.
fn write(method: &str, target: &str, body: &[u8], state: &mut State) -> Answer {
    let path = target.split('?').next().unwrap_or(target);
    let is_events = path.starts_with("/apis/events.k8s.io/v1/namespaces/")
        && (path.ends_with("/events") || path.contains("/events/"));
    let Ok(event) = serde_json::from_slice::<Value>(body) else {
        return Answer::Json(400, status(400, "BadRequest", "body is not JSON"));
    };
    if !is_events || !matches!(method, "POST" | "PATCH") {
        let message = format!("the mock takes no {method} {path}");
        return Answer::Json(405, status(405, "MethodNotAllowed", &message));
    }
    state.events.push(event.clone());
    Answer::Json(if method == "POST" { 201 } else { 200 }, event)
}

/// Reads a request: its method, target and body (by Content-Length).
async fn read_request(conn: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut buf).await.ok()?;
        if n == 0 || data.len() > 64 * 1024 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let length: usize = (head.lines())
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = data[end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    let mut words = head.lines().next()?.split_whitespace();
    let method = words.next()?.to_string();
    Some((method, words.next()?.to_string(), body))
}

async fn respond(conn: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// A chunked watch response: `first`, then whatever `live` pushes (an
/// empty line: from now on nothing, not even the timeout's end). Ends
/// cleanly after `first` without `live`, and once `timeout` has passed;
/// when `live` is dropped (a disconnect), the connection is closed
/// mid-stream.
async fn stream(
    conn: &mut TcpStream,
    first: Vec<String>,
    live: Option<mpsc::UnboundedReceiver<String>>,
    timeout: Option<Duration>,
) -> std::io::Result<()> {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    conn.write_all(head.as_bytes()).await?;
    for line in first {
        write_chunk(conn, &line).await?;
    }
    let end = b"0\r\n\r\n";
    let Some(mut live) = live else {
        return conn.write_all(end).await;
    };
    // Far enough to mean never.
    let never = Duration::from_secs(86400);
    let mut deadline = tokio::time::Instant::now() + timeout.unwrap_or(never);
    loop {
        match tokio::time::timeout_at(deadline, live.recv()).await {
            // Stalled: nothing more comes on this channel.
            Ok(Some(line)) if line.is_empty() => deadline += never,
            Ok(Some(line)) => write_chunk(conn, &line).await?,
            Ok(None) => return Ok(()),
            Err(_) => return conn.write_all(end).await,
        }
    }
}

async fn write_chunk(conn: &mut TcpStream, data: &str) -> std::io::Result<()> {
    let chunk = format!("{:x}\r\n{data}\r\n", data.len());
    conn.write_all(chunk.as_bytes()).await?;
    conn.flush().await
}

/// A listener on `addr` in the network namespace bound at `netns`: bound
/// from a thread of its own that enters the namespace, so nothing else in
/// this process moves; the socket stays in that namespace. (std sets
/// SO_REUSEADDR, so the address can be bound again after a stop.)
fn bind(netns: Option<&Path>, addr: SocketAddr) -> std::net::TcpListener {
    let netns = netns.map(Path::to_path_buf);
    let listener = std::thread::spawn(move || {
        if let Some(ns) = netns {
            let file = File::open(&ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
            // SAFETY: setns(2) on a descriptor we own; only this thread,
            // which ends here, changes namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns {}: {}",
                ns.display(),
                std::io::Error::last_os_error()
            );
        }
        std::net::TcpListener::bind(addr)
    });
    let listener = listener.join().unwrap();
    let listener =
        listener.unwrap_or_else(|e| panic!("binding the mock API server on {addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    listener
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
