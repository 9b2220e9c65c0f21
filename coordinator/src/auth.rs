//! Who may call the coordinator's gRPC API as a node. With `--agent-auth tokenreview` every
//! `Watch` and `Report` carries the agent pod's projected ServiceAccount token (audience `kip`);
//! the coordinator has the API server review it (TokenReview, cached until shortly before the
//! token expires), requires the agent's ServiceAccount, and binds the call to the node the
//! token's pod runs on: the token's node-name claim where the cluster provides it (Kubernetes
//! 1.30+), else the pod's `spec.nodeName`. A call for another node is refused
//! (`PermissionDenied`), a missing or bad token too (`Unauthenticated`); when nothing can verify
//! (no API reachable) the call is refused (`Unavailable`): the check fails closed.
//! Tokens are never logged, counted by value or kept: the cache is keyed by their SHA-256.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::metrics::Metrics;

pub const DEFAULT_AUDIENCE: &str = "kip";
const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";
const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
/// A verified token is trusted this long at most (then reviewed again), and never past its
/// expiry minus [`EXPIRY_MARGIN`].
const CACHE_AT_MOST: Duration = Duration::from_secs(300);
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Enough for every agent of a large cluster with a rotated token each; beyond it the oldest
/// entries go.
const CACHE_ENTRIES: usize = 20_000;

/// `--agent-auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Verify the agent's ServiceAccount token with TokenReview (fails closed)
    Tokenreview,
    /// Accept every call (outside Kubernetes: the demo, tests on loopback)
    None,
}

/// The agents' ServiceAccount, `NAMESPACE:NAME` (as in its username
/// `system:serviceaccount:NAMESPACE:NAME`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for ServiceAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok(Self { namespace: ns.into(), name: name.into() })
            }
            _ => Err(format!("{s:?} is not NAMESPACE:NAME")),
        }
    }
}

impl ServiceAccount {
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// Why a call was refused. Never carries the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("no bearer token (the agent needs KIP_TOKEN_FILE, a projected ServiceAccount token with audience kip)")]
    Missing,
    #[error("the token was not accepted: {0}")]
    Invalid(String),
    #[error("the token belongs to {0}, not to the agents' ServiceAccount")]
    WrongAccount(String),
    #[error("the token's pod runs on node {token_node:?}, the call is for node {claimed:?}")]
    WrongNode { token_node: String, claimed: String },
    #[error("cannot verify the token now: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing | Refusal::Invalid(_) => "unauthenticated",
            Refusal::WrongAccount(_) | Refusal::WrongNode { .. } => "permission_denied",
            Refusal::Unavailable(_) => "unavailable",
        }
    }

    /// The status the agent gets, marked as the coordinator's own answer (an agent does not take
    /// "cannot verify the token now" for an unreachable coordinator and pull outside the budget).
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        kip::v1::coordinator_status(match self {
            Refusal::Missing | Refusal::Invalid(_) => Status::unauthenticated(msg),
            Refusal::WrongAccount(_) | Refusal::WrongNode { .. } => Status::permission_denied(msg),
            Refusal::Unavailable(_) => Status::unavailable(msg),
        })
    }
}

/// Pure: the bearer token of a call.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Refusal> {
    let value = metadata.get("authorization").ok_or(Refusal::Missing)?;
    let value = value.to_str().map_err(|_| Refusal::Invalid("the authorization header is not text".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(Refusal::Invalid("the authorization header is not `Bearer <token>`".into())),
    }
}

/// Who a reviewed token is: the pod it is bound to and, where the cluster says, its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub pod: Option<String>,
    pub node: Option<String>,
}

/// Pure: the identity in a TokenReview answer, if it is an agent's token for `audience`.
pub fn identity(status: &TokenReviewStatus, agents: &ServiceAccount, audience: &str) -> Result<Identity, Refusal> {
    if status.authenticated != Some(true) {
        let why = status.error.clone().filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        return Err(Refusal::Invalid(why));
    }
    // An empty list means the API server's own audience: a token for the API, not for kip.
    if !status.audiences.as_ref().is_some_and(|a| a.iter().any(|a| a == audience)) {
        return Err(Refusal::Invalid(format!("not issued for the audience {audience:?}")));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username != agents.username() {
        return Err(Refusal::WrongAccount(username));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
    Ok(Identity { pod: first(POD_NAME_KEY), node: first(NODE_NAME_KEY) })
}

/// Pure: the `exp` claim of a JWT, read without verifying it (the API server did).
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&bytes).ok()?.get("exp")?.as_u64()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
}

/// Pure: until when a token verified at `now` is trusted without another review.
pub fn trusted_until(token: &str, now: SystemTime) -> SystemTime {
    let cap = now + CACHE_AT_MOST;
    match jwt_expiry(token) {
        Some(exp) => exp.checked_sub(EXPIRY_MARGIN).unwrap_or(now).max(now).min(cap),
        None => cap,
    }
}

struct Verified {
    node: String,
    until: SystemTime,
}

pub struct TokenVerifier {
    /// The Kubernetes API, once reached (`None` before: calls are refused as Unavailable).
    client: watch::Receiver<Option<Client>>,
    agents: ServiceAccount,
    audience: String,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
}

impl TokenVerifier {
    pub fn new(client: watch::Receiver<Option<Client>>, agents: ServiceAccount, audience: String) -> Self {
        Self { client, agents, audience, cache: Mutex::new(HashMap::new()) }
    }

