//! The coordinator's shared state: the published image list (a watch channel every agent
//! stream follows) and the latest report of each node, with the aggregates derived from them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use kip::v1;
use tokio::sync::watch;

use crate::config::KipConfig;
use crate::metrics::{ImageLabels, Metrics};

/// One published generation of the configuration.
#[derive(Debug)]
pub struct Published {
    pub generation: u64,
    pub config: KipConfig,
}

impl Published {
    pub fn to_update(&self) -> v1::ImageListUpdate {
        let p = &self.config.policy;
        v1::ImageListUpdate {
            generation: self.generation,
            images: self
                .config
                .images
                .entries()
                .iter()
                .map(|e| v1::Image { name: e.name.clone(), image: e.image.clone() })
                .collect(),
            policy: Some(v1::PullPolicy {
                max_parallel_pulls: p.max_parallel_pulls.unwrap_or(0),
                refresh_interval_seconds: u64::from(self.config.caching_interval_hours) * 3600,
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
}

/// Whether a node's agent is connected, and since when (for the label grace period).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub node: String,
    /// The node's agent has reported to this process (its runtime state is evidence).
    pub reported: bool,
    pub runtime_available: bool,
    pub connected: bool,
    /// When `connected` last changed.
    pub since: SystemTime,
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
}

impl Hub {
    pub fn new(config: KipConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        let first = Arc::new(Published { generation: 1, config });
        metrics.config_generation.set(1);
        metrics.images_desired.set(first.config.images.len() as i64);
        let (list, _) = watch::channel(first.clone());
        let hub = Arc::new(Self {
            list,
            nodes: RwLock::new(BTreeMap::new()),
            connections: RwLock::new(BTreeMap::new()),
            nodes_changed: watch::channel(0).0,
            metrics,
        });
        hub.refresh_image_metrics(&first);
        hub
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

    /// A Watch stream of `node` opened (`open`) or closed.
    pub fn node_stream(&self, node: &str, open: bool) {
        if let Ok(mut c) = self.connections.write() {
            let conn = c.entry(node.to_string()).or_insert(Connection { open_streams: 0, since: SystemTime::now() });
            let was_connected = conn.open_streams > 0;
            conn.open_streams = if open { conn.open_streams + 1 } else { conn.open_streams.saturating_sub(1) };
            if was_connected != (conn.open_streams > 0) {
                conn.since = SystemTime::now();
            }
        }
        self.nodes_changed.send_modify(|v| *v += 1);
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
                    connected: conn.is_some_and(|c| c.open_streams > 0),
                    since: conn.map_or(SystemTime::UNIX_EPOCH, |c| c.since),
                }
            })
            .collect()
    }

    /// Publishes `config` as a new generation unless it equals the current one.
    /// Returns the new generation, or `None` when nothing changed.
    pub fn publish(&self, config: KipConfig) -> Option<u64> {
        let current = self.current();
        if current.config == config {
            return None;
        }
        let next = Arc::new(Published { generation: current.generation + 1, config });
        let (old, new) = (&current.config.images, &next.config.images);
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
        self.list.send_replace(next.clone());
        self.refresh_image_metrics(&next);
        Some(next.generation)
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
        let old = {
            let Ok(mut nodes) = self.nodes.write() else { return };
            let old = nodes.get(&node).map(|e| summary(&e.report));
            nodes.insert(node.clone(), NodeEntry { report, received_at: SystemTime::now() });
            old
        };
        if old != Some(new) {
            let (generation, cached, pinned, total, runtime) = new;
            tracing::info!(node = %node, generation, cached, pinned, images = total, runtime_available = runtime, "node state changed");
        }
        self.refresh_image_metrics(&self.current());
        self.nodes_changed.send_modify(|v| *v += 1);
    }

    pub fn nodes(&self) -> BTreeMap<String, NodeEntry> {
        self.nodes.read().map(|n| n.clone()).unwrap_or_default()
    }

    /// Per listed image, how many nodes report it cached and pinned.
    pub fn image_counts(&self, published: &Published) -> Vec<(ImageLabels, i64, i64)> {
        let nodes = self.nodes();
        published
            .config
            .images
            .entries()
            .iter()
            .map(|e| {
                let states = nodes
                    .values()
                    .filter_map(|n| n.report.images.iter().find(|i| i.name == e.name && i.image == e.image));
                let (cached, pinned) = states.fold((0, 0), |(c, p), s| (c + s.cached as i64, p + s.pinned as i64));
                (ImageLabels { name: e.name.clone(), image: e.image.clone() }, cached, pinned)
            })
            .collect()
    }

    fn refresh_image_metrics(&self, published: &Published) {
        let m = &self.metrics;
        m.image_nodes_cached.clear();
        m.image_nodes_pinned.clear();
        for (labels, cached, pinned) in self.image_counts(published) {
            m.image_nodes_cached.get_or_create(&labels).set(cached);
            m.image_nodes_pinned.get_or_create(&labels).set(pinned);
        }
        let nodes = self.nodes();
        m.nodes_reporting.set(nodes.len() as i64);
        m.nodes_runtime_unavailable
            .set(nodes.values().filter(|n| !n.report.runtime.as_ref().is_some_and(|r| r.available)).count() as i64);
    }

    /// `/status`: the published list, per node its state, per image the nodes that have it.
    pub fn status_json(&self) -> serde_json::Value {
        let published = self.current();
        let now = SystemTime::now();
        let images: Vec<_> = self
            .image_counts(&published)
            .into_iter()
            .map(|(l, cached, pinned)| serde_json::json!({"name": l.name, "image": l.image, "nodes_cached": cached, "nodes_pinned": pinned}))
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
        serde_json::json!({
            "generation": published.generation,
            "images": images,
            "nodes": nodes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(images: &str) -> KipConfig {
        crate::config::validate(&[("IMAGES".to_string(), images.to_string())].into_iter().collect()).unwrap()
    }

    fn report(node: &str, images: &[(&str, &str, bool, bool)]) -> v1::NodeReport {
        v1::NodeReport {
            node_name: node.into(),
            runtime: Some(v1::RuntimeState { available: true, name: "containerd".into(), ..Default::default() }),
            generation: 1,
            images: images
                .iter()
                .map(|(n, i, c, p)| v1::ImageState {
                    name: n.to_string(),
                    image: i.to_string(),
                    cached: *c,
                    pinned: *p,
                    ..Default::default()
                })
                .collect(),
            agent_version: "test".into(),
        }
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
}
