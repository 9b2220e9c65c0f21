//! Image sets end to end on the fake API server (`common::fake_api`) and the real gRPC server:
//! each agent's stream carries its node's list (the default set and the sets that select the
//! node), a relabelled node gains a set, a deleted set is let go of, nothing is sent before the
//! sets are known, and each set's status is written through the status subresource — `Ready`
//! once every selected node reports every image — and not written again when nothing changed.

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::config_with;
use common::fake_api::{until, FakeApi};
use kip::v1::{self, coordinator_client::CoordinatorClient};
use kip_coordinator::auth::AgentAuth;
use kip_coordinator::imageset::{controller, sets::Limits};
use kip_coordinator::{metrics::Metrics, state::State, watches};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SETS: &str = "/apis/kip.eclipse.dev/v1alpha1/namespaces/ml/imagesets";

fn training(selector: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "kip.eclipse.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "training", "namespace": "ml"},
        "spec": {"images": [{"name": "trainer", "image": "quay.io/ml/train:1"}, {"name": "base", "image": "busybox"}], "nodeSelector": selector}})
}

/// A `kubernetes.io/dockerconfigjson` Secret `name` in namespace `ml` with a login for
/// `registry`; returns its `auth` value (base64 `user:password`).
fn pull_secret(api: &FakeApi, name: &str, registry: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#);
    api.apply(
        "/api/v1/namespaces/ml/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "ml"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(&config)}}),
    );
    auth
}

/// The fake API with two nodes an hour old: `node-0` in pool `gpu`, `node-1` in pool `cpu`.
fn two_pools() -> Arc<FakeApi> {
    let api = FakeApi::new();
    api.add_nodes(2, std::time::SystemTime::now() - Duration::from_secs(3600));
    api.label_node("node-0", json!({"pool": "gpu"}));
    api.label_node("node-1", json!({"pool": "cpu"}));
    api
}

/// An agent's stream: the lists as they come.
struct Agent {
    client: CoordinatorClient<tonic::transport::Channel>,
    stream: tonic::Streaming<v1::ImageListUpdate>,
    node: String,
}

