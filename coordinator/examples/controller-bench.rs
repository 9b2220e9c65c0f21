//! `controller-bench COORDINATOR NODES STEADY_SECONDS`: the coordinator's cluster side at scale.
//! Serves an in-process fake Kubernetes API (`tests/common/fake_api.rs`: NODES Node objects,
//! every request counted by verb, label patches shown to the watch as a real API server does),
//! starts the COORDINATOR binary against it (leader election on, auto mode), connects NODES light
//! agent streams, then:
//! - a round: every agent reports once (runtime there, images cached): each node's label goes
//!   from none to `cri`; measured: the coordinator's CPU per report, the time from each report to
//!   its node's label PATCH (p50/p99/max), and the API requests of the round by verb;
//! - a steady window of STEADY_SECONDS: every agent sends its unchanged report twice, the reports
//!   spread evenly over the window (one at a time, as agents on their own intervals do); measured:
//!   the API writes (the goal is none; the leader Lease's renewals are counted apart) and the
//!   coordinator's CPU per report;
//! - a list change (the ConfigMap's IMAGES rewritten): the time until each agent's stream has the
//!   new list (p50/p99/max).
//!
//! `KIP_BENCH_IMAGE_SETS=K`: K ImageSets, each selecting a pool of nodes (`pool=pI`, the nodes
//! spread evenly) plus one selecting every node, and the coordinator with `--image-sets true`:
//! every agent gets its own list (the ConfigMap's images and its sets'), and the leader writes the
//! sets' status (counted apart from the label writes).
//!
//! Prints one JSON object.

#![forbid(unsafe_code)]

mod common;
#[path = "../tests/common/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{connect_all, cpu_ms, peak_rss, percentile, usage};
use fake_api::FakeApi;

#[tokio::main]
async fn main() -> ExitCode {
    common::finish("controller-bench", run().await)
}

