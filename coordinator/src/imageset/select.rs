//! Label selectors (`matchLabels`, `matchExpressions`) matched against a node's labels, as the
//! API server matches them: every requirement must hold; an empty selector matches everything.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A selector checked once: what a set's nodes must carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("spec.nodeSelector: {0}")]
pub struct SelectorError(String);

impl Selector {
    /// Pure: the selector `s` says (`None`: every node). An unknown operator, or values where
    /// the operator takes none (or none where it needs some), is an error naming it.
    pub fn parse(s: Option<&LabelSelector>) -> Result<Self, SelectorError> {
        let Some(s) = s else { return Ok(Self::default()) };
        let mut requirements: Vec<Requirement> =
            s.match_labels.iter().flatten().map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()])).collect();
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let values = e.values.clone().unwrap_or_default();
            let at = |what: &str| SelectorError(format!("matchExpressions[{i}] ({} {}): {what}", e.key, e.operator));
            let requirement = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => return Err(at("needs values")),
                "Exists" | "DoesNotExist" if !values.is_empty() => return Err(at("takes no values")),
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                _ => return Err(at("unknown operator (In, NotIn, Exists, DoesNotExist)")),
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    /// Pure: the selector as node affinity requirements (the same operators, the same meaning:
    /// `NotIn` holds where the label is absent); `None` where one cannot be said there: node
    /// affinity needs a value list of at least one for `In` and `NotIn`, as parsing ensured.
    pub fn node_requirements(&self) -> Option<Vec<k8s_openapi::api::core::v1::NodeSelectorRequirement>> {
        use k8s_openapi::api::core::v1::NodeSelectorRequirement as R;
        let r = |key: &str, operator: &str, values: Option<&Vec<String>>| R {
            key: key.into(),
            operator: operator.into(),
            values: values.cloned(),
        };
        self.0
            .iter()
            .map(|requirement| match requirement {
                Requirement::In(k, vs) if !vs.is_empty() => Some(r(k, "In", Some(vs))),
                Requirement::NotIn(k, vs) if !vs.is_empty() => Some(r(k, "NotIn", Some(vs))),
                Requirement::Exists(k) => Some(r(k, "Exists", None)),
                Requirement::DoesNotExist(k) => Some(r(k, "DoesNotExist", None)),
                _ => None,
            })
            .collect()
    }

    /// Pure: whether a node with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(json: serde_json::Value) -> Result<Selector, SelectorError> {
        Selector::parse(Some(&serde_json::from_value(json).unwrap()))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_requirement_must_hold_and_an_empty_selector_takes_every_node() {
        let gpu = labels(&[("pool", "gpu"), ("zone", "a")]);
        let cpu = labels(&[("pool", "cpu")]);
        assert!(Selector::parse(None).unwrap().matches(&cpu));
        assert!(selector(serde_json::json!({})).unwrap().matches(&cpu));
        let s = selector(serde_json::json!({"matchLabels": {"pool": "gpu"}})).unwrap();
        assert!(s.matches(&gpu) && !s.matches(&cpu));
        let s = selector(serde_json::json!({"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["gpu", "tpu"]},
            {"key": "zone", "operator": "Exists"},
            {"key": "spot", "operator": "DoesNotExist"},
            {"key": "zone", "operator": "NotIn", "values": ["b"]},
        ]}))
        .unwrap();
        assert!(s.matches(&gpu));
        assert!(!s.matches(&labels(&[("pool", "gpu"), ("zone", "b")])), "NotIn");
        assert!(!s.matches(&labels(&[("pool", "gpu")])), "Exists");
        assert!(!s.matches(&labels(&[("pool", "gpu"), ("zone", "a"), ("spot", "1")])), "DoesNotExist");
        // NotIn holds where the label is absent, as in Kubernetes.
        let s =
            selector(serde_json::json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}));
        assert!(s.unwrap().matches(&cpu));
    }

    #[test]
    fn a_malformed_requirement_is_named() {
        let e =
            selector(serde_json::json!({"matchExpressions": [{"key": "pool", "operator": "Like", "values": ["g"]}]}));
        assert!(e.unwrap_err().to_string().contains("matchExpressions[0] (pool Like): unknown operator"));
        let e = selector(serde_json::json!({"matchExpressions": [{"key": "pool", "operator": "In"}]}));
        assert!(e.unwrap_err().to_string().contains("needs values"));
        let e =
            selector(serde_json::json!({"matchExpressions": [{"key": "pool", "operator": "Exists", "values": ["x"]}]}));
        assert!(e.unwrap_err().to_string().contains("takes no values"));
    }
}
