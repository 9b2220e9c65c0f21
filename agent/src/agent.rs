//! The agent's work loop: check what the runtime has, pull what is missing or due for a
//! refresh (bounded, with timeouts and backoff), pin it, unpin what left the list, and keep
//! metrics and readiness current. Decisions come from `reconcile`; this module does the I/O.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use kip::images::{ImageEntry, ImageList};
use kip::v1;

use crate::cri::{CriError, ImageInfo};
use crate::follow::ListUpdate;
use crate::http::Readiness;
use crate::metrics::{ImageLabels, Metrics, PullLabels, ResultLabels, RESULT_FAILURE, RESULT_SUCCESS};
use crate::reconcile::{self, Action, Observation, Policy, PullReason, States};
use crate::runtime::{Runtime, RuntimeError, Snapshot};
use kip::pull_secrets::{Credentials, Keyring};

/// Why one image could not be cached and pinned; names the image, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    #[error("pull secrets for `{image}`: {source}")]
    Secrets { image: String, source: kip::pull_secrets::AuthError },
    #[error("pull secret `{key}` of the image set listing `{image}`: {why}")]
    SetSecret { image: String, key: String, why: String },
    #[error("`{image}` was pulled but the runtime does not list it")]
    MissingAfterPull { image: String },
}

impl From<CriError> for ImageError {
    fn from(e: CriError) -> Self {
        ImageError::Runtime(e.into())
    }
}

impl ImageError {
    fn is_runtime_down(&self) -> bool {
        matches!(self, ImageError::Runtime(e) if e.is_runtime_down())
    }
}

/// Where the agent finds registry credentials.
#[derive(Clone, Debug, Default)]
pub struct PullSecrets {
    /// The pull secrets mounted into the agent (IMAGE_PULL_SECRETS, `--pull-secrets-dir`).
    pub dir: Option<PathBuf>,
    /// The coordinator's copy of the image sets' pull secrets (`--set-pull-secrets-dir`): one
    /// file per `<namespace>.<secret>`, a `.dockerconfigjson` each.
    pub sets_dir: Option<PathBuf>,
}

/// A key of the sets' pull secrets: `<namespace>.<secret>`, a plain file name (never a path).
fn is_set_secret_key(key: &str) -> bool {
    key.split_once('.').is_some_and(|(namespace, secret)| {
        kip::images::is_dns_label(namespace) && kip::images::is_dns_subdomain(secret)
    })
}

/// Credentials for the image's registry: from the first of its sets' pull secrets (`keys`) that
/// has some (one not mounted is passed over), else from the mounted pull secrets. Files are read on every pull, so rotated
/// secrets are used without a restart.
pub fn credentials_for(
    secrets: &PullSecrets,
    keys: &[String],
    entry: &ImageEntry,
) -> Result<Option<Credentials>, ImageError> {
    for key in keys {
        let missing = |why: String| ImageError::SetSecret { image: entry.reference.clone(), key: key.clone(), why };
        if !is_set_secret_key(key) {
            return Err(missing("not a `<namespace>.<secret>` key".into()));
        }
        let Some(dir) = &secrets.sets_dir else {
            return Err(missing("the agent has no --set-pull-secrets-dir".into()));
        };
        let file = dir.join(key);
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            // As the kubelet does with a pull secret it cannot find: the pull goes on without it
            // (the set's status says why it is missing; a new one appears within a minute or two,
            // as the kubelet refreshes the mounted Secret).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(image = %entry.reference, key = %key, "an image set's pull secret is not mounted; pulling without it");
                continue;
            }
            Err(e) => return Err(missing(e.to_string())),
        };
        let mut keyring = Keyring::default();
        keyring
            .add_file(&file, &text)
            .map_err(|source| ImageError::Secrets { image: entry.reference.clone(), source })?;
        if let Some(creds) = keyring.for_registry(&entry.registry) {
            return Ok(Some(creds.clone()));
        }
    }
    let Some(dir) = &secrets.dir else { return Ok(None) };
    let keyring =
        Keyring::load(dir).map_err(|source| ImageError::Secrets { image: entry.reference.clone(), source })?;
    Ok(keyring.for_registry(&entry.registry).cloned())
}

