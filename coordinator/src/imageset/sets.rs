//! Which image sets the coordinator uses, and each node's list. Pure: the watch of ImageSets and
//! the node watch give the inputs; the gRPC stream of each agent sends what [`node_list`] says.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kip::images::{ImageEntry, ImageList};

use super::select::Selector;
use super::ImageSet;

/// A set the coordinator uses: its images checked with the IMAGES rules, its selector parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptedSet {
    pub namespace: String,
    pub name: String,
    pub images: ImageList,
    pub selector: Selector,
    /// `spec.refreshInterval` (`None`: the ConfigMap's).
    pub refresh_interval: Option<Duration>,
    /// `spec.imagePullSecrets`: names of Secrets in the set's namespace.
    pub pull_secrets: Vec<String>,
}

impl AcceptedSet {
    /// The keys of this set's pull secrets in the coordinator's copy.
    pub fn secret_keys(&self) -> impl Iterator<Item = String> + '_ {
        self.pull_secrets.iter().map(|s| secret_key(&self.namespace, s))
    }
}

/// The key of a set's pull secret in the coordinator's copy (and the file agents read):
/// `<namespace>.<secret>` — a namespace has no dot, so the two never run together.
pub fn secret_key(namespace: &str, secret: &str) -> String {
    format!("{namespace}.{secret}")
}

/// Where sets may come from and how many images they may list together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Namespaces whose sets are used (`None`: every namespace).
    pub namespaces: Option<BTreeSet<String>>,
    /// Images all sets may list together, cluster-wide (each node pulls its sets' images).
    pub max_images: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { namespaces: None, max_images: 200 }
    }
}

/// Why a set is not used (what its status says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The spec breaks a rule the schema could not express; names the field.
    Invalid(String),
    /// Its namespace is not in the allow-list.
    NamespaceNotAllowed,
    /// It would take the sets over the cluster-wide cap.
    OverCap { images: usize, before: usize, cap: usize },
}

impl Refusal {
    /// The `Degraded` condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Invalid(_) => "InvalidSpec",
            Refusal::NamespaceNotAllowed => "NamespaceNotAllowed",
            Refusal::OverCap { .. } => "ImageCapExceeded",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(why) => write!(f, "{why}"),
            Refusal::NamespaceNotAllowed => {
                write!(f, "image sets are not used in this namespace (the chart's imageSets.namespaces)")
            }
            Refusal::OverCap { images, before, cap } => write!(
                f,
                "its {images} images would take the cluster's image sets over their cap of {cap} (earlier sets list {before}; the chart's imageSets.maxImages)"
            ),
        }
    }
}

/// The sets in use, and why each other one is not (by namespace and name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    pub sets: Vec<AcceptedSet>,
    pub refused: BTreeMap<(String, String), Refusal>,
}

