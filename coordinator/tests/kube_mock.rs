//! The fallback controller against a mocked Kubernetes API server (kube-rs's tower-test
//! pattern): every request is checked — method, path, query, content type, body — and the
//! absence of requests when nothing changed.

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kip_coordinator::config::{validate, KipConfig, RawConfig};
use kip_coordinator::controller::daemonset::{DaemonSetController, DsOutcome};
use kip_coordinator::controller::labels::Labels;
use kip_coordinator::controller::{self, Cluster, Settings};
use kip_coordinator::manifest::{self, Options};
use kip_coordinator::metrics::Metrics;
use kip_coordinator::state::{ClusterCleanup, State};
use kip_coordinator::watches::{NodeFacts, NodeView, Touch};
use kip_coordinator::watches::{View, Workloads};
use kube::client::Body;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{json, Value};
use tower_test::mock::{pair, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

const DS_PATH: &str = "/apis/apps/v1/namespaces/k8s-image-puller/daemonsets/kubernetes-image-puller";

fn config(pairs: &[(&str, &str)]) -> KipConfig {
    let mut raw: RawConfig = BTreeMap::from([("IMAGES".to_string(), "a=busybox;b=nginx".to_string())]);
    raw.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    validate(&raw).unwrap()
}

fn mocked() -> (Arc<Cluster>, ApiHandle) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    (Arc::new(Cluster::new(client, Options::default(), None)), handle)
}

/// The DaemonSet controller and the label writer on the mocked API.
fn daemonset_controller(cluster: &Arc<Cluster>) -> DaemonSetController {
    DaemonSetController::new(cluster.clone())
}

fn labels(cluster: &Arc<Cluster>) -> Labels {
    Labels::new(cluster.client.clone())
}

/// Answers the next `expected.len()` requests in whatever order they come (the controllers run
/// side by side): each must match one (method, path) of `expected`, answered with its status and
/// reply. Returns each path's body.
async fn expect_unordered(
    handle: &mut ApiHandle,
    expected: Vec<(Method, String, StatusCode, Value)>,
) -> BTreeMap<String, Value> {
    let mut left = expected;
    let mut bodies = BTreeMap::new();
    while !left.is_empty() {
        let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
            .await
            .expect("a request in time")
            .expect("a request");
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let at = left.iter().position(|(m, p, _, _)| *m == method && *p == path).unwrap_or_else(|| {
            panic!(
                "unexpected {method} {path}; expected one of {:?}",
                left.iter().map(|(m, p, _, _)| format!("{m} {p}")).collect::<Vec<_>>()
            )
        });
        let (_, _, status, reply) = left.remove(at);
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        bodies.insert(path, body);
        send.send_response(
            Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
        );
    }
    bodies
}

/// Takes the next request, checks method and path, returns its query and JSON body.
async fn expect(
    handle: &mut ApiHandle,
    method: Method,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> (String, Option<String>, Value) {
    let (req, send) = handle.next_request().await.expect("a request");
    assert_eq!((req.method(), req.uri().path()), (&method, path));
    let query = req.uri().query().unwrap_or_default().to_string();
    let content_type = req.headers().get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string());
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    send.send_response(
        Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
    );
    (query, content_type, body)
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// The node watch, played by the test: nodes created long ago, with their agent label.
struct Nodes {
    writer: Writer<Node>,
    tx: tokio::sync::watch::Sender<u64>,
    view: NodeView,
}

impl Nodes {
    fn listed(nodes: &[(&str, Option<&str>)]) -> Self {
        let (view, mut writer, tx) = NodeView::played();
        // Listed (the store is ready), then the nodes as they come.
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let mut this = Self { writer, tx, view };
        for (name, label) in nodes {
            this.show(name, *label);
        }
        this
    }

    /// The watch shows `name` with `label` (an Apply event).
    fn show(&mut self, name: &str, label: Option<&str>) {
        let meta = ObjectMeta {
            name: Some(name.into()),
            labels: label.map(|v| BTreeMap::from([("kip.eclipse.dev/agent".to_string(), v.to_string())])),
            creation_timestamp: Some(Time("2020-01-01T00:00:00Z".parse().unwrap())),
            ..Default::default()
        };
        self.writer.apply_watcher_event(&watcher::Event::Apply(Node { metadata: meta, ..Default::default() }));
        self.changed(name);
    }

    /// The watch shows `node` as given (taints, creation time).
    fn show_node(&mut self, node: Value) {
        let node: Node = serde_json::from_value(node).unwrap();
        let name = node.metadata.name.clone().unwrap();
        self.writer.apply_watcher_event(&watcher::Event::Apply(node));
        self.changed(&name);
    }

    /// What the watch does after each event: the counter and the feed.
    fn changed(&self, name: &str) {
        self.tx.send_modify(|v| *v += 1);
        let _ = self.view.touched.send(Touch::One(name.to_string()));
    }

    fn facts(&self) -> Vec<NodeFacts> {
        self.view.facts()
    }
}

const GATE: &str = "kip.eclipse.dev/images-pending";

/// A node created `age` ago with `taints` (as JSON), as the API returns it.
fn tainted_node(name: &str, age: Duration, taints: Value) -> Value {
    node_created_at(name, std::time::SystemTime::now() - age, taints)
}

/// A node created at `created` with `taints`, as the API returns it.
fn node_created_at(name: &str, created: std::time::SystemTime, taints: Value) -> Value {
    let created = chrono_like(created);
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "creationTimestamp": created}, "spec": {"taints": taints}})
}