/// What the runtime shows of one image now: from the check's snapshot when it lists the
/// reference, else one CRI `ImageStatus` (an absent image, or a name the runtime spells
/// otherwise). The answer travels on in the observation (pull and pin use it).
pub async fn observe_image<R: Runtime>(
    rt: &R,
    snapshot: &Snapshot,
    reference: &str,
) -> Result<Observation, ImageError> {
    if let Some(image) = snapshot.find(reference) {
        return Ok(Observation::of(image, reference, snapshot.pinned(reference, image)));
    }
    let Some(image) = rt.status(reference).await? else { return Ok(Observation::absent()) };
    let pinned = rt.is_pinned(reference, &image).await?;
    Ok(Observation::of(&image, reference, pinned))
}

/// Pins a present image; a pin the runtime refuses leaves it cached and unpinned (the reason
/// is the runtime's pin problem, reported apart), it does not fail the image.
pub async fn pin_image<R: Runtime>(rt: &R, reference: &str, image: &ImageInfo) -> Observation {
    let pinned = match rt.pin(reference, image).await {
        Ok(pinned) => pinned,
        Err(e) => {
            tracing::warn!(image = reference, error = %e, "pinning failed; the image is kept by pulling it again if it disappears");
            false
        }
    };
    Observation::of(image, reference, pinned)
}

/// One pull attempt followed by the pin. Error text is scrubbed of the credentials used.
pub async fn pull_and_pin<R: Runtime>(
    rt: &R,
    secrets: &PullSecrets,
    keys: &[String],
    entry: &ImageEntry,
    timeout: Duration,
    known: Option<ImageInfo>,
) -> Result<Observation, ImageError> {
    let creds = credentials_for(secrets, keys, entry)?;
    let auth = creds.as_ref().map(Credentials::to_cri);
    let pulled = match rt.pull(&entry.reference, known.as_ref(), auth, timeout).await {
        Ok(image) => image,
        Err(RuntimeError::Cri(CriError::Call { op, image, code, message })) => {
            let message = creds.as_ref().map_or(message.clone(), |c| c.redact(&message));
            return Err(CriError::Call { op, image, code, message }.into());
        }
        Err(e) => return Err(e.into()),
    };
    let Some(image) = pulled else { return Err(ImageError::MissingAfterPull { image: entry.reference.clone() }) };
    Ok(pin_image(rt, &entry.reference, &image).await)
}

/// Removes kip's pins from everything no listed image needs; with `remove` also deletes it.
/// Returns the record names kip let go of.
pub async fn unpin_unlisted<R: Runtime>(rt: &R, states: &States, remove: bool) -> Result<Vec<String>, ImageError> {
    let released = rt.sync_pins(&reconcile::keep(states)).await?;
    if released.is_empty() {
        return Ok(released);
    }
    tracing::info!(refs = ?released, "removed kip's pin from images no longer listed");
    if remove {
        let removal = rt.remove_released(&released).await?;
        if !removal.deleted.is_empty() {
            tracing::info!(names = ?removal.deleted, "removed unlisted images");
        }
        for (name, why) in &removal.kept {
            tracing::info!(image = %name, why = %why, "unlisted image not removed: it is not only kip's");
        }
    }
    Ok(released)
}

