//! The manifests source (`svclb run --manifests DIR`): Services,
//! EndpointSlices and Nodes read from YAML/JSON files instead of the API
//! server, for tests, demos and clusters without kube-proxy's API access.
//!
//! Loading is forgiving: a document that does not parse is reported (file,
//! document, object) and skipped; the rest of the file still loads.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::debug;

use crate::model::Object;

/// A problem loading manifests. Always names the file, and for content
/// problems the document and, when readable, the object.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{origin}: {source}")]
    Io {
        origin: String,
        #[source]
        source: io::Error,
    },
    #[error("{origin}: {location}: {reason}")]
    Document {
        origin: String,
        location: Location,
        reason: String,
    },
}

/// Where in a file a document is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// 1-based index of the document in the file.
    pub doc: usize,
    /// 1-based line the document starts on.
    pub line: usize,
    /// 1-based index within a List's items.
    pub item: Option<usize>,
    /// "Kind namespace/name" when it could be read.
    pub object: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {} (line {})", self.doc, self.line)?;
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        if let Some(object) = &self.object {
            write!(f, ", {object}")?;
        }
        Ok(())
    }
}

/// Parses the Services, EndpointSlices and Nodes in a (multi-document) YAML
/// or JSON text; `kind: List` (and typed lists such as ServiceList) are
/// unpacked. Other kinds are ignored. `origin` names the text in errors.
pub fn parse_manifest(text: &str, origin: &str) -> (Vec<Object>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in split_documents(text).into_iter().enumerate() {
        let mut location = Location {
            doc: i + 1,
            line: doc.line,
            item: None,
            object: None,
        };
        let value: Value = match serde_saphyr::from_str(&doc.text) {
            Ok(value) => value,
            Err(_) => {
                // Parse again, shifted to its place in the file, so the
                // error's line numbers are the file's (errors are rare).
                let shifted = "\n".repeat(doc.line - 1) + &doc.text;
                let reason = match serde_saphyr::from_str::<Value>(&shifted) {
                    Err(err) => first_line(&err.to_string()),
                    Ok(_) => "YAML syntax error".to_string(),
                };
                errors.push(ManifestError::Document {
                    origin: origin.to_string(),
                    location,
                    reason,
                });
                continue;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing "---"
        }
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let Some(item_kind) = kind.strip_suffix("List") else {
            let result = parse_object(value, origin, &mut location);
            collect(result, origin, location, &mut objects, &mut errors);
            continue;
        };
        let api_version = value.get("apiVersion").cloned();
        let items = value.get("items").and_then(Value::as_array);
        for (j, item) in items.into_iter().flatten().enumerate() {
            let mut item = item.clone();
            // Lists as the API returns them (ServiceList, ...) leave out the
            // items' apiVersion and kind; a plain List's items have them.
            if let (Value::Object(m), false) = (&mut item, item_kind.is_empty()) {
                let kind = Value::from(item_kind);
                m.entry("kind").or_insert(kind);
                if let Some(api_version) = &api_version {
                    m.entry("apiVersion").or_insert(api_version.clone());
                }
            }
            let mut location = Location {
                item: Some(j + 1),
                ..location.clone()
            };
            let result = parse_object(item, origin, &mut location);
            collect(result, origin, location, &mut objects, &mut errors);
        }
    }
    (objects, errors)
}

fn collect(
    result: Result<Option<Object>, String>,
    origin: &str,
    location: Location,
    objects: &mut Vec<Object>,
    errors: &mut Vec<ManifestError>,
) {
    match result {
        Ok(Some(obj)) => objects.push(obj),
        Ok(None) => {}
        Err(reason) => errors.push(ManifestError::Document {
            origin: origin.to_string(),
            location,
            reason,
        }),
    }
}

/// One object; Ok(None) for kinds svclb does not use. Fills in
/// `location.object` as soon as the name can be read.
fn parse_object(
    value: Value,
    origin: &str,
    location: &mut Location,
) -> Result<Option<Object>, String> {
    if !value.is_object() {
        return Err("not a Kubernetes object (expected a mapping)".to_string());
    }
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    if let Some(name) = name {
        let kind = kind.unwrap_or("object");
        location.object = Some(match namespace {
            Some(namespace) => format!("{kind} {namespace}/{name}"),
            None => format!("{kind} {name}"),
        });
    }
    let (Some(api_version), Some(kind)) = (api_version, kind) else {
        return Err("apiVersion and kind are required".to_string());
    };
    match (api_version, kind) {
        ("v1", "Service") => typed(value).map(|o| Some(Object::Service(Box::new(o)))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed(value).map(|o| Some(Object::EndpointSlice(Box::new(o))))
        }
        ("v1", "Node") => typed(value).map(|o| Some(Object::Node(Box::new(o)))),
        _ => {
            debug!(origin, %location, api_version, kind, "ignoring a kind svclb does not use");
            Ok(None)
        }
    }
}

/// serde-saphyr's messages go on with a source snippet over several lines;
/// a log line keeps the first ("line L column C: what").
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// One YAML document's text, including its "---" line if it has one.
struct DocText {
    /// 1-based line of the file it starts on.
    line: usize,
    text: String,
}

/// Splits a YAML stream into documents, each parsed on its own so that a bad
/// document is reported with its place in the file and the documents after
/// it are still read. Splitting is exact because YAML only allows document
/// markers at the start of a line.
fn split_documents(text: &str) -> Vec<DocText> {
    let mut docs = Vec::new();
    // explicit: started by "---", so a document even when empty.
    let mut current = (
        DocText {
            line: 1,
            text: String::new(),
        },
        false,
    );
    let mut finish = |(doc, explicit): (DocText, bool)| {
        if explicit || !is_blank(&doc.text) {
            docs.push(doc);
        }
    };
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if is_marker(line, "---") {
            let start = DocText {
                line: number,
                text: format!("{line}\n"),
            };
            finish(std::mem::replace(&mut current, (start, true)));
        } else if is_marker(line, "...") {
            let next = DocText {
                line: number + 1,
                text: String::new(),
            };
            finish(std::mem::replace(&mut current, (next, false)));
        } else {
            current.0.text.push_str(line);
            current.0.text.push('\n');
        }
    }
    finish(current);
    docs
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// Only whitespace, comments and directives: not a document.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l.starts_with('%')
    })
}

