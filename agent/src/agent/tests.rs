//! The agent's loop driven against the fake runtime with paused time: every wait below
//! advances tokio's clock instantly once the agent is idle, so intervals of minutes take no time
//! and every assertion is about what happened, never about how fast.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use kip::images::ImageList;
use kip::v1;

use super::{Agent, ListSource};
use crate::follow::ListUpdate;
use crate::http::Readiness;
use crate::metrics::{ImageLabels, Metrics};
use crate::reconcile::Policy;
use crate::runtime::fake::{FakeRuntime, Pin};

const CHECK: Duration = Duration::from_secs(10);
const REFRESH: Duration = Duration::from_secs(300);

const A: &str = "registry.example/r/a:1";
const B: &str = "registry.example/r/b:1";
const C: &str = "registry.example/r/c:1";
const D: &str = "registry.example/r/d@sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";

fn policy() -> Policy {
    Policy {
        max_parallel_pulls: 3,
        pull_timeout: Duration::from_secs(60),
        check_interval: CHECK,
        refresh_interval: REFRESH,
        retry_min: Duration::from_secs(2),
        retry_max: Duration::from_secs(60),
    }
}

fn list(images: &[(&str, &str)]) -> ImageList {
    ImageList::from_pairs(images.iter().copied()).unwrap()
}

fn update(generation: u64, images: &[(&str, &str)], release: v1::Release) -> ListUpdate {
    ListUpdate {
        generation,
        list: list(images),
        digests: Default::default(),
        pull_secrets: Default::default(),
        policy: v1::PullPolicy::default(),
        release,
    }
}

/// An agent on the fake runtime following a coordinator-like list channel.
struct Node {
    rt: FakeRuntime,
    metrics: Arc<Metrics>,
    ready: Readiness,
    lists: watch::Sender<Option<ListUpdate>>,
    reports: watch::Receiver<v1::NodeReport>,
    generation: u64,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    fn start(rt: FakeRuntime, images: &[(&str, &str)]) -> Self {
        Self::start_with_state(rt, images, None)
    }

    fn start_with_state(rt: FakeRuntime, images: &[(&str, &str)], state_file: Option<std::path::PathBuf>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let ready = Readiness::starting();
        let first = update(1, images, v1::Release::None);
        let (lists, rx) = watch::channel(Some(first));
        let (report_tx, reports) = watch::channel(v1::NodeReport::default());
        let mut agent = Agent::new(rt.clone(), ListSource::Coordinator(rx), policy(), metrics.clone(), ready.clone());
        agent.reports = Some(("node-1".into(), report_tx));
        agent.state_file = state_file;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        Self { rt, metrics, ready, lists, reports, generation: 1, shutdown, task }
    }

    fn publish(&mut self, images: &[(&str, &str)]) {
        self.generation += 1;
        self.lists.send_replace(Some(update(self.generation, images, v1::Release::None)));
    }

    /// What the coordinator sends when kip is uninstalled.
    fn release(&mut self, kind: v1::Release) {
        self.generation += 1;
        self.lists.send_replace(Some(update(self.generation, &[], kind)));
    }

    fn repulls(&self, name: &str, image: &str) -> u64 {
        self.metrics.image_repulls.get_or_create(&ImageLabels { name: name.into(), image: image.into() }).get()
    }

