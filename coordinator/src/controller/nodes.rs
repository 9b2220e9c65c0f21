//! Nodes, one at a time, on kube-runtime's `Controller`: each node's `kip.eclipse.dev/agent`
//! label (on evidence, see [`desired_label`]) and its startup gate ([`gate::decide`]).
//!
//! A reconcile reads one node from the node watch's store and that node's agent from the shared
//! state, decides with pure functions, and writes only what differs: at most one label patch and
//! one taint removal. What starts it: the node changed (the watch), its agent reported, connected
//! or went away (the state's feed of node names), its fallback pod changed, a new list (every
//! node), a grace period or gate timeout running out (the requeue it asked for). A node whose
//! write fails backs off alone (1 s doubling to 60 s, jittered), and nothing that happens
//! meanwhile — a storm of reports included — brings its next write forward.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{BroadcastStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;

use super::labels::Labels;
use super::{sooner, Cluster, Settings};
use crate::config::Mode;
use crate::gate::{self, GateTaint, Opened, Verdict};
use crate::manifest::{AGENT_LABEL_VALUE, NO_AGENT_LABEL_VALUE};
use crate::state::{Liveness, State};
use crate::watches::{NodeFacts, NodeView, Touch, Workloads};

/// The label a node should carry in auto mode (`want`, `None`: no label), and when that could
/// change with time alone (`recheck`: a grace period running out). Labels change only on evidence:
/// - `cri` where the agent reported a working runtime and is connected, or was within `grace`;
/// - `none` (the fallback runs there) at once where the agent reported no CRI socket or no CRI
///   runtime on it, after `grace` where it reported its runtime not answering, and where an
///   agent went silent for longer than `grace`;
/// - a node not heard from keeps what it has until `grace` after this process started (agents
///   reconnect to a restarted coordinator) and after the node was created (its agent starts
///   with it); only then does it get `none`. So a fresh install schedules no fallback pod on a
///   node whose agent has not had the chance to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelDecision {
    pub want: Option<&'static str>,
    pub recheck: Option<Duration>,
}

/// Pure: see [`LabelDecision`].
pub fn desired_label(
    live: &Liveness,
    node: &NodeFacts,
    started: SystemTime,
    now: SystemTime,
    grace: Duration,
) -> LabelDecision {
    // How long until `grace` has passed since `since` (`None`: it has).
    let left =
        |since: SystemTime| grace.checked_sub(now.duration_since(since).unwrap_or_default()).filter(|l| !l.is_zero());
    let decision = |want, recheck| LabelDecision { want, recheck };
    // A disconnected agent's runtime counts for the grace after it went away.
    let connection_left = if live.connected { None } else { left(live.since) };
    let still_there = live.connected || connection_left.is_some();
    if live.reported {
        if live.runtime_available && still_there {
            return decision(Some(AGENT_LABEL_VALUE), connection_left);
        }
        // A runtime that is there but not answering (a restart, one slow call) keeps the node's
        // agent label for the grace: the fallback would pull outside the budget and pin nothing,
        // only to be deleted seconds later.
        if let Some(answering_left) = live.not_answering_since.and_then(left) {
            if still_there {
                return decision(Some(AGENT_LABEL_VALUE), sooner(Some(answering_left), connection_left));
            }
        }
        return decision(Some(NO_AGENT_LABEL_VALUE), None);
    }
    let waiting_since = node.created.map_or(started, |c| c.max(started));
    match left(waiting_since) {
        Some(l) => {
            let keep = match node.label.as_deref() {
                Some(AGENT_LABEL_VALUE) => Some(AGENT_LABEL_VALUE),
                Some(NO_AGENT_LABEL_VALUE) => Some(NO_AGENT_LABEL_VALUE),
                _ => None,
            };
            decision(keep, Some(l))
        }
        _ => decision(Some(NO_AGENT_LABEL_VALUE), None),
    }
}

/// Why a node's reconcile failed (its label or gate write); the node backs off alone.
#[derive(Debug, thiserror::Error)]
#[error("node {node}: {what}: {source}")]
pub struct NodeError {
    node: String,
    what: &'static str,
    source: kube::Error,
}

/// One node's backoff after a failed write: when it may write again.
struct Failing {
    delays: backon::ExponentialBackoff,
    until: Instant,
}

/// What every node reconcile shares.
pub struct NodeContext {
    cluster: Arc<Cluster>,
    state: Arc<State>,
    labels: Arc<Labels>,
    settings: Settings,
    workloads: Option<Workloads>,
    failing: Mutex<HashMap<String, Failing>>,
    /// Nodes whose gate this process removed, until the watch shows it gone (or a while has
    /// passed: someone may have put it back): no second patch meanwhile.
    gates_opened: Mutex<HashMap<String, Instant>>,
}

