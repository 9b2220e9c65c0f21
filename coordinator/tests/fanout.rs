//! A list change reaches 50 connected agents: a real coordinator gRPC server on loopback and 50
//! real agent-side followers (`kip_agent::follow::Follower`, which also persist the list).
//! The wait is bounded only to catch a lost update (no timing claim: the benchmark measures it).

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config_with;
use kip_agent::follow::{coordinator_channel, Follower, ListUpdate};
use kip_coordinator::auth::AgentAuth;
use kip_coordinator::{metrics::Metrics, state::State};
use tokio::sync::watch;

const AGENTS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_change_reaches_50_agents() {
    let hub = State::new(config_with("a=busybox;b=nginx"), Arc::new(Metrics::new()));
    let common::Served { url, shutdown, server } = common::serve(hub.clone(), AgentAuth::None).await;
    let state = tempfile::tempdir().unwrap();
    let mut receivers: Vec<watch::Receiver<Option<ListUpdate>>> = Vec::new();
    for i in 0..AGENTS {
        let (tx, rx) = watch::channel(None);
        let follower = Follower {
            channel: coordinator_channel(&url).unwrap(),
            token: Default::default(),
            url: url.clone(),
            node_name: format!("node-{i}"),
            state_dir: state.path().join(format!("node-{i}")),
            updates: tx,
            connected: Arc::new(tokio::sync::Notify::new()),
        };
        tokio::spawn(follower.run(shutdown.clone()));
        receivers.push(rx);
    }
    wait_for_generation(&mut receivers, 1, Duration::from_secs(60)).await;
    assert_eq!(hub.metrics.agents_connected.get(), AGENTS as i64);

    let started = Instant::now();
    assert_eq!(hub.publish(config_with("a=busybox;c=quay.io/x/c:1")), Some(2));
    wait_for_generation(&mut receivers, 2, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    println!("list change reached {AGENTS} agents in {:.1} ms", elapsed.as_secs_f64() * 1000.0);
    for rx in &receivers {
        let update = rx.borrow().clone().unwrap();
        assert_eq!(update.list.to_string(), "a=busybox;c=quay.io/x/c:1;");
    }
    // Every follower persisted the new list for a restart without the coordinator.
    let saved = kip_agent::follow::load_state(&state.path().join("node-49")).unwrap().unwrap();
    assert_eq!(saved.generation, 2);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

async fn wait_for_generation(receivers: &mut [watch::Receiver<Option<ListUpdate>>], generation: u64, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    for rx in receivers.iter_mut() {
        tokio::time::timeout_at(deadline, rx.wait_for(|u| u.as_ref().is_some_and(|u| u.generation == generation)))
            .await
            .unwrap_or_else(|_| panic!("generation {generation} did not arrive within {limit:?}"))
            .unwrap();
    }
}