/// RFC 3339 in UTC, seconds precision (the API's format), without a date crate.
fn chrono_like(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let ts = k8s_openapi::jiff::Timestamp::from_second(secs as i64).unwrap();
    ts.to_string()
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn label_patch(value: Option<&str>) -> Value {
    json!({"metadata": {"labels": {"kip.eclipse.dev/agent": value}}})
}

fn report(node: &str, runtime: bool) -> kip::v1::NodeReport {
    kip::v1::NodeReport {
        node_name: node.into(),
        runtime: Some(kip::v1::RuntimeState {
            available: runtime,
            name: "containerd".into(),
            error: if runtime { String::new() } else { "no CRI socket found".into() },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The controller loop on the mocked API, with `hub` and the nodes the test plays.
struct Running {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(cluster: Arc<Cluster>, hub: &Arc<State>, nodes: &Nodes) -> Self {
        Self::start_with(cluster, hub, nodes, None, Settings::new(Duration::from_secs(3600)))
    }

    fn start_with(
        cluster: Arc<Cluster>,
        hub: &Arc<State>,
        nodes: &Nodes,
        workloads: Option<Workloads>,
        settings: Settings,
    ) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let run = controller::run(cluster, hub.clone(), nodes.view.clone(), workloads, settings, shutdown.clone());
        Self {
            shutdown,
            task: tokio::spawn(async move {
                run.await;
            }),
        }
    }

    /// SIGTERM: the loop ends; with `handle`, no request is left unanswered.
    async fn stop(self, handle: Option<ApiHandle>) {
        self.shutdown.cancel();
        self.task.await.unwrap();
        if let Some(mut handle) = handle {
            assert!(handle.next_request().await.is_none(), "an unexpected request was sent");
        }
    }
}

/// `/status` says the release is done (bounded so that a regression fails instead of hanging).
async fn wait_until_release_done(hub: &State) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while hub.status_json()["release"]["done"] != json!(true) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the release is done");
}

/// `check` holds within a bounded wait (the controller records after the API answered).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what}");
}

/// No request arrives for a while (the controller is idle).
async fn assert_quiet(handle: &mut ApiHandle, why: &str) {
    let quiet = tokio::time::timeout(Duration::from_millis(500), handle.next_request()).await;
    assert!(quiet.is_err(), "{why}: {:?}", quiet.map(|r| r.map(|(req, _)| req.uri().clone())));
}

async fn assert_no_more_requests(cluster: Arc<Cluster>, mut handle: ApiHandle) {
    drop(cluster);
    assert!(handle.next_request().await.is_none(), "an unexpected request was sent");
}

#[tokio::test]
async fn created_after_404_with_server_side_apply_then_nothing_when_unchanged() {
    let (fb, mut handle) = mocked();
    let mut ds = daemonset_controller(&fb);
    let cfg = config(&[]);
    let desired = manifest::fallback_daemonset(&cfg, &Options::default()).unwrap();
    let desired_json = serde_json::to_value(&desired).unwrap();
    let api = tokio::spawn(async move {
        expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
        let (query, ct, body) =
            expect(&mut handle, Method::PATCH, DS_PATH, StatusCode::CREATED, desired_json.clone()).await;
        assert!(query.contains("fieldManager=kip"), "{query}");
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(ct.as_deref(), Some("application/apply-patch+yaml"));
        assert_eq!(body, desired_json, "the applied object is the generated DaemonSet");
        handle
    });
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Created);
    let handle = api.await.unwrap();
    // Same config: no request at all.
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Unchanged);
    drop(ds);
    assert_no_more_requests(fb, handle).await;
}

#[tokio::test]
async fn an_existing_daemonset_with_the_same_hash_is_left_alone_and_a_changed_spec_is_applied() {
    let (fb, mut handle) = mocked();
    let mut ds = daemonset_controller(&fb);
    let cfg = config(&[]);
    let current = serde_json::to_value(manifest::fallback_daemonset(&cfg, &Options::default()).unwrap()).unwrap();
    let changed_cfg = config(&[("IMAGES", "a=busybox;b=nginx;c=redis")]);
    let changed =
        serde_json::to_value(manifest::fallback_daemonset(&changed_cfg, &Options::default()).unwrap()).unwrap();
    let api = tokio::spawn({
        let (current, changed) = (current.clone(), changed.clone());
        async move {
            expect(&mut handle, Method::GET, DS_PATH, StatusCode::OK, current.clone()).await;
            expect(&mut handle, Method::GET, DS_PATH, StatusCode::OK, current).await;
            let (_, _, body) = expect(&mut handle, Method::PATCH, DS_PATH, StatusCode::OK, changed.clone()).await;
            assert_eq!(body["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(), 3);
            handle
        }
    });
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Unchanged, "found with the same hash: no apply");
    assert_eq!(ds.sync(&changed_cfg).await.unwrap(), DsOutcome::Updated);
    let handle = api.await.unwrap();
    drop(ds);
    assert_no_more_requests(fb, handle).await;
}

#[tokio::test]
async fn a_daemonset_the_watch_shows_deleted_or_edited_is_applied_again_at_once() {
    let (fb, mut handle) = mocked();
    let mut ds = daemonset_controller(&fb);
    let cfg = config(&[]);
    let desired = serde_json::to_value(manifest::fallback_daemonset(&cfg, &Options::default()).unwrap()).unwrap();
    let api = tokio::spawn(async move {
        expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
        expect(&mut handle, Method::PATCH, DS_PATH, StatusCode::CREATED, desired.clone()).await;
        // Deleted behind kip's back: read once more (404) and applied again.
        expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
        let (query, _, _) = expect(&mut handle, Method::PATCH, DS_PATH, StatusCode::CREATED, desired.clone()).await;
        assert!(query.contains("fieldManager=kip"));
        // Edited (another hash): read and applied again.
        let mut edited = desired.clone();
        edited["metadata"]["annotations"]["kip.eclipse.dev/spec-hash"] = json!("edited");
        expect(&mut handle, Method::GET, DS_PATH, StatusCode::OK, edited).await;
        expect(&mut handle, Method::PATCH, DS_PATH, StatusCode::OK, desired.clone()).await;
        (handle, desired)
    });
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Created);
    // Until the watch has shown the created DaemonSet, its absence there is only lag.
    ds.observe(&cfg, None).await;
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Unchanged);
    let created = manifest::fallback_daemonset(&cfg, &Options::default()).unwrap();
    ds.observe(&cfg, Some(&created)).await;
    ds.observe(&cfg, None).await;
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Created);
    ds.observe(&cfg, Some(&created)).await;
    let mut edited = created.clone();
    edited.metadata.annotations.as_mut().unwrap().insert("kip.eclipse.dev/spec-hash".into(), "edited".into());
    ds.observe(&cfg, Some(&edited)).await;
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Updated);
    let (handle, desired) = api.await.unwrap();
    // What the watch shows next is kip's own object: nothing to do.
    ds.observe(&cfg, Some(&serde_json::from_value(desired).unwrap())).await;
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Unchanged);
    drop(ds);
    assert_no_more_requests(fb, handle).await;
}

