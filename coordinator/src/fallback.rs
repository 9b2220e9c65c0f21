//! Keeps the fallback sleep DaemonSet and the agent node labels in line with the configuration
//! and the agents' reports, through the Kubernetes API: server-side apply (field manager `kip`)
//! only when the spec hash changes, recreation at once when the DaemonSet watch shows it deleted
//! or edited, node labels on evidence only, the startup gate (removing the gate taint once a
//! node's images are cached), the cluster's side of a release (KIP_RELEASE), and Events on the
//! coordinator's Deployment. Everything it reads of the cluster comes from watches (`watches`).
//! Runs beside the list publisher: an unreachable API never stops the list from being published.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource as _};
use tokio_util::sync::CancellationToken;

use crate::config::{KipConfig, Mode};
use crate::daemonset::{self, Options, AGENT_LABEL, AGENT_LABEL_VALUE, MANAGED_BY, NO_AGENT_LABEL_VALUE};
use crate::gate::{self, GateTaint, Opened, Verdict};
use crate::hub::{ClusterCleanup, Hub, Liveness};
use crate::watches::{watch_nodes, Workloads};
pub use crate::watches::{NodeFacts, NodeView};

pub const FIELD_MANAGER: &str = "kip";

/// The desired `kip.eclipse.dev/agent` value of every known node in auto mode (`None`: no
/// label). Labels change only on evidence:
/// - `cri` where the agent reported a working runtime and is connected, or was within `grace`;
/// - `none` (the fallback runs there) at once where the agent reported no CRI socket or no CRI
///   runtime on it, after `grace` where it reported its runtime not answering, and where an
///   agent went silent for longer than `grace`;
/// - a node not heard from keeps what it has until `grace` after this process started (agents
///   reconnect to a restarted coordinator) and after the node was created (its agent starts
///   with it); only then does it get `none`. So a fresh install schedules no fallback pod on a
///   node whose agent has not had the chance to report.
pub fn desired_labels(
    liveness: &[Liveness],
    nodes: &[NodeFacts],
    started: SystemTime,
    now: SystemTime,
    grace: Duration,
) -> BTreeMap<String, Option<&'static str>> {
    let within = |since: SystemTime| now.duration_since(since).unwrap_or_default() < grace;
    nodes
        .iter()
        .map(|n| {
            let heard = liveness.iter().find(|l| l.node == n.name && l.reported);
            let want = match heard {
                Some(l) if l.runtime_available && (l.connected || within(l.since)) => Some(AGENT_LABEL_VALUE),
                // A runtime that is there but not answering (a restart, one slow call) keeps the
                // node's agent label for the grace: the fallback would pull outside the budget
                // and pin nothing, only to be deleted seconds later.
                Some(l) if l.not_answering_since.is_some_and(within) && (l.connected || within(l.since)) => {
                    Some(AGENT_LABEL_VALUE)
                }
                Some(_) => Some(NO_AGENT_LABEL_VALUE),
                None if within(n.created.map_or(started, |c| c.max(started))) => match n.label.as_deref() {
                    Some(AGENT_LABEL_VALUE) => Some(AGENT_LABEL_VALUE),
                    Some(NO_AGENT_LABEL_VALUE) => Some(NO_AGENT_LABEL_VALUE),
                    _ => None,
                },
                None => Some(NO_AGENT_LABEL_VALUE),
            };
            (n.name.clone(), want)
        })
        .collect()
}

/// Every node without the label: what is wanted outside auto mode and after a release.
fn no_labels(nodes: &[NodeFacts]) -> BTreeMap<String, Option<&'static str>> {
    nodes.iter().map(|n| (n.name.clone(), None)).collect()
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
    /// Label values this process set that the node watch may not show yet: no second patch.
    patched: BTreeMap<String, Option<String>>,
    /// Nodes whose gate this process removed, until the watch shows it gone (or a while has
    /// passed: someone may have put it back): no second patch meanwhile.
    gates_opened: BTreeMap<String, tokio::time::Instant>,
    /// The watch has shown the DaemonSet as kip last applied it: only from then on does its
    /// absence mean "deleted" (before, the watch has not caught up with the apply yet).
    applied_shown: bool,
    /// When this process started: agents reconnect to a restarted coordinator, labels wait.
    started: SystemTime,
}