impl Agent {
    async fn connect(url: &str, node: &str) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
        let mut client = CoordinatorClient::new(channel);
        let request = v1::WatchRequest { node_name: node.into(), agent_version: "test".into() };
        let stream = client.watch(request).await.unwrap().into_inner();
        Self { client, stream, node: node.into() }
    }

    /// The next list, as `name=image` pairs (bounded: a lost update fails instead of hanging).
    async fn next(&mut self) -> (u64, Vec<String>) {
        let update = self.next_update().await;
        (update.generation, update.images.iter().map(|i| format!("{}={}", i.name, i.image)).collect())
    }

    /// The next update as sent.
    async fn next_update(&mut self) -> v1::ImageListUpdate {
        let update = tokio::time::timeout(Duration::from_secs(20), self.stream.message())
            .await
            .unwrap_or_else(|_| panic!("a list for {} in time", self.node));
        update.unwrap().unwrap()
    }

    /// Reports every image of `images` cached and pinned.
    async fn report_cached(&mut self, images: &[String]) {
        let report = v1::NodeReport {
            node_name: self.node.clone(),
            runtime: Some(v1::RuntimeState { available: true, name: "containerd".into(), ..Default::default() }),
            images: images
                .iter()
                .map(|p| {
                    let (name, image) = p.split_once('=').unwrap();
                    v1::ImageState {
                        name: name.into(),
                        image: image.into(),
                        cached: true,
                        pinned: true,
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        };
        self.client.report(report).await.unwrap();
    }
}

/// A coordinator with image sets on the fake API: its state, its gRPC server, and, once
/// [`Coordinator::follow`] is called, the sets followed and (with `status`) their status written.
struct Coordinator {
    client: kube::Client,
    state: Arc<State>,
    served: common::Served,
    nodes: watches::NodeView,
    shutdown: CancellationToken,
}

impl Coordinator {
    async fn start(api: &Arc<FakeApi>, config: kip_coordinator::config::KipConfig) -> (Self, common::fake_api::Door) {
        let door = api.door().await;
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&FakeApi::kubeconfig(&door)).unwrap();
        let api_config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        let client = kube::Client::try_from(api_config).unwrap();
        let state = State::new(config, Arc::new(Metrics::new()));
        state.use_image_sets();
        let served = common::serve(state.clone(), AgentAuth::None).await;
        let (nodes, node_task) = watches::watch_nodes(client.clone());
        state.attach_nodes(nodes.clone());
        tokio::spawn(node_task);
        (Self { client, state, served, nodes, shutdown: CancellationToken::new() }, door)
    }

    /// Follows the ImageSets under `limits`, and writes their status.
    fn follow(&self, limits: Limits) {
        let (sets, set_task) = watches::watch_image_sets(self.client.clone());
        tokio::spawn(set_task);
        tokio::spawn(controller::follow(self.state.clone(), Some(sets.clone()), None, self.nodes.clone(), limits));
        let (client, state, nodes, stop) =
            (self.client.clone(), self.state.clone(), self.nodes.clone(), self.shutdown.clone());
        tokio::spawn(controller::write_status(client, state, sets, nodes, stop));
    }

    async fn connect(&self, node: &str) -> Agent {
        Agent::connect(&self.served.url, node).await
    }

    /// The leader's copy of the sets' pull secrets, kept as `kip/kip-set-pull-secrets`.
    fn copy_pull_secrets(&self) {
        let copy =
            kip_coordinator::imageset::secrets::Copy { namespace: "kip".into(), name: "kip-set-pull-secrets".into() };
        let (client, state, stop) = (self.client.clone(), self.state.clone(), self.shutdown.clone());
        tokio::spawn(kip_coordinator::imageset::secrets::run(client, state, Some(copy), stop));
    }

    /// The tag resolver, speaking plain HTTP to `registry`.
    fn resolve_tags(&self, registry: &str) {
        let resolver =
            Arc::new(kip_coordinator::resolve::Resolver::new(vec![registry.into()], None, Arc::new(Metrics::new())));
        tokio::spawn(resolver.run(self.state.clone(), self.shutdown.clone()));
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.served.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_gets_its_sets_and_each_set_its_status() {
    let api = two_pools();
    api.apply(SETS, training(json!({"matchLabels": {"pool": "gpu"}})));
    let (kip, door) = Coordinator::start(&api, config_with("base-image=docker.io/library/busybox:latest")).await;

    // Before the sets are known, a stream sends nothing (its agent keeps the list it has).
    let mut gpu = kip.connect("node-0").await;
    let early = tokio::time::timeout(Duration::from_millis(500), gpu.stream.message()).await;
    assert!(early.is_err(), "a list went out before the sets were known: {early:?}");
    kip.follow(Limits::default());

    // node-0 (gpu): the default set, then the training set's images (busybox once).
    let (g1, list) = gpu.next().await;
    assert_eq!(list, ["base-image=docker.io/library/busybox:latest", "trainer=quay.io/ml/train:1"]);
    let mut cpu = kip.connect("node-1").await;
    assert_eq!(cpu.next().await.1, ["base-image=docker.io/library/busybox:latest"]);

    // Status: one of one selected node, not ready until it reports.
    let status = |field: &str| api.object(SETS, "training").map(|o| o["status"][field].clone()).unwrap_or_default();
    until("the status is written", Duration::from_secs(20), || status("ready") == json!("0/1")).await;
    gpu.report_cached(&list).await;
    until("Ready", Duration::from_secs(20), || status("ready") == json!("1/1")).await;
    let conditions = status("conditions");
    let ready = conditions.as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!((ready["status"].clone(), ready["reason"].clone()), (json!("True"), json!("AllNodesReady")));
    assert_eq!(status("observedGeneration"), json!(1));

    // No change, no write: a storm of identical reports writes nothing more.
    let writes = || door.count("patch", "imagesets");
    let before = writes();
    for _ in 0..5 {
        gpu.report_cached(&list).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(writes(), before, "the status was written again without a change");

    // node-1 joins the gpu pool: its stream gets the set's images; the set now waits for it.
    api.label_node("node-1", json!({"pool": "gpu"}));
    let (c2, list) = cpu.next().await;
    assert_eq!(list, ["base-image=docker.io/library/busybox:latest", "trainer=quay.io/ml/train:1"]);
    until("the set counts node-1", Duration::from_secs(20), || status("ready") == json!("1/2")).await;
    cpu.report_cached(&list).await;
    until("both ready", Duration::from_secs(20), || status("ready") == json!("2/2")).await;

    // The set is deleted: both nodes are back to the default set (their agents let go of it).
    api.remove(SETS, "training");
    let (g2, list) = gpu.next().await;
    assert_eq!(list, ["base-image=docker.io/library/busybox:latest"]);
    assert_eq!(cpu.next().await.1, ["base-image=docker.io/library/busybox:latest"]);
    assert!(g2 > g1 && c2 > g1, "generations only grow: {g1} {c2} {g2}");
}

/// A set outside the allowed namespaces, or over the cap, is not used, and its status says why;
/// the others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_set_says_why_and_touches_no_node() {
    let api = FakeApi::new();
    api.add_nodes(1, std::time::SystemTime::now() - Duration::from_secs(3600));
    api.apply(SETS, training(json!({})));
    let other = "/apis/kip.eclipse.dev/v1alpha1/namespaces/team-b/imagesets";
    let mut elsewhere = training(json!({}));
    elsewhere["metadata"]["namespace"] = json!("team-b");
    elsewhere["spec"]["images"] = json!([{"name": "tool", "image": "quay.io/b/tool:1"}]);
    api.apply(other, elsewhere);
    let (kip, _door) = Coordinator::start(&api, config_with("a=alpine")).await;
    kip.follow(Limits { namespaces: Some(["ml".to_string()].into()), max_images: 2 });
    let mut agent = kip.connect("node-0").await;
    assert_eq!(agent.next().await.1, ["a=alpine", "trainer=quay.io/ml/train:1", "base=busybox"]);
    let degraded = |ns_path: &str| {
        api.object(ns_path, "training")
            .and_then(|o| o["status"]["conditions"].as_array().cloned())
            .and_then(|c| c.into_iter().find(|c| c["type"] == "Degraded"))
            .unwrap_or_default()
    };
    until("team-b's set is told why", Duration::from_secs(20), || degraded(other)["reason"] == "NamespaceNotAllowed")
        .await;
    assert_eq!(degraded(other)["status"], "True");
    // Over the cap: the next set is refused, the list stays.
    let mut third = training(json!({}));
    third["metadata"]["name"] = json!("third");
    third["spec"]["images"] = json!([{"name": "extra", "image": "quay.io/ml/extra:1"}]);
    api.apply(SETS, third);
    let over = || {
        api.object(SETS, "third")
            .and_then(|o| o["status"]["conditions"].as_array().cloned())
            .and_then(|c| c.into_iter().find(|c| c["type"] == "Degraded"))
            .is_some_and(|c| c["reason"] == "ImageCapExceeded")
    };
    until("the set over the cap is told so", Duration::from_secs(20), over).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), agent.stream.message()).await;
    assert!(quiet.is_err(), "a refused set changed a node's list: {quiet:?}");
}

/// With image sets the KIP ConfigMap is the default set for the nodes its NODE_SELECTOR picks, as
/// KIP's DaemonSet ran only there: another node gets only its sets' images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_map_is_the_default_set_for_its_node_selector() {
    let api = two_pools();
    let mut everywhere = training(json!({}));
    everywhere["spec"]["images"] = json!([{"name": "tools", "image": "quay.io/ml/tools:1"}]);
    api.apply(SETS, everywhere);
    let raw = [("IMAGES", "a=alpine"), ("NODE_SELECTOR", "{\"pool\": \"gpu\"}")];
    let config =
        kip_coordinator::config::validate(&raw.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap();
    let (kip, _door) = Coordinator::start(&api, config).await;
    kip.follow(Limits::default());
    let mut gpu = kip.connect("node-0").await;
    let mut cpu = kip.connect("node-1").await;
    assert_eq!(gpu.next().await.1, ["a=alpine", "tools=quay.io/ml/tools:1"]);
    assert_eq!(cpu.next().await.1, ["tools=quay.io/ml/tools:1"]);
}

/// A set's tags are resolved by the coordinator on a real registry (one HEAD per tag for the
/// cluster), their digests go out to the nodes the set selects, and the set's `refreshInterval`
/// is how soon a moved tag is seen — and how often those nodes refresh on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_s_tags_are_resolved_by_the_coordinator_at_the_set_s_interval() {
    let Some(registry) = common::registry::Registry::start().await else { return };
    let first = registry.push("ml/model", "1", "weights v1").await;
    let api = FakeApi::new();
    api.add_nodes(1, std::time::SystemTime::now() - Duration::from_secs(3600));
    let model = format!("{}/ml/model:1", registry.host);
    let mut set = training(json!({}));
    set["spec"]["images"] = json!([{"name": "model", "image": model}]);
    set["spec"]["refreshInterval"] = json!("2s");
    api.apply(SETS, set);
    // The default list by digest only: nothing else for the resolver to ask (no network here).
    let pinned = "base=busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let (kip, _door) = Coordinator::start(&api, config_with(pinned)).await;
    kip.follow(Limits::default());
    kip.resolve_tags(&registry.host);
    let mut agent = kip.connect("node-0").await;
    let digest_of_model = |u: &v1::ImageListUpdate| {
        u.images.iter().find(|i| i.name == "model").map(|i| i.digest.clone()).unwrap_or_default()
    };
    let mut update = agent.next_update().await;
    while digest_of_model(&update) != first {
        update = agent.next_update().await;
    }
    assert_eq!(update.policy.as_ref().unwrap().refresh_interval_seconds, 2, "the set's interval reaches its nodes");
    // The tag moves: seen within the set's interval (the ConfigMap's is an hour).
    let moved = registry.push("ml/model", "1", "weights v2").await;
    assert_ne!(moved, first);
    let seen = tokio::time::Instant::now();
    while digest_of_model(&update) != moved {
        update = agent.next_update().await;
    }
    assert!(seen.elapsed() < Duration::from_secs(10), "the moved tag took {:?}", seen.elapsed());
    assert!(matches!(
        kip.state.resolution().get(&model),
        Some(kip_coordinator::resolve::Resolved::Digest(d)) if *d == moved
    ));
}

