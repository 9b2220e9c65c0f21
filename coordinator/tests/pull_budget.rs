//! The pull budget over real gRPC: the coordinator's `PullLease` and the agent's lease client on
//! loopback. With a budget of one node, a second node waits until the first gives its lease back;
//! a coordinator that went away is waited for only until the agent's lease timeout.

#![allow(clippy::unwrap_used)] // a failed unwrap fails the test

mod common;

use std::sync::Arc;
use std::time::Duration;

use kip_agent::follow::{coordinator_channel, BearerToken};
use kip_agent::lease::{LeaseClient, LeaseHandle};
use kip_coordinator::auth::AgentAuth;
use kip_coordinator::metrics::Metrics;
use kip_coordinator::state::State;
use tokio_util::sync::CancellationToken;

fn lease_client(url: &str, node: &str, timeout: Duration, stop: &CancellationToken) -> LeaseHandle {
    lease_client_with(url, node, timeout, stop, BearerToken::default())
}

fn lease_client_with(
    url: &str,
    node: &str,
    timeout: Duration,
    stop: &CancellationToken,
    token: BearerToken,
) -> LeaseHandle {
    let (handle, task) = LeaseClient {
        channel: coordinator_channel(url).unwrap(),
        token,
        node: node.into(),
        timeout,
        metrics: Arc::new(kip_agent::metrics::Metrics::new()),
    }
    .start(stop.clone());
    tokio::spawn(task);
    handle
}

/// Waits until `lease` may pull, or fails after `within`.
async fn allowed_within(lease: &mut Option<LeaseHandle>, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while !lease.as_ref().unwrap().may_pull() {
            LeaseHandle::changed(lease).await;
        }
    })
    .await
    .is_ok()
}