/// Kills the coordinator when the benchmark ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Waits for `check`, failing with `what` after `limit`.
async fn wait_for(what: &str, limit: Duration, check: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

const LEASES: &[&str] = &["leases"];
const STATUS_AND_LEASES: &[&str] = &["leases", "imagesets"];

async fn run() -> Result<serde_json::Value, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [coordinator, nodes, steady] = args.as_slice() else {
        return Err("usage: controller-bench COORDINATOR NODES STEADY_SECONDS".into());
    };
    let nodes: usize = nodes.parse().map_err(|_| "NODES: a number")?;
    let steady = Duration::from_secs(steady.parse().map_err(|_| "STEADY_SECONDS: a number")?);

    let sets: usize = std::env::var("KIP_BENCH_IMAGE_SETS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let api = FakeApi::new();
    api.add_nodes(nodes, SystemTime::now() - Duration::from_secs(3600));
    if sets > 0 {
        for i in 0..nodes {
            api.label_node(&format!("node-{i}"), serde_json::json!({"pool": format!("p{}", i % sets)}));
        }
        let set = |name: String, selector: serde_json::Value, image: String| {
            serde_json::json!({"apiVersion": "kip.eclipse.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {"images": [{"name": "tool", "image": image}], "nodeSelector": selector}})
        };
        let collection = "/apis/kip.eclipse.dev/v1alpha1/namespaces/bench/imagesets";
        for i in 0..sets {
            let selector = serde_json::json!({"matchLabels": {"pool": format!("p{i}")}});
            api.apply(collection, set(format!("pool-{i}"), selector, format!("registry.local/bench/pool-{i}:1")));
        }
        api.apply(collection, set("everywhere".into(), serde_json::json!({}), "registry.local/bench/all:1".into()));
    }
    let door = api.door().await;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let kubeconfig = work.path().join("kubeconfig");
    std::fs::write(&kubeconfig, FakeApi::kubeconfig(&door)).map_err(|e| e.to_string())?;
    let config = work.path().join("config");
    std::fs::create_dir(&config).map_err(|e| e.to_string())?;
    std::fs::write(config.join("IMAGES"), "a=registry.local/bench/a:1;b=registry.local/bench/b:1")
        .map_err(|e| e.to_string())?;
    let (grpc, http) = (free_port()?, free_port()?);
    let log = std::fs::File::create(std::env::var("KIP_BENCH_LOG").unwrap_or_else(|_| "/dev/null".into()))
        .map_err(|e| e.to_string())?;
    // KIP_BENCH_ELECTION=0: a coordinator without the leader election (an older build).
    let election = std::env::var("KIP_BENCH_ELECTION").map_or(true, |v| v != "0");
    let mut command = std::process::Command::new(coordinator);
    if election {
        command.env("KIP_LEADER_LEASE", "kip-coordinator");
    }
    let child = command
        .args(["--config-dir", &config.display().to_string()])
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}"), "--listen", &format!("127.0.0.1:{http}")])
        .args(["--agent-auth", "none", "--resolve-tags", "false", "--gate-taint", ""])
        .args(["--image-sets", if sets > 0 { "true" } else { "false" }])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", "kip")
        .env("POD_NAME", "bench-coordinator")
        .env("KIP_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{coordinator}: {e}"))?;
    let child = Child(child);
    let pid = child.0.id().to_string();

    // The coordinator leads, watches the nodes and has applied its DaemonSet.
    let counted = |verb: &str, resource: &str| {
        api.counts().iter().filter(|(c, _)| c.verb == verb && c.resource == resource).map(|(_, n)| *n).sum::<u64>()
    };
    let leads =
        || api.lease("kip", "kip-coordinator").is_some_and(|l| l["spec"]["holderIdentity"] == "bench-coordinator");
    if election {
        wait_for("the coordinator takes the leader Lease", Duration::from_secs(60), leads).await?;
    }
    wait_for("the coordinator watches the nodes", Duration::from_secs(60), || counted("watch", "nodes") > 0).await?;
    wait_for("the coordinator applies its DaemonSet", Duration::from_secs(60), || counted("patch", "daemonsets") > 0)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_idle, _) = usage(&pid)?;

    // Every node's agent connects.
    let url = format!("http://127.0.0.1:{grpc}");
    let agents = connect_all(&url, (0..nodes).map(|i| format!("node-{i}"))).await?;
    // Connections alone change no label (the agents have not reported yet).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_round = api.counts();
    let writes_before = api.writes(STATUS_AND_LEASES);

    // The round: every agent reports once, all together.
    let cpu_before = cpu_ms(&pid)?;
    let mut sent_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut reporting = tokio::task::JoinSet::new();
    for agent in agents {
        let report = agent.report(&agent.list);
        let mut client = agent.client.clone();
        sent_at.insert(agent.node.clone(), Instant::now());
        reporting.spawn(async move {
            client.report(report).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(agent)
        });
    }
    let mut agents = Vec::with_capacity(nodes);
    while let Some(r) = reporting.join_next().await {
        agents.push(r.map_err(|e| e.to_string())??);
    }
    let labelled = || api.label_writes().iter().filter(|w| w.value.as_deref() == Some("cri")).count() >= nodes;
    wait_for("every node labelled cri", Duration::from_secs(120), labelled).await?;
    // What the round still causes (the watch showing the labels, the sets' status) settles.
    if sets > 0 {
        let collection = "/apis/kip.eclipse.dev/v1alpha1/namespaces/bench/imagesets";
        let all_ready = || {
            api.objects(collection).iter().all(|s| {
                let status = &s["status"];
                status["nodesSelected"].as_u64().is_some_and(|n| n > 0)
                    && status["nodesReady"] == status["nodesSelected"]
            })
        };
        wait_for("every set's status says its nodes are ready", Duration::from_secs(60), all_ready).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_after = cpu_ms(&pid)?;
    // The sets' status writes (the leader's, at most every 2 s per set) apart from the labels.
    let round_writes = api.writes(STATUS_AND_LEASES) - writes_before;
    let mut latencies: Vec<f64> = api
        .label_writes()
        .iter()
        .filter_map(|w| Some(w.at.checked_duration_since(*sent_at.get(&w.node)?)?.as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let round_requests = difference(&before_round, &api.counts());

    // The steady window: unchanged reports, twice from every agent, spread evenly over it (as
    // agents report on their own intervals: one at a time, never coalesced into one pass).
    let before_steady = api.counts();
    let steady_writes_before = api.writes(LEASES);
    let steady_cpu_before = cpu_ms(&pid)?;
    let started = tokio::time::Instant::now();
    let total = 2 * agents.len();
    let gap = steady.mul_f64(0.9) / total as u32;
    let mut reporting = tokio::task::JoinSet::new();
    for k in 0..total {
        tokio::time::sleep_until(started + gap * k as u32).await;
        let agent = &agents[k % agents.len()];
        let (report, mut client) = (agent.report(&agent.list), agent.client.clone());
        reporting.spawn(async move { client.report(report).await.map(|_| ()).map_err(|e| e.to_string()) });
    }
    let mut reports = 0;
    while let Some(r) = reporting.join_next().await {
        r.map_err(|e| e.to_string())??;
        reports += 1;
    }
    tokio::time::sleep_until(started + steady).await;
    let steady_cpu = cpu_ms(&pid)? - steady_cpu_before;
    let steady_writes = api.writes(LEASES) - steady_writes_before;
    let steady_requests = difference(&before_steady, &api.counts());
    let lease_writes = steady_requests.get("patch leases").copied().unwrap_or(0);
    let (rss_end, _) = usage(&pid)?;

    // A list change: every stream waits for the next list, then the ConfigMap's IMAGES changes.
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut waiting = tokio::task::JoinSet::new();
    for mut agent in agents {
        let arrived_tx = arrived_tx.clone();
        waiting.spawn(async move {
            agent.stream.message().await.map_err(|e| e.to_string())?.ok_or("stream ended")?;
            let _ = arrived_tx.send(Instant::now());
            Ok::<_, String>(())
        });
    }
    drop(arrived_tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let changed = Instant::now();
    std::fs::write(config.join("IMAGES"), "a=registry.local/bench/a:1;b=registry.local/bench/b:2")
        .map_err(|e| e.to_string())?;
    let mut change_ms = Vec::with_capacity(nodes);
    while let Some(at) = tokio::time::timeout(Duration::from_secs(120), arrived_rx.recv())
        .await
        .map_err(|_| format!("the list change reached {} of {nodes} agents in 120 s", change_ms.len()))?
    {
        change_ms.push(at.duration_since(changed).as_secs_f64() * 1000.0);
    }
    while let Some(r) = waiting.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    change_ms.sort_by(f64::total_cmp);

    Ok(serde_json::json!({
        "api_server": "in-process fake (tests/common/fake_api.rs)",
        "nodes": nodes,
        "image_sets": sets,
        "status_writes": api.counts().iter().filter(|(c, _)| c.verb == "patch" && c.resource == "imagesets").map(|(_, n)| *n).sum::<u64>(),
        "list_change_p50_ms": percentile(&change_ms, 0.5),
        "list_change_p99_ms": percentile(&change_ms, 0.99),
        "list_change_max_ms": change_ms.last().copied().unwrap_or(0.0),
        "round_reports": nodes,
        "round_label_changes": nodes,
        "round_writes": round_writes,
        "round_requests": round_requests,
        "cpu_per_report_ms": (cpu_after - cpu_before) / nodes as f64,
        "report_to_label_p50_ms": percentile(&latencies, 0.5),
        "report_to_label_p99_ms": percentile(&latencies, 0.99),
        "report_to_label_max_ms": latencies.last().copied().unwrap_or(0.0),
        "steady_seconds": steady.as_secs(),
        "steady_reports": reports,
        "steady_cpu_per_report_ms": steady_cpu / reports as f64,
        "steady_writes": steady_writes,
        "steady_lease_renewals": lease_writes,
        "steady_requests": steady_requests,
        "rss_idle_kb": rss_idle,
        "rss_end_kb": rss_end,
        "rss_peak_kb": peak_rss(&pid)?,
    }))
}

/// Requests made between two counts, as "verb resource" → count.
fn difference(
    before: &BTreeMap<fake_api::Counted, u64>,
    after: &BTreeMap<fake_api::Counted, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(c, n)| {
            let d = n - before.get(c).copied().unwrap_or(0);
            (d > 0).then(|| (format!("{} {}", c.verb, c.resource), d))
        })
        .collect()
}