/// A set's pull secrets: the leader copies each named Secret of the set's namespace into the
/// coordinator's own Secret (key `<namespace>.<secret>`), the agent's stream names the keys with
/// the set's images (never a credential), and the agent finds the credentials in the copy as the
/// kubelet mounts it. A named Secret that is missing is said in the set's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_s_pull_secret_is_copied_for_the_agents_and_named_with_its_images() {
    use base64::Engine as _;
    let api = FakeApi::new();
    api.add_nodes(1, std::time::SystemTime::now() - Duration::from_secs(3600));
    let auth = pull_secret(&api, "regcred", "quay.io", "robot", "s3cr3t-pa55");
    let mut set = training(json!({}));
    set["spec"]["imagePullSecrets"] = json!([{"name": "regcred"}, {"name": "missing"}]);
    api.apply(SETS, set);
    let (kip, _door) = Coordinator::start(&api, config_with("a=alpine")).await;
    kip.follow(Limits::default());
    kip.copy_pull_secrets();
    let mut agent = kip.connect("node-0").await;
    let update = agent.next_update().await;
    let keys_of = |name: &str| update.images.iter().find(|i| i.name == name).unwrap().pull_secrets.clone();
    assert_eq!(keys_of("trainer"), ["ml.regcred", "ml.missing"]);
    assert!(keys_of("a").is_empty(), "the ConfigMap's images carry none");
    assert!(!format!("{update:?}").contains(&auth), "no credential on kip's API");
    let copied = || api.object("/api/v1/namespaces/kip/secrets", "kip-set-pull-secrets");
    until("the copy written", Duration::from_secs(10), || {
        copied().is_some_and(|s| s["data"]["ml.regcred"].is_string())
    })
    .await;
    // The copy as the kubelet mounts it: one file per key.
    let mounted = tempfile::tempdir().unwrap();
    for (key, value) in copied().unwrap()["data"].as_object().unwrap() {
        let bytes = base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap()).unwrap();
        std::fs::write(mounted.path().join(key), bytes).unwrap();
    }
    let secrets = kip_agent::agent::PullSecrets { dir: None, sets_dir: Some(mounted.path().to_path_buf()) };
    let list = kip::images::ImageList::parse("trainer=quay.io/ml/train:1").unwrap();
    let creds = kip_agent::agent::credentials_for(&secrets, &keys_of("trainer"), &list.entries()[0]).unwrap().unwrap();
    assert_eq!((creds.username.as_str(), creds.password.expose()), ("robot", "s3cr3t-pa55"));
    // The missing one, in the set's status.
    let degraded = || {
        let status = api.object(SETS, "training").and_then(|s| s.get("status").cloned()).unwrap_or_default();
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Degraded")
            .map(|c| (c["reason"].as_str().unwrap_or_default().to_string(), c["message"].to_string()))
    };
    until("the missing pull secret in the status", Duration::from_secs(15), || {
        degraded().is_some_and(|(reason, message)| {
            reason == "PullSecretProblem"
                && message.contains("imagePullSecrets missing: no such Secret in namespace ml")
        })
    })
    .await;
    assert!(!degraded().unwrap().1.contains("s3cr3t"));
}

