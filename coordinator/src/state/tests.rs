//! The shared state's decisions, on reports and lists made up by each test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kip::v1;

use super::*;
use crate::config::KipConfig;
use crate::metrics::{ImageLabels, Metrics};
use crate::resolve::Resolved;

fn config(images: &str) -> KipConfig {
    crate::config::validate(&[("IMAGES".to_string(), images.to_string())].into_iter().collect()).unwrap()
}

use crate::fixtures::report;

fn with_release(images: &str, release: &str) -> KipConfig {
    let raw = [("IMAGES", images), ("KIP_RELEASE", release)].into_iter().map(|(k, v)| (k.to_string(), v.to_string()));
    crate::config::validate(&raw.collect()).unwrap()
}

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

#[test]
fn digests_go_out_with_their_images_and_only_a_change_is_a_new_generation() {
    let metrics = Arc::new(Metrics::new());
    let hub = State::new(config("a=busybox;b=quay.io/x/b:1"), metrics.clone());
    let busybox = "docker.io/library/busybox:latest".to_string();
    let answers = |a: Resolved, b: Resolved| BTreeMap::from([(busybox.clone(), a), ("quay.io/x/b:1".to_string(), b)]);
    hub.set_resolution(answers(Resolved::Digest(D1.into()), Resolved::Unresolved("registry down".into())));
    let update = hub.current().to_update();
    assert_eq!(update.generation, 2);
    assert_eq!((update.images[0].digest.as_str(), update.images[1].digest.as_str()), (D1, ""));
    // The same answers again (every interval): nothing new for the agents.
    hub.set_resolution(answers(Resolved::Digest(D1.into()), Resolved::Unresolved("registry down".into())));
    assert_eq!(hub.current().generation, 2);
    let text = metrics.render();
    assert!(text.contains("kip_image_resolved{name=\"a\",image=\"busybox\"} 1"), "{text}");
    assert!(text.contains("kip_image_resolved{name=\"b\",image=\"quay.io/x/b:1\"} 0"), "{text}");
    let status = hub.status_json();
    assert_eq!(status["images"][0]["resolved_by"], "coordinator");
    assert_eq!(status["images"][1]["why"], "registry down");
    // The tag moved.
    hub.set_resolution(answers(Resolved::Digest(D2.into()), Resolved::Unresolved("registry down".into())));
    assert_eq!((hub.current().generation, hub.current().to_update().images[0].digest.clone()), (3, D2.to_string()));
}

#[test]
fn per_image_counts_follow_each_report_and_a_new_list_recounts() {
    let hub = State::new(config("a=busybox;b=nginx"), Arc::new(Metrics::new()));
    let gauge = |name: &str, image: &str| {
        let l = ImageLabels { name: name.into(), image: image.into() };
        (hub.metrics.image_nodes_cached.get_or_create(&l).get(), hub.metrics.image_nodes_pinned.get_or_create(&l).get())
    };
    hub.record_report(report("n1", &[("a", "busybox", true, true), ("b", "nginx", true, false)]));
    hub.record_report(report("n2", &[("a", "busybox", true, false), ("x", "unlisted", true, true)]));
    assert_eq!((gauge("a", "busybox"), gauge("b", "nginx")), ((2, 1), (1, 0)));
    // n1's next report replaces its last one: only the difference counts.
    hub.record_report(report("n1", &[("a", "busybox", false, false), ("b", "nginx", true, true)]));
    assert_eq!((gauge("a", "busybox"), gauge("b", "nginx")), ((1, 0), (1, 1)));
    assert_eq!(hub.metrics.nodes_reporting.get(), 2);
    // A new list: counted again from the reports.
    hub.publish(config("b=nginx;x=unlisted"));
    assert_eq!((gauge("b", "nginx"), gauge("x", "unlisted")), ((1, 1), (1, 1)));
    let counts: Vec<(String, i64, i64)> =
        hub.image_counts(&hub.current()).into_iter().map(|(l, c, p)| (l.name, c, p)).collect();
    assert_eq!(counts, vec![("b".to_string(), 1, 1), ("x".to_string(), 1, 1)], "/status agrees with the gauges");
}

