//! The coordinator's cluster side: what it writes through the Kubernetes API, one controller per
//! kind of object, all reading the cluster from watches (`watches`) and the agents from the
//! shared state (`state`). Runs beside the list publisher: an unreachable API never stops the
//! list from being published.
//!
//! - `nodes`: one reconcile per node (kube-runtime's `Controller`): the `kip.eclipse.dev/agent`
//!   label on evidence and the startup gate. An agent's report or connection change reconciles
//!   that node only; a new list reconciles every node. A node whose write fails backs off alone.
//! - `daemonset`: the fallback sleep DaemonSet, applied by server-side apply when its spec hash
//!   changes, re-applied when the watch shows it deleted or edited.
//! - `release`: the cluster's side of KIP_RELEASE, a state machine of its own: the DaemonSet goes,
//!   the agents confirm, then every kip label goes.
//! - `labels`: the one writer of node labels both the node and the release controllers use.

pub mod daemonset;
pub mod labels;
pub mod nodes;
pub mod release;
pub mod set_fallbacks;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Api, Client, Resource as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events::Events;
use crate::gate::GateTaint;
use crate::manifest::Options;
use crate::state::State;
use crate::watches::{NodeView, Workloads};

pub const FIELD_MANAGER: &str = "kip";

/// The controllers' settings that do not come from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long labels wait for agents (see [`nodes::desired_label`]).
    pub grace: Duration,
    /// The startup gate's taint (`None`: no gate).
    pub gate: Option<GateTaint>,
    /// After this long since a node's creation its gate opens unverified.
    pub gate_timeout: Duration,
    /// Beaten by the DaemonSet controller at least every 30 s, for `/healthz`.
    pub heartbeat: kip::process::Heartbeat,
    /// Node reconciles that may run at once (each at most one API write).
    pub concurrency: u16,
    /// Image sets get fallback DaemonSets of their own (`--image-set-fallback`).
    pub set_fallbacks: bool,
}

impl Settings {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            gate: None,
            gate_timeout: Duration::from_secs(900),
            heartbeat: Default::default(),
            concurrency: 16,
            set_fallbacks: false,
        }
    }
}

/// What every controller shares: the API client, where Events go, what the DaemonSet depends on.
pub struct Cluster {
    pub client: Client,
    pub options: Options,
    pub events: Events,
    /// When this process started: agents reconnect to a restarted coordinator, labels wait.
    pub started: SystemTime,
}

impl Cluster {
    pub fn new(client: Client, options: Options, deployment: Option<ObjectReference>) -> Self {
        let events = Events::new(&client, deployment);
        Self { client, options, events, started: SystemTime::now() }
    }

    /// The options for a DaemonSet in `namespace`: without an owner there if the Deployment
    /// lives elsewhere (the garbage collector would delete a DaemonSet with a dangling owner).
    pub fn options_for(&self, namespace: &str) -> Options {
        let same = self.events.namespace() == Some(namespace);
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
        tracing::info!(openshift, owner = owner.is_some(), "cluster controllers ready");
        Self::new(client, Options { openshift, owner, gate_toleration: gate.map(GateTaint::toleration) }, reference)
    }
}

/// Runs the three controllers on `nodes` and `workloads` until shutdown (`false`) or until the
/// configuration moves the DaemonSet to another namespace or name (`true`: `workloads` watch
/// the old one; the caller starts again with new watches).
pub async fn run(
    cluster: Arc<Cluster>,
    state: Arc<State>,
    nodes: NodeView,
    workloads: Option<Workloads>,
    settings: Settings,
    shutdown: CancellationToken,
) -> bool {
    state.attach_api();
    if let Some(w) = &workloads {
        state.attach_fallback(w.clone());
    }
    let set_daemonsets = workloads.as_ref().and_then(|w| w.set_daemonsets.clone());
    let labels = Arc::new(labels::Labels::new(cluster.client.clone()));
    // What the DaemonSet controller last achieved: the release waits for the DaemonSet to go.
    let (ds_synced, ds_synced_rx) = watch::channel(None::<(u64, bool)>);
    let stop = shutdown.child_token();
    // Each controller's future on the heap: nested in the task's, they would be one large value on
    // a worker thread's stack (a debug build overflowed it).
    let ds = Box::pin(daemonset::run(
        cluster.clone(),
        state.clone(),
        workloads.clone(),
        settings.heartbeat.clone(),
        ds_synced,
        stop.clone(),
    ));
    let node_controller = Box::pin(nodes::run(
        cluster.clone(),
        state.clone(),
        labels.clone(),
        nodes.clone(),
        workloads,
        settings.clone(),
        stop.clone(),
    ));
    let set_fallbacks = Box::pin(async {
        match set_daemonsets {
            Some(view) => set_fallbacks::run(cluster.clone(), state.clone(), view, stop.clone()).await,
            None => stop.cancelled().await,
        }
    });
    let release = Box::pin(release::run(cluster.clone(), state.clone(), labels, nodes, ds_synced_rx, stop.clone()));
    let moved = async {
        let moved = ds.await;
        // The others end with the DaemonSet's: a move restarts all three on new watches.
        stop.cancel();
        moved
    };
    let (moved, (), (), ()) = tokio::join!(moved, node_controller, release, set_fallbacks);
    moved && !shutdown.is_cancelled()
}

/// Runs the controllers with `client` on the node watch `nodes`: finds out what the DaemonSet
/// depends on, watches the DaemonSet and its pods, then keeps everything in line until shutdown.
pub async fn start(
    client: Client,
    state: Arc<State>,
    nodes: NodeView,
    deployment: Option<(String, String)>,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let cluster = Arc::new(Cluster::discover(client.clone(), deployment, settings.gate.as_ref()).await);
    let controllers = async {
        loop {
            let config = state.current();
            let (workloads, workload_task) = Workloads::watch(
                client.clone(),
                &config.config.namespace,
                &config.config.daemonset_name,
                settings.set_fallbacks && state.image_sets_enabled(),
            );
            let run = Box::pin(run(
                cluster.clone(),
                state.clone(),
                nodes.clone(),
                Some(workloads),
                settings.clone(),
                shutdown.clone(),
            ));
            // The watches of the old DaemonSet end with its run.
            let moved = tokio::select! {
                moved = run => moved,
                _ = workload_task => {
                    tracing::error!("the DaemonSet and pod watches ended; the cluster controllers stop");
                    false
                }
            };
            if !moved {
                return;
            }
        }
    };
    controllers.await
}

/// Runs `work` until it ends or `shutdown` fires, whichever comes first: an API call in flight
/// is dropped (cancelled), so SIGTERM never waits for a request to time out.
pub async fn until_shutdown(shutdown: &CancellationToken, work: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = shutdown.cancelled() => tracing::info!("cluster controllers stopped"),
        _ = work => {}
    }
}

/// The earlier of two optional delays.
fn sooner(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
