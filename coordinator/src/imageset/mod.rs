//! Image sets: lists of images for the nodes a label selector picks, each a namespaced
//! `ImageSet` (`kip.eclipse.dev/v1alpha1`) with its status in the Kubernetes API
//! (`kubectl get imagesets`, `kubectl wait --for=condition=Ready imageset/NAME`).
//!
//! - here: the custom resource's types, from which the CRD (`deploy/helm/crds/`) is generated;
//! - `select`: label selectors, matched against a node's labels (pure);
//! - `sets`: the sets the coordinator accepts (validated, allowed namespace, under the cap) and
//!   each node's list: the default set (the KIP ConfigMap) and every set that selects it (pure);
//! - `progress`: a set's status from the nodes' reports (pure);
//! - `secrets`: the sets' pull secrets, copied by the leader into one Secret the agents mount;
//! - `puller`: the KIP operator's `KubernetesImagePuller` read as a set (Eclipse Che);
//! - `controller`: following the sets (every replica) and writing their status (the leader).

pub mod controller;
pub mod progress;
pub mod puller;
pub mod secrets;
pub mod select;
pub mod sets;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "kip.eclipse.dev";
pub const VERSION: &str = "v1alpha1";

/// The images a set keeps cached and pinned, on the nodes it selects.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[x_kube(cel)]
#[kube(
    group = "kip.eclipse.dev",
    version = "v1alpha1",
    kind = "ImageSet",
    namespaced,
    status = "ImageSetStatus",
    shortname = "imgset",
    category = "kip",
    derive = "PartialEq",
    printcolumn = r#"{"name": "Images", "type": "integer", "jsonPath": ".status.imageCount"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.ready", "description": "nodes with every image cached / nodes selected"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageSetSpec {
    /// The images, each a name and an image reference (the rules of the KIP ConfigMap's IMAGES).
    #[x_kube(validation = Rule::new("self.all(i, self.exists_one(j, j.name == i.name))").message("every image name is used once"))]
    #[schemars(length(min = 1, max = 100))]
    pub images: Vec<SetImage>,
    /// The nodes that keep the images: a label selector; absent or empty selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// How often the set's tags are looked up again (`90s`, `30m`, `6h`; 1s to 30 days): the
    /// coordinator asks the registry that often, and the nodes the set selects refresh at
    /// least that often. Absent: the KIP ConfigMap's refresh interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32), regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub refresh_interval: Option<String>,
    /// Secrets in the set's namespace with credentials for its images' registries, as a pod's
    /// `imagePullSecrets` (`kubernetes.io/dockerconfigjson` or `kubernetes.io/dockercfg`).
    /// The coordinator copies them into one Secret of its own namespace that agents mount;
    /// credentials never travel on kip's own API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<SecretName>,
}

/// A Secret in the set's namespace, by name (as a pod's `imagePullSecrets` entries).
#[derive(KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct SecretName {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// One image of a set.
#[derive(KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[x_kube(cel)]
pub struct SetImage {
    /// A name for the image (a DNS label: lowercase letters, digits and `-`, at most 63).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The image reference: `[registry/]repository[:tag][@digest]`.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new(r"self.matches('^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[a-z0-9]+([+._-][a-z0-9]+)*:[a-fA-F0-9]{32,})?$')").message("not an image reference: [registry/]repository[:tag][@digest], lowercase repository"))]
    pub image: String,
}

/// What the coordinator last found of a set.
#[derive(KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSetStatus {
    /// The generation of the spec this status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: every selected node has every image cached (and pinned where it can pin);
    /// `Progressing`: nodes are still caching; `Degraded`: what fails, and where first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How many images the set lists (what `kubectl get` shows).
    #[serde(default)]
    pub image_count: u32,
    #[serde(default)]
    pub nodes_selected: u32,
    #[serde(default)]
    pub nodes_ready: u32,
    /// `nodesReady/nodesSelected`, for `kubectl get`.
    #[serde(default)]
    pub ready: String,
    /// Per image, on how many selected nodes it is cached and pinned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageProgress>,
}

#[derive(KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageProgress {
    pub name: String,
    pub image: String,
    pub nodes_cached: u32,
    pub nodes_pinned: u32,
}

/// The CRD as YAML, as the chart ships it (`deploy/helm/crds/imagesets.yaml`).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt as _;
    let crd = ImageSet::crd();
    let body = serde_saphyr::to_string(&crd).unwrap_or_default();
    format!("# Generated from coordinator/src/imageset/mod.rs (KIP_UPDATE_GOLDEN=1 cargo test -p kip-coordinator crd).\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart's CRD is the one these types generate (`KIP_UPDATE_GOLDEN=1` rewrites it).
    #[test]
    fn the_chart_ships_the_crd_the_types_generate() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/crds/imagesets.yaml");
        let generated = crd_yaml();
        if std::env::var_os("KIP_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
        }
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            shipped == generated,
            "{} is not what the types generate; KIP_UPDATE_GOLDEN=1 rewrites it",
            path.display()
        );
    }

    /// The rules the API server checks at admission, evaluated here with kube's CEL: a set that
    /// names an image twice, or lists something that is no image reference, is refused.
    #[test]
    fn the_schema_refuses_a_duplicate_name_and_a_malformed_reference() {
        let spec = |images: serde_json::Value| serde_json::json!({"images": images});
        let ok = spec(
            serde_json::json!([{"name": "a", "image": "quay.io/x/a:1"}, {"name": "b", "image": "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}]),
        );
        assert!(ImageSetSpec::validate_cel(&ok, None).is_ok());
        let twice = spec(serde_json::json!([{"name": "a", "image": "busybox"}, {"name": "a", "image": "alpine"}]));
        let e = ImageSetSpec::validate_cel(&twice, None).unwrap_err();
        assert!(format!("{e:?}").contains("every image name is used once"), "{e:?}");
        for image in [
            "nvcr.io/nvidia/pytorch:24.10-py3",
            "quay.io/jupyter/pytorch-notebook:cuda12-2024-10-21",
            "registry.local:5000/a/b",
            "busybox",
        ] {
            let ok = serde_json::json!({"name": "a", "image": image});
            assert!(SetImage::validate_cel(&ok, None).is_ok(), "{image}");
        }
        let image = serde_json::json!({"name": "a", "image": "Not A Reference!"});
        let e = SetImage::validate_cel(&image, None).unwrap_err();
        assert!(format!("{e:?}").contains("not an image reference"), "{e:?}");
    }
}
