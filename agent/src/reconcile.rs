//! Pure decisions: given what the runtime showed and what kip remembers of each image,
//! what to pull, what to pin and what to unpin, and when to try again after a failure.
//! No sockets here, so every rule is tested with plain values and a fake clock.

use std::collections::{BTreeMap, HashSet};

/// The digest the coordinator resolved each listed tag to, by normalized reference (absent:
/// not resolved, or no coordinator).
pub type Digests = BTreeMap<String, String>;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

use kip::images::{ImageEntry, ImageList};

use crate::cri::ImageInfo;
use crate::runtime::Keep;

/// How the agent paces its work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub max_parallel_pulls: usize,
    pub pull_timeout: Duration,
    pub check_interval: Duration,
    pub refresh_interval: Duration,
    /// First and largest delay between failed pulls of one image (jittered, doubling).
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_parallel_pulls: 3,
            pull_timeout: Duration::from_secs(30 * 60),
            check_interval: Duration::from_secs(60),
            refresh_interval: Duration::from_secs(3600),
            retry_min: Duration::from_secs(2),
            retry_max: Duration::from_secs(5 * 60),
        }
    }
}

pub fn retry_backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// What one check saw of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub present: bool,
    pub pinned: bool,
    /// Every record name of the image (tags, digests, ID): the ones to pin.
    pub refs: Vec<String>,
    pub digest: Option<String>,
    /// Every digest the image has in the reference's repository (CRI-O lists the index's and
    /// the platform manifest's; containerd the one it resolved).
    pub digests: Vec<String>,
    /// The runtime's answer it came from, passed on to the pin and the next pull.
    pub image: Option<ImageInfo>,
}

impl Observation {
    pub fn absent() -> Self {
        Self { present: false, pinned: false, refs: vec![], digest: None, digests: vec![], image: None }
    }

    /// A present image as the runtime described it.
    pub fn of(image: &ImageInfo, reference: &str, pinned: bool) -> Self {
        Self {
            present: true,
            pinned,
            refs: image.refs_of(reference),
            digest: image.digest_in(reference).map(str::to_string),
            digests: image.digests_in(reference).map(str::to_string).collect(),
            image: Some(image.clone()),
        }
    }
}

/// Why a pull is started; reported in logs and used for the re-pull counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullReason {
    /// Not on the node and never cached by this agent.
    Missing,
    /// Was cached and has disappeared (GC, eviction, `crictl rmi`).
    Vanished,
    /// Present, but the tag is due to be resolved again (no digest from the coordinator).
    Refresh,
    /// The coordinator resolved the tag to a digest this node does not have.
    Moved,
}

impl PullReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PullReason::Missing => "missing",
            PullReason::Vanished => "vanished",
            PullReason::Refresh => "refresh",
            PullReason::Moved => "moved",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Pull { reference: String, reason: PullReason },
    Pin { reference: String },
}

/// What kip knows about one listed image, between checks.
#[derive(Debug)]
pub struct ImageState {
    pub seen: Observation,
    pub ever_cached: bool,
    pub in_flight: bool,
    pub last_pulled: Option<Instant>,
    pub next_attempt: Option<Instant>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// The published digest the last successful pull was for: a node that pulled for it and
    /// still has another (the tag moved again, a mirror serves older content) does not pull for
    /// it again. A failed pull counts for nothing, so it is retried with the backoff.
    pub pulled_for: Option<String>,
    /// The published digest of the pull in flight, `pulled_for` once it succeeds.
    pulling_for: Option<String>,
    /// When a check last found the published digest on the node: the tag is current then, so
    /// the refresh clock starts again (an image the coordinator stops resolving is refreshed an
    /// interval after that, not all nodes at once).
    pub confirmed: Option<Instant>,
    backoff: Option<ExponentialBackoff>,
}

