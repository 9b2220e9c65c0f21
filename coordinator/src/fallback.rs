//! Keeps the fallback sleep DaemonSet and the agent node labels in line with the configuration
//! and the agents' reports, through the Kubernetes API: server-side apply (field manager `kip`)
//! only when the spec hash changes, recreation when the DaemonSet is missing, a health check
//! every CACHING_INTERVAL_HOURS, and Events on the coordinator's Deployment for failures.
//! Runs beside the list publisher: an unreachable API never stops the list from being published.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource as _};
use tokio_util::sync::CancellationToken;

use crate::config::{KipConfig, Mode};
use crate::daemonset::{self, Options, AGENT_LABEL, AGENT_LABEL_VALUE, MANAGED_BY};
use crate::hub::{Hub, Liveness};

pub const FIELD_MANAGER: &str = "kip";

/// The nodes that carry the agent label (so the fallback DaemonSet stays off them). Labels change
/// only on evidence:
/// - a node whose agent reported a working runtime keeps or gets it while the agent is connected,
///   or disconnected for less than `grace`;
/// - a node whose agent reported no usable runtime loses it at once (the fallback is needed there);
/// - a node this process has not heard from yet (it just started: agents are reconnecting) keeps
///   the label it has until `grace` after `started`, then loses it.
pub fn agent_nodes(
    liveness: &[Liveness],
    labelled: &BTreeSet<String>,
    started: SystemTime,
    now: SystemTime,
    grace: Duration,
) -> BTreeSet<String> {
    let within = |since: SystemTime| now.duration_since(since).unwrap_or_default() < grace;
    let heard: BTreeSet<&String> = liveness.iter().filter(|l| l.reported).map(|l| &l.node).collect();
    let reporting = liveness
        .iter()
        .filter(|l| l.reported && l.runtime_available && (l.connected || within(l.since)))
        .map(|l| l.node.clone());
    let awaited = labelled.iter().filter(|n| !heard.contains(n) && within(started)).cloned();
    reporting.chain(awaited).collect()
}

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

pub struct Fallback {
    client: Client,
    pub options: Options,
    /// Namespace of the owner Deployment: an owner reference only works within one namespace.
    owner_namespace: Option<String>,
    events: Option<(Recorder, ObjectReference)>,
    known: Known,
    /// Nodes carrying the agent label; `None` until listed.
    labelled: Option<BTreeSet<String>>,
}

impl Fallback {
    pub fn new(client: Client, options: Options, deployment: Option<ObjectReference>) -> Self {
        let events = deployment.map(|r| {
            let reporter = Reporter { controller: "kip-coordinator".into(), instance: std::env::var("POD_NAME").ok() };
            (Recorder::new(client.clone(), reporter), r)
        });
        let owner_namespace = events.as_ref().and_then(|(_, r)| r.namespace.clone());
        Self { client, options, owner_namespace, events, known: Known::Unknown, labelled: None }
    }

    /// The options for a DaemonSet in `namespace`: without an owner there if the Deployment
    /// lives elsewhere (the garbage collector would delete a DaemonSet with a dangling owner).
    fn options_for(&self, namespace: &str) -> Options {
        let same = self.owner_namespace.as_deref() == Some(namespace);
        Options { owner: self.options.owner.clone().filter(|_| same), ..self.options.clone() }
    }

    /// Finds out what the DaemonSet depends on: OpenShift (the `route.openshift.io` API group)
    /// and the coordinator's own Deployment (owner of the DaemonSet, subject of Events).
    /// Both lookups are retried until the API answers (a DaemonSet applied with a wrong guess
    /// would have to be fixed later); only a definite "not found" ends one without a result.
    pub async fn discover(client: Client, deployment: Option<(String, String)>) -> Self {
        let groups =
            crate::retry_forever("listing API groups (OpenShift detection)", || client.list_api_groups()).await;
        let openshift = groups.groups.iter().any(|g| g.name == "route.openshift.io");
        let mut owner = None;
        let mut reference = None;
        if let Some((namespace, name)) = deployment {
            let api = Api::<Deployment>::namespaced(client.clone(), &namespace);
            match crate::retry_forever("reading the coordinator's Deployment", || api.get_opt(&name)).await {
                Some(d) => {
                    owner = d.controller_owner_ref(&()).map(|mut o: OwnerReference| {
                        // The DaemonSet is owned but not controlled by the Deployment.
                        o.controller = Some(false);
                        o
                    });
                    reference = Some(d.object_ref(&()));
                }
                None => {
                    tracing::warn!(deployment = %name, namespace = %namespace, "the coordinator's Deployment does not exist; the DaemonSet gets no owner and no Events are recorded")
                }
            }
        }
        tracing::info!(openshift, owner = owner.is_some(), "fallback controller ready");
        Self::new(client, Options { openshift, owner }, reference)
    }