/// Lets go of the node (kip is being uninstalled): every pin kip set, with `remove` the images
/// too, then the runtime's own leftovers (CRI-O's drop-in) and the state file. A pin that was
/// being set when the pulls were stopped may land just after the first pass: passes repeat
/// until one finds nothing of kip's.
pub async fn release_node<R: Runtime>(
    rt: &R,
    remove: bool,
    state_file: Option<&std::path::Path>,
) -> Result<usize, String> {
    let mut released = 0;
    for pass in 0.. {
        let found = unpin_unlisted(rt, &States::new(), remove).await.map_err(|e| e.to_string())?;
        if found.is_empty() {
            break;
        }
        released += found.len();
        if pass == 2 {
            return Err(format!("kip's pins keep coming back ({} records in the last pass)", found.len()));
        }
    }
    rt.release().await.map_err(|e| e.to_string())?;
    if let Some(file) = state_file {
        crate::follow::remove_state(file).map_err(|e| e.to_string())?;
    }
    Ok(released)
}

struct PullDone {
    reference: String,
    registry: String,
    reason: PullReason,
    elapsed: Duration,
    result: Result<Observation, ImageError>,
}

/// The pulls in flight, each known by its image: a pull task that dies (a panic in a runtime
/// backend) still names its image, which is then retried instead of staying in flight forever
/// (never checked again, its unpinning blocked).
#[derive(Default)]
struct Pulls {
    set: JoinSet<PullDone>,
    images: std::collections::HashMap<tokio::task::Id, String>,
}

impl Pulls {
    fn spawn(&mut self, reference: String, pull: impl std::future::Future<Output = PullDone> + Send + 'static) {
        let handle = self.set.spawn(pull);
        self.images.insert(handle.id(), reference);
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next pull to end: its result, or the image whose task died and how.
    async fn next(&mut self) -> Option<Result<PullDone, (String, tokio::task::JoinError)>> {
        Some(match self.set.join_next_with_id().await? {
            Ok((id, done)) => {
                self.images.remove(&id);
                Ok(done)
            }
            Err(e) => Err((self.images.remove(&e.id()).unwrap_or_default(), e)),
        })
    }
}

/// Where the image list comes from.
pub enum ListSource {
    /// `--images`: fixed for the life of the process.
    Fixed(ImageList),
    /// The coordinator (through [`crate::follow::Follower`]); `None` until a list is known.
    Coordinator(tokio::sync::watch::Receiver<Option<ListUpdate>>),
}

/// The long-running agent.
pub struct Agent<R: Runtime> {
    pub rt: R,
    pub secrets: PullSecrets,
    pub metrics: Arc<Metrics>,
    pub ready: Readiness,
    pub remove_unlisted: bool,
    /// The coordinator's list as persisted in the state directory: deleted by a release.
    pub state_file: Option<PathBuf>,
    /// Node name and where to publish the state the coordinator is sent.
    pub reports: Option<(String, tokio::sync::watch::Sender<v1::NodeReport>)>,
    /// The cluster's pull budget (with a coordinator): pulls start only while it allows.
    pub lease: Option<crate::lease::LeaseHandle>,
    base_policy: Policy,
    policy: Policy,
    source: ListSource,
    list: ImageList,
    /// The coordinator's digest per listed tag.
    digests: reconcile::Digests,
    /// The image sets' pull-secret keys per listed image.
    pull_secrets: crate::follow::PullSecretKeys,
    generation: u64,
    /// False until a list is known: without one, no pin may be judged unlisted.
    list_known: bool,
    states: States,
    /// Why the runtime counts as not answering (the last call's error), `None` while it answers.
    runtime_down: Option<String>,
    /// What the coordinator asks to let go of (kip is being uninstalled), and how the last
    /// attempt went (`None`: not tried yet).
    release: v1::Release,
    release_outcome: Option<Result<(), String>>,
    /// Beaten at every turn of the loop, for `/healthz`.
    pub heartbeat: kip::process::Heartbeat,
}

/// What the loop's heartbeat allows beyond two check intervals: the calls of one check, each
/// within the runtime deadline (`--runtime-timeout`, at most 10 min).
const HEARTBEAT_SLACK: Duration = Duration::from_secs(15 * 60);

impl<R: Runtime> Agent<R> {
    pub fn new(rt: R, source: ListSource, policy: Policy, metrics: Arc<Metrics>, ready: Readiness) -> Self {
        metrics
            .runtime_info
            .get_or_create(&crate::metrics::RuntimeLabels {
                runtime: rt.info().name.clone(),
                version: rt.info().version.clone(),
            })
            .set(1);
        let mut agent = Self {
            rt,
            secrets: PullSecrets::default(),
            metrics,
            ready,
            remove_unlisted: false,
            state_file: None,
            reports: None,
            lease: None,
            base_policy: policy.clone(),
            policy,
            source,
            list: ImageList::default(),
            digests: reconcile::Digests::new(),
            pull_secrets: Default::default(),
            generation: 0,
            list_known: false,
            states: States::new(),
            runtime_down: None,
            release: v1::Release::None,
            release_outcome: None,
            heartbeat: kip::process::Heartbeat::default(),
        };
        let initial = match &agent.source {
            ListSource::Fixed(list) => Some((list.clone(), None)),
            ListSource::Coordinator(rx) => rx.borrow().clone().map(|u| (u.list.clone(), Some(u))),
        };
        if let Some((list, update)) = initial {
            agent.set_list(list, update.as_ref());
        }
        agent
    }

