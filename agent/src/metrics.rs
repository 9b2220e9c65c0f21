//! The agent's Prometheus metrics (OpenMetrics text). Per-image series are labelled with
//! the list's `name` and `image`, so their number is bounded by the list; series of images
//! that leave the list are removed.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    pub name: String,
    pub image: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PullLabels {
    pub name: String,
    pub image: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabels {
    pub runtime: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// A manifest request the runtime made to a registry for kip: one GET per pull (what Docker Hub
/// counts as a pull).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    pub registry: String,
    pub method: &'static str,
    pub result: &'static str,
}

pub const RESULT_SUCCESS: &str = "success";
pub const RESULT_FAILURE: &str = "failure";

pub struct Metrics {
    registry: Registry,
    pub images_desired: Gauge,
    pub images_cached: Gauge,
    pub images_pinned: Gauge,
    pub image_cached: Family<ImageLabels, Gauge>,
    pub image_pinned: Family<ImageLabels, Gauge>,
    pub image_pulls: Family<PullLabels, Counter>,
    pub image_pull_duration: Family<ResultLabels, Histogram>,
    pub image_repulls: Family<ImageLabels, Counter>,
    pub cri_up: Gauge,
    pub pinning_available: Gauge,
    pub runtime_info: Family<RuntimeLabels, Gauge>,
    /// From wanting to pull to being allowed, by how (granted, coordinator_unreachable, unsupported).
    pub pull_lease_wait: Family<OutcomeLabels, Histogram>,
    /// Leases the coordinator did not renew (expired, given to another node meanwhile).
    pub pull_leases_lost: Counter,
    pub registry_requests: Family<RegistryLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            images_desired: Gauge::default(),
            images_cached: Gauge::default(),
            images_pinned: Gauge::default(),
            image_cached: Family::default(),
            image_pinned: Family::default(),
            image_pulls: Family::default(),
            // 0.5 s … ~1 h: small images on a local registry up to multi-GiB IDE images.
            image_pull_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.5, 2.0, 14))),
            image_repulls: Family::default(),
            cri_up: Gauge::default(),
            pinning_available: Gauge::default(),
            runtime_info: Family::default(),
            pull_lease_wait: Family::new_with_constructor(|| {
                Histogram::new([0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
            }),
            pull_leases_lost: Counter::default(),
            registry_requests: Family::default(),
            registry: Registry::default(),
        };
        registry.register("kip_images_desired", "Images in the current list", m.images_desired.clone());
        registry.register("kip_images_cached", "Listed images present on the node", m.images_cached.clone());
        registry.register(
            "kip_images_pinned",
            "Listed images pinned against garbage collection",
            m.images_pinned.clone(),
        );
        registry.register("kip_image_cached", "1 when the listed image is present on the node", m.image_cached.clone());
        registry.register("kip_image_pinned", "1 when the listed image is pinned", m.image_pinned.clone());
        registry.register("kip_image_pulls", "Pulls attempted, by image and result", m.image_pulls.clone());
        registry.register_with_unit(
            "kip_image_pull_duration",
            "Time taken by CRI PullImage, by result",
            Unit::Seconds,
            m.image_pull_duration.clone(),
        );
        registry.register(
            "kip_image_repulls",
            "Cached images that disappeared and were pulled again",
            m.image_repulls.clone(),
        );
        registry.register("kip_cri_up", "1 when the runtime answers on its CRI socket", m.cri_up.clone());
        registry.register(
            "kip_pinning_available",
            "1 when the runtime holds kip's pins; 0 when it cannot (the reason is in the log, /readyz and the node report)",
            m.pinning_available.clone(),
        );
        registry.register("kip_runtime", "Container runtime behind the CRI socket", m.runtime_info.clone());
        registry.register_with_unit(
            "kip_pull_lease_wait",
            "Time from having images to pull until the cluster's pull budget let this node pull, by outcome",
            Unit::Seconds,
            m.pull_lease_wait.clone(),
        );
        registry.register(
            "kip_pull_leases_lost",
            "Pull leases the coordinator did not renew (expired and given to another node): no new pull until granted again",
            m.pull_leases_lost.clone(),
        );
        registry.register(
            "kip_registry_requests",
            "Manifest requests made to registries for kip: one GET per pull the runtime ran, by registry and result",
            m.registry_requests.clone(),
        );
        registry.register(
            "kip_build",
            "kip-agent build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("component", "agent")]),
        );
        Self { registry, ..m }
    }

    /// Drops every per-image series of an image that left the list.
    pub fn forget_image(&self, labels: &ImageLabels) {
        self.image_cached.remove(labels);
        self.image_pinned.remove(labels);
        self.image_repulls.remove(labels);
        for result in [RESULT_SUCCESS, RESULT_FAILURE] {
            self.image_pulls.remove(&PullLabels { name: labels.name.clone(), image: labels.image.clone(), result });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_units_follow_prometheus_conventions() {
        let m = Metrics::new();
        let l = ImageLabels { name: "a".into(), image: "busybox".into() };
        m.image_cached.get_or_create(&l).set(1);
        m.image_pulls
            .get_or_create(&PullLabels { name: "a".into(), image: "busybox".into(), result: RESULT_SUCCESS })
            .inc();
        m.image_pull_duration.get_or_create(&ResultLabels { result: RESULT_SUCCESS }).observe(1.5);
        let text = m.render();
        for needle in [
            "# TYPE kip_images_desired gauge",
            "kip_image_cached{name=\"a\",image=\"busybox\"} 1",
            "kip_image_pulls_total{name=\"a\",image=\"busybox\",result=\"success\"} 1",
            "# UNIT kip_image_pull_duration_seconds seconds",
            "kip_image_pull_duration_seconds_count{result=\"success\"} 1",
            "kip_build_info{version=\"",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.forget_image(&l);
        let text = m.render();
        assert!(!text.contains("name=\"a\""), "series of a dropped image stay:\n{text}");
    }
}