/// Pure: checks each set. For the cap, the sets in use (`previous`) come first, then the oldest:
/// a new set never pushes out one in use (not even one created in the same second). A set that
/// fails touches no other.
pub fn accept<'a>(
    sets: impl IntoIterator<Item = &'a ImageSet>,
    limits: &Limits,
    previous: Option<&Accepted>,
) -> Accepted {
    let mut ordered: Vec<&ImageSet> = sets.into_iter().collect();
    let in_use = |namespace: &str, name: &str| {
        previous.is_some_and(|p| p.sets.iter().any(|s| s.namespace == namespace && s.name == name))
    };
    let key = |s: &ImageSet| {
        let (namespace, name) =
            (s.metadata.namespace.clone().unwrap_or_default(), s.metadata.name.clone().unwrap_or_default());
        (!in_use(&namespace, &name), s.metadata.creation_timestamp.as_ref().map(|t| t.0), namespace, name)
    };
    ordered.sort_by_key(|s| key(s));
    let mut accepted = Accepted::default();
    let mut listed = 0;
    for set in ordered {
        let (namespace, name) =
            (set.metadata.namespace.clone().unwrap_or_default(), set.metadata.name.clone().unwrap_or_default());
        let refuse = |accepted: &mut Accepted, why| {
            accepted.refused.insert((namespace.clone(), name.clone()), why);
        };
        if limits.namespaces.as_ref().is_some_and(|allowed| !allowed.contains(&namespace)) {
            refuse(&mut accepted, Refusal::NamespaceNotAllowed);
            continue;
        }
        let images = ImageList::from_pairs(set.spec.images.iter().map(|i| (i.name.as_str(), i.image.as_str())))
            .map_err(|e| Refusal::Invalid(format!("spec.images: {}", e.to_string().replace("IMAGES entry", "entry"))));
        let selector = super::select::Selector::parse(set.spec.node_selector.as_ref())
            .map_err(|e| Refusal::Invalid(e.to_string()));
        let (min, max) = kip::duration::REFRESH_INTERVAL;
        let refresh_interval = set
            .spec
            .refresh_interval
            .as_deref()
            .map(|s| kip::duration::parse_within(s, min, max))
            .transpose()
            .map_err(|e| Refusal::Invalid(format!("spec.refreshInterval: {e}")));
        let (images, selector, refresh_interval) = match (images, selector, refresh_interval) {
            (Ok(i), Ok(s), Ok(r)) => (i, s, r),
            (Err(why), _, _) | (_, Err(why), _) | (_, _, Err(why)) => {
                refuse(&mut accepted, why);
                continue;
            }
        };
        if images.is_empty() {
            refuse(&mut accepted, Refusal::Invalid("spec.images: no image".into()));
            continue;
        }
        if listed + images.len() > limits.max_images {
            refuse(&mut accepted, Refusal::OverCap { images: images.len(), before: listed, cap: limits.max_images });
            continue;
        }
        listed += images.len();
        let mut pull_secrets: Vec<String> = Vec::new();
        for s in &set.spec.image_pull_secrets {
            if !pull_secrets.contains(&s.name) {
                pull_secrets.push(s.name.clone());
            }
        }
        accepted.sets.push(AcceptedSet { namespace, name, images, selector, refresh_interval, pull_secrets });
    }
    accepted
}

/// Pure: the sets that select a node with `labels`.
pub fn selecting<'a>(sets: &'a [AcceptedSet], labels: &BTreeMap<String, String>) -> Vec<&'a AcceptedSet> {
    sets.iter().filter(|s| s.selector.matches(labels)).collect()
}

/// Pure: a node's list: the default set (the KIP ConfigMap), then every set that selects it, in
/// order, each image once (by its normalized reference: the same image in two sets is pulled
/// and pinned once, under the first name it was given). A name a set shares with another image
/// gets a suffix (`name-2`, …), so the names stay unique on the node.
pub fn node_list(default: &ImageList, selecting: &[&AcceptedSet]) -> ImageList {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut references: BTreeSet<&str> = BTreeSet::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    let entries = default.entries().iter().chain(selecting.iter().flat_map(|s| s.images.entries()));
    for e in entries {
        if !references.insert(e.reference.as_str()) {
            continue;
        }
        let name = unique_name(&e.name, &names);
        names.insert(name.clone());
        pairs.push((name, e.image.clone()));
    }
    // Every entry passed the same rules in its own list; the union only renamed some.
    ImageList::from_pairs(pairs.iter().map(|(n, i)| (n.as_str(), i.as_str()))).unwrap_or_else(|_| default.clone())
}

/// Pure: the pull-secret keys of each image a node gets (by normalized reference), from every
/// set that selects it and lists the image, in the sets' order, each key once.
pub fn node_pull_secrets(selecting: &[&AcceptedSet]) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for set in selecting.iter().filter(|s| !s.pull_secrets.is_empty()) {
        for e in set.images.entries() {
            let of_image = keys.entry(e.reference.clone()).or_default();
            for key in set.secret_keys() {
                if !of_image.contains(&key) {
                    of_image.push(key);
                }
            }
        }
    }
    keys
}