    /// Makes the DaemonSet match `config`. Sends no request when the spec is unchanged.
    pub async fn sync_daemonset(&mut self, config: &KipConfig) -> Result<DsOutcome, kube::Error> {
        let api = Api::<DaemonSet>::namespaced(self.client.clone(), &config.namespace);
        let name = &config.daemonset_name;
        let Some(desired) = daemonset::fallback_daemonset(config, &self.options_for(&config.namespace)) else {
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
                tracing::info!(daemonset = %name, namespace = %config.namespace, "deleted the fallback DaemonSet (KIP_MODE=cri)");
                return Ok(DsOutcome::Deleted);
            }
            return Ok(DsOutcome::Unchanged);
        };
        let hash = daemonset::hash_of(&desired).unwrap_or_default().to_string();
        if self.known == Known::Applied(hash.clone()) {
            return Ok(DsOutcome::Unchanged);
        }
        let existing = api.get_opt(name).await?;
        self.converge(&api, config, desired, existing).await
    }

    /// Applies `desired` unless `existing` already carries its hash.
    async fn converge(
        &mut self,
        api: &Api<DaemonSet>,
        config: &KipConfig,
        desired: DaemonSet,
        existing: Option<DaemonSet>,
    ) -> Result<DsOutcome, kube::Error> {
        let hash = daemonset::hash_of(&desired).unwrap_or_default().to_string();
        if existing.as_ref().and_then(daemonset::hash_of) == Some(hash.as_str()) {
            self.known = Known::Applied(hash);
            return Ok(DsOutcome::Unchanged);
        }
        let name = &config.daemonset_name;
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await?;
        self.known = Known::Applied(hash.clone());
        let outcome = if existing.is_some() { DsOutcome::Updated } else { DsOutcome::Created };
        tracing::info!(daemonset = %name, namespace = %config.namespace, hash = %hash, mode = config.mode.as_str(), outcome = ?outcome, "applied the fallback DaemonSet");
        Ok(outcome)
    }

    /// The periodic check: recreates a missing DaemonSet, re-applies an edited one, logs readiness.
    pub async fn check_health(&mut self, config: &KipConfig) -> Result<DsOutcome, kube::Error> {
        let Some(desired) = daemonset::fallback_daemonset(config, &self.options_for(&config.namespace)) else {
            return Ok(DsOutcome::Unchanged);
        };
        let api = Api::<DaemonSet>::namespaced(self.client.clone(), &config.namespace);
        let existing = api.get_opt(&config.daemonset_name).await?;
        match &existing {
            None => {
                tracing::warn!(daemonset = %config.daemonset_name, "the fallback DaemonSet is missing; recreating it");
                self.record(
                    EventType::Warning,
                    "DaemonSetMissing",
                    "Recreate",
                    format!("DaemonSet {} was missing and is recreated", config.daemonset_name),
                )
                .await;
            }
            Some(ds) => {
                let status = ds.status.clone().unwrap_or_default();
                tracing::info!(daemonset = %config.daemonset_name, ready = status.number_ready, desired = status.desired_number_scheduled, "fallback DaemonSet health");
            }
        }
        self.converge(&api, config, desired, existing).await
    }

    /// The nodes carrying `kip.eclipse.dev/agent=cri`: listed once, then kept up to date by
    /// [`Fallback::sync_labels`].
    pub async fn labelled_nodes(&mut self) -> Result<BTreeSet<String>, kube::Error> {
        if let Some(l) = &self.labelled {
            return Ok(l.clone());
        }
        let selector = format!("{AGENT_LABEL}={AGENT_LABEL_VALUE}");
        let list =
            Api::<Node>::all(self.client.clone()).list_metadata(&ListParams::default().labels(&selector)).await?;
        let labelled: BTreeSet<String> = list.items.into_iter().filter_map(|n| n.metadata.name).collect();
        self.labelled = Some(labelled.clone());
        Ok(labelled)
    }

    /// Labels exactly the `desired` nodes with `kip.eclipse.dev/agent=cri` (merge patches).
    pub async fn sync_labels(&mut self, desired: &BTreeSet<String>) -> Result<(), kube::Error> {
        let nodes = Api::<Node>::all(self.client.clone());
        let labelled = self.labelled_nodes().await?;
        let mut now_labelled = labelled.clone();
        for (node, add) in
            desired.difference(&labelled).map(|n| (n, true)).chain(labelled.difference(desired).map(|n| (n, false)))
        {
            let value = if add { serde_json::json!(AGENT_LABEL_VALUE) } else { serde_json::Value::Null };
            let patch = serde_json::json!({"metadata": {"labels": {AGENT_LABEL: value}}});
            match nodes.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::info!(node = %node, label = AGENT_LABEL, set = add, "node label updated");
                    if add {
                        now_labelled.insert(node.clone());
                    } else {
                        now_labelled.remove(node);
                    }
                }
                // A node that is gone (or a misnamed agent) has nothing to label.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    tracing::warn!(node = %node, "node not found; not labelling it");
                    now_labelled.remove(node);
                }
                Err(e) => {
                    self.labelled = Some(now_labelled);
                    return Err(e);
                }
            }
        }
        self.labelled = Some(now_labelled);
        Ok(())
    }

    /// Records an Event on the coordinator's Deployment; failures to record are only logged.
    pub async fn record(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let Some((recorder, reference)) = &self.events else { return };
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = recorder.publish(&ev, reference).await {
            tracing::warn!(error = %e, reason, "cannot record an Event");
        }
    }
}