    fn report_of(&self, name: &str) -> v1::ImageState {
        let report = self.reports.borrow().clone();
        report.images.into_iter().find(|i| i.name == name).unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn caches_and_pins_the_list_then_reads_the_runtime_once_per_check() {
    let node = Node::start(FakeRuntime::default(), &[("a", A), ("b", B)]);
    sleep(Duration::from_millis(1)).await;
    for r in [A, B] {
        assert_eq!(node.rt.pin_of(r), Some(Pin::Kip), "{r}");
        assert_eq!(node.rt.pulls_of(r).len(), 1, "{r}");
    }
    assert_eq!(node.ready.get(), None, "ready once everything is cached and pinned");
    assert_eq!((node.metrics.images_cached.get(), node.metrics.images_pinned.get()), (2, 2));
    let snapshots = node.rt.state().snapshots;
    let statuses = node.rt.state().status_calls;
    sleep(CHECK * 3).await; // three more checks
    assert_eq!(node.rt.state().snapshots - snapshots, 3, "one listing per check");
    assert_eq!(node.rt.state().status_calls - statuses, 0, "no ImageStatus while the listing shows every image");
    assert_eq!(node.rt.state().pulls.len(), 2, "nothing pulled again while present");
    let report = node.report_of("a");
    assert!(report.cached && report.pinned && report.digest.starts_with("sha256:"), "{report:?}");
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_image_the_listing_spells_otherwise_is_asked_about_and_not_pulled_again() {
    let rt = FakeRuntime::default();
    rt.add(D, Pin::None);
    rt.state().unlisted = vec![D.into()];
    let node = Node::start(rt, &[("a", A), ("d", D)]);
    sleep(Duration::from_millis(1)).await;
    let statuses = node.rt.state().status_calls;
    sleep(CHECK * 2).await;
    assert_eq!(node.rt.state().status_calls - statuses, 2, "one ImageStatus per check, for the unlisted image only");
    assert!(node.rt.pulls_of(D).is_empty(), "present (by digest), so never pulled");
    assert_eq!(node.rt.pin_of(D), Some(Pin::Kip), "pinned from what ImageStatus showed");
    let report = node.report_of("d");
    assert!(report.cached && report.pinned, "{report:?}");
    assert_eq!(node.ready.get(), None);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_vanished_image_is_pulled_again_pinned_and_counted() {
    let node = Node::start(FakeRuntime::default(), &[("a", A)]);
    sleep(Duration::from_millis(1)).await;
    node.rt.delete(A);
    sleep(CHECK).await;
    assert_eq!(node.rt.pulls_of(A).len(), 2);
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip));
    assert_eq!(node.repulls("a", A), 1);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_pulls_are_retried_with_growing_delays_and_the_error_reported() {
    let rt = FakeRuntime::default();
    rt.fail_next_pulls(A, 4);
    let node = Node::start(rt, &[("a", A)]);
    sleep(Duration::from_millis(1)).await;
    let report = node.report_of("a");
    assert!(!report.cached && report.last_error.contains("registry said no"), "{report:?}");
    assert!(node.ready.get().is_some_and(|r| r.contains("not cached yet: a")));
    sleep(Duration::from_secs(120)).await;
    let pulls = node.rt.pulls_of(A);
    assert_eq!(pulls.len(), 5, "four failures, then success");
    let gaps: Vec<Duration> = pulls.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        // Doubling from 2 s with jitter: at least 2 s × 2^i, capped at the maximum.
        let floor = (Duration::from_secs(2) * 2u32.pow(i as u32)).min(Duration::from_secs(60));
        assert!(*gap >= floor, "gap {i} = {gap:?} < {floor:?} (gaps {gaps:?})");
    }
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip));
    assert!(node.report_of("a").last_error.is_empty(), "a success clears the error");
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_pull_task_that_panics_is_retried_and_does_not_hold_the_image_in_flight() {
    let rt = FakeRuntime::default();
    rt.panic_next_pulls(A, 1);
    let node = Node::start(rt, &[("a", A), ("b", B)]);
    sleep(Duration::from_millis(1)).await;
    let report = node.report_of("a");
    assert!(!report.cached && report.last_error.contains("panicked"), "{report:?}");
    sleep(CHECK).await;
    assert_eq!(node.rt.pulls_of(A).len(), 2, "pulled again after the backoff");
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip));
    assert!(node.report_of("a").last_error.is_empty());
    assert_eq!(node.rt.pin_of(B), Some(Pin::Kip), "the other image was never held up");
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn tags_are_pulled_again_each_refresh_interval_digests_never() {
    let node = Node::start(FakeRuntime::default(), &[("a", A), ("d", D)]);
    sleep(Duration::from_millis(1)).await;
    node.rt.move_tag(A, &format!("sha256:{}", "e".repeat(64)));
    sleep(REFRESH + CHECK).await;
    assert_eq!(node.rt.pulls_of(A).len(), 2, "the tag was pulled again");
    assert_eq!(node.rt.pulls_of(D).len(), 1, "the digest was not");
    assert_eq!(node.report_of("a").digest, format!("sha256:{}", "e".repeat(64)), "the moved tag's new digest");
    assert_eq!(node.repulls("a", A), 0, "a refresh is not a re-pull");
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_image_that_leaves_the_list_loses_kip_s_pin_only() {
    let rt = FakeRuntime::default();
    rt.add(C, Pin::Other); // an admin's pin on an image kip also lists
    let mut node = Node::start(rt, &[("a", A), ("b", B), ("c", C)]);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(node.rt.pin_of(C), Some(Pin::Other), "kip does not claim someone else's pin");
    node.publish(&[("a", A)]);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(node.rt.pin_of(B), Some(Pin::None), "kip's pin is gone at once");
    assert_eq!(node.rt.pin_of(C), Some(Pin::Other), "the admin's pin stays");
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip));
    assert!(node.rt.state().removed.is_empty(), "unlisted images stay cached without --remove-unlisted");
    assert_eq!(node.reports.borrow().generation, 2);
    assert_eq!(node.reports.borrow().images.len(), 1);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_runtime_going_away_is_reported_and_survived() {
    let node = Node::start(FakeRuntime::default(), &[("a", A)]);
    sleep(Duration::from_millis(1)).await;
    node.rt.state().down = true;
    node.rt.delete(A); // it comes back empty, as after a reinstall
    sleep(CHECK).await;
    assert_eq!(node.metrics.cri_up.get(), 0);
    assert!(node.ready.get().is_some_and(|r| r.starts_with("runtime not answering")), "{:?}", node.ready.get());
    assert!(!node.reports.borrow().runtime.clone().unwrap().available);
    node.rt.state().down = false;
    sleep(Duration::from_secs(60)).await; // retried within the backoff's cap (30 s)
    assert_eq!(node.metrics.cri_up.get(), 1);
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip), "pulled and pinned again");
    assert_eq!(node.ready.get(), None);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_list_from_the_coordinator_applies_before_the_next_check() {
    let mut node = Node::start(FakeRuntime::default(), &[("a", A)]);
    sleep(Duration::from_millis(1)).await;
    let published = Instant::now();
    node.publish(&[("a", A), ("c", C)]);
    sleep(Duration::from_millis(1)).await;
    let pulls = node.rt.pulls_of(C);
    assert_eq!(pulls.len(), 1);
    assert!(pulls[0] - published < CHECK, "not left for the next check");
    assert_eq!(node.rt.pin_of(C), Some(Pin::Kip));
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_runtime_that_refuses_pins_keeps_images_cached_and_says_why() {
    let rt = FakeRuntime::default();
    rt.state().pin_problem = Some("writing kip's drop-in /etc/crio/crio.conf.d: read-only file system".into());
    let node = Node::start(rt, &[("a", A)]);
    sleep(Duration::from_millis(1)).await;
    sleep(CHECK * 3).await;
    assert_eq!(node.rt.pulls_of(A).len(), 1, "a refused pin is no reason to pull again");
    assert_eq!(node.rt.state().pin_calls, 4, "the pin is tried once per check (4 checks), not on every wake-up");
    let report = node.report_of("a");
    assert!(report.cached && !report.pinned);
    assert!(node.reports.borrow().runtime.clone().unwrap().pin_error.contains("read-only file system"));
    assert_eq!(node.metrics.pinning_available.get(), 0);
    assert!(node.ready.get().is_some_and(|r| r.starts_with("pinning does not work: writing kip's drop-in")));
    node.rt.state().pin_problem = None;
    sleep(CHECK).await;
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip), "pinned at the next check once it works");
    assert_eq!((node.metrics.pinning_available.get(), node.ready.get()), (1, None));
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pins_are_never_released_while_a_pull_is_pinning_its_records() {
    let rt = FakeRuntime::default();
    rt.state().pull_time = CHECK * 3; // three checks come and go during each pull
    let mut node = Node::start(rt, &[("a", A)]);
    sleep(CHECK * 4).await;
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip));
    node.publish(&[("a", A), ("c", C)]);
    sleep(CHECK * 4).await;
    assert_eq!(node.rt.pin_of(C), Some(Pin::Kip));
    node.publish(&[("c", C)]);
    sleep(CHECK).await;
    assert_eq!(node.rt.pin_of(A), Some(Pin::None), "unlisted: released at the next check without a pull");
    assert_eq!(node.rt.state().syncs_during_pulls, 0, "no unpinning while a pull was in flight");
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_release_removes_kip_s_pins_and_state_file_keeps_the_images_and_others_pins() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join(crate::follow::STATE_FILE);
    std::fs::write(&state_file, "{}").unwrap();
    let rt = FakeRuntime::default();
    rt.add(C, Pin::Other);
    let mut node = Node::start_with_state(rt, &[("a", A), ("b", B), ("c", C)], Some(state_file.clone()));
    sleep(Duration::from_millis(1)).await;
    assert_eq!((node.rt.pin_of(A), node.rt.pin_of(B)), (Some(Pin::Kip), Some(Pin::Kip)));
    assert!(!node.reports.borrow().released);
    node.release(v1::Release::Unpin);
    sleep(Duration::from_millis(1)).await;
    assert_eq!((node.rt.pin_of(A), node.rt.pin_of(B)), (Some(Pin::None), Some(Pin::None)), "kip's pins are gone");
    assert_eq!(node.rt.pin_of(C), Some(Pin::Other), "the admin's pin stays");
    assert!(node.rt.state().removed.is_empty(), "the images stay cached for the runtime's GC to judge");
    assert!(!state_file.exists(), "the state file is gone");
    assert_eq!(node.rt.state().releases, 1);
    let report = node.reports.borrow().clone();
    assert!(report.released && report.release_error.is_empty() && report.images.is_empty(), "{report:?}");
    // Later checks neither pull nor pin again, nor repeat the release.
    let pulls = node.rt.state().pulls.len();
    sleep(CHECK * 3).await;
    let (pulls_now, releases) = {
        let state = node.rt.state();
        (state.pulls.len(), state.releases)
    };
    assert_eq!((pulls_now, releases), (pulls, 1));
    assert_eq!(node.rt.pin_of(A), Some(Pin::None));
    node.stop().await;
}

