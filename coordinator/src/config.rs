//! The KIP-compatible configuration: every KIP variable with KIP's defaults, read from the
//! environment or a mounted ConfigMap directory, and validated strictly before anything is
//! published. A bad value is an error naming the variable, never a silent default.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kip::images::ImageList;
use kube_quantity::ParsedQuantity;
use serde::de::DeserializeOwned;

/// Every key kip reads, KIP's and its own.
pub const KEYS: [&str; 21] = [
    "IMAGES",
    "CACHING_INTERVAL_HOURS",
    "CACHING_MEMORY_REQUEST",
    "CACHING_MEMORY_LIMIT",
    "CACHING_CPU_REQUEST",
    "CACHING_CPU_LIMIT",
    "DAEMONSET_NAME",
    "DAEMONSET_ANNOTATIONS",
    "NAMESPACE",
    "NODE_SELECTOR",
    "IMAGE_PULL_SECRETS",
    "AFFINITY",
    "TOLERATIONS",
    "KIP_IMAGE",
    "KIP_MAX_PARALLEL_PULLS",
    "KIP_CHECK_INTERVAL",
    "KIP_PULL_TIMEOUT",
    "KIP_MODE",
    "KIP_RELEASE",
    "KIP_REFRESH_INTERVAL",
    "KIP_MAX_NODES_PULLING",
];

/// KIP's defaults (kubernetes-image-puller's README and cfg package).
pub const DEFAULT_CACHING_INTERVAL_HOURS: &str = "1";
pub const DEFAULT_MEMORY_REQUEST: &str = "10Mi";
pub const DEFAULT_MEMORY_LIMIT: &str = "20Mi";
pub const DEFAULT_CPU_REQUEST: &str = ".05";
pub const DEFAULT_CPU_LIMIT: &str = ".2";
pub const DEFAULT_DAEMONSET_NAME: &str = "kubernetes-image-puller";
pub const DEFAULT_NAMESPACE: &str = "k8s-image-puller";
pub const DEFAULT_KIP_IMAGE: &str = "quay.io/eclipse/kip:next";

/// Raw values by key, as read; what is absent takes the default.
pub type RawConfig = BTreeMap<String, String>;

/// Pull pacing the coordinator imposes on agents; `None` leaves the agent's own setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyOverrides {
    pub max_parallel_pulls: Option<u32>,
    pub check_interval: Option<Duration>,
    pub pull_timeout: Option<Duration>,
}

/// Where the classic sleep-container DaemonSet runs (`KIP_MODE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Only on nodes whose agent has no working runtime (the default).
    #[default]
    Auto,
    /// Never: agents do all the work.
    Cri,
    /// On every node selected, as KIP does.
    Daemonset,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Cri => "cri",
            Mode::Daemonset => "daemonset",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct KipConfig {
    pub mode: Mode,
    pub images: ImageList,
    pub caching_interval_hours: u32,
    /// How often tags are resolved again (and refreshed by agents where they are not):
    /// `KIP_REFRESH_INTERVAL`, else `CACHING_INTERVAL_HOURS`.
    pub refresh_interval: Duration,
    /// `KIP_MAX_NODES_PULLING`: how many nodes pull for kip at once.
    pub max_nodes_pulling: crate::budget::Budget,
    pub memory_request: Quantity,
    pub memory_limit: Quantity,
    pub cpu_request: Quantity,
    pub cpu_limit: Quantity,
    pub daemonset_name: String,
    pub daemonset_annotations: BTreeMap<String, String>,
    pub namespace: String,
    pub node_selector: BTreeMap<String, String>,
    pub image_pull_secrets: Vec<String>,
    pub affinity: Option<Affinity>,
    pub tolerations: Vec<Toleration>,
    pub kip_image: String,
    pub policy: PolicyOverrides,
    /// `KIP_RELEASE`: kip is being uninstalled; agents let go of everything and the
    /// coordinator takes back its node labels and DaemonSet.
    pub release: kip::v1::Release,
}

/// One invalid variable and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct FieldError {
    pub var: &'static str,
    pub reason: String,
}

/// Every problem found, so an operator fixes them in one go.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ConfigError(pub Vec<FieldError>);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read config directory {dir}: {source}")]
    ReadDir { dir: String, source: std::io::Error },
    #[error("cannot read config file {file}: {source}")]
    ReadFile { file: String, source: std::io::Error },
}

