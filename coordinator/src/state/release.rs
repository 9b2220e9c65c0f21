//! A release (KIP_RELEASE) as the agents confirm it: who let go, who is awaited and why, and what
//! became of the cluster's side (labels, the fallback DaemonSet).

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use kip::v1;

use super::{NodeEntry, State};
use crate::config::KipConfig;

/// What became of the cluster's side of a release (node labels, the fallback DaemonSet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterCleanup {
    /// No Kubernetes API client (outside a cluster, or the API not reached yet).
    NoApi,
    /// The DaemonSet is deleted; the labels wait for the agents (or the release timeout).
    WaitingForAgents,
    Done {
        labels_removed: usize,
    },
    Failed(String),
}

/// A release in progress: when it started, until when agents are waited for, and which nodes
/// are expected to confirm besides those whose agents talk to this process.
#[derive(Clone, Debug)]
pub(crate) struct ReleaseTracking {
    started: SystemTime,
    deadline: SystemTime,
    pub(crate) expected: BTreeSet<String>,
    cluster: ClusterCleanup,
}

/// Which nodes have let go of everything kip set, and why the others have not (yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseProgress {
    pub released: BTreeSet<String>,
    pub pending: BTreeMap<String, String>,
}

/// Pure: the progress of a release from the nodes' latest reports and connections. Expected are
/// the `expected` nodes (labelled for an agent) and every node whose agent talked to this process
/// (`known`); `connected` are those with a stream open now. Lookups by name: a release over
/// thousands of nodes costs one pass.
pub fn release_progress(
    known: &BTreeSet<String>,
    connected: &BTreeSet<String>,
    nodes: &BTreeMap<String, NodeEntry>,
    expected: &BTreeSet<String>,
) -> ReleaseProgress {
    let mut progress = ReleaseProgress::default();
    for name in expected.union(known) {
        let report = nodes.get(name).map(|e| &e.report);
        let connected = connected.contains(name);
        if report.is_some_and(|r| r.released) {
            progress.released.insert(name.clone());
            continue;
        }
        let why = match report.map(|r| r.release_error.as_str()) {
            Some(e) if !e.is_empty() => e.to_string(),
            _ if !connected => "its agent is not connected".to_string(),
            _ => "waiting for its agent".to_string(),
        };
        progress.pending.insert(name.clone(), why);
    }
    progress
}

impl State {
    /// Starts following a release when `config` asks for one.
    pub(super) fn track_release(&self, config: &KipConfig) {
        if config.release == v1::Release::None {
            return;
        }
        if let Ok(mut r) = self.release.write() {
            if r.is_none() {
                let now = SystemTime::now();
                tracing::warn!(
                    release = config.release.as_str_name(),
                    timeout_s = self.release_timeout.as_secs(),
                    "KIP_RELEASE: agents let go of every pin, then node labels and the fallback DaemonSet go"
                );
                *r = Some(ReleaseTracking {
                    started: now,
                    deadline: now.checked_add(self.release_timeout).unwrap_or(now),
                    expected: BTreeSet::new(),
                    cluster: if self.api_attached.load(std::sync::atomic::Ordering::SeqCst) {
                        ClusterCleanup::WaitingForAgents
                    } else {
                        ClusterCleanup::NoApi
                    },
                });
            }
        }
    }

    /// The fallback controller reached the Kubernetes API: a release waits for its cleanup.
    pub fn attach_api(&self) {
        self.api_attached.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut r) = self.release.write() {
            if let Some(t) = r.as_mut().filter(|t| t.cluster == ClusterCleanup::NoApi) {
                t.cluster = ClusterCleanup::WaitingForAgents;
            }
        }
    }

    /// Nodes that must confirm the release although their agents have not talked to this
    /// process (labelled for an agent by an earlier one).
    pub fn expect_release_from(&self, nodes: impl IntoIterator<Item = String>) {
        if let Ok(mut r) = self.release.write() {
            if let Some(t) = r.as_mut() {
                t.expected.extend(nodes);
            }
        }
    }

    pub fn set_cluster_cleanup(&self, state: ClusterCleanup) {
        if let Ok(mut r) = self.release.write() {
            if let Some(t) = r.as_mut() {
                t.cluster = state;
            }
        }
        self.nodes_changed.send_modify(|v| *v += 1);
    }

    /// `None` without a release; otherwise the agents' progress and whether the wait for them
    /// is over (all confirmed, or the release timeout passed).
    pub fn release_state(&self, now: SystemTime) -> Option<(ReleaseProgress, bool, ClusterCleanup)> {
        let tracking = self.release.read().ok()?.clone()?;
        let (known, connected) = self.known_nodes();
        let progress = release_progress(&known, &connected, &self.nodes(), &tracking.expected);
        let settled = progress.pending.is_empty() || now >= tracking.deadline;
        Some((progress, settled, tracking.cluster))
    }

    /// When the wait for the agents ends at the latest.
    pub fn release_deadline(&self) -> Option<SystemTime> {
        self.release.read().ok()?.as_ref().map(|t| t.deadline)
    }

    /// The release as `/status` shows it (`None`: no release).
    pub(crate) fn release_view(&self, now: SystemTime) -> Option<crate::status::ReleaseView> {
        let (progress, settled, cluster) = self.release_state(now)?;
        let started = self.release.read().ok()?.as_ref()?.started;
        Some(crate::status::ReleaseView { kind: self.current().config.release, started, progress, settled, cluster })
    }
}
