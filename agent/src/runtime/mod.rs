//! The runtime behind the CRI socket, as the agent's decisions see it: one face (status, pull,
//! pin, unpin, identity) with a backend per runtime. Images are always handled through the CRI;
//! pins through what each runtime offers: containerd's image labels, CRI-O's `pinned_images`.

pub mod containerd;
pub mod crio;
#[cfg(test)]
pub mod fake;

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kip::cri::AuthConfig;

use crate::cri::{CriClient, CriError, ImageInfo, RuntimeInfo};

/// Why a runtime call failed; names the image or the file, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error(transparent)]
    Containerd(#[from] containerd::LabelError),
    #[error(transparent)]
    Crio(#[from] crio::CrioError),
}

impl RuntimeError {
    /// True when the runtime itself could not be reached (as opposed to a per-image failure).
    pub fn is_runtime_down(&self) -> bool {
        match self {
            RuntimeError::Cri(e) => e.is_runtime_down(),
            RuntimeError::Containerd(e) => e.code == tonic::Code::Unavailable,
            RuntimeError::Crio(_) => false,
        }
    }
}

/// What every backend does. The agent asks `status` once per image per check and passes the
/// answer to the other calls instead of asking again.
pub trait Runtime: Clone + Send + Sync + 'static {
    fn info(&self) -> &RuntimeInfo;
    fn socket(&self) -> &Path;

    /// `None` while kip's pins work on this runtime; otherwise why not. Images are then kept
    /// by pulling them again when they disappear.
    fn pin_problem(&self) -> Option<String>;

    /// False for a runtime kip knows no pinning API for: its pin problem is a fact of life,
    /// not something an admin can fix, so it does not make the agent unready.
    fn can_pin(&self) -> bool {
        true
    }

    /// CRI `ImageStatus`: `None` when the image is absent.
    fn status(&self, reference: &str) -> impl Future<Output = Result<Option<ImageInfo>, RuntimeError>> + Send;

    /// CRI `PullImage`, then the image's status. `known` is what the last check saw (records
    /// whose pins a runtime could lose in the pull are restored by the backend).
    fn pull(
        &self,
        reference: &str,
        known: Option<&ImageInfo>,
        auth: Option<AuthConfig>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<ImageInfo>, RuntimeError>> + Send;

    /// Whether the present image is pinned (by kip or anyone), from `image` where the runtime
    /// reports pins through the CRI.
    fn is_pinned(&self, reference: &str, image: &ImageInfo) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// Pins the present image; true once the runtime holds the pin.
    fn pin(&self, reference: &str, image: &ImageInfo) -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// Makes kip's pins follow the list: removes kip's pins from everything `keep` does not
    /// name. Returns the names whose pin kip removed. Pins kip did not set are never touched.
    fn sync_pins(&self, keep: &Keep) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;

    /// CRI `RemoveImage` (idempotent).
    fn remove(&self, reference: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// After the last pin is gone (kip is being uninstalled): removes what kip keeps on the
    /// node for its pins besides the pins themselves. Only CRI-O has something (the drop-in).
    fn release(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        std::future::ready(Ok(()))
    }
}

/// A runtime's version as CRI `Version` gives it (`1.6.20~ds1`, `v1.7.24`, `2.1.9+unknown`,
/// `1.36.3`) → (major, minor, patch); a missing patch counts as 0.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.trim_start_matches('v').splitn(3, '.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    Some((parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// What the listed images need kept pinned: their references and every record name the
/// runtime showed for them (tags, digests, image IDs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    pub references: Vec<String>,
    pub records: HashSet<String>,
}

/// The node's runtime, picked from what answers on the socket.
#[derive(Clone, Debug)]
pub enum NodeRuntime {
    Containerd(containerd::Containerd),
    Crio(crio::Crio),
    /// Any other CRI runtime: cached, never pinned.
    Unpinned(CriOnly),
}

/// Where CRI-O keeps its configuration (`--crio-config`, `--crio-config-dir`).
#[derive(Clone, Debug)]
pub struct CrioPaths {
    pub config: PathBuf,
    pub config_dir: PathBuf,
}

impl NodeRuntime {
    /// Asks the socket who it is (CRI `Version`) and picks the backend.
    pub async fn connect(socket: &Path, crio: &CrioPaths) -> Result<Self, CriError> {
        let cri = CriClient::new(socket);
        let info = cri.version().await?;
        Ok(match info.name.as_str() {
            "containerd" => NodeRuntime::Containerd(containerd::Containerd::new(cri, info)),
            "cri-o" => NodeRuntime::Crio(crio::Crio::new(cri, info, crio.clone())),
            _ => NodeRuntime::Unpinned(CriOnly::new(cri, info)),
        })
    }
}

/// Dispatches one call to whichever backend this is.
macro_rules! each_backend {
    ($self:ident, $rt:ident => $call:expr) => {
        match $self {
            NodeRuntime::Containerd($rt) => $call,
            NodeRuntime::Crio($rt) => $call,
            NodeRuntime::Unpinned($rt) => $call,
        }
    };
}

impl Runtime for NodeRuntime {
    fn info(&self) -> &RuntimeInfo {
        each_backend!(self, rt => rt.info())
    }
    fn socket(&self) -> &Path {
        each_backend!(self, rt => rt.socket())
    }
    fn pin_problem(&self) -> Option<String> {
        each_backend!(self, rt => rt.pin_problem())
    }
    fn can_pin(&self) -> bool {
        each_backend!(self, rt => rt.can_pin())
    }
    async fn status(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        each_backend!(self, rt => rt.status(reference).await)
    }
    async fn pull(
        &self,
        reference: &str,
        known: Option<&ImageInfo>,
        auth: Option<AuthConfig>,
        timeout: Duration,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        each_backend!(self, rt => rt.pull(reference, known, auth, timeout).await)
    }
    async fn is_pinned(&self, reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        each_backend!(self, rt => rt.is_pinned(reference, image).await)
    }
    async fn pin(&self, reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        each_backend!(self, rt => rt.pin(reference, image).await)
    }
    async fn sync_pins(&self, keep: &Keep) -> Result<Vec<String>, RuntimeError> {
        each_backend!(self, rt => rt.sync_pins(keep).await)
    }
    async fn remove(&self, reference: &str) -> Result<(), RuntimeError> {
        each_backend!(self, rt => rt.remove(reference).await)
    }
    async fn release(&self) -> Result<(), RuntimeError> {
        each_backend!(self, rt => rt.release().await)
    }
}

/// Plain CRI: images, no pins. The backend of runtimes kip knows no pinning API for, and what
/// the other backends build on for everything but pins.
#[derive(Clone, Debug)]
pub struct CriOnly {
    cri: CriClient,
    info: RuntimeInfo,
}

impl CriOnly {
    pub fn new(cri: CriClient, info: RuntimeInfo) -> Self {
        Self { cri, info }
    }
}

impl Runtime for CriOnly {
    fn info(&self) -> &RuntimeInfo {
        &self.info
    }
    fn socket(&self) -> &Path {
        self.cri.socket()
    }
    fn pin_problem(&self) -> Option<String> {
        Some(format!("kip knows no pinning API for the runtime `{}`", self.info.name))
    }
    fn can_pin(&self) -> bool {
        false
    }
    async fn status(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        Ok(self.cri.image_status(reference).await?)
    }
    async fn pull(
        &self,
        reference: &str,
        _known: Option<&ImageInfo>,
        auth: Option<AuthConfig>,
        timeout: Duration,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        self.cri.pull(reference, auth, timeout).await?;
        Ok(self.cri.image_status(reference).await?)
    }
    async fn is_pinned(&self, _reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        Ok(image.pinned)
    }
    async fn pin(&self, _reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        Ok(image.pinned)
    }
    async fn sync_pins(&self, _keep: &Keep) -> Result<Vec<String>, RuntimeError> {
        Ok(vec![])
    }
    async fn remove(&self, reference: &str) -> Result<(), RuntimeError> {
        Ok(self.cri.remove(reference).await?)
    }
}