/// kip's own DaemonSet is read, then deleted.
async fn expect_kips_daemonset_deleted(handle: &mut ApiHandle) {
    let ours = serde_json::to_value(manifest::fallback_daemonset(&config(&[]), &Options::default()).unwrap()).unwrap();
    expect(handle, Method::GET, DS_PATH, StatusCode::OK, ours).await;
    let success = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
    expect(handle, Method::DELETE, DS_PATH, StatusCode::OK, success).await;
}

#[tokio::test]
async fn cri_mode_deletes_only_kips_own_daemonset_once() {
    let (fb, mut handle) = mocked();
    let mut ds = daemonset_controller(&fb);
    let cfg = config(&[("KIP_MODE", "cri")]);
    let api = tokio::spawn(async move {
        expect_kips_daemonset_deleted(&mut handle).await;
        handle
    });
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Deleted);
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Unchanged);
    let handle = api.await.unwrap();
    drop(ds);
    assert_no_more_requests(fb, handle).await;

    // A DaemonSet of that name that kip did not create is not touched.
    let (fb, mut handle) = mocked();
    let mut ds = daemonset_controller(&fb);
    let api = tokio::spawn(async move {
        let foreign = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "kubernetes-image-puller", "namespace": "k8s-image-puller"}});
        expect(&mut handle, Method::GET, DS_PATH, StatusCode::OK, foreign).await;
        handle
    });
    assert_eq!(ds.sync(&cfg).await.unwrap(), DsOutcome::Unchanged);
    let handle = api.await.unwrap();
    drop(ds);
    assert_no_more_requests(fb, handle).await;
}

#[tokio::test]
async fn node_labels_are_patched_only_where_they_change() {
    let (fb, mut handle) = mocked();
    let labels = labels(&fb);
    let mut nodes = Nodes::listed(&[("fallback-node", Some("none")), ("new-node", None), ("old-node", Some("cri"))]);
    let api = tokio::spawn(async move {
        let (_, ct, body) =
            expect(&mut handle, Method::PATCH, "/api/v1/nodes/new-node", StatusCode::OK, node("new-node")).await;
        assert_eq!(ct.as_deref(), Some("application/merge-patch+json"));
        assert_eq!(body, label_patch(Some("cri")));
        let (_, _, body) =
            expect(&mut handle, Method::PATCH, "/api/v1/nodes/old-node", StatusCode::OK, node("old-node")).await;
        assert_eq!(body, label_patch(None), "removal is a null in a merge patch");
        handle
    });
    let desired = BTreeMap::from([
        ("fallback-node".to_string(), Some("none")),
        ("new-node".to_string(), Some("cri")),
        ("old-node".to_string(), None),
        ("deleted-node".to_string(), Some("cri")),
    ]);
    assert_eq!(labels.set_all(&desired, &nodes.facts()).await.unwrap(), 2);
    let handle = api.await.unwrap();
    // Before the watch shows the patches: nothing is sent twice.
    assert_eq!(labels.set_all(&desired, &nodes.facts()).await.unwrap(), 0);
    nodes.show("new-node", Some("cri"));
    nodes.show("old-node", None);
    assert_eq!(labels.set_all(&desired, &nodes.facts()).await.unwrap(), 0);
    drop(labels);
    assert_no_more_requests(fb, handle).await;
}

fn forbidden(message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": message})
}

/// A webhook refuses one node's label: the nodes after it are labelled all the same, and the
/// failure names the node.
#[tokio::test]
async fn one_node_refusing_its_label_does_not_keep_the_others_unlabelled() {
    let (fb, mut handle) = mocked();
    let labels = labels(&fb);
    let nodes = Nodes::listed(&[("a-node", None), ("b-node", None), ("c-node", None)]);
    let api = tokio::spawn(async move {
        for (node, status) in
            [("a-node", StatusCode::OK), ("b-node", StatusCode::FORBIDDEN), ("c-node", StatusCode::OK)]
        {
            let reply = if status == StatusCode::OK { self::node(node) } else { forbidden("denied by a webhook") };
            let (_, _, body) =
                expect(&mut handle, Method::PATCH, &format!("/api/v1/nodes/{node}"), status, reply).await;
            assert_eq!(body, label_patch(Some("cri")));
        }
        handle
    });
    let desired: BTreeMap<String, Option<&str>> =
        ["a-node", "b-node", "c-node"].iter().map(|n| (n.to_string(), Some("cri"))).collect();
    let failed = labels.set_all(&desired, &nodes.facts()).await.unwrap_err();
    assert_eq!(failed.patched, 2, "{failed}");
    assert_eq!(failed.failed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), vec!["b-node"]);
    assert!(failed.to_string().contains("b-node") && failed.to_string().contains("denied by a webhook"), "{failed}");
    let handle = api.await.unwrap();
    drop(labels);
    assert_no_more_requests(fb, handle).await;
}

