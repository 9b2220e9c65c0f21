//! What the coordinator knows, shared by the gRPC service, the controllers and `/status`:
//!
//! - `list`: the published image list (a watch channel every agent stream follows) and the
//!   resolver's answers;
//! - `nodes`: each node's latest report and Watch connection, the per-image counters;
//! - `release`: a release as the agents confirm it;
//! - here: the gate's status, the pull budget, and the feed of nodes whose agent told something
//!   new (what the node controller reconciles, one node at a time).

mod list;
mod nodes;
mod release;
mod sets;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use kip::images::ImageEntry;
use tokio::sync::{broadcast, watch};

pub use list::Published;
pub use nodes::{Liveness, NodeEntry};
use release::ReleaseTracking;
pub use release::{release_progress, ClusterCleanup, ReleaseProgress};
pub use sets::SecretProblems;

use crate::budget::LeaseDesk;
use crate::config::KipConfig;
use crate::gate::GateStatus;
use crate::metrics::{ImageLabels, Metrics};
use crate::resolve::Resolved;

/// How long a pull lease lasts without renewal (agents renew every 10 s), and how long a
/// `PullLease` call waits for a slot before it answers "not yet".
pub const LEASE_TTL: Duration = Duration::from_secs(30);
pub const LEASE_WAIT: Duration = Duration::from_secs(10);

/// How many node names the feed holds for a slow reader; one that falls behind reconciles
/// every node instead.
const TOUCHED_CAPACITY: usize = 16 * 1024;

fn image_labels(entry: &ImageEntry) -> ImageLabels {
    ImageLabels { name: entry.name.clone(), image: entry.image.clone() }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Connection {
    pub(crate) open_streams: u32,
    pub(crate) since: SystemTime,
}

pub struct State {
    pub(crate) list: watch::Sender<Arc<Published>>,
    pub(crate) nodes: RwLock<BTreeMap<String, NodeEntry>>,
    pub(crate) connections: RwLock<BTreeMap<String, Connection>>,
    /// Bumped whenever a node connects, disconnects or reports (the release waits on it).
    pub(crate) nodes_changed: watch::Sender<u64>,
    /// The name of each node whose agent connected, disconnected or reported.
    touched: broadcast::Sender<String>,
    pub metrics: Arc<Metrics>,
    /// How long a release waits for agents before the cluster's side is cleaned regardless.
    pub(crate) release_timeout: Duration,
    pub(crate) release: RwLock<Option<ReleaseTracking>>,
    /// A controller with a Kubernetes API client runs: it cleans the cluster's side.
    pub(crate) api_attached: std::sync::atomic::AtomicBool,
    /// The startup gate as the controller last saw it (`None`: no gate configured or no API).
    pub(crate) gate: RwLock<Option<GateStatus>>,
    /// What the resolver last said per listed tag (`/status`).
    pub(crate) resolution: RwLock<BTreeMap<String, Resolved>>,
    /// The cluster's pull budget (`PullLease`).
    pub leases: LeaseDesk,
    /// This coordinator leads (see `leader`): it grants pull leases and writes to the cluster.
    leading: watch::Sender<bool>,
    /// Image sets: the sets in use, and what selects them (see `sets`).
    sets: sets::Sets,
}

impl State {
    pub fn new(config: KipConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_release_timeout(config, metrics, Duration::from_secs(120))
    }

    pub fn with_release_timeout(config: KipConfig, metrics: Arc<Metrics>, release_timeout: Duration) -> Arc<Self> {
        let first = Arc::new(Published { generation: 1, config, digests: BTreeMap::new() });
        metrics.config_generation.set(1);
        metrics.images_desired.set(first.config.images.len() as i64);
        let (list, _) = watch::channel(first.clone());
        let hub = Arc::new(Self {
            list,
            nodes: RwLock::new(BTreeMap::new()),
            connections: RwLock::new(BTreeMap::new()),
            nodes_changed: watch::channel(0).0,
            touched: broadcast::channel(TOUCHED_CAPACITY).0,
            metrics,
            release_timeout,
            release: RwLock::new(None),
            api_attached: std::sync::atomic::AtomicBool::new(false),
            gate: RwLock::new(None),
            resolution: RwLock::new(BTreeMap::new()),
            leases: LeaseDesk::new(LEASE_TTL, LEASE_WAIT),
            leading: watch::channel(true).0,
            sets: Default::default(),
        });
        hub.refresh_image_metrics(&first);
        hub.track_release(&first.config);
        hub
    }

    pub fn gate_status(&self) -> Option<GateStatus> {
        self.gate.read().ok()?.clone()
    }

    /// Changes what `/status` shows of the gate (from then on it shows a gate).
    pub fn update_gate_status(&self, change: impl FnOnce(&mut GateStatus)) {
        if let Ok(mut g) = self.gate.write() {
            change(g.get_or_insert_with(GateStatus::default));
        }
    }

    /// `node` is held by the startup gate, and why (`None`: it is not any more); the
    /// `kip_gate_nodes_held` gauge follows. Releasing a node never makes `/status` show a gate.
    pub fn hold_gate(&self, node: &str, why: Option<String>) {
        let Ok(mut gate) = self.gate.write() else { return };
        let held = match (why, gate.as_mut()) {
            (None, None) => return,
            (None, Some(status)) => {
                status.held.remove(node);
                status.held.len()
            }
            (Some(why), _) => {
                let status = gate.get_or_insert_with(GateStatus::default);
                status.held.insert(node.to_string(), why);
                status.held.len()
            }
        };
        self.metrics.gate_nodes_held.set(held as i64);
    }

    /// Whether this coordinator leads (always, without an election).
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.send_if_modified(|l| std::mem::replace(l, leading) != leading);
    }

    /// Waits until this coordinator leads.
    pub async fn until_leading(&self) {
        let mut rx = self.leading.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Bumped whenever a node's agent connects, disconnects or reports.
    pub fn subscribe_nodes(&self) -> watch::Receiver<u64> {
        self.nodes_changed.subscribe()
    }

    /// Names of the nodes whose agent tells something new, from now on.
    pub fn subscribe_touched(&self) -> broadcast::Receiver<String> {
        self.touched.subscribe()
    }

    /// `node`'s agent told something new: the release and the node's reconcile look again.
    pub(crate) fn touch(&self, node: &str) {
        self.nodes_changed.send_modify(|v| *v += 1);
        let _ = self.touched.send(node.to_string());
    }

    /// `/status`: the published list, per node its state, per image the nodes that have it.
    pub fn status_json(&self) -> serde_json::Value {
        let now = SystemTime::now();
        let published = self.current();
        crate::status::render(&crate::status::Snapshot {
            image_counts: self.image_counts(&published),
            resolution: self.resolution(),
            nodes: self.nodes(),
            release: self.release_view(now),
            gate: self.gate_status(),
            pull_leases: self.leases.to_json(self.pull_slots()),
            leading: self.is_leading(),
            published,
            now,
        })
    }

    /// `/metrics`: the metrics as of now (leases that ran out are dropped first).
    pub fn render_metrics(&self) -> String {
        self.leases.expire(&self.metrics);
        self.metrics.render()
    }
}
