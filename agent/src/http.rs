//! The agent's HTTP endpoints: `/metrics` (OpenMetrics), `/healthz` (the main loop's heartbeat), `/readyz`
//! (runtime reachable and every listed image cached at least once).

use std::sync::{Arc, RwLock};

use kip::http::{self, Router};

use crate::metrics::Metrics;

/// Why the agent is not ready, or `None` when it is.
#[derive(Clone, Default)]
pub struct Readiness(Arc<RwLock<Option<String>>>);

impl Readiness {
    pub fn starting() -> Self {
        Self(Arc::new(RwLock::new(Some("starting".into()))))
    }
    pub fn set(&self, not_ready_reason: Option<String>) {
        if let Ok(mut g) = self.0.write() {
            *g = not_ready_reason;
        }
    }
    pub fn get(&self) -> Option<String> {
        self.0.read().map(|g| g.clone()).unwrap_or_else(|_| Some("readiness state poisoned".into()))
    }
}

pub fn router(metrics: Arc<Metrics>, ready: Readiness, heartbeat: kip::process::Heartbeat) -> Router {
    Arc::new(move |path| match path {
        "/metrics" => http::openmetrics(metrics.render()),
        "/healthz" => http::health(heartbeat.check()),
        "/readyz" => http::readiness(ready.get()),
        _ => http::not_found(),
    })
}