/// The node controller: one node whose label a webhook refuses backs off alone; the others are
/// labelled at once, and only the refused one is tried again (after its backoff).
#[tokio::test]
async fn a_node_the_api_refuses_backs_off_alone_and_the_others_are_labelled() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[("KIP_MODE", "cri")]);
    let hub = State::new(cfg.clone(), Arc::new(Metrics::new()));
    let names = ["a-node", "b-node", "c-node"];
    let nodes = Nodes::listed(&names.iter().map(|n| (*n, None)).collect::<Vec<_>>());
    let running = Running::start(fb, &hub, &nodes);
    expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
    for n in names {
        hub.node_stream(n, true);
    }
    // KIP_MODE=cri wants no label; give each node one to take away.
    let mut nodes = nodes;
    for n in names {
        nodes.show(n, Some("cri"));
    }
    let expected = names
        .iter()
        .map(|n| {
            let (status, reply) = if *n == "b-node" {
                (StatusCode::FORBIDDEN, forbidden("denied by a webhook"))
            } else {
                (StatusCode::OK, node(n))
            };
            (Method::PATCH, format!("/api/v1/nodes/{n}"), status, reply)
        })
        .collect();
    let bodies = expect_unordered(&mut handle, expected).await;
    assert!(bodies.values().all(|b| *b == label_patch(None)), "{bodies:?}");
    nodes.show("a-node", None);
    nodes.show("c-node", None);
    let retry = tokio::time::timeout(
        Duration::from_secs(10),
        expect(&mut handle, Method::PATCH, "/api/v1/nodes/b-node", StatusCode::OK, node("b-node")),
    )
    .await
    .expect("the refused node is tried again after its backoff");
    assert_eq!(retry.2, label_patch(None));
    nodes.show("b-node", None);
    assert_quiet(&mut handle, "a node was patched again").await;
    running.stop(Some(handle)).await;
}

/// After a refused label the next try waits for the backoff: a storm of agent reports meanwhile
/// does not become a storm of PATCHes (each one a Warning Event too).
#[tokio::test]
async fn a_storm_of_reports_after_a_refused_label_waits_for_the_backoff() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[]);
    let hub = State::new(cfg.clone(), Arc::new(Metrics::new()));
    let nodes = Nodes::listed(&[("node-1", Some("cri"))]);
    let current = serde_json::to_value(manifest::fallback_daemonset(&cfg, &Options::default()).unwrap()).unwrap();
    let running = Running::start(fb, &hub, &nodes);
    expect(&mut handle, Method::GET, DS_PATH, StatusCode::OK, current).await;
    hub.node_stream("node-1", true);
    hub.record_report(report("node-1", false));
    let path = "/api/v1/nodes/node-1";
    let (_, _, body) = expect(&mut handle, Method::PATCH, path, StatusCode::FORBIDDEN, forbidden("denied")).await;
    assert_eq!(body, label_patch(Some("none")));
    for i in 0..20 {
        let mut r = report("node-1", false);
        r.generation = i;
        hub.record_report(r);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_quiet(&mut handle, "a report woke a retry before the backoff").await;
    // The retry comes with the backoff (1-2 s) and succeeds.
    let retry = tokio::time::timeout(
        Duration::from_secs(10),
        expect(&mut handle, Method::PATCH, path, StatusCode::OK, node("node-1")),
    )
    .await
    .expect("the label is tried again after the backoff");
    assert_eq!(retry.2, label_patch(Some("none")));
    running.stop(Some(handle)).await;
}

/// The controller loop of a coordinator that just restarted: it finds two labelled nodes and has
/// heard from no agent yet. During the grace it sends no label request at all; a report of a
/// missing runtime is evidence, and that node gets the fallback label at once.
#[tokio::test]
async fn a_restarted_coordinator_touches_no_label_during_the_grace_but_acts_on_evidence() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[]);
    let hub = State::new(cfg.clone(), Arc::new(Metrics::new()));
    let nodes = Nodes::listed(&[("node-1", Some("cri")), ("node-2", Some("cri"))]);
    let current = serde_json::to_value(manifest::fallback_daemonset(&cfg, &Options::default()).unwrap()).unwrap();
    let running = Running::start(fb, &hub, &nodes);

    expect(&mut handle, Method::GET, DS_PATH, StatusCode::OK, current).await;
    assert_quiet(&mut handle, "a label request right after the start").await;
    // Agents reconnect; one reports a working runtime: still nothing to change.
    hub.node_stream("node-1", true);
    hub.record_report(report("node-1", true));
    assert_quiet(&mut handle, "a label request during the grace").await;
    // node-2's agent reports that its runtime is gone: the fallback is needed there now.
    hub.node_stream("node-2", true);
    hub.record_report(report("node-2", false));
    let (_, _, body) = expect(&mut handle, Method::PATCH, "/api/v1/nodes/node-2", StatusCode::OK, node("node-2")).await;
    assert_eq!(body, label_patch(Some("none")));
    running.stop(Some(handle)).await;
}

