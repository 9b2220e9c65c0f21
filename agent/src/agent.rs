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

use crate::auth::{Credentials, Keyring};
use crate::cri::{CriClient, CriError, ImageInfo, RuntimeInfo};
use crate::follow::ListUpdate;
use crate::http::Readiness;
use crate::metrics::{ImageLabels, Metrics, PullLabels, ResultLabels, RESULT_FAILURE, RESULT_SUCCESS};
use crate::pin::Pinner;
use crate::reconcile::{self, Action, Observation, Policy, PullReason, States};

/// The runtime behind the socket: CRI for images, containerd's native API for pins.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub cri: CriClient,
    /// `None` when the runtime is not containerd: images are then kept by re-pulling only.
    pub pinner: Option<Pinner>,
    pub info: RuntimeInfo,
}

impl Runtime {
    pub async fn connect(socket: &std::path::Path) -> Result<Self, CriError> {
        let cri = CriClient::new(socket);
        let info = cri.version().await?;
        let pinner = (info.name == "containerd").then(|| Pinner::new(crate::cri::unix_channel(socket)));
        Ok(Self { cri, pinner, info })
    }
}

/// Why one image could not be cached and pinned; names the image, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Cri(#[from] CriError),
    #[error("pinning `{image}`: {source}")]
    Pin { image: String, source: crate::pin::PinError },
    #[error("pull secrets for `{image}`: {source}")]
    Secrets { image: String, source: crate::auth::AuthError },
    #[error("`{image}` was pulled but the runtime does not list it")]
    MissingAfterPull { image: String },
}

impl ImageError {
    fn is_runtime_down(&self) -> bool {
        matches!(self, ImageError::Cri(e) if e.is_runtime_down())
    }
}

/// Credentials for the image's registry from the mounted pull secrets (read on every pull,
/// so rotated secrets are used without a restart).
pub fn credentials_for(
    secrets_dir: Option<&std::path::Path>,
    entry: &ImageEntry,
) -> Result<Option<Credentials>, ImageError> {
    let Some(dir) = secrets_dir else { return Ok(None) };
    let keyring =
        Keyring::load(dir).map_err(|source| ImageError::Secrets { image: entry.reference.clone(), source })?;
    Ok(keyring.for_registry(&entry.registry).cloned())
}

/// What the runtime shows of one image now, including whether every record is pinned.
pub async fn observe_image(rt: &Runtime, reference: &str) -> Result<Observation, ImageError> {
    let Some(info) = rt.cri.image_status(reference).await? else { return Ok(Observation::absent()) };
    let refs = info.refs_of(reference);
    let pinned = match &rt.pinner {
        // Runtimes that report the pin (containerd >= 1.7) save the label lookups.
        _ if info.pinned => true,
        Some(p) => p.is_pinned(&refs).await.map_err(|source| ImageError::Pin { image: reference.into(), source })?,
        None => false,
    };
    Ok(present(&info, reference, refs, pinned))
}

fn present(info: &ImageInfo, reference: &str, refs: Vec<String>, pinned: bool) -> Observation {
    Observation { present: true, pinned, digest: info.digest_in(reference).map(str::to_string), refs }
}

/// Pins every record of an image already present; returns the resulting observation.
/// `foreign` lists records someone else had pinned before a pull (see [`crate::pin::Pinner::pin`]).
pub async fn pin_image(rt: &Runtime, reference: &str, foreign: &[String]) -> Result<Observation, ImageError> {
    let Some(info) = rt.cri.image_status(reference).await? else { return Ok(Observation::absent()) };
    let refs = info.refs_of(reference);
    let pinned = match &rt.pinner {
        Some(p) => {
            let changed =
                p.pin(&refs, foreign).await.map_err(|source| ImageError::Pin { image: reference.into(), source })?;
            if changed > 0 {
                tracing::info!(image = reference, records = changed, "pinned");
            }
            true
        }
        None => info.pinned,
    };
    Ok(present(&info, reference, refs, pinned))
}

/// Records of `reference` that someone other than kip has pinned (empty when absent).
async fn foreign_pins(rt: &Runtime, reference: &str) -> Result<Vec<String>, ImageError> {
    let Some(pinner) = &rt.pinner else { return Ok(vec![]) };
    let Some(info) = rt.cri.image_status(reference).await? else { return Ok(vec![]) };
    pinner
        .pinned_by_others(&info.refs_of(reference))
        .await
        .map_err(|source| ImageError::Pin { image: reference.into(), source })
}

/// One pull attempt followed by the pin. Error text is scrubbed of the credentials used.
pub async fn pull_and_pin(
    rt: &Runtime,
    secrets_dir: Option<&std::path::Path>,
    entry: &ImageEntry,
    timeout: Duration,
) -> Result<Observation, ImageError> {
    let creds = credentials_for(secrets_dir, entry)?;
    let auth = creds.as_ref().map(Credentials::to_cri);
    let foreign = foreign_pins(rt, &entry.reference).await?;
    if let Err(e) = rt.cri.pull(&entry.reference, auth, timeout).await {
        return Err(match (e, &creds) {
            (CriError::Call { op, image, code, message }, Some(c)) => {
                CriError::Call { op, image, code, message: c.redact(&message) }
            }
            (e, _) => e,
        }
        .into());
    }
    let obs = pin_image(rt, &entry.reference, &foreign).await?;
    if !obs.present {
        return Err(ImageError::MissingAfterPull { image: entry.reference.clone() });
    }
    Ok(obs)
}

