//! `--agent-auth tokenreview` end to end on loopback: the coordinator's real gRPC server, the
//! agent's real client code (the `Follower` and its token interceptor reading a token file), and
//! a stub API server answering TokenReviews and pod reads through a tower-test mock client.

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

mod common;

use common::{jwt, jwt_expiring_at, name_in};

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use kip::v1::NodeReport;
use kip_agent::follow::{self, coordinator_channel, BearerToken, Follower, ListUpdate};
use kip_coordinator::auth::{AgentAuth, TokenVerifier};
use kip_coordinator::{metrics::Metrics, state::State};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower_test::mock::{pair, Handle};

const AGENT: &str = "system:serviceaccount:kip:kip-agent";

/// What the stub API server says of each token, how many reviews it answered per token name, and
/// the most reviews it had in hand at once (each is answered after `delay`).
struct StubApi {
    reviews: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    pod_reads: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
}

fn review_of(token: &str) -> Value {
    let user = |username: &str, extra: Value| json!({"username": username, "extra": extra});
    let status = match name_in(token).as_str() {
        // A 1.30+ cluster: the node is in the token.
        "token-of-node-a" => json!({"authenticated": true, "audiences": ["kip"], "user": user(AGENT, json!({
            "authentication.kubernetes.io/pod-name": ["kip-agent-a"],
            "authentication.kubernetes.io/node-name": ["node-a"]}))}),
        // An older cluster: only the pod; its spec.nodeName is read.
        "token-of-pod-b" => json!({"authenticated": true, "audiences": ["kip"], "user": user(AGENT, json!({
            "authentication.kubernetes.io/pod-name": ["kip-agent-b"]}))}),
        "token-of-another-account" => json!({"authenticated": true, "audiences": ["kip"],
            "user": user("system:serviceaccount:default:default", json!({"authentication.kubernetes.io/node-name": ["node-a"]}))}),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": status})
}

impl StubApi {
    fn serve_slowly(mut handle: Handle<Request<Body>, Response<Body>>, delay: Duration) -> Self {
        let reviews = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let pod_reads = Arc::new(AtomicUsize::new(0));
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let in_hand = Arc::new(AtomicUsize::new(0));
        let (r, p, most) = (reviews.clone(), pod_reads.clone(), most_at_once.clone());
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (r, p, most, in_hand) = (r.clone(), p.clone(), most.clone(), in_hand.clone());
                most.fetch_max(in_hand.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (method, path) = (req.method().clone(), req.uri().path().to_string());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let (status, reply) = match (method, path.as_str()) {
                        (Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
                            let sent: Value = serde_json::from_slice(&body).unwrap();
                            assert_eq!(sent["spec"]["audiences"], json!(["kip"]), "the review asks for kip's audience");
                            let token = sent["spec"]["token"].as_str().unwrap().to_string();
                            *r.lock().unwrap().entry(name_in(&token)).or_default() += 1;
                            (StatusCode::CREATED, review_of(&token))
                        }
                        (Method::GET, "/api/v1/namespaces/kip/pods/kip-agent-b") => {
                            p.fetch_add(1, Ordering::SeqCst);
                            (
                                StatusCode::OK,
                                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kip-agent-b"}, "spec": {"nodeName": "node-b", "containers": []}}),
                            )
                        }
                        (m, other) => panic!("unexpected request {m} {other}"),
                    };
                    tokio::time::sleep(delay).await;
                    in_hand.fetch_sub(1, Ordering::SeqCst);
                    send.send_response(
                        Response::builder()
                            .status(status)
                            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                            .unwrap(),
                    );
                });
            }
        });
        Self { reviews, pod_reads, most_at_once }
    }

    fn reviews_of(&self, token: &str) -> usize {
        self.reviews.lock().unwrap().get(token).copied().unwrap_or(0)
    }
}

