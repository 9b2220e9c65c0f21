//! The startup taint gate: node pools that register nodes with the gate taint (by default
//! `kip.eclipse.dev/images-pending:NoSchedule`) keep workloads off a new node until kip has
//! cached the listed images there. The coordinator only ever removes the taint — when the node's
//! agent reports every listed image cached (and pinned where the runtime can pin), when the
//! fallback DaemonSet's pod on the node is Ready, or when the gate timeout has passed since the
//! node was created (a broken registry must never strand nodes). kip never adds it, so a list
//! change does not take a node out of service.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};
use kip::images::ImageList;
use kip::v1;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

pub const DEFAULT_GATE_TAINT: &str = "kip.eclipse.dev/images-pending:NoSchedule";
const EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];

/// The taint that gates a node: matched by key and effect (the pair is unique on a node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateTaint {
    pub key: String,
    pub effect: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("KIP_GATE_TAINT {given:?}: {reason} (expected KEY[=VALUE]:EFFECT with EFFECT one of NoSchedule, PreferNoSchedule, NoExecute)")]
pub struct GateTaintError {
    given: String,
    reason: &'static str,
}

impl FromStr for GateTaint {
    type Err = GateTaintError;

    /// `key[=value]:Effect`, as `kubectl taint` and kubelet's `--register-with-taints` write it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| GateTaintError { given: s.to_string(), reason };
        let (key_value, effect) = s.rsplit_once(':').ok_or_else(|| err("no effect"))?;
        if !EFFECTS.contains(&effect) {
            return Err(err("unknown effect"));
        }
        let key = key_value.split_once('=').map_or(key_value, |(k, _)| k);
        if !valid_key(key) {
            return Err(err("the key is not a valid label key"));
        }
        Ok(Self { key: key.to_string(), effect: effect.to_string() })
    }
}

/// `KIP_GATE_TAINT` as given: a taint, or empty for no gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateSetting(pub Option<GateTaint>);

impl FromStr for GateSetting {
    type Err = GateTaintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(Self(None));
        }
        s.parse().map(|g| Self(Some(g)))
    }
}

impl std::fmt::Display for GateTaint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.key, self.effect)
    }
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters
/// of alphanumerics, `-`, `_` and `.` that starts and ends alphanumeric.
fn valid_key(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let edges_alnum = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && edges_alnum(name)
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && edges_alnum(l)
                    && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    name_ok && prefix_ok
}

impl GateTaint {
    pub fn matches(&self, t: &Taint) -> bool {
        t.key == self.key && t.effect == self.effect
    }

    /// Where the gate is in `taints`, and the taint as the API shows it (the patch's precondition).
    pub fn find<'a>(&self, taints: &'a [Taint]) -> Option<(usize, &'a Taint)> {
        taints.iter().enumerate().find(|(_, t)| self.matches(t))
    }

    /// What the agent and the fallback DaemonSet carry, so they run on gated nodes.
    pub fn toleration(&self) -> Toleration {
        Toleration {
            key: Some(self.key.clone()),
            operator: Some("Exists".into()),
            effect: Some(self.effect.clone()),
            ..Default::default()
        }
    }
}

/// Why a gate opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Opened {
    /// The agent reported every listed image cached (and pinned where the runtime can pin).
    Cached,
    /// The fallback DaemonSet's pod on the node is Ready: its containers run every listed image.
    FallbackReady,
    /// The gate timeout passed: the node goes into service unverified.
    Timeout,
    /// kip is being uninstalled: nothing would ever open the gate afterwards.
    Uninstall,
}