fn budget_of_one() -> Arc<State> {
    let raw: kip_coordinator::config::RawConfig = [("IMAGES", "a=busybox"), ("KIP_MAX_NODES_PULLING", "1")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    State::new(kip_coordinator::config::validate(&raw).unwrap(), Arc::new(Metrics::new()))
}

/// A restarted coordinator gave node-b the only slot before node-a's next renewal: node-a's
/// renewal is answered "not granted", and node-a starts no new pull until it is granted again
/// (two nodes pulling with a budget of one is what the budget exists to prevent).
#[tokio::test]
async fn a_renewal_answered_not_granted_stops_new_pulls_until_granted_again() {
    let first = budget_of_one();
    first.leases.set_ttl(Duration::from_secs(3));
    let served = common::serve(first, AgentAuth::None).await;
    let stop = CancellationToken::new();
    let mut a = Some(lease_client(&served.url, "node-a", Duration::from_secs(60), &stop));
    a.as_ref().unwrap().want(true);
    assert!(allowed_within(&mut a, Duration::from_secs(5)).await, "node-a gets the only slot");

    // The coordinator restarts; node-b holds the slot (renewing) before node-a renews.
    served.shutdown.cancel();
    let _ = served.server.await;
    let restarted = budget_of_one();
    restarted.leases.set_ttl(Duration::from_secs(3));
    let addr = served.url.trim_start_matches("http://").to_string();
    assert!(restarted.leases.acquire("node-b", || 1, &restarted.metrics).await.granted);
    let renewing_b = {
        let hub = restarted.clone();
        tokio::spawn(async move {
            loop {
                hub.leases.acquire("node-b", || 1, &hub.metrics).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let served = common::serve_on(restarted.clone(), AgentAuth::None, &addr).await;

    // node-a's renewal waits for a slot (10 s at most), then is answered "not granted".
    let lost = tokio::time::timeout(Duration::from_secs(30), async {
        while a.as_ref().unwrap().may_pull() {
            LeaseHandle::changed(&mut a).await;
        }
    })
    .await;
    assert!(lost.is_ok(), "node-a went on pulling without a lease while node-b held the only one");
    assert_eq!(restarted.status_json()["pull_leases"]["held"], serde_json::json!(["node-b"]));

    // node-b is done: node-a, still asking, holds the lease again.
    renewing_b.abort();
    restarted.leases.release("node-b", &restarted.metrics);
    assert!(allowed_within(&mut a, Duration::from_secs(15)).await, "node-a is granted again");
    assert_eq!(restarted.status_json()["pull_leases"]["held"], serde_json::json!(["node-a"]));
    stop.cancel();
    served.shutdown.cancel();
}

/// A coordinator that answers "cannot verify the token now" (the API server struggles) is not an
/// unreachable one: the agent keeps waiting for the budget past its lease timeout.
#[tokio::test]
async fn a_coordinator_that_cannot_verify_tokens_now_is_not_taken_for_an_unreachable_one() {
    let hub = budget_of_one();
    let (_, no_api) = tokio::sync::watch::channel(None);
    let verifier = kip_coordinator::auth::TokenVerifier::new(no_api, "kip:kip-agent".parse().unwrap(), "kip".into());
    let served = common::serve(hub.clone(), AgentAuth::TokenReview(verifier)).await;
    let stop = CancellationToken::new();
    let token = tempfile::NamedTempFile::new().unwrap();
    // A token kip would send for review: the verifier gets as far as the (missing) API server.
    std::fs::write(token.path(), common::jwt("token-of-node-a", Duration::from_secs(600))).unwrap();
    let token = BearerToken { file: Some(token.path().to_path_buf()) };
    let mut a = Some(lease_client_with(&served.url, "node-a", Duration::from_secs(1), &stop, token));
    a.as_ref().unwrap().want(true);
    assert!(
        !allowed_within(&mut a, Duration::from_secs(4)).await,
        "the agent pulled outside the budget after its 1 s lease timeout while the coordinator answered"
    );
    let text = hub.metrics.render();
    assert!(text.contains("reason=\"unavailable\""), "the refusals were counted: {text}");
    stop.cancel();
    served.shutdown.cancel();
}

#[tokio::test]
async fn one_node_pulls_at_a_time_and_a_vanished_coordinator_is_not_waited_for_forever() {
    let raw: kip_coordinator::config::RawConfig = [("IMAGES", "a=busybox"), ("KIP_MAX_NODES_PULLING", "1")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let hub = State::new(kip_coordinator::config::validate(&raw).unwrap(), Arc::new(Metrics::new()));
    let served = common::serve(hub.clone(), AgentAuth::None).await;
    let stop = CancellationToken::new();
    let mut a = Some(lease_client(&served.url, "node-a", Duration::from_secs(60), &stop));
    let mut b = Some(lease_client(&served.url, "node-b", Duration::from_secs(60), &stop));

    a.as_ref().unwrap().want(true);
    assert!(allowed_within(&mut a, Duration::from_secs(5)).await, "node-a gets the only slot");
    b.as_ref().unwrap().want(true);
    assert!(!allowed_within(&mut b, Duration::from_secs(2)).await, "node-b waits while node-a pulls");
    let status = hub.status_json();
    assert_eq!(status["pull_leases"], serde_json::json!({"budget": 1, "held": ["node-a"], "waiting": ["node-b"]}));

    a.as_ref().unwrap().want(false);
    assert!(allowed_within(&mut b, Duration::from_secs(5)).await, "node-b goes once node-a gave the lease back");
    assert!(!a.as_ref().unwrap().may_pull());
    let text = hub.metrics.render();
    assert!(text.contains("kip_pull_leases_in_use 1"), "{text}");
    assert!(text.contains("kip_pull_lease_wait_seconds_count 2"), "{text}");

    // The coordinator goes away while node-c waits: after its lease timeout it pulls on its own.
    served.shutdown.cancel();
    let _ = served.server.await;
    let mut c = Some(lease_client(&served.url, "node-c", Duration::from_secs(1), &stop));
    c.as_ref().unwrap().want(true);
    let started = tokio::time::Instant::now();
    assert!(allowed_within(&mut c, Duration::from_secs(10)).await, "node-c pulls without the coordinator");
    assert!(started.elapsed() >= Duration::from_secs(1), "not before the lease timeout: {:?}", started.elapsed());
    stop.cancel();
}