/// A coordinator with `--agent-auth tokenreview` whose verifier asks `api` (`None`: not reached).
async fn coordinator(api: Option<kube::Client>) -> (common::Served, Arc<State>) {
    let hub = State::new(common::config_with("a=busybox"), Arc::new(Metrics::new()));
    let (_, client) = watch::channel(api);
    let verifier = TokenVerifier::new(client, "kip:kip-agent".parse().unwrap(), "kip".into());
    (common::serve(hub.clone(), AgentAuth::TokenReview(verifier)).await, hub)
}

/// A coordinator whose verifier asks a stub API server answering each request after `delay`.
async fn coordinator_with_stub_api(delay: Duration) -> (StubApi, common::Served, Arc<State>) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    let api = StubApi::serve_slowly(handle, delay);
    let (served, hub) = coordinator(Some(kube::Client::new(service, "default"))).await;
    (api, served, hub)
}

/// A token file as the kubelet's projected volume holds it.
/// A token file holding `name`'s token, the same token at every call (it expires in 2096).
fn token_file(dir: &tempfile::TempDir, name: &str) -> BearerToken {
    raw_token_file(dir, &jwt_expiring_at(name, 4_000_000_000))
}

/// A token file holding `token` as it is.
fn raw_token_file(dir: &tempfile::TempDir, token: &str) -> BearerToken {
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    BearerToken { file: Some(file) }
}

async fn report(url: &str, token: BearerToken, node: &str) -> Result<(), tonic::Status> {
    let mut client = follow::client(coordinator_channel(url).unwrap(), token);
    client.report(NodeReport { node_name: node.into(), ..Default::default() }).await.map(|_| ())
}

#[tokio::test]
async fn only_the_agent_of_a_node_may_watch_and_report_as_that_node() {
    let (api, c, hub) = coordinator_with_stub_api(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();

    // The real follower with node-a's token receives the list.
    let (tx, mut rx) = watch::channel::<Option<ListUpdate>>(None);
    let follower = Follower {
        channel: coordinator_channel(&c.url).unwrap(),
        token: token_file(&dir, "token-of-node-a"),
        url: c.url.clone(),
        node_name: "node-a".into(),
        state_dir: dir.path().join("state"),
        updates: tx,
        connected: Arc::new(tokio::sync::Notify::new()),
    };
    tokio::spawn(follower.run(c.shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(Option::is_some)).await.unwrap().unwrap();
    assert_eq!(hub.metrics.agents_connected.get(), 1);

    // Its reports as node-a are taken (the review is cached: still one review of that token)...
    report(&c.url, token_file(&dir, "token-of-node-a"), "node-a").await.unwrap();
    assert_eq!(api.reviews_of("token-of-node-a"), 1);
    assert!(hub.nodes().contains_key("node-a"));
    // ...but not as node-b.
    let refused = report(&c.url, token_file(&dir, "token-of-node-a"), "node-b").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("node \"node-a\""), "{}", refused.message());
    assert!(!hub.nodes().contains_key("node-b"), "a refused report is not recorded");

    // No token, a bad one, another ServiceAccount's.
    let none = report(&c.url, BearerToken::default(), "node-a").await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    let bad = report(&c.url, token_file(&dir, "forged"), "node-a").await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::Unauthenticated);
    assert!(!bad.message().contains("forged"), "the token is never echoed: {}", bad.message());
    let other = report(&c.url, token_file(&dir, "token-of-another-account"), "node-a").await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied);

    // A rotated token file is read again; a token without a node claim binds to its pod's node.
    report(&c.url, token_file(&dir, "token-of-pod-b"), "node-b").await.unwrap();
    assert_eq!(api.pod_reads.load(Ordering::SeqCst), 1);
    assert!(hub.nodes().contains_key("node-b"));

    let metrics = hub.metrics.render();
    assert!(metrics.contains("kip_agent_calls_refused_total{reason=\"unauthenticated\"} 2"), "{metrics}");
    assert!(metrics.contains("kip_agent_calls_refused_total{reason=\"permission_denied\"} 2"), "{metrics}");
    c.shutdown.cancel();
}

