//! What the coordinator follows in the cluster, through kube-runtime watchers into reflector
//! stores: the nodes (labels, taints, creation), the fallback DaemonSet and its pods. Each view
//! carries a counter bumped on every change after the first complete list, and a feed of what
//! changed (by the node it concerns), so the controllers wake on changes instead of polling. Objects are stripped of what kip never reads (node
//! status with its image list, managed fields) before they are stored.

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use futures_util::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, Resource};
use tokio::sync::{broadcast, watch};

use crate::manifest::AGENT_LABEL;

/// What changed in a view: the objects of one node, or possibly any (a relist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Touch {
    One(String),
    All,
}

/// How many changes a view's feed holds for a slow reader (one that falls behind looks at
/// everything instead).
const FEED_CAPACITY: usize = 16 * 1024;

/// A reflector store, a counter bumped on every change (0 until the first complete list:
/// before it, nothing is decided from the view), and the feed of changes by node name.
pub struct View<K: Resource + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    pub store: Store<K>,
    pub changed: watch::Receiver<u64>,
    pub touched: broadcast::Sender<Touch>,
}

impl<K: Resource + 'static> Clone for View<K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), changed: self.changed.clone(), touched: self.touched.clone() }
    }
}

impl<K: Resource + 'static> View<K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    pub fn listed(&self) -> bool {
        *self.changed.borrow() > 0
    }

    /// A view fed by the caller (a test plays the watch): its store's writer and its counter.
    pub fn played() -> (Self, reflector::store::Writer<K>, watch::Sender<u64>)
    where
        K: Clone,
        K::DynamicType: Default,
    {
        let (store, writer) = reflector::store::<K>();
        let (tx, changed) = watch::channel(0);
        (Self { store, changed, touched: broadcast::channel(FEED_CAPACITY).0 }, writer, tx)
    }
}

