//! The image sets' fallback DaemonSets: one per set in use, with the set's images, on the nodes
//! its selector picks (in `auto` mode those without an agent), so a node without an agent gets
//! the union of its sets as KIP would give it one list: a pod per set, an image listed by two
//! sets pulled once by the runtime. Watched by label; applied (server-side, only when the spec
//! hash differs from what the watch shows) and deleted (kip's own, labelled, only) as the sets,
//! the configuration and the watch change. Nothing is deleted before the sets are known.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt as _};
use tokio_util::sync::CancellationToken;

use super::{Cluster, FIELD_MANAGER};
use crate::manifest::{self, MANAGED_BY, SET_LABEL};
use crate::state::State;
use crate::watches::View;

/// What to do: the DaemonSets to apply and the names to delete.
#[derive(Debug, Default, PartialEq)]
pub struct Plan<'a> {
    pub apply: Vec<&'a DaemonSet>,
    pub delete: Vec<String>,
}

/// Pure: from the DaemonSets wanted and those the watch shows (this install's sets' only), what
/// to apply (absent, or another spec hash) and what to delete (no set wants it; kip's own only).
pub fn plan<'a>(wanted: &'a [DaemonSet], shown: &[Arc<DaemonSet>]) -> Plan<'a> {
    let shown_hash: BTreeMap<String, Option<&str>> =
        shown.iter().map(|d| (d.name_any(), manifest::hash_of(d))).collect();
    let apply =
        wanted.iter().filter(|d| shown_hash.get(&d.name_any()).copied().flatten() != manifest::hash_of(d)).collect();
    let delete = shown
        .iter()
        .filter(|d| {
            let labels = d.labels();
            labels.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1) && labels.contains_key(SET_LABEL)
        })
        .map(|d| d.name_any())
        .filter(|name| !wanted.iter().any(|w| w.name_any() == *name))
        .collect();
    Plan { apply, delete }
}

/// The namespace and the DaemonSets the sets in use want now (`None`: the sets are not known yet).
fn wanted(cluster: &Cluster, state: &State) -> Option<(String, Vec<DaemonSet>)> {
    let published = state.current();
    let config = &published.config;
    let accepted = state.accepted_sets()?;
    let opts = cluster.options_for(&config.namespace);
    let wanted = accepted.sets.iter().filter_map(|s| manifest::set_fallback_daemonset(config, s, &opts)).collect();
    Some((config.namespace.clone(), wanted))
}