#[test]
fn a_list_change_keeps_the_digests_of_tags_still_listed() {
    let hub = State::new(config("a=busybox;b=quay.io/x/b:1"), Arc::new(Metrics::new()));
    hub.set_resolution(BTreeMap::from([
        ("docker.io/library/busybox:latest".to_string(), Resolved::Digest(D1.into())),
        ("quay.io/x/b:1".to_string(), Resolved::Digest(D2.into())),
    ]));
    assert_eq!(hub.publish(config("a=busybox;c=quay.io/x/c:1")), Some(3));
    let update = hub.current().to_update();
    let digests: Vec<(&str, &str)> = update.images.iter().map(|i| (i.name.as_str(), i.digest.as_str())).collect();
    assert_eq!(digests, vec![("a", D1), ("c", "")], "b left the list; c waits for the resolver");
    // Late answers for a tag no longer listed are not published.
    hub.set_resolution(BTreeMap::from([("quay.io/x/b:1".to_string(), Resolved::Digest(D1.into()))]));
    assert_eq!(hub.current().generation, 3);
}

#[test]
fn a_release_publishes_an_empty_list_waits_for_every_node_and_is_final() {
    let hub = State::with_release_timeout(config("a=busybox"), Arc::new(Metrics::new()), Duration::from_secs(60));
    assert!(hub.release_state(SystemTime::now()).is_none());
    hub.node_stream("n1", true);
    hub.record_report(report("n1", &[("a", "busybox", true, true)]));
    assert_eq!(hub.publish(with_release("a=busybox", "unpin")), Some(2));
    let update = hub.current().to_update();
    assert_eq!((update.release(), update.images.len()), (v1::Release::Unpin, 0));
    // n2 was labelled for an agent by an earlier coordinator and never reconnected.
    hub.expect_release_from(["n2".to_string()]);
    let (progress, settled, cluster) = hub.release_state(SystemTime::now()).unwrap();
    assert_eq!(cluster, ClusterCleanup::NoApi);
    assert!(!settled);
    assert_eq!(progress.pending.get("n1").map(String::as_str), Some("waiting for its agent"));
    assert_eq!(progress.pending.get("n2").map(String::as_str), Some("its agent is not connected"));
    let mut released = report("n1", &[]);
    released.released = true;
    hub.record_report(released);
    let (progress, settled, _) = hub.release_state(SystemTime::now()).unwrap();
    assert_eq!((progress.released.len(), progress.pending.len(), settled), (1, 1, false));
    let after_timeout = SystemTime::now() + Duration::from_secs(61);
    assert!(hub.release_state(after_timeout).unwrap().1, "the wait ends with the release timeout");
    let status = hub.status_json();
    assert_eq!(status["release"]["released"], serde_json::json!(["n1"]));
    assert_eq!(status["release"]["done"], serde_json::json!(false));
    // The hook's ConfigMap goes away before the coordinator does: the release stays.
    assert_eq!(hub.publish(config("a=busybox;b=nginx")), Some(3));
    assert_eq!(hub.current().config.release, v1::Release::Unpin);
    assert!(hub.current().to_update().images.is_empty());
}

#[test]
fn a_runtime_not_answering_is_dated_from_its_first_report_and_forgotten_when_it_answers() {
    let hub = State::new(with_release("a=busybox", ""), Arc::new(Metrics::new()));
    hub.node_stream("n1", true);
    let mut slow = report("n1", &[]);
    slow.runtime = Some(v1::RuntimeState { available: false, not_answering: true, ..Default::default() });
    hub.record_report(slow.clone());
    let first = hub.liveness_of("n1").not_answering_since.expect("dated");
    std::thread::sleep(Duration::from_millis(5));
    slow.generation = 2;
    hub.record_report(slow);
    assert_eq!(hub.liveness_of("n1").not_answering_since, Some(first), "from the first such report, not the last");
    hub.record_report(report("n1", &[]));
    assert_eq!(hub.liveness_of("n1").not_answering_since, None);
    let mut absent = report("n1", &[]);
    absent.runtime = Some(v1::RuntimeState { available: false, not_answering: false, ..Default::default() });
    hub.record_report(absent);
    assert_eq!(hub.liveness_of("n1").not_answering_since, None, "no socket is not the passing kind");
}