/// How long a removed gate may still show before it is decided again (it was put back, or the
/// removal was lost).
const GATE_SHOWN_WITHIN: Duration = Duration::from_secs(30);

impl NodeContext {
    /// Time left of `node`'s backoff (`None`: it may write now).
    fn backing_off(&self, node: &str) -> Option<Duration> {
        let failing = self.failing.lock().ok()?;
        let left = failing.get(node)?.until.checked_duration_since(Instant::now())?;
        (!left.is_zero()).then_some(left)
    }

    /// `node`'s write failed: the next one waits for its backoff.
    fn failed(&self, node: &str) -> Duration {
        let Ok(mut failing) = self.failing.lock() else { return Duration::from_secs(60) };
        let entry = failing
            .entry(node.to_string())
            .or_insert_with(|| Failing { delays: crate::backoff(), until: Instant::now() });
        let delay = entry.delays.next().unwrap_or(Duration::from_secs(60));
        entry.until = Instant::now() + delay;
        delay
    }

    fn succeeded(&self, node: &str) {
        if let Ok(mut failing) = self.failing.lock() {
            failing.remove(node);
        }
    }

    /// `node` left the gate (or the cluster): `/status` stops showing it held.
    fn not_held(&self, node: &str) {
        self.state.hold_gate(node, None);
        if let Ok(mut opened) = self.gates_opened.lock() {
            opened.remove(node);
        }
    }
}

/// One node: its gate, then its label (both tried, the first failure returned). Returns when to
/// look again by time alone.
async fn reconcile(node: Arc<Node>, ctx: Arc<NodeContext>) -> Result<Action, NodeError> {
    let Some(facts) = NodeFacts::of(&node) else { return Ok(Action::await_change()) };
    if let Some(left) = ctx.backing_off(&facts.name) {
        return Ok(Action::requeue(left));
    }
    let published = ctx.state.current();
    let config = &published.config;
    let releasing = config.release != kip::v1::Release::None;
    let failure = |what, source| NodeError { node: facts.name.clone(), what, source };
    let (mut recheck, mut failed) = (None, None);
    if let Some(gate) = &ctx.settings.gate {
        match open_gate(&ctx, &facts, gate).await {
            Ok(due) => recheck = sooner(recheck, due),
            Err(e) => failed = Some(failure("removing the gate taint", e)),
        }
    }
    // During a release the labels are the release controller's; outside auto mode the ones found
    // (set by this process or an earlier one, before the mode changed) are taken back.
    if !releasing {
        let decision = if config.mode == Mode::Auto {
            let live = ctx.state.liveness_of(&facts.name);
            desired_label(&live, &facts, ctx.cluster.started, SystemTime::now(), ctx.settings.grace)
        } else {
            LabelDecision { want: None, recheck: None }
        };
        if let Err(e) = ctx.labels.set(&facts, decision.want).await {
            failed.get_or_insert(failure("updating node label kip.eclipse.dev/agent", e));
        }
        // A little after the grace runs out, so the decision has changed by then.
        recheck = sooner(recheck, decision.recheck.map(|d| d + Duration::from_millis(10)));
    }
    if let Some(e) = failed {
        return Err(e);
    }
    ctx.succeeded(&facts.name);
    Ok(recheck.map_or_else(Action::await_change, Action::requeue))
}

/// A failed reconcile: the node waits its own backoff (see [`reconcile`]'s first check), and one
/// Warning Event says why (kube's `Recorder` turns repeats into a series).
fn error_policy(_node: Arc<Node>, error: &NodeError, ctx: Arc<NodeContext>) -> Action {
    let delay = ctx.failed(&error.node);
    tracing::error!(error = %error, retry_in_ms = delay.as_millis() as u64, "reconciling the node failed");
    let (cluster, note) = (ctx.cluster.clone(), error.to_string());
    let reason = if error.what.starts_with("removing") { "GateOpenFailed" } else { "NodeLabelFailed" };
    tokio::spawn(async move {
        cluster.events.record(EventType::Warning, reason, "Label", note).await;
    });
    Action::requeue(delay)
}