impl Fallback {
    pub fn new(client: Client, options: Options, deployment: Option<ObjectReference>) -> Self {
        let events = deployment.map(|r| {
            let reporter = Reporter { controller: "kip-coordinator".into(), instance: std::env::var("POD_NAME").ok() };
            (Recorder::new(client.clone(), reporter), r)
        });
        let owner_namespace = events.as_ref().and_then(|(_, r)| r.namespace.clone());
        Self {
            client,
            options,
            owner_namespace,
            events,
            known: Known::Unknown,
            patched: BTreeMap::new(),
            gates_opened: BTreeMap::new(),
            applied_shown: false,
            started: SystemTime::now(),
        }
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
    pub async fn discover(client: Client, deployment: Option<(String, String)>, gate: Option<&GateTaint>) -> Self {
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
        Self::new(client, Options { openshift, owner, gate_toleration: gate.map(GateTaint::toleration) }, reference)
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
            self.applied_shown = false;
            return Ok(DsOutcome::Unchanged);
        }
        let name = &config.daemonset_name;
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await?;
        self.known = Known::Applied(hash.clone());
        self.applied_shown = false;
        let outcome = if existing.is_some() { DsOutcome::Updated } else { DsOutcome::Created };
        tracing::info!(daemonset = %name, namespace = %config.namespace, hash = %hash, mode = config.mode.as_str(), outcome = ?outcome, "applied the fallback DaemonSet");
        Ok(outcome)
    }

    /// What the DaemonSet watch shows (`None`: absent). A DaemonSet deleted or edited behind
    /// kip's back is applied again at the next sync (an Event says it was missing).
    pub async fn observe_daemonset(&mut self, config: &KipConfig, shown: Option<&DaemonSet>) {
        let Known::Applied(hash) = &self.known else { return };
        match shown {
            Some(ds) if daemonset::hash_of(ds) == Some(hash.as_str()) => self.applied_shown = true,
            // The watch still shows what was there before kip's apply.
            _ if !self.applied_shown => {}
            None => {
                tracing::warn!(daemonset = %config.daemonset_name, "the fallback DaemonSet was deleted; recreating it");
                self.known = Known::Unknown;
                self.record(
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

    /// Sets `kip.eclipse.dev/agent` to the `desired` value on each node (merge patches; `None`
    /// removes it) where `nodes` shows another. Returns how many nodes were patched.
    pub async fn sync_labels(
        &mut self,
        desired: &BTreeMap<String, Option<&str>>,
        nodes: &[NodeFacts],
    ) -> Result<usize, LabelsFailed> {
        let shown: BTreeMap<&str, Option<&str>> = nodes.iter().map(|n| (n.name.as_str(), n.label.as_deref())).collect();
        // Once the watch shows what was patched (or the node is gone), it is the truth again.
        self.patched.retain(|n, v| shown.get(n.as_str()).is_some_and(|s| *s != v.as_deref()));
        let api = Api::<Node>::all(self.client.clone());
        let (mut patched, mut failed) = (0, Vec::new());
        for (node, want) in desired {
            let Some(shown) = shown.get(node.as_str()) else { continue };
            let have = self.patched.get(node).map_or(*shown, |v| v.as_deref());
            if have == *want {
                continue;
            }
            let value = want.map_or(serde_json::Value::Null, |v| serde_json::json!(v));
            let patch = serde_json::json!({"metadata": {"labels": {AGENT_LABEL: value}}});
            match api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::info!(node = %node, label = AGENT_LABEL, value = want.unwrap_or("(removed)"), "node label updated");
                    self.patched.insert(node.clone(), want.map(str::to_string));
                    patched += 1;
                }
                // A node deleted since the watch saw it has nothing to label.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    tracing::warn!(node = %node, "node not found; not labelling it")
                }
                // One node refused (a webhook, a policy) must not keep the others unlabelled:
                // every node is tried, the failures reported together.
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "labelling the node failed");
                    failed.push((node.clone(), e));
                }
            }
        }
        if failed.is_empty() {
            Ok(patched)
        } else {
            Err(LabelsFailed { patched, failed })
        }
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

/// Label patches that failed in one pass (the others were sent all the same).
#[derive(Debug)]
pub struct LabelsFailed {
    pub patched: usize,
    pub failed: Vec<(String, kube::Error)>,
}

impl std::fmt::Display for LabelsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (node, first) = match self.failed.first() {
            Some((node, e)) => (node.as_str(), e.to_string()),
            None => ("", String::new()),
        };
        write!(f, "{} node(s) could not be labelled ({} were), first {node}: {first}", self.failed.len(), self.patched)
    }
}