/// Removes kip's pins from records no listed image needs; with `remove` also deletes them.
pub async fn unpin_unlisted(rt: &Runtime, states: &States, remove: bool) -> Result<(), ImageError> {
    let Some(pinner) = &rt.pinner else { return Ok(()) };
    let pin_err = |source| ImageError::Pin { image: "*".into(), source };
    let stale = reconcile::refs_to_unpin(&pinner.kip_pinned_names().await.map_err(pin_err)?, states);
    if stale.is_empty() {
        return Ok(());
    }
    let changed = pinner.unpin(&stale).await.map_err(pin_err)?;
    tracing::info!(records = changed, refs = ?stale, "removed kip's pin from images no longer listed");
    if remove {
        for r in &stale {
            rt.cri.remove(r).await?;
            tracing::info!(image = %r, "removed unlisted image (--remove-unlisted)");
        }
    }
    Ok(())
}

struct PullDone {
    reference: String,
    reason: PullReason,
    elapsed: Duration,
    result: Result<Observation, ImageError>,
}

/// Where the image list comes from.
pub enum ListSource {
    /// `--images`: fixed for the life of the process.
    Fixed(ImageList),
    /// The coordinator (through [`crate::follow::Follower`]); `None` until a list is known.
    Coordinator(tokio::sync::watch::Receiver<Option<ListUpdate>>),
}

/// The long-running agent.
pub struct Agent {
    pub rt: Runtime,
    pub secrets_dir: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
    pub ready: Readiness,
    pub remove_unlisted: bool,
    /// Node name and where to publish the state the coordinator is sent.
    pub reports: Option<(String, tokio::sync::watch::Sender<v1::NodeReport>)>,
    base_policy: Policy,
    policy: Policy,
    source: ListSource,
    list: ImageList,
    generation: u64,
    /// False until a list is known: without one, no pin may be judged unlisted.
    list_known: bool,
    states: States,
    cri_up: bool,
}