/// The startup gate of one node: when it carries the gate taint it is decided about
/// ([`gate::decide`]) against the current list; where it may go into service the taint is
/// removed. Returns how long until its timeout while it is held.
async fn open_gate(ctx: &NodeContext, node: &NodeFacts, gate: &GateTaint) -> Result<Option<Duration>, kube::Error> {
    if gate.find(&node.taints).is_none() {
        ctx.not_held(&node.name);
        return Ok(None);
    }
    let opened_at = ctx.gates_opened.lock().ok().and_then(|o| o.get(&node.name).copied());
    if let Some(left) = opened_at.and_then(|at| GATE_SHOWN_WITHIN.checked_sub(at.elapsed())) {
        // Removed a moment ago; the watch has not shown it yet.
        return Ok(Some(left));
    }
    let published = ctx.state.current();
    let config = &published.config;
    let timeout = ctx.settings.gate_timeout;
    let releasing = config.release != kip::v1::Release::None;
    let waited = gate::waited(node.created, SystemTime::now());
    // The node's own list: with image sets, the default set's and those of every set selecting it.
    let own = ctx.state.images_for(&node.name);
    let images = own.clone().unwrap_or_else(|| config.images.clone());
    let fallback_ready = ctx.workloads.as_ref().is_some_and(|w| {
        let images: Vec<&str> = images.entries().iter().map(|e| e.image.as_str()).collect();
        w.fallback_ready(&node.name, &images)
    });
    let entry = ctx.state.node(&node.name);
    let report = match own {
        Some(_) => gate::current_report(
            entry.as_ref().map(|e| (&e.report, e.received_at)),
            node.created,
            ctx.state.is_connected(&node.name),
        ),
        None => Err("its image sets are not known yet".to_string()),
    };
    let why = match gate::decide(&images, report.clone(), fallback_ready, waited, timeout, releasing) {
        Verdict::Hold(why) => {
            ctx.state.hold_gate(&node.name, Some(why));
            return Ok(Some(timeout.saturating_sub(waited)));
        }
        Verdict::Open(why) => why,
    };
    match gate::remove_gate(&ctx.cluster.client, &node.name, gate, &node.taints).await {
        Ok(true) => {}
        Ok(false) => return Ok(None),
        Err(e) => {
            ctx.state.hold_gate(&node.name, Some(format!("removing the taint failed: {e}")));
            return Err(e);
        }
    }
    if let Ok(mut opened) = ctx.gates_opened.lock() {
        opened.insert(node.name.clone(), Instant::now());
    }
    ctx.state.metrics.gate_opened(why, waited);
    ctx.state.hold_gate(&node.name, None);
    ctx.state.update_gate_status(|s| s.record_opened(&node.name, why, waited));
    let after = humantime::format_duration(Duration::from_secs(waited.as_secs()));
    let events = &ctx.cluster.events;
    if why == Opened::Timeout {
        let held = gate::images_ready(&images, report).err().unwrap_or_default();
        tracing::warn!(node = %node.name, taint = %gate, after = %after, held = %held, "gate timeout: the node goes into service unverified");
        let note = format!("node {} went into service unverified after {after} ({held})", node.name);
        events.record(EventType::Warning, "GateTimeout", "Ungate", note).await;
    } else {
        tracing::info!(node = %node.name, taint = %gate, reason = why.as_str(), after = %after, "gate opened: the node may run workloads");
        let note = format!("node {} may run workloads ({}) after {after}", node.name, why.as_str());
        events.record(EventType::Normal, "GateOpened", "Ungate", note).await;
    }
    Ok(None)
}

/// What starts node reconciles, merged from every source: a node's own changes (the watch), its
/// agent (the state's feed), its fallback pod, and "every node" on a new list or a relist. A
/// node the watch no longer has is forgotten by the state here (unless its agent is connected).
async fn route_triggers(
    state: Arc<State>,
    nodes: NodeView,
    workloads: Option<Workloads>,
    one: mpsc::UnboundedSender<ObjectRef<Node>>,
    all: mpsc::UnboundedSender<()>,
    shutdown: CancellationToken,
) {
    let mut agents = BroadcastStream::new(state.subscribe_touched());
    let mut node_changes = BroadcastStream::new(nodes.touched.subscribe());
    let mut pods = match &workloads {
        Some(w) => BroadcastStream::new(w.pods.touched.subscribe()).boxed(),
        None => futures_util::stream::pending().boxed(),
    };
    let mut lists = state.subscribe();
    // Whatever happened before the feeds were subscribed: every node once, when listed.
    let mut touched = Some(Touch::All);
    loop {
        match touched.take() {
            Some(Touch::All) => {
                if nodes.listed() {
                    state.forget_deleted_nodes(|n| nodes.node(n).is_none());
                }
                let _ = all.send(());
            }
            Some(Touch::One(name)) => {
                if nodes.listed() && nodes.node(&name).is_none() {
                    state.forget_deleted_nodes(|n| n == name);
                    state.hold_gate(&name, None);
                } else {
                    let _ = one.send(ObjectRef::new(&name));
                }
            }
            None => {}
        }
        // A feed that fell behind lost names: every node is looked at instead.
        let lagged = |t: Option<Result<Touch, _>>| t.map(|t| t.unwrap_or(Touch::All));
        touched = tokio::select! {
            _ = shutdown.cancelled() => return,
            t = agents.next() => lagged(t.map(|t| t.map(Touch::One))),
            t = node_changes.next() => lagged(t),
            t = pods.next() => lagged(t),
            Ok(()) = lists.changed() => Some(Touch::All),
        };
    }
}