/// A fresh install: no label anywhere. The DaemonSet is created but schedules nowhere (it needs
/// `kip.eclipse.dev/agent=none`); no node is labelled before its agent reports, except on
/// evidence: a node whose agent has no runtime gets the fallback at once.
#[tokio::test]
async fn a_fresh_install_schedules_the_fallback_only_where_an_agent_reports_no_runtime() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[]);
    let hub = State::new(cfg.clone(), Arc::new(Metrics::new()));
    let nodes = Nodes::listed(&[("a", None), ("b", None), ("c", None)]);
    let running = Running::start(fb, &hub, &nodes);
    expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
    let (_, _, applied) = expect(&mut handle, Method::PATCH, DS_PATH, StatusCode::CREATED, json!({})).await;
    let term = &applied["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0];
    assert_eq!(
        term["matchExpressions"],
        json!([{"key": "kip.eclipse.dev/agent", "operator": "In", "values": ["none"]}]),
        "the fallback runs only where kip found it is needed"
    );
    assert_quiet(&mut handle, "a label before any agent reported").await;
    hub.node_stream("b", true);
    hub.record_report(report("b", false));
    let (_, _, body) = expect(&mut handle, Method::PATCH, "/api/v1/nodes/b", StatusCode::OK, node("b")).await;
    assert_eq!(body, label_patch(Some("none")));
    hub.node_stream("a", true);
    hub.record_report(report("a", true));
    let (_, _, body) = expect(&mut handle, Method::PATCH, "/api/v1/nodes/a", StatusCode::OK, node("a")).await;
    assert_eq!(body, label_patch(Some("cri")));
    assert_quiet(&mut handle, "node c's agent has not reported: nothing for c during the grace").await;
    running.stop(None).await;
}

/// `helm uninstall`: the pre-delete hook's ConfigMap sets KIP_RELEASE. The DaemonSet goes first
/// (its pods would otherwise follow the labels), the labels only once every agent confirmed
/// it let go of its pins, and then all of them, both values.
#[tokio::test]
async fn the_uninstall_deletes_the_daemonset_then_waits_for_the_agents_then_takes_every_label() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[("KIP_RELEASE", "unpin")]);
    let hub = State::with_release_timeout(cfg, Arc::new(Metrics::new()), Duration::from_secs(3600));
    let nodes = Nodes::listed(&[("n1", Some("cri")), ("n2", Some("none")), ("n3", None)]);
    hub.node_stream("n1", true);
    hub.record_report(report("n1", true));
    let running = Running::start(fb, &hub, &nodes);
    expect_kips_daemonset_deleted(&mut handle).await;
    assert_quiet(&mut handle, "a label went before the agent confirmed").await;
    assert!(!hub.status_json()["release"]["done"].as_bool().unwrap());
    let mut released = report("n1", true);
    released.released = true;
    hub.record_report(released);
    let (_, _, body) = expect(&mut handle, Method::PATCH, "/api/v1/nodes/n1", StatusCode::OK, node("n1")).await;
    assert_eq!(body, label_patch(None));
    let (_, _, body) = expect(&mut handle, Method::PATCH, "/api/v1/nodes/n2", StatusCode::OK, node("n2")).await;
    assert_eq!(body, label_patch(None));
    wait_until_release_done(&hub).await;
    let (_, _, cluster) = hub.release_state(std::time::SystemTime::now()).unwrap();
    assert_eq!(cluster, ClusterCleanup::Done { labels_removed: 2 });
    assert_quiet(&mut handle, "nothing after the labels").await;
    let status = hub.status_json();
    assert_eq!((status["release"]["done"].clone(), status["release"]["incomplete"].clone()), (json!(true), json!([])));
    running.stop(Some(handle)).await;
}

/// A node whose agent never answers (powered off) cannot hold the uninstall: after the release
/// timeout the labels go anyway, and the status names the node that may keep kip's pins.
#[tokio::test]
async fn an_unreachable_node_ends_the_wait_at_the_release_timeout_and_is_named() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[("KIP_RELEASE", "unpin"), ("KIP_MODE", "cri")]);
    let hub = State::with_release_timeout(cfg, Arc::new(Metrics::new()), Duration::from_secs(1));
    let nodes = Nodes::listed(&[("dead", Some("cri"))]);
    let running = Running::start(fb, &hub, &nodes);
    expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
    // Bounded only so that a regression fails instead of hanging the test run.
    let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request()).await.unwrap().unwrap();
    assert_eq!((req.method(), req.uri().path()), (&Method::PATCH, "/api/v1/nodes/dead"));
    send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&node("dead")).unwrap())).unwrap());
    wait_until_release_done(&hub).await;
    let status = hub.status_json();
    assert_eq!(status["release"]["pending"]["dead"], json!("its agent is not connected"));
    let incomplete = status["release"]["incomplete"][0].as_str().unwrap();
    assert!(incomplete.starts_with("node dead: pins, state file or drop-in of kip's may be left"), "{incomplete}");
    running.stop(None).await;
}

fn unavailable() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "code": 503, "message": "etcdserver: leader changed"})
}