/// Reads the known keys: from `dir` (one file per key, as a ConfigMap is mounted) where a
/// file exists, else from the environment. Unknown files are ignored (a ConfigMap may hold more).
pub fn read_sources(dir: Option<&Path>, env: &HashMap<String, String>) -> Result<RawConfig, SourceError> {
    let mut raw = RawConfig::new();
    for key in KEYS {
        if let Some(v) = env.get(key) {
            raw.insert(key.to_string(), v.clone());
        }
    }
    if let Some(dir) = dir {
        // Reading the directory first makes a missing mount an error, not "every key absent".
        std::fs::read_dir(dir).map_err(|source| SourceError::ReadDir { dir: dir.display().to_string(), source })?;
        for key in KEYS {
            // `dir/KEY` is a symlink through `..data`, which Kubernetes swaps atomically.
            let file = dir.join(key);
            match std::fs::read_to_string(&file) {
                Ok(v) => {
                    raw.insert(key.to_string(), v);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(SourceError::ReadFile { file: file.display().to_string(), source }),
            }
        }
    }
    Ok(raw)
}

/// `KIP_RELEASE` as written in the configuration.
pub fn release_name(r: kip::v1::Release) -> &'static str {
    match r {
        kip::v1::Release::None => "",
        kip::v1::Release::Unpin => "unpin",
        kip::v1::Release::Remove => "remove",
    }
}

/// The known keys from a ConfigMap's `data` read through the API, over the environment (as
/// [`read_sources`] does with a mounted directory).
pub fn from_data(data: &BTreeMap<String, String>, env: &HashMap<String, String>) -> RawConfig {
    KEYS.iter()
        .filter_map(|key| data.get(*key).or_else(|| env.get(*key)).map(|v| (key.to_string(), v.clone())))
        .collect()
}