/// Runs the node controller until `shutdown`.
pub async fn run(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    labels: Arc<Labels>,
    nodes: NodeView,
    workloads: Option<Workloads>,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let (one_tx, one_rx) = mpsc::unbounded_channel();
    let (all_tx, all_rx) = mpsc::unbounded_channel();
    let router = route_triggers(state.clone(), nodes.clone(), workloads.clone(), one_tx, all_tx, shutdown.clone());
    let concurrency = settings.concurrency;
    if let Some(gate) = &settings.gate {
        state.update_gate_status(|s| {
            s.taint = gate.to_string();
            s.timeout = settings.gate_timeout;
        });
    }
    let ctx = Arc::new(NodeContext {
        cluster,
        state,
        labels,
        settings,
        workloads,
        failing: Mutex::new(HashMap::new()),
        gates_opened: Mutex::new(HashMap::new()),
    });
    let stop = shutdown.clone();
    // The node watch is the store's writer elsewhere (`watches`): this controller reads it and
    // is started by the triggers above only.
    let controller = Box::pin(
        Controller::for_stream(futures_util::stream::pending::<Result<Node, _>>(), nodes.store.clone())
            .with_config(Config::default().concurrency(concurrency))
            .reconcile_on(UnboundedReceiverStream::new(one_rx))
            .reconcile_all_on(UnboundedReceiverStream::new(all_rx))
            .graceful_shutdown_on(async move { stop.cancelled().await })
            .run(reconcile, error_policy, ctx)
            .for_each(|outcome| async move {
                if let Err(e) = outcome {
                    // A failed reconcile was logged by the error policy; a node gone meanwhile is no news.
                    tracing::debug!(error = %e, "node reconcile");
                }
            }),
    );
    tokio::join!(router, controller);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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

    /// Every node's label as [`desired_label`] wants it, from `liveness` (nodes not in it: unheard).
    fn desired_labels(
        liveness: &[Liveness],
        nodes: &[NodeFacts],
        started: SystemTime,
        now: SystemTime,
        grace: Duration,
    ) -> BTreeMap<String, Option<&'static str>> {
        let unheard = |n: &str| Liveness {
            node: n.into(),
            reported: false,
            runtime_available: false,
            not_answering_since: None,
            connected: false,
            since: SystemTime::UNIX_EPOCH,
        };
        nodes
            .iter()
            .map(|n| {
                let live = liveness.iter().find(|l| l.node == n.name).cloned().unwrap_or_else(|| unheard(&n.name));
                (n.name.clone(), desired_label(&live, n, started, now, grace).want)
            })
            .collect()
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

    /// A decision that time alone will change says when: the node is looked at again then, and
    /// not before (no pass over the cluster on a timer).
    #[test]
    fn a_decision_says_when_the_grace_runs_out() {
        let now = SystemTime::now();
        let grace = Duration::from_secs(300);
        let long_ago = now - grace * 10;
        let n = node("n", CRI, long_ago);
        // Connected with a runtime: nothing to wait for.
        let steady = desired_label(&live("n", true, true, 10_000, now), &n, long_ago, now, grace);
        assert_eq!((steady.want, steady.recheck), (CRI, None));
        // Gone 60 s ago: cri for the 240 s left of the grace.
        let gone = desired_label(&live("n", true, false, 60, now), &n, long_ago, now, grace);
        assert_eq!((gone.want, gone.recheck), (CRI, Some(Duration::from_secs(240))));
        // Not heard from since this process started 100 s ago: keeps cri for 200 s more.
        let unheard = Liveness { reported: false, ..live("n", false, false, 0, now) };
        let started = now - Duration::from_secs(100);
        let d = desired_label(&unheard, &n, started, now, grace);
        assert_eq!((d.want, d.recheck), (CRI, Some(Duration::from_secs(200))));
        // Evidence of no runtime: decided for good.
        let none = desired_label(&live("n", false, true, 0, now), &n, long_ago, now, grace);
        assert_eq!((none.want, none.recheck), (NONE, None));
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