/// The controller's settings that do not come from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long labels wait for agents (see [`desired_labels`]).
    pub grace: Duration,
    /// The startup gate's taint (`None`: no gate).
    pub gate: Option<GateTaint>,
    /// After this long since a node's creation its gate opens unverified.
    pub gate_timeout: Duration,
    /// Beaten at every pass, for `/healthz`.
    pub heartbeat: kip::process::Heartbeat,
}

impl Settings {
    pub fn new(grace: Duration) -> Self {
        Self { grace, gate: None, gate_timeout: Duration::from_secs(900), heartbeat: Default::default() }
    }
}

/// The longest the controller may stay away between passes: its longest wait (the retry
/// backoff's 60 s) plus one pass's API calls (a label per node, each within kube's timeouts).
const PASS_SILENCE: Duration = Duration::from_secs(15 * 60);

/// Waits for a change of an optional view (forever without one).
async fn changed(rx: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    let Some(rx) = rx else { return std::future::pending().await };
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Drives a [`Fallback`] on every list, report, node, DaemonSet or fallback pod change, and when
/// a grace period or a gate timeout runs out. Returns the controller when the configuration moved
/// the DaemonSet to another namespace or name (`workloads` watch the old one); `None` at shutdown.
pub async fn run(
    mut fb: Fallback,
    hub: Arc<Hub>,
    nodes: NodeView,
    workloads: Option<Workloads>,
    settings: Settings,
    shutdown: CancellationToken,
) -> Option<Fallback> {
    hub.attach_api();
    let mut lists = hub.subscribe();
    let mut reports = hub.subscribe_nodes();
    let mut node_changes = nodes.changed.clone();
    let mut ds_changes = workloads.as_ref().map(|w| w.daemonset.changed.clone());
    let mut pod_changes = workloads.as_ref().map(|w| w.pods.changed.clone());
    let mut retry = crate::backoff();
    loop {
        settings.heartbeat.beat(PASS_SILENCE);
        let published = hub.current();
        let config = &published.config;
        let releasing = config.release != kip::v1::Release::None;
        if let Some(w) = &workloads {
            if (w.namespace.as_str(), w.name.as_str()) != (config.namespace.as_str(), config.daemonset_name.as_str()) {
                return Some(fb);
            }
            if let Some(shown) = w.shown_daemonset() {
                fb.observe_daemonset(config, shown.as_deref()).await;
            }
        }
        // The nodes as the watch shows them, once per pass; nothing is decided before the first list.
        let facts = nodes.listed().then(|| nodes.facts());
        if let Some(facts) = &facts {
            hub.forget_deleted_nodes(&facts.iter().map(|n| n.name.clone()).collect());
        }
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
        let mut gate_due: Option<Duration> = None;
        if let (Some(gate), Some(facts)) = (&settings.gate, &facts) {
            let (ok, due) =
                open_gates(&mut fb, &hub, config, facts, workloads.as_ref(), gate, settings.gate_timeout).await;
            failed |= !ok;
            gate_due = due;
        }
        match &facts {
            Some(facts) if releasing => failed |= !release_labels(&mut fb, &hub, facts, failed).await,
            Some(facts) => {
                // Labels matter in auto mode only; in the other modes the ones found (set by this
                // process or an earlier one, before the mode changed) are taken back.
                let desired = if config.mode == Mode::Auto {
                    desired_labels(&hub.liveness(), facts, fb.started, SystemTime::now(), settings.grace)
                } else {
                    no_labels(facts)
                };
                if let Err(e) = fb.sync_labels(&desired, facts).await {
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
            }
            None => {}
        }
        let mut wait = if failed {
            retry.next().unwrap_or(Duration::from_secs(60))
        } else {
            retry = crate::backoff();
            // Wake up to act on grace periods that ran out.
            settings.grace.min(Duration::from_secs(30))
        };
        if let Some(due) = gate_due {
            // A held gate opens when its timeout passes, not up to 30 s later.
            wait = wait.min(due + Duration::from_millis(10));
        }
        if let Some(deadline) = hub.release_deadline() {
            // The labels go when the release timeout passes, not up to 30 s later.
            if let Ok(left) = deadline.duration_since(SystemTime::now()) {
                wait = wait.min(left + Duration::from_millis(10));
            }
        }
        // After a failed pass only the backoff (or a new list) starts the next one: with a
        // webhook refusing the label, a storm of agent reports or node updates must not become a
        // storm of PATCHes and Warning Events. What changed meanwhile is seen at the next pass.
        let settled = !failed;
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = lists.changed() => {}
            _ = reports.changed(), if settled => {}
            Ok(()) = node_changes.changed(), if settled => {}
            _ = changed(&mut ds_changes), if settled => {}
            _ = changed(&mut pod_changes), if settled => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The startup gate: every node with the gate taint is decided about ([`gate::decide`]) against
/// `config`, the list of this pass; where it may go into service the taint is removed. Returns
/// false when a request failed, and how long until the first held node's timeout.
async fn open_gates(
    fb: &mut Fallback,
    hub: &Hub,
    config: &KipConfig,
    facts: &[NodeFacts],
    workloads: Option<&Workloads>,
    gate: &GateTaint,
    timeout: Duration,
) -> (bool, Option<Duration>) {
    let releasing = config.release != kip::v1::Release::None;
    let images: Vec<&str> = config.images.entries().iter().map(|e| e.image.as_str()).collect();
    let now = SystemTime::now();
    // Once the watch shows a gate gone (or the node), it is the truth again; a gate still shown
    // a while after its removal was put back (or the removal was lost): it is decided again.
    fb.gates_opened.retain(|n, at| {
        at.elapsed() < Duration::from_secs(30) && facts.iter().any(|f| &f.name == n && gate.find(&f.taints).is_some())
    });
    let mut status = hub.gate_status().unwrap_or_default();
    status.taint = gate.to_string();
    status.timeout = timeout;
    status.held.clear();
    let (mut ok, mut due) = (true, None::<Duration>);
    let gated: Vec<&NodeFacts> =
        facts.iter().filter(|n| gate.find(&n.taints).is_some() && !fb.gates_opened.contains_key(&n.name)).collect();
    // Every report is read only when a node is gated (most passes have none).
    let reports = if gated.is_empty() { BTreeMap::new() } else { hub.nodes() };
    for node in gated {
        let waited = gate::waited(node.created, now);
        let fallback_ready = workloads.is_some_and(|w| w.fallback_ready(&node.name, &images));
        let entry = reports.get(&node.name).map(|e| (&e.report, e.received_at));
        let report = gate::current_report(entry, node.created, hub.is_connected(&node.name));
        let why = match gate::decide(&config.images, report.clone(), fallback_ready, waited, timeout, releasing) {
            Verdict::Hold(why) => {
                let left = timeout.saturating_sub(waited);
                due = Some(due.map_or(left, |d| d.min(left)));
                status.held.insert(node.name.clone(), why);
                continue;
            }
            Verdict::Open(why) => why,
        };
        match gate::remove_gate(&fb.client, &node.name, gate, &node.taints).await {
            Ok(true) => {
                fb.gates_opened.insert(node.name.clone(), tokio::time::Instant::now());
                hub.metrics.gate_opened(why, waited);
                status.record_opened(&node.name, why, waited);
                let after = humantime::format_duration(Duration::from_secs(waited.as_secs()));
                if why == Opened::Timeout {
                    let held = gate::images_ready(&config.images, report).err().unwrap_or_default();
                    tracing::warn!(node = %node.name, taint = %gate, after = %after, held = %held, "gate timeout: the node goes into service unverified");
                    fb.record(
                        EventType::Warning,
                        "GateTimeout",
                        "Ungate",
                        format!("node {} went into service unverified after {after} ({held})", node.name),
                    )
                    .await;
                } else {
                    tracing::info!(node = %node.name, taint = %gate, reason = why.as_str(), after = %after, "gate opened: the node may run workloads");
                    fb.record(
                        EventType::Normal,
                        "GateOpened",
                        "Ungate",
                        format!("node {} may run workloads ({}) after {after}", node.name, why.as_str()),
                    )
                    .await;
                }
            }
            Ok(false) => {}
            Err(e) => {
                ok = false;
                tracing::error!(node = %node.name, error = %e, "removing the gate taint failed");
                status.held.insert(node.name.clone(), format!("removing the taint failed: {e}"));
            }
        }
    }
    hub.metrics.gate_nodes_held.set(status.held.len() as i64);
    hub.set_gate_status(status);
    (ok, due)
}

/// The cluster's side of a release, after the DaemonSet went: once every agent confirmed (or
/// the release timeout passed) every kip label goes. Returns false when a request failed.
async fn release_labels(fb: &mut Fallback, hub: &Hub, facts: &[NodeFacts], ds_failed: bool) -> bool {
    // Nodes labelled for an agent by an earlier process must confirm too.
    hub.expect_release_from(
        facts.iter().filter(|n| n.label.as_deref() == Some(AGENT_LABEL_VALUE)).map(|n| n.name.clone()),
    );
    let Some((progress, settled, cluster)) = hub.release_state(SystemTime::now()) else { return true };
    if matches!(cluster, ClusterCleanup::Done { .. }) || !settled {
        return true;
    }
    match fb.sync_labels(&no_labels(facts), facts).await {
        Ok(removed) if !ds_failed => {
            hub.set_cluster_cleanup(ClusterCleanup::Done { labels_removed: removed });
            if progress.pending.is_empty() {
                tracing::info!(
                    nodes = progress.released.len(),
                    labels_removed = removed,
                    "release complete: no pin, label or DaemonSet of kip's is left"
                );
                fb.record(
                    EventType::Normal,
                    "Released",
                    "Release",
                    format!("{} nodes let go of kip's pins; {removed} node labels removed", progress.released.len()),
                )
                .await;
            } else {
                let pending: Vec<String> = progress.pending.iter().map(|(n, why)| format!("{n} ({why})")).collect();
                tracing::warn!(pending = ?pending, labels_removed = removed, "release timed out: these nodes may keep kip's pins and state file");
                fb.record(
                    EventType::Warning,
                    "ReleaseIncomplete",
                    "Release",
                    format!(
                        "nodes that did not confirm (kip's pins and state file may be left there): {}",
                        pending.join(", ")
                    ),
                )
                .await;
            }
            true
        }
        Ok(_) => {
            hub.set_cluster_cleanup(ClusterCleanup::Failed("deleting the fallback DaemonSet failed".into()));
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "removing node labels for the release failed");
            hub.set_cluster_cleanup(ClusterCleanup::Failed(format!("removing node labels: {e}")));
            false
        }
    }
}

/// Runs the controller with `client`: finds out what the DaemonSet depends on, watches the
/// nodes, the DaemonSet and its pods, then keeps everything in line until shutdown.
pub async fn start(
    client: Client,
    hub: Arc<Hub>,
    deployment: Option<(String, String)>,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let mut fb = Fallback::discover(client.clone(), deployment, settings.gate.as_ref()).await;
    let (nodes, node_task) = watch_nodes(client.clone());
    let controller = async {
        loop {
            let config = hub.current();
            let (workloads, workload_task) =
                Workloads::watch(client.clone(), &config.config.namespace, &config.config.daemonset_name);
            let run = run(fb, hub.clone(), nodes.clone(), Some(workloads), settings.clone(), shutdown.clone());
            // The watches of the old DaemonSet end with its run.
            let stopped = tokio::select! {
                f = run => f,
                _ = workload_task => {
                    tracing::error!("the DaemonSet and pod watches ended; the fallback controller stops");
                    None
                }
            };
            match stopped {
                Some(f) => fb = f,
                None => return,
            }
        }
    };
    tokio::join!(node_task, controller);
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
            not_answering_since: None,
            connected,
            since: now - Duration::from_secs(since_secs_ago),
        }
    }

    fn node(name: &str, label: Option<&str>, created: SystemTime) -> NodeFacts {
        NodeFacts { name: name.into(), created: Some(created), label: label.map(str::to_string), taints: vec![] }
    }

    fn want(pairs: &[(&str, Option<&'static str>)]) -> BTreeMap<String, Option<&'static str>> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    const CRI: Option<&str> = Some("cri");
    const NONE: Option<&str> = Some("none");

    #[test]
    fn the_label_follows_runtime_and_connection_with_grace() {
        let now = SystemTime::now();
        let grace = Duration::from_secs(300);
        let long_ago = now - grace * 10;
        let l = vec![
            live("connected-cri", true, true, 10_000, now),
            live("no-runtime", false, true, 0, now),
            live("gone-recently", true, false, 60, now),
            live("gone-long-ago", true, false, 301, now),
        ];
        let nodes: Vec<NodeFacts> = ["connected-cri", "no-runtime", "gone-recently", "gone-long-ago", "never-heard"]
            .iter()
            .map(|n| node(n, Some("cri"), long_ago))
            .collect();
        assert_eq!(
            desired_labels(&l, &nodes, long_ago, now, grace),
            want(&[
                ("connected-cri", CRI),
                ("gone-long-ago", NONE),
                ("gone-recently", CRI),
                ("never-heard", NONE),
                ("no-runtime", NONE),
            ])
        );
        // An agent reporting about a node the watch does not show (deleted, misnamed): nothing.
        let l = vec![live("ghost", true, true, 0, now)];
        assert!(desired_labels(&l, &[], long_ago, now, grace).is_empty());
    }

    /// Issue 20 item 6: one runtime call past its deadline used to flip the node to the
    /// fallback at once; a runtime that is there but not answering now gets the label grace.
    #[test]
    fn a_runtime_not_answering_keeps_the_agent_label_for_the_grace_and_a_missing_one_does_not() {
        let now = SystemTime::now();
        let grace = Duration::from_secs(300);
        let long_ago = now - grace * 10;
        let slow = |name: &str, secs_ago: u64| Liveness {
            not_answering_since: Some(now - Duration::from_secs(secs_ago)),
            ..live(name, false, true, 10_000, now)
        };
        let l = vec![slow("slow-just-now", 5), slow("slow-for-long", 301), live("no-socket", false, true, 10_000, now)];
        let nodes: Vec<NodeFacts> =
            ["slow-just-now", "slow-for-long", "no-socket"].iter().map(|n| node(n, CRI, long_ago)).collect();
        assert_eq!(
            desired_labels(&l, &nodes, long_ago, now, grace),
            want(&[("no-socket", NONE), ("slow-for-long", NONE), ("slow-just-now", CRI)])
        );
    }

    #[test]
    fn a_restarted_coordinator_keeps_the_labels_it_finds_until_agents_had_time_to_report() {
        let started = SystemTime::now();
        let grace = Duration::from_secs(300);
        let old = started - grace * 10;
        let nodes = vec![
            node("a", CRI, old),
            node("b", CRI, old),
            node("c", CRI, old),
            node("d", CRI, old),
            node("e", NONE, old),
        ];
        // a: back and reporting a runtime; b: connected, no report yet; c: not heard from;
        // d: its agent says the runtime is gone (evidence: the fallback is needed at once);
        // e: a fallback node whose agent has not reported yet keeps its fallback.
        let mut b = live("b", false, true, 0, started);
        b.reported = false;
        let l = vec![live("a", true, true, 0, started), b, live("d", false, true, 0, started)];
        let soon = started + Duration::from_secs(2);
        assert_eq!(
            desired_labels(&l, &nodes, started, soon, grace),
            want(&[("a", CRI), ("b", CRI), ("c", CRI), ("d", NONE), ("e", NONE)]),
            "nothing taken early"
        );
        let later = started + grace + Duration::from_secs(1);
        let l_later = vec![live("a", true, true, 0, started), live("d", false, true, 0, started)];
        assert_eq!(
            desired_labels(&l_later, &nodes, started, later, grace),
            want(&[("a", CRI), ("b", NONE), ("c", NONE), ("d", NONE), ("e", NONE)]),
            "silent nodes get the fallback after the grace"
        );
    }

    #[test]
    fn a_fresh_install_and_a_new_node_wait_for_their_agent_before_the_fallback() {
        let started = SystemTime::now();
        let grace = Duration::from_secs(300);
        let old = started - grace * 10;
        let nodes = vec![node("a", None, old), node("b", None, old), node("c", None, old)];
        // No labels anywhere; b's agent reports no runtime: only b gets the fallback at once.
        let l = vec![live("a", true, true, 0, started), live("b", false, true, 0, started)];
        let soon = started + Duration::from_secs(5);
        assert_eq!(desired_labels(&l, &nodes, started, soon, grace), want(&[("a", CRI), ("b", NONE), ("c", None)]));
        // Long after the start, a node that joins now waits its own grace.
        let much_later = started + grace * 3;
        let joined = node("new", None, much_later - Duration::from_secs(10));
        assert_eq!(
            desired_labels(&[], std::slice::from_ref(&joined), started, much_later, grace),
            want(&[("new", None)])
        );
        let after_its_grace = much_later + grace;
        assert_eq!(desired_labels(&[], &[joined], started, after_its_grace, grace), want(&[("new", NONE)]));
    }
}