/// Drives a [`Fallback`]: on every list or node change, and on the health interval.
pub async fn run(mut fb: Fallback, hub: Arc<Hub>, grace: Duration, shutdown: CancellationToken) {
    // Agents reconnect to a coordinator that just started: labels wait `grace` for them.
    let started = SystemTime::now();
    let mut lists = hub.subscribe();
    let mut nodes = hub.subscribe_nodes();
    // The first pass creates or checks the DaemonSet; the health check comes an interval later.
    let mut next_health: Option<tokio::time::Instant> = None;
    let mut retry = crate::backoff();
    loop {
        let published = hub.current();
        let config = &published.config;
        let mut failed = false;
        if let Err(e) = fb.sync_daemonset(config).await {
            failed = true;
            tracing::error!(error = %e, daemonset = %config.daemonset_name, "applying the fallback DaemonSet failed");
            fb.record(
                EventType::Warning,
                "DaemonSetApplyFailed",
                "Apply",
                format!("applying DaemonSet {}: {e}", config.daemonset_name),
            )
            .await;
        }
        // Labels matter in auto mode only; in the other modes the ones found (set by this
        // process or an earlier one, before the mode changed) are taken back.
        let labelled = if config.mode == Mode::Auto {
            match fb.labelled_nodes().await {
                Ok(labelled) => {
                    let desired = agent_nodes(&hub.liveness(), &labelled, started, SystemTime::now(), grace);
                    fb.sync_labels(&desired).await
                }
                Err(e) => Err(e),
            }
        } else {
            match fb.labelled_nodes().await {
                Ok(labelled) if !labelled.is_empty() => fb.sync_labels(&BTreeSet::new()).await,
                other => other.map(drop),
            }
        };
        if let Err(e) = labelled {
            failed = true;
            tracing::error!(error = %e, "updating agent node labels failed");
            fb.record(
                EventType::Warning,
                "NodeLabelFailed",
                "Label",
                format!("updating node label {AGENT_LABEL}: {e}"),
            )
            .await;
        }
        let interval = Duration::from_secs(u64::from(config.caching_interval_hours) * 3600);
        let now = tokio::time::Instant::now();
        match next_health {
            Some(due) if now >= due => {
                if let Err(e) = fb.check_health(config).await {
                    failed = true;
                    tracing::error!(error = %e, "fallback DaemonSet health check failed");
                }
                next_health = Some(now + interval);
            }
            Some(_) => {}
            None => next_health = Some(now + interval),
        }
        let next_health_due = next_health.unwrap_or(now + interval);
        let wait = if failed {
            retry.next().unwrap_or(Duration::from_secs(60))
        } else {
            retry = crate::backoff();
            // Wake up to drop labels of nodes whose grace period ran out.
            grace.min(Duration::from_secs(30))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = lists.changed() => {}
            _ = nodes.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::time::sleep_until(next_health_due) => {}
        }
    }
}