impl Default for ImageState {
    fn default() -> Self {
        Self {
            seen: Observation::absent(),
            ever_cached: false,
            in_flight: false,
            last_pulled: None,
            next_attempt: None,
            last_error: None,
            consecutive_failures: 0,
            pulled_for: None,
            pulling_for: None,
            confirmed: None,
            backoff: None,
        }
    }
}

impl ImageState {
    /// Records a check's result; returns true when a cached image has vanished.
    pub fn observe(&mut self, obs: Observation) -> bool {
        let vanished = self.seen.present && !obs.present;
        if obs.present {
            self.ever_cached = true;
        }
        self.seen = obs;
        vanished
    }

    pub fn pull_started(&mut self, published: Option<&str>) {
        self.in_flight = true;
        self.pulling_for = published.map(str::to_string);
    }

    /// Notes that the node has `published` (the coordinator's digest for the tag) as of `now`.
    pub fn confirm(&mut self, published: Option<&str>, now: Instant) {
        if self.has(published) {
            self.confirmed = Some(now);
        }
    }

    /// The node has the published digest.
    fn has(&self, published: Option<&str>) -> bool {
        published.is_some_and(|d| self.seen.present && self.seen.digests.iter().any(|h| h == d))
    }

    /// The digest to report: the published one where the node has it, else the node's own.
    pub fn reported_digest<'a>(&'a self, published: Option<&'a str>) -> Option<&'a str> {
        if self.has(published) {
            return published;
        }
        self.seen.digest.as_deref()
    }

    pub fn pull_succeeded(&mut self, now: Instant, obs: Observation) {
        self.in_flight = false;
        self.pulled_for = self.pulling_for.take();
        self.last_pulled = Some(now);
        self.next_attempt = None;
        self.last_error = None;
        self.consecutive_failures = 0;
        self.backoff = None;
        self.observe(obs);
    }

    /// Schedules the next attempt after a jittered, growing delay; returns that delay.
    pub fn pull_failed(&mut self, now: Instant, error: String, policy: &Policy) -> Duration {
        self.in_flight = false;
        self.pulling_for = None;
        self.consecutive_failures += 1;
        self.last_error = Some(error);
        let backoff = self.backoff.get_or_insert_with(|| retry_backoff(policy.retry_min, policy.retry_max));
        let delay = backoff.next().unwrap_or(policy.retry_max);
        self.next_attempt = Some(kip::duration::after(now, delay));
        delay
    }

    fn may_pull(&self, now: Instant) -> bool {
        !self.in_flight && self.next_attempt.is_none_or(|t| now >= t)
    }

    /// Why a present image is to be pulled again, if it is: never for a digest; for a tag whose
    /// digest the coordinator published, only when the node lacks it (once per published digest);
    /// otherwise when the refresh interval since the last pull or confirmation has passed.
    fn refresh_reason(
        &self,
        entry: &ImageEntry,
        published: Option<&str>,
        now: Instant,
        policy: &Policy,
    ) -> Option<PullReason> {
        if entry.by_digest || self.has(published) {
            return None;
        }
        if let Some(d) = published {
            if self.pulled_for.as_deref() != Some(d) {
                return Some(PullReason::Moved);
            }
        }
        let due = self.refresh_at(policy).is_none_or(|t| now >= t);
        due.then_some(PullReason::Refresh)
    }

