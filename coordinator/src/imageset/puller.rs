//! The KIP operator's `KubernetesImagePuller` (`che.eclipse.org/v1alpha1`, what Eclipse Che's
//! `imagePuller.enable` creates), read as an image set when the chart enables it: its `images`
//! (KIP's IMAGES syntax) for the nodes its `nodeSelector` (KIP's NODE_SELECTOR, a JSON object of
//! labels) picks. kip only reads it: it never writes the resource nor its status (the operator
//! owns both), so the two never fight over it.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

use super::{ImageSet, ImageSetSpec, SetImage};

/// The fields kip reads of the operator's spec (all strings, as the operator has them).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "che.eclipse.org",
    version = "v1alpha1",
    kind = "KubernetesImagePuller",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesImagePullerSpec {
    #[serde(default)]
    pub images: String,
    #[serde(default)]
    pub node_selector: String,
    /// KIP's CACHING_INTERVAL_HOURS (a string in the operator's type; a number accepted too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caching_interval_hours: Option<serde_json::Value>,
    /// KIP's IMAGE_PULL_SECRETS: secret names separated by `;`.
    #[serde(default)]
    pub image_pull_secrets: String,
}

pub const GROUP: &str = "che.eclipse.org";
pub const VERSION: &str = "v1alpha1";

/// Pure: the set a `KubernetesImagePuller` stands for, named `kubernetesimagepuller-<name>` in its
/// namespace. What does not parse is carried as is, so the set is refused with the reason
/// (logged: kip writes nothing to the operator's resource).
pub fn as_set(puller: &KubernetesImagePuller) -> ImageSet {
    let images = entries(&puller.spec.images)
        .map(|e| match e.split_once('=') {
            Some((name, image)) => SetImage { name: name.trim().into(), image: image.trim().into() },
            None => SetImage { name: String::new(), image: e.into() },
        })
        .collect();
    let selector = puller.spec.node_selector.trim();
    let node_selector = match selector {
        "" | "{}" => None,
        json => Some(
            serde_json::from_str::<std::collections::BTreeMap<String, String>>(json)
                .map(|labels| k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some(labels),
                    ..Default::default()
                })
                // A selector that does not parse selects no node (an operator exists to refuse
                // it too); the set's images stay off every node.
                .unwrap_or_else(|_| impossible_selector()),
        ),
    };
    // Carried as written: a value that is no whole number of hours refuses the set, naming it.
    let refresh_interval = puller.spec.caching_interval_hours.as_ref().map(|h| match h {
        serde_json::Value::String(s) if !s.trim().is_empty() => format!("{}h", s.trim()),
        serde_json::Value::Number(n) => format!("{n}h"),
        other => format!("{other}"),
    });
    let image_pull_secrets =
        entries(&puller.spec.image_pull_secrets).map(|name| super::SecretName { name: name.into() }).collect();
    let mut metadata = puller.metadata.clone();
    metadata.name = Some(format!("kubernetesimagepuller-{}", metadata.name.unwrap_or_default()));
    ImageSet {
        metadata,
        spec: ImageSetSpec { images, node_selector, refresh_interval, image_pull_secrets },
        status: None,
    }
}

/// The non-empty entries of a KIP `;`-separated list (IMAGES, IMAGE_PULL_SECRETS), trimmed.
fn entries(list: &str) -> impl Iterator<Item = &str> {
    list.split(';').map(str::trim).filter(|e| !e.is_empty())
}

/// A selector no node matches.
fn impossible_selector() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
    serde_json::from_value(serde_json::json!({"matchExpressions": [
        {"key": "kip.eclipse.dev/invalid-node-selector", "operator": "In", "values": ["a"]},
        {"key": "kip.eclipse.dev/invalid-node-selector", "operator": "NotIn", "values": ["a"]},
    ]}))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imageset::sets::{accept, node_list, selecting, Limits};

    fn puller(images: &str, selector: &str) -> KubernetesImagePuller {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "che.eclipse.org/v1alpha1", "kind": "KubernetesImagePuller",
            "metadata": {"name": "image-puller", "namespace": "eclipse-che", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"images": images, "nodeSelector": selector, "daemonsetName": "kubernetes-image-puller", "cachingCPURequest": ".05"},
        }))
        .unwrap()
    }

    #[test]
    fn che_s_image_puller_is_a_set_for_its_nodes() {
        let p = puller(
            "che-code=quay.io/che-incubator/che-code:latest;udi=quay.io/devfile/universal-developer-image:ubi8-latest;",
            "{\"node-role.kubernetes.io/worker\": \"\"}",
        );
        let set = as_set(&p);
        assert_eq!(set.metadata.name.as_deref(), Some("kubernetesimagepuller-image-puller"));
        let accepted = accept([&set], &Limits::default(), None);
        assert!(accepted.refused.is_empty(), "{:?}", accepted.refused);
        let worker: std::collections::BTreeMap<String, String> =
            [("node-role.kubernetes.io/worker".to_string(), String::new())].into();
        let list = node_list(&kip::images::ImageList::default(), &selecting(&accepted.sets, &worker));
        assert_eq!(
            list.to_string(),
            "che-code=quay.io/che-incubator/che-code:latest;udi=quay.io/devfile/universal-developer-image:ubi8-latest;"
        );
        assert!(selecting(&accepted.sets, &Default::default()).is_empty(), "a node without the label");
        assert_eq!(accepted.sets[0].refresh_interval, None, "no cachingIntervalHours: the ConfigMap's interval");
    }

    #[test]
    fn image_pull_secrets_are_the_set_s() {
        let mut p = puller("a=quay.io/private/a:1", "");
        p.spec.image_pull_secrets = " regcred ;; quay-robot;".into();
        let accepted = accept([&as_set(&p)], &Limits::default(), None);
        assert_eq!(accepted.sets[0].pull_secrets, ["regcred", "quay-robot"]);
        assert_eq!(
            accepted.sets[0].secret_keys().collect::<Vec<_>>(),
            ["eclipse-che.regcred", "eclipse-che.quay-robot"]
        );
    }

    #[test]
    fn caching_interval_hours_is_the_set_s_refresh_interval() {
        for (hours, expected) in [(serde_json::json!("6"), Ok(6 * 3600)), (serde_json::json!(2), Ok(7200))] {
            let mut p = puller("a=busybox", "");
            p.spec.caching_interval_hours = Some(hours);
            let accepted = accept([&as_set(&p)], &Limits::default(), None);
            let got = accepted.sets.first().and_then(|s| s.refresh_interval).map(|d| d.as_secs());
            assert_eq!(got.ok_or(()), expected);
        }
        let mut p = puller("a=busybox", "");
        p.spec.caching_interval_hours = Some(serde_json::json!("soon"));
        let accepted = accept([&as_set(&p)], &Limits::default(), None);
        let why = accepted.refused.values().next().map(ToString::to_string).unwrap_or_default();
        assert!(why.starts_with("spec.refreshInterval: `soonh`"), "{why}");
    }

    #[test]
    fn a_malformed_puller_is_refused_or_selects_nothing() {
        let accepted = accept([&as_set(&puller("no-equals-sign", ""))], &Limits::default(), None);
        assert!(accepted.sets.is_empty() && accepted.refused.len() == 1);
        let accepted = accept([&as_set(&puller("a=busybox", "not json"))], &Limits::default(), None);
        let labels: std::collections::BTreeMap<String, String> =
            [("kip.eclipse.dev/invalid-node-selector".to_string(), "a".to_string())].into();
        assert!(
            selecting(&accepted.sets, &labels).is_empty() && selecting(&accepted.sets, &Default::default()).is_empty()
        );
    }
}
