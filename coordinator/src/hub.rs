//! The coordinator's shared state: the published image list (a watch channel every agent
//! stream follows) and the latest report of each node, with the aggregates derived from them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use kip::images::ImageEntry;
use kip::v1;
use tokio::sync::watch;

use crate::config::KipConfig;
use crate::gate::GateStatus;
use crate::lease::LeaseDesk;
use crate::metrics::{ImageLabels, Metrics};
use crate::resolve::Resolved;

/// How long a pull lease lasts without renewal (agents renew every 10 s), and how long a
/// `PullLease` call waits for a slot before it answers "not yet".
pub const LEASE_TTL: Duration = Duration::from_secs(30);
pub const LEASE_WAIT: Duration = Duration::from_secs(10);

/// One published generation of the configuration.
#[derive(Debug)]
pub struct Published {
    pub generation: u64,
    pub config: KipConfig,
    /// The digest each listed tag resolves to (by normalized reference), where the coordinator
    /// resolved it; agents whose node has it do not pull.
    pub digests: BTreeMap<String, String>,
}

impl Published {
    pub fn to_update(&self) -> v1::ImageListUpdate {
        let p = &self.config.policy;
        // A release keeps nothing: the list goes out empty.
        let images = match self.config.release {
            v1::Release::None => self.config.images.entries(),
            _ => &[],
        };
        v1::ImageListUpdate {
            generation: self.generation,
            release: self.config.release.into(),
            images: images
                .iter()
                .map(|e| v1::Image {
                    name: e.name.clone(),
                    image: e.image.clone(),
                    digest: self.digests.get(&e.reference).cloned().unwrap_or_default(),
                })
                .collect(),
            policy: Some(v1::PullPolicy {
                max_parallel_pulls: p.max_parallel_pulls.unwrap_or(0),
                refresh_interval_seconds: self.config.refresh_interval.as_secs().max(1),
                check_interval_seconds: p.check_interval.map_or(0, |d| d.as_secs().max(1)),
                pull_timeout_seconds: p.pull_timeout.map_or(0, |d| d.as_secs().max(1)),
            }),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub report: v1::NodeReport,
    pub received_at: SystemTime,
    /// Since when its reports say the runtime is there but not answering (`None`: not so).
    pub not_answering_since: Option<SystemTime>,
}

/// The runtime is there but not answering (transient), as opposed to absent or no CRI.
fn not_answering(r: &v1::NodeReport) -> bool {
    r.runtime.as_ref().is_some_and(|rt| !rt.available && rt.not_answering)
}

/// Whether a node's agent is connected, and since when (for the label grace period).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub node: String,
    /// The node's agent has reported to this process (its runtime state is evidence).
    pub reported: bool,
    pub runtime_available: bool,
    /// Since when its runtime is reported there but not answering (the label grace applies).
    pub not_answering_since: Option<SystemTime>,
    pub connected: bool,
    /// When `connected` last changed.
    pub since: SystemTime,
}

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
struct ReleaseTracking {
    started: SystemTime,
    deadline: SystemTime,
    expected: BTreeSet<String>,
    cluster: ClusterCleanup,
}

/// Which nodes have let go of everything kip set, and why the others have not (yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseProgress {
    pub released: BTreeSet<String>,
    pub pending: BTreeMap<String, String>,
}

/// Pure: the progress of a release from the nodes' latest reports and connections. Expected are
/// the `expected` nodes (labelled for an agent) and every node whose agent talked to this process.
pub fn release_progress(
    liveness: &[Liveness],
    nodes: &BTreeMap<String, NodeEntry>,
    expected: &BTreeSet<String>,
) -> ReleaseProgress {
    let mut progress = ReleaseProgress::default();
    let names: BTreeSet<&String> = expected.iter().chain(liveness.iter().map(|l| &l.node)).collect();
    for name in names {
        let report = nodes.get(name).map(|e| &e.report);
        let connected = liveness.iter().any(|l| &l.node == name && l.connected);
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

fn runtime_available(r: &v1::NodeReport) -> bool {
    r.runtime.as_ref().is_some_and(|rt| rt.available)
}

/// What a node reports of one listed image (matched by name and image, as listed).
fn reported<'a>(report: &'a v1::NodeReport, entry: &ImageEntry) -> Option<&'a v1::ImageState> {
    report.images.iter().find(|i| i.name == entry.name && i.image == entry.image)
}

fn image_labels(entry: &ImageEntry) -> ImageLabels {
    ImageLabels { name: entry.name.clone(), image: entry.image.clone() }
}