impl Opened {
    pub fn as_str(self) -> &'static str {
        match self {
            Opened::Cached => "cached",
            Opened::FallbackReady => "fallback_ready",
            Opened::Timeout => "timeout",
            Opened::Uninstall => "uninstall",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Hold(String),
    Open(Opened),
}

/// Pure: whether a gated node may go into service, and why (not).
pub fn decide(
    images: &ImageList,
    report: Result<&v1::NodeReport, String>,
    fallback_ready: bool,
    waited: Duration,
    timeout: Duration,
    releasing: bool,
) -> Verdict {
    if releasing {
        return Verdict::Open(Opened::Uninstall);
    }
    let agent = images_ready(images, report);
    match agent {
        Ok(()) => Verdict::Open(Opened::Cached),
        Err(_) if fallback_ready => Verdict::Open(Opened::FallbackReady),
        Err(_) if waited >= timeout => Verdict::Open(Opened::Timeout),
        Err(why) => Verdict::Hold(why),
    }
}

/// Pure: the report that speaks for a node as it is now (`entry`: its agent's latest report and
/// when it came), or why there is none. A report that came before the node was created belongs to
/// an earlier node of the same name (EKS reuses `ip-…` names), and one from an agent that is not
/// connected may be out of date: neither opens a gate.
pub fn current_report(
    entry: Option<(&v1::NodeReport, SystemTime)>,
    created: Option<SystemTime>,
    connected: bool,
) -> Result<&v1::NodeReport, String> {
    match entry {
        None => Err("its agent has not reported".into()),
        Some((_, received)) if created.is_some_and(|c| received < c) => {
            Err("its agent has not reported since the node was created (the report is an earlier node's of that name)"
                .into())
        }
        Some(_) if !connected => Err("its agent is not connected".into()),
        Some((report, _)) => Ok(report),
    }
}

/// Pure: `Ok` when `report` shows every entry of `images` cached, and pinned unless the runtime
/// said why it cannot pin; otherwise what is missing (or why there is no report to go by).
pub fn images_ready(images: &ImageList, report: Result<&v1::NodeReport, String>) -> Result<(), String> {
    let report = report?;
    let runtime = report.runtime.clone().unwrap_or_default();
    if !runtime.available {
        return Err(format!("its agent has no usable runtime ({})", runtime.error));
    }
    let can_pin = runtime.pin_error.is_empty();
    let state = |name: &str, image: &str| report.images.iter().find(|i| i.name == name && i.image == image);
    let (mut not_cached, mut not_pinned) = (Vec::new(), Vec::new());
    for e in images.entries() {
        match state(&e.name, &e.image) {
            Some(s) if s.cached && (s.pinned || !can_pin) => {}
            Some(s) if s.cached => not_pinned.push(e.name.as_str()),
            _ => not_cached.push(e.name.as_str()),
        }
    }
    match (not_cached.is_empty(), not_pinned.is_empty()) {
        (true, true) => Ok(()),
        (false, _) => {
            Err(format!("{} of {} images not cached yet: {}", not_cached.len(), images.len(), not_cached.join(", ")))
        }
        (true, false) => Err(format!("not pinned yet: {}", not_pinned.join(", "))),
    }
}

/// What `/status` shows of the gate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GateStatus {
    pub taint: String,
    pub timeout: Duration,
    /// Gated nodes and why they are held.
    pub held: BTreeMap<String, String>,
    /// The latest openings (most recent last): node, why, seconds after the node was created.
    pub opened: Vec<(String, Opened, f64)>,
}

impl GateStatus {
    const KEEP: usize = 100;

    pub fn record_opened(&mut self, node: &str, why: Opened, after: Duration) {
        self.opened.push((node.to_string(), why, after.as_secs_f64()));
        let excess = self.opened.len().saturating_sub(Self::KEEP);
        self.opened.drain(..excess);
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "taint": self.taint,
            "timeout_seconds": self.timeout.as_secs(),
            "held": self.held,
            "opened": self.opened.iter().map(|(n, why, after)| serde_json::json!({
                "node": n, "reason": why.as_str(), "seconds_after_creation": after,
            })).collect::<Vec<_>>(),
        })
    }
}

/// How long a node has waited: since its creation (kubelet registers it with the taint).
pub fn waited(created: Option<SystemTime>, now: SystemTime) -> Duration {
    created.and_then(|c| now.duration_since(c).ok()).unwrap_or_default()
}