/// An API that fails at start-up: both lookups are tried again until they answer, and the
/// controller then knows it runs on OpenShift and who owns the DaemonSet.
#[tokio::test]
async fn start_up_lookups_are_retried_until_the_api_answers() {
    let (service, mut handle) = pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let api = tokio::spawn(async move {
        expect(&mut handle, Method::GET, "/apis", StatusCode::SERVICE_UNAVAILABLE, unavailable()).await;
        let groups = json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "route.openshift.io",
            "versions": [{"groupVersion": "route.openshift.io/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": "route.openshift.io/v1", "version": "v1"}}]});
        expect(&mut handle, Method::GET, "/apis", StatusCode::OK, groups).await;
        let path = "/apis/apps/v1/namespaces/kip/deployments/kip-coordinator";
        expect(&mut handle, Method::GET, path, StatusCode::SERVICE_UNAVAILABLE, unavailable()).await;
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "kip-coordinator", "namespace": "kip", "uid": "0b5e4a1c-0000-4000-8000-000000000001"}});
        expect(&mut handle, Method::GET, path, StatusCode::OK, deployment).await;
        handle
    });
    let fb = Arc::new(Cluster::discover(client, Some(("kip".into(), "kip-coordinator".into())), None).await);
    assert!(fb.options.openshift, "detected after the retry, not assumed false");
    let owner = fb.options.owner.clone().expect("an owner after the retry");
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Deployment", "kip-coordinator", Some(false))
    );
    let handle = api.await.unwrap();
    assert_no_more_requests(fb, handle).await;
}

/// SIGTERM while an API call hangs: the controller ends at once, the call is dropped.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_hanging_api_call() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[]);
    let hub = State::new(cfg, Arc::new(Metrics::new()));
    let nodes = Nodes::listed(&[]);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let controller = tokio::spawn({
        let shutdown = shutdown.clone();
        let view = nodes.view.clone();
        async move {
            let work = controller::run(fb, hub, view, None, Settings::new(Duration::from_secs(300)), shutdown.clone());
            controller::until_shutdown(&shutdown, async {
                work.await;
            })
            .await;
        }
    });
    // The first request arrives and is never answered.
    let (req, _never_answered) = handle.next_request().await.expect("a request");
    assert_eq!(req.uri().path(), DS_PATH);
    shutdown.cancel();
    // Bounded only so that a regression fails instead of hanging the test run.
    tokio::time::timeout(Duration::from_secs(30), controller).await.expect("the controller ended").unwrap();
}

/// `helm upgrade --set mode=daemonset` after auto mode: the new coordinator takes back the agent
/// labels an earlier process set, both values (the chart keeps the nodes ClusterRole in every
/// mode for this).
#[tokio::test]
async fn leaving_auto_mode_takes_back_labels_set_before() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[("KIP_MODE", "daemonset")]);
    let hub = State::new(cfg.clone(), Arc::new(Metrics::new()));
    let nodes = Nodes::listed(&[("node-1", Some("cri")), ("node-2", Some("none")), ("node-3", None)]);
    let current = serde_json::to_value(manifest::fallback_daemonset(&cfg, &Options::default()).unwrap()).unwrap();
    let running = Running::start(fb, &hub, &nodes);
    // The DaemonSet and the nodes are separate controllers: their requests come in any order.
    let mut expected = vec![(Method::GET, DS_PATH.to_string(), StatusCode::OK, current)];
    for n in ["node-1", "node-2"] {
        expected.push((Method::PATCH, format!("/api/v1/nodes/{n}"), StatusCode::OK, node(n)));
    }
    let bodies = expect_unordered(&mut handle, expected).await;
    for n in ["node-1", "node-2"] {
        assert_eq!(bodies[&format!("/api/v1/nodes/{n}")], label_patch(None));
    }
    running.stop(Some(handle)).await;
}

/// The ConfigMap through the API: the initial list publishes what the mounted copy may not have
/// yet, a MODIFIED event is published at once, and the uninstall hook's companion ConfigMap
/// turns into KIP_RELEASE. The directory reloader stands down once the API delivered.
#[tokio::test]
async fn the_config_map_is_followed_through_the_api_with_its_release_companion() {
    use kip_coordinator::reload::ConfigMapWatch;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (service, mut handle) = pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "kip");
    let hub = State::new(config(&[("IMAGES", "a=busybox")]), Arc::new(Metrics::new()));
    let api_active = Arc::new(AtomicBool::new(false));
    let watch = ConfigMapWatch {
        namespace: "kip".into(),
        name: "k8s-image-puller".into(),
        env: Default::default(),
        api_active: api_active.clone(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watch.run(client, hub.clone(), shutdown.clone()));
    let cm = |name: &str, rv: &str, data: Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "kip", "resourceVersion": rv}, "data": data});
    let mut held = Vec::new(); // watches left open: never answered, never failed
    let (mut main_watches, mut release_watches) = (0, 0);
    // Both watchers run at once: answer by what each request asks for.
    while main_watches + release_watches < 4 {
        let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request()).await.unwrap().unwrap();
        assert_eq!((req.method(), req.uri().path()), (&Method::GET, "/api/v1/namespaces/kip/configmaps"));
        let query = req.uri().query().unwrap_or_default().to_string();
        let release = query.contains("k8s-image-puller-release");
        let name = if release { "k8s-image-puller-release" } else { "k8s-image-puller" };
        assert!(query.contains(&format!("fieldSelector=metadata.name%3D{name}")), "only its own ConfigMap: {query}");
        let body = if !query.contains("watch=true") {
            let items =
                if release { json!([]) } else { json!([cm(name, "10", json!({"IMAGES": "a=busybox;b=nginx"}))]) };
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "10"}, "items": items}))
                .unwrap()
        } else {
            let (count, event) = if release {
                release_watches += 1;
                (release_watches, json!({"type": "ADDED", "object": cm(name, "12", json!({"KIP_RELEASE": "unpin"}))}))
            } else {
                main_watches += 1;
                (
                    main_watches,
                    json!({"type": "MODIFIED", "object": cm(name, "11", json!({"IMAGES": "a=busybox;b=nginx;c=redis"}))}),
                )
            };
            if count > 1 {
                held.push(send);
                continue;
            }
            let mut line = serde_json::to_vec(&event).unwrap();
            line.push(b'\n');
            line
        };
        send.send_response(Response::builder().body(Body::from(body)).unwrap());
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while hub.current().config.release != kip::v1::Release::Unpin || hub.current().config.images.len() != 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the change and the release reached the hub");
    assert!(api_active.load(Ordering::SeqCst), "the directory reloader stands down");
    assert_eq!(hub.metrics.config_reload_errors.get(), 0);
    shutdown.cancel();
    task.await.unwrap();
    drop(held);
}