/// An admin tagged the content of a listed image under a name of their own (`ctr images tag`):
/// when kip lets go of the image (a release with `remove`, or `--remove-unlisted`), that image
/// stays with the admin's name; the image only kip named is deleted.
#[tokio::test(start_paused = true)]
async fn removal_never_deletes_an_image_that_carries_a_name_kip_does_not_own() {
    let rt = FakeRuntime::default();
    rt.alias(A, "docker.io/admin/keep:1");
    let mut node = Node::start(rt, &[("a", A), ("b", B)]);
    sleep(Duration::from_millis(1)).await;
    assert_eq!((node.rt.pin_of(A), node.rt.pin_of(B)), (Some(Pin::Kip), Some(Pin::Kip)));
    node.release(v1::Release::Remove);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(node.rt.state().removed, vec![B.to_string()], "only the image nobody else names is deleted");
    assert_eq!(node.rt.pin_of(A), Some(Pin::None), "kip's pin went, the image and the admin's name stay");
    assert!(node.reports.borrow().released);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_release_with_remove_deletes_what_kip_pinned_only() {
    let rt = FakeRuntime::default();
    rt.add(C, Pin::Other);
    let mut node = Node::start(rt, &[("a", A), ("c", C)]);
    sleep(Duration::from_millis(1)).await;
    node.release(v1::Release::Remove);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(node.rt.pin_of(A), None, "removed");
    assert_eq!(node.rt.state().removed, vec![A.to_string()]);
    assert_eq!(node.rt.pin_of(C), Some(Pin::Other), "an image kip did not pin is never deleted");
    assert!(node.reports.borrow().released);
    node.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_release_stops_pulls_in_flight_and_a_failed_release_is_reported_and_retried() {
    let rt = FakeRuntime::default();
    rt.state().pull_time = CHECK * 3;
    let mut node = Node::start(rt, &[("a", A)]);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(node.rt.pin_of(A), None, "still pulling");
    node.rt.state().down = true;
    node.release(v1::Release::Unpin);
    sleep(Duration::from_millis(1)).await;
    let report = node.reports.borrow().clone();
    assert!(!report.released, "{report:?}");
    node.rt.state().down = false;
    sleep(CHECK * 4).await;
    assert!(node.reports.borrow().released, "retried once the runtime answers");
    assert_eq!(node.rt.pin_of(A), None, "the pull in flight was stopped: nothing pinned after the release");
    // The coordinator takes the release back (an aborted uninstall, restarted): work resumes.
    node.publish(&[("a", A)]);
    sleep(CHECK * 4).await;
    assert_eq!(node.rt.pin_of(A), Some(Pin::Kip));
    assert!(!node.reports.borrow().released);
    node.stop().await;
}

/// A wedged runtime (the socket accepts connections and never answers a byte), in real time:
/// the check's ListImages ends at the runtime deadline, and the node says "not answering"
/// (`kip_cri_up` 0, not ready, reported as transient) instead of hanging ready forever.
#[tokio::test]
async fn a_runtime_that_never_answers_makes_the_agent_not_ready_and_is_reported_as_not_answering() {
    use crate::cri::{CriClient, RuntimeInfo};
    use crate::runtime::CriOnly;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("wedged.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            open.push(conn); // kept open, never read from nor written to
        }
    });
    let cri = CriClient::new(&socket).with_call_timeout(Duration::from_millis(200));
    let rt = CriOnly::new(cri, RuntimeInfo { name: "wedged".into(), version: "1.0.0".into() });
    let metrics = Arc::new(Metrics::new());
    metrics.cri_up.set(1);
    let ready = Readiness::starting();
    ready.set(None);
    let (_lists, rx) = watch::channel(Some(update(1, &[("a", A)], v1::Release::None)));
    let (report_tx, mut reports) = watch::channel(v1::NodeReport::default());
    let mut agent = Agent::new(rt, ListSource::Coordinator(rx), policy(), metrics.clone(), ready.clone());
    agent.reports = Some(("node-1".into(), report_tx));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(agent.run(shutdown.clone()));

    let report = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            reports.changed().await.unwrap();
            let r = reports.borrow_and_update().clone();
            if r.runtime.as_ref().is_some_and(|rt| !rt.available) {
                return r;
            }
        }
    })
    .await
    .expect("a wedged runtime is reported within the deadline, not waited on forever");
    let runtime = report.runtime.unwrap();
    assert!(runtime.not_answering, "a runtime that does not answer is the transient kind: {runtime:?}");
    assert!(runtime.error.contains("timed out after 200ms"), "{}", runtime.error);
    assert_eq!(metrics.cri_up.get(), 0);
    let reason = ready.get().unwrap_or_default();
    assert!(reason.starts_with("runtime not answering on ") && reason.contains("wedged.sock"), "{reason}");
    tokio::time::timeout(Duration::from_secs(5), async {
        shutdown.cancel();
        task.await.unwrap();
    })
    .await
    .expect("the agent stops while the runtime stays wedged");
    held.abort();
}

