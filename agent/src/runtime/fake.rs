//! A runtime in memory for the agent's loop tests: images appear when pulled, vanish when a
//! test removes them, pins follow the calls, and every call is counted. Failures (runtime
//! down, pulls that fail, pins refused) are switched on by the test.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kip::cri::AuthConfig;
use tokio::time::Instant;

use super::{plan_removal, Keep, Removal, RemovalVerdict, Runtime, RuntimeError, Snapshot};
use crate::cri::{repository_of, CriError, ImageInfo, RuntimeInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    None,
    Kip,
    /// Someone else's pin (an admin): kip must never remove it.
    Other,
}

#[derive(Debug)]
struct FakeImage {
    digest: String,
    pin: Pin,
}

#[derive(Debug, Default)]
pub struct FakeState {
    images: BTreeMap<String, FakeImage>,
    /// What each tag resolves to in the "registry" (default: a digest derived from the name).
    registry: HashMap<String, String>,
    pub down: bool,
    failing_pulls: HashMap<String, u32>,
    /// Pulls that panic (a bug in a backend), as many times as given.
    panicking_pulls: HashMap<String, u32>,
    pub pin_problem: Option<String>,
    pub pulls: Vec<(String, Instant)>,
    /// How long a pull takes (paused time in the tests).
    pub pull_time: Duration,
    pulls_in_flight: usize,
    /// `sync_pins` calls made while a pull was in flight (the agent must make none).
    pub syncs_during_pulls: usize,
    pub status_calls: usize,
    pub snapshots: usize,
    pub pin_calls: usize,
    /// Images the listing does not show under kip's reference (a runtime storing another
    /// spelling of the name): `status` still finds them.
    pub unlisted: Vec<String>,
    pub removed: Vec<String>,
    /// Other names of an image (an admin's `ctr images tag`), not kip's.
    aliases: HashMap<String, Vec<String>>,
    /// `release` calls (the end of a release: leftovers such as CRI-O's drop-in).
    pub releases: usize,
}

#[derive(Clone, Debug)]
pub struct FakeRuntime {
    state: Arc<Mutex<FakeState>>,
    info: RuntimeInfo,
    socket: PathBuf,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            info: RuntimeInfo { name: "fake".into(), version: "1.0".into() },
            socket: PathBuf::from("/run/fake.sock"),
        }
    }
}

impl FakeRuntime {
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An image already on the node, pinned by `pin`.
    pub fn add(&self, reference: &str, pin: Pin) {
        let digest = self.resolve(reference);
        self.state().images.insert(reference.into(), FakeImage { digest, pin });
    }

    /// Removes an image as kubelet's GC or `crictl rmi` would.
    pub fn delete(&self, reference: &str) {
        self.state().images.remove(reference);
    }

    pub fn move_tag(&self, reference: &str, digest: &str) {
        self.state().registry.insert(reference.into(), digest.into());
    }

    pub fn fail_next_pulls(&self, reference: &str, times: u32) {
        self.state().failing_pulls.insert(reference.into(), times);
    }

    /// `alias` names the same image as `reference` (an admin's tag of that content).
    pub fn alias(&self, reference: &str, alias: &str) {
        self.state().aliases.entry(reference.into()).or_default().push(alias.into());
    }

    pub fn panic_next_pulls(&self, reference: &str, times: u32) {
        self.state().panicking_pulls.insert(reference.into(), times);
    }

    pub fn pin_of(&self, reference: &str) -> Option<Pin> {
        self.state().images.get(reference).map(|i| i.pin)
    }

    pub fn digest_of(&self, reference: &str) -> Option<String> {
        self.state().images.get(reference).map(|i| i.digest.clone())
    }

    pub fn pulls_of(&self, reference: &str) -> Vec<Instant> {
        self.state().pulls.iter().filter(|(r, _)| r == reference).map(|(_, t)| *t).collect()
    }

    fn resolve(&self, reference: &str) -> String {
        if let Some((_, digest)) = reference.split_once('@') {
            return digest.to_string();
        }
        self.state().registry.get(reference).cloned().unwrap_or_else(|| format!("sha256:{:0>64}", reference.len()))
    }

    fn info_of(reference: &str, image: &FakeImage, aliases: &[String]) -> ImageInfo {
        let repo = repository_of(reference);
        let own = if reference.contains('@') { vec![] } else { vec![reference.to_string()] };
        ImageInfo {
            id: format!("id-{}", image.digest),
            repo_tags: own.into_iter().chain(aliases.iter().cloned()).collect(),
            repo_digests: vec![format!("{repo}@{}", image.digest)],
            pinned: image.pin != Pin::None,
        }
    }

    fn down_error(&self, op: &'static str, reference: &str) -> Result<(), RuntimeError> {
        if self.state().down {
            return Err(CriError::Call {
                op,
                image: reference.into(),
                code: tonic::Code::Unavailable,
                message: "runtime down".into(),
            }
            .into());
        }
        Ok(())
    }
}