    /// Switches to `list`; `update` (from the coordinator) brings the generation and policy.
    fn set_list(&mut self, list: ImageList, update: Option<&ListUpdate>) {
        for e in self.list.entries() {
            if !list.entries().contains(e) {
                self.metrics.forget_image(&ImageLabels { name: e.name.clone(), image: e.image.clone() });
            }
        }
        reconcile::sync_states(&mut self.states, &list);
        self.policy = update.map_or_else(|| self.base_policy.clone(), |u| u.apply_to(&self.base_policy));
        self.list = list;
        self.digests = update.map(|u| u.digests.clone()).unwrap_or_default();
        self.pull_secrets = update.map(|u| u.pull_secrets.clone()).unwrap_or_default();
        self.generation = update.map_or(0, |u| u.generation);
        self.list_known = true;
        let release = update.map_or(v1::Release::None, |u| u.release);
        if release != self.release {
            self.release_outcome = None;
        }
        self.release = release;
    }

    /// Waits for the next list from the coordinator; never returns for a fixed list.
    async fn next_list(source: &mut ListSource) -> Option<ListUpdate> {
        match source {
            ListSource::Fixed(_) => std::future::pending().await,
            ListSource::Coordinator(rx) => match rx.changed().await {
                Ok(()) => rx.borrow_and_update().clone(),
                // The follower is gone (shutdown): nothing more will come.
                Err(_) => std::future::pending().await,
            },
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pulls = Pulls::default();
        let mut runtime_backoff = reconcile::retry_backoff(Duration::from_secs(1), Duration::from_secs(30));
        let mut next_check = Instant::now();
        loop {
            let now = Instant::now();
            let checked = now >= next_check;
            if checked {
                match self.check_images().await {
                    Ok(()) => {
                        runtime_backoff = reconcile::retry_backoff(Duration::from_secs(1), Duration::from_secs(30));
                        next_check = kip::duration::after(now, self.policy.check_interval);
                    }
                    Err(e) => {
                        let delay = runtime_backoff.next().unwrap_or(Duration::from_secs(30));
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "runtime not answering; will retry");
                        next_check = kip::duration::after(now, delay);
                    }
                }
            }
            let mut pulls_due = false;
            if self.runtime_down.is_none() {
                // Pins of present images are tried with each check, not on every wake-up: a
                // runtime that refuses them is not asked again until the next check.
                pulls_due = self.start_due_work(&mut pulls, checked).await;
            }
            // The longest this loop may stay away: a check (its calls bounded by the runtime
            // deadline) at least every check interval.
            self.heartbeat.beat(self.policy.check_interval.saturating_mul(2).saturating_add(HEARTBEAT_SLACK));
            if let Some(lease) = &self.lease {
                // Held while pulls run or wait for it; given back when nothing is left.
                lease.want(pulls_due || !pulls.is_empty());
            }
            self.publish_state();
            let wake = reconcile::next_wake(&self.list, &self.digests, &self.states, &self.policy)
                .map_or(next_check, |t| t.min(next_check));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
                _ = crate::lease::LeaseHandle::changed(&mut self.lease) => {}
                Some(done) = pulls.next(), if !pulls.is_empty() => match done {
                    Ok(done) => self.finish_pull(done),
                    Err((reference, e)) => self.pull_task_died(&reference, &e),
                },
                Some(update) = Self::next_list(&mut self.source) => {
                    if update.release != v1::Release::None && !pulls.is_empty() {
                        // A pull in flight would pin what the release is about to unpin.
                        pulls.set.abort_all();
                        while let Some(done) = pulls.next().await {
                            if let Err((reference, e)) = done {
                                self.pull_task_died(&reference, &e);
                            }
                        }
                    }
                    self.set_list(update.list.clone(), Some(&update));
                    // Check at once: new images are pulled and dropped ones unpinned now.
                    next_check = Instant::now();
                }
            }
        }
        // Dropping the tasks cancels their gRPC calls, which cancels the runtime's pulls.
        pulls.set.shutdown().await;
        tracing::info!("agent stopped");
    }

