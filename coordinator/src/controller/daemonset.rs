//! The fallback sleep DaemonSet as its own object: server-side apply (field manager `kip`) only
//! when the spec hash changes, re-applied at once when the watch shows it deleted or edited,
//! deleted (kip's own only) when the configuration wants none (KIP_MODE=cri, a release).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Cluster, FIELD_MANAGER};
use crate::config::KipConfig;
use crate::manifest::{self, MANAGED_BY};
use crate::state::State;
use crate::watches::{changed, Workloads};

/// What kip knows of the DaemonSet in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Known {
    Unknown,
    Absent,
    Applied(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsOutcome {
    Unchanged,
    Created,
    Updated,
    Deleted,
}

/// The DaemonSet's controller: what it last applied, and whether the watch has shown that yet.
pub struct DaemonSetController {
    cluster: Arc<Cluster>,
    known: Known,
    /// The watch has shown the DaemonSet as kip last applied it: only from then on does its
    /// absence mean "deleted" (before, the watch has not caught up with the apply yet).
    applied_shown: bool,
}

impl DaemonSetController {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster, known: Known::Unknown, applied_shown: false }
    }

    /// Makes the DaemonSet match `config`. Sends no request when the spec is unchanged.
    pub async fn sync(&mut self, config: &KipConfig) -> Result<DsOutcome, kube::Error> {
        let api = Api::<DaemonSet>::namespaced(self.cluster.client.clone(), &config.namespace);
        let name = &config.daemonset_name;
        let Some(desired) = manifest::fallback_daemonset(config, &self.cluster.options_for(&config.namespace)) else {
            if self.known == Known::Absent {
                return Ok(DsOutcome::Unchanged);
            }
            let existing = api.get_opt(name).await?;
            let ours = existing
                .as_ref()
                .and_then(|d| d.metadata.labels.as_ref())
                .is_some_and(|l| l.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1));
            self.known = Known::Absent;
            if ours {
                api.delete(name, &DeleteParams::default()).await?;
                tracing::info!(daemonset = %name, namespace = %config.namespace, "deleted the fallback DaemonSet");
                return Ok(DsOutcome::Deleted);
            }
            return Ok(DsOutcome::Unchanged);
        };
        let hash = manifest::hash_of(&desired).unwrap_or_default().to_string();
        if self.known == Known::Applied(hash.clone()) {
            return Ok(DsOutcome::Unchanged);
        }
        let existing = api.get_opt(name).await?;
        self.applied_shown = false;
        if existing.as_ref().and_then(manifest::hash_of) == Some(hash.as_str()) {
            self.known = Known::Applied(hash);
            return Ok(DsOutcome::Unchanged);
        }
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await?;
        self.known = Known::Applied(hash.clone());
        let outcome = if existing.is_some() { DsOutcome::Updated } else { DsOutcome::Created };
        tracing::info!(daemonset = %name, namespace = %config.namespace, hash = %hash, mode = config.mode.as_str(), outcome = ?outcome, "applied the fallback DaemonSet");
        Ok(outcome)
    }

    /// What the DaemonSet watch shows (`None`: absent). A DaemonSet deleted or edited behind
    /// kip's back is applied again at the next sync (an Event says it was missing).
    pub async fn observe(&mut self, config: &KipConfig, shown: Option<&DaemonSet>) {
        let Known::Applied(hash) = &self.known else { return };
        match shown {
            Some(ds) if manifest::hash_of(ds) == Some(hash.as_str()) => self.applied_shown = true,
            // The watch still shows what was there before kip's apply.
            _ if !self.applied_shown => {}
            None => {
                tracing::warn!(daemonset = %config.daemonset_name, "the fallback DaemonSet was deleted; recreating it");
                self.known = Known::Unknown;
                self.cluster
                    .events
                    .record(
                        EventType::Warning,
                        "DaemonSetMissing",
                        "Recreate",
                        format!("DaemonSet {} was missing and is recreated", config.daemonset_name),
                    )
                    .await;
            }
            Some(_) => {
                tracing::warn!(daemonset = %config.daemonset_name, "the fallback DaemonSet was changed; applying kip's spec again");
                self.known = Known::Unknown;
            }
        }
    }
}

/// The longest the DaemonSet controller waits between passes without a change: the heartbeat
/// `/healthz` follows is beaten at least this often (with room for one pass's API calls).
const IDLE_PASS: Duration = Duration::from_secs(30);
const PASS_SILENCE: Duration = Duration::from_secs(5 * 60);

/// Keeps the DaemonSet in line with each new list and with what its watch shows; a failed sync
/// is retried with backoff. Tells `synced` how the last sync went, for which generation. Returns true when the
/// configuration moved the DaemonSet (`workloads` watch the old one), false at shutdown.
pub async fn run(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    workloads: Option<Workloads>,
    heartbeat: kip::process::Heartbeat,
    synced: watch::Sender<Option<(u64, bool)>>,
    shutdown: CancellationToken,
) -> bool {
    let mut controller = DaemonSetController::new(cluster.clone());
    let mut lists = state.subscribe();
    let mut ds_changes = workloads.as_ref().map(|w| w.daemonset.changed.clone());
    let mut retry = crate::backoff();
    loop {
        heartbeat.beat(PASS_SILENCE);
        let published = state.current();
        let config = &published.config;
        if let Some(w) = &workloads {
            if (w.namespace.as_str(), w.name.as_str()) != (config.namespace.as_str(), config.daemonset_name.as_str()) {
                return true;
            }
            if let Some(shown) = w.shown_daemonset() {
                controller.observe(config, shown.as_deref()).await;
            }
        }
        let (wait, settled) = match controller.sync(config).await {
            Ok(_) => {
                retry = crate::backoff();
                synced.send_replace(Some((published.generation, true)));
                (IDLE_PASS, true)
            }
            Err(e) => {
                synced.send_replace(Some((published.generation, false)));
                tracing::error!(error = %e, daemonset = %config.daemonset_name, "applying the fallback DaemonSet failed");
                cluster
                    .events
                    .record(
                        EventType::Warning,
                        "DaemonSetApplyFailed",
                        "Apply",
                        format!("applying DaemonSet {}: {e}", config.daemonset_name),
                    )
                    .await;
                (retry.next().unwrap_or(Duration::from_secs(60)), false)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = lists.changed() => {}
            // After a failure only the backoff (or a new list) starts the next try.
            // A watch that is gone disables this branch (the pattern fails); the others still wake.
            true = changed(&mut ds_changes), if settled => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
