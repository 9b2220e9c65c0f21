//! The classic KIP sleep-container DaemonSet, built from the configuration: an initContainer
//! copies the static `kip-sleep` into the `kip` emptyDir, then one hardened container per
//! image runs `/kip/sleep 720h`. Pure: the same config always gives the same object and hash.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, LocalObjectReference, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use kip::images::ImageList;

use crate::config::{KipConfig, Mode};
use crate::imageset::sets::AcceptedSet;

/// Node label the coordinator sets on evidence: `cri` where an agent reports a working runtime,
/// `none` where the fallback DaemonSet is needed (the agent reports no runtime, or has not
/// reported within the grace). A node without it is not decided yet: nothing runs there for kip.
pub const AGENT_LABEL: &str = "kip.eclipse.dev/agent";
pub const AGENT_LABEL_VALUE: &str = "cri";
pub const NO_AGENT_LABEL_VALUE: &str = "none";
/// Annotation holding the hash of everything kip sets, so an unchanged spec is never re-applied.
pub const HASH_ANNOTATION: &str = "kip.eclipse.dev/spec-hash";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kip");
/// Where the initContainer finds kip-sleep in KIP_IMAGE.
pub const SLEEP_IN_IMAGE: &str = "/usr/local/bin/kip-sleep";
const KIP_VOLUME: &str = "kip";
const NON_ROOT_UID: i64 = 65532;

/// What the DaemonSet depends on besides the configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// On OpenShift the SCC assigns UIDs; kip leaves them out, as KIP does.
    pub openshift: bool,
    /// The coordinator's Deployment, so the DaemonSet goes when kip is uninstalled.
    pub owner: Option<OwnerReference>,
    /// The startup gate's toleration: the fallback is what opens a gated node without an agent.
    pub gate_toleration: Option<Toleration>,
}

/// Label of an image set's fallback DaemonSet (and its pods): which set, as a hash of its
/// namespace and name (the full names are in the [`SET_ANNOTATION`]).
pub const SET_LABEL: &str = "kip.eclipse.dev/image-set";
pub const SET_ANNOTATION: &str = "kip.eclipse.dev/image-set";
/// Label of every fallback DaemonSet's pods: the install's DaemonSet (KIP's DAEMONSET_NAME) they
/// belong to, whichever set they serve.
pub const FALLBACK_OF_LABEL: &str = "kip.eclipse.dev/fallback-of";

/// What one fallback DaemonSet is for: the KIP ConfigMap's list (the default set) or an image set.
struct Target<'a> {
    name: String,
    images: &'a ImageList,
    /// KIP's NODE_SELECTOR: the default set's only.
    node_selector: &'a BTreeMap<String, String>,
    /// An image set's selector, ANDed into every node affinity term.
    requirements: Vec<NodeSelectorRequirement>,
    /// An image set's label and annotation.
    set: Option<(String, String)>,
}

/// The DaemonSet for `config.mode`; `None` in `cri` mode and once kip is released.
pub fn fallback_daemonset(config: &KipConfig, opts: &Options) -> Option<DaemonSet> {
    let target = Target {
        name: config.daemonset_name.clone(),
        images: &config.images,
        node_selector: &config.node_selector,
        requirements: Vec::new(),
        set: None,
    };
    build(config, opts, target)
}

/// Pure: an image set's fallback DaemonSet: its images, with the configuration's pod settings,
/// on the nodes its selector picks (in `auto` mode only those without an agent); `None` in `cri`
/// mode, once kip is released, and for a selector node affinity cannot say.
pub fn set_fallback_daemonset(config: &KipConfig, set: &AcceptedSet, opts: &Options) -> Option<DaemonSet> {
    let requirements = set.selector.node_requirements()?;
    let id = format!("{}/{}", set.namespace, set.name);
    let hash: String = Sha256::digest(id.as_bytes()).iter().take(5).map(|b| format!("{b:02x}")).collect();
    // `<daemonset>-set-<hash>`, within the 63 characters a label value (its instance) holds.
    let base = &config.daemonset_name[..config.daemonset_name.len().min(63 - 15)];
    let target = Target {
        name: format!("{}-set-{hash}", base.trim_end_matches('-')),
        images: &set.images,
        node_selector: &BTreeMap::new(),
        requirements,
        set: Some((hash, id)),
    };
    build(config, opts, target)
}