    /// Looks at every listed image; notices vanished ones; removes stale pins.
    async fn check_images(&mut self) -> Result<(), ImageError> {
        let snapshot = match self.rt.snapshot().await {
            Ok(snapshot) => snapshot,
            Err(e) if e.is_runtime_down() => {
                self.runtime_not_answering(&e);
                return Err(e.into());
            }
            Err(e) => {
                // Each image is then asked about on its own, as the snapshot would have told.
                tracing::warn!(error = %e, "listing the runtime's images failed; asking image by image");
                Snapshot::default()
            }
        };
        let refs: Vec<String> = self.states.keys().cloned().collect();
        let mut all_seen = true;
        for reference in refs {
            match observe_image(&self.rt, &snapshot, &reference).await {
                Ok(obs) => {
                    let published = self.digests.get(&reference).map(String::as_str);
                    let Some(state) = self.states.get_mut(&reference) else { continue };
                    if state.in_flight {
                        continue; // the pull's own result is fresher
                    }
                    let vanished = state.observe(obs);
                    state.confirm(published, Instant::now());
                    if vanished {
                        let labels = self.labels_for(&reference);
                        tracing::warn!(image = %reference, "cached image disappeared; pulling it again");
                        for l in labels {
                            self.metrics.image_repulls.get_or_create(&l).inc();
                        }
                    }
                }
                Err(e) if e.is_runtime_down() => {
                    self.runtime_not_answering(&e);
                    return Err(e);
                }
                Err(e) => {
                    all_seen = false;
                    tracing::warn!(image = %reference, error = %e, "checking image failed");
                }
            }
        }
        self.runtime_answered();
        // Without a list, or with an image not seen, its records could pass for unlisted. So
        // could the records a pull in flight is pinning right now (the last check saw none of
        // them): unpinning waits for a check with no pull in flight.
        if !self.list_known || !all_seen || self.states.values().any(|s| s.in_flight) {
            return Ok(());
        }
        if self.release != v1::Release::None {
            if self.release_outcome != Some(Ok(())) {
                let remove = self.release == v1::Release::Remove;
                let outcome = release_node(&self.rt, remove, self.state_file.as_deref()).await;
                match &outcome {
                    Ok(n) => tracing::info!(
                        records = n,
                        images_removed = remove,
                        "released the node: no pin, drop-in or state file of kip's is left"
                    ),
                    Err(e) => tracing::warn!(error = %e, "releasing the node failed; will retry at the next check"),
                }
                self.release_outcome = Some(outcome.map(drop));
            }
            return Ok(());
        }
        if let Err(e) = unpin_unlisted(&self.rt, &self.states, self.remove_unlisted).await {
            tracing::warn!(error = %e, "removing stale pins failed; will retry at the next check");
        }
        Ok(())
    }