    /// When the time-based refresh falls due (`None`: now, nothing was pulled or confirmed).
    fn refresh_at(&self, policy: &Policy) -> Option<Instant> {
        let last = match (self.last_pulled, self.confirmed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        last.map(|t| kip::duration::after(t, policy.refresh_interval))
    }
}

/// The states of the listed images, keyed by normalized reference.
pub type States = BTreeMap<String, ImageState>;

/// Keeps one state per listed image: new images get a fresh state, dropped ones are forgotten.
pub fn sync_states(states: &mut States, list: &ImageList) {
    states.retain(|reference, _| list.contains_reference(reference));
    for e in list.entries() {
        states.entry(e.reference.clone()).or_default();
    }
}

/// Decides the next actions. Pulls are limited to the free slots, in list order; pins of
/// present images cost nothing and are always listed.
pub fn plan(list: &ImageList, digests: &Digests, states: &States, now: Instant, policy: &Policy) -> Vec<Action> {
    let in_flight = states.values().filter(|s| s.in_flight).count();
    let mut free = policy.max_parallel_pulls.saturating_sub(in_flight);
    let mut actions = Vec::new();
    let mut planned = HashSet::new();
    for entry in list.entries() {
        let Some(state) = states.get(&entry.reference) else { continue };
        if !planned.insert(entry.reference.as_str()) {
            continue; // two names for the same image: one pull is enough
        }
        let reason = if !state.seen.present {
            Some(if state.ever_cached { PullReason::Vanished } else { PullReason::Missing })
        } else {
            state.refresh_reason(entry, digests.get(&entry.reference).map(String::as_str), now, policy)
        };
        match reason {
            Some(reason) if free > 0 && state.may_pull(now) => {
                free -= 1;
                actions.push(Action::Pull { reference: entry.reference.clone(), reason });
            }
            _ if state.seen.present && !state.seen.pinned && !state.in_flight => {
                actions.push(Action::Pin { reference: entry.reference.clone() })
            }
            _ => {}
        }
    }
    actions
}

/// What the listed images need kept pinned: their references, and every record the last check
/// saw of them (an image ID shared with an unlisted image stays pinned for the listed one).
pub fn keep(states: &States) -> Keep {
    Keep {
        references: states.keys().cloned().collect(),
        records: states.values().flat_map(|s| s.seen.refs.iter().cloned()).collect(),
    }
}

/// Records kip pinned that `keep` does not name: their pins are to be removed.
pub fn to_release<'a>(kip_pinned: impl IntoIterator<Item = &'a str>, keep: &Keep) -> Vec<String> {
    kip_pinned.into_iter().filter(|r| !keep.records.contains(*r)).map(str::to_string).collect()
}