/// Watches `api` into a [`View`]: the view, and the task that keeps it current (retried with
/// kube-runtime's backoff; a deleted object leaves the view). `strip` drops what is not needed;
/// `node_of` names the node an object concerns (for the feed).
pub fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    strip: fn(&mut K),
    node_of: fn(&K) -> Option<String>,
    what: &'static str,
) -> (View<K>, impl std::future::Future<Output = ()>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let (tx, changed) = watch::channel(0u64);
    let touched = broadcast::channel(FEED_CAPACITY).0;
    let feed = touched.clone();
    let stream = watcher(api, config).default_backoff().modify(strip).reflect(writer);
    let task = async move {
        let mut stream = std::pin::pin!(stream);
        let mut listed = false;
        while let Some(event) = stream.next().await {
            let touch = match event {
                Ok(watcher::Event::InitDone) => {
                    listed = true;
                    Some(Touch::All)
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                // An object of no node (a pod not scheduled yet, an image set) changes the view all
                // the same: only the feed by node has nothing to say.
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => node_of(&o).map(Touch::One),
                Err(e) => {
                    tracing::warn!(error = %e, "watching {what} failed; retrying");
                    continue;
                }
            };
            if listed {
                tx.send_modify(|v| *v += 1);
                // Nobody listening yet is fine: a controller starts by looking at everything.
                if let Some(touch) = touch {
                    let _ = feed.send(touch);
                }
            }
        }
    };
    (View { store, changed, touched }, task)
}

/// Waits for a change of an optional view's counter (forever without a view); false once the
/// view's watch is gone.
pub async fn changed(rx: &mut Option<watch::Receiver<u64>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

pub type NodeView = View<Node>;

/// What the label and gate decisions need to know of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFacts {
    pub name: String,
    pub created: Option<SystemTime>,
    /// The value of `kip.eclipse.dev/agent`, if set.
    pub label: Option<String>,
    pub taints: Vec<Taint>,
}

impl NodeFacts {
    pub fn of(node: &Node) -> Option<Self> {
        let m = &node.metadata;
        Some(Self {
            name: m.name.clone()?,
            created: m.creation_timestamp.as_ref().map(|t| SystemTime::from(t.0)),
            label: m.labels.as_ref().and_then(|l| l.get(AGENT_LABEL).cloned()),
            taints: node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default(),
        })
    }
}

impl View<Node> {
    /// One node, as the watch shows it.
    pub fn node(&self, name: &str) -> Option<NodeFacts> {
        self.store.get(&ObjectRef::new(name)).and_then(|n| NodeFacts::of(&n))
    }

    /// Every node, by name.
    pub fn facts(&self) -> Vec<NodeFacts> {
        let mut facts: Vec<NodeFacts> = self.store.state().iter().filter_map(|n| NodeFacts::of(n)).collect();
        facts.sort_by(|a, b| a.name.cmp(&b.name));
        facts
    }
}

/// Nodes keep metadata and taints; their status (conditions, the image list) changes often and
/// is large.
fn strip_node(node: &mut Node) {
    node.status = None;
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(spec) = node.spec.as_mut() {
        let taints = spec.taints.take();
        *spec = Default::default();
        spec.taints = taints;
    }
}

/// Every ImageSet in the cluster (the allow-list of namespaces is applied when they are checked,
/// so a set outside it can be told why it is not used).
pub fn watch_image_sets(client: Client) -> (View<crate::imageset::ImageSet>, impl std::future::Future<Output = ()>) {
    fn strip(set: &mut crate::imageset::ImageSet) {
        set.metadata.managed_fields = None;
        set.metadata.annotations = None;
    }
    follow(Api::all(client), watcher::Config::default(), strip, |_| None, "image sets")
}

/// Every KubernetesImagePuller of the KIP operator (read only).
pub fn watch_pullers(
    client: Client,
) -> (View<crate::imageset::puller::KubernetesImagePuller>, impl std::future::Future<Output = ()>) {
    fn strip(p: &mut crate::imageset::puller::KubernetesImagePuller) {
        p.metadata.managed_fields = None;
        p.metadata.annotations = None;
    }
    follow(Api::all(client), watcher::Config::default(), strip, |_| None, "KubernetesImagePullers")
}

pub fn watch_nodes(client: Client) -> (NodeView, impl std::future::Future<Output = ()>) {
    follow(Api::<Node>::all(client), watcher::Config::default(), strip_node, |n| n.metadata.name.clone(), "nodes")
}

/// The fallback DaemonSet and its pods, in one namespace under one name, and (with image sets)
/// the sets' fallback DaemonSets: the controllers re-apply a deleted or edited DaemonSet at once
/// and open the gate of a node whose fallback pods are Ready with its images.
#[derive(Clone)]
pub struct Workloads {
    pub namespace: String,
    pub name: String,
    pub daemonset: View<DaemonSet>,
    /// Every kip-sleep pod of the namespace (the default set's and the image sets').
    pub pods: View<Pod>,
    /// The image sets' fallback DaemonSets (`None`: not followed, image sets or their fallback off).
    pub set_daemonsets: Option<View<DaemonSet>>,
}

/// The labels every fallback pod carries (the default set's and the image sets').
pub const FALLBACK_PODS: &str = "app.kubernetes.io/name=kip-sleep";

/// The labels of the image sets' fallback DaemonSets of the install whose DaemonSet is `name`.
pub fn set_daemonset_selector(name: &str) -> String {
    format!(
        "{},{}={},{}={}",
        crate::manifest::SET_LABEL,
        crate::manifest::FALLBACK_OF_LABEL,
        name,
        crate::manifest::MANAGED_BY.0,
        crate::manifest::MANAGED_BY.1
    )
}

fn strip_daemonset(ds: &mut DaemonSet) {
    ds.metadata.managed_fields = None;
    ds.spec = None;
}

fn strip_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    if let Some(spec) = pod.spec.as_mut() {
        let (node, containers) = (spec.node_name.take(), std::mem::take(&mut spec.containers));
        *spec = Default::default();
        spec.node_name = node;
        spec.containers = containers
            .into_iter()
            .map(|c| k8s_openapi::api::core::v1::Container { name: c.name, image: c.image, ..Default::default() })
            .collect();
    }
    if let Some(status) = pod.status.as_mut() {
        let conditions = status.conditions.take();
        *status = Default::default();
        status.conditions = conditions;
    }
}

