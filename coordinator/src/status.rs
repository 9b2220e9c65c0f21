//! `/status` as JSON, from a snapshot of the shared state: pure, so what the uninstall hook and
//! an admin read is decided in one place and tested without a server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use kip::v1;

use crate::gate::GateStatus;
use crate::metrics::ImageLabels;
use crate::resolve::Resolved;
use crate::state::{ClusterCleanup, NodeEntry, Published, ReleaseProgress};

/// What `/status` shows, read from the shared state at one moment.
pub struct Snapshot {
    pub published: Arc<Published>,
    pub now: SystemTime,
    /// Per listed image (in list order): how many nodes have it cached and pinned.
    pub image_counts: Vec<(ImageLabels, i64, i64)>,
    pub resolution: BTreeMap<String, Resolved>,
    pub nodes: BTreeMap<String, NodeEntry>,
    pub release: Option<ReleaseView>,
    pub gate: Option<GateStatus>,
    pub pull_leases: serde_json::Value,
    /// This coordinator leads (grants pull leases, writes to the cluster).
    pub leading: bool,
}

/// A release in progress, as `/status` shows it.
pub struct ReleaseView {
    pub kind: v1::Release,
    pub started: SystemTime,
    pub progress: ReleaseProgress,
    /// The wait for the agents is over (all confirmed, or the release timeout passed).
    pub settled: bool,
    pub cluster: ClusterCleanup,
}

/// `/status`: the published list, per node its state, per image the nodes that have it.
pub fn render(s: &Snapshot) -> serde_json::Value {
    let images: Vec<_> = s
        .image_counts
        .iter()
        .zip(s.published.config.images.entries())
        .map(|((l, cached, pinned), e)| {
            let mut image =
                serde_json::json!({"name": l.name, "image": l.image, "nodes_cached": cached, "nodes_pinned": pinned});
            // Who keeps the tag current: the coordinator (one HEAD per interval) or every agent.
            let (by, digest, why) = match (e.by_digest, s.resolution.get(&e.reference)) {
                (true, _) => ("digest", "", "listed by digest: never pulled again while present"),
                (false, Some(Resolved::Digest(d))) => ("coordinator", d.as_str(), ""),
                (false, Some(Resolved::Unresolved(why))) => ("agents", "", why.as_str()),
                (false, None) => ("agents", "", "not resolved yet"),
            };
            image["resolved_by"] = by.into();
            image["digest"] = digest.into();
            if !why.is_empty() {
                image["why"] = why.into();
            }
            image
        })
        .collect();
    let nodes: serde_json::Map<String, serde_json::Value> =
        s.nodes.iter().map(|(name, n)| (name.clone(), node_json(n, s.now))).collect();
    let mut status = serde_json::json!({
        "generation": s.published.generation,
        "images": images,
        "nodes": nodes,
    });
    if let Some(release) = &s.release {
        status["release"] = release_json(release, s.now);
    }
    if let Some(gate) = &s.gate {
        status["gate"] = gate.to_json();
    }
    status["pull_leases"] = s.pull_leases.clone();
    status["leading"] = s.leading.into();
    status
}

fn node_json(n: &NodeEntry, now: SystemTime) -> serde_json::Value {
    let rt = n.report.runtime.clone().unwrap_or_default();
    serde_json::json!({
        "generation": n.report.generation,
        "agent_version": n.report.agent_version,
        "seconds_since_report": now.duration_since(n.received_at).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "runtime": {"available": rt.available, "name": rt.name, "version": rt.version, "error": rt.error, "pin_error": rt.pin_error},
        "images": n.report.images.iter().map(|i| serde_json::json!({
            "name": i.name, "image": i.image, "cached": i.cached, "pinned": i.pinned,
            "digest": i.digest, "last_error": i.last_error,
        })).collect::<Vec<_>>(),
    })
}

/// The `release` part of `/status`: what the uninstall hook waits for and prints.
fn release_json(r: &ReleaseView, now: SystemTime) -> serde_json::Value {
    let mut incomplete: Vec<String> = r
        .progress
        .pending
        .iter()
        .map(|(node, why)| format!("node {node}: pins, state file or drop-in of kip's may be left ({why})"))
        .collect();
    let cluster_text = match &r.cluster {
        ClusterCleanup::NoApi => {
            incomplete.push("no Kubernetes API: node labels and the fallback DaemonSet were not touched".into());
            "no Kubernetes API".to_string()
        }
        ClusterCleanup::WaitingForAgents => "DaemonSet deleted; labels wait for the agents".into(),
        ClusterCleanup::Done { labels_removed } => format!("DaemonSet deleted, {labels_removed} node labels removed"),
        ClusterCleanup::Failed(e) => {
            incomplete.push(format!("cluster cleanup failed: {e}"));
            format!("failed: {e}")
        }
    };
    let done = r.settled && !matches!(r.cluster, ClusterCleanup::WaitingForAgents);
    serde_json::json!({
        "kind": crate::config::release_name(r.kind),
        "seconds": now.duration_since(r.started).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "released": r.progress.released,
        "pending": r.progress.pending,
        "cluster": cluster_text,
        "done": done,
        "incomplete": if done { incomplete } else { vec![] },
    })
}
