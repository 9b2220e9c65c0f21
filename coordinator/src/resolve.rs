//! Tags resolved once per cluster. The coordinator asks each listed tag's registry for its
//! manifest digest with one `HEAD` (oci-client: the distribution API with the registries' token
//! auth, credentials from an image set's pull secrets or the mounted ones) at start-up, whenever
//! the tags or their credentials change and every refresh interval, and publishes the digests. Agents pull only where their node's
//! digest differs: the registry sees one HEAD per tag per interval instead of a pull per node.
//! A tag that cannot be resolved (air-gapped cluster, bad credentials, registry down) goes out
//! without a digest, and agents refresh it on their own interval as before.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use kip::images::ImageEntry;
use kip::pull_secrets::{Credentials, Keyring};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::state::State;

/// What the resolver found for one tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    Digest(String),
    /// Why not, for `/status` and the log (never a credential).
    Unresolved(String),
}

/// HEADs in flight at once: a long list is resolved in a few round trips without a burst.
const CONCURRENT_HEADS: usize = 8;

/// A registry answer's class for `kip_registry_requests_total{result}`, and whether oci-client
/// sent a GET after the HEAD (it does when the HEAD answer carries no digest, as error answers
/// do not; a connection that failed sent nothing more).
fn classify(e: &OciDistributionError) -> (&'static str, bool) {
    use oci_client::errors::OciErrorCode;
    match e {
        OciDistributionError::UnauthorizedError { .. } => ("unauthorized", true),
        OciDistributionError::AuthenticationFailure(_) => ("unauthorized", false),
        OciDistributionError::ImageManifestNotFoundError(_) => ("not_found", true),
        OciDistributionError::RegistryError { envelope, .. } => {
            let not_found = envelope.errors.iter().any(|e| {
                matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound)
            });
            let denied =
                envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::Denied | OciErrorCode::Unauthorized));
            (
                if not_found {
                    "not_found"
                } else if denied {
                    "unauthorized"
                } else {
                    "error"
                },
                true,
            )
        }
        OciDistributionError::ServerError { code: 404, .. } => ("not_found", true),
        OciDistributionError::ServerError { code: 401 | 403, .. } => ("unauthorized", true),
        OciDistributionError::ServerError { .. } => ("error", true),
        _ => ("unreachable", false),
    }
}

/// An error with its causes: reqwest says "error sending request" and keeps why (an unknown
/// certificate issuer, a refused connection) in its sources.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

pub struct Resolver {
    /// Registries spoken to over plain HTTP.
    plain_http: Vec<String>,
    /// The mounted pull secrets (`--pull-secrets-dir`), read for every round (rotation).
    secrets_dir: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

impl Resolver {
    /// `plain_http`: registries (`host:port`) spoken to over plain HTTP, like a node's
    /// `hosts.toml` with an `http://` server.
    pub fn new(plain_http: Vec<String>, secrets_dir: Option<PathBuf>, metrics: Arc<Metrics>) -> Self {
        Self { plain_http, secrets_dir, metrics }
    }