impl Workloads {
    /// Watches the fallback DaemonSet `name` in `namespace` and the pods of every fallback there;
    /// with `sets`, the image sets' fallback DaemonSets too.
    pub fn watch(
        client: Client,
        namespace: &str,
        name: &str,
        sets: bool,
    ) -> (Self, impl std::future::Future<Output = ()>) {
        let (daemonset, ds_task) = follow(
            Api::<DaemonSet>::namespaced(client.clone(), namespace),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
            strip_daemonset,
            |d| d.metadata.name.clone(),
            "the fallback DaemonSet",
        );
        let (pods, pod_task) = follow(
            Api::<Pod>::namespaced(client.clone(), namespace),
            watcher::Config::default().labels(FALLBACK_PODS),
            strip_pod,
            |p| p.spec.as_ref().and_then(|s| s.node_name.clone()),
            "the fallback DaemonSets' pods",
        );
        let (set_daemonsets, set_task) = if sets {
            let (view, task) = follow(
                Api::<DaemonSet>::namespaced(client, namespace),
                watcher::Config::default().labels(&set_daemonset_selector(name)),
                strip_daemonset,
                |_| None,
                "the image sets' fallback DaemonSets",
            );
            (Some(view), futures_util::future::Either::Left(task))
        } else {
            (None, futures_util::future::Either::Right(std::future::pending::<()>()))
        };
        let task = async move {
            tokio::join!(ds_task, pod_task, set_task);
        };
        (Self { namespace: namespace.into(), name: name.into(), daemonset, pods, set_daemonsets }, task)
    }

    /// The DaemonSet as the watch shows it: `None` before the first list, `Some(None)` when absent.
    pub fn shown_daemonset(&self) -> Option<Option<std::sync::Arc<DaemonSet>>> {
        self.daemonset.listed().then(|| self.daemonset.store.get(&ObjectRef::new(&self.name).within(&self.namespace)))
    }

    /// Whether this install's fallback pods on `node` are Ready and run every image in `images`
    /// between them (the default set's pod and the image sets').
    pub fn fallback_ready(&self, node: &str, images: &[&str]) -> bool {
        let pods = self.pods.store.state();
        let ours = pods.iter().filter(|p| fallback_of(p, &self.name));
        pods_serve(ours.map(|p| p.as_ref()), node, images)
    }

    /// The images this install's Ready fallback pods run, by node.
    pub fn fallback_images(&self) -> HashMap<String, BTreeSet<String>> {
        let pods = self.pods.store.state();
        ready_images(pods.iter().filter(|p| fallback_of(p, &self.name)).map(|p| p.as_ref()))
    }
}

/// Pure: `pod` is a fallback pod of the install whose DaemonSet is `name`: the DaemonSet's own,
/// or an image set's.
pub fn fallback_of(pod: &Pod, name: &str) -> bool {
    let labels = pod.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    label("app.kubernetes.io/instance") == Some(name) || label(crate::manifest::FALLBACK_OF_LABEL) == Some(name)
}

/// Pure: the node a Ready `pod` runs on (`None`: not Ready, or not scheduled).
fn ready_on(pod: &Pod) -> Option<&str> {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready.then(|| pod.spec.as_ref()?.node_name.as_deref()).flatten()
}

/// The images of a pod's containers.
fn images_of(pod: &Pod) -> impl Iterator<Item = &str> {
    pod.spec.iter().flat_map(|s| &s.containers).filter_map(|c| c.image.as_deref())
}

/// Pure: the Ready pods among `pods` that run on `node` have, between them, a container for
/// every image in `images` (a pod of an older list lacks the new images).
pub fn pods_serve<'a>(pods: impl Iterator<Item = &'a Pod>, node: &str, images: &[&str]) -> bool {
    let ready_here: Vec<&Pod> = pods.filter(|pod| ready_on(pod) == Some(node)).collect();
    !ready_here.is_empty() && images.iter().all(|i| ready_here.iter().flat_map(|p| images_of(p)).any(|c| c == *i))
}