fn gate_settings(timeout: Duration) -> Settings {
    Settings {
        gate: Some(kip_coordinator::gate::DEFAULT_GATE_TAINT.parse().unwrap()),
        gate_timeout: timeout,
        ..Settings::new(Duration::from_secs(3600))
    }
}

/// A report of a node whose agent has every image of `config(&[])` cached and pinned.
fn all_cached(node: &str) -> kip::v1::NodeReport {
    let mut r = report(node, true);
    r.images = [("a", "busybox"), ("b", "nginx")]
        .iter()
        .map(|(n, i)| kip::v1::ImageState {
            name: n.to_string(),
            image: i.to_string(),
            cached: true,
            pinned: true,
            ..Default::default()
        })
        .collect();
    r
}

fn invalid(message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422, "message": message})
}

fn removal(index: usize, taint: &Value) -> Value {
    let path = format!("/spec/taints/{index}");
    json!([{"op": "test", "path": path, "value": taint}, {"op": "remove", "path": path}])
}

/// A new node registered with the gate: held until its agent reports every image cached and
/// pinned, then the taint goes with a JSON patch that tests it at its index; when someone changed
/// the taints meanwhile (the API answers 422), the node is read again and the patch retried
/// against what it shows — the other taints are never rewritten.
#[tokio::test]
async fn the_gate_opens_when_the_agent_has_every_image_with_a_tested_patch_retried_on_conflict() {
    let (fb, mut handle) = mocked();
    let hub = State::new(config(&[("KIP_MODE", "cri")]), Arc::new(Metrics::new()));
    let gate = json!({"key": GATE, "effect": "NoSchedule"});
    let not_ready = json!({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"});
    let dedicated = json!({"key": "example.com/dedicated", "value": "ide", "effect": "NoSchedule"});
    let mut nodes = Nodes::listed(&[]);
    nodes.show_node(tainted_node("new", Duration::from_secs(60), json!([not_ready, gate])));
    nodes.show_node(tainted_node("plain", Duration::from_secs(60), json!([not_ready])));
    let running = Running::start_with(fb, &hub, &nodes, None, gate_settings(Duration::from_secs(3600)));
    expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
    assert_quiet(&mut handle, "the gate opened before the agent reported").await;
    assert_eq!(hub.status_json()["gate"]["held"], json!({"new": "its agent has not reported"}));
    hub.node_stream("new", true);

    let mut partial = all_cached("new");
    partial.images[1].cached = false;
    hub.record_report(partial);
    assert_quiet(&mut handle, "the gate opened with an image missing").await;
    assert_eq!(hub.status_json()["gate"]["held"]["new"], json!("1 of 2 images not cached yet: b"));

    hub.record_report(all_cached("new"));
    let path = "/api/v1/nodes/new";
    let (_, ct, body) =
        expect(&mut handle, Method::PATCH, path, StatusCode::UNPROCESSABLE_ENTITY, invalid("test failed")).await;
    assert_eq!(ct.as_deref(), Some("application/json-patch+json"));
    assert_eq!(body, removal(1, &gate));
    // The not-ready taint went and another came meanwhile: read again, retried at the new index.
    let now_shown = tainted_node("new", Duration::from_secs(60), json!([gate, dedicated]));
    expect(&mut handle, Method::GET, path, StatusCode::OK, now_shown).await;
    let (_, _, body) = expect(&mut handle, Method::PATCH, path, StatusCode::OK, node("new")).await;
    assert_eq!(body, removal(0, &gate));
    assert_quiet(&mut handle, "the gate was removed twice").await;

    eventually("the opening counted", || {
        let metrics = hub.metrics.render();
        metrics.contains("kip_gate_opened_total{reason=\"cached\"} 1") && metrics.contains("kip_gate_nodes_held 0")
    })
    .await;
    let status = hub.status_json();
    assert_eq!(
        (status["gate"]["opened"][0]["node"].clone(), status["gate"]["opened"][0]["reason"].clone()),
        (json!("new"), json!("cached"))
    );
    running.stop(Some(handle)).await;
}

/// A node deleted and registered again under its name (EKS reuses `ip-…` names): the report its
/// name's earlier node sent, received before this node was created, opens no gate; nor does the
/// report of an agent that is not connected. The new node's own report does.
#[tokio::test]
async fn an_earlier_nodes_report_or_a_disconnected_agents_opens_no_gate() {
    let (fb, mut handle) = mocked();
    let hub = State::new(config(&[("KIP_MODE", "cri")]), Arc::new(Metrics::new()));
    let gate = json!({"key": GATE, "effect": "NoSchedule"});
    let reused = "ip-10-0-0-1";
    hub.node_stream(reused, true);
    hub.record_report(all_cached(reused));
    hub.node_stream("gone-agent", true);
    hub.record_report(all_cached("gone-agent"));
    hub.node_stream("gone-agent", false);
    // Registered again two seconds after its name's last report (the API keeps whole seconds).
    let created = std::time::SystemTime::now() + Duration::from_secs(2);
    let mut nodes = Nodes::listed(&[]);
    nodes.show_node(node_created_at(reused, created, json!([gate])));
    nodes.show_node(tainted_node("gone-agent", Duration::from_secs(60), json!([gate])));
    let running = Running::start_with(fb, &hub, &nodes, None, gate_settings(Duration::from_secs(3600)));
    expect(&mut handle, Method::GET, DS_PATH, StatusCode::NOT_FOUND, not_found()).await;
    assert_quiet(&mut handle, "a gate opened on an earlier node's or a disconnected agent's report").await;
    let held = hub.status_json()["gate"]["held"].clone();
    assert!(held[reused].as_str().unwrap().contains("earlier node"), "{held}");
    assert_eq!(held["gone-agent"], json!("its agent is not connected"));

    // The new node's agent reports (after the node's creation): its gate opens.
    tokio::time::sleep(created.duration_since(std::time::SystemTime::now()).unwrap_or_default()).await;
    hub.record_report(all_cached(reused));
    let path = format!("/api/v1/nodes/{reused}");
    let (_, _, body) = expect(&mut handle, Method::PATCH, &path, StatusCode::OK, node(reused)).await;
    assert_eq!(body, removal(0, &gate));
    assert_quiet(&mut handle, "the disconnected agent's node opened").await;
    running.stop(Some(handle)).await;
}

/// The fallback pods' watch, played by the test.
struct Pods {
    writer: Writer<Pod>,
    tx: tokio::sync::watch::Sender<u64>,
    view: View<Pod>,
}

impl Pods {
    /// The watch shows `pod` (on its node).
    fn show(&mut self, pod: Pod) {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
        self.writer.apply_watcher_event(&watcher::Event::Apply(pod));
        self.tx.send_modify(|v| *v += 1);
        let _ = self.view.touched.send(Touch::One(node));
    }
}

/// Played DaemonSet and pod watches (listed): the DaemonSet shows `ds`, no pod yet.
fn played_workloads(ds: &Value) -> (Workloads, Pods) {
    let (daemonset, mut ds_writer, ds_tx) = View::played();
    ds_writer.apply_watcher_event(&watcher::Event::InitDone);
    ds_writer.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(ds.clone()).unwrap()));
    ds_tx.send_modify(|v| *v += 1);
    let (pods, mut writer, tx) = View::played();
    writer.apply_watcher_event(&watcher::Event::InitDone);
    tx.send_modify(|v| *v += 1);
    let workloads = Workloads {
        namespace: "k8s-image-puller".into(),
        name: "kubernetes-image-puller".into(),
        daemonset,
        pods: pods.clone(),
        set_daemonsets: None,
    };
    (workloads, Pods { writer, tx, view: pods })
}