/// Credentials: the image's set pull secrets first (one not mounted yet is passed over, as the
/// kubelet does), then the agent's own mounted pull secrets; a key that is no plain
/// `<namespace>.<secret>` file name is refused, naming it, and never read.
#[test]
fn an_image_s_set_pull_secrets_come_before_the_mounted_ones() {
    use base64::Engine as _;
    let config = |user: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:pw"));
        format!(r#"{{"auths":{{"quay.io":{{"auth":"{auth}"}}}}}}"#)
    };
    let own = tempfile::tempdir().unwrap();
    std::fs::create_dir(own.path().join("regcred")).unwrap();
    std::fs::write(own.path().join("regcred/.dockerconfigjson"), config("node-wide")).unwrap();
    let sets = tempfile::tempdir().unwrap();
    std::fs::write(sets.path().join("ml.team"), config("team")).unwrap();
    std::fs::write(sets.path().join("ml.elsewhere"), r#"{"auths":{"ghcr.io":{"auth":"eDp5"}}}"#).unwrap();
    let secrets = super::PullSecrets { dir: Some(own.path().into()), sets_dir: Some(sets.path().into()) };
    let entry = list(&[("t", "quay.io/ml/train:1")]).entries()[0].clone();
    let user = |keys: &[&str]| {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        super::credentials_for(&secrets, &keys, &entry).map(|c| c.map(|c| c.username))
    };
    assert_eq!(user(&["ml.team"]).unwrap().as_deref(), Some("team"));
    assert_eq!(user(&["ml.elsewhere", "ml.team"]).unwrap().as_deref(), Some("team"), "another registry's: passed over");
    assert_eq!(user(&["ml.not-mounted-yet"]).unwrap().as_deref(), Some("node-wide"));
    assert_eq!(user(&[]).unwrap().as_deref(), Some("node-wide"));
    let e = user(&["../regcred"]).unwrap_err().to_string();
    assert!(e.contains("pull secret `../regcred`") && e.contains("not a `<namespace>.<secret>` key"), "{e}");
    assert!(user(&["ml./etc"]).is_err() && user(&["Ml.x"]).is_err() && user(&["ml.a..b"]).is_err());
}

proptest::proptest! {
    /// Any key the coordinator might send: accepted only as one plain file name (no separator,
    /// no `..`, no hidden file), and looking it up never panics.
    #[test]
    fn a_set_secret_key_is_never_a_path(key in "\\PC{0,40}|[a-z0-9./-]{0,20}") {
        if super::is_set_secret_key(&key) {
            proptest::prop_assert!(!key.contains('/') && !key.contains("..") && !key.starts_with('.'), "{key}");
            proptest::prop_assert_eq!(std::path::Path::new(&key).components().count(), 1);
        }
        let secrets = super::PullSecrets { dir: None, sets_dir: Some("/nonexistent-kip-dir".into()) };
        let entry = list(&[("t", "quay.io/ml/train:1")]).entries()[0].clone();
        let _ = super::credentials_for(&secrets, &[key], &entry);
    }
}