/// What one node's report adds to the per-image counts of the published list: per listed image
/// it reports, (labels, cached 0/1, pinned 0/1).
fn node_counts<'a>(
    published: &'a Published,
    report: &'a v1::NodeReport,
) -> impl Iterator<Item = (ImageLabels, i64, i64)> + 'a {
    published.config.images.entries().iter().filter_map(move |e| {
        let i = reported(report, e)?;
        Some((image_labels(e), i.cached as i64, i.pinned as i64))
    })
}

/// Per listed image, how many of `reports` have it cached and pinned.
fn image_totals<'a>(
    published: &Published,
    reports: impl Iterator<Item = &'a v1::NodeReport> + Clone,
) -> Vec<(ImageLabels, i64, i64)> {
    published
        .config
        .images
        .entries()
        .iter()
        .map(|e| {
            let states = reports.clone().filter_map(|r| reported(r, e));
            let (cached, pinned) = states.fold((0, 0), |(c, p), s| (c + s.cached as i64, p + s.pinned as i64));
            (image_labels(e), cached, pinned)
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
struct Connection {
    open_streams: u32,
    since: SystemTime,
}

pub struct Hub {
    list: watch::Sender<Arc<Published>>,
    nodes: RwLock<BTreeMap<String, NodeEntry>>,
    connections: RwLock<BTreeMap<String, Connection>>,
    /// Bumped whenever a node connects, disconnects or reports.
    nodes_changed: watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    /// How long a release waits for agents before the cluster's side is cleaned regardless.
    release_timeout: Duration,
    release: RwLock<Option<ReleaseTracking>>,
    /// A controller with a Kubernetes API client runs: it cleans the cluster's side.
    api_attached: std::sync::atomic::AtomicBool,
    /// The startup gate as the controller last saw it (`None`: no gate configured or no API).
    gate: RwLock<Option<GateStatus>>,
    /// What the resolver last said per listed tag (`/status`).
    resolution: RwLock<BTreeMap<String, Resolved>>,
    /// The cluster's pull budget (`PullLease`).
    pub leases: LeaseDesk,
}

impl Hub {
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
            metrics,
            release_timeout,
            release: RwLock::new(None),
            api_attached: std::sync::atomic::AtomicBool::new(false),
            gate: RwLock::new(None),
            resolution: RwLock::new(BTreeMap::new()),
            leases: LeaseDesk::new(LEASE_TTL, LEASE_WAIT),
        });
        hub.refresh_image_metrics(&first);
        hub.track_release(&first.config);
        hub
    }

    /// Starts following a release when `config` asks for one.
    fn track_release(&self, config: &KipConfig) {
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
        let progress = release_progress(&self.liveness(), &self.nodes(), &tracking.expected);
        let settled = progress.pending.is_empty() || now >= tracking.deadline;
        Some((progress, settled, tracking.cluster))
    }

    pub fn gate_status(&self) -> Option<GateStatus> {
        self.gate.read().ok()?.clone()
    }

    pub fn set_gate_status(&self, status: GateStatus) {
        if let Ok(mut g) = self.gate.write() {
            *g = Some(status);
        }
    }

    /// When the wait for the agents ends at the latest.
    pub fn release_deadline(&self) -> Option<SystemTime> {
        self.release.read().ok()?.as_ref().map(|t| t.deadline)
    }

    pub fn current(&self) -> Arc<Published> {
        self.list.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.list.subscribe()
    }

    pub fn subscribe_nodes(&self) -> watch::Receiver<u64> {
        self.nodes_changed.subscribe()
    }

    /// A Watch stream of `node` opened (`open`) or closed. True when this process had never seen
    /// the node connect before (worth a log line; a reconnect is not).
    pub fn node_stream(&self, node: &str, open: bool) -> bool {
        let mut first = false;
        if let Ok(mut c) = self.connections.write() {
            first = !c.contains_key(node);
            let conn = c.entry(node.to_string()).or_insert(Connection { open_streams: 0, since: SystemTime::now() });
            let was_connected = conn.open_streams > 0;
            conn.open_streams = if open { conn.open_streams + 1 } else { conn.open_streams.saturating_sub(1) };
            if was_connected != (conn.open_streams > 0) {
                conn.since = SystemTime::now();
            }
        }
        self.nodes_changed.send_modify(|v| *v += 1);
        first
    }

    /// `/metrics`: the metrics as of now (leases that ran out are dropped first).
    pub fn render_metrics(&self) -> String {
        self.leases.expire(&self.metrics);
        self.metrics.render()
    }

    /// Whether `node`'s agent has a Watch stream open to this process now.
    pub fn is_connected(&self, node: &str) -> bool {
        self.connections.read().is_ok_and(|c| c.get(node).is_some_and(|c| c.open_streams > 0))
    }

    /// Per known node: runtime availability (from its report) and connection state.
    pub fn liveness(&self) -> Vec<Liveness> {
        let nodes = self.nodes();
        let conns = self.connections.read().map(|c| c.clone()).unwrap_or_default();
        let names: std::collections::BTreeSet<&String> = nodes.keys().chain(conns.keys()).collect();
        names
            .into_iter()
            .map(|n| {
                let conn = conns.get(n);
                Liveness {
                    node: n.clone(),
                    reported: nodes.contains_key(n),
                    runtime_available: nodes
                        .get(n)
                        .is_some_and(|e| e.report.runtime.as_ref().is_some_and(|r| r.available)),
                    not_answering_since: nodes.get(n).and_then(|e| e.not_answering_since),
                    connected: conn.is_some_and(|c| c.open_streams > 0),
                    since: conn.map_or(SystemTime::UNIX_EPOCH, |c| c.since),
                }
            })
            .collect()
    }

    /// Publishes `config` as a new generation unless it equals the current one.
    /// Returns the new generation, or `None` when nothing changed.
    pub fn publish(&self, mut config: KipConfig) -> Option<u64> {
        // Decided inside the channel's lock: the resolver publishes digests concurrently.
        let mut published = None;
        self.list.send_if_modified(|current| {
            if current.config.release != v1::Release::None && config.release != current.config.release {
                // The uninstall hook's ConfigMap goes away before the coordinator does: a release
                // is final for this process (a restart caches again).
                tracing::warn!(
                    release = current.config.release.as_str_name(),
                    "KIP_RELEASE changed after a release; the release stays in force until the coordinator restarts"
                );
                config.release = current.config.release;
            }
            if current.config == config {
                return false;
            }
            // Digests of tags still listed stay until the resolver has looked again.
            let digests = current
                .digests
                .iter()
                .filter(|(r, _)| config.images.contains_reference(r))
                .map(|(r, d)| (r.clone(), d.clone()))
                .collect();
            let next = Arc::new(Published { generation: current.generation + 1, config: config.clone(), digests });
            published = Some((current.clone(), next.clone()));
            *current = next;
            true
        });
        let (previous, next) = published?;
        let (old, new) = (&previous.config.images, &next.config.images);
        let added: Vec<&str> =
            new.entries().iter().filter(|e| !old.entries().contains(e)).map(|e| e.name.as_str()).collect();
        let removed: Vec<&str> =
            old.entries().iter().filter(|e| !new.entries().contains(e)).map(|e| e.name.as_str()).collect();
        tracing::info!(
            generation = next.generation,
            images = new.len(),
            added = ?added,
            removed = ?removed,
            "published a new image list"
        );
        self.metrics.config_generation.set(next.generation as i64);
        self.metrics.images_desired.set(new.len() as i64);
        self.metrics.config_reloads.inc();
        self.refresh_image_metrics(&next);
        self.track_release(&next.config);
        Some(next.generation)
    }

    /// Takes the resolver's answers: logs what changed, sets `kip_image_resolved`, and publishes a
    /// new generation when a digest changed. Answers for references no longer listed are dropped.
    pub fn set_resolution(&self, answers: BTreeMap<String, Resolved>) {
        let current = self.current();
        let listed = |r: &String| current.config.images.contains_reference(r);
        let answers: BTreeMap<String, Resolved> = answers.into_iter().filter(|(r, _)| listed(r)).collect();
        // Tags the round did not ask about (listed after it started) keep what was known.
        let old = self.resolution.read().map(|r| r.clone()).unwrap_or_default();
        let mut merged: BTreeMap<String, Resolved> =
            old.iter().filter(|(r, _)| listed(r)).map(|(r, a)| (r.clone(), a.clone())).collect();
        for (reference, now) in &answers {
            if old.get(reference) != Some(now) {
                match (now, old.get(reference)) {
                    (Resolved::Digest(d), Some(Resolved::Digest(before))) => {
                        tracing::info!(image = %reference, digest = %d, before = %before, "tag moved: nodes pull it once")
                    }
                    (Resolved::Digest(d), _) => {
                        tracing::info!(image = %reference, digest = %d, "tag resolved by the coordinator: nodes that have it do not pull")
                    }
                    (Resolved::Unresolved(why), _) => {
                        tracing::warn!(image = %reference, why = %why, "tag not resolved: agents refresh it on their own interval")
                    }
                }
            }
            merged.insert(reference.clone(), now.clone());
        }
        for e in current.config.images.entries() {
            let resolved = matches!(merged.get(&e.reference), Some(Resolved::Digest(_)));
            self.metrics.image_resolved.get_or_create(&image_labels(e)).set(resolved as i64);
        }
        if let Ok(mut r) = self.resolution.write() {
            *r = merged;
        }
        let mut published = None;
        self.list.send_if_modified(|current| {
            // Decided on the list as it is now (it may have changed since the round began): an
            // answer changes its tag's digest; a tag without an answer keeps its own.
            let mut digests = current.digests.clone();
            for (reference, answer) in &answers {
                match answer {
                    Resolved::Digest(d) if current.config.images.contains_reference(reference) => {
                        digests.insert(reference.clone(), d.clone());
                    }
                    _ => {
                        digests.remove(reference);
                    }
                }
            }
            if digests == current.digests {
                return false;
            }
            let next =
                Arc::new(Published { generation: current.generation + 1, config: current.config.clone(), digests });
            published = Some(next.clone());
            *current = next;
            true
        });
        if let Some(next) = published {
            tracing::info!(generation = next.generation, resolved = next.digests.len(), "published new digests");
            self.metrics.config_generation.set(next.generation as i64);
        }
    }

    /// What the resolver last said per listed tag.
    pub fn resolution(&self) -> BTreeMap<String, Resolved> {
        self.resolution.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many nodes may pull at once now: the budget applied to the connected nodes.
    pub fn pull_slots(&self) -> usize {
        self.current().config.max_nodes_pulling.slots(self.connected_nodes())
    }

    /// Nodes with an open Watch stream (what a percentage budget counts).
    pub fn connected_nodes(&self) -> usize {
        self.connections.read().map(|c| c.values().filter(|c| c.open_streams > 0).count()).unwrap_or(0)
    }

    /// Stores a node's report; logs a line when its summary changed.
    pub fn record_report(&self, report: v1::NodeReport) {
        let summary = |r: &v1::NodeReport| {
            let cached = r.images.iter().filter(|i| i.cached).count();
            let pinned = r.images.iter().filter(|i| i.pinned).count();
            let runtime = r.runtime.as_ref().is_some_and(|rt| rt.available);
            (r.generation, cached, pinned, r.images.len(), runtime)
        };
        let new = summary(&report);
        let node = report.node_name.clone();
        let published = self.current();
        let old = {
            let Ok(mut nodes) = self.nodes.write() else { return };
            // The counts change by this node's difference alone (under the lock, so a full
            // recount cannot interleave): a report costs the list's length, not the cluster's
            // size — a recount per report made a round of 5,000 reports quadratic.
            let previous = nodes.get(&node).map(|e| &e.report);
            let old = previous.map(summary);
            let m = &self.metrics;
            for (sign, r) in [(-1, previous), (1, Some(&report))] {
                let Some(r) = r else { continue };
                for (labels, cached, pinned) in node_counts(&published, r) {
                    m.image_nodes_cached.get_or_create(&labels).inc_by(sign * cached);
                    m.image_nodes_pinned.get_or_create(&labels).inc_by(sign * pinned);
                }
            }
            let unavailable = |r: Option<&v1::NodeReport>| r.is_some_and(|r| !runtime_available(r)) as i64;
            m.nodes_runtime_unavailable.inc_by(unavailable(Some(&report)) - unavailable(previous));
            let now = SystemTime::now();
            let not_answering_since =
                not_answering(&report).then(|| nodes.get(&node).and_then(|e| e.not_answering_since).unwrap_or(now));
            nodes.insert(node.clone(), NodeEntry { report, received_at: now, not_answering_since });
            m.nodes_reporting.set(nodes.len() as i64);
            old
        };
        if old != Some(new) {
            let (generation, cached, pinned, total, runtime) = new;
            tracing::info!(node = %node, generation, cached, pinned, images = total, runtime_available = runtime, "node state changed");
        }
        self.nodes_changed.send_modify(|v| *v += 1);
    }

    /// Forgets the nodes the cluster no longer has (scaled down, deleted) whose agents are not
    /// connected: they leave `/status`, the metrics and the nodes a release waits for.
    pub fn forget_deleted_nodes(&self, existing: &BTreeSet<String>) {
        let connected: BTreeSet<String> = self
            .connections
            .read()
            .map(|c| c.iter().filter(|(_, c)| c.open_streams > 0).map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let gone = |n: &String| !existing.contains(n) && !connected.contains(n);
        let mut forgotten = Vec::new();
        if let Ok(mut nodes) = self.nodes.write() {
            forgotten.extend(nodes.keys().filter(|n| gone(n)).cloned());
            nodes.retain(|n, _| !gone(n));
        }
        if let Ok(mut c) = self.connections.write() {
            c.retain(|n, _| !gone(n));
        }
        if let Ok(mut r) = self.release.write() {
            if let Some(t) = r.as_mut() {
                t.expected.retain(|n| !gone(n));
            }
        }
        if !forgotten.is_empty() {
            tracing::info!(nodes = ?forgotten, "forgot nodes the cluster no longer has");
            self.refresh_image_metrics(&self.current());
        }
    }

    pub fn nodes(&self) -> BTreeMap<String, NodeEntry> {
        self.nodes.read().map(|n| n.clone()).unwrap_or_default()
    }

    /// Per listed image, how many nodes report it cached and pinned.
    pub fn image_counts(&self, published: &Published) -> Vec<(ImageLabels, i64, i64)> {
        match self.nodes.read() {
            Ok(nodes) => image_totals(published, nodes.values().map(|n| &n.report)),
            // Every listed image, counted on no node (as with no report at all).
            Err(_) => image_totals(published, std::iter::empty()),
        }
    }

    /// Recounts every per-image gauge from the reports (a new list, forgotten nodes).
    fn refresh_image_metrics(&self, published: &Published) {
        let m = &self.metrics;
        // Held while the gauges are set: a report's increments cannot land in between.
        let Ok(nodes) = self.nodes.read() else { return };
        m.image_nodes_cached.clear();
        m.image_nodes_pinned.clear();
        for (labels, cached, pinned) in image_totals(published, nodes.values().map(|n| &n.report)) {
            m.image_nodes_cached.get_or_create(&labels).set(cached);
            m.image_nodes_pinned.get_or_create(&labels).set(pinned);
        }
        m.nodes_reporting.set(nodes.len() as i64);
        m.nodes_runtime_unavailable.set(nodes.values().filter(|n| !runtime_available(&n.report)).count() as i64);
    }

    /// `/status`: the published list, per node its state, per image the nodes that have it.
    pub fn status_json(&self) -> serde_json::Value {
        let published = self.current();
        let now = SystemTime::now();
        let resolution = self.resolution();
        let images: Vec<_> = self
            .image_counts(&published)
            .into_iter()
            .zip(published.config.images.entries())
            .map(|((l, cached, pinned), e)| {
                let mut image = serde_json::json!({"name": l.name, "image": l.image, "nodes_cached": cached, "nodes_pinned": pinned});
                // Who keeps the tag current: the coordinator (one HEAD per interval) or every agent.
                let (by, digest, why) = match (e.by_digest, resolution.get(&e.reference)) {
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
        let nodes: serde_json::Map<String, serde_json::Value> = self
            .nodes()
            .into_iter()
            .map(|(name, n)| {
                let rt = n.report.runtime.unwrap_or_default();
                let value = serde_json::json!({
                    "generation": n.report.generation,
                    "agent_version": n.report.agent_version,
                    "seconds_since_report": now.duration_since(n.received_at).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    "runtime": {"available": rt.available, "name": rt.name, "version": rt.version, "error": rt.error, "pin_error": rt.pin_error},
                    "images": n.report.images.iter().map(|i| serde_json::json!({
                        "name": i.name, "image": i.image, "cached": i.cached, "pinned": i.pinned,
                        "digest": i.digest, "last_error": i.last_error,
                    })).collect::<Vec<_>>(),
                });
                (name, value)
            })
            .collect();
        let mut status = serde_json::json!({
            "generation": published.generation,
            "images": images,
            "nodes": nodes,
        });
        if let Some(release) = self.release_json(now) {
            status["release"] = release;
        }
        if let Some(gate) = self.gate_status() {
            status["gate"] = gate.to_json();
        }
        status["pull_leases"] = self.leases.to_json(self.pull_slots());
        status
    }

    /// The `release` part of `/status`: what the uninstall hook waits for and prints.
    fn release_json(&self, now: SystemTime) -> Option<serde_json::Value> {
        let (progress, settled, cluster) = self.release_state(now)?;
        let started = self.release.read().ok()?.as_ref()?.started;
        let mut incomplete: Vec<String> = progress
            .pending
            .iter()
            .map(|(node, why)| format!("node {node}: pins, state file or drop-in of kip's may be left ({why})"))
            .collect();
        let cluster_text = match &cluster {
            ClusterCleanup::NoApi => {
                incomplete.push("no Kubernetes API: node labels and the fallback DaemonSet were not touched".into());
                "no Kubernetes API".to_string()
            }
            ClusterCleanup::WaitingForAgents => "DaemonSet deleted; labels wait for the agents".into(),
            ClusterCleanup::Done { labels_removed } => {
                format!("DaemonSet deleted, {labels_removed} node labels removed")
            }
            ClusterCleanup::Failed(e) => {
                incomplete.push(format!("cluster cleanup failed: {e}"));
                format!("failed: {e}")
            }
        };
        let done = settled && !matches!(cluster, ClusterCleanup::WaitingForAgents);
        Some(serde_json::json!({
            "kind": crate::config::release_name(self.current().config.release),
            "seconds": now.duration_since(started).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "released": progress.released,
            "pending": progress.pending,
            "cluster": cluster_text,
            "done": done,
            "incomplete": if done { incomplete } else { vec![] },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(images: &str) -> KipConfig {
        crate::config::validate(&[("IMAGES".to_string(), images.to_string())].into_iter().collect()).unwrap()
    }

    use crate::fixtures::report;

    fn with_release(images: &str, release: &str) -> KipConfig {
        let raw =
            [("IMAGES", images), ("KIP_RELEASE", release)].into_iter().map(|(k, v)| (k.to_string(), v.to_string()));
        crate::config::validate(&raw.collect()).unwrap()
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn digests_go_out_with_their_images_and_only_a_change_is_a_new_generation() {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(config("a=busybox;b=quay.io/x/b:1"), metrics.clone());
        let busybox = "docker.io/library/busybox:latest".to_string();
        let answers =
            |a: Resolved, b: Resolved| BTreeMap::from([(busybox.clone(), a), ("quay.io/x/b:1".to_string(), b)]);
        hub.set_resolution(answers(Resolved::Digest(D1.into()), Resolved::Unresolved("registry down".into())));
        let update = hub.current().to_update();
        assert_eq!(update.generation, 2);
        assert_eq!((update.images[0].digest.as_str(), update.images[1].digest.as_str()), (D1, ""));
        // The same answers again (every interval): nothing new for the agents.
        hub.set_resolution(answers(Resolved::Digest(D1.into()), Resolved::Unresolved("registry down".into())));
        assert_eq!(hub.current().generation, 2);
        let text = metrics.render();
        assert!(text.contains("kip_image_resolved{name=\"a\",image=\"busybox\"} 1"), "{text}");
        assert!(text.contains("kip_image_resolved{name=\"b\",image=\"quay.io/x/b:1\"} 0"), "{text}");
        let status = hub.status_json();
        assert_eq!(status["images"][0]["resolved_by"], "coordinator");
        assert_eq!(status["images"][1]["why"], "registry down");
        // The tag moved.
        hub.set_resolution(answers(Resolved::Digest(D2.into()), Resolved::Unresolved("registry down".into())));
        assert_eq!((hub.current().generation, hub.current().to_update().images[0].digest.clone()), (3, D2.to_string()));
    }

    #[test]
    fn per_image_counts_follow_each_report_and_a_new_list_recounts() {
        let hub = Hub::new(config("a=busybox;b=nginx"), Arc::new(Metrics::new()));
        let gauge = |name: &str, image: &str| {
            let l = ImageLabels { name: name.into(), image: image.into() };
            (
                hub.metrics.image_nodes_cached.get_or_create(&l).get(),
                hub.metrics.image_nodes_pinned.get_or_create(&l).get(),
            )
        };
        hub.record_report(report("n1", &[("a", "busybox", true, true), ("b", "nginx", true, false)]));
        hub.record_report(report("n2", &[("a", "busybox", true, false), ("x", "unlisted", true, true)]));
        assert_eq!((gauge("a", "busybox"), gauge("b", "nginx")), ((2, 1), (1, 0)));
        // n1's next report replaces its last one: only the difference counts.
        hub.record_report(report("n1", &[("a", "busybox", false, false), ("b", "nginx", true, true)]));
        assert_eq!((gauge("a", "busybox"), gauge("b", "nginx")), ((1, 0), (1, 1)));
        assert_eq!(hub.metrics.nodes_reporting.get(), 2);
        // A new list: counted again from the reports.
        hub.publish(config("b=nginx;x=unlisted"));
        assert_eq!((gauge("b", "nginx"), gauge("x", "unlisted")), ((1, 1), (1, 1)));
        let counts: Vec<(String, i64, i64)> =
            hub.image_counts(&hub.current()).into_iter().map(|(l, c, p)| (l.name, c, p)).collect();
        assert_eq!(counts, vec![("b".to_string(), 1, 1), ("x".to_string(), 1, 1)], "/status agrees with the gauges");
    }

    #[test]
    fn a_list_change_keeps_the_digests_of_tags_still_listed() {
        let hub = Hub::new(config("a=busybox;b=quay.io/x/b:1"), Arc::new(Metrics::new()));
        hub.set_resolution(BTreeMap::from([
            ("docker.io/library/busybox:latest".to_string(), Resolved::Digest(D1.into())),
            ("quay.io/x/b:1".to_string(), Resolved::Digest(D2.into())),
        ]));
        assert_eq!(hub.publish(config("a=busybox;c=quay.io/x/c:1")), Some(3));
        let update = hub.current().to_update();
        let digests: Vec<(&str, &str)> = update.images.iter().map(|i| (i.name.as_str(), i.digest.as_str())).collect();
        assert_eq!(digests, vec![("a", D1), ("c", "")], "b left the list; c waits for the resolver");
        // Late answers for a tag no longer listed are not published.
        hub.set_resolution(BTreeMap::from([("quay.io/x/b:1".to_string(), Resolved::Digest(D1.into()))]));
        assert_eq!(hub.current().generation, 3);
    }

    #[test]
    fn a_release_publishes_an_empty_list_waits_for_every_node_and_is_final() {
        let hub = Hub::with_release_timeout(config("a=busybox"), Arc::new(Metrics::new()), Duration::from_secs(60));
        assert!(hub.release_state(SystemTime::now()).is_none());
        hub.node_stream("n1", true);
        hub.record_report(report("n1", &[("a", "busybox", true, true)]));
        assert_eq!(hub.publish(with_release("a=busybox", "unpin")), Some(2));
        let update = hub.current().to_update();
        assert_eq!((update.release(), update.images.len()), (v1::Release::Unpin, 0));
        // n2 was labelled for an agent by an earlier coordinator and never reconnected.
        hub.expect_release_from(["n2".to_string()]);
        let (progress, settled, cluster) = hub.release_state(SystemTime::now()).unwrap();
        assert_eq!(cluster, ClusterCleanup::NoApi);
        assert!(!settled);
        assert_eq!(progress.pending.get("n1").map(String::as_str), Some("waiting for its agent"));
        assert_eq!(progress.pending.get("n2").map(String::as_str), Some("its agent is not connected"));
        let mut released = report("n1", &[]);
        released.released = true;
        hub.record_report(released);
        let (progress, settled, _) = hub.release_state(SystemTime::now()).unwrap();
        assert_eq!((progress.released.len(), progress.pending.len(), settled), (1, 1, false));
        let after_timeout = SystemTime::now() + Duration::from_secs(61);
        assert!(hub.release_state(after_timeout).unwrap().1, "the wait ends with the release timeout");
        let status = hub.status_json();
        assert_eq!(status["release"]["released"], serde_json::json!(["n1"]));
        assert_eq!(status["release"]["done"], serde_json::json!(false));
        // The hook's ConfigMap goes away before the coordinator does: the release stays.
        assert_eq!(hub.publish(config("a=busybox;b=nginx")), Some(3));
        assert_eq!(hub.current().config.release, v1::Release::Unpin);
        assert!(hub.current().to_update().images.is_empty());
    }

    #[test]
    fn a_runtime_not_answering_is_dated_from_its_first_report_and_forgotten_when_it_answers() {
        let hub = Hub::new(with_release("a=busybox", ""), Arc::new(Metrics::new()));
        hub.node_stream("n1", true);
        let mut slow = report("n1", &[]);
        slow.runtime = Some(v1::RuntimeState { available: false, not_answering: true, ..Default::default() });
        hub.record_report(slow.clone());
        let first = hub.liveness()[0].not_answering_since.expect("dated");
        std::thread::sleep(Duration::from_millis(5));
        slow.generation = 2;
        hub.record_report(slow);
        assert_eq!(hub.liveness()[0].not_answering_since, Some(first), "from the first such report, not the last");
        hub.record_report(report("n1", &[]));
        assert_eq!(hub.liveness()[0].not_answering_since, None);
        let mut absent = report("n1", &[]);
        absent.runtime = Some(v1::RuntimeState { available: false, not_answering: false, ..Default::default() });
        hub.record_report(absent);
        assert_eq!(hub.liveness()[0].not_answering_since, None, "no socket is not the passing kind");
    }

    #[test]
    fn a_deleted_node_is_forgotten_unless_its_agent_is_still_connected() {
        let hub = Hub::new(with_release("a=busybox", "unpin"), Arc::new(Metrics::new()));
        for n in ["kept", "scaled-down", "still-connected"] {
            hub.node_stream(n, true);
            hub.record_report(report(n, &[]));
        }
        hub.node_stream("scaled-down", false);
        hub.expect_release_from(["scaled-down".to_string()]);
        hub.forget_deleted_nodes(&["kept".to_string()].into());
        assert_eq!(hub.nodes().keys().collect::<Vec<_>>(), vec!["kept", "still-connected"]);
        assert_eq!(hub.metrics.nodes_reporting.get(), 2);
        let (progress, _, _) = hub.release_state(SystemTime::now()).unwrap();
        assert!(!progress.pending.contains_key("scaled-down"), "a release does not wait for a deleted node");
    }

    #[test]
    fn without_an_api_a_release_is_done_once_the_agents_are_and_says_what_it_left() {
        let hub = Hub::new(with_release("a=busybox", "remove"), Arc::new(Metrics::new()));
        hub.node_stream("n1", true);
        let mut r = report("n1", &[]);
        r.released = true;
        hub.record_report(r);
        let status = hub.status_json();
        assert_eq!(status["release"]["done"], serde_json::json!(true));
        assert_eq!(status["release"]["kind"], serde_json::json!("remove"));
        assert!(status["release"]["incomplete"][0].as_str().unwrap().starts_with("no Kubernetes API"), "{status}");
        // With a controller attached, the cluster's side is awaited before it is done.
        let hub = Hub::new(with_release("a=busybox", "unpin"), Arc::new(Metrics::new()));
        hub.attach_api();
        assert_eq!(hub.status_json()["release"]["done"], serde_json::json!(false));
        hub.set_cluster_cleanup(ClusterCleanup::Done { labels_removed: 0 });
        assert_eq!(hub.status_json()["release"]["done"], serde_json::json!(true));
        assert_eq!(hub.status_json()["release"]["incomplete"], serde_json::json!([]));
    }

    #[test]
    fn publishing_the_same_config_is_a_no_op() {
        let hub = Hub::new(config("a=busybox"), Arc::new(Metrics::new()));
        let mut rx = hub.subscribe();
        assert_eq!(hub.publish(config("a=busybox")), None);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(hub.publish(config("a=busybox;b=nginx")), Some(2));
        assert!(rx.has_changed().unwrap());
        let update = rx.borrow_and_update().to_update();
        assert_eq!(update.generation, 2);
        assert_eq!(update.images.len(), 2);
        assert_eq!(update.policy.unwrap().refresh_interval_seconds, 3600);
        assert_eq!(hub.metrics.config_generation.get(), 2);
    }

    #[test]
    fn reports_are_aggregated_per_image() {
        let hub = Hub::new(config("a=busybox;b=nginx"), Arc::new(Metrics::new()));
        hub.record_report(report("n1", &[("a", "busybox", true, true), ("b", "nginx", true, false)]));
        hub.record_report(report("n2", &[("a", "busybox", true, true), ("b", "nginx", false, false)]));
        hub.record_report(report("n2", &[("a", "busybox", true, true), ("b", "nginx", true, true)]));
        let counts: Vec<_> = hub.image_counts(&hub.current()).into_iter().map(|(l, c, p)| (l.name, c, p)).collect();
        assert_eq!(counts, vec![("a".to_string(), 2, 2), ("b".to_string(), 2, 1)]);
        let status = hub.status_json();
        assert_eq!(status["nodes"]["n2"]["images"][1]["pinned"], serde_json::json!(true));
        assert_eq!(status["images"][1]["nodes_pinned"], serde_json::json!(1));
        assert_eq!(hub.metrics.nodes_reporting.get(), 2);
    }

    #[test]
    fn a_node_that_cannot_pin_says_why_in_the_status() {
        let hub = Hub::new(config("a=busybox"), Arc::new(Metrics::new()));
        let mut r = report("crio-1", &[("a", "busybox", true, false)]);
        r.runtime = Some(v1::RuntimeState {
            available: true,
            name: "cri-o".into(),
            version: "1.36.3".into(),
            pin_error: "writing kip's drop-in /etc/crio/crio.conf.d/zz-kip-pinned-images.conf: Read-only file system"
                .into(),
            ..Default::default()
        });
        hub.record_report(r);
        let status = hub.status_json();
        let runtime = &status["nodes"]["crio-1"]["runtime"];
        assert_eq!(runtime["name"], serde_json::json!("cri-o"));
        assert!(runtime["pin_error"].as_str().unwrap().contains("Read-only file system"), "{runtime}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_nobody_renews_leaves_the_in_use_gauge_at_the_next_scrape() {
        let hub = Hub::new(config("a=busybox"), Arc::new(Metrics::new()));
        assert!(hub.leases.acquire("a", || 1, &hub.metrics).await.granted);
        assert!(hub.render_metrics().contains("kip_pull_leases_in_use 1\n"));
        // node a died: nobody asks again, the lease runs out.
        tokio::time::sleep(LEASE_TTL + Duration::from_secs(1)).await;
        let text = hub.render_metrics();
        assert!(text.contains("kip_pull_leases_in_use 0\n"), "{text}");
        assert_eq!(hub.leases.to_json(1)["held"], serde_json::json!([]));
    }
}