/// Without an agent report a gated node opens when the fallback DaemonSet's pod on it is Ready
/// with every listed image, or unverified once the gate timeout has passed since its creation
/// (a broken registry never strands a node).
#[tokio::test]
async fn without_an_agent_the_gate_opens_on_a_ready_fallback_pod_or_at_the_timeout() {
    let (fb, mut handle) = mocked();
    let cfg = config(&[]);
    let hub = State::new(cfg.clone(), Arc::new(Metrics::new()));
    let gate = json!({"key": GATE, "effect": "NoSchedule"});
    let mut nodes = Nodes::listed(&[]);
    nodes.show_node(tainted_node("old", Duration::from_secs(7200), json!([gate])));
    nodes.show_node(tainted_node("fresh", Duration::from_secs(10), json!([gate])));
    let current = serde_json::to_value(manifest::fallback_daemonset(&cfg, &Options::default()).unwrap()).unwrap();
    let (workloads, mut pods) = played_workloads(&current);
    let running = Running::start_with(fb, &hub, &nodes, Some(workloads), gate_settings(Duration::from_secs(3600)));
    let bodies = expect_unordered(
        &mut handle,
        vec![
            (Method::GET, DS_PATH.to_string(), StatusCode::OK, current),
            (Method::PATCH, "/api/v1/nodes/old".to_string(), StatusCode::OK, node("old")),
        ],
    )
    .await;
    assert_eq!(bodies["/api/v1/nodes/old"], removal(0, &gate));
    assert_quiet(&mut handle, "the fresh node opened without evidence").await;

    // A pod of an older list (nginx missing) does not count; the current one does.
    let pod = |name: &str, images: &[&str]| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "k8s-image-puller", "labels": {"app.kubernetes.io/name": "kip-sleep", "app.kubernetes.io/instance": "kubernetes-image-puller"}},
            "spec": {"nodeName": "fresh", "containers": images.iter().map(|i| json!({"name": "c", "image": i})).collect::<Vec<_>>()},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap()
    };
    pods.show(pod("old-list", &["busybox"]));
    assert_quiet(&mut handle, "a pod of an older list opened the gate").await;
    pods.show(pod("current", &["busybox", "nginx"]));
    let (_, _, body) = expect(&mut handle, Method::PATCH, "/api/v1/nodes/fresh", StatusCode::OK, node("fresh")).await;
    assert_eq!(body, removal(0, &gate));

    eventually("both openings counted", || {
        let metrics = hub.metrics.render();
        metrics.contains("kip_gate_opened_total{reason=\"timeout\"} 1")
            && metrics.contains("kip_gate_opened_total{reason=\"fallback_ready\"} 1")
            && metrics.contains("kip_gate_nodes_held 0")
    })
    .await;
    running.stop(None).await;
}