    /// Starts the pulls and pins that are due; returns true when a pull was due (started, or
    /// waiting for the cluster's pull budget).
    async fn start_due_work(&mut self, pulls: &mut Pulls, pins_due: bool) -> bool {
        let may_pull = self.lease.as_ref().is_none_or(|l| l.may_pull());
        let mut pulls_due = false;
        for action in reconcile::plan(&self.list, &self.digests, &self.states, Instant::now(), &self.policy) {
            match action {
                Action::Pin { reference } if pins_due => {
                    let Some(image) = self.states.get(&reference).and_then(|s| s.seen.image.clone()) else {
                        continue;
                    };
                    let obs = pin_image(&self.rt, &reference, &image).await;
                    if let Some(s) = self.states.get_mut(&reference) {
                        s.observe(obs);
                    }
                }
                Action::Pin { .. } => {}
                Action::Pull { .. } if !may_pull => pulls_due = true,
                Action::Pull { reference, reason } => {
                    pulls_due = true;
                    let Some(entry) = self.list.entries().iter().find(|e| e.reference == reference).cloned() else {
                        continue;
                    };
                    let published = self.digests.get(&reference).cloned();
                    let known = self.states.get_mut(&reference).and_then(|s| {
                        s.pull_started(published.as_deref());
                        s.seen.image.clone()
                    });
                    tracing::info!(image = %reference, reason = reason.as_str(), "pulling");
                    let (rt, secrets, timeout) = (self.rt.clone(), self.secrets.clone(), self.policy.pull_timeout);
                    let keys = self.pull_secrets.get(&reference).cloned().unwrap_or_default();
                    pulls.spawn(reference.clone(), async move {
                        let started = Instant::now();
                        let result = pull_and_pin(&rt, &secrets, &keys, &entry, timeout, known).await;
                        PullDone { reference, registry: entry.registry, reason, elapsed: started.elapsed(), result }
                    });
                }
            }
        }
        pulls_due
    }

    fn finish_pull(&mut self, done: PullDone) {
        let PullDone { reference, registry, reason, elapsed, result } = done;
        let result_label = if result.is_ok() { RESULT_SUCCESS } else { RESULT_FAILURE };
        self.metrics
            .registry_requests
            .get_or_create(&crate::metrics::RegistryLabels { registry, method: "GET", result: result_label })
            .inc();
        self.metrics
            .image_pull_duration
            .get_or_create(&ResultLabels { result: result_label })
            .observe(elapsed.as_secs_f64());
        for l in self.labels_for(&reference) {
            self.metrics
                .image_pulls
                .get_or_create(&PullLabels { name: l.name, image: l.image, result: result_label })
                .inc();
        }
        let policy = self.policy.clone();
        let published = self.digests.get(&reference).cloned();
        let Some(state) = self.states.get_mut(&reference) else { return };
        let elapsed_ms = elapsed.as_millis() as u64;
        match result {
            Ok(obs) => {
                tracing::info!(image = %reference, reason = reason.as_str(), digest = obs.digest.as_deref().unwrap_or(""), pinned = obs.pinned, elapsed_ms, "cached");
                state.pull_succeeded(Instant::now(), obs);
                state.confirm(published.as_deref(), Instant::now());
            }
            Err(e) => {
                let delay = state.pull_failed(Instant::now(), e.to_string(), &policy);
                tracing::warn!(image = %reference, error = %e, elapsed_ms, retry_in_ms = delay.as_millis() as u64, "pull failed");
                if e.is_runtime_down() {
                    self.runtime_not_answering(&e);
                }
            }
        }
    }

