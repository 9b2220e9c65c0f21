//! An in-process Kubernetes API server, just enough of one for the coordinator's cluster side:
//! Nodes (list, watch, get, merge and JSON patches shown to the watch), the fallback DaemonSet
//! (get, server-side apply, list and watch), its pods (an empty list that stays so), Events,
//! Leases (get, create, apply and strategic patches with server-side apply's ownership of
//! `holderIdentity`, so two managers conflict as on a real API server), EndpointSlices (apply).
//! Every request is counted by verb (`list`, `watch`, `get`, `create`, `patch`, `delete`) and
//! resource, as `apiserver_request_total` would count it. Each [`FakeApi::door`] is one address;
//! a door can be broken (its requests hang, as across a network partition) without the others.

#![allow(dead_code, clippy::unwrap_used)] // a fixture: each user takes part of it

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::broadcast;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One change the watches see: the resource's collection path, and the watch event.
#[derive(Clone, Debug)]
struct Change {
    collection: String,
    rv: u64,
    event: Value,
}

#[derive(Default)]
struct Objects {
    /// By collection path (e.g. `/api/v1/nodes`), by name.
    items: BTreeMap<String, BTreeMap<String, Value>>,
    /// Who owns each Lease's `spec.holderIdentity` (server-side apply's field manager).
    holder_owner: BTreeMap<String, String>,
    rv: u64,
    /// Recent changes, replayed to a watch that starts from an older resourceVersion.
    history: std::collections::VecDeque<Change>,
}

const HISTORY: usize = 200_000;

/// What one request was: verb and resource (the collection's last segment).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Counted {
    pub verb: &'static str,
    pub resource: String,
}

/// A node label change as the API received it: which node, the value, and when.
#[derive(Clone, Debug)]
pub struct LabelWrite {
    pub node: String,
    pub value: Option<String>,
    pub at: Instant,
}

pub struct FakeApi {
    objects: Mutex<Objects>,
    changes: broadcast::Sender<Change>,
    counts: Mutex<BTreeMap<Counted, u64>>,
    label_writes: Mutex<Vec<LabelWrite>>,
}

type Counts = Mutex<BTreeMap<Counted, u64>>;

/// One address of the fake API; while broken, its requests hang. Counts its own requests too.
#[derive(Clone)]
pub struct Door {
    pub url: String,
    broken: Arc<AtomicBool>,
    counts: Arc<Counts>,
}

impl Door {
    pub fn set_broken(&self, broken: bool) {
        self.broken.store(broken, Ordering::SeqCst);
    }

    /// Requests through this door so far, by verb and resource.
    pub fn counts(&self) -> BTreeMap<Counted, u64> {
        self.counts.lock().unwrap().clone()
    }

    /// How many `verb` requests on `resource` came through this door.
    pub fn count(&self, verb: &str, resource: &str) -> u64 {
        self.counts().iter().filter(|(c, _)| c.verb == verb && c.resource == resource).map(|(_, n)| n).sum()
    }
}

pub const NODES: &str = "/api/v1/nodes";

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code.as_u16(), "message": message});
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

/// The kind of a list of `resource`'s objects (what the reflector expects to decode).
fn kind_of(collection: &str) -> (&'static str, &'static str) {
    match collection.rsplit('/').next().unwrap_or_default() {
        "nodes" => ("v1", "Node"),
        "pods" => ("v1", "Pod"),
        "daemonsets" => ("apps/v1", "DaemonSet"),
        "leases" => ("coordination.k8s.io/v1", "Lease"),
        "endpointslices" => ("discovery.k8s.io/v1", "EndpointSlice"),
        "events" => ("events.k8s.io/v1", "Event"),
        "configmaps" => ("v1", "ConfigMap"),
        "imagesets" => ("kip.eclipse.dev/v1alpha1", "ImageSet"),
        "secrets" => ("v1", "Secret"),
        _ => ("v1", "Unknown"),
    }
}

/// Whether a request for `requested` covers objects stored under `stored`: the same collection,
/// or a cluster-wide one (`/apis/G/V/R`) over a namespaced one (`/apis/G/V/namespaces/NS/R`).
fn covers(requested: &str, stored: &str) -> bool {
    if requested == stored {
        return true;
    }
    let (Some((prefix, resource)), Some((namespaced, stored_resource))) =
        (requested.rsplit_once('/'), stored.rsplit_once('/'))
    else {
        return false;
    };
    resource == stored_resource
        && namespaced
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("/namespaces/"))
            .is_some_and(|ns| !ns.contains('/'))
}

/// RFC 3339 in UTC at whole seconds.
pub fn timestamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    k8s_openapi::jiff::Timestamp::from_second(secs as i64).unwrap().to_string()
}