/// Connects to the Kubernetes API (in-cluster or kubeconfig), retrying with backoff, then runs
/// the controller. Never returns early while the coordinator runs: the list does not wait for it.
/// On shutdown it returns at once, dropping whatever API call is in flight.
pub async fn start(hub: Arc<Hub>, deployment: Option<(String, String)>, grace: Duration, shutdown: CancellationToken) {
    let work = async {
        let client = crate::retry_forever(
            "connecting to the Kubernetes API (the fallback DaemonSet and node labels wait for it; the image list is published regardless)",
            || async { Client::try_default().await },
        )
        .await;
        let fb = Fallback::discover(client, deployment).await;
        run(fb, hub, grace, shutdown.clone()).await;
    };
    until_shutdown(&shutdown, work).await;
}

/// Runs `work` until it ends or `shutdown` fires, whichever comes first: an API call in flight
/// is dropped (cancelled), so SIGTERM never waits for a request to time out.
pub async fn until_shutdown(shutdown: &CancellationToken, work: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = shutdown.cancelled() => tracing::info!("fallback controller stopped"),
        _ = work => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(node: &str, runtime: bool, connected: bool, since_secs_ago: u64, now: SystemTime) -> Liveness {
        Liveness {
            node: node.into(),
            reported: true,
            runtime_available: runtime,
            connected,
            since: now - Duration::from_secs(since_secs_ago),
        }
    }

    #[test]
    fn agent_label_follows_runtime_and_connection_with_grace() {
        let now = SystemTime::now();
        let grace = Duration::from_secs(300);
        let l = vec![
            live("connected-cri", true, true, 10_000, now),
            live("no-runtime", false, true, 0, now),
            live("gone-recently", true, false, 60, now),
            live("gone-long-ago", true, false, 301, now),
        ];
        let want = names(&["connected-cri", "gone-recently"]);
        assert_eq!(agent_nodes(&l, &BTreeSet::new(), now - grace * 10, now, grace), want);
    }

    fn names(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_restarted_coordinator_keeps_the_labels_it_finds_until_agents_had_time_to_report() {
        let started = SystemTime::now();
        let grace = Duration::from_secs(300);
        let labelled = names(&["a", "b", "c", "d"]);
        // a: back and reporting a runtime; b: connected, no report yet; c: not heard from;
        // d: its agent says the runtime is gone (evidence: the fallback is needed at once).
        let mut b = live("b", false, true, 0, started);
        b.reported = false;
        let l = vec![live("a", true, true, 0, started), b, live("d", false, true, 0, started)];
        let soon = started + Duration::from_secs(2);
        assert_eq!(agent_nodes(&l, &labelled, started, soon, grace), names(&["a", "b", "c"]), "nothing taken early");
        let later = started + grace + Duration::from_secs(1);
        let l_later = vec![live("a", true, true, 0, started), live("d", false, true, 0, started)];
        assert_eq!(
            agent_nodes(&l_later, &labelled, started, later, grace),
            names(&["a"]),
            "silent nodes lose it after the grace"
        );
        // A fresh install has no labels to keep: only evidence adds one.
        assert_eq!(agent_nodes(&[], &BTreeSet::new(), started, soon, grace), BTreeSet::new());
    }
}