#[test]
fn a_deleted_node_is_forgotten_unless_its_agent_is_still_connected() {
    let hub = State::new(with_release("a=busybox", "unpin"), Arc::new(Metrics::new()));
    for n in ["kept", "scaled-down", "still-connected"] {
        hub.node_stream(n, true);
        hub.record_report(report(n, &[]));
    }
    hub.node_stream("scaled-down", false);
    hub.expect_release_from(["scaled-down".to_string()]);
    hub.forget_deleted_nodes(|n| n != "kept");
    assert_eq!(hub.nodes().keys().collect::<Vec<_>>(), vec!["kept", "still-connected"]);
    assert_eq!(hub.metrics.nodes_reporting.get(), 2);
    let (progress, _, _) = hub.release_state(SystemTime::now()).unwrap();
    assert!(!progress.pending.contains_key("scaled-down"), "a release does not wait for a deleted node");
}

#[test]
fn without_an_api_a_release_is_done_once_the_agents_are_and_says_what_it_left() {
    let hub = State::new(with_release("a=busybox", "remove"), Arc::new(Metrics::new()));
    hub.node_stream("n1", true);
    let mut r = report("n1", &[]);
    r.released = true;
    hub.record_report(r);
    let status = hub.status_json();
    assert_eq!(status["release"]["done"], serde_json::json!(true));
    assert_eq!(status["release"]["kind"], serde_json::json!("remove"));
    assert!(status["release"]["incomplete"][0].as_str().unwrap().starts_with("no Kubernetes API"), "{status}");
    // With a controller attached, the cluster's side is awaited before it is done.
    let hub = State::new(with_release("a=busybox", "unpin"), Arc::new(Metrics::new()));
    hub.attach_api();
    assert_eq!(hub.status_json()["release"]["done"], serde_json::json!(false));
    hub.set_cluster_cleanup(ClusterCleanup::Done { labels_removed: 0 });
    assert_eq!(hub.status_json()["release"]["done"], serde_json::json!(true));
    assert_eq!(hub.status_json()["release"]["incomplete"], serde_json::json!([]));
}

#[test]
fn publishing_the_same_config_is_a_no_op() {
    let hub = State::new(config("a=busybox"), Arc::new(Metrics::new()));
    let mut rx = hub.subscribe();
    assert_eq!(hub.publish(config("a=busybox")), None);
    assert!(!rx.has_changed().unwrap());
    assert_eq!(hub.publish(config("a=busybox;b=nginx")), Some(2));
    assert!(rx.has_changed().unwrap());
    let update = rx.borrow_and_update().to_update();
    assert_eq!(update.generation, 2);
    assert_eq!(update.images.len(), 2);
    assert_eq!(update.policy.unwrap().refresh_interval_seconds, 3600);
    assert_eq!(hub.metrics.config_generation.get(), 2);
}

#[test]
fn reports_are_aggregated_per_image() {
    let hub = State::new(config("a=busybox;b=nginx"), Arc::new(Metrics::new()));
    hub.record_report(report("n1", &[("a", "busybox", true, true), ("b", "nginx", true, false)]));
    hub.record_report(report("n2", &[("a", "busybox", true, true), ("b", "nginx", false, false)]));
    hub.record_report(report("n2", &[("a", "busybox", true, true), ("b", "nginx", true, true)]));
    let counts: Vec<_> = hub.image_counts(&hub.current()).into_iter().map(|(l, c, p)| (l.name, c, p)).collect();
    assert_eq!(counts, vec![("a".to_string(), 2, 2), ("b".to_string(), 2, 1)]);
    let status = hub.status_json();
    assert_eq!(status["nodes"]["n2"]["images"][1]["pinned"], serde_json::json!(true));
    assert_eq!(status["images"][1]["nodes_pinned"], serde_json::json!(1));
    assert_eq!(hub.metrics.nodes_reporting.get(), 2);
}

