//! Who may call the coordinator's gRPC API as a node. With `--agent-auth tokenreview` every
//! `Watch` and `Report` carries the agent pod's projected ServiceAccount token (audience `kip`);
//! the coordinator has the API server review it (TokenReview, cached until shortly before the
//! token expires), requires the agent's ServiceAccount, and binds the call to the node the
//! token's pod runs on: the token's node-name claim where the cluster provides it (Kubernetes
//! 1.30+), else the pod's `spec.nodeName`. A call for another node is refused
//! (`PermissionDenied`), a missing or bad token too (`Unauthenticated`); when nothing can verify
//! (no API reachable) the call is refused (`Unavailable`): the check fails closed.
//! Tokens are never logged, counted by value or kept: the cache is keyed by their SHA-256.

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
/// Enough for every agent of a large cluster with a rotated token each; beyond it the least
/// used entries go (expired ones go on their own).
const CACHE_ENTRIES: u64 = 20_000;
/// A refused token is refused again without a review for this long: a caller that repeats a
/// bad token costs the API server one review per interval.
const REFUSAL_CACHE: Duration = Duration::from_secs(10);
/// Reviews in flight at once; more callers wait for one to finish, at most [`REVIEW_QUEUE_WAIT`].
const CONCURRENT_REVIEWS: usize = 8;
const REVIEW_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// A ServiceAccount token is a JWT of one to two KiB; anything much longer is not one.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

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
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
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

/// Pure: whether `token` can be an agent's projected ServiceAccount token for `audience` at
/// `now`, judged from its text alone (the signature is the API server's to check): a JWT of three
/// base64url parts, not too long, whose claims have an `exp` still ahead and `audience` in `aud`.
/// What fails here is refused without a TokenReview, so random strings cost the API nothing.
pub fn plausible_token(token: &str, audience: &str, now: SystemTime) -> Result<(), Refusal> {
    let malformed = |why: &str| Err(Refusal::Invalid(format!("not a ServiceAccount token: {why}")));
    if token.len() > MAX_TOKEN_BYTES {
        return malformed("too long");
    }
    let parts: Vec<&str> = token.split('.').collect();
    let base64url = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if parts.len() != 3 || !parts.iter().all(|p| base64url(p)) {
        return malformed("not a JWT");
    }
    let Some(claims) = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return malformed("its claims are not JSON");
    };
    let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_u64) else {
        return malformed("no expiry");
    };
    if SystemTime::UNIX_EPOCH + Duration::from_secs(exp) <= now {
        return Err(Refusal::Invalid("the token has expired".into()));
    }
    let for_kip = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => a == audience,
        Some(serde_json::Value::Array(a)) => a.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !for_kip {
        return Err(Refusal::Invalid(format!("not issued for the audience {audience:?}")));
    }
    Ok(())
}

/// Pure: until when a token verified at `now` is trusted without another review.
pub fn trusted_until(token: &str, now: SystemTime) -> SystemTime {
    let cap = now + CACHE_AT_MOST;
    match jwt_expiry(token) {
        Some(exp) => exp.checked_sub(EXPIRY_MARGIN).unwrap_or(now).max(now).min(cap),
        None => cap,
    }
}

/// What a review said of a token, kept under the token's SHA-256 for `ttl`.
#[derive(Clone)]
struct Reviewed {
    node: Result<String, Refusal>,
    ttl: Duration,
}

/// Each entry lives as long as it says.
struct OwnLife;

impl moka::Expiry<[u8; 32], Reviewed> for OwnLife {
    fn expire_after_create(&self, _: &[u8; 32], v: &Reviewed, _: std::time::Instant) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// A refusal, and whether it is news worth a warning (a fresh review's) or a repeat (the cache's,
/// or a string that is no token at all: logged at debug, counted all the same).
pub struct Refused {
    pub refusal: Refusal,
    pub quiet: bool,
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Self { refusal, quiet: false }
    }
}

pub struct TokenVerifier {
    /// The Kubernetes API, once reached (`None` before: calls are refused as Unavailable).
    client: watch::Receiver<Option<Client>>,
    agents: ServiceAccount,
    audience: String,
    cache: moka::sync::Cache<[u8; 32], Reviewed>,
    reviews: tokio::sync::Semaphore,
}

impl TokenVerifier {
    pub fn new(client: watch::Receiver<Option<Client>>, agents: ServiceAccount, audience: String) -> Self {
        let cache = moka::sync::Cache::builder().max_capacity(CACHE_ENTRIES).expire_after(OwnLife).build();
        Self { client, agents, audience, cache, reviews: tokio::sync::Semaphore::new(CONCURRENT_REVIEWS) }
    }