/// Validates everything; returns the typed configuration or every error found.
pub fn validate(raw: &RawConfig) -> Result<KipConfig, ConfigError> {
    let mut errors = Vec::new();
    let get = |key: &str, default: &str| -> String {
        raw.get(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
    };
    let mut err = |var: &'static str, reason: String| errors.push(FieldError { var, reason });

    let images = match raw.get("IMAGES").map(|v| v.trim()) {
        None | Some("") => {
            err("IMAGES", "not set: give the images to cache as `name=image;name=image;`".into());
            None
        }
        Some(v) => match ImageList::parse(v) {
            Ok(list) => Some(list),
            Err(e) => {
                // The parser's message already starts with "IMAGES entry …".
                err("IMAGES", e.to_string().trim_start_matches("IMAGES ").to_string());
                None
            }
        },
    };

    let interval = get("CACHING_INTERVAL_HOURS", DEFAULT_CACHING_INTERVAL_HOURS);
    let caching_interval_hours = match interval.parse::<u32>() {
        Ok(h) if (1..=kip::duration::MAX_CACHING_INTERVAL_HOURS).contains(&h) => Some(h),
        _ => {
            err(
                "CACHING_INTERVAL_HOURS",
                format!(
                    "`{interval}` is not a whole number of hours from 1 to {}",
                    kip::duration::MAX_CACHING_INTERVAL_HOURS
                ),
            );
            None
        }
    };

    let mut quantity = |var: &'static str, default: &str| -> Option<(Quantity, ParsedQuantity)> {
        let v = get(var, default);
        match parse_quantity(&v) {
            Ok(p) => Some((Quantity(v), p)),
            Err(reason) => {
                err(var, reason);
                None
            }
        }
    };
    let memory_request = quantity("CACHING_MEMORY_REQUEST", DEFAULT_MEMORY_REQUEST);
    let memory_limit = quantity("CACHING_MEMORY_LIMIT", DEFAULT_MEMORY_LIMIT);
    let cpu_request = quantity("CACHING_CPU_REQUEST", DEFAULT_CPU_REQUEST);
    let cpu_limit = quantity("CACHING_CPU_LIMIT", DEFAULT_CPU_LIMIT);
    for (req_var, req, lim_var, lim) in [
        ("CACHING_MEMORY_REQUEST", &memory_request, "CACHING_MEMORY_LIMIT", &memory_limit),
        ("CACHING_CPU_REQUEST", &cpu_request, "CACHING_CPU_LIMIT", &cpu_limit),
    ] {
        if let (Some((rq, rp)), Some((lq, lp))) = (req, lim) {
            if rp > lp {
                err(
                    req_var,
                    format!("`{}` is greater than {lim_var} `{}`: a request may not exceed its limit", rq.0, lq.0),
                );
            }
        }
    }

    let daemonset_name = get("DAEMONSET_NAME", DEFAULT_DAEMONSET_NAME);
    if let Err(reason) = check_dns_subdomain(&daemonset_name) {
        err("DAEMONSET_NAME", reason);
    }
    let namespace = get("NAMESPACE", DEFAULT_NAMESPACE);
    if let Err(reason) = check_dns_label(&namespace) {
        err("NAMESPACE", reason);
    }

    let daemonset_annotations = parse_json::<BTreeMap<String, String>>(&get("DAEMONSET_ANNOTATIONS", "{}"));
    let node_selector = parse_json::<BTreeMap<String, String>>(&get("NODE_SELECTOR", "{}"));
    let affinity = parse_json::<Affinity>(&get("AFFINITY", "{}"));
    let tolerations = parse_json::<Vec<Toleration>>(&get("TOLERATIONS", "[]"));
    let daemonset_annotations = daemonset_annotations.map_err(|r| err("DAEMONSET_ANNOTATIONS", r)).ok();
    let node_selector = node_selector.map_err(|r| err("NODE_SELECTOR", r)).ok();
    let affinity = affinity.map_err(|r| err("AFFINITY", r)).ok();
    let tolerations = tolerations.map_err(|r| err("TOLERATIONS", r)).ok();

    let image_pull_secrets: Vec<String> =
        get("IMAGE_PULL_SECRETS", "").split(';').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    for s in &image_pull_secrets {
        if let Err(reason) = check_dns_subdomain(s) {
            err("IMAGE_PULL_SECRETS", format!("secret name {reason}"));
        }
    }

    let kip_image = get("KIP_IMAGE", DEFAULT_KIP_IMAGE);
    if let Err(reason) = kip::images::parse_reference(&kip_image) {
        err("KIP_IMAGE", reason);
    }

    let mode = match get("KIP_MODE", "auto").as_str() {
        "auto" => Mode::Auto,
        "cri" => Mode::Cri,
        "daemonset" => Mode::Daemonset,
        other => {
            err("KIP_MODE", format!("`{other}` is not one of auto, cri, daemonset"));
            Mode::Auto
        }
    };
    let release = match get("KIP_RELEASE", "").as_str() {
        "" => kip::v1::Release::None,
        "unpin" => kip::v1::Release::Unpin,
        "remove" => kip::v1::Release::Remove,
        other => {
            err("KIP_RELEASE", format!("`{other}` is not one of unpin, remove (or empty)"));
            kip::v1::Release::None
        }
    };
    let max_parallel_pulls = match raw.get("KIP_MAX_PARALLEL_PULLS").map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                err("KIP_MAX_PARALLEL_PULLS", format!("`{v}` is not a positive whole number"));
                None
            }
        },
    };
    // Bounded: every agent adds these to instants (an overflow would panic) and loops on them
    // (a refresh interval is a HEAD per tag; 1ms would hammer the runtime and the registry).
    let mut duration = |var: &'static str, (min, max): (Duration, Duration)| match raw
        .get(var)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    {
        None => None,
        Some(v) => kip::duration::parse_within(v, min, max).map_err(|r| err(var, r)).ok(),
    };
    let check_interval = duration("KIP_CHECK_INTERVAL", kip::duration::CHECK_INTERVAL);
    let pull_timeout = duration("KIP_PULL_TIMEOUT", kip::duration::PULL_TIMEOUT);
    let refresh_interval = duration("KIP_REFRESH_INTERVAL", kip::duration::REFRESH_INTERVAL);
    let max_nodes_pulling = get("KIP_MAX_NODES_PULLING", crate::budget::DEFAULT_BUDGET)
        .parse::<crate::budget::Budget>()
        .map_err(|r| err("KIP_MAX_NODES_PULLING", r))
        .ok();

    if !errors.is_empty() {
        return Err(ConfigError(errors));
    }
    // Every Option below is Some when no error was recorded.
    let some = |q: Option<(Quantity, ParsedQuantity)>| q.map(|(q, _)| q).unwrap_or_default();
    let affinity = affinity.unwrap_or_default();
    Ok(KipConfig {
        mode,
        images: images.unwrap_or_default(),
        caching_interval_hours: caching_interval_hours.unwrap_or(1),
        refresh_interval: refresh_interval
            .unwrap_or_else(|| Duration::from_secs(u64::from(caching_interval_hours.unwrap_or(1)) * 3600)),
        max_nodes_pulling: max_nodes_pulling.unwrap_or(crate::budget::Budget::Percent(10)),
        memory_request: some(memory_request),
        memory_limit: some(memory_limit),
        cpu_request: some(cpu_request),
        cpu_limit: some(cpu_limit),
        daemonset_name,
        daemonset_annotations: daemonset_annotations.unwrap_or_default(),
        namespace,
        node_selector: node_selector.unwrap_or_default(),
        image_pull_secrets,
        affinity: (affinity != Affinity::default()).then_some(affinity),
        tolerations: tolerations.unwrap_or_default(),
        kip_image,
        policy: PolicyOverrides { max_parallel_pulls, check_interval, pull_timeout },
        release,
    })
}