/// Removes the gate from `node` without touching any other taint: a JSON patch that tests the
/// taint at its index and removes that index, so a concurrent change to the list makes the API
/// refuse (422) instead of being overwritten; then the node is read again and the patch retried.
/// `seen` is the taint list as the watch shows it (no read before the first attempt).
/// Returns false when the node no longer has the gate (or is gone).
pub async fn remove_gate(client: &Client, node: &str, gate: &GateTaint, seen: &[Taint]) -> Result<bool, kube::Error> {
    const ATTEMPTS: usize = 4;
    let api = Api::<Node>::all(client.clone());
    let mut taints = seen.to_vec();
    for attempt in 1..=ATTEMPTS {
        let Some((index, taint)) = gate.find(&taints) else { return Ok(false) };
        let patch = removal_patch(index, taint);
        match api.patch(node, &PatchParams::default(), &Patch::<()>::Json(patch)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            // 422: the test failed (the list changed since it was read); 409: a write conflict.
            Err(kube::Error::Api(s)) if (s.code == 422 || s.code == 409) && attempt < ATTEMPTS => {
                tracing::debug!(node, attempt, "the node's taints changed; reading them again");
                match api.get_opt(node).await? {
                    Some(n) => taints = n.spec.and_then(|s| s.taints).unwrap_or_default(),
                    None => return Ok(false),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// The JSON patch that removes `taint` at `index` only if it is still there.
pub fn removal_patch(index: usize, taint: &Taint) -> json_patch::Patch {
    let path = format!("/spec/taints/{index}");
    let ops = serde_json::json!([
        {"op": "test", "path": path, "value": taint},
        {"op": "remove", "path": path},
    ]);
    // Built from two well-formed operations: it always deserializes.
    serde_json::from_value(ops).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> ImageList {
        ImageList::parse(s).unwrap()
    }

    /// The shared fixture, with the runtime's availability and pin problem as given.
    fn report(runtime: bool, pin_error: &str, images: &[(&str, &str, bool, bool)]) -> v1::NodeReport {
        let mut r = crate::fixtures::report("n", images);
        let rt = r.runtime.get_or_insert_with(Default::default);
        rt.available = runtime;
        rt.pin_error = pin_error.into();
        if !runtime {
            rt.error = "no CRI socket found".into();
        }
        r
    }

    const T: Duration = Duration::from_secs(900);

    #[test]
    fn the_taint_syntax_is_kubectls_and_errors_name_the_setting() {
        assert_eq!(
            DEFAULT_GATE_TAINT.parse::<GateTaint>().unwrap(),
            GateTaint { key: "kip.eclipse.dev/images-pending".into(), effect: "NoSchedule".into() }
        );
        assert_eq!("example.com/warm=true:NoExecute".parse::<GateTaint>().unwrap().key, "example.com/warm");
        for bad in ["", "kip", "kip:Never", ":NoSchedule", "-x:NoSchedule", "A.B/x:NoSchedule", "a/:NoSchedule"] {
            let e = bad.parse::<GateTaint>().unwrap_err().to_string();
            assert!(e.starts_with("KIP_GATE_TAINT"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_gate_opens_when_every_listed_image_is_cached_and_pinned() {
        let images = list("a=busybox;b=nginx");
        let both = report(true, "", &[("a", "busybox", true, true), ("b", "nginx", true, true)]);
        assert_eq!(decide(&images, Ok(&both), false, Duration::ZERO, T, false), Verdict::Open(Opened::Cached));

        let one = report(true, "", &[("a", "busybox", true, true), ("b", "nginx", false, false)]);
        assert_eq!(
            decide(&images, Ok(&one), false, Duration::ZERO, T, false),
            Verdict::Hold("1 of 2 images not cached yet: b".into())
        );
        let unpinned = report(true, "", &[("a", "busybox", true, true), ("b", "nginx", true, false)]);
        assert_eq!(
            decide(&images, Ok(&unpinned), false, Duration::ZERO, T, false),
            Verdict::Hold("not pinned yet: b".into())
        );
        // A runtime that cannot pin (it said why): cached is all there is.
        let cannot_pin = report(
            true,
            "CRI-O drop-in dir not writable",
            &[("a", "busybox", true, false), ("b", "nginx", true, false)],
        );
        assert_eq!(decide(&images, Ok(&cannot_pin), false, Duration::ZERO, T, false), Verdict::Open(Opened::Cached));
        // An image of the same name but another reference (the list changed) does not count.
        let stale = report(true, "", &[("a", "busybox", true, true), ("b", "nginx:1.25", true, true)]);
        assert!(matches!(decide(&images, Ok(&stale), false, Duration::ZERO, T, false), Verdict::Hold(_)));
        // Nothing listed: nothing to wait for.
        assert_eq!(
            decide(&ImageList::default(), Ok(&report(true, "", &[])), false, Duration::ZERO, T, false),
            Verdict::Open(Opened::Cached)
        );
    }

    #[test]
    fn without_an_agent_the_fallback_pod_or_the_timeout_opens_it() {
        let images = list("a=busybox");
        assert_eq!(
            decide(&images, Err("its agent has not reported".into()), false, Duration::from_secs(10), T, false),
            Verdict::Hold("its agent has not reported".into())
        );
        let no_runtime = report(false, "", &[]);
        assert_eq!(
            decide(&images, Ok(&no_runtime), false, Duration::from_secs(10), T, false),
            Verdict::Hold("its agent has no usable runtime (no CRI socket found)".into())
        );
        assert_eq!(
            decide(&images, Ok(&no_runtime), true, Duration::ZERO, T, false),
            Verdict::Open(Opened::FallbackReady)
        );
        assert_eq!(
            decide(&images, Err("its agent has not reported".into()), false, T, T, false),
            Verdict::Open(Opened::Timeout)
        );
        assert_eq!(
            decide(&images, Err("its agent has not reported".into()), false, Duration::ZERO, T, true),
            Verdict::Open(Opened::Uninstall)
        );
    }

    #[test]
    fn only_a_report_of_a_connected_agent_since_the_node_was_created_counts() {
        let r = report(true, "", &[("a", "busybox", true, true)]);
        let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let before = created - Duration::from_secs(1);
        let after = created + Duration::from_secs(1);
        assert_eq!(current_report(Some((&r, after)), Some(created), true), Ok(&r));
        // A node deleted and registered again under its name: the old node's report.
        let stale = current_report(Some((&r, before)), Some(created), true);
        assert!(stale.as_ref().is_err_and(|e| e.contains("since the node was created")), "{stale:?}");
        assert_eq!(current_report(Some((&r, after)), Some(created), false), Err("its agent is not connected".into()));
        assert_eq!(current_report(None, Some(created), true), Err("its agent has not reported".into()));
        // Without a creation time (never so from the API), the report counts.
        assert_eq!(current_report(Some((&r, before)), None, true), Ok(&r));
        // The gate holds on the stale report, with the reason.
        let images = list("a=busybox");
        let verdict = decide(&images, stale, false, Duration::ZERO, T, false);
        assert!(matches!(&verdict, Verdict::Hold(why) if why.contains("earlier node")), "{verdict:?}");
    }

    #[test]
    fn the_removal_tests_the_taint_at_its_index_then_removes_that_index() {
        let gate: GateTaint = DEFAULT_GATE_TAINT.parse().unwrap();
        let taints = vec![
            Taint { key: "other".into(), effect: "NoSchedule".into(), ..Default::default() },
            Taint { key: gate.key.clone(), effect: "PreferNoSchedule".into(), ..Default::default() },
            Taint {
                key: gate.key.clone(),
                effect: "NoSchedule".into(),
                value: Some("true".into()),
                ..Default::default()
            },
        ];
        let (i, t) = gate.find(&taints).unwrap();
        assert_eq!(i, 2);
        assert_eq!(
            serde_json::to_value(removal_patch(i, t)).unwrap(),
            serde_json::json!([
                {"op": "test", "path": "/spec/taints/2", "value": {"key": gate.key, "effect": "NoSchedule", "value": "true"}},
                {"op": "remove", "path": "/spec/taints/2"},
            ])
        );
        assert_eq!(gate.find(&taints[..2]), None);
    }

    #[test]
    fn status_keeps_the_latest_openings_only() {
        let mut s = GateStatus::default();
        for i in 0..150 {
            s.record_opened(&format!("n{i}"), Opened::Cached, Duration::from_secs(i));
        }
        assert_eq!(s.opened.len(), 100);
        assert_eq!(s.opened[0].0, "n50");
    }
}