impl Agent {
    pub fn new(rt: Runtime, source: ListSource, policy: Policy, metrics: Arc<Metrics>, ready: Readiness) -> Self {
        metrics
            .runtime_info
            .get_or_create(&crate::metrics::RuntimeLabels {
                runtime: rt.info.name.clone(),
                version: rt.info.version.clone(),
            })
            .set(1);
        let mut agent = Self {
            rt,
            secrets_dir: None,
            metrics,
            ready,
            remove_unlisted: false,
            reports: None,
            base_policy: policy.clone(),
            policy,
            source,
            list: ImageList::default(),
            generation: 0,
            list_known: false,
            states: States::new(),
            cri_up: true,
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
        self.generation = update.map_or(0, |u| u.generation);
        self.list_known = true;
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
        let mut pulls: JoinSet<PullDone> = JoinSet::new();
        let mut runtime_backoff = reconcile::retry_backoff(Duration::from_secs(1), Duration::from_secs(30));
        let mut next_check = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_check {
                match self.check_images().await {
                    Ok(()) => {
                        runtime_backoff = reconcile::retry_backoff(Duration::from_secs(1), Duration::from_secs(30));
                        next_check = now + self.policy.check_interval;
                    }
                    Err(e) => {
                        let delay = runtime_backoff.next().unwrap_or(Duration::from_secs(30));
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "runtime not reachable; will retry");
                        next_check = now + delay;
                    }
                }
            }
            if self.cri_up {
                self.start_due_work(&mut pulls).await;
            }
            self.publish_state();
            let wake =
                reconcile::next_wake(&self.list, &self.states, &self.policy).map_or(next_check, |t| t.min(next_check));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
                Some(done) = pulls.join_next(), if !pulls.is_empty() => match done {
                    Ok(done) => self.finish_pull(done),
                    Err(e) => tracing::error!(error = %e, "pull task failed"),
                },
                Some(update) = Self::next_list(&mut self.source) => {
                    self.set_list(update.list.clone(), Some(&update));
                    // Check at once: new images are pulled and dropped ones unpinned now.
                    next_check = Instant::now();
                }
            }
        }
        // Dropping the tasks cancels their gRPC calls, which cancels the runtime's pulls.
        pulls.shutdown().await;
        tracing::info!("agent stopped");
    }

    /// Looks at every listed image; notices vanished ones; removes stale pins.
    async fn check_images(&mut self) -> Result<(), ImageError> {
        let refs: Vec<String> = self.states.keys().cloned().collect();
        for reference in refs {
            match observe_image(&self.rt, &reference).await {
                Ok(obs) => {
                    let Some(state) = self.states.get_mut(&reference) else { continue };
                    if state.in_flight {
                        continue; // the pull's own result is fresher
                    }
                    if state.observe(obs) {
                        let labels = self.labels_for(&reference);
                        tracing::warn!(image = %reference, "cached image disappeared; pulling it again");
                        for l in labels {
                            self.metrics.image_repulls.get_or_create(&l).inc();
                        }
                    }
                }
                Err(e) if e.is_runtime_down() => {
                    self.set_cri_up(false);
                    return Err(e);
                }
                Err(e) => tracing::warn!(image = %reference, error = %e, "checking image failed"),
            }
        }
        self.set_cri_up(true);
        if !self.list_known {
            return Ok(());
        }
        if let Err(e) = unpin_unlisted(&self.rt, &self.states, self.remove_unlisted).await {
            tracing::warn!(error = %e, "removing stale pins failed; will retry at the next check");
        }
        Ok(())
    }

    async fn start_due_work(&mut self, pulls: &mut JoinSet<PullDone>) {
        for action in reconcile::plan(&self.list, &self.states, Instant::now(), &self.policy) {
            match action {
                Action::Pin { reference } => match pin_image(&self.rt, &reference, &[]).await {
                    Ok(obs) => {
                        if let Some(s) = self.states.get_mut(&reference) {
                            s.observe(obs);
                        }
                    }
                    Err(e) => tracing::warn!(image = %reference, error = %e, "pinning failed"),
                },
                Action::Pull { reference, reason } => {
                    let Some(entry) = self.list.entries().iter().find(|e| e.reference == reference).cloned() else {
                        continue;
                    };
                    if let Some(s) = self.states.get_mut(&reference) {
                        s.pull_started();
                    }
                    tracing::info!(image = %reference, reason = reason.as_str(), "pulling");
                    let (rt, dir, timeout) = (self.rt.clone(), self.secrets_dir.clone(), self.policy.pull_timeout);
                    pulls.spawn(async move {
                        let started = Instant::now();
                        let result = pull_and_pin(&rt, dir.as_deref(), &entry, timeout).await;
                        PullDone { reference, reason, elapsed: started.elapsed(), result }
                    });
                }
            }
        }
    }

    fn finish_pull(&mut self, done: PullDone) {
        let PullDone { reference, reason, elapsed, result } = done;
        let result_label = if result.is_ok() { RESULT_SUCCESS } else { RESULT_FAILURE };
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
        let Some(state) = self.states.get_mut(&reference) else { return };
        let elapsed_ms = elapsed.as_millis() as u64;
        match result {
            Ok(obs) => {
                tracing::info!(image = %reference, reason = reason.as_str(), digest = obs.digest.as_deref().unwrap_or(""), pinned = obs.pinned, elapsed_ms, "cached");
                state.pull_succeeded(Instant::now(), obs);
            }
            Err(e) => {
                if e.is_runtime_down() {
                    self.cri_up = false;
                }
                let delay = state.pull_failed(Instant::now(), e.to_string(), &policy);
                tracing::warn!(image = %reference, error = %e, elapsed_ms, retry_in_ms = delay.as_millis() as u64, "pull failed");
            }
        }
    }

    fn set_cri_up(&mut self, up: bool) {
        if up != self.cri_up {
            if up {
                tracing::info!(socket = %self.rt.cri.socket().display(), "runtime reachable again");
            } else {
                tracing::warn!(socket = %self.rt.cri.socket().display(), "runtime not reachable");
            }
        }
        self.cri_up = up;
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
        m.cri_up.set(self.cri_up as i64);
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
        self.ready.set(if !self.cri_up {
            Some(format!("runtime not reachable on {}", self.rt.cri.socket().display()))
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
                available: self.cri_up,
                name: self.rt.info.name.clone(),
                version: self.rt.info.version.clone(),
                error: if self.cri_up {
                    String::new()
                } else {
                    format!("runtime not reachable on {}", self.rt.cri.socket().display())
                },
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
                        digest: s.and_then(|s| s.seen.digest.clone()).unwrap_or_default(),
                        last_error: s.and_then(|s| s.last_error.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
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
pub async fn run_once(
    rt: &Runtime,
    list: &ImageList,
    secrets_dir: Option<&std::path::Path>,
    policy: &Policy,
) -> Vec<OnceOutcome> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(policy.max_parallel_pulls.max(1)));
    let mut tasks = JoinSet::new();
    for (index, entry) in list.entries().iter().cloned().enumerate() {
        let (rt, dir, sem, policy) = (rt.clone(), secrets_dir.map(PathBuf::from), semaphore.clone(), policy.clone());
        tasks.spawn(async move {
            let result = async {
                // The semaphore is never closed, so a permit always comes.
                let _permit = sem.acquire_owned().await.ok();
                if observe_image(&rt, &entry.reference).await?.present {
                    return pin_image(&rt, &entry.reference, &[]).await;
                }
                let attempt = || pull_and_pin(&rt, dir.as_deref(), &entry, policy.pull_timeout);
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
