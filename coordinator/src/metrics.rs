//! The coordinator's Prometheus metrics: the published list, config reloads, connected
//! agents, and per image the number of nodes that have it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    pub name: String,
    pub image: String,
}

/// One request to a registry: its host, `HEAD` or `GET`, and `ok` or why not (`unauthorized`,
/// `not_found`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
    pub method: &'static str,
    pub result: &'static str,
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
    pub gate_nodes_held: Gauge,
    gate_opened: Family<ReasonLabels, Counter>,
    gate_wait_seconds: Histogram,
    /// Agent calls refused, by reason (unauthenticated, permission_denied, unavailable).
    pub agent_calls_refused: Family<ReasonLabels, Counter>,
    /// 1 when the listed image's tag is resolved to a digest (published with it), else 0.
    pub image_resolved: Family<ImageLabels, Gauge>,
    pub registry_requests: Family<RegistryLabels, Counter>,
    pub pull_leases_in_use: Gauge,
    pub pull_lease_budget: Gauge,
    pub pull_lease_wait: Histogram,
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
            gate_nodes_held: Gauge::default(),
            gate_opened: Family::default(),
            // From a node's creation to its gate opening: a minute to an hour.
            gate_wait_seconds: Histogram::new([15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0]),
            agent_calls_refused: Family::default(),
            image_resolved: Family::default(),
            registry_requests: Family::default(),
            pull_leases_in_use: Gauge::default(),
            pull_lease_budget: Gauge::default(),
            // From a node's first ask to its lease: at once, or after other nodes' pulls.
            pull_lease_wait: Histogram::new([0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]),
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
            "kip_gate_nodes_held",
            "Nodes with the startup gate taint that kip holds (images not cached yet)",
            m.gate_nodes_held.clone(),
        );
        registry.register(
            "kip_gate_opened",
            "Startup gates kip removed, by reason (cached, fallback_ready, timeout: unverified, uninstall)",
            m.gate_opened.clone(),
        );
        registry.register(
            "kip_gate_wait_seconds",
            "Time from a gated node's creation until kip removed its gate",
            m.gate_wait_seconds.clone(),
        );
        registry.register(
            "kip_agent_calls_refused",
            "Agent calls refused by --agent-auth, by reason",
            m.agent_calls_refused.clone(),
        );
        registry.register(
            "kip_image_resolved",
            "1 when the coordinator resolved the listed tag to a digest (nodes that have it do not pull), 0 when agents refresh it on their own",
            m.image_resolved.clone(),
        );
        registry.register(
            "kip_registry_requests",
            "Manifest requests the coordinator sent to registries to resolve tags, by registry, method and result",
            m.registry_requests.clone(),
        );
        registry.register(
            "kip_pull_leases_in_use",
            "Nodes holding a pull lease (pulling for kip now)",
            m.pull_leases_in_use.clone(),
        );
        registry.register(
            "kip_pull_lease_budget",
            "Nodes allowed to pull at once (KIP_MAX_NODES_PULLING applied to the connected nodes)",
            m.pull_lease_budget.clone(),
        );
        registry.register(
            "kip_pull_lease_wait_seconds",
            "Time from a node's first ask for a pull lease until it got one",
            m.pull_lease_wait.clone(),
        );
        registry.register(
            "kip_build",
            "kip-coordinator build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("component", "coordinator")]),
        );
        Self { registry, ..m }
    }

    /// A gate opened for `why`, `waited` after the node was created.
    pub fn gate_opened(&self, why: crate::gate::Opened, waited: std::time::Duration) {
        self.gate_opened.get_or_create(&ReasonLabels { reason: why.as_str().into() }).inc();
        self.gate_wait_seconds.observe(waited.as_secs_f64());
    }

    pub fn refused(&self, reason: &str) {
        self.agent_calls_refused.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }

    pub fn registry_request(&self, registry: &str, method: &'static str, result: &'static str) {
        self.registry_requests.get_or_create(&RegistryLabels { registry: registry.into(), method, result }).inc();
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