/// Pure: the images the Ready pods among `pods` run, by node (for many nodes at once: one pass).
pub fn ready_images<'a>(pods: impl Iterator<Item = &'a Pod>) -> HashMap<String, BTreeSet<String>> {
    let mut by_node: HashMap<String, BTreeSet<String>> = HashMap::new();
    for pod in pods {
        if let Some(node) = ready_on(pod) {
            by_node.entry(node.to_string()).or_default().extend(images_of(pod).map(String::from));
        }
    }
    by_node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str, ready: &str, images: &[&str]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": node, "containers": images.iter().map(|i| serde_json::json!({"name": "c", "image": i})).collect::<Vec<_>>()},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .unwrap()
    }

    fn pod_serves(p: &Pod, node: &str, images: &[&str]) -> bool {
        pods_serve(std::iter::once(p), node, images)
    }

    #[test]
    fn a_fallback_pod_serves_its_node_when_ready_with_every_listed_image() {
        let p = pod("n1", "True", &["busybox", "nginx"]);
        assert!(pod_serves(&p, "n1", &["busybox", "nginx"]));
        assert!(!pod_serves(&p, "n2", &["busybox"]), "another node");
        assert!(!pod_serves(&p, "n1", &["busybox", "redis"]), "a pod of an older list");
        assert!(!pod_serves(&pod("n1", "False", &["busybox"]), "n1", &["busybox"]), "not ready");
        // The default set's pod and an image set's, between them; a pod not Ready adds nothing.
        let set_pod = pod("n1", "True", &["redis"]);
        let waiting = pod("n1", "False", &["postgres"]);
        assert!(pods_serve([&p, &set_pod].into_iter(), "n1", &["busybox", "redis"]));
        assert!(!pods_serve([&p, &set_pod, &waiting].into_iter(), "n1", &["busybox", "postgres"]));
        assert!(!pods_serve(std::iter::empty(), "n1", &[]), "no pod serves no node");
        // The same, for every node in one pass.
        let by_node = ready_images([&p, &set_pod, &waiting, &pod("n2", "True", &["alpine"])].into_iter());
        assert_eq!(by_node["n1"], BTreeSet::from(["busybox".to_string(), "nginx".into(), "redis".into()]));
        assert_eq!(by_node["n2"], BTreeSet::from(["alpine".to_string()]));
    }

    #[test]
    fn only_this_install_s_fallback_pods_count() {
        let labelled = |labels: serde_json::Value| -> Pod {
            let mut p = pod("n1", "True", &["busybox"]);
            p.metadata.labels = serde_json::from_value(labels).unwrap();
            p
        };
        let name = "kubernetes-image-puller";
        assert!(fallback_of(&labelled(serde_json::json!({"app.kubernetes.io/instance": name})), name));
        let set_pod = serde_json::json!({"app.kubernetes.io/instance": "kubernetes-image-puller-set-0a1b2c3d4e", crate::manifest::FALLBACK_OF_LABEL: name});
        assert!(fallback_of(&labelled(set_pod), name));
        assert!(!fallback_of(&labelled(serde_json::json!({"app.kubernetes.io/instance": "other-puller"})), name));
        assert!(!fallback_of(&pod("n1", "True", &["busybox"]), name), "no labels");
    }

    #[test]
    fn stripping_keeps_what_the_decisions_read() {
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {AGENT_LABEL: "cri"}, "annotations": {"a": "b"}},
            "spec": {"podCIDR": "10.0.0.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"images": [{"names": ["busybox"], "sizeBytes": 1}]},
        }))
        .unwrap();
        strip_node(&mut n);
        let f = NodeFacts::of(&n).unwrap();
        assert_eq!((f.label.as_deref(), f.taints.len()), (Some("cri"), 1));
        assert!(n.status.is_none() && n.metadata.annotations.is_none());
        assert_eq!(n.spec.unwrap().pod_cidr, None);

        let mut p = pod("n1", "True", &["busybox"]);
        strip_pod(&mut p);
        assert!(pod_serves(&p, "n1", &["busybox"]));
    }
}