    /// A pull task that ended without a result (it panicked, or a release cancelled it): the
    /// image is no longer in flight and is retried with the backoff.
    fn pull_task_died(&mut self, reference: &str, e: &tokio::task::JoinError) {
        let policy = self.policy.clone();
        let Some(state) = self.states.get_mut(reference) else { return };
        let why = if e.is_panic() { "the pull task panicked" } else { "the pull was cancelled" };
        let delay = state.pull_failed(Instant::now(), why.to_string(), &policy);
        if e.is_panic() {
            tracing::error!(image = %reference, retry_in_ms = delay.as_millis() as u64, "{why}");
        }
    }

    fn runtime_answered(&mut self) {
        if self.runtime_down.take().is_some() {
            tracing::info!(socket = %self.rt.socket().display(), "runtime answering again");
        }
    }

    fn runtime_not_answering(&mut self, error: &dyn std::fmt::Display) {
        if self.runtime_down.is_none() {
            tracing::warn!(socket = %self.rt.socket().display(), error = %error, "runtime not answering");
        }
        self.runtime_down = Some(error.to_string());
    }

    fn labels_for(&self, reference: &str) -> Vec<ImageLabels> {
        self.list
            .entries()
            .iter()
            .filter(|e| e.reference == reference)
            .map(|e| ImageLabels { name: e.name.clone(), image: e.image.clone() })
            .collect()
    }

    /// Metrics and readiness from the current states.
    fn publish_state(&self) {
        let m = &self.metrics;
        m.cri_up.set(self.runtime_down.is_none() as i64);
        m.images_desired.set(self.list.len() as i64);
        let (mut cached, mut pinned, mut never_cached) = (0, 0, Vec::new());
        for e in self.list.entries() {
            let Some(s) = self.states.get(&e.reference) else { continue };
            let labels = ImageLabels { name: e.name.clone(), image: e.image.clone() };
            m.image_cached.get_or_create(&labels).set(s.seen.present as i64);
            m.image_pinned.get_or_create(&labels).set(s.seen.pinned as i64);
            cached += s.seen.present as i64;
            pinned += s.seen.pinned as i64;
            if !s.ever_cached {
                never_cached.push(e.name.as_str());
            }
        }
        m.images_cached.set(cached);
        m.images_pinned.set(pinned);
        let pin_problem = self.rt.pin_problem();
        m.pinning_available.set(pin_problem.is_none() as i64);
        self.ready.set(if let Some(error) = &self.runtime_down {
            Some(format!("runtime not answering on {}: {error}", self.rt.socket().display()))
        } else if let Some(problem) = pin_problem.filter(|_| self.rt.can_pin()) {
            Some(format!("pinning does not work: {problem}"))
        } else if !self.list_known {
            Some("waiting for the image list from the coordinator".into())
        } else if !never_cached.is_empty() {
            Some(format!("not cached yet: {}", never_cached.join(", ")))
        } else {
            None
        });
        if let Some((node, tx)) = &self.reports {
            let report = self.report(node);
            tx.send_if_modified(|current| {
                let changed = *current != report;
                if changed {
                    *current = report;
                }
                changed
            });
        }
    }