/// Loads every *.yaml, *.yml and *.json file directly in `dir`, in name
/// order; hidden files are skipped. Unreadable files are reported and
/// skipped.
pub fn load_dir(dir: &Path) -> (Vec<Object>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    let files = match manifest_files(dir) {
        Ok(files) => files,
        Err(source) => {
            let origin = dir.display().to_string();
            return (objects, vec![ManifestError::Io { origin, source }]);
        }
    };
    for (path, _) in files {
        let origin = path.display().to_string();
        match fs::read_to_string(&path) {
            Ok(text) => {
                let (o, e) = parse_manifest(&text, &origin);
                debug!(
                    file = origin,
                    objects = o.len(),
                    errors = e.len(),
                    "loaded manifest"
                );
                objects.extend(o);
                errors.extend(e);
            }
            Err(source) => errors.push(ManifestError::Io { origin, source }),
        }
    }
    (objects, errors)
}

/// The manifest files in `dir`, sorted by name, with their metadata.
fn manifest_files(dir: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let ext = Path::new(name).extension().and_then(|e| e.to_str());
        if name.starts_with('.') || !matches!(ext, Some("yaml" | "yml" | "json")) {
            continue;
        }
        // Follows symlinks: a ConfigMap volume's files are symlinks into its
        // hidden ..data directory, swapped atomically on update.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push((path, meta)),
            Ok(_) => {}
            Err(err) => debug!(file = %path.display(), %err, "skipping unreadable entry"),
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// What a poll compares: file names, modification times and sizes. None
/// when the directory cannot be read (a change too, once it can again).
type Fingerprint = Option<Vec<(PathBuf, Option<SystemTime>, u64)>>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let files = manifest_files(dir).ok()?;
    let files = files
        .into_iter()
        .map(|(path, meta)| (path, meta.modified().ok(), meta.len()))
        .collect();
    Some(files)
}

/// Tells when the manifests in a directory changed.
///
/// It polls, by design: a listing plus one stat per file every 200 ms is a
/// bounded, negligible cost for a directory of manifests; it works the same
/// on every platform and file system (including ConfigMap volumes, whose
/// symlink swaps inotify reports awkwardly); and it needs no extra
/// dependency. The price is up to one interval of latency.
///
/// The listing is synchronous: it is a handful of syscalls, too cheap to be
/// worth a blocking-pool hop.
pub struct DirWatcher {
    dir: PathBuf,
    interval: Duration,
    seen: Fingerprint,
}