/// Pure: how often a node's agent refreshes its tags: the default interval, or a set's where it
/// asks for less (a node refreshes at least as often as each of its sets says).
pub fn node_refresh_interval(default: Duration, selecting: &[&AcceptedSet]) -> Duration {
    selecting.iter().filter_map(|s| s.refresh_interval).fold(default, Duration::min)
}

/// Pure: every tag to keep resolved, by normalized reference, and how often: the default list's
/// at `default_interval`, each set's at its own (or the default); a tag listed in several lists
/// at the shortest. Images listed by digest never move and are left out.
pub fn tag_intervals(
    default: &ImageList,
    default_interval: Duration,
    sets: &[AcceptedSet],
) -> BTreeMap<String, (ImageEntry, Duration)> {
    let lists = std::iter::once((default, default_interval))
        .chain(sets.iter().map(|s| (&s.images, s.refresh_interval.unwrap_or(default_interval))));
    let mut tags: BTreeMap<String, (ImageEntry, Duration)> = BTreeMap::new();
    for (list, interval) in lists {
        for e in list.entries().iter().filter(|e| !e.by_digest) {
            tags.entry(e.reference.clone())
                .and_modify(|(_, every)| *every = (*every).min(interval))
                .or_insert_with(|| (e.clone(), interval));
        }
    }
    tags
}

