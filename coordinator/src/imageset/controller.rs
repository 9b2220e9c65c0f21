//! What runs for image sets: every replica follows the sets and the node labels into the shared
//! state (each agent's stream sends its node's list from it); the leader writes each set's
//! status, at most every [`progress::EVERY`] and only where it changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt as _};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::progress::{self, NodeSays};
use super::puller::KubernetesImagePuller;
use super::sets::{accept, Limits};
use super::ImageSet;
use crate::gate;
use crate::state::State;
use crate::watches::{changed, NodeFacts, NodeView, Touch, View};

/// Whether the cluster serves `plural` in `group/version` (the CRD is installed). Asked until the
/// API answers: only a definite "not found" is a no.
pub async fn served(client: &Client, group: &str, version: &str, plural: &str) -> bool {
    let api_version = format!("{group}/{version}");
    crate::retry_forever("asking the API which custom resources it serves", || async {
        match client.list_api_group_resources(&api_version).await {
            Ok(list) => Ok(list.resources.iter().any(|r| r.name == plural)),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await
}

/// Every replica: the sets in use — the ImageSets and, where followed, the KIP operator's
/// KubernetesImagePullers — checked against `limits`, and the node labels, into `state`.
pub async fn follow(
    state: Arc<State>,
    sets: Option<View<ImageSet>>,
    pullers: Option<View<KubernetesImagePuller>>,
    nodes: NodeView,
    limits: Limits,
) {
    let mut set_changes = sets.as_ref().map(|v| v.changed.clone());
    let mut puller_changes = pullers.as_ref().map(|v| v.changed.clone());
    let mut node_feed = nodes.touched.subscribe();
    let mut refused_pullers = BTreeMap::new();
    let mut check = |state: &State| {
        if !sets.as_ref().is_none_or(View::listed) || !pullers.as_ref().is_none_or(View::listed) {
            return;
        }
        let from_pullers: Vec<ImageSet> =
            pullers.iter().flat_map(|v| v.store.state()).map(|p| super::puller::as_set(&p)).collect();
        let own = sets.iter().flat_map(|v| v.store.state());
        let own: Vec<Arc<ImageSet>> = own.collect();
        let all = own.iter().map(|s| s.as_ref()).chain(from_pullers.iter());
        let previous = state.accepted_sets();
        let accepted = accept(all, &limits, previous.as_deref());
        // kip writes nothing to the operator's resources: a refused one is said in the log.
        let now_refused: BTreeMap<_, _> = accepted
            .refused
            .iter()
            .filter(|((_, name), _)| {
                name.starts_with("kubernetesimagepuller-")
                    && from_pullers.iter().any(|p| p.metadata.name.as_deref() == Some(name.as_str()))
            })
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        for ((namespace, name), why) in &now_refused {
            if refused_pullers.get(&(namespace.clone(), name.clone())) != Some(why) {
                tracing::warn!(namespace = %namespace, set = %name, why = %why, "a KubernetesImagePuller is not used");
            }
        }
        refused_pullers = now_refused;
        state.set_accepted(accepted);
    };
    check(&state);
    state.labels_touched(&Touch::All);
    loop {
        tokio::select! {
            r = changed(&mut set_changes) => {
                if !r {
                    return;
                }
                check(&state);
            }
            r = changed(&mut puller_changes) => {
                if !r {
                    return;
                }
                check(&state);
            }
            t = node_feed.recv() => match t {
                Ok(touch) => state.labels_touched(&touch),
                // Fell behind: every node's labels are looked at.
                Err(RecvError::Lagged(_)) => state.labels_touched(&Touch::All),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// The time of now at whole seconds, as the API server keeps condition times: a status decided
/// again must compare equal to the one it wrote.
fn now() -> Time {
    let t = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// Pure but for reading the state: each set's status as of now.
fn statuses(state: &State, sets: &View<ImageSet>, nodes: &NodeView) -> Vec<(Arc<ImageSet>, super::ImageSetStatus)> {
    let Some(accepted) = state.accepted_sets() else { return Vec::new() };
    let secret_problems = state.secret_problems();
    // The fallback pods' images by node, once for every set and node of the pass.
    let fallback = state.fallback_images();
    let now = now();
    let all_nodes = nodes.store.state();
    let mut out = Vec::new();
    for set in sets.store.state() {
        let key = (set.namespace().unwrap_or_default(), set.name_any());
        let previous = set.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
        let generation = set.metadata.generation;
        let status = if let Some(refusal) = accepted.refused.get(&key) {
            progress::of_refused(refusal, set.spec.images.len(), generation, previous, &now)
        } else if let Some(used) = accepted.sets.iter().find(|s| (s.namespace.clone(), s.name.clone()) == key) {
            let entries: Vec<(String, Option<SystemTime>)> = all_nodes
                .iter()
                .filter(|n| used.selector.matches(&n.metadata.labels.clone().unwrap_or_default()))
                .filter_map(|n| NodeFacts::of(n).map(|f| (f.name, f.created)))
                .collect();
            let set_images: Vec<&str> = used.images.entries().iter().map(|e| e.image.as_str()).collect();
            let reports: BTreeMap<&str, _> =
                entries.iter().map(|(name, _)| (name.as_str(), state.node(name))).collect();
            let says: Vec<NodeSays<'_>> = entries
                .iter()
                .map(|(name, created)| {
                    let entry = reports.get(name.as_str()).and_then(|e| e.as_ref());
                    let report = gate::current_report(
                        entry.map(|e| (&e.report, e.received_at)),
                        *created,
                        state.is_connected(name),
                    );
                    let served = fallback.get(name).is_some_and(|has| set_images.iter().all(|i| has.contains(*i)));
                    (name.as_str(), report, served)
                })
                .collect();
            let problems: Vec<String> = used
                .pull_secrets
                .iter()
                .filter_map(|s| {
                    let why = secret_problems.get(&(used.namespace.clone(), s.clone()))?;
                    Some(format!("imagePullSecrets {s}: {why}"))
                })
                .collect();
            progress::of_accepted(used, &says, &problems, generation, previous, &now)
        } else {
            continue;
        };
        out.push((set, status));
    }
    out
}

/// The leader: writes each set's status where it changed, after every change of the reports, the
/// sets or the nodes, at most every [`progress::EVERY`].
pub async fn write_status(
    client: Client,
    state: Arc<State>,
    sets: View<ImageSet>,
    nodes: NodeView,
    shutdown: CancellationToken,
) {
    let (mut reports, mut set_changes, mut node_changes, mut accepted) =
        (state.subscribe_nodes(), sets.changed.clone(), nodes.changed.clone(), state.subscribe_sets());
    let mut secret_problems = state.subscribe_secret_problems();
    // The fallback pods (a node they serve counts): watched once the leader's controllers run.
    let mut fallback_pods = None;
    loop {
        if fallback_pods.is_none() {
            fallback_pods = state.fallback_changes();
        }
        for (set, status) in statuses(&state, &sets, &nodes) {
            if !progress::differs(set.status.as_ref(), &status) {
                continue;
            }
            let api = Api::<ImageSet>::namespaced(client.clone(), &set.namespace().unwrap_or_default());
            let patch = serde_json::json!({"status": status});
            match api.patch_status(&set.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => tracing::debug!(set = %set.name_any(), ready = %status.ready, "image set status written"),
                // Deleted meanwhile, or refused: logged; the next change tries again.
                Err(e) => tracing::warn!(set = %set.name_any(), error = %e, "writing the image set's status failed"),
            }
        }
        // A storm of reports is one pass per interval.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(progress::EVERY) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = reports.changed() => {}
            _ = set_changes.changed() => {}
            _ = node_changes.changed() => {}
            _ = accepted.changed() => {}
            _ = secret_problems.changed() => {}
            // A watch gone (the DaemonSet moved): the next pass takes the new one.
            r = changed(&mut fallback_pods) => if !r { fallback_pods = None },
        }
    }
}