fn build(config: &KipConfig, opts: &Options, target: Target<'_>) -> Option<DaemonSet> {
    if config.mode == Mode::Cri || config.release != kip::v1::Release::None {
        return None;
    }
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "kip-sleep".to_string()),
        ("app.kubernetes.io/instance".to_string(), target.name.clone()),
    ]);
    let mut meta_labels = labels.clone();
    meta_labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    if let Some((hash, _)) = &target.set {
        meta_labels.insert(SET_LABEL.into(), hash.clone());
        meta_labels.insert(FALLBACK_OF_LABEL.into(), config.daemonset_name.clone());
    }

    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), config.cpu_request.clone()),
            ("memory".to_string(), config.memory_request.clone()),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), config.cpu_limit.clone()),
            ("memory".to_string(), config.memory_limit.clone()),
        ])),
        ..Default::default()
    };
    let kip_mount = |read_only| VolumeMount {
        name: KIP_VOLUME.into(),
        mount_path: "/kip".into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    let hardened = SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        read_only_root_filesystem: Some(true),
        ..Default::default()
    };
    let copy_sleep = Container {
        name: "copy-sleep".into(),
        image: Some(config.kip_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![SLEEP_IN_IMAGE.into(), "--copy-to".into(), "/kip/sleep".into()]),
        resources: Some(resources.clone()),
        security_context: Some(hardened.clone()),
        volume_mounts: Some(vec![kip_mount(false)]),
        ..Default::default()
    };
    let containers = target
        .images
        .entries()
        .iter()
        .map(|e| Container {
            name: e.name.clone(),
            image: Some(e.image.clone()),
            image_pull_policy: Some("IfNotPresent".into()),
            command: Some(vec!["/kip/sleep".into(), "720h".into()]),
            resources: Some(resources.clone()),
            security_context: Some(hardened.clone()),
            volume_mounts: Some(vec![kip_mount(true)]),
            ..Default::default()
        })
        .collect();

    let pod_security = PodSecurityContext {
        run_as_non_root: Some(true),
        // The SCC picks UIDs on OpenShift; elsewhere a fixed unprivileged one.
        run_as_user: (!opts.openshift).then_some(NON_ROOT_UID),
        run_as_group: (!opts.openshift).then_some(NON_ROOT_UID),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    };
    let mut affinity = config.affinity.clone();
    if config.mode == Mode::Auto {
        affinity = Some(require(affinity, &[only_without_agent()]));
    }
    if !target.requirements.is_empty() {
        affinity = Some(require(affinity, &target.requirements));
    }
    let mut annotations = config.daemonset_annotations.clone();
    if let Some((_, id)) = &target.set {
        annotations.insert(SET_ANNOTATION.into(), id.clone());
    }
    let annotations = (!annotations.is_empty()).then_some(annotations);

    let mut ds = DaemonSet {
        metadata: ObjectMeta {
            name: Some(target.name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(meta_labels.clone()),
            annotations: annotations.clone(),
            owner_references: opts.owner.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector { match_labels: Some(labels), ..Default::default() },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::String("10%".into())),
                    ..Default::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(meta_labels), annotations, ..Default::default() }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(1),
                    node_selector: (!target.node_selector.is_empty()).then(|| target.node_selector.clone()),
                    affinity,
                    tolerations: {
                        let all: Vec<Toleration> =
                            config.tolerations.iter().chain(&opts.gate_toleration).cloned().collect();
                        (!all.is_empty()).then_some(all)
                    },
                    image_pull_secrets: (!config.image_pull_secrets.is_empty()).then(|| {
                        config.image_pull_secrets.iter().map(|s| LocalObjectReference { name: s.clone() }).collect()
                    }),
                    security_context: Some(pod_security),
                    init_containers: Some(vec![copy_sleep]),
                    containers,
                    volumes: Some(vec![Volume {
                        name: KIP_VOLUME.into(),
                        empty_dir: Some(EmptyDirVolumeSource {
                            size_limit: Some(Quantity("50Mi".into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    };
    let hash = spec_hash(&ds);
    ds.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(HASH_ANNOTATION.into(), hash);
    Some(ds)
}

/// Hash of the object as kip would apply it (without the hash annotation itself).
pub fn spec_hash(ds: &DaemonSet) -> String {
    let mut copy = ds.clone();
    if let Some(a) = copy.metadata.annotations.as_mut() {
        a.remove(HASH_ANNOTATION);
    }
    // Serializing k8s-openapi types cannot fail (no maps with non-string keys).
    let json = serde_json::to_vec(&copy).unwrap_or_default();
    let digest = Sha256::digest(&json);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

pub fn hash_of(ds: &DaemonSet) -> Option<&str> {
    ds.metadata.annotations.as_ref()?.get(HASH_ANNOTATION).map(String::as_str)
}

/// "Only on nodes labelled `kip.eclipse.dev/agent=none`": the fallback runs where the coordinator
/// found evidence that it is needed, never on a node whose agent has not had the chance to report.
fn only_without_agent() -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: AGENT_LABEL.into(),
        operator: "In".into(),
        values: Some(vec![NO_AGENT_LABEL_VALUE.into()]),
    }
}

/// Adds "only on nodes labelled `kip.eclipse.dev/agent=none`" to the user's node affinity.
pub fn only_nodes_without_agent(affinity: Option<Affinity>) -> Affinity {
    require(affinity, &[only_without_agent()])
}

/// Adds `requirements` to the user's node affinity. Terms of `requiredDuringScheduling…` are
/// ORed, so the requirements go into every term.
fn require(affinity: Option<Affinity>, requirements: &[NodeSelectorRequirement]) -> Affinity {
    let mut affinity = affinity.unwrap_or_default();
    let node = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    let required = node
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector { node_selector_terms: vec![] });
    if required.node_selector_terms.is_empty() {
        required.node_selector_terms.push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_expressions.get_or_insert_with(Vec::new).extend(requirements.iter().cloned());
    }
    affinity
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{validate, RawConfig};

    fn config(pairs: &[(&str, &str)]) -> KipConfig {
        let raw: RawConfig = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        validate(&raw).unwrap()
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "kip-coordinator".into(),
            uid: "0a1b2c3d-0000-4000-8000-000000000001".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    /// Compares with `tests/golden/NAME.yaml`; `KIP_UPDATE_GOLDEN=1` rewrites it (then review the diff).
    /// The chart's default: the fallback runs on gated nodes (it is what opens them without an agent).
    fn gate() -> Toleration {
        crate::gate::DEFAULT_GATE_TAINT.parse::<crate::gate::GateTaint>().unwrap().toleration()
    }

    fn golden(name: &str, ds: &DaemonSet) {
        let yaml = serde_saphyr::to_string(ds).unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.yaml"));
        if std::env::var_os("KIP_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &yaml).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (KIP_UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(yaml, want, "{name}: generated DaemonSet differs from {}", path.display());
    }

    #[test]
    fn cri_mode_has_no_daemonset() {
        assert!(
            fallback_daemonset(&config(&[("IMAGES", "a=busybox"), ("KIP_MODE", "cri")]), &Options::default()).is_none()
        );
    }

    #[test]
    fn daemonset_mode_matches_kip_layout() {
        let c = config(&[
            ("IMAGES", "java11=quay.io/eclipse/che-java11-maven:next;theia=quay.io/eclipse/che-theia:next"),
            ("KIP_MODE", "daemonset"),
        ]);
        let ds =
            fallback_daemonset(&c, &Options { openshift: false, owner: Some(owner()), gate_toleration: Some(gate()) })
                .unwrap();
        golden("daemonset-mode", &ds);
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(1));
        assert!(pod.affinity.is_none(), "daemonset mode adds no exclusion");
        assert_eq!(pod.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), vec!["java11", "theia"]);
        assert_eq!(pod.containers[0].command.as_deref(), Some(&["/kip/sleep".to_string(), "720h".to_string()][..]));
    }

    #[test]
    fn auto_mode_runs_only_where_no_agent_caches_and_merges_user_affinity() {
        let c = config(&[
            ("IMAGES", "a=busybox"),
            (
                "AFFINITY",
                r#"{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"role","operator":"In","values":["worker"]}]},{"matchFields":[{"key":"metadata.name","operator":"In","values":["n9"]}]}]}}}"#,
            ),
            ("NODE_SELECTOR", r#"{"kubernetes.io/os":"linux"}"#),
            ("TOLERATIONS", r#"[{"operator":"Exists"}]"#),
            ("IMAGE_PULL_SECRETS", "regcred;other"),
            ("DAEMONSET_ANNOTATIONS", r#"{"team":"ide"}"#),
            ("CACHING_MEMORY_REQUEST", "5Mi"),
            ("CACHING_MEMORY_LIMIT", "5Mi"),
        ]);
        let ds =
            fallback_daemonset(&c, &Options { openshift: false, owner: Some(owner()), gate_toleration: Some(gate()) })
                .unwrap();
        golden("auto-mode-all-options", &ds);
        // An image set's own fallback, with the same options: its images, its selector ANDed
        // into every term, no NODE_SELECTOR (the default set's).
        let set: crate::imageset::ImageSet = serde_json::from_value(serde_json::json!({
            "apiVersion": "kip.eclipse.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"namespace": "ml", "name": "training"},
            "spec": {"images": [{"name": "trainer", "image": "quay.io/ml/train:1"}],
                "nodeSelector": {"matchLabels": {"pool": "gpu"}, "matchExpressions": [{"key": "spot", "operator": "DoesNotExist"}]}},
        }))
        .unwrap();
        let accepted = crate::imageset::sets::accept([&set], &Default::default(), None);
        let opts = Options { openshift: false, owner: Some(owner()), gate_toleration: Some(gate()) };
        golden("image-set-auto-mode-all-options", &set_fallback_daemonset(&c, &accepted.sets[0], &opts).unwrap());
        let terms = &ds
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2);
        for t in terms {
            assert!(
                t.match_expressions.as_ref().unwrap().iter().any(|e| e.key == AGENT_LABEL
                    && e.operator == "In"
                    && e.values.as_deref() == Some(&["none".to_string()][..])),
                "{t:?}"
            );
        }
    }

    #[test]
    fn auto_mode_without_user_affinity_and_openshift_leaves_uids_out() {
        let c = config(&[("IMAGES", "a=busybox")]);
        let ds =
            fallback_daemonset(&c, &Options { openshift: true, owner: None, gate_toleration: Some(gate()) }).unwrap();
        golden("auto-mode-openshift", &ds);
        let sc = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap().security_context.clone().unwrap();
        assert_eq!((sc.run_as_user, sc.run_as_group, sc.run_as_non_root), (None, None, Some(true)));
    }

    #[test]
    fn a_released_kip_has_no_daemonset() {
        let c = config(&[("IMAGES", "a=busybox"), ("KIP_MODE", "daemonset"), ("KIP_RELEASE", "unpin")]);
        assert!(fallback_daemonset(&c, &Options::default()).is_none());
    }

    #[test]
    fn hash_changes_with_the_spec_only() {
        let c = config(&[("IMAGES", "a=busybox")]);
        let a = fallback_daemonset(&c, &Options::default()).unwrap();
        let b = fallback_daemonset(&c, &Options::default()).unwrap();
        assert_eq!(hash_of(&a), hash_of(&b));
        let c2 = config(&[("IMAGES", "a=busybox;b=nginx")]);
        let d = fallback_daemonset(&c2, &Options::default()).unwrap();
        assert_ne!(hash_of(&a), hash_of(&d));
        assert_eq!(hash_of(&a).map(str::len), Some(16));
    }
}
