//! Two coordinators and one Lease on the fake API server (`common::fake_api`, which conflicts a
//! second holder as server-side apply does): at no moment do both lead, a leader that shuts down
//! hands over, and a leader cut off from the API stops leading before the other takes over.
//! A follower refuses pull leases.

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::config_with;
use common::fake_api::{until, FakeApi};
use kip_coordinator::auth::AgentAuth;
use kip_coordinator::leader::{self, Election, Lost};
use kip_coordinator::{metrics::Metrics, state::State};
use tokio_util::sync::CancellationToken;

/// One coordinator's election through its own door of the fake API.
struct Candidate {
    state: Arc<State>,
    door: common::fake_api::Door,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Lost>>,
}

async fn candidate(api: &Arc<FakeApi>, identity: &str, state: Option<Arc<State>>) -> Candidate {
    let door = api.door().await;
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&FakeApi::kubeconfig(&door)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    let client = leader::client(config).unwrap();
    let state = state.unwrap_or_else(|| State::new(config_with("a=busybox"), Arc::new(Metrics::new())));
    let election = Election {
        lease: "kip-coordinator".into(),
        namespace: "kip".into(),
        identity: identity.into(),
        endpoints: None,
    };
    // As the coordinator does before it serves: a follower until the Lease is taken.
    state.set_leading(false);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(leader::run(client, election, state.clone(), shutdown.clone()));
    Candidate { state, door, shutdown, task }
}