impl Runtime for FakeRuntime {
    fn info(&self) -> &RuntimeInfo {
        &self.info
    }
    fn socket(&self) -> &Path {
        &self.socket
    }
    fn pin_problem(&self) -> Option<String> {
        self.state().pin_problem.clone()
    }

    async fn snapshot(&self) -> Result<Snapshot, RuntimeError> {
        self.down_error("ListImages", "*")?;
        let mut state = self.state();
        state.snapshots += 1;
        let hidden = state.unlisted.clone();
        let images = state
            .images
            .iter()
            .filter(|(r, _)| !hidden.contains(*r))
            .map(|(r, i)| Self::info_of(r, i, state.aliases.get(r).map_or(&[], Vec::as_slice)))
            .collect();
        Ok(Snapshot::new(images, None))
    }

    async fn status(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        self.down_error("ImageStatus", reference)?;
        let mut state = self.state();
        state.status_calls += 1;
        let aliases = state.aliases.get(reference).cloned().unwrap_or_default();
        Ok(state.images.get(reference).map(|i| Self::info_of(reference, i, &aliases)))
    }

    async fn pull(
        &self,
        reference: &str,
        _known: Option<&ImageInfo>,
        _auth: Option<AuthConfig>,
        _timeout: Duration,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        self.down_error("PullImage", reference)?;
        let digest = self.resolve(reference);
        let pull_time = self.state().pull_time;
        if !pull_time.is_zero() {
            self.state().pulls_in_flight += 1;
            tokio::time::sleep(pull_time).await;
            self.state().pulls_in_flight -= 1;
        }
        let mut state = self.state();
        state.pulls.push((reference.to_string(), Instant::now()));
        if let Some(left) = state.panicking_pulls.get_mut(reference).filter(|n| **n > 0) {
            *left -= 1;
            drop(state);
            panic!("the fake runtime's pull of {reference} panics, as asked");
        }
        if let Some(left) = state.failing_pulls.get_mut(reference).filter(|n| **n > 0) {
            *left -= 1;
            return Err(CriError::Call {
                op: "PullImage",
                image: reference.into(),
                code: tonic::Code::Unknown,
                message: "registry said no".into(),
            }
            .into());
        }
        let pin = state.images.get(reference).map_or(Pin::None, |i| i.pin);
        let image = FakeImage { digest, pin };
        let info = Self::info_of(reference, &image, state.aliases.get(reference).map_or(&[], Vec::as_slice));
        state.images.insert(reference.to_string(), image);
        Ok(Some(info))
    }

    async fn is_pinned(&self, _reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        Ok(image.pinned)
    }

    async fn pin(&self, reference: &str, _image: &ImageInfo) -> Result<bool, RuntimeError> {
        self.down_error("Pin", reference)?;
        let mut state = self.state();
        state.pin_calls += 1;
        if let Some(problem) = state.pin_problem.clone() {
            return Err(CriError::Call {
                op: "Pin",
                image: reference.into(),
                code: tonic::Code::Unknown,
                message: problem,
            }
            .into());
        }
        match state.images.get_mut(reference) {
            Some(image) => {
                if image.pin == Pin::None {
                    image.pin = Pin::Kip;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn sync_pins(&self, keep: &Keep) -> Result<Vec<String>, RuntimeError> {
        self.down_error("List", "*")?;
        let mut released = Vec::new();
        let mut state = self.state();
        if state.pulls_in_flight > 0 {
            state.syncs_during_pulls += 1;
        }
        for (reference, image) in &mut state.images {
            if image.pin == Pin::Kip && !keep.references.contains(reference) {
                image.pin = Pin::None;
                released.push(reference.clone());
            }
        }
        Ok(released)
    }

    async fn remove_released(&self, released: &[String]) -> Result<Removal, RuntimeError> {
        let mut state = self.state();
        let references: Vec<String> = state.images.keys().cloned().collect();
        let names: Vec<Vec<String>> = references
            .iter()
            .map(|r| std::iter::once(r.clone()).chain(state.aliases.get(r).cloned().unwrap_or_default()).collect())
            .collect();
        let mut removal = Removal::default();
        for (i, verdict) in plan_removal(&names, released) {
            match verdict {
                RemovalVerdict::Delete => {
                    state.images.remove(&references[i]);
                    state.removed.push(references[i].clone());
                    removal.deleted.push(references[i].clone());
                }
                RemovalVerdict::Keep { name, why } => removal.kept.push((name, why)),
            }
        }
        Ok(removal)
    }

    async fn release(&self) -> Result<(), RuntimeError> {
        self.down_error("Release", "*")?;
        self.state().releases += 1;
        Ok(())
    }
}