/// The earliest moment a failed pull may be retried or a refresh falls due.
pub fn next_wake(list: &ImageList, digests: &Digests, states: &States, policy: &Policy) -> Option<Instant> {
    list.entries()
        .iter()
        .filter_map(|e| {
            let s = states.get(&e.reference)?;
            if s.in_flight {
                return None;
            }
            if !s.seen.present {
                return s.next_attempt;
            }
            let published = digests.get(&e.reference).map(String::as_str);
            if e.by_digest || s.has(published) {
                return None;
            }
            if published.is_some_and(|d| s.pulled_for.as_deref() != Some(d)) {
                return s.next_attempt; // a moved tag waits for its retry only (none: due now)
            }
            let refresh = s.refresh_at(policy)?;
            Some(s.next_attempt.map_or(refresh, |retry| retry.max(refresh)))
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> ImageList {
        ImageList::parse(s).unwrap()
    }

    fn present(pinned: bool, refs: &[&str]) -> Observation {
        Observation {
            present: true,
            pinned,
            refs: refs.iter().map(|r| r.to_string()).collect(),
            digest: None,
            digests: vec![],
            image: None,
        }
    }

    fn with_digest(digest: &str) -> Observation {
        Observation { digest: Some(digest.into()), digests: vec![digest.into()], ..present(true, &["r/t:1"]) }
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn published(reference: &str, digest: &str) -> Digests {
        Digests::from([(reference.to_string(), digest.to_string())])
    }

    /// One listed tag `docker.io/r/t:1`, its state and a policy of 3 parallel pulls.
    fn one_tag() -> (ImageList, States, Instant, Policy) {
        let l = list("t=r/t:1");
        let mut states = States::new();
        sync_states(&mut states, &l);
        (l, states, Instant::now(), policy(3))
    }

    #[test]
    fn a_tag_whose_published_digest_the_node_has_is_never_pulled_again() {
        let (l, mut states, t0, p) = one_tag();
        let s = states.get_mut("docker.io/r/t:1").unwrap();
        s.observe(with_digest(D1));
        let digests = published("docker.io/r/t:1", D1);
        // Present from before the agent started, never pulled by it: without a digest that is
        // a refresh at once; with the coordinator's matching digest, nothing.
        assert_eq!(plan(&l, &Digests::new(), &states, t0, &p), vec![pull("docker.io/r/t:1", PullReason::Refresh)]);
        assert!(plan(&l, &digests, &states, t0, &p).is_empty());
        assert!(
            plan(&l, &digests, &states, t0 + p.refresh_interval * 10, &p).is_empty(),
            "no refresh while it matches"
        );
        assert_eq!(next_wake(&l, &digests, &states, &p), None);
        let s = &states["docker.io/r/t:1"];
        assert_eq!(s.reported_digest(Some(D1)), Some(D1));
    }

    #[test]
    fn a_moved_tag_is_pulled_once_per_published_digest() {
        let (l, mut states, t0, p) = one_tag();
        states.get_mut("docker.io/r/t:1").unwrap().observe(with_digest(D1));
        let moved = published("docker.io/r/t:1", D2);
        assert_eq!(plan(&l, &moved, &states, t0, &p), vec![pull("docker.io/r/t:1", PullReason::Moved)]);
        let s = states.get_mut("docker.io/r/t:1").unwrap();
        s.pull_started(Some(D2));
        assert!(plan(&l, &moved, &states, t0, &p).is_empty(), "in flight");
        // The registry served D1 again (the tag moved back, or a mirror lags): no loop.
        let s = states.get_mut("docker.io/r/t:1").unwrap();
        s.pull_succeeded(t0, with_digest(D1));
        assert!(plan(&l, &moved, &states, t0 + Duration::from_secs(60), &p).is_empty());
        // ... until the refresh interval, as for a tag nobody resolved.
        assert_eq!(next_wake(&l, &moved, &states, &p), Some(t0 + p.refresh_interval));
        assert_eq!(
            plan(&l, &moved, &states, t0 + p.refresh_interval, &p),
            vec![pull("docker.io/r/t:1", PullReason::Refresh)]
        );
        // The node reports its own digest while it lacks the published one.
        assert_eq!(states["docker.io/r/t:1"].reported_digest(Some(D2)), Some(D1));
    }

    #[test]
    fn a_moved_tag_whose_pull_failed_is_retried_with_the_backoff() {
        let (l, mut states, t0, p) = one_tag();
        states.get_mut("docker.io/r/t:1").unwrap().observe(with_digest(D1));
        let moved = published("docker.io/r/t:1", D2);
        let s = states.get_mut("docker.io/r/t:1").unwrap();
        s.pull_started(Some(D2));
        let delay = s.pull_failed(t0, "registry unavailable".into(), &p);
        assert!(plan(&l, &moved, &states, t0, &p).is_empty(), "not before the retry delay");
        assert_eq!(next_wake(&l, &moved, &states, &p), Some(t0 + delay), "woken for the retry, not an interval later");
        assert_eq!(plan(&l, &moved, &states, t0 + delay, &p), vec![pull("docker.io/r/t:1", PullReason::Moved)]);
        // A second failure waits longer; a success for the digest ends the retries.
        let s = states.get_mut("docker.io/r/t:1").unwrap();
        s.pull_started(Some(D2));
        let again = s.pull_failed(t0 + delay, "registry unavailable".into(), &p);
        assert!(again >= delay, "{again:?} after {delay:?}");
        let s = states.get_mut("docker.io/r/t:1").unwrap();
        s.pull_started(Some(D2));
        s.pull_succeeded(t0 + delay + again, with_digest(D2));
        assert!(plan(&l, &moved, &states, t0 + delay + again, &p).is_empty());
        assert_eq!(next_wake(&l, &moved, &states, &p), None);
    }

    #[test]
    fn confirmation_restarts_the_refresh_clock_when_the_digest_goes_away() {
        let (l, mut states, t0, p) = one_tag();
        let s = states.get_mut("docker.io/r/t:1").unwrap();
        s.pull_succeeded(t0, with_digest(D1));
        let later = t0 + p.refresh_interval * 3;
        s.confirm(Some(D1), later);
        assert_eq!(s.confirmed, Some(later));
        s.confirm(Some(D2), later + Duration::from_secs(1));
        assert_eq!(s.confirmed, Some(later), "a digest the node lacks confirms nothing");
        // The coordinator stopped resolving (registry down): refresh one interval after the
        // last confirmation, not at once.
        let none = Digests::new();
        assert!(plan(&l, &none, &states, later + Duration::from_secs(1), &p).is_empty());
        assert_eq!(next_wake(&l, &none, &states, &p), Some(later + p.refresh_interval));
    }

    #[test]
    fn images_listed_by_digest_and_missing_images_ignore_published_digests() {
        let d = "sha256:0123456789012345678901234567890123456789012345678901234567890123";
        let l = list(&format!("d=r/d@{d};m=r/m:1"));
        let mut states = States::new();
        sync_states(&mut states, &l);
        let now = Instant::now();
        states.get_mut(&format!("docker.io/r/d@{d}")).unwrap().observe(with_digest(D1));
        let digests = published("docker.io/r/m:1", D2);
        assert_eq!(plan(&l, &digests, &states, now, &policy(3)), vec![pull("docker.io/r/m:1", PullReason::Missing)]);
    }

    fn policy(parallel: usize) -> Policy {
        Policy { max_parallel_pulls: parallel, ..Policy::default() }
    }

    fn pull(r: &str, reason: PullReason) -> Action {
        Action::Pull { reference: r.into(), reason }
    }

    #[test]
    fn missing_images_are_pulled_up_to_the_parallel_limit_in_list_order() {
        let l = list("a=r/a:1;b=r/b:1;c=r/c:1");
        let mut states = States::new();
        sync_states(&mut states, &l);
        let now = Instant::now();
        let actions = plan(&l, &Digests::new(), &states, now, &policy(2));
        assert_eq!(
            actions,
            vec![pull("docker.io/r/a:1", PullReason::Missing), pull("docker.io/r/b:1", PullReason::Missing)]
        );
        states.get_mut("docker.io/r/a:1").unwrap().pull_started(None);
        let actions = plan(&l, &Digests::new(), &states, now, &policy(2));
        assert_eq!(actions, vec![pull("docker.io/r/b:1", PullReason::Missing)], "one slot left, a is in flight");
    }

    #[test]
    fn present_unpinned_image_is_pinned_and_not_pulled_before_refresh() {
        let l = list("a=r/a:1");
        let mut states = States::new();
        sync_states(&mut states, &l);
        let now = Instant::now();
        let s = states.get_mut("docker.io/r/a:1").unwrap();
        s.pull_succeeded(now, present(false, &["r/a:1"]));
        assert_eq!(
            plan(&l, &Digests::new(), &states, now, &policy(3)),
            vec![Action::Pin { reference: "docker.io/r/a:1".into() }]
        );
        states.get_mut("docker.io/r/a:1").unwrap().observe(present(true, &["r/a:1"]));
        assert!(plan(&l, &Digests::new(), &states, now + Duration::from_secs(60), &policy(3)).is_empty());
    }

    #[test]
    fn tags_are_refreshed_after_the_interval_digests_never() {
        let d = "sha256:0123456789012345678901234567890123456789012345678901234567890123";
        let l = list(&format!("t=r/t:1;d=r/d@{d}"));
        let mut states = States::new();
        sync_states(&mut states, &l);
        let now = Instant::now();
        for s in states.values_mut() {
            s.pull_succeeded(now, present(true, &["x"]));
        }
        let p = policy(3);
        assert!(plan(&l, &Digests::new(), &states, now + p.refresh_interval - Duration::from_secs(1), &p).is_empty());
        assert_eq!(
            plan(&l, &Digests::new(), &states, now + p.refresh_interval, &p),
            vec![pull("docker.io/r/t:1", PullReason::Refresh)]
        );
        assert_eq!(next_wake(&l, &Digests::new(), &states, &p), Some(now + p.refresh_interval));
    }

    #[test]
    fn a_vanished_image_is_detected_once_and_pulled_again() {
        let l = list("a=r/a:1");
        let mut states = States::new();
        sync_states(&mut states, &l);
        let now = Instant::now();
        let s = states.get_mut("docker.io/r/a:1").unwrap();
        s.pull_succeeded(now, present(true, &["r/a:1"]));
        assert!(s.observe(Observation::absent()), "present -> absent is a vanish");
        assert!(!s.observe(Observation::absent()), "absent -> absent is not counted again");
        assert_eq!(
            plan(&l, &Digests::new(), &states, now, &policy(1)),
            vec![pull("docker.io/r/a:1", PullReason::Vanished)]
        );
    }

    #[test]
    fn failures_back_off_with_growing_jittered_delays() {
        let l = list("a=r/a:1");
        let mut states = States::new();
        sync_states(&mut states, &l);
        let p = Policy { retry_min: Duration::from_secs(1), retry_max: Duration::from_secs(8), ..policy(1) };
        let now = Instant::now();
        let s = states.get_mut("docker.io/r/a:1").unwrap();
        s.pull_started(None);
        let d1 = s.pull_failed(now, "401".into(), &p);
        assert!(d1 >= Duration::from_secs(1) && d1 <= Duration::from_secs(2), "{d1:?}");
        assert_eq!(s.last_error.as_deref(), Some("401"));
        assert!(
            plan(&l, &Digests::new(), &states, now + d1 - Duration::from_millis(1), &p).is_empty(),
            "not before the delay"
        );
        assert_eq!(
            plan(&l, &Digests::new(), &states, now + d1, &p),
            vec![pull("docker.io/r/a:1", PullReason::Missing)]
        );
        assert_eq!(next_wake(&l, &Digests::new(), &states, &p), Some(now + d1));
        let s = states.get_mut("docker.io/r/a:1").unwrap();
        let delays: Vec<Duration> = (0..6).map(|_| s.pull_failed(now, "x".into(), &p)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(16)), "capped (max plus jitter): {delays:?}");
        assert!(delays[5] >= Duration::from_secs(8), "grows to the cap: {delays:?}");
        s.pull_succeeded(now, present(true, &["r/a:1"]));
        assert_eq!((s.consecutive_failures, s.next_attempt, s.last_error.clone()), (0, None, None));
    }

    #[test]
    fn only_refs_no_listed_image_needs_are_unpinned() {
        let l = list("a=r/a:1");
        let mut states = States::new();
        sync_states(&mut states, &l);
        states.get_mut("docker.io/r/a:1").unwrap().observe(present(true, &["r/a:1", "sha256:shared"]));
        let kip_pinned = ["r/a:1", "sha256:shared", "r/old:1", "sha256:old"];
        let keep = keep(&states);
        assert_eq!(keep.references, vec!["docker.io/r/a:1"]);
        assert_eq!(to_release(kip_pinned, &keep), vec!["r/old:1", "sha256:old"]);
    }

    #[test]
    fn sync_states_forgets_dropped_images_and_adds_new_ones() {
        let mut states = States::new();
        sync_states(&mut states, &list("a=r/a:1;b=r/b:1"));
        states.get_mut("docker.io/r/a:1").unwrap().ever_cached = true;
        sync_states(&mut states, &list("a=r/a:1;c=r/c:1"));
        assert_eq!(states.keys().collect::<Vec<_>>(), vec!["docker.io/r/a:1", "docker.io/r/c:1"]);
        assert!(states["docker.io/r/a:1"].ever_cached, "kept images keep their history");
    }

    #[test]
    fn two_names_for_one_image_pull_once() {
        let l = list("a=busybox;b=docker.io/library/busybox:latest");
        let mut states = States::new();
        sync_states(&mut states, &l);
        assert_eq!(plan(&l, &Digests::new(), &states, Instant::now(), &policy(3)).len(), 1);
    }
}