fn holder(api: &FakeApi) -> Option<String> {
    api.lease("kip", "kip-coordinator").and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_never_lead_at_once_and_hand_over() {
    let api = FakeApi::new();
    let a = candidate(&api, "coordinator-a", None).await;
    let b = candidate(&api, "coordinator-b", None).await;
    // Watched every 2 ms from here to the end: both leading at once is the failure.
    let (sa, sb) = (a.state.clone(), b.state.clone());
    let both = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let sampler = tokio::spawn({
        let (both, stop) = (both.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                if sa.is_leading() && sb.is_leading() {
                    both.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    until("one of them leads", Duration::from_secs(20), || a.state.is_leading() || b.state.is_leading()).await;
    let (leader, follower) = if a.state.is_leading() { (a, b) } else { (b, a) };
    let leader_id = holder(&api).unwrap();
    assert!(!follower.state.is_leading());

    // SIGTERM to the leader: it stops leading and releases the Lease; the other takes it.
    leader.shutdown.cancel();
    assert!(leader.task.await.unwrap().is_ok());
    assert!(!leader.state.is_leading());
    until("the follower takes over", Duration::from_secs(30), || follower.state.is_leading()).await;
    assert_ne!(holder(&api).unwrap(), leader_id);

    // The first one comes back (a restarted pod): it follows.
    let back = candidate(&api, &leader_id, None).await;
    let sampler_back = tokio::spawn({
        let (both, stop, s1, s2) = (both.clone(), stop.clone(), back.state.clone(), follower.state.clone());
        async move {
            while !stop.is_cancelled() {
                if s1.is_leading() && s2.is_leading() {
                    both.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!back.state.is_leading(), "the Lease is held");

    // The leader is cut off from the API (its requests hang): it stops leading on its own, and
    // only then does the other take the Lease.
    follower.door.set_broken(true);
    let lost = tokio::time::timeout(Duration::from_secs(30), follower.task)
        .await
        .expect("the cut-off leader gives up")
        .unwrap();
    assert!(matches!(lost, Err(Lost::RenewFailed { .. })), "{lost:?}");
    assert!(!follower.state.is_leading());
    until("the restarted one takes over", Duration::from_secs(40), || back.state.is_leading()).await;
    assert_eq!(holder(&api).unwrap(), leader_id);

    stop.cancel();
    sampler.await.unwrap();
    sampler_back.await.unwrap();
    assert!(!both.load(Ordering::SeqCst), "two coordinators led at the same moment");
    back.shutdown.cancel();
    back.task.await.unwrap().unwrap();
}

/// A follower serves the list but grants no pull lease: `Unavailable`, not marked as the
/// coordinator's own refusal (the agent treats it as an unreachable coordinator).
#[tokio::test]
async fn a_follower_refuses_pull_leases() {
    let state = State::new(config_with("a=busybox"), Arc::new(Metrics::new()));
    state.set_leading(false);
    let served = common::serve(state.clone(), AgentAuth::None).await;
    let channel = tonic::transport::Endpoint::from_shared(served.url.clone()).unwrap().connect().await.unwrap();
    let mut client = kip::v1::coordinator_client::CoordinatorClient::new(channel);
    let request = kip::v1::LeaseRequest { node_name: "n1".into(), ..Default::default() };
    let refused = client.pull_lease(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("standby"), "{refused:?}");
    assert!(refused.metadata().get(kip::v1::ANSWERED_BY).is_none());
    state.set_leading(true);
    assert!(client.pull_lease(request).await.unwrap().into_inner().granted);
    served.shutdown.cancel();
}

/// A `kip-coordinator` process against one door of the fake API, in the leader election.
struct Process {
    identity: String,
    child: std::process::Child,
    door: common::fake_api::Door,
    grpc: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    async fn start(api: &Arc<FakeApi>, identity: &str) -> Self {
        let door = api.door().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kubeconfig"), FakeApi::kubeconfig(&door)).unwrap();
        let config = dir.path().join("config");
        std::fs::create_dir(&config).unwrap();
        std::fs::write(config.join("IMAGES"), "a=busybox").unwrap();
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (grpc, http) = (port(), port());
        let log = dir.path().join("log");
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kip-coordinator"))
            .args(["--config-dir", config.to_str().unwrap(), "--agent-auth", "none", "--resolve-tags", "false"])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}"), "--listen", &format!("127.0.0.1:{http}")])
            .args(["--gate-taint", ""])
            .env("KUBECONFIG", dir.path().join("kubeconfig"))
            .env("POD_NAMESPACE", "kip")
            .env("POD_NAME", identity)
            .env("KIP_LEADER_LEASE", "kip-coordinator")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { identity: identity.into(), child, door, grpc: format!("http://127.0.0.1:{grpc}"), log, _dir: dir }
    }

    /// Asks this coordinator for a pull lease: granted, or the refusal's code.
    async fn pull_lease(&self) -> Result<bool, tonic::Code> {
        let channel = tonic::transport::Endpoint::from_shared(self.grpc.clone()).unwrap().connect().await;
        let Ok(channel) = channel else { return Err(tonic::Code::Unavailable) };
        let mut client = kip::v1::coordinator_client::CoordinatorClient::new(channel);
        let request = kip::v1::LeaseRequest { node_name: "node-0".into(), ..Default::default() };
        client.pull_lease(request).await.map(|r| r.into_inner().granted).map_err(|s| s.code())
    }

    /// Writes this coordinator made to the cluster, its Lease apart.
    fn cluster_writes(&self) -> u64 {
        self.door
            .counts()
            .iter()
            .filter(|(c, _)| matches!(c.verb, "create" | "patch" | "delete") && c.resource != "leases")
            .map(|(_, n)| n)
            .sum()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary, twice: only the Lease's holder grants pull leases and runs the controllers
/// (the other refuses, reads nothing of the DaemonSet, writes nothing); a leader cut off from the
/// API ends its process (status 1, naming the leader election) and the other takes over: it
/// grants, and its controllers start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_process_grants_and_writes_and_a_cut_off_one_exits() {
    let api = FakeApi::new();
    api.add_nodes(2, std::time::SystemTime::now() - Duration::from_secs(3600));
    let a = Process::start(&api, "coordinator-a").await;
    let b = Process::start(&api, "coordinator-b").await;
    until("one holds the Lease", Duration::from_secs(30), || holder(&api).is_some()).await;
    let (mut leader, follower) = if holder(&api).as_deref() == Some("coordinator-a") { (a, b) } else { (b, a) };
    let log = || std::fs::read_to_string(&leader.log).unwrap_or_default();
    let applied = || leader.door.count("patch", "daemonsets") > 0;
    until("the leader applies the DaemonSet", Duration::from_secs(30), applied).await;
    assert!(leader.child.try_wait().unwrap().is_none(), "the leader ended: {}", log());
    assert_eq!(leader.pull_lease().await, Ok(true));
    assert_eq!(follower.pull_lease().await, Err(tonic::Code::Unavailable));
    assert_eq!(follower.cluster_writes(), 0, "the follower wrote to the cluster: {:?}", follower.door.counts());
    assert_eq!(follower.door.count("get", "daemonsets"), 0, "the follower's controllers run");

    leader.door.set_broken(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = leader.child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the cut-off leader still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(1));
    assert!(log().contains("the leader election failed"), "{}", log());
    until("the follower takes the Lease", Duration::from_secs(40), || {
        holder(&api).is_some_and(|h| h != leader.identity)
    })
    .await;
    // The DaemonSet is as the old leader applied it: read, not written again.
    until("the new leader's controllers start", Duration::from_secs(30), || {
        follower.door.count("get", "daemonsets") > 0
    })
    .await;
    assert_eq!(follower.pull_lease().await, Ok(true));
}
