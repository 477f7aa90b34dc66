//! A stand-in for the Kubernetes API server (there is no API server package here): list and watch of `v1 Service`
//! and `discovery.k8s.io/v1 EndpointSlice` as the real one serves them — resource versions, pagination
//! (`limit`/`continue`), label selectors (objects leaving a watch's selector arrive as DELETED), BOOKMARK events,
//! ERROR 410 Gone for expired resource versions — with outages and disconnects under the test's control.
//! kube-rs stays the real client.
//!
//! The server runs on a thread of its own (inside a network namespace if asked), so tests drive it synchronously;
//! an outage drops that thread's runtime, which closes the listener and every connection.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State as AxumState};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    fn of(object: &Value) -> Kind {
        match object["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            other => panic!("fake API server: unsupported kind {other:?}"),
        }
    }
}

/// One change, with the object's previous version so each watch can apply its own selector.
struct Change {
    rv: u64,
    deleted: bool,
    object: Value,
    previous: Option<Value>,
}

struct Watch {
    selector: Selector,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Resource {
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    lists: usize,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resource version older than this get 410 Gone (the "compacted" history).
    oldest: u64,
    /// When false, changes are recorded but not sent to open watches (events the client misses).
    hold: bool,
    resources: [Resource; 2],
}

struct Server {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    netns: Option<String>,
    server: Option<Server>,
}

impl FakeApiServer {
    /// Serves on 127.0.0.1 (an ephemeral port) in the caller's network namespace.
    pub fn start() -> Self {
        Self::start_at(None)
    }

    /// Serves on 127.0.0.1 inside the namespace at `netns` (`/run/netns/NAME`).
    pub fn start_in(netns: &str) -> Self {
        Self::start_at(Some(netns.to_owned()))
    }

    fn start_at(netns: Option<String>) -> Self {
        let mut api = Self { state: Arc::default(), addr: "127.0.0.1:0".parse().unwrap(), netns, server: None };
        api.resume();
        api
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An outage: the port stops answering (connection refused) and open watches break.
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            server.thread.join().expect("fake API server thread");
        }
        for r in &mut self.lock().resources {
            r.watches.clear();
        }
    }