#[tokio::test]
async fn without_an_api_to_verify_with_every_call_is_refused() {
    let (c, hub) = coordinator(None).await;
    let dir = tempfile::tempdir().unwrap();
    let refused = report(&c.url, token_file(&dir, "token-of-node-a"), "node-a").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let mut client = follow::client(coordinator_channel(&c.url).unwrap(), token_file(&dir, "token-of-node-a"));
    let watch = client.watch(kip::v1::WatchRequest { node_name: "node-a".into(), agent_version: "test".into() }).await;
    assert_eq!(watch.err().map(|s| s.code()), Some(tonic::Code::Unavailable));
    assert!(hub.nodes().is_empty());
    assert!(hub.metrics.render().contains("kip_agent_calls_refused_total{reason=\"unavailable\"} 2"));
    c.shutdown.cancel();
}

/// What anyone in the cluster can send costs the API server little: strings that are no token
/// of kip's (random, too long, expired, for another audience) are refused without a review; a
/// bad token sent again and again is reviewed once (its refusal is kept a while); and however
/// many calls come at once, at most 8 reviews are in flight.
#[tokio::test]
async fn junk_tokens_cost_no_review_a_repeated_bad_one_costs_one_and_reviews_are_bounded() {
    let (api, c, hub) = coordinator_with_stub_api(Duration::from_millis(200)).await;
    let dir = tempfile::tempdir().unwrap();

    let expired = jwt("token-of-node-a", Duration::ZERO);
    let long = format!("{}.{}.sig", "a".repeat(10_000), "b".repeat(10));
    let wrong_audience = {
        use base64::Engine as _;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            b64(json!({"alg": "RS256"})),
            b64(json!({"aud": ["api"], "exp": 4_000_000_000u64, "test": "token-of-node-a"}))
        )
    };
    for junk in ["random", "a.b", "x.y.z", "a.!!!.c", long.as_str(), expired.as_str(), wrong_audience.as_str()] {
        let refused = report(&c.url, raw_token_file(&dir, junk), "node-a").await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{junk:.40}: {refused:?}");
    }
    assert_eq!(api.reviews.lock().unwrap().values().sum::<usize>(), 0, "junk was sent to the API server");

    for _ in 0..20 {
        let refused = report(&c.url, token_file(&dir, "forged"), "node-a").await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }
    assert_eq!(api.reviews_of("forged"), 1, "a repeated bad token is reviewed once");

    let dirs: Vec<tempfile::TempDir> = (0..40).map(|_| tempfile::tempdir().unwrap()).collect();
    let calls = dirs.iter().enumerate().map(|(i, d)| {
        let url = c.url.clone();
        let token = token_file(d, &format!("flood-{i}"));
        async move { report(&url, token, "node-a").await }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(Result::is_err));
    let most = api.most_at_once.load(Ordering::SeqCst);
    assert!((1..=8).contains(&most), "{most} reviews were in flight at once");
    assert!(hub.nodes().is_empty());
    c.shutdown.cancel();
}

/// A Watch stream ends shortly before the token that opened it expires; the agent comes back
/// with its rotated token (reviewed again).
#[tokio::test]
async fn a_watch_stream_ends_before_its_token_expires() {
    let (_api, c, _hub) = coordinator_with_stub_api(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    // 32 s of life: the stream ends 30 s before, about 2 s from now.
    let token = raw_token_file(&dir, &jwt("token-of-node-a", Duration::from_secs(32)));
    let mut client = follow::client(coordinator_channel(&c.url).unwrap(), token);
    let mut stream = client
        .watch(kip::v1::WatchRequest { node_name: "node-a".into(), agent_version: "test".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some(), "the list comes first");
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.message()).await;
    assert!(matches!(ended, Ok(Ok(None))), "the stream outlived its token: {ended:?}");
    c.shutdown.cancel();
}