#[test]
fn a_node_that_cannot_pin_says_why_in_the_status() {
    let hub = State::new(config("a=busybox"), Arc::new(Metrics::new()));
    let mut r = report("crio-1", &[("a", "busybox", true, false)]);
    r.runtime = Some(v1::RuntimeState {
        available: true,
        name: "cri-o".into(),
        version: "1.36.3".into(),
        pin_error: "writing kip's drop-in /etc/crio/crio.conf.d/zz-kip-pinned-images.conf: Read-only file system"
            .into(),
        ..Default::default()
    });
    hub.record_report(r);
    let status = hub.status_json();
    let runtime = &status["nodes"]["crio-1"]["runtime"];
    assert_eq!(runtime["name"], serde_json::json!("cri-o"));
    assert!(runtime["pin_error"].as_str().unwrap().contains("Read-only file system"), "{runtime}");
}

#[tokio::test(start_paused = true)]
async fn a_lease_nobody_renews_leaves_the_in_use_gauge_at_the_next_scrape() {
    let hub = State::new(config("a=busybox"), Arc::new(Metrics::new()));
    assert!(hub.leases.acquire("a", || 1, &hub.metrics).await.granted);
    assert!(hub.render_metrics().contains("kip_pull_leases_in_use 1\n"));
    // node a died: nobody asks again, the lease runs out.
    tokio::time::sleep(LEASE_TTL + Duration::from_secs(1)).await;
    let text = hub.render_metrics();
    assert!(text.contains("kip_pull_leases_in_use 0\n"), "{text}");
    assert_eq!(hub.leases.to_json(1)["held"], serde_json::json!([]));
}

/// Image sets: their tags are resolved with the default list's, each at its set's interval, and
/// their digests go out; a set gone takes its digests along.
#[test]
fn a_set_s_tags_are_watched_and_their_digests_kept_until_the_set_goes() {
    use crate::imageset::sets::{accept, Limits};
    let hub = State::new(config("a=busybox"), Arc::new(Metrics::new()));
    hub.use_image_sets();
    let set: crate::imageset::ImageSet = serde_json::from_value(serde_json::json!({
        "apiVersion": "kip.eclipse.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"namespace": "ml", "name": "training"},
        "spec": {"images": [{"name": "t", "image": "quay.io/ml/train:1"}, {"name": "b", "image": "busybox"}], "refreshInterval": "10m"},
    }))
    .unwrap();
    hub.set_accepted(accept([&set], &Limits::default(), None));
    let every: Vec<(String, u64)> = hub.watched_tags().into_iter().map(|(r, (_, d))| (r, d.as_secs())).collect();
    assert_eq!(
        every,
        [("docker.io/library/busybox:latest".to_string(), 600), ("quay.io/ml/train:1".to_string(), 600)],
        "busybox in both lists: at the set's shorter interval"
    );
    let train = "quay.io/ml/train:1".to_string();
    hub.set_resolution(BTreeMap::from([(train.clone(), Resolved::Digest(D1.into()))]));
    assert_eq!(hub.current().digests.get(&train).map(String::as_str), Some(D1), "a set's digest is published");
    assert!(matches!(hub.resolution().get(&train), Some(Resolved::Digest(_))));
    // A ConfigMap change keeps the set's digest (the set still lists the tag).
    hub.publish(config("a=busybox;c=alpine"));
    assert_eq!(hub.current().digests.get(&train).map(String::as_str), Some(D1));
    // The set goes: the next answers drop its digest.
    hub.set_accepted(accept(std::iter::empty(), &Limits::default(), None));
    hub.set_resolution(BTreeMap::from([("docker.io/library/busybox:latest".to_string(), Resolved::Digest(D2.into()))]));
    assert!(!hub.current().digests.contains_key(&train), "{:?}", hub.current().digests);
    assert!(!hub.resolution().contains_key(&train));
}
