//! What the agents tell: each node's latest report and its Watch connection, the liveness the
//! label decision reads (one node at a time: no pass copies the cluster), and the per-image
//! counters kept by each report's difference.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use kip::images::ImageEntry;
use kip::v1;

use super::{image_labels, Published, State};
use crate::metrics::ImageLabels;

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

fn runtime_available(r: &v1::NodeReport) -> bool {
    r.runtime.as_ref().is_some_and(|rt| rt.available)
}

/// What a node reports of one listed image (matched by name and image, as listed).
fn reported<'a>(report: &'a v1::NodeReport, entry: &ImageEntry) -> Option<&'a v1::ImageState> {
    report.images.iter().find(|i| i.name == entry.name && i.image == entry.image)
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

impl State {
    /// A Watch stream of `node` opened (`open`) or closed. True when this process had never seen
    /// the node connect before (worth a log line; a reconnect is not).
    pub fn node_stream(&self, node: &str, open: bool) -> bool {
        let mut first = false;
        if let Ok(mut c) = self.connections.write() {
            first = !c.contains_key(node);
            let conn =
                c.entry(node.to_string()).or_insert(super::Connection { open_streams: 0, since: SystemTime::now() });
            let was_connected = conn.open_streams > 0;
            conn.open_streams = if open { conn.open_streams + 1 } else { conn.open_streams.saturating_sub(1) };
            if was_connected != (conn.open_streams > 0) {
                conn.since = SystemTime::now();
            }
        }
        self.touch(node);
        first
    }

    /// Whether `node`'s agent has a Watch stream open to this process now.
    pub fn is_connected(&self, node: &str) -> bool {
        self.connections.read().is_ok_and(|c| c.get(node).is_some_and(|c| c.open_streams > 0))
    }

    /// What the label decision reads of one node: its runtime (from its report) and connection.
    /// One node's entry only: a reconcile never copies the cluster.
    pub fn liveness_of(&self, node: &str) -> Liveness {
        let (reported, runtime_available, not_answering_since) = self
            .nodes
            .read()
            .ok()
            .and_then(|nodes| {
                let e = nodes.get(node)?;
                Some((true, runtime_available(&e.report), e.not_answering_since))
            })
            .unwrap_or((false, false, None));
        let conn = self.connections.read().ok().and_then(|c| c.get(node).copied());
        Liveness {
            node: node.to_string(),
            reported,
            runtime_available,
            not_answering_since,
            connected: conn.is_some_and(|c| c.open_streams > 0),
            since: conn.map_or(SystemTime::UNIX_EPOCH, |c| c.since),
        }
    }

    /// The nodes whose agent ever talked to this process (reported or connected), and of those
    /// the ones connected now.
    pub fn known_nodes(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut known: BTreeSet<String> = self.nodes.read().map(|n| n.keys().cloned().collect()).unwrap_or_default();
        let mut connected = BTreeSet::new();
        if let Ok(c) = self.connections.read() {
            for (name, conn) in c.iter() {
                known.insert(name.clone());
                if conn.open_streams > 0 {
                    connected.insert(name.clone());
                }
            }
        }
        (known, connected)
    }

    /// One node's latest report (`None`: none yet).
    pub fn node(&self, node: &str) -> Option<NodeEntry> {
        self.nodes.read().ok()?.get(node).cloned()
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
        self.touch(&node);
    }

    /// Forgets the nodes the cluster no longer has (scaled down, deleted) whose agents are not
    /// connected: they leave `/status`, the metrics and the nodes a release waits for.
    pub fn forget_deleted_nodes(&self, deleted: impl Fn(&str) -> bool) {
        let connected: BTreeSet<String> = self
            .connections
            .read()
            .map(|c| c.iter().filter(|(_, c)| c.open_streams > 0).map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let gone = |n: &String| deleted(n) && !connected.contains(n);
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
    pub(super) fn refresh_image_metrics(&self, published: &Published) {
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
}