    /// A client for one round. oci-client keeps the first credentials it was given per registry
    /// for its lifetime: a fresh one per round picks rotated (or repaired) secrets up, at the
    /// price of a token request per registry and round (which registries do not count as pulls).
    fn client(&self) -> oci_client::Client {
        oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(self.plain_http.clone()),
            user_agent: concat!("kip-coordinator/", env!("CARGO_PKG_VERSION")),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        })
    }

    /// One HEAD for `entry`'s tag.
    async fn head(&self, client: &oci_client::Client, entry: &ImageEntry, creds: Option<&Credentials>) -> Resolved {
        let reference = match kip::reference::parse(&entry.reference) {
            Ok(r) => r,
            Err(e) => return Resolved::Unresolved(format!("not a reference the registry client understands: {e}")),
        };
        let auth = match creds {
            Some(c) if !c.username.is_empty() => {
                RegistryAuth::Basic(c.username.clone(), c.password.expose().to_string())
            }
            _ => RegistryAuth::Anonymous,
        };
        let registry = &entry.registry;
        match client.fetch_manifest_digest(&reference, &auth).await {
            Ok(digest) => {
                self.metrics.registry_request(registry, "HEAD", "ok");
                Resolved::Digest(digest)
            }
            Err(e) => {
                let (result, then_get) = classify(&e);
                self.metrics.registry_request(registry, "HEAD", result);
                if then_get {
                    self.metrics.registry_request(registry, "GET", result);
                }
                let text = with_causes(&e);
                let text = creds.map_or(text.clone(), |c| c.redact(&text));
                Resolved::Unresolved(format!("registry {registry}: {result}: {text}"))
            }
        }
    }

    /// Resolves every entry (a few at a time); keyed by normalized reference. An entry's
    /// credentials are its image sets' (`set_credentials`, by reference) where they cover its
    /// registry, else the mounted pull secrets'.
    pub async fn resolve(
        &self,
        entries: &[ImageEntry],
        set_credentials: &BTreeMap<String, Credentials>,
    ) -> BTreeMap<String, Resolved> {
        let keyring = match &self.secrets_dir {
            None => Ok(Keyring::default()),
            Some(dir) => Keyring::load(dir),
        };
        let keyring = match keyring {
            Ok(k) => k,
            Err(e) => {
                let why = format!("pull secrets: {e}");
                return entries.iter().map(|e| (e.reference.clone(), Resolved::Unresolved(why.clone()))).collect();
            }
        };
        // oci-client keeps the first credentials it was given per registry for a client's life:
        // entries with other credentials for the same registry (two sets' secrets) get a client
        // of their own.
        let mut clients: Vec<(Option<Credentials>, Arc<oci_client::Client>)> = Vec::new();
        let mut work: Vec<(ImageEntry, Option<Credentials>, Arc<oci_client::Client>)> = Vec::new();
        for e in entries {
            let creds = set_credentials.get(&e.reference).or_else(|| keyring.for_registry(&e.registry)).cloned();
            let client = match clients.iter().find(|(c, _)| *c == creds) {
                Some((_, client)) => client.clone(),
                None => {
                    let client = Arc::new(self.client());
                    clients.push((creds.clone(), client.clone()));
                    client
                }
            };
            work.push((e.clone(), creds, client));
        }
        futures_util::stream::iter(work)
            .map(|(e, creds, client)| async move {
                let answer = self.head(&client, &e, creds.as_ref()).await;
                (e.reference, answer)
            })
            .buffer_unordered(CONCURRENT_HEADS)
            .collect()
            .await
    }

    /// One round in a task of its own: oci-client unwraps a registry's token into a header, which
    /// panics on a token that is not a valid header value; that fails the round, not the resolver.
    async fn round(
        self: &Arc<Self>,
        entries: Vec<ImageEntry>,
        set_credentials: BTreeMap<String, Credentials>,
    ) -> BTreeMap<String, Resolved> {
        let resolver = self.clone();
        let refs: Vec<String> = entries.iter().map(|e| e.reference.clone()).collect();
        match tokio::spawn(async move { resolver.resolve(&entries, &set_credentials).await }).await {
            Ok(answers) => answers,
            Err(e) => {
                let why = format!("the registry client failed: {e}");
                refs.into_iter().map(|r| (r, Resolved::Unresolved(why.clone()))).collect()
            }
        }
    }

    /// Resolves every watched tag (the published list's and every image set's) now, then each
    /// tag again every interval of its own (a set's `refreshInterval`), and a newly listed tag at
    /// once. The digests it publishes itself change nothing to ask.
    pub async fn run(self: Arc<Self>, hub: Arc<State>, shutdown: CancellationToken) {
        let (mut list, mut sets, mut keyrings) = (hub.subscribe(), hub.subscribe_sets(), hub.subscribe_keyrings());
        let mut asked: HashMap<String, Instant> = HashMap::new();
        // The sets' credentials each tag was last asked with.
        let mut asked_with: HashMap<String, Credentials> = HashMap::new();
        loop {
            list.borrow_and_update();
            sets.borrow_and_update();
            keyrings.borrow_and_update();
            let watched = hub.watched_tags();
            let all: Vec<ImageEntry> = watched.values().map(|(e, _)| e.clone()).collect();
            let set_credentials = hub.set_credentials(&all);
            // A tag no longer listed is forgotten: listed again, it is asked at once; so is one
            // whose set's pull secret came, changed or went (it may now resolve, or no longer).
            asked.retain(|reference, _| {
                watched.contains_key(reference) && asked_with.get(reference) == set_credentials.get(reference)
            });
            asked_with.retain(|reference, _| asked.contains_key(reference));
            let started = Instant::now();
            let (entries, next) = due(&watched, &asked, started);
            if !entries.is_empty() {
                for e in &entries {
                    match set_credentials.get(&e.reference) {
                        Some(c) => asked_with.insert(e.reference.clone(), c.clone()),
                        None => asked_with.remove(&e.reference),
                    };
                }
                let answers = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = self.round(entries.clone(), set_credentials.clone()) => a,
                };
                let resolved = answers.values().filter(|a| matches!(a, Resolved::Digest(_))).count();
                tracing::debug!(
                    tags = entries.len(),
                    resolved,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "resolved the tags that were due"
                );
                asked.extend(entries.into_iter().map(|e| (e.reference, started)));
                hub.set_resolution(answers);
                continue;
            }
            let wake = next.unwrap_or_else(|| kip::duration::after(started, kip::duration::DAY * 36_500));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
                changed = list.changed() => if changed.is_err() { return },
                changed = sets.changed() => if changed.is_err() { return },
                changed = keyrings.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Tags due within this much of each other go in one round.
const TOGETHER: Duration = Duration::from_secs(1);

/// Pure: the watched tags due at `now` (never asked, or asked an interval ago), and when the next
/// of the others falls due.
pub fn due(
    watched: &BTreeMap<String, (ImageEntry, Duration)>,
    asked: &HashMap<String, Instant>,
    now: Instant,
) -> (Vec<ImageEntry>, Option<Instant>) {
    let mut now_due = Vec::new();
    let mut next: Option<Instant> = None;
    for (reference, (entry, every)) in watched {
        match asked.get(reference).map(|at| kip::duration::after(*at, *every)) {
            Some(at) if at > now + TOGETHER => next = Some(next.map_or(at, |n| n.min(at))),
            _ => now_due.push(entry.clone()),
        }
    }
    (now_due, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kip::images::ImageList;

    #[test]
    fn each_tag_is_due_on_its_own_interval_and_a_new_one_at_once() {
        let list = ImageList::parse("a=quay.io/x/a:1;b=quay.io/x/b:1;c=quay.io/x/c:1").unwrap();
        let every = [600, 3600, 3600];
        let watched: BTreeMap<String, (ImageEntry, Duration)> = list
            .entries()
            .iter()
            .zip(every)
            .map(|(e, s)| (e.reference.clone(), (e.clone(), Duration::from_secs(s))))
            .collect();
        let t0 = Instant::now();
        let names = |d: &[ImageEntry]| d.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        let (first, _) = due(&watched, &HashMap::new(), t0);
        assert_eq!(names(&first), ["a", "b", "c"], "nothing asked yet: everything");
        let mut asked: HashMap<String, Instant> = watched.keys().map(|r| (r.clone(), t0)).collect();
        let (none, next) = due(&watched, &asked, t0 + Duration::from_secs(1));
        assert!(none.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(600)), "the shortest interval wakes first");
        let (fast, next) = due(&watched, &asked, t0 + Duration::from_secs(600));
        assert_eq!(names(&fast), ["a"]);
        assert_eq!(next, Some(t0 + Duration::from_secs(3600)));
        asked.insert(list.entries()[0].reference.clone(), t0 + Duration::from_secs(3300));
        // Just short of the hour (within TOGETHER): the two hourly tags go in one round.
        let (hourly, _) = due(&watched, &asked, t0 + Duration::from_millis(3_599_500));
        assert_eq!(names(&hourly), ["b", "c"]);
        asked.remove(&list.entries()[2].reference);
        let (new, _) = due(&watched, &asked, t0 + Duration::from_secs(2));
        assert_eq!(names(&new), ["c"], "a tag not asked yet is due at once");
    }

    #[test]
    fn registry_answers_are_classified_for_the_request_metric() {
        let unauthorized = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert_eq!(classify(&unauthorized), ("unauthorized", true));
        let missing = OciDistributionError::ServerError { code: 404, url: "u".into(), message: String::new() };
        assert_eq!(classify(&missing), ("not_found", true));
        let down = OciDistributionError::ServerError { code: 503, url: "u".into(), message: String::new() };
        assert_eq!(classify(&down), ("error", true));
        assert_eq!(classify(&OciDistributionError::AuthenticationFailure("x".into())), ("unauthorized", false));
        assert_eq!(classify(&OciDistributionError::GenericError(None)), ("unreachable", false));
    }
}