/// `name`, or the first `name-N` not in `taken` (shortened to stay a 63-character DNS label).
fn unique_name(name: &str, taken: &BTreeSet<String>) -> String {
    if !taken.contains(name) {
        return name.to_string();
    }
    (2..)
        .map(|n| {
            let suffix = format!("-{n}");
            let base = &name[..name.len().min(63 - suffix.len())];
            format!("{}{suffix}", base.trim_end_matches('-'))
        })
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(
        namespace: &str,
        name: &str,
        created: i64,
        images: &[(&str, &str)],
        selector: serde_json::Value,
    ) -> ImageSet {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kip.eclipse.dev/v1alpha1",
            "kind": "ImageSet",
            "metadata": {"namespace": namespace, "name": name, "creationTimestamp": k8s_openapi::jiff::Timestamp::from_second(created).unwrap().to_string()},
            "spec": {
                "images": images.iter().map(|(n, i)| serde_json::json!({"name": n, "image": i})).collect::<Vec<_>>(),
                "nodeSelector": selector,
            },
        }))
        .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn names(list: &ImageList) -> Vec<String> {
        list.entries().iter().map(|e| format!("{}={}", e.name, e.image)).collect()
    }

    #[test]
    fn a_node_gets_the_default_set_and_each_set_that_selects_it_each_image_once() {
        let gpu = set(
            "ml",
            "training",
            1,
            &[("trainer", "quay.io/ml/train:1"), ("base", "busybox")],
            serde_json::json!({"matchLabels": {"pool": "gpu"}}),
        );
        let ci = set(
            "ci",
            "builders",
            2,
            &[("trainer", "quay.io/ci/maven:3")],
            serde_json::json!({"matchLabels": {"pool": "ci"}}),
        );
        let all = set("platform", "everywhere", 3, &[("tools", "docker.io/library/alpine:3")], serde_json::json!({}));
        let accepted = accept(&[all, ci, gpu], &Limits::default(), None);
        assert!(accepted.refused.is_empty(), "{:?}", accepted.refused);
        assert_eq!(
            accepted.sets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["training", "builders", "everywhere"],
            "oldest first"
        );
        let default = ImageList::parse("base=docker.io/library/busybox:latest;").unwrap();
        let on = |node: &[(&str, &str)]| names(&node_list(&default, &selecting(&accepted.sets, &labels(node))));
        // busybox twice (default and training, two spellings of one reference): once, as listed first.
        assert_eq!(
            on(&[("pool", "gpu")]),
            ["base=docker.io/library/busybox:latest", "trainer=quay.io/ml/train:1", "tools=docker.io/library/alpine:3"]
        );
        assert_eq!(
            on(&[("pool", "cpu")]),
            ["base=docker.io/library/busybox:latest", "tools=docker.io/library/alpine:3"]
        );
        // Two sets on one node (a label change): both, the second `trainer` renamed.
        let both = BTreeMap::from([("pool".to_string(), "gpu".to_string())]);
        let mut sets = selecting(&accepted.sets, &both);
        sets.extend(selecting(&accepted.sets, &labels(&[("pool", "ci")])).into_iter().filter(|s| s.name == "builders"));
        assert_eq!(
            names(&node_list(&default, &sets)),
            [
                "base=docker.io/library/busybox:latest",
                "trainer=quay.io/ml/train:1",
                "tools=docker.io/library/alpine:3",
                "trainer-2=quay.io/ci/maven:3"
            ]
        );
    }

    #[test]
    fn a_bad_set_is_refused_alone_with_its_reason() {
        let good = set("a", "good", 1, &[("x", "busybox")], serde_json::json!({}));
        let bad_ref = set("a", "bad-ref", 2, &[("x", "Not A Reference!")], serde_json::json!({}));
        let bad_sel = set(
            "a",
            "bad-selector",
            3,
            &[("x", "busybox")],
            serde_json::json!({"matchExpressions": [{"key": "k", "operator": "Near"}]}),
        );
        let elsewhere = set("other", "s", 4, &[("x", "busybox")], serde_json::json!({}));
        let big = set("a", "big", 5, &[("p", "alpine"), ("q", "nginx")], serde_json::json!({}));
        let limits = Limits { namespaces: Some(BTreeSet::from(["a".to_string()])), max_images: 2 };
        let accepted = accept(&[big.clone(), elsewhere, bad_sel, bad_ref, good.clone()], &limits, None);
        assert_eq!(accepted.sets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["good"]);
        let why = |ns: &str, n: &str| accepted.refused[&(ns.to_string(), n.to_string())].clone();
        assert!(
            matches!(why("a", "bad-ref"), Refusal::Invalid(w) if w.starts_with("spec.images: entry 1") && w.contains("not a valid image reference"))
        );
        assert!(matches!(why("a", "bad-selector"), Refusal::Invalid(w) if w.contains("spec.nodeSelector")));
        assert_eq!(why("other", "s"), Refusal::NamespaceNotAllowed);
        assert_eq!(why("a", "big"), Refusal::OverCap { images: 2, before: 1, cap: 2 });
        assert!(why("a", "big").to_string().contains("cap of 2"));
        // A set in use keeps its place under the cap against a new one, even created before it.
        let mut early = set("a", "early", 0, &[("y", "redis"), ("z", "nginx")], serde_json::json!({}));
        early.metadata.creation_timestamp = good.metadata.creation_timestamp.clone();
        let again = accept(&[early, good, big], &limits, Some(&accepted));
        assert_eq!(again.sets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["good"]);
        assert!(matches!(again.refused[&("a".to_string(), "early".to_string())], Refusal::OverCap { .. }));
    }

    #[test]
    fn a_refresh_interval_is_checked_and_a_bad_one_refuses_its_set_naming_the_field() {
        let mut often = set("a", "often", 1, &[("x", "busybox")], serde_json::json!({}));
        often.spec.refresh_interval = Some("15m".into());
        let mut never = set("a", "never", 2, &[("y", "alpine")], serde_json::json!({}));
        never.spec.refresh_interval = Some("100d".into());
        let mut garbled = set("a", "garbled", 3, &[("z", "nginx")], serde_json::json!({}));
        garbled.spec.refresh_interval = Some("often".into());
        let accepted = accept(&[often, never, garbled], &Limits::default(), None);
        assert_eq!(accepted.sets.len(), 1);
        assert_eq!(accepted.sets[0].refresh_interval, Some(Duration::from_secs(900)));
        let why = |n: &str| accepted.refused[&("a".to_string(), n.to_string())].to_string();
        assert!(why("never").starts_with("spec.refreshInterval: `100d` is out of range"), "{}", why("never"));
        assert!(why("garbled").starts_with("spec.refreshInterval: `often` is not a duration"), "{}", why("garbled"));
    }

    #[test]
    fn only_tags_are_resolved_each_once() {
        let d = "sha256:0123456789012345678901234567890123456789012345678901234567890123";
        let list = ImageList::parse(&format!("a=busybox;b=docker.io/library/busybox:latest;c=r/x@{d};e=quay.io/x/y:2"))
            .unwrap();
        let refs: Vec<String> = tag_intervals(&list, Duration::from_secs(3600), &[]).into_keys().collect();
        assert_eq!(refs, vec!["docker.io/library/busybox:latest", "quay.io/x/y:2"]);
    }

    #[test]
    fn each_tag_is_resolved_once_at_the_shortest_interval_of_its_lists() {
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let mut fast = set("a", "fast", 1, &[("x", "busybox"), ("y", "quay.io/a/y:1")], serde_json::json!({}));
        fast.spec.refresh_interval = Some("10m".into());
        let mut slow = set("a", "slow", 2, &[("y", "quay.io/a/y:1"), ("z", "quay.io/a/z:2")], serde_json::json!({}));
        slow.spec.refresh_interval = Some("6h".into());
        let plain = set(
            "a",
            "plain",
            3,
            &[("p", &format!("quay.io/a/p@{digest}")), ("q", "quay.io/a/q:3")],
            serde_json::json!({}),
        );
        let accepted = accept(&[fast, slow, plain], &Limits::default(), None);
        let default = ImageList::parse("base=docker.io/library/busybox:latest;").unwrap();
        let tags = tag_intervals(&default, Duration::from_secs(3600), &accepted.sets);
        let every: Vec<(&str, u64)> = tags.iter().map(|(r, (_, d))| (r.as_str(), d.as_secs())).collect();
        assert_eq!(
            every,
            [
                ("docker.io/library/busybox:latest", 600),
                ("quay.io/a/q:3", 3600),
                ("quay.io/a/y:1", 600),
                ("quay.io/a/z:2", 6 * 3600),
            ]
        );
        let sets: Vec<&AcceptedSet> = accepted.sets.iter().collect();
        assert_eq!(node_refresh_interval(Duration::from_secs(3600), &sets[1..]), Duration::from_secs(3600));
        assert_eq!(node_refresh_interval(Duration::from_secs(3600), &sets), Duration::from_secs(600));
    }

    #[test]
    fn an_image_carries_the_pull_secrets_of_every_set_that_lists_it_on_the_node() {
        let mut team = set("ml", "team", 1, &[("t", "quay.io/ml/train:1"), ("b", "busybox")], serde_json::json!({}));
        team.spec.image_pull_secrets =
            vec![super::super::SecretName { name: "quay".into() }, super::super::SecretName { name: "quay".into() }];
        let mut other = set("ci", "other", 2, &[("t", "quay.io/ml/train:1")], serde_json::json!({}));
        other.spec.image_pull_secrets = vec![super::super::SecretName { name: "robot".into() }];
        let open = set("ci", "open", 3, &[("o", "alpine")], serde_json::json!({}));
        let accepted = accept(&[team, other, open], &Limits::default(), None);
        let sets: Vec<&AcceptedSet> = accepted.sets.iter().collect();
        let keys = node_pull_secrets(&sets);
        assert_eq!(
            keys["quay.io/ml/train:1"],
            ["ml.quay", "ci.robot"],
            "both sets' keys, the first set's first, each once"
        );
        assert_eq!(keys["docker.io/library/busybox:latest"], ["ml.quay"]);
        assert!(!keys.contains_key("docker.io/library/alpine:latest"), "a set without pull secrets adds none");
        assert_eq!(node_pull_secrets(&sets[1..])["quay.io/ml/train:1"], ["ci.robot"], "only the node's sets count");
    }

    #[test]
    fn renamed_entries_stay_dns_labels() {
        let taken: BTreeSet<String> = ["a".repeat(63), format!("{}-2", "a".repeat(61))].into_iter().collect();
        let name = unique_name(&"a".repeat(63), &taken);
        assert_eq!(name, format!("{}-3", "a".repeat(61)));
        assert!(name.len() <= 63);
    }
}