/// Keeps the sets' fallback DaemonSets in `view`'s namespace in line until shutdown; a failed
/// pass is tried again with backoff.
pub async fn run(cluster: Arc<Cluster>, state: Arc<State>, view: View<DaemonSet>, shutdown: CancellationToken) {
    let (mut lists, mut sets, mut shown) = (state.subscribe(), state.subscribe_sets(), view.changed.clone());
    let mut retry = crate::backoff();
    loop {
        let mut wait = None;
        if view.listed() {
            if let Some((namespace, wanted)) = wanted(&cluster, &state) {
                match pass(&cluster, &namespace, &wanted, &view.store.state()).await {
                    Ok(()) => retry = crate::backoff(),
                    Err(e) => {
                        tracing::error!(error = %e, "applying the image sets' fallback DaemonSets failed");
                        let message = format!("applying the image sets' fallback DaemonSets: {e}");
                        cluster.events.record(EventType::Warning, "DaemonSetApplyFailed", "Apply", message).await;
                        wait = Some(retry.next().unwrap_or(Duration::from_secs(60)));
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = lists.changed() => {}
            _ = sets.changed() => {}
            // After a failure only the backoff (or a new list or set) starts the next try.
            r = shown.changed(), if wait.is_none() => if r.is_err() { return },
            _ = tokio::time::sleep(wait.unwrap_or(Duration::MAX / 4)), if wait.is_some() => {}
        }
    }
}

async fn pass(
    cluster: &Cluster,
    namespace: &str,
    wanted: &[DaemonSet],
    shown: &[Arc<DaemonSet>],
) -> Result<(), kube::Error> {
    let api = Api::<DaemonSet>::namespaced(cluster.client.clone(), namespace);
    let plan = plan(wanted, shown);
    for ds in plan.apply {
        let name = ds.name_any();
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(ds)).await?;
        let set = ds.annotations().get(manifest::SET_ANNOTATION).cloned().unwrap_or_default();
        tracing::info!(daemonset = %name, set = %set, "applied an image set's fallback DaemonSet");
    }
    for name in plan.delete {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(daemonset = %name, "deleted the fallback DaemonSet of an image set no longer in use")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{validate, RawConfig};
    use crate::imageset::sets::{accept, Limits};

    fn config(pairs: &[(&str, &str)]) -> crate::config::KipConfig {
        let raw: RawConfig = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        validate(&raw).unwrap()
    }

    fn sets(specs: &[(&str, serde_json::Value)]) -> crate::imageset::sets::Accepted {
        let sets: Vec<crate::imageset::ImageSet> = specs
            .iter()
            .map(|(name, spec)| {
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "kip.eclipse.dev/v1alpha1", "kind": "ImageSet",
                    "metadata": {"namespace": "ml", "name": name}, "spec": spec,
                }))
                .unwrap()
            })
            .collect();
        accept(&sets, &Limits::default(), None)
    }

    #[test]
    fn a_set_s_fallback_runs_its_images_where_its_selector_and_the_missing_agent_say() {
        let config = config(&[("IMAGES", "base=busybox"), ("NODE_SELECTOR", r#"{"pool": "cpu"}"#)]);
        let accepted = sets(&[(
            "training",
            serde_json::json!({"images": [{"name": "trainer", "image": "quay.io/ml/train:1"}],
                "nodeSelector": {"matchLabels": {"pool": "gpu"}, "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}}),
        )]);
        let ds = manifest::set_fallback_daemonset(&config, &accepted.sets[0], &Default::default()).unwrap();
        let main = manifest::fallback_daemonset(&config, &Default::default()).unwrap();
        assert!(ds.name_any().starts_with("kubernetes-image-puller-set-") && ds.name_any().len() <= 63);
        assert_ne!(ds.spec.as_ref().unwrap().selector, main.spec.as_ref().unwrap().selector, "selectors never overlap");
        let pod = ds.spec.unwrap().template.spec.unwrap();
        let images: Vec<_> = pod.containers.iter().map(|c| c.image.clone().unwrap()).collect();
        assert_eq!(images, ["quay.io/ml/train:1"]);
        assert_eq!(pod.node_selector, None, "KIP's NODE_SELECTOR is the default set's");
        let term = &pod
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        let said: Vec<String> = term
            .match_expressions
            .iter()
            .flatten()
            .map(|r| format!("{} {} {:?}", r.key, r.operator, r.values.clone().unwrap_or_default()))
            .collect();
        assert_eq!(said, [r#"kip.eclipse.dev/agent In ["none"]"#, r#"pool In ["gpu"]"#, r#"zone NotIn ["a"]"#]);
        let cri = config_cri();
        assert!(manifest::set_fallback_daemonset(&cri, &accepted.sets[0], &Default::default()).is_none());
    }

    fn config_cri() -> crate::config::KipConfig {
        config(&[("IMAGES", "base=busybox"), ("KIP_MODE", "cri")])
    }

    #[test]
    fn the_plan_applies_what_differs_and_deletes_only_kip_s_own_unwanted_set_daemonsets() {
        let config = config(&[("IMAGES", "base=busybox")]);
        let accepted = sets(&[
            ("a", serde_json::json!({"images": [{"name": "x", "image": "alpine"}]})),
            ("b", serde_json::json!({"images": [{"name": "y", "image": "nginx"}]})),
        ]);
        let wanted: Vec<DaemonSet> = accepted
            .sets
            .iter()
            .filter_map(|s| manifest::set_fallback_daemonset(&config, s, &Default::default()))
            .collect();
        let mut edited = wanted[1].clone();
        edited.annotations_mut().insert(manifest::HASH_ANNOTATION.into(), "edited".into());
        let mut gone = wanted[0].clone();
        gone.metadata.name = Some("kubernetes-image-puller-set-0000000000".into());
        let mut foreign = gone.clone();
        foreign.metadata.name = Some("not-kips".into());
        foreign.labels_mut().remove(MANAGED_BY.0);
        let shown: Vec<Arc<DaemonSet>> = [wanted[0].clone(), edited, gone, foreign].into_iter().map(Arc::new).collect();
        let plan = plan(&wanted, &shown);
        assert_eq!(plan.apply.iter().map(|d| d.name_any()).collect::<Vec<_>>(), [wanted[1].name_any()]);
        assert_eq!(plan.delete, ["kubernetes-image-puller-set-0000000000"]);
        // Nothing wanted (a release, cri mode, no set): kip's own go, nothing else.
        let plan = super::plan(&[], &shown);
        assert_eq!(plan.delete.len(), 3);
        assert!(!plan.delete.contains(&"not-kips".to_string()));
    }
}