/// JSON merge patch (RFC 7386), which is also what a strategic patch of a Lease or a label does.
fn merge(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

impl FakeApi {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            objects: Mutex::new(Objects::default()),
            changes: broadcast::channel(1 << 16).0,
            counts: Mutex::new(BTreeMap::new()),
            label_writes: Mutex::new(Vec::new()),
        })
    }

    /// Adds `count` nodes `node-0`… created at `created`, without labels.
    pub fn add_nodes(&self, count: usize, created: std::time::SystemTime) {
        for i in 0..count {
            let name = format!("node-{i}");
            let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": format!("uid-{i}"), "creationTimestamp": timestamp(created), "labels": {"kubernetes.io/hostname": name}}});
            self.put(NODES, &name, node);
        }
    }

    /// Creates or replaces `object` (with its name) under `collection`, as an admin would.
    pub fn apply(&self, collection: &str, object: Value) -> Value {
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let mut object = object;
        let existing = self.get_object(collection, &name);
        let generation = existing.as_ref().and_then(|o| o["metadata"]["generation"].as_i64()).unwrap_or(0) + 1;
        object["metadata"]["generation"] = json!(generation);
        if object["metadata"].get("creationTimestamp").is_none() {
            object["metadata"]["creationTimestamp"] = json!(timestamp(std::time::SystemTime::now()));
        }
        if let Some(status) = existing.as_ref().map(|o| o["status"].clone()).filter(|s| !s.is_null()) {
            object["status"] = status;
        }
        self.put(collection, &name, object)
    }

    /// Deletes `name` from `collection`; the watches see it go.
    pub fn remove(&self, collection: &str, name: &str) {
        let mut objects = self.objects.lock().unwrap();
        if let Some(o) = objects.items.get_mut(collection).and_then(|c| c.remove(name)) {
            objects.rv += 1;
            let rv = objects.rv;
            let change =
                Change { collection: collection.to_string(), rv, event: json!({"type": "DELETED", "object": o}) };
            Self::announce(&mut objects, &self.changes, change);
        }
    }

    /// Sets a node's labels (an admin relabelling it); the watches see it.
    pub fn label_node(&self, name: &str, labels: Value) {
        let mut node = self.node(name).unwrap();
        node["metadata"]["labels"] = labels;
        self.put(NODES, name, node);
    }

    /// Every object stored under `collection`.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let o = self.objects.lock().unwrap();
        o.items.get(collection).map(|c| c.values().cloned().collect()).unwrap_or_default()
    }

    /// An object as stored.
    pub fn object(&self, collection: &str, name: &str) -> Option<Value> {
        self.get_object(collection, name)
    }

    /// Stores `object` under `collection`/`name` with a new resourceVersion; the watches see it.
    fn put(&self, collection: &str, name: &str, mut object: Value) -> Value {
        let mut o = self.objects.lock().unwrap();
        o.rv += 1;
        let rv = o.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["name"] = json!(name);
        let existed =
            o.items.entry(collection.to_string()).or_default().insert(name.to_string(), object.clone()).is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        let change =
            Change { collection: collection.to_string(), rv, event: json!({"type": kind, "object": object.clone()}) };
        Self::announce(&mut o, &self.changes, change);
        object
    }

    /// Records `change` and sends it to the watches (under the objects' lock: in order).
    fn announce(o: &mut Objects, changes: &broadcast::Sender<Change>, change: Change) {
        if o.history.len() == HISTORY {
            o.history.pop_front();
        }
        o.history.push_back(change.clone());
        let _ = changes.send(change);
    }

    fn get_object(&self, collection: &str, name: &str) -> Option<Value> {
        self.objects.lock().unwrap().items.get(collection).and_then(|c| c.get(name)).cloned()
    }

    /// Requests so far by verb and resource.
    pub fn counts(&self) -> BTreeMap<Counted, u64> {
        self.counts.lock().unwrap().clone()
    }

    /// Requests so far by verb, over every resource except `except`.
    pub fn by_verb(&self, except: &[&str]) -> BTreeMap<&'static str, u64> {
        let mut by = BTreeMap::new();
        for (c, n) in self.counts() {
            if !except.contains(&c.resource.as_str()) {
                *by.entry(c.verb).or_default() += n;
            }
        }
        by
    }

    /// Writes (create, patch, update, delete) so far, except to `except` resources.
    pub fn writes(&self, except: &[&str]) -> u64 {
        self.by_verb(except)
            .iter()
            .filter(|(v, _)| matches!(**v, "create" | "patch" | "update" | "delete"))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every node label write so far.
    pub fn label_writes(&self) -> Vec<LabelWrite> {
        self.label_writes.lock().unwrap().clone()
    }

    /// The node `name` as stored.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.get_object(NODES, name)
    }

    /// The Lease `name` in `namespace` as stored.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get_object(&format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"), name)
    }

    /// The EndpointSlice `name` in `namespace` as stored.
    pub fn endpoint_slice(&self, namespace: &str, name: &str) -> Option<Value> {
        self.get_object(&format!("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"), name)
    }

    fn count(&self, door: &Counts, verb: &'static str, collection: &str) {
        let resource = collection.rsplit('/').next().unwrap_or_default().to_string();
        let counted = Counted { verb, resource };
        *door.lock().unwrap().entry(counted.clone()).or_default() += 1;
        *self.counts.lock().unwrap().entry(counted).or_default() += 1;
    }

    /// A new address served until the process ends.
    pub async fn door(self: &Arc<Self>) -> Door {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let broken = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (api, flag, door_counts) = (self.clone(), broken.clone(), counts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (api, flag, door_counts) = (api.clone(), flag.clone(), door_counts.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (api, flag, door_counts) = (api.clone(), flag.clone(), door_counts.clone());
                        async move {
                            if flag.load(Ordering::SeqCst) {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Infallible>(api.handle(req, &door_counts).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Door { url, broken, counts }
    }

    /// A kubeconfig that points at `door`, without credentials.
    pub fn kubeconfig(door: &Door) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: kip\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            door.url
        )
    }

    async fn handle(self: Arc<Self>, req: Request<hyper::body::Incoming>, door: &Counts) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().trim_end_matches('/').to_string();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .map(|q| {
                q.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
            })
            .unwrap_or_default();
        let content_type =
            req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let manager = query.get("fieldManager").cloned().unwrap_or_default();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        // The custom resources it serves (what the coordinator asks before watching image sets).
        if path == "/apis/kip.eclipse.dev/v1alpha1" {
            self.count(door, "get", "discovery");
            return respond(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "kip.eclipse.dev/v1alpha1",
                    "resources": [{"name": "imagesets", "singularName": "imageset", "namespaced": true, "kind": "ImageSet",
                        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                        {"name": "imagesets/status", "singularName": "", "namespaced": true, "kind": "ImageSet",
                        "verbs": ["get", "patch", "update"]}]}),
            );
        }
        if path == "/apis" || path == "/api" {
            self.count(door, "get", "discovery");
            return respond(StatusCode::OK, &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}));
        }
        // A collection (…/nodes) or one object (…/nodes/NAME).
        let segments: Vec<&str> = path.split('/').collect();
        let collection_names = [
            "nodes",
            "pods",
            "daemonsets",
            "leases",
            "endpointslices",
            "events",
            "configmaps",
            "deployments",
            "imagesets",
            "secrets",
        ];
        // A status subresource (…/NAME/status) is patched as the object: a merge into `status`.
        let segments: Vec<&str> = match segments.split_last() {
            Some((&"status", rest)) => rest.to_vec(),
            _ => segments,
        };
        let path = segments.join("/");
        let (collection, name) = match segments.last() {
            Some(last) if collection_names.contains(last) => (path.clone(), None),
            Some(last) if segments.len() >= 2 && collection_names.contains(&segments[segments.len() - 2]) => {
                (segments[..segments.len() - 1].join("/"), Some(last.to_string()))
            }
            _ => return status(StatusCode::NOT_FOUND, "NotFound", &format!("no such path {path}")),
        };
        match (method, name) {
            (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.count(door, "watch", &collection);
                let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                self.watch(collection, since)
            }
            (Method::GET, None) => {
                self.count(door, "list", &collection);
                let o = self.objects.lock().unwrap();
                let field = query.get("fieldSelector").map(|f| f.replace("%3D", "=")).unwrap_or_default();
                let only = field.strip_prefix("metadata.name=").map(str::to_string);
                let items: Vec<Value> = o
                    .items
                    .iter()
                    .filter(|(stored, _)| covers(&collection, stored))
                    .flat_map(|(_, c)| c.iter())
                    .filter(|(n, _)| only.as_ref().is_none_or(|o| o == *n))
                    .map(|(_, v)| v.clone())
                    .collect();
                let (api_version, kind) = kind_of(&collection);
                respond(
                    StatusCode::OK,
                    &json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": o.rv.to_string()}, "items": items}),
                )
            }
            (Method::GET, Some(name)) => {
                self.count(door, "get", &collection);
                match self.get_object(&collection, &name) {
                    Some(o) => respond(StatusCode::OK, &o),
                    None => status(StatusCode::NOT_FOUND, "NotFound", &format!("{name} not found")),
                }
            }
            (Method::POST, _) => {
                self.count(door, "create", &collection);
                let name = body["metadata"]["name"].as_str().map(str::to_string).unwrap_or_else(|| {
                    let prefix = body["metadata"]["generateName"].as_str().unwrap_or("obj-").to_string();
                    format!("{prefix}{}", self.objects.lock().unwrap().rv + 1)
                });
                if self.get_object(&collection, &name).is_some() && !collection.ends_with("/events") {
                    return status(StatusCode::CONFLICT, "AlreadyExists", &format!("{name} already exists"));
                }
                let (api_version, kind) = kind_of(&collection);
                let mut object = body.clone();
                object["apiVersion"] = json!(api_version);
                object["kind"] = json!(kind);
                let stored = self.put(&collection, &name, object);
                respond(StatusCode::CREATED, &stored)
            }
            (Method::PATCH, Some(name)) => {
                self.count(door, "patch", &collection);
                self.patch(&collection, &name, &content_type, &manager, &body)
            }
            (Method::DELETE, Some(name)) => {
                self.count(door, "delete", &collection);
                let mut objects = self.objects.lock().unwrap();
                let removed = objects.items.get_mut(&collection).and_then(|c| c.remove(&name));
                match removed {
                    Some(o) => {
                        objects.rv += 1;
                        let rv = objects.rv;
                        let change = Change { collection, rv, event: json!({"type": "DELETED", "object": o}) };
                        Self::announce(&mut objects, &self.changes, change);
                        respond(StatusCode::OK, &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
                    }
                    None => status(StatusCode::NOT_FOUND, "NotFound", &format!("{name} not found")),
                }
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not served by the fake API"),
        }
    }

    fn patch(&self, collection: &str, name: &str, content_type: &str, manager: &str, patch: &Value) -> Response<Body> {
        let existing = self.get_object(collection, name);
        let apply = content_type.starts_with("application/apply-patch");
        let Some(mut object) = existing.clone().or_else(|| apply.then(|| json!({"metadata": {"name": name}}))) else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("{name} not found"));
        };
        if content_type.starts_with("application/json-patch") {
            let ops: json_patch::Patch = match serde_json::from_value(patch.clone()) {
                Ok(p) => p,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            if let Err(e) = json_patch::patch(&mut object, &ops) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string());
            }
        } else {
            if collection.ends_with("/leases") && patch["spec"].get("holderIdentity").is_some() {
                // Server-side apply: a field another manager set to another value is a conflict
                // unless forced; a merge or strategic patch takes the field over.
                let mut o = self.objects.lock().unwrap();
                let current = object["spec"]["holderIdentity"].clone();
                let owner = o.holder_owner.get(name).cloned();
                let wanted = &patch["spec"]["holderIdentity"];
                if apply && !current.is_null() && current != *wanted && owner.as_deref().is_some_and(|m| m != manager) {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "Apply failed with 1 conflict: conflict with another manager: .spec.holderIdentity",
                    );
                }
                if wanted.is_null() {
                    o.holder_owner.remove(name);
                } else {
                    o.holder_owner.insert(name.to_string(), manager.to_string());
                }
            }
            merge(&mut object, patch);
        }
        if collection == NODES {
            let label = |o: &Option<Value>| {
                o.as_ref().and_then(|o| o["metadata"]["labels"]["kip.eclipse.dev/agent"].as_str().map(str::to_string))
            };
            let after = Some(object.clone());
            if label(&existing) != label(&after) {
                self.label_writes.lock().unwrap().push(LabelWrite {
                    node: name.to_string(),
                    value: label(&after),
                    at: Instant::now(),
                });
            }
        }
        let (api_version, kind) = kind_of(collection);
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind);
        let stored = self.put(collection, name, object);
        respond(StatusCode::OK, &stored)
    }

    /// A watch of `collection` from resourceVersion `since`: the events as they come, one JSON
    /// document per line, until the client goes.
    fn watch(&self, collection: String, since: u64) -> Response<Body> {
        // Subscribed under the lock: no change falls between the history and the live feed.
        let (mut changes, missed) = {
            let o = self.objects.lock().unwrap();
            let missed: Vec<Change> =
                o.history.iter().filter(|c| c.rv > since && covers(&collection, &c.collection)).cloned().collect();
            (self.changes.subscribe(), missed)
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
        tokio::spawn(async move {
            for change in missed {
                if tx.send(Ok(Frame::data(Bytes::from(format!("{}\n", change.event))))).await.is_err() {
                    return;
                }
            }
            loop {
                let change = match changes.recv().await {
                    Ok(c) => c,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too far behind: "410 Gone", as an API server says; the client relists.
                        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}});
                        let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{gone}\n"))))).await;
                        return;
                    }
                    Err(_) => return,
                };
                if !covers(&collection, &change.collection) || change.rv <= since {
                    continue;
                }
                if tx.send(Ok(Frame::data(Bytes::from(format!("{}\n", change.event))))).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(http_body_util::BodyExt::boxed(StreamBody::new(stream)))
            .unwrap()
    }
}

/// Waits until `check` holds, or panics naming `what` after `limit`.
pub async fn until(what: &str, limit: Duration, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