/// A node without an agent gets each set that selects it as a fallback DaemonSet of its own
/// (the set's images, on the set's nodes without an agent); the set's status counts the node
/// once those pods are Ready; a set deleted takes its DaemonSet along, and a DaemonSet kip did
/// not make is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_gets_a_fallback_daemonset_of_its_own_for_nodes_without_an_agent() {
    const DAEMONSETS: &str = "/apis/apps/v1/namespaces/k8s-image-puller/daemonsets";
    const PODS: &str = "/api/v1/namespaces/k8s-image-puller/pods";
    let api = FakeApi::new();
    api.add_nodes(1, std::time::SystemTime::now() - Duration::from_secs(3600));
    api.label_node("node-0", json!({"pool": "gpu"}));
    api.apply(SETS, training(json!({"matchLabels": {"pool": "gpu"}})));
    api.apply(
        DAEMONSETS,
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "someone-elses", "namespace": "k8s-image-puller",
            "labels": {"kip.eclipse.dev/image-set": "x", "kip.eclipse.dev/fallback-of": "kubernetes-image-puller"}}}),
    );
    let (kip, _door) = Coordinator::start(&api, config_with("a=alpine")).await;
    kip.follow(Limits::default());
    let settings = kip_coordinator::controller::Settings {
        set_fallbacks: true,
        ..kip_coordinator::controller::Settings::new(Duration::from_secs(3600))
    };
    tokio::spawn(kip_coordinator::controller::start(
        kip.client.clone(),
        kip.state.clone(),
        kip.nodes.clone(),
        None,
        settings,
        kip.shutdown.clone(),
    ));
    let set_daemonset = || {
        let all = api.objects(DAEMONSETS);
        all.into_iter()
            .find(|d| d["metadata"]["name"].as_str().unwrap_or_default().starts_with("kubernetes-image-puller-set-"))
    };
    until("the set's fallback DaemonSet", Duration::from_secs(15), || set_daemonset().is_some()).await;
    let ds = set_daemonset().unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"].as_array().unwrap().iter().map(|c| c["image"].clone()).collect::<Vec<_>>(),
        [json!("quay.io/ml/train:1"), json!("busybox")]
    );
    let terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .to_string();
    assert!(terms.contains(r#""key":"kip.eclipse.dev/agent","operator":"In","values":["none"]"#), "{terms}");
    assert!(terms.contains(r#""key":"pool","operator":"In","values":["gpu"]"#), "{terms}");
    assert_eq!(ds["metadata"]["annotations"]["kip.eclipse.dev/image-set"], "ml/training");
    // The set's pod runs Ready on the node (which has no agent): the set is Ready there.
    let labels = ds["spec"]["template"]["metadata"]["labels"].clone();
    api.apply(
        PODS,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "set-pod", "namespace": "k8s-image-puller", "labels": labels},
            "spec": {"nodeName": "node-0", "containers": pod["containers"]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    until("the set Ready through its fallback", Duration::from_secs(15), || {
        api.object(SETS, "training").is_some_and(|s| s["status"]["ready"] == "1/1")
    })
    .await;
    // The set goes, and its DaemonSet with it; the other one stays.
    api.remove(SETS, "training");
    until("the set's DaemonSet deleted", Duration::from_secs(15), || set_daemonset().is_none()).await;
    assert!(api.object(DAEMONSETS, "someone-elses").is_some(), "a DaemonSet kip did not make stays");
}

/// A set's private tag is resolved by the coordinator with the set's own pull secret (read by
/// the leader from the set's namespace) on a real registry that wants a login; the mounted pull
/// secrets have none for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_s_private_tag_is_resolved_with_the_set_s_pull_secret() {
    let Some(registry) = common::registry::Registry::start_private("team-robot", "t3am-pa55").await else { return };
    let digest = registry.push("ml/private", "1", "private weights").await;
    let api = FakeApi::new();
    api.add_nodes(1, std::time::SystemTime::now() - Duration::from_secs(3600));
    pull_secret(&api, "team", &registry.host, "team-robot", "t3am-pa55");
    let private = format!("{}/ml/private:1", registry.host);
    let mut set = training(json!({}));
    set["spec"]["images"] = json!([{"name": "model", "image": private}]);
    set["spec"]["imagePullSecrets"] = json!([{"name": "team"}]);
    api.apply(SETS, set);
    let pinned = "base=busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let (kip, _door) = Coordinator::start(&api, config_with(pinned)).await;
    kip.follow(Limits::default());
    kip.copy_pull_secrets();
    kip.resolve_tags(&registry.host);
    let mut agent = kip.connect("node-0").await;
    let mut update = agent.next_update().await;
    let digest_of = |u: &v1::ImageListUpdate| u.images.iter().find(|i| i.name == "model").map(|i| i.digest.clone());
    // The first round may run before the secret was read (unauthorized); the set's own refresh
    // interval is an hour, so the secret's arrival must bring the tag's next HEAD.
    while digest_of(&update).as_deref() != Some(digest.as_str()) {
        update = agent.next_update().await;
    }
    let resolved = kip.state.resolution();
    assert!(matches!(resolved.get(&private), Some(kip_coordinator::resolve::Resolved::Digest(d)) if *d == digest));
}