    /// The node `token` may speak for.
    async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = SystemTime::now();
        if let Some(v) =
            self.cache.lock().ok().and_then(|c| c.get(&key).filter(|v| v.until > now).map(|v| v.node.clone()))
        {
            return Ok(v);
        }
        let client = self
            .client
            .borrow()
            .clone()
            .ok_or_else(|| Refusal::Unavailable("the Kubernetes API has not been reached yet".into()))?;
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        let id = identity(&reviewed.status.unwrap_or_default(), &self.agents, &self.audience)?;
        let node = match (id.node, id.pod) {
            (Some(node), _) => node,
            (None, Some(pod)) => self.node_of_pod(client, &pod).await?,
            (None, None) => return Err(Refusal::Invalid("the token is not bound to a pod".into())),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, v| v.until > now);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, Verified { node: node.clone(), until: trusted_until(token, now) });
        }
        Ok(node)
    }

    /// Clusters before 1.30 put no node in the token: the pod's `spec.nodeName` says it.
    async fn node_of_pod(&self, client: Client, pod: &str) -> Result<String, Refusal> {
        let found = Api::<Pod>::namespaced(client, &self.agents.namespace)
            .get_opt(pod)
            .await
            .map_err(|e| Refusal::Unavailable(format!("reading the agent pod {pod}: {e}")))?;
        let found = found.ok_or_else(|| Refusal::Invalid(format!("its pod {pod} does not exist")))?;
        found
            .spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| Refusal::Invalid(format!("its pod {pod} is not scheduled to a node")))
    }
}

/// How the gRPC service checks its callers.
pub enum AgentAuth {
    None,
    TokenReview(TokenVerifier),
}

impl AgentAuth {
    /// Allows a call for `node` or says why not (counted and logged, without the token).
    pub async fn check(&self, metadata: &MetadataMap, node: &str, metrics: &Metrics) -> Result<(), Status> {
        let AgentAuth::TokenReview(verifier) = self else { return Ok(()) };
        let result = match bearer(metadata) {
            Ok(token) => verifier.node_of(token).await.and_then(|token_node| {
                if token_node == node {
                    Ok(())
                } else {
                    Err(Refusal::WrongNode { token_node, claimed: node.to_string() })
                }
            }),
            Err(e) => Err(e),
        };
        result.map_err(|refusal| {
            metrics.refused(refusal.reason());
            tracing::warn!(node, reason = refusal.reason(), error = %refusal, "agent call refused");
            refusal.status()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents() -> ServiceAccount {
        "kip:kip-agent".parse().unwrap()
    }

    fn status(v: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_bearer_token_is_taken_from_the_authorization_header_only() {
        let mut m = MetadataMap::new();
        assert_eq!(bearer(&m), Err(Refusal::Missing));
        m.insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
        assert_eq!(bearer(&m), Ok("abc.def.ghi"));
        m.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert!(matches!(bearer(&m), Err(Refusal::Invalid(_))));
        m.insert("authorization", "Bearer ".parse().unwrap());
        assert!(matches!(bearer(&m), Err(Refusal::Invalid(_))));
    }

    #[test]
    fn a_review_names_the_agents_node_or_its_pod() {
        let ok = status(serde_json::json!({
            "authenticated": true, "audiences": ["kip"],
            "user": {"username": "system:serviceaccount:kip:kip-agent", "extra": {
                NODE_NAME_KEY: ["node-1"], POD_NAME_KEY: ["kip-agent-x"]}}}));
        assert_eq!(
            identity(&ok, &agents(), "kip"),
            Ok(Identity { pod: Some("kip-agent-x".into()), node: Some("node-1".into()) })
        );
        let old_cluster = status(serde_json::json!({
            "authenticated": true, "audiences": ["kip"],
            "user": {"username": "system:serviceaccount:kip:kip-agent", "extra": {POD_NAME_KEY: ["kip-agent-x"]}}}));
        assert_eq!(
            identity(&old_cluster, &agents(), "kip"),
            Ok(Identity { pod: Some("kip-agent-x".into()), node: None })
        );
    }

    #[test]
    fn a_review_of_another_account_audience_or_a_bad_token_is_refused() {
        let other = status(serde_json::json!({
            "authenticated": true, "audiences": ["kip"], "user": {"username": "system:serviceaccount:default:default"}}));
        assert_eq!(
            identity(&other, &agents(), "kip"),
            Err(Refusal::WrongAccount("system:serviceaccount:default:default".into()))
        );
        let api_token = status(serde_json::json!({
            "authenticated": true, "user": {"username": "system:serviceaccount:kip:kip-agent"}}));
        assert!(matches!(identity(&api_token, &agents(), "kip"), Err(Refusal::Invalid(_))), "no audience: the API's");
        let bad = status(serde_json::json!({"authenticated": false, "error": "invalid bearer token"}));
        assert_eq!(identity(&bad, &agents(), "kip"), Err(Refusal::Invalid("invalid bearer token".into())));
        assert_eq!(Refusal::Missing.status().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            Refusal::WrongNode { token_node: "a".into(), claimed: "b".into() }.status().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(Refusal::Unavailable("x".into()).status().code(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_token_is_trusted_until_shortly_before_it_expires_and_five_minutes_at_most() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let jwt = |exp: u64| {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
            format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig")
        };
        assert_eq!(jwt_expiry(&jwt(1_000_600)), Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_600)));
        assert_eq!(trusted_until(&jwt(1_000_120), now), now + Duration::from_secs(90));
        assert_eq!(trusted_until(&jwt(1_003_600), now), now + CACHE_AT_MOST);
        assert_eq!(trusted_until(&jwt(999_000), now), now, "an expired token is not cached");
        assert_eq!(trusted_until("opaque", now), now + CACHE_AT_MOST);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
    }

    #[test]
    fn the_service_account_is_namespace_colon_name() {
        assert_eq!(agents().username(), "system:serviceaccount:kip:kip-agent");
        for bad in ["kip", ":a", "a:", "a:b:c"] {
            assert!(bad.parse::<ServiceAccount>().is_err(), "{bad}");
        }
    }
}
