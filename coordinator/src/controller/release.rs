//! The cluster's side of a release (KIP_RELEASE), a state machine of its own: the DaemonSet
//! controller deletes the fallback DaemonSet; the agents let go of their pins and say so; once
//! every agent confirmed (or the release timeout passed) every kip label goes, and an Event says
//! what was left. Idle (one watch of the list) when no release is asked for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::runtime::events::EventType;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::labels::Labels;
use super::Cluster;
use crate::manifest::AGENT_LABEL_VALUE;
use crate::state::{ClusterCleanup, State};
use crate::watches::NodeView;

/// One step; `ds_deleted` is the DaemonSet controller's outcome for the current list (`None`:
/// not synced yet). Returns false when a request failed (the next waits for the backoff).
async fn step(cluster: &Cluster, state: &State, labels: &Labels, nodes: &NodeView, ds_deleted: Option<bool>) -> bool {
    if !nodes.listed() || ds_deleted.is_none() {
        return true;
    }
    let facts = nodes.facts();
    // Nodes labelled for an agent by an earlier process must confirm too.
    state.expect_release_from(
        facts.iter().filter(|n| n.label.as_deref() == Some(AGENT_LABEL_VALUE)).map(|n| n.name.clone()),
    );
    let Some((progress, settled, cleanup)) = state.release_state(SystemTime::now()) else { return true };
    if matches!(cleanup, ClusterCleanup::Done { .. }) || !settled {
        return true;
    }
    let none: BTreeMap<String, Option<&str>> = facts.iter().map(|n| (n.name.clone(), None)).collect();
    match labels.set_all(&none, &facts).await {
        Ok(removed) if ds_deleted == Some(true) => {
            state.set_cluster_cleanup(ClusterCleanup::Done { labels_removed: removed });
            if progress.pending.is_empty() {
                tracing::info!(
                    nodes = progress.released.len(),
                    labels_removed = removed,
                    "release complete: no pin, label or DaemonSet of kip's is left"
                );
                let note =
                    format!("{} nodes let go of kip's pins; {removed} node labels removed", progress.released.len());
                cluster.events.record(EventType::Normal, "Released", "Release", note).await;
            } else {
                let pending: Vec<String> = progress.pending.iter().map(|(n, why)| format!("{n} ({why})")).collect();
                tracing::warn!(pending = ?pending, labels_removed = removed, "release timed out: these nodes may keep kip's pins and state file");
                let note = format!(
                    "nodes that did not confirm (kip's pins and state file may be left there): {}",
                    pending.join(", ")
                );
                cluster.events.record(EventType::Warning, "ReleaseIncomplete", "Release", note).await;
            }
            true
        }
        Ok(_) => {
            state.set_cluster_cleanup(ClusterCleanup::Failed("deleting the fallback DaemonSet failed".into()));
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "removing node labels for the release failed");
            state.set_cluster_cleanup(ClusterCleanup::Failed(format!("removing node labels: {e}")));
            false
        }
    }
}

/// Follows a release from the list, the agents' reports, the node watch and the DaemonSet
/// controller's outcome until `shutdown`.
pub async fn run(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    labels: Arc<Labels>,
    nodes: NodeView,
    mut ds_synced: watch::Receiver<Option<(u64, bool)>>,
    shutdown: CancellationToken,
) {
    let mut lists = state.subscribe();
    let mut agents = state.subscribe_nodes();
    let mut node_changes = nodes.changed.clone();
    let mut retry = crate::backoff();
    loop {
        let published = state.current();
        let releasing = published.config.release != kip::v1::Release::None;
        let (mut wait, mut failed) = (None, false);
        if releasing {
            // The DaemonSet controller's outcome counts once it synced this very list.
            let synced = (*ds_synced.borrow_and_update()).filter(|(g, _)| *g == published.generation).map(|(_, ok)| ok);
            if step(&cluster, &state, &labels, &nodes, synced).await {
                retry = crate::backoff();
            } else {
                failed = true;
                wait = retry.next();
            }
            // The labels go when the release timeout passes, not at the next report.
            if let Some(left) = state.release_deadline().and_then(|d| d.duration_since(SystemTime::now()).ok()) {
                wait = Some(wait.map_or(left, |w| w.min(left)) + Duration::from_millis(10));
            }
        }
        let sleep = async {
            match wait {
                Some(w) => tokio::time::sleep(w).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = lists.changed() => {}
            _ = agents.changed(), if releasing && !failed => {}
            Ok(()) = node_changes.changed(), if releasing && !failed => {}
            Ok(()) = ds_synced.changed(), if releasing => {}
            _ = sleep => {}
        }
    }
}