/// Kubernetes quantity syntax (`10Mi`, `.05`, `200m`, `1e3`), non-negative.
pub fn parse_quantity(v: &str) -> Result<ParsedQuantity, String> {
    let bad = || format!("`{v}` is not a Kubernetes quantity (like 10Mi, 512M, 0.5 or 200m)");
    // The parser underneath accepts float spellings such as `inf` and `nan`; Kubernetes does not.
    if !v.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '+' || c == '-') {
        return Err(bad());
    }
    let q = ParsedQuantity::try_from(v).map_err(|_| bad())?;
    if q < ParsedQuantity::try_from("0").map_err(|_| bad())? {
        return Err(format!("`{v}` is negative"));
    }
    Ok(q)
}

/// JSON into the real Kubernetes type; unknown fields are errors (a typo is not a no-op).
fn parse_json<T: DeserializeOwned>(v: &str) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_str(v);
    let value: T = serde_ignored::deserialize(&mut de, |path| unknown.push(path.to_string()))
        .map_err(|e| format!("invalid JSON: {e}"))?;
    de.end().map_err(|e| format!("invalid JSON: {e}"))?;
    if !unknown.is_empty() {
        return Err(format!("unknown field `{}`", unknown.join("`, `")));
    }
    Ok(value)
}

fn check_dns_label(v: &str) -> Result<(), String> {
    if kip::images::is_dns_label(v) {
        Ok(())
    } else {
        Err(format!("`{v}` is not a valid name (lowercase letters, digits and `-`, at most 63 characters, starting and ending with a letter or digit)"))
    }
}

