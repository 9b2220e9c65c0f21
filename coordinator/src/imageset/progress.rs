//! A set's status: how many selected nodes have its images, and its conditions — `Ready` (every
//! selected node has every image cached, and pinned where it can pin), `Progressing` (nodes still
//! caching), `Degraded` (pulls failing, or the set is not used, with the reason and the first
//! nodes and images). Decided from the nodes' reports by a pure function; written by the leader
//! through the status subresource only when it differs from what the API shows.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kip::v1;

use super::sets::{AcceptedSet, Refusal};
use super::{ImageProgress, ImageSetStatus};

/// How many nodes (and images) a condition's message names at most.
const NAMED: usize = 3;

/// What one selected node says: its agent's current report, or why there is none; and whether
/// the node's fallback pods (no agent there) are Ready with every image of the set.
pub type NodeSays<'a> = (&'a str, Result<&'a v1::NodeReport, String>, bool);

/// Pure: what a node's report says of `image` (matched by normalized reference: on the node the
/// image may carry another set's name).
fn state_of<'a>(report: &'a v1::NodeReport, reference: &str) -> Option<&'a v1::ImageState> {
    report.images.iter().find(|i| kip::images::parse_reference(&i.image).is_ok_and(|r| r.to_string() == reference))
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: &Time,
    previous: &[Condition],
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    // The time a condition last changed stays while its status does.
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: None,
    }
}

fn named(items: &[String]) -> String {
    let mut text = items.iter().take(NAMED).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > NAMED {
        text.push_str(&format!("; and {} more", items.len() - NAMED));
    }
    text
}

