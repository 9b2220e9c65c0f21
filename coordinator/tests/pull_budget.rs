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
use kip_coordinator::hub::Hub;
use kip_coordinator::metrics::Metrics;
use tokio_util::sync::CancellationToken;

fn lease_client(url: &str, node: &str, timeout: Duration, stop: &CancellationToken) -> LeaseHandle {
    let (handle, task) = LeaseClient {
        channel: coordinator_channel(url).unwrap(),
        token: BearerToken::default(),
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

#[tokio::test]
async fn one_node_pulls_at_a_time_and_a_vanished_coordinator_is_not_waited_for_forever() {
    let raw: kip_coordinator::config::RawConfig = [("IMAGES", "a=busybox"), ("KIP_MAX_NODES_PULLING", "1")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let hub = Hub::new(kip_coordinator::config::validate(&raw).unwrap(), Arc::new(Metrics::new()));
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