fn check_dns_subdomain(v: &str) -> Result<(), String> {
    if kip::images::is_dns_subdomain(v) {
        Ok(())
    } else {
        Err(format!("`{v}` is not a valid name (lowercase letters, digits, `-` and `.`, at most 253 characters)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> RawConfig {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn errors(pairs: &[(&str, &str)]) -> Vec<String> {
        let mut all = vec![("IMAGES", "a=busybox")];
        all.extend_from_slice(pairs);
        match validate(&raw(&all)) {
            Ok(_) => vec![],
            Err(ConfigError(errs)) => errs.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn kip_defaults_apply_when_only_images_is_set() {
        let c = validate(&raw(&[("IMAGES", "a=busybox;")])).unwrap();
        assert_eq!(c.images.len(), 1);
        assert_eq!(c.caching_interval_hours, 1);
        assert_eq!((c.memory_request.0.as_str(), c.memory_limit.0.as_str()), ("10Mi", "20Mi"));
        assert_eq!((c.cpu_request.0.as_str(), c.cpu_limit.0.as_str()), (".05", ".2"));
        assert_eq!(c.daemonset_name, "kubernetes-image-puller");
        assert_eq!(c.namespace, "k8s-image-puller");
        assert_eq!(c.kip_image, DEFAULT_KIP_IMAGE);
        assert!(c.node_selector.is_empty() && c.tolerations.is_empty() && c.affinity.is_none());
        assert!(c.image_pull_secrets.is_empty() && c.daemonset_annotations.is_empty());
        assert_eq!(c.policy, PolicyOverrides::default());
    }

    #[test]
    fn a_kip_users_configmap_works_unchanged() {
        let c = validate(&raw(&[
            ("IMAGES", "java11-maven=quay.io/eclipse/che-java11-maven:next;\nche-theia=quay.io/eclipse/che-theia:next;\n"),
            ("CACHING_INTERVAL_HOURS", "\"1\"".trim_matches('"')),
            ("CACHING_MEMORY_REQUEST", "10Mi"),
            ("CACHING_MEMORY_LIMIT", "20Mi"),
            ("CACHING_CPU_REQUEST", ".05"),
            ("CACHING_CPU_LIMIT", ".2"),
            ("DAEMONSET_NAME", "kubernetes-image-puller"),
            ("NAMESPACE", "k8s-image-puller"),
            ("NODE_SELECTOR", "{\"kubernetes.io/os\": \"linux\"}"),
            ("IMAGE_PULL_SECRETS", "regcred; other-secret"),
            ("AFFINITY", r#"{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"role","operator":"In","values":["worker"]}]}]}}}"#),
            ("TOLERATIONS", r#"[{"key":"dedicated","operator":"Equal","value":"ide","effect":"NoSchedule"}]"#),
            ("DAEMONSET_ANNOTATIONS", r#"{"team":"ide"}"#),
            ("KIP_IMAGE", "quay.io/eclipse/kubernetes-image-puller:next"),
        ]))
        .unwrap();
        assert_eq!(c.images.len(), 2);
        assert_eq!(c.node_selector.get("kubernetes.io/os").map(String::as_str), Some("linux"));
        assert_eq!(c.image_pull_secrets, vec!["regcred", "other-secret"]);
        assert!(c.affinity.unwrap().node_affinity.is_some());
        assert_eq!(c.tolerations[0].key.as_deref(), Some("dedicated"));
        assert_eq!(c.daemonset_annotations.get("team").map(String::as_str), Some("ide"));
    }

    #[test]
    fn images_missing_or_malformed() {
        let e = validate(&raw(&[])).unwrap_err();
        assert_eq!(e.0[0].to_string(), "IMAGES: not set: give the images to cache as `name=image;name=image;`");
        assert_eq!(errors(&[("IMAGES", "a=busybox;nginx")]), vec!["IMAGES: entry 2 `nginx`: expected `name=image`"]);
        assert_eq!(
            errors(&[("IMAGES", "a=busybox;a=nginx")]),
            vec!["IMAGES: entry 2 `a=nginx`: the name `a` is used more than once"]
        );
        // Issue 20 item 10: `;` used to validate as an empty list (every agent unpins
        // everything, every gate opens); an empty list must be said with `none`.
        for empty in [";", " ; ;\n"] {
            let e = errors(&[("IMAGES", empty)]);
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(e[0].starts_with("IMAGES: holds no entry") && e[0].contains("`none`"), "{e:?}");
        }
        let none = validate(&raw(&[("IMAGES", "none")])).unwrap();
        assert!(none.images.is_empty());
    }

    #[test]
    fn the_intervals_published_to_agents_are_bounded() {
        for (var, bad) in [
            ("KIP_CHECK_INTERVAL", "1ms"),
            ("KIP_CHECK_INTERVAL", "300000000000y"),
            ("KIP_PULL_TIMEOUT", "25h"),
            ("KIP_REFRESH_INTERVAL", "31d"),
        ] {
            let e = errors(&[(var, bad)]);
            assert_eq!(e.len(), 1, "{var}={bad}: {e:?}");
            assert!(e[0].starts_with(&format!("{var}: ")), "{e:?}");
        }
        assert!(errors(&[("CACHING_INTERVAL_HOURS", "100000")])[0].contains("from 1 to 720"));
    }

    #[test]
    fn interval_must_be_a_positive_integer() {
        for bad in ["0", "-1", "1.5", "one"] {
            assert_eq!(
                errors(&[("CACHING_INTERVAL_HOURS", bad)]),
                vec![format!("CACHING_INTERVAL_HOURS: `{bad}` is not a whole number of hours from 1 to 720")]
            );
        }
        assert!(errors(&[("CACHING_INTERVAL_HOURS", " 12\n")]).is_empty());
    }

    #[test]
    fn quantities_follow_kubernetes_syntax() {
        for ok in ["10Mi", "1Gi", "512M", "0.5", ".05", "200m", "1e3", "0"] {
            assert!(parse_quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["10MB", "ten", "inf", "nan", "", "1.2.3", "Mi"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
        assert_eq!(
            errors(&[("CACHING_MEMORY_LIMIT", "20MB")]),
            vec!["CACHING_MEMORY_LIMIT: `20MB` is not a Kubernetes quantity (like 10Mi, 512M, 0.5 or 200m)"]
        );
        assert_eq!(errors(&[("CACHING_CPU_REQUEST", "-1")]), vec!["CACHING_CPU_REQUEST: `-1` is negative"]);
    }

    #[test]
    fn request_may_not_exceed_limit() {
        assert_eq!(
            errors(&[("CACHING_CPU_REQUEST", "500m"), ("CACHING_CPU_LIMIT", ".2")]),
            vec!["CACHING_CPU_REQUEST: `500m` is greater than CACHING_CPU_LIMIT `.2`: a request may not exceed its limit"]
        );
        assert_eq!(
            errors(&[("CACHING_MEMORY_REQUEST", "1Gi"), ("CACHING_MEMORY_LIMIT", "1000Mi")]),
            vec!["CACHING_MEMORY_REQUEST: `1Gi` is greater than CACHING_MEMORY_LIMIT `1000Mi`: a request may not exceed its limit"]
        );
        assert!(errors(&[("CACHING_MEMORY_REQUEST", "1Gi"), ("CACHING_MEMORY_LIMIT", "1024Mi")]).is_empty());
    }

    #[test]
    fn json_values_parse_into_kubernetes_types() {
        let e = errors(&[("NODE_SELECTOR", "{\"a\": 1}")]);
        assert!(e[0].starts_with("NODE_SELECTOR: invalid JSON: invalid type: integer `1`, expected a string"), "{e:?}");
        let e = errors(&[("AFFINITY", "{nodeAffinity")]);
        assert!(e[0].starts_with("AFFINITY: invalid JSON: key must be a string at line 1 column 2"), "{e:?}");
        assert_eq!(errors(&[("AFFINITY", r#"{"nodeAffinty":{}}"#)]), vec!["AFFINITY: unknown field `nodeAffinty`"]);
        let e = errors(&[("TOLERATIONS", r#"{"key":"a"}"#)]);
        assert!(e[0].starts_with("TOLERATIONS: invalid JSON: invalid type: map, expected a sequence"), "{e:?}");
        assert_eq!(
            errors(&[("TOLERATIONS", r#"[{"key":"a","efect":"NoSchedule"}]"#)]),
            vec!["TOLERATIONS: unknown field `0.efect`"]
        );
        let e = errors(&[("DAEMONSET_ANNOTATIONS", "[]")]);
        assert!(e[0].starts_with("DAEMONSET_ANNOTATIONS: invalid JSON"), "{e:?}");
        assert!(errors(&[("AFFINITY", "{} trailing")])[0].starts_with("AFFINITY: invalid JSON: trailing characters"));
    }

    #[test]
    fn names_and_images() {
        assert_eq!(errors(&[("DAEMONSET_NAME", "Bad_Name")]), vec!["DAEMONSET_NAME: `Bad_Name` is not a valid name (lowercase letters, digits, `-` and `.`, at most 253 characters)"]);
        assert_eq!(errors(&[("NAMESPACE", "a.b")]).len(), 1);
        assert_eq!(errors(&[("IMAGE_PULL_SECRETS", "ok;Not OK")]), vec!["IMAGE_PULL_SECRETS: secret name `Not OK` is not a valid name (lowercase letters, digits, `-` and `.`, at most 253 characters)"]);
        assert_eq!(
            errors(&[("KIP_IMAGE", "bad image!")]),
            vec!["KIP_IMAGE: `bad image!` is not a valid image reference: invalid reference format"]
        );
    }

    #[test]
    fn policy_overrides() {
        let c = validate(&raw(&[
            ("IMAGES", "a=b"),
            ("KIP_MAX_PARALLEL_PULLS", "5"),
            ("KIP_CHECK_INTERVAL", "30s"),
            ("KIP_PULL_TIMEOUT", "10m"),
        ]))
        .unwrap();
        assert_eq!(c.policy.max_parallel_pulls, Some(5));
        assert_eq!(c.policy.check_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.policy.pull_timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            errors(&[("KIP_MAX_PARALLEL_PULLS", "0")]),
            vec!["KIP_MAX_PARALLEL_PULLS: `0` is not a positive whole number"]
        );
        assert_eq!(errors(&[("KIP_CHECK_INTERVAL", "often")]).len(), 1);
    }

    #[test]
    fn mode_is_one_of_three() {
        assert_eq!(validate(&raw(&[("IMAGES", "a=b")])).unwrap().mode, Mode::Auto);
        assert_eq!(validate(&raw(&[("IMAGES", "a=b"), ("KIP_MODE", "daemonset")])).unwrap().mode, Mode::Daemonset);
        assert_eq!(validate(&raw(&[("IMAGES", "a=b"), ("KIP_MODE", "cri")])).unwrap().mode, Mode::Cri);
        assert_eq!(
            errors(&[("KIP_MODE", "fallback")]),
            vec!["KIP_MODE: `fallback` is not one of auto, cri, daemonset"]
        );
        let release = |v: &str| validate(&raw(&[("IMAGES", "a=b"), ("KIP_RELEASE", v)])).map(|c| c.release);
        assert_eq!(release(""), Ok(kip::v1::Release::None));
        assert_eq!(release("unpin"), Ok(kip::v1::Release::Unpin));
        assert_eq!(release(" remove\n"), Ok(kip::v1::Release::Remove));
        assert_eq!(
            errors(&[("KIP_RELEASE", "yes")]),
            vec!["KIP_RELEASE: `yes` is not one of unpin, remove (or empty)"]
        );
    }

    #[test]
    fn refresh_interval_and_pull_budget_are_kips_own_keys() {
        let c = validate(&raw(&[("IMAGES", "a=busybox"), ("CACHING_INTERVAL_HOURS", "6")])).unwrap();
        assert_eq!(
            c.refresh_interval,
            Duration::from_secs(6 * 3600),
            "CACHING_INTERVAL_HOURS without KIP_REFRESH_INTERVAL"
        );
        assert_eq!(c.max_nodes_pulling, crate::budget::Budget::Percent(10));
        let c =
            validate(&raw(&[("IMAGES", "a=busybox"), ("KIP_REFRESH_INTERVAL", "30m"), ("KIP_MAX_NODES_PULLING", "3")]))
                .unwrap();
        assert_eq!(
            (c.refresh_interval, c.max_nodes_pulling),
            (Duration::from_secs(1800), crate::budget::Budget::Nodes(3))
        );
        assert_eq!(
            errors(&[("KIP_REFRESH_INTERVAL", "500ms"), ("KIP_MAX_NODES_PULLING", "0")]),
            vec![
                "KIP_REFRESH_INTERVAL: `500ms` is out of range: between 1s and 30days".to_string(),
                "KIP_MAX_NODES_PULLING: `0`: at least one node must be allowed to pull (100% lifts the limit)"
                    .to_string()
            ]
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let e =
            validate(&raw(&[("IMAGES", "x"), ("CACHING_INTERVAL_HOURS", "0"), ("NODE_SELECTOR", "[")])).unwrap_err();
        assert_eq!(
            e.0.iter().map(|f| f.var).collect::<Vec<_>>(),
            vec!["IMAGES", "CACHING_INTERVAL_HOURS", "NODE_SELECTOR"]
        );
        assert!(e.to_string().starts_with("invalid configuration: IMAGES: entry 1 `x`"), "{e}");
    }

    #[test]
    fn directory_values_override_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        // Kubernetes' layout: KEY -> ..data/KEY, ..data -> ..2026_11_25_timestamp
        let ts = dir.path().join("..2026_11_25_12_00_00.000000001");
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("IMAGES"), "a=from-dir\n").unwrap();
        std::os::unix::fs::symlink(&ts, dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/IMAGES", dir.path().join("IMAGES")).unwrap();
        let env: HashMap<String, String> = [("IMAGES", "a=from-env"), ("NAMESPACE", "from-env"), ("PATH", "/bin")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let raw = read_sources(Some(dir.path()), &env).unwrap();
        assert_eq!(raw.get("IMAGES").map(String::as_str), Some("a=from-dir\n"));
        assert_eq!(raw.get("NAMESPACE").map(String::as_str), Some("from-env"));
        assert!(!raw.contains_key("PATH"));
        let err = read_sources(Some(Path::new("/nonexistent/kip-config")), &env).unwrap_err();
        assert!(err.to_string().starts_with("cannot read config directory /nonexistent/kip-config"), "{err}");
    }
}