/// Pure: the status of `set` over its selected `nodes`; `secret_problems`: what is wrong with
/// its pull secrets (`Degraded`, reason `PullSecretProblem`, named before any pull failure).
pub fn of_accepted(
    set: &AcceptedSet,
    nodes: &[NodeSays<'_>],
    secret_problems: &[String],
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> ImageSetStatus {
    let entries = set.images.entries();
    let mut images: Vec<ImageProgress> = entries
        .iter()
        .map(|e| ImageProgress { name: e.name.clone(), image: e.image.clone(), ..Default::default() })
        .collect();
    let (mut ready, mut waiting) = (0u32, Vec::new());
    let mut failing: Vec<String> = secret_problems.to_vec();
    for (node, says, fallback) in nodes {
        let agent_works = says.as_ref().is_ok_and(|r| r.runtime.as_ref().is_some_and(|rt| rt.available));
        if *fallback && !agent_works {
            // KIP's way: running containers hold the images (kubelet's GC never takes an image in
            // use), so they count as cached and pinned.
            ready += 1;
            for progress in images.iter_mut() {
                progress.nodes_cached += 1;
                progress.nodes_pinned += 1;
            }
            continue;
        }
        let report = match says {
            Ok(r) => r,
            Err(why) => {
                waiting.push(format!("{node}: {why}"));
                continue;
            }
        };
        let runtime = report.runtime.clone().unwrap_or_default();
        if !runtime.available {
            failing.push(format!("{node}: no usable runtime ({})", runtime.error));
            continue;
        }
        let can_pin = runtime.pin_error.is_empty();
        let mut missing = Vec::new();
        for (e, progress) in entries.iter().zip(images.iter_mut()) {
            let state = state_of(report, &e.reference);
            let cached = state.is_some_and(|s| s.cached);
            let pinned = state.is_some_and(|s| s.pinned);
            progress.nodes_cached += cached as u32;
            progress.nodes_pinned += pinned as u32;
            if !(cached && (pinned || !can_pin)) {
                missing.push(e.name.as_str());
            }
            if let Some(error) = state.map(|s| s.last_error.as_str()).filter(|e| !e.is_empty()) {
                failing.push(format!("{node}: {}: {error}", e.name));
            }
        }
        if missing.is_empty() {
            ready += 1;
        } else {
            waiting.push(format!("{node}: {} not cached and pinned yet", missing.join(", ")));
        }
    }
    let selected = nodes.len() as u32;
    let all = selected > 0 && ready == selected;
    let (ready_reason, ready_message) = match (selected, all) {
        (0, _) => ("NoNodesSelected", "no node matches spec.nodeSelector".to_string()),
        (_, true) => ("AllNodesReady", format!("all {selected} selected nodes have every image")),
        _ => ("Caching", format!("{ready} of {selected} selected nodes have every image")),
    };
    let conditions = vec![
        condition("Ready", all, ready_reason, ready_message, now, previous),
        condition(
            "Progressing",
            !all && !waiting.is_empty(),
            if waiting.is_empty() { "Idle" } else { "Caching" },
            if waiting.is_empty() { String::new() } else { format!("waiting for {}", named(&waiting)) },
            now,
            previous,
        ),
        condition(
            "Degraded",
            !failing.is_empty(),
            match (secret_problems.is_empty(), failing.is_empty()) {
                (false, _) => "PullSecretProblem",
                (true, true) => "NoFailures",
                (true, false) => "PullFailing",
            },
            named(&failing),
            now,
            previous,
        ),
    ];
    ImageSetStatus {
        observed_generation: generation,
        conditions,
        image_count: entries.len() as u32,
        nodes_selected: selected,
        nodes_ready: ready,
        ready: format!("{ready}/{selected}"),
        images,
    }
}

/// Pure: the status of a set the coordinator does not use, and why.
pub fn of_refused(
    refusal: &Refusal,
    image_count: usize,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> ImageSetStatus {
    let why = refusal.to_string();
    ImageSetStatus {
        observed_generation: generation,
        conditions: vec![
            condition("Ready", false, refusal.reason(), why.clone(), now, previous),
            condition("Progressing", false, refusal.reason(), String::new(), now, previous),
            condition("Degraded", true, refusal.reason(), why, now, previous),
        ],
        image_count: image_count as u32,
        ready: "0/0".into(),
        ..Default::default()
    }
}

/// Pure: whether `new` says something `old` does not (the times a condition changed aside: they
/// follow the statuses).
pub fn differs(old: Option<&ImageSetStatus>, new: &ImageSetStatus) -> bool {
    old != Some(new)
}

/// How often the statuses are decided again at most: a storm of reports is one write per set.
pub const EVERY: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imageset::select::Selector;
    use kip::images::ImageList;

    fn set(images: &str) -> AcceptedSet {
        AcceptedSet {
            namespace: "ml".into(),
            name: "training".into(),
            images: ImageList::parse(images).unwrap(),
            selector: Selector::default(),
            refresh_interval: None,
            pull_secrets: Vec::new(),
        }
    }

    fn report(images: &[(&str, &str, bool, bool, &str)]) -> v1::NodeReport {
        v1::NodeReport {
            runtime: Some(v1::RuntimeState { available: true, name: "containerd".into(), ..Default::default() }),
            images: images
                .iter()
                .map(|(n, i, c, p, e)| v1::ImageState {
                    name: n.to_string(),
                    image: i.to_string(),
                    cached: *c,
                    pinned: *p,
                    last_error: e.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())
    }

    fn get<'a>(s: &'a ImageSetStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn ready_once_every_selected_node_has_every_image_matched_by_reference() {
        let set = set("trainer=quay.io/ml/train:1;base=busybox;");
        // n1 has both (busybox under the default set's name and spelling); n2 lacks one.
        let n1 = report(&[
            ("base-image", "docker.io/library/busybox:latest", true, true, ""),
            ("trainer", "quay.io/ml/train:1", true, true, ""),
        ]);
        let n2 = report(&[("trainer", "quay.io/ml/train:1", true, false, "")]);
        let nodes = vec![
            ("n1", Ok(&n1), false),
            ("n2", Ok(&n2), false),
            ("n3", Err("its agent has not reported".to_string()), false),
        ];
        let s = of_accepted(&set, &nodes, &[], Some(3), &[], &now());
        assert_eq!((s.nodes_selected, s.nodes_ready, s.ready.as_str(), s.image_count), (3, 1, "1/3", 2));
        assert_eq!(
            s.images[0],
            ImageProgress {
                name: "trainer".into(),
                image: "quay.io/ml/train:1".into(),
                nodes_cached: 2,
                nodes_pinned: 1
            }
        );
        assert_eq!(get(&s, "Ready").status, "False");
        let progressing = get(&s, "Progressing");
        assert_eq!(progressing.status, "True");
        assert!(
            progressing.message.contains("n2: trainer, base not cached and pinned yet")
                && progressing.message.contains("n3: its agent has not reported"),
            "{}",
            progressing.message
        );
        assert_eq!(s.observed_generation, Some(3));

        let n2 = report(&[("t", "quay.io/ml/train:1", true, true, ""), ("b", "busybox", true, true, "")]);
        let n3 = n2.clone();
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_100).unwrap());
        let done = of_accepted(
            &set,
            &[("n1", Ok(&n1), false), ("n2", Ok(&n2), false), ("n3", Ok(&n3), false)],
            &[],
            Some(3),
            &s.conditions,
            &later,
        );
        assert_eq!(get(&done, "Ready").status, "True");
        assert_eq!(get(&done, "Ready").last_transition_time, later, "Ready changed now");
        assert_eq!(get(&done, "Degraded").last_transition_time, now(), "Degraded stayed False since then");
        assert!(!differs(
            Some(&done),
            &of_accepted(
                &set,
                &[("n1", Ok(&n1), false), ("n2", Ok(&n2), false), ("n3", Ok(&n3), false)],
                &[],
                Some(3),
                &done.conditions,
                &later
            )
        ));
    }

    #[test]
    fn failing_pulls_and_no_nodes_and_a_refused_set_say_so() {
        let set = set("trainer=quay.io/ml/train:1;");
        let failing = report(&[("trainer", "quay.io/ml/train:1", false, false, "pull: 401 Unauthorized")]);
        let s = of_accepted(&set, &[("gpu-1", Ok(&failing), false)], &[], None, &[], &now());
        let degraded = get(&s, "Degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "PullFailing"));
        // A node without a usable runtime whose fallback pods run the set's images: ready, as KIP.
        let no_runtime = v1::NodeReport {
            runtime: Some(v1::RuntimeState { available: false, error: "no socket".into(), ..Default::default() }),
            ..Default::default()
        };
        let s = of_accepted(
            &set,
            &[
                ("gpu-2", Ok(&no_runtime), true),
                ("gpu-3", Err("no agent".into()), true),
                ("gpu-4", Ok(&no_runtime), false),
            ],
            &[],
            None,
            &[],
            &now(),
        );
        assert_eq!((s.nodes_ready, s.images[0].nodes_cached, s.images[0].nodes_pinned), (2, 2, 2));
        assert!(get(&s, "Degraded").message.contains("gpu-4: no usable runtime"));
        assert!(degraded.message.contains("gpu-1: trainer: pull: 401 Unauthorized"));
        // A pull secret that could not be copied comes first, with its own reason.
        let problem = ["imagePullSecrets regcred: not found in namespace ml".to_string()];
        let s = of_accepted(&set, &[("gpu-1", Ok(&failing), false)], &problem, None, &[], &now());
        let degraded = get(&s, "Degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "PullSecretProblem"));
        assert!(degraded.message.starts_with("imagePullSecrets regcred: not found in namespace ml; gpu-1: trainer"));
        let none = of_accepted(&set, &[], &[], None, &[], &now());
        assert_eq!(
            (get(&none, "Ready").status.as_str(), get(&none, "Ready").reason.as_str()),
            ("False", "NoNodesSelected")
        );
        let refused = of_refused(&Refusal::OverCap { images: 3, before: 199, cap: 200 }, 3, Some(1), &[], &now());
        let degraded = get(&refused, "Degraded");
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ImageCapExceeded"));
        assert!(degraded.message.contains("cap of 200"));
        assert_eq!(get(&refused, "Ready").status, "False");
    }
}