impl DirWatcher {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);

    /// Starts watching from the directory's current content. Create it
    /// before the first [`load_dir`], so that no change made during the load
    /// is missed.
    pub fn new(dir: &Path) -> Self {
        Self::with_interval(dir, Self::DEFAULT_INTERVAL)
    }

    pub fn with_interval(dir: &Path, interval: Duration) -> Self {
        Self {
            dir: dir.to_path_buf(),
            interval,
            seen: fingerprint(dir),
        }
    }

    /// Returns once the directory's manifests differ from when this was
    /// last called (or the watcher created). A file caught half-written
    /// changes again when the write completes, so the caller reloads twice
    /// rather than missing the final content.
    pub async fn changed(&mut self) {
        loop {
            tokio::time::sleep(self.interval).await;
            let now = fingerprint(&self.dir);
            if now != self.seen {
                self.seen = now;
                return;
            }
        }
    }
}

/// Manifests mode as a source: a snapshot of the directory at start and
/// after every change. Bad documents are logged and left out.
pub async fn run(dir: PathBuf, events: tokio::sync::mpsc::Sender<super::SourceEvent>) {
    let mut watcher = DirWatcher::new(&dir);
    let mut first = true;
    loop {
        let (objects, errors) = load_dir(&dir);
        for e in &errors {
            tracing::warn!("skipped manifest: {e}");
        }
        if events
            .send(super::SourceEvent::Snapshot(objects))
            .await
            .is_err()
        {
            return;
        }
        if std::mem::take(&mut first) && events.send(super::SourceEvent::Synced).await.is_err() {
            return;
        }
        watcher.changed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  clusterIP: 198.18.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
";

    const SLICE: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: demo
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: [198.19.0.1]
  conditions: {ready: true}
";

    const NODE: &str = "\
apiVersion: v1
kind: Node
metadata:
  name: node-a
";

    fn kinds(objs: &[Object]) -> Vec<String> {
        let name = |o: &Object| o.metadata().name.clone().unwrap_or_default();
        objs.iter()
            .map(|o| format!("{} {}", o.kind(), name(o)))
            .collect()
    }

    fn messages(errors: &[ManifestError]) -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn multi_document() {
        let text = format!("---\n{SERVICE}---\n{SLICE}\n---\n# nothing\n---\n{NODE}...\n");
        let (objs, errors) = parse_manifest(&text, "a.yaml");
        assert!(errors.is_empty(), "{:?}", messages(&errors));
        assert_eq!(
            kinds(&objs),
            ["Service web", "EndpointSlice web-abc", "Node node-a"]
        );
        let Object::Service(svc) = &objs[0] else {
            panic!("not a service")
        };
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("198.18.0.10"));
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 80);
    }

    #[test]
    fn empty_inputs() {
        for text in ["", "\n", "# only a comment\n", "---\n", "---\n---\n...\n"] {
            let (objs, errors) = parse_manifest(text, "e.yaml");
            assert!(objs.is_empty() && errors.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn list_and_typed_list() {
        let text = "\
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: n1}}
- {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}
---
apiVersion: v1
kind: NodeList
items:
- metadata: {name: n2}
---
{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": []}
";
        let (objs, errors) = parse_manifest(text, "l.yaml");
        assert!(errors.is_empty(), "{:?}", messages(&errors));
        assert_eq!(kinds(&objs), ["Node n1", "Node n2"]);
    }

    #[test]
    fn json() {
        let text = "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Node\",\n\t\"metadata\": {\"name\": \"n\"}\n}\n";
        let (objs, errors) = parse_manifest(text, "n.json");
        assert!(errors.is_empty(), "{:?}", messages(&errors));
        assert_eq!(kinds(&objs), ["Node n"]);
    }

    #[test]
    fn unknown_kinds_ignored() {
        let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec: {replicas: {not: valid}}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
";
        let (objs, errors) = parse_manifest(text, "u.yaml");
        assert!(objs.is_empty() && errors.is_empty());
    }

    /// Each bad document is reported with file, document, line and object;
    /// the good ones around it still load.
    #[test]
    fn bad_documents_among_good_ones() {
        let text = format!(
            "{SERVICE}---
apiVersion: v1
kind: Service
metadata: {{name: broken, namespace: demo}}
spec: {{ports: [{{port: \"eighty\"}}]}}
---
a: [1
---
b: *nowhere
---
- 1
---
metadata: {{name: kindless}}
---
apiVersion: v1
kind: List
items:
- {{apiVersion: v1, kind: Node, metadata: {{name: ok}}}}
- {{apiVersion: v1, kind: Node, metadata: {{name: bad, labels: 7}}}}
---
{NODE}"
        );
        let (objs, errors) = parse_manifest(&text, "dir/bad.yaml");
        assert_eq!(kinds(&objs), ["Service web", "Node ok", "Node node-a"]);
        let errors = messages(&errors);
        let expect = [
            "dir/bad.yaml: document 2 (line 12), Service demo/broken: ",
            "dir/bad.yaml: document 3 (line 17): ",
            "dir/bad.yaml: document 4 (line 19): line 20 column 4: alias references unknown anchor",
            "dir/bad.yaml: document 5 (line 21): not a Kubernetes object",
            "dir/bad.yaml: document 6 (line 23), object kindless: apiVersion and kind are required",
            "dir/bad.yaml: document 7 (line 25), item 2, Node bad: ",
        ];
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
        for (error, prefix) in errors.iter().zip(expect) {
            assert!(
                error.starts_with(prefix),
                "{error:?} should start with {prefix:?}"
            );
        }
        // The syntax error's position is the file's, not the document's.
        assert!(errors[1].contains("line 18"), "{}", errors[1]);
    }

    #[test]
    fn split_keeps_inline_document_content() {
        let (objs, errors) = parse_manifest(
            "--- {apiVersion: v1, kind: Node, metadata: {name: x}}\n",
            "i",
        );
        assert!(errors.is_empty(), "{:?}", messages(&errors));
        assert_eq!(kinds(&objs), ["Node x"]);
        // "---" inside a line or indented is content, not a marker.
        assert!(!is_marker("  ---", "---") && !is_marker("---x", "---"));
        assert!(is_marker("---", "---") && is_marker("--- # c", "---"));
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("svclb-manifests-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn load_dir_picks_manifest_files_in_name_order() {
        let tmp = TempDir::new("load");
        let dir = &tmp.0;
        fs::write(dir.join("b.yml"), SLICE).unwrap();
        fs::write(dir.join("a.yaml"), SERVICE).unwrap();
        fs::write(
            dir.join("c.json"),
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"}}"#,
        )
        .unwrap();
        fs::write(dir.join(".hidden.yaml"), NODE).unwrap();
        fs::write(dir.join("notes.txt"), NODE).unwrap();
        fs::write(dir.join("d.yaml"), "a: [1\n").unwrap();
        fs::create_dir(dir.join("sub.yaml")).unwrap();
        fs::write(dir.join("sub.yaml/x.yaml"), NODE).unwrap();

        let (objs, errors) = load_dir(dir);
        assert_eq!(
            kinds(&objs),
            ["Service web", "EndpointSlice web-abc", "Node n"]
        );
        let errors = messages(&errors);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("d.yaml: document 1 (line 1)"),
            "{errors:?}"
        );

        let (objs, errors) = load_dir(&dir.join("missing"));
        assert!(objs.is_empty());
        assert!(messages(&errors)[0].contains("missing"));
    }

    #[tokio::test]
    async fn watcher_sees_changes() {
        use tokio::time::timeout;
        let tmp = TempDir::new("watch");
        let dir = &tmp.0;
        let interval = Duration::from_millis(10);
        let quiet = Duration::from_millis(100);
        let soon = Duration::from_secs(5);
        let mut watcher = DirWatcher::with_interval(dir, interval);
        assert!(
            timeout(quiet, watcher.changed()).await.is_err(),
            "no change yet"
        );

        fs::write(dir.join("a.yaml"), NODE).unwrap();
        assert!(timeout(soon, watcher.changed()).await.is_ok(), "file added");
        assert!(
            timeout(quiet, watcher.changed()).await.is_err(),
            "seen already"
        );

        fs::write(dir.join("a.yaml"), SERVICE).unwrap();
        assert!(
            timeout(soon, watcher.changed()).await.is_ok(),
            "file changed"
        );

        fs::write(dir.join("ignored.txt"), "x").unwrap();
        fs::write(dir.join(".hidden.yaml"), "x").unwrap();
        assert!(
            timeout(quiet, watcher.changed()).await.is_err(),
            "not manifests"
        );

        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert!(
            timeout(soon, watcher.changed()).await.is_ok(),
            "file removed"
        );
    }
}
