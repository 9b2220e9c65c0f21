//! Following the coordinator: a `Watch` stream delivers the image list; each valid list is
//! persisted in the state directory (so an agent restarted while the coordinator is down keeps
//! its images) and handed to the work loop. The stream is reopened with backoff when it breaks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kip::images::ImageList;
use kip::v1::{self, coordinator_client::CoordinatorClient};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::reconcile::{self, Policy};

/// A list from the coordinator (or the state directory), validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ListUpdate {
    pub generation: u64,
    pub list: ImageList,
    /// The coordinator's digest per listed tag (normalized reference), where it resolved one.
    pub digests: reconcile::Digests,
    /// The image sets' pull secrets per listed image (normalized reference), as keys of the
    /// coordinator's copy (`<namespace>.<secret>`); most images have none.
    pub pull_secrets: PullSecretKeys,
    pub policy: v1::PullPolicy,
    /// kip is being uninstalled: let go of everything (the list is then empty).
    pub release: v1::Release,
}

impl ListUpdate {
    pub fn from_proto(update: &v1::ImageListUpdate) -> Result<Self, kip::images::ImageListError> {
        let list = ImageList::from_pairs(update.images.iter().map(|i| (i.name.as_str(), i.image.as_str())))?;
        let release = update.release();
        // A release keeps nothing, whatever an (old or broken) coordinator sent along.
        let list = if release == v1::Release::None { list } else { ImageList::default() };
        let digests = digests_of(&list, update.images.iter().map(|i| (i.name.as_str(), i.digest.as_str())));
        let pull_secrets = keys_of(&list, update.images.iter().map(|i| (i.name.as_str(), i.pull_secrets.as_slice())));
        Ok(Self {
            generation: update.generation,
            list,
            digests,
            pull_secrets,
            policy: update.policy.unwrap_or_default(),
            release,
        })
    }

    /// The agent's own policy with the coordinator's non-zero settings on top.
    pub fn apply_to(&self, base: &Policy) -> Policy {
        let p = &self.policy;
        // Within the bounds the agent's own flags have: a coordinator (older, or broken) that
        // sends 0 or centuries must not make the agent busy-loop or overflow an instant.
        let secs = |s: u64, own: Duration, (min, max): (Duration, Duration)| {
            if s > 0 {
                Duration::from_secs(s).clamp(min, max)
            } else {
                own
            }
        };
        Policy {
            max_parallel_pulls: if p.max_parallel_pulls > 0 {
                p.max_parallel_pulls as usize
            } else {
                base.max_parallel_pulls
            },
            refresh_interval: secs(p.refresh_interval_seconds, base.refresh_interval, kip::duration::REFRESH_INTERVAL),
            check_interval: secs(p.check_interval_seconds, base.check_interval, kip::duration::CHECK_INTERVAL),
            pull_timeout: secs(p.pull_timeout_seconds, base.pull_timeout, kip::duration::PULL_TIMEOUT),
            ..base.clone()
        }
    }
}

/// Pull-secret keys per listed image (normalized reference).
pub type PullSecretKeys = std::collections::BTreeMap<String, Vec<String>>;

/// The pull-secret keys by the entries' references (images without any left out).
fn keys_of<'a>(list: &ImageList, by_name: impl Iterator<Item = (&'a str, &'a [String])>) -> PullSecretKeys {
    let by_name: std::collections::BTreeMap<&str, &[String]> = by_name.filter(|(_, k)| !k.is_empty()).collect();
    list.entries().iter().filter_map(|e| Some((e.reference.clone(), by_name.get(e.name.as_str())?.to_vec()))).collect()
}