    /// The state the coordinator is told about.
    fn report(&self, node: &str) -> v1::NodeReport {
        v1::NodeReport {
            node_name: node.to_string(),
            runtime: Some(v1::RuntimeState {
                available: self.runtime_down.is_none(),
                name: self.rt.info().name.clone(),
                version: self.rt.info().version.clone(),
                error: match &self.runtime_down {
                    None => String::new(),
                    Some(error) => format!("runtime not answering on {}: {error}", self.rt.socket().display()),
                },
                pin_error: self.rt.pin_problem().unwrap_or_default(),
                // The runtime answered CRI `Version` at start-up: whatever went wrong since is
                // the kind that passes (a restart, a call past its deadline).
                not_answering: self.runtime_down.is_some(),
            }),
            generation: self.generation,
            images: self
                .list
                .entries()
                .iter()
                .map(|e| {
                    let s = self.states.get(&e.reference);
                    v1::ImageState {
                        name: e.name.clone(),
                        image: e.image.clone(),
                        cached: s.is_some_and(|s| s.seen.present),
                        pinned: s.is_some_and(|s| s.seen.pinned),
                        digest: s
                            .and_then(|s| s.reported_digest(self.digests.get(&e.reference).map(String::as_str)))
                            .unwrap_or_default()
                            .to_string(),
                        last_error: s.and_then(|s| s.last_error.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            released: self.release != v1::Release::None && self.release_outcome == Some(Ok(())),
            // set_list clears the outcome whenever the release changes, so it is `None` without one.
            release_error: match &self.release_outcome {
                Some(Err(e)) => e.clone(),
                _ => String::new(),
            },
        }
    }
}

/// The result of `--once` for one image.
pub struct OnceOutcome {
    pub entry: ImageEntry,
    pub result: Result<Observation, ImageError>,
}

/// Caches and pins every listed image once, with a few retries per image; removes kip's pins
/// from images no longer listed. Used by `--once`.
pub async fn run_once<R: Runtime>(
    rt: &R,
    list: &ImageList,
    secrets: &PullSecrets,
    policy: &Policy,
) -> Vec<OnceOutcome> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(policy.max_parallel_pulls.max(1)));
    let snapshot = Arc::new(rt.snapshot().await.unwrap_or_else(|e| {
        // Each image is then asked about on its own (and fails on its own if the runtime is down).
        tracing::warn!(error = %e, "listing the runtime's images failed; asking image by image");
        Snapshot::default()
    }));
    let mut tasks = JoinSet::new();
    for (index, entry) in list.entries().iter().cloned().enumerate() {
        let (rt, secrets, sem, policy) = (rt.clone(), secrets.clone(), semaphore.clone(), policy.clone());
        let snapshot = snapshot.clone();
        tasks.spawn(async move {
            let result = async {
                // The semaphore is never closed, so a permit always comes.
                let _permit = sem.acquire_owned().await.ok();
                if let Some(image) = observe_image(&rt, &snapshot, &entry.reference).await?.image {
                    return Ok(pin_image(&rt, &entry.reference, &image).await);
                }
                let attempt = || pull_and_pin(&rt, &secrets, &[], &entry, policy.pull_timeout, None);
                attempt
                    .retry(ExponentialBuilder::default().with_min_delay(policy.retry_min).with_max_delay(policy.retry_max).with_jitter().with_max_times(2))
                    .notify(|e, delay| tracing::warn!(image = %entry.reference, error = %e, retry_in_ms = delay.as_millis() as u64, "pull failed; retrying"))
                    .await
            }
            .await;
            (index, OnceOutcome { entry, result })
        });
    }
    let mut outcomes: Vec<(usize, OnceOutcome)> = tasks.join_all().await;
    outcomes.sort_by_key(|(i, _)| *i);
    let outcomes: Vec<OnceOutcome> = outcomes.into_iter().map(|(_, o)| o).collect();
    let mut states = States::new();
    reconcile::sync_states(&mut states, list);
    for o in &outcomes {
        if let (Ok(obs), Some(s)) = (&o.result, states.get_mut(&o.entry.reference)) {
            s.observe(obs.clone());
        }
    }
    // Only when every listed image was seen: otherwise a failed image's records would look unlisted.
    if outcomes.iter().all(|o| o.result.is_ok()) {
        if let Err(e) = unpin_unlisted(rt, &states, false).await {
            tracing::warn!(error = %e, "removing stale pins failed");
        }
    }
    outcomes
}

#[cfg(test)]
mod tests;