    /// Back after an outage, on the same address.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "already serving");
        let (state, addr, netns) = (Arc::clone(&self.state), self.addr, self.netns.clone());
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Some(ns) = &netns {
                super::netns::enter(ns);
            }
            let listener = std::net::TcpListener::bind(addr).expect("fake API server: bind");
            listener.set_nonblocking(true).unwrap();
            bound_tx.send(listener.local_addr().unwrap()).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = Router::new()
                    .route("/api/v1/services", get(services))
                    .route("/apis/discovery.k8s.io/v1/endpointslices", get(slices))
                    .with_state(state);
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task: clients see their streams cut.
        });
        self.addr = bound_rx.recv().expect("fake API server started");
        self.server = Some(Server { stop, thread });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object (`kind` says which), as `kubectl apply` does: ADDED or MODIFIED.
    pub fn apply(&self, mut object: Value) {
        let kind = Kind::of(&object);
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let key = object_key(&object);
        let r = &mut state.resources[kind.index()];
        let previous = r.objects.get(&key).cloned();
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = previous.as_ref().map_or_else(|| json!(format!("uid-{rv}")), |p| p["metadata"]["uid"].clone());
        meta["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
        r.objects.insert(key, object.clone());
        state.record(kind, Change { rv, deleted: false, object, previous });
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let r = &mut state.resources[kind.index()];
        let Some(mut object) = r.objects.remove(&(namespace.to_owned(), name.to_owned())) else {
            panic!("fake API server: no {} {namespace}/{name}", kind.name());
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.record(kind, Change { rv, deleted: true, object, previous: None });
    }

    /// While held, changes are not sent to open watches: the client misses them until it re-lists.
    pub fn hold_events(&self, hold: bool) {
        self.lock().hold = hold;
    }

    /// Expires every resource version seen so far, as etcd compaction does: open watches get ERROR 410 Gone and
    /// end, and resuming from an old version gets 410 too, so the client must re-list.
    pub fn expire(&self) {
        let mut state = self.lock();
        state.oldest = state.rv;
        state.hold = false;
        let rv = state.rv;
        for r in &mut state.resources {
            for w in r.watches.drain(..) {
                let _ = w.tx.send(gone(rv, rv));
            }
        }
    }

    /// Ends every open watch cleanly, as the server's watch timeout does; clients resume from their version.
    pub fn disconnect_watches(&self) {
        for r in &mut self.lock().resources {
            r.watches.clear();
        }
    }

    /// Sends a BOOKMARK with the current resource version to every open watch.
    pub fn bookmark(&self) {
        let mut state = self.lock();
        let rv = state.rv;
        for (i, r) in state.resources.iter_mut().enumerate() {
            let kind = [Kind::Service, Kind::EndpointSlice][i];
            let event = json!({"type": "BOOKMARK", "object": {
                "kind": kind.name(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}}});
            r.watches.retain(|w| w.tx.send(line(&event)).is_ok());
        }
    }

    /// How many list requests (pages) of `kind` have been served.
    pub fn lists(&self, kind: Kind) -> usize {
        self.lock().resources[kind.index()].lists
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl State {
    fn record(&mut self, kind: Kind, change: Change) {
        let hold = self.hold;
        let r = &mut self.resources[kind.index()];
        if !hold {
            r.watches.retain(|w| event_for(&w.selector, &change).is_none_or(|e| w.tx.send(e).is_ok()));
        }
        r.history.push(change);
    }
}

fn object_key(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or("default").to_owned(),
        meta["name"].as_str().expect("metadata.name").to_owned(),
    )
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn gone(asked: u64, oldest: u64) -> Bytes {
    line(&json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {asked} ({oldest})"), "reason": "Expired", "code": 410}}))
}

/// The event a watch with `selector` sees for `change`, as the API server's watch cache filters it.
fn event_for(selector: &Selector, change: &Change) -> Option<Bytes> {
    let now = selector.matches(&change.object);
    let before = change.previous.as_ref().is_some_and(|p| selector.matches(p));
    let kind = match (change.deleted, now, before) {
        (true, true, _) => "DELETED",
        (false, true, true) => "MODIFIED",
        (false, true, false) => "ADDED",
        (false, false, true) => "DELETED", // left the selector
        _ => return None,
    };
    Some(line(&json!({"type": kind, "object": change.object})))
}

async fn services(AxumState(state): AxumState<Arc<Mutex<State>>>, RawQuery(query): RawQuery) -> Response {
    handle(&state, Kind::Service, query.as_deref().unwrap_or(""))
}

async fn slices(AxumState(state): AxumState<Arc<Mutex<State>>>, RawQuery(query): RawQuery) -> Response {
    handle(&state, Kind::EndpointSlice, query.as_deref().unwrap_or(""))
}

fn handle(state: &Mutex<State>, kind: Kind, query: &str) -> Response {
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let selector = Selector::parse(params.get("labelSelector").map_or("", String::as_str));
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        watch(&mut state, kind, selector, from)
    } else {
        let limit = params.get("limit").and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
        let start = params.get("continue").and_then(|v| v.parse().ok()).unwrap_or(0);
        list(&mut state, kind, &selector, start, limit)
    }
}

fn list(state: &mut State, kind: Kind, selector: &Selector, start: usize, limit: usize) -> Response {
    let rv = state.rv;
    let r = &mut state.resources[kind.index()];
    r.lists += 1;
    let matching: Vec<&Value> = r.objects.values().filter(|o| selector.matches(o)).collect();
    let end = start.saturating_add(limit).min(matching.len());
    let items: Vec<Value> = matching[start.min(end)..end]
        .iter()
        .map(|o| {
            // List items carry no apiVersion/kind; the list does.
            let mut item = (*o).clone();
            item.as_object_mut().unwrap().retain(|k, _| k != "apiVersion" && k != "kind");
            item
        })
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < matching.len() {
        metadata["continue"] = json!(end.to_string());
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    let body = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(), "metadata": metadata, "items": items});
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn watch(state: &mut State, kind: Kind, selector: Selector, from: u64) -> Response {
    let (tx, rx) = mpsc::unbounded_channel();
    if from < state.oldest {
        let _ = tx.send(gone(from, state.oldest));
    } else {
        let r = &mut state.resources[kind.index()];
        for change in r.history.iter().filter(|c| c.rv > from) {
            if let Some(event) = event_for(&selector, change) {
                let _ = tx.send(event);
            }
        }
        r.watches.push(Watch { selector, tx });
    }
    let events = futures::stream::unfold(rx, |mut rx| async move { Some((Ok::<_, Infallible>(rx.recv().await?), rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(events))
        .unwrap()
}

/// Label selector requirements: `key`, `!key`, `key=value`, `key==value`, `key!=value`, comma-separated.
#[derive(Debug, Clone, Default)]
struct Selector(Vec<(String, Op)>);

#[derive(Debug, Clone)]
enum Op {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
}

impl Selector {
    fn parse(text: &str) -> Self {
        let reqs = text
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| {
                if let Some((k, v)) = r.split_once("!=") {
                    (k.to_owned(), Op::NotEquals(v.to_owned()))
                } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                    (k.to_owned(), Op::Equals(v.to_owned()))
                } else if let Some(k) = r.strip_prefix('!') {
                    (k.to_owned(), Op::NotExists)
                } else {
                    (r.to_owned(), Op::Exists)
                }
            })
            .collect();
        Self(reqs)
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.0.iter().all(|(key, op)| {
            let value = labels.get(key).and_then(Value::as_str);
            match op {
                Op::Exists => value.is_some(),
                Op::NotExists => value.is_none(),
                Op::Equals(v) => value == Some(v.as_str()),
                Op::NotEquals(v) => value != Some(v.as_str()),
            }
        })
    }
}

/// Decodes `application/x-www-form-urlencoded` text.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Service as the API server returns it (managed fields, last-applied annotation, status and all).
/// `ports` are `(name, port, targetPort)`; `cluster_ip` "None" makes it headless.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, ports: &[(&str, u16, Value)]) -> Value {
    let ports: Vec<Value> =
        ports.iter().map(|(n, p, t)| json!({"name": n, "protocol": "TCP", "port": p, "targetPort": t})).collect();
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}\n"},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                               "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:spec": {"f:ports": {}, "f:selector": {}}}}]
        },
        "spec": {
            "ports": ports,
            "selector": {"app": name},
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {}}
    })
}

/// An EndpointSlice as the EndpointSlice controller writes it: the service's labels copied, one endpoint per
/// address (`(ip, ready)`) on `node`, `ports` as `(name, port)`.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    addresses: &[(&str, bool)],
    node: &str,
) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .enumerate()
        .map(|(i, (ip, ready))| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": format!("{service}-{i}"), "uid": format!("pod-{i}")},
                "zone": "edge"
            })
        })
        .collect();
    let ports: Vec<Value> = ports.iter().map(|(n, p)| json!({"name": n, "protocol": "TCP", "port": p})).collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generateName": format!("{service}-"),
            "labels": {"app": service, "kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": "svc-uid",
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports
    })
}

/// Copies the service's label onto `object`'s labels (the EndpointSlice controller copies service labels).
pub fn with_label(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["labels"][key] = json!(value);
    object
}