/// The published digests by the entries' references: a name's digest counts when it has the form
/// of one (`algorithm:hex`); anything else is ignored, as an empty one is (the tag is then
/// refreshed on the interval, as without a coordinator).
fn digests_of<'a>(list: &ImageList, by_name: impl Iterator<Item = (&'a str, &'a str)>) -> reconcile::Digests {
    let by_name: std::collections::BTreeMap<&str, &str> = by_name.collect();
    list.entries()
        .iter()
        .filter(|e| !e.by_digest)
        .filter_map(|e| {
            let d = *by_name.get(e.name.as_str())?;
            let (algorithm, hex) = d.split_once(':')?;
            let well_formed = !algorithm.is_empty() && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
            well_formed.then(|| (e.reference.clone(), d.to_string()))
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {file}: {reason}")]
    Invalid { file: PathBuf, reason: String },
    #[error("state file {file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
}

#[derive(Serialize, Deserialize)]
struct SavedList {
    generation: u64,
    images: Vec<SavedImage>,
    #[serde(default)]
    max_parallel_pulls: u32,
    #[serde(default)]
    refresh_interval_seconds: u64,
    #[serde(default)]
    check_interval_seconds: u64,
    #[serde(default)]
    pull_timeout_seconds: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedImage {
    name: String,
    image: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pull_secrets: Vec<String>,
}

pub const STATE_FILE: &str = "image-list.json";

/// The last list persisted in `dir`, if any.
pub fn load_state(dir: &Path) -> Result<Option<ListUpdate>, StateError> {
    let file = dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { file, source }),
    };
    let invalid = |reason: String| StateError::Invalid { file: file.clone(), reason };
    let saved: SavedList = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let list = ImageList::from_pairs(saved.images.iter().map(|i| (i.name.as_str(), i.image.as_str())))
        .map_err(|e| invalid(e.to_string()))?;
    let digests = digests_of(&list, saved.images.iter().map(|i| (i.name.as_str(), i.digest.as_str())));
    let pull_secrets = keys_of(&list, saved.images.iter().map(|i| (i.name.as_str(), i.pull_secrets.as_slice())));
    Ok(Some(ListUpdate {
        generation: saved.generation,
        list,
        digests,
        pull_secrets,
        policy: v1::PullPolicy {
            max_parallel_pulls: saved.max_parallel_pulls,
            refresh_interval_seconds: saved.refresh_interval_seconds,
            check_interval_seconds: saved.check_interval_seconds,
            pull_timeout_seconds: saved.pull_timeout_seconds,
        },
        release: v1::Release::None,
    }))
}

/// Writes the list atomically (temp file, fsync, rename): a crash leaves the old or the new one.
pub fn save_state(dir: &Path, update: &ListUpdate) -> Result<(), StateError> {
    let file = dir.join(STATE_FILE);
    let io = |source| StateError::Io { file: file.clone(), source };
    let saved = SavedList {
        generation: update.generation,
        images: update
            .list
            .entries()
            .iter()
            .map(|e| SavedImage {
                name: e.name.clone(),
                image: e.image.clone(),
                digest: update.digests.get(&e.reference).cloned().unwrap_or_default(),
                pull_secrets: update.pull_secrets.get(&e.reference).cloned().unwrap_or_default(),
            })
            .collect(),
        max_parallel_pulls: update.policy.max_parallel_pulls,
        refresh_interval_seconds: update.policy.refresh_interval_seconds,
        check_interval_seconds: update.policy.check_interval_seconds,
        pull_timeout_seconds: update.policy.pull_timeout_seconds,
    };
    let text = serde_json::to_string_pretty(&saved)
        .map_err(|e| StateError::Invalid { file: file.clone(), reason: e.to_string() })?;
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = temp_of(&file);
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &file).map_err(io)?;
    Ok(())
}

/// Where [`save_state`] writes before its rename (`image-list.json.tmp`).
fn temp_of(file: &Path) -> PathBuf {
    file.with_extension("json.tmp")
}

