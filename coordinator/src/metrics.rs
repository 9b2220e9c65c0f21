//! The coordinator's Prometheus metrics: the published list, config reloads, connected
//! agents, and per image the number of nodes that have it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    pub name: String,
    pub image: String,
}

pub struct Metrics {
    registry: Registry,
    pub config_generation: Gauge,
    pub config_reloads: Counter,
    pub config_reload_errors: Counter,
    pub images_desired: Gauge,
    pub agents_connected: Gauge,
    pub nodes_reporting: Gauge,
    pub nodes_runtime_unavailable: Gauge,
    pub image_nodes_cached: Family<ImageLabels, Gauge>,
    pub image_nodes_pinned: Family<ImageLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            config_generation: Gauge::default(),
            config_reloads: Counter::default(),
            config_reload_errors: Counter::default(),
            images_desired: Gauge::default(),
            agents_connected: Gauge::default(),
            nodes_reporting: Gauge::default(),
            nodes_runtime_unavailable: Gauge::default(),
            image_nodes_cached: Family::default(),
            image_nodes_pinned: Family::default(),
        };
        registry.register(
            "kip_config_generation",
            "Generation of the published image list",
            m.config_generation.clone(),
        );
        registry.register("kip_config_reloads", "Configuration changes published", m.config_reloads.clone());
        registry.register(
            "kip_config_reload_errors",
            "Configuration changes refused as invalid (the last good list stays published)",
            m.config_reload_errors.clone(),
        );
        registry.register("kip_images_desired", "Images in the published list", m.images_desired.clone());
        registry.register("kip_agents_connected", "Agents with an open Watch stream", m.agents_connected.clone());
        registry.register("kip_nodes_reporting", "Nodes whose agent has reported", m.nodes_reporting.clone());
        registry.register(
            "kip_nodes_runtime_unavailable",
            "Nodes whose agent reports no usable CRI socket",
            m.nodes_runtime_unavailable.clone(),
        );
        registry.register(
            "kip_image_nodes_cached",
            "Nodes that have the listed image cached",
            m.image_nodes_cached.clone(),
        );
        registry.register(
            "kip_image_nodes_pinned",
            "Nodes that have the listed image pinned",
            m.image_nodes_pinned.clone(),
        );
        registry.register(
            "kip_build",
            "kip-coordinator build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("component", "coordinator")]),
        );
        Self { registry, ..m }
    }

    pub fn render(&self) -> String {
        kip::process::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