    /// The node `token` may speak for.
    async fn node_of(&self, token: &str) -> Result<String, Refused> {
        let now = SystemTime::now();
        plausible_token(token, &self.audience, now).map_err(|refusal| Refused { refusal, quiet: true })?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // A refusal from the cache was warned about when it was decided.
        let cached =
            || self.cache.get(&key).map(|known| known.node.map_err(|refusal| Refused { refusal, quiet: true }));
        if let Some(known) = cached() {
            return known;
        }
        let client = self
            .client
            .borrow()
            .clone()
            .ok_or_else(|| Refusal::Unavailable("the Kubernetes API has not been reached yet".into()))?;
        // Bounded: a flood of calls queues here instead of becoming a flood of TokenReviews.
        let _review = tokio::time::timeout(REVIEW_QUEUE_WAIT, self.reviews.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| Refusal::Unavailable("too many token reviews in flight; try again".into()))?;
        // Another call with this token may have had it reviewed while this one waited.
        if let Some(known) = cached() {
            return known;
        }
        let node = self.review(client, token).await;
        let ttl = match &node {
            Ok(_) => trusted_until(token, now).duration_since(now).unwrap_or_default(),
            // Not a verdict on the token: asked again at the next call.
            Err(Refusal::Unavailable(_)) => Duration::ZERO,
            Err(_) => REFUSAL_CACHE,
        };
        if !ttl.is_zero() {
            self.cache.insert(key, Reviewed { node: node.clone(), ttl });
        }
        Ok(node?)
    }

    /// One TokenReview (and, on clusters before 1.30, one pod read).
    async fn review(&self, client: Client, token: &str) -> Result<String, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        let id = identity(&reviewed.status.unwrap_or_default(), &self.agents, &self.audience)?;
        match (id.node, id.pod) {
            (Some(node), _) => Ok(node),
            (None, Some(pod)) => self.node_of_pod(client, &pod).await,
            (None, None) => Err(Refusal::Invalid("the token is not bound to a pod".into())),
        }
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
    /// Allows a call for `node` or says why not (counted, and logged without the token). `Ok`
    /// holds until when the call's token is good (`None`: no token checked): a Watch stream
    /// ends then, and the agent comes back with its rotated token (a stream never outlives its
    /// token, nor so its pod).
    pub async fn check(
        &self,
        metadata: &MetadataMap,
        node: &str,
        metrics: &Metrics,
    ) -> Result<Option<SystemTime>, Status> {
        let AgentAuth::TokenReview(verifier) = self else { return Ok(None) };
        let result = match bearer(metadata) {
            Ok(token) => match verifier.node_of(token).await {
                Ok(token_node) if token_node == node => Ok(jwt_expiry(token)),
                Ok(token_node) => Err(Refusal::WrongNode { token_node, claimed: node.to_string() }.into()),
                Err(refused) => Err(refused),
            },
            Err(e) => Err(e.into()),
        };
        result.map_err(|Refused { refusal, quiet }| {
            metrics.refused(refusal.reason());
            if quiet {
                tracing::debug!(node, reason = refusal.reason(), error = %refusal, "agent call refused");
            } else {
                tracing::warn!(node, reason = refusal.reason(), error = %refusal, "agent call refused");
            }
            refusal.status()
        })
    }
}

/// How long before its token expires a Watch stream is ended (the agent's kubelet has rotated
/// the token file by then: it does so at 80% of the token's life).
pub const STREAM_END_BEFORE_EXPIRY: Duration = EXPIRY_MARGIN;

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
    fn only_a_jwt_for_kip_that_has_not_expired_is_sent_for_review() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token =
            |claims: serde_json::Value| format!("{}.{}.c2ln", b64(serde_json::json!({"alg": "RS256"})), b64(claims));
        assert_eq!(plausible_token(&token(serde_json::json!({"aud": ["kip"], "exp": 1_000_600})), "kip", now), Ok(()));
        assert_eq!(plausible_token(&token(serde_json::json!({"aud": "kip", "exp": 1_000_600})), "kip", now), Ok(()));
        let refused = |t: &str| match plausible_token(t, "kip", now) {
            Err(Refusal::Invalid(why)) => why,
            other => panic!("{t:.30}: {other:?}"),
        };
        assert!(refused(&token(serde_json::json!({"aud": ["kip"], "exp": 999_999}))).contains("expired"));
        assert!(refused(&token(serde_json::json!({"aud": ["api"], "exp": 1_000_600}))).contains("audience"));
        assert!(refused(&token(serde_json::json!({"aud": ["kip"]}))).contains("no expiry"));
        assert!(refused("abc.!!!.def").contains("not a JWT"));
        assert!(refused("abc.def").contains("not a JWT"));
        assert!(refused("a..b").contains("not a JWT"));
        assert!(refused("abc.def.ghi").contains("not JSON"));
        assert!(refused(&"a".repeat(MAX_TOKEN_BYTES + 1)).contains("too long"));
    }

    #[test]
    fn the_service_account_is_namespace_colon_name() {
        assert_eq!(agents().username(), "system:serviceaccount:kip:kip-agent");
        for bad in ["kip", ":a", "a:", "a:b:c"] {
            assert!(bad.parse::<ServiceAccount>().is_err(), "{bad}");
        }
    }
}