/// Deletes the persisted list (and a temp file a crash may have left): a release leaves no state
/// file on the host. Absent files are fine.
pub fn remove_state(file: &Path) -> Result<(), StateError> {
    let tmp = temp_of(file);
    for f in [file, tmp.as_path()] {
        match std::fs::remove_file(f) {
            Ok(()) => tracing::info!(file = %f.display(), "removed the state file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StateError::Io { file: f.to_path_buf(), source }),
        }
    }
    Ok(())
}

/// A channel to the coordinator with keep-alives, so a vanished coordinator is noticed.
pub fn coordinator_channel(url: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Adds the agent's ServiceAccount token to every call, read from its file each time: the kubelet
/// rotates the projected token in place, so the file always has the current one.
#[derive(Clone, Debug, Default)]
pub struct BearerToken {
    pub file: Option<PathBuf>,
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(file) = &self.file else { return Ok(request) };
        let token = std::fs::read_to_string(file).map_err(|e| {
            tonic::Status::unauthenticated(format!("cannot read the token file {} (--token-file): {e}", file.display()))
        })?;
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            tonic::Status::unauthenticated(format!("the token file {} does not hold a token", file.display()))
        })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

pub type Client = CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>;

/// A client of the coordinator that sends the token of `token` with every call.
pub fn client(channel: Channel, token: BearerToken) -> Client {
    CoordinatorClient::with_interceptor(channel, token)
}

pub struct Follower {
    pub channel: Channel,
    /// The token sent with every call (`--token-file`).
    pub token: BearerToken,
    pub url: String,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub updates: watch::Sender<Option<ListUpdate>>,
    /// Told each time a stream opens: a (restarted) coordinator needs the current report again.
    pub connected: Arc<Notify>,
}

impl Follower {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = reconcile::retry_backoff(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow_stream() => r,
            };
            let delivered = match &received {
                Ok(n) => {
                    // Routine: the coordinator ends each stream shortly before the token that
                    // opened it expires (and when it stops).
                    tracing::info!(coordinator = %self.url, updates = n, "coordinator closed the stream; reconnecting");
                    *n
                }
                Err((n, e)) => {
                    tracing::warn!(coordinator = %self.url, updates = n, error = %e, "coordinator stream failed; working with the last list and reconnecting");
                    *n
                }
            };
            // A stream that delivered something was healthy: start the backoff afresh.
            if delivered > 0 {
                backoff = reconcile::retry_backoff(Duration::from_millis(500), Duration::from_secs(30));
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Follows one stream to its end; returns how many updates it delivered.
    async fn follow_stream(&self) -> Result<usize, (usize, tonic::Status)> {
        let mut client = client(self.channel.clone(), self.token.clone());
        let req =
            v1::WatchRequest { node_name: self.node_name.clone(), agent_version: env!("CARGO_PKG_VERSION").into() };
        let mut stream = client.watch(req).await.map_err(|s| (0, s))?.into_inner();
        self.connected.notify_one();
        let mut received = 0;
        loop {
            match stream.message().await {
                Ok(Some(update)) => {
                    received += 1;
                    self.accept(&update);
                }
                Ok(None) => return Ok(received),
                Err(s) => return Err((received, s)),
            }
        }
    }

    fn accept(&self, update: &v1::ImageListUpdate) {
        let update = match ListUpdate::from_proto(update) {
            Ok(u) => u,
            Err(e) => {
                // The coordinator validates too; refusing here keeps the last good list either way.
                tracing::error!(generation = update.generation, error = %e, "invalid list from the coordinator; keeping the last good one");
                return;
            }
        };
        if self.updates.borrow().as_ref() == Some(&update) {
            return;
        }
        if update.release != v1::Release::None {
            // Nothing is saved: the agent deletes the state file as part of the release.
            tracing::info!(
                generation = update.generation,
                release = update.release.as_str_name(),
                "the coordinator releases this node (kip is being uninstalled)"
            );
            self.updates.send_replace(Some(update));
            return;
        }
        tracing::info!(generation = update.generation, images = update.list.len(), list = %update.list, "new image list from the coordinator");
        if let Err(e) = save_state(&self.state_dir, &update) {
            tracing::warn!(error = %e, "cannot persist the image list; a restart without the coordinator would start empty");
        }
        self.updates.send_replace(Some(update));
    }
}

/// Sends the agent's report whenever it changes (never on a timer), and again whenever the
/// Watch stream (re)connects, since a restarted coordinator knows nothing; retries with backoff.
pub async fn report_changes(
    channel: Channel,
    token: BearerToken,
    mut reports: watch::Receiver<v1::NodeReport>,
    connected: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut client = client(channel, token);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = reports.changed() => if changed.is_err() { return },
            _ = connected.notified() => {
                // Nothing to repeat before the first real report.
                if reports.borrow().node_name.is_empty() {
                    continue;
                }
            }
        }
        let mut backoff = reconcile::retry_backoff(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            // Always the latest state: changes that happened during a retry are folded in.
            let report = reports.borrow_and_update().clone();
            match client.report(report).await {
                Ok(_) => break,
                Err(s) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    // Refusals are the operator's business; a coordinator that is away is not.
                    if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) {
                        tracing::warn!(error = %s, retry_in_ms = delay.as_millis() as u64, "the coordinator refused the report");
                    } else {
                        tracing::debug!(error = %s, retry_in_ms = delay.as_millis() as u64, "report not delivered");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(generation: u64, images: &[(&str, &str)]) -> v1::ImageListUpdate {
        v1::ImageListUpdate {
            generation,
            images: images
                .iter()
                .map(|(n, i)| v1::Image { name: n.to_string(), image: i.to_string(), ..Default::default() })
                .collect(),
            policy: Some(v1::PullPolicy {
                max_parallel_pulls: 7,
                refresh_interval_seconds: 7200,
                check_interval_seconds: 0,
                pull_timeout_seconds: 0,
            }),
            release: 0,
        }
    }

    #[test]
    fn the_token_is_read_from_its_file_for_every_call() {
        use tonic::service::Interceptor as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let mut token = BearerToken { file: Some(file.clone()) };
        let err = token.call(tonic::Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("--token-file"), "{}", err.message());
        std::fs::write(&file, "first\n").unwrap();
        let req = token.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer first");
        // The kubelet rotated it.
        std::fs::write(&file, "second").unwrap();
        let req = token.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer second");
        // Without a token file nothing is added.
        let req = BearerToken::default().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn coordinator_policy_overrides_only_what_it_sets() {
        let u = ListUpdate::from_proto(&update(3, &[("a", "busybox")])).unwrap();
        let base = Policy::default();
        let p = u.apply_to(&base);
        assert_eq!(p.max_parallel_pulls, 7);
        assert_eq!(p.refresh_interval, Duration::from_secs(7200));
        assert_eq!(p.check_interval, base.check_interval);
        assert_eq!(p.pull_timeout, base.pull_timeout);
    }

    #[test]
    fn invalid_list_from_the_coordinator_is_refused() {
        let err = ListUpdate::from_proto(&update(3, &[("a", "busybox"), ("a", "nginx")])).unwrap_err();
        assert!(err.to_string().contains("used more than once"), "{err}");
    }

    #[test]
    fn published_digests_are_keyed_by_reference_and_malformed_ones_ignored() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let mut u = update(2, &[("a", "busybox"), ("b", "quay.io/x/y:1"), ("c", "r/c:1"), ("e", "r/e:1")]);
        u.images[0].digest = d.into();
        u.images[2].digest = "sha256:not-hex".into();
        u.images[3].digest = "garbage".into();
        let u = ListUpdate::from_proto(&u).unwrap();
        assert_eq!(
            u.digests,
            reconcile::Digests::from([("docker.io/library/busybox:latest".to_string(), d.to_string())])
        );
    }

    #[test]
    fn state_round_trips_and_bad_state_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_state(dir.path()).unwrap(), None);
        let mut u = update(5, &[("a", "busybox"), ("b", "quay.io/x/y:1")]);
        u.images[1].digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into();
        u.images[1].pull_secrets = vec!["ml.regcred".into()];
        let u = ListUpdate::from_proto(&u).unwrap();
        assert_eq!(u.digests.len(), 1, "the digest survives a restart without the coordinator");
        assert_eq!(u.pull_secrets["quay.io/x/y:1"], ["ml.regcred"], "so do the set's pull secrets");
        save_state(dir.path(), &u).unwrap();
        assert_eq!(load_state(dir.path()).unwrap(), Some(u));
        std::fs::write(dir.path().join(STATE_FILE), "{").unwrap();
        let err = load_state(dir.path()).unwrap_err();
        assert!(err.to_string().starts_with(&format!("state file {}", dir.path().join(STATE_FILE).display())), "{err}");
    }
}
