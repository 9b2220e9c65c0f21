//! The runtime behind the CRI socket, as the agent's decisions see it: one face (status, pull,
//! pin, unpin, identity) with a backend per runtime. Images are always handled through the CRI;
//! pins through what each runtime offers: containerd's image labels, CRI-O's `pinned_images`.

pub mod containerd;
pub mod crio;
#[cfg(test)]
pub mod fake;

use std::collections::{HashMap, HashSet};
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
            RuntimeError::Containerd(e) => matches!(e.code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
            RuntimeError::Crio(_) => false,
        }
    }
}

/// What every backend does. A check reads the whole runtime once (`snapshot`); `status` is
/// for what the snapshot does not name, and its answer is passed to the other calls instead
/// of asking again.
pub trait Runtime: Clone + Send + Sync + 'static {
    fn info(&self) -> &RuntimeInfo;
    fn socket(&self) -> &Path;

    /// Every image and pin at once: one CRI `ListImages`, plus one read of the image labels
    /// where the runtime does not report pins through the CRI. A check costs the same few calls
    /// whether 1 or 100 images are listed.
    fn snapshot(&self) -> impl Future<Output = Result<Snapshot, RuntimeError>> + Send;

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

    /// Deletes the images kip let go of (`released`: the names `sync_pins` returned) where
    /// nothing else names them ([`plan_removal`]); an image that still carries a name kip does
    /// not own stays, and the answer says which and why. Only names are deleted that kip pinned.
    fn remove_released(&self, released: &[String]) -> impl Future<Output = Result<Removal, RuntimeError>> + Send;

    /// After the last pin is gone (kip is being uninstalled): removes what kip keeps on the
    /// node for its pins besides the pins themselves. Only CRI-O has something (the drop-in).
    fn release(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        std::future::ready(Ok(()))
    }
}

/// What became of the images kip let go of (`--remove-unlisted`, a release with `remove`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// The names deleted.
    pub deleted: Vec<String>,
    /// Images left in place: a name kip let go of, and why the image stays.
    pub kept: Vec<(String, String)>,
}

/// Whether an image kip let go of may be deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemovalVerdict {
    Delete,
    /// It carries names kip does not own: deleting it would take them from their owner. `name`:
    /// one of the names kip let go of, `why`: the others'.
    Keep {
        name: String,
        why: String,
    },
}

/// Pure: for each image (given as every name it carries) that bears a name in `released`,
/// whether kip may delete it. It may only when every other name is kip's too: a name it
/// released, a digest name of a released name's repository (what the runtime adds to a pulled
/// tag), or the image ID. An admin's tag of the same content (`ctr images tag`), a workload's
/// other tag, a still-listed image of another repository with that content: the image stays.
/// Returns the images' indices with their verdicts.
pub fn plan_removal(images: &[Vec<String>], released: &[String]) -> Vec<(usize, RemovalVerdict)> {
    let released: std::collections::BTreeSet<&str> = released.iter().map(String::as_str).collect();
    let repos: std::collections::BTreeSet<&str> = released.iter().map(|n| crate::cri::repository_of(n)).collect();
    let kips = |name: &str| {
        released.contains(name)
            || name.starts_with("sha256:")
            || (name.contains('@') && repos.contains(crate::cri::repository_of(name)))
    };
    images
        .iter()
        .enumerate()
        .filter_map(|(i, names)| {
            let ours = names.iter().find(|n| released.contains(n.as_str()))?;
            let foreign: Vec<&str> = names.iter().map(String::as_str).filter(|n| !kips(n)).collect();
            let verdict = if foreign.is_empty() {
                RemovalVerdict::Delete
            } else {
                let why = format!("the image also carries {} (not kip's)", foreign.join(", "));
                RemovalVerdict::Keep { name: ours.clone(), why }
            };
            Some((i, verdict))
        })
        .collect()
}

/// The runtime's images as one check sees them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    images: Vec<ImageInfo>,
    /// Tag or `repo@digest` → the image listed under that name.
    by_name: HashMap<String, usize>,
    /// Record name → pinned by anyone, for runtimes whose CRI says nothing about pins (read
    /// from containerd's labels); `None` where `ImageInfo::pinned` is the answer.
    record_pins: Option<HashMap<String, bool>>,
}

impl Snapshot {
    pub fn new(images: Vec<ImageInfo>, record_pins: Option<HashMap<String, bool>>) -> Self {
        let mut by_name = HashMap::new();
        for (i, image) in images.iter().enumerate() {
            for name in image.repo_tags.iter().chain(&image.repo_digests) {
                by_name.insert(name.clone(), i);
            }
        }
        Self { images, by_name, record_pins }
    }

    /// The image `reference` names when the listing shows that very name. A reference the
    /// runtime stores under another spelling is not found here: ask `Runtime::status`.
    pub fn find(&self, reference: &str) -> Option<&ImageInfo> {
        self.by_name.get(reference).and_then(|&i| self.images.get(i))
    }

    /// Whether `image` (found for `reference`) is pinned, by kip or anyone.
    pub fn pinned(&self, reference: &str, image: &ImageInfo) -> bool {
        match &self.record_pins {
            Some(pins) if !image.pinned => every_record_pinned(&image.refs_of(reference), pins),
            _ => image.pinned,
        }
    }
}

/// Where pins are labels on records: the image counts as pinned when every record of it the
/// runtime has carries one (kubelet's GC would otherwise remove it through the unpinned one).
pub fn every_record_pinned(records: &[String], pins: &HashMap<String, bool>) -> bool {
    let mut seen = false;
    for record in records {
        match pins.get(record) {
            Some(false) => return false,
            Some(true) => seen = true,
            None => {}
        }
    }
    seen
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
    pub async fn connect(socket: &Path, crio: &CrioPaths, call_timeout: Duration) -> Result<Self, CriError> {
        let cri = CriClient::new(socket).with_call_timeout(call_timeout);
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
    async fn snapshot(&self) -> Result<Snapshot, RuntimeError> {
        each_backend!(self, rt => rt.snapshot().await)
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
    async fn remove_released(&self, released: &[String]) -> Result<Removal, RuntimeError> {
        each_backend!(self, rt => rt.remove_released(released).await)
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
    async fn snapshot(&self) -> Result<Snapshot, RuntimeError> {
        Ok(Snapshot::new(self.cri.list_images().await?, None))
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
    /// Through the CRI: an image is deleted whole (`RemoveImage` of its ID), so only where
    /// [`plan_removal`] finds no name of someone else's on it.
    async fn remove_released(&self, released: &[String]) -> Result<Removal, RuntimeError> {
        let listed = self.cri.list_images().await?;
        let names: Vec<Vec<String>> =
            listed.iter().map(|i| i.repo_tags.iter().chain(&i.repo_digests).cloned().collect()).collect();
        let mut removal = Removal::default();
        for (i, verdict) in plan_removal(&names, released) {
            let (image, names) = (&listed[i], &names[i]);
            match verdict {
                RemovalVerdict::Delete => {
                    self.cri.remove(&image.id).await?;
                    removal.deleted.extend(names.iter().cloned());
                }
                RemovalVerdict::Keep { name, why } => removal.kept.push((name, why)),
            }
        }
        Ok(removal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, tags: &[&str], digests: &[&str], pinned: bool) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: digests.iter().map(|d| d.to_string()).collect(),
            pinned,
        }
    }

    #[test]
    fn only_an_image_no_one_else_names_is_deleted() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let images = vec![
            // kip's alone: its tag, the digest name the pull added and the ID record.
            names(&["h/r/a:1", "h/r/a@sha256:aa", "sha256:1111"]),
            // An admin tagged the same content: stays.
            names(&["h/r/b:1", "h/r/b@sha256:bb", "sha256:2222", "docker.io/admin/keep:1"]),
            // A still-listed image of another repository with that content: stays.
            names(&["h/r/c:1", "h/r/c@sha256:cc", "h/other/d@sha256:cc"]),
            // Not released at all: not looked at.
            names(&["h/r/e:1"]),
        ];
        let released = names(&["h/r/a:1", "h/r/a@sha256:aa", "sha256:1111", "h/r/b:1", "h/r/b@sha256:bb", "h/r/c:1"]);
        let plan = plan_removal(&images, &released);
        assert_eq!(plan.len(), 3, "{plan:?}");
        assert_eq!(plan[0], (0, RemovalVerdict::Delete));
        let keep = |name: &str, why: &str| RemovalVerdict::Keep { name: name.into(), why: why.into() };
        assert_eq!(plan[1], (1, keep("h/r/b:1", "the image also carries docker.io/admin/keep:1 (not kip's)")));
        assert_eq!(plan[2], (2, keep("h/r/c:1", "the image also carries h/other/d@sha256:cc (not kip's)")));
    }

    #[test]
    fn a_snapshot_finds_an_image_by_any_of_its_names_and_nothing_else() {
        let a = image("sha256:1", &["h/r/a:1", "h/r/a:latest"], &["h/r/a@sha256:aa"], false);
        let b = image("sha256:2", &[], &["h/r/b@sha256:bb"], true);
        let snap = Snapshot::new(vec![a.clone(), b.clone()], None);
        assert_eq!(snap.find("h/r/a:1"), Some(&a));
        assert_eq!(snap.find("h/r/a:latest"), Some(&a));
        assert_eq!(snap.find("h/r/a@sha256:aa"), Some(&a));
        assert_eq!(snap.find("h/r/b@sha256:bb"), Some(&b));
        for other in ["h/r/a:2", "h/r/a", "sha256:1", "docker.io/h/r/a:1"] {
            assert_eq!(snap.find(other), None, "{other}");
        }
        assert!(!snap.pinned("h/r/a:1", &a) && snap.pinned("h/r/b@sha256:bb", &b), "the CRI's answer");
    }

    #[test]
    fn where_pins_are_labels_every_record_of_the_image_must_carry_one() {
        let a = image("sha256:1", &["h/r/a:1", "h/x/other:1"], &["h/r/a@sha256:aa"], false);
        let labels = |pairs: &[(&str, bool)]| Some(pairs.iter().map(|(n, p)| (n.to_string(), *p)).collect());
        let all =
            Snapshot::new(vec![a.clone()], labels(&[("h/r/a:1", true), ("h/r/a@sha256:aa", true), ("sha256:1", true)]));
        assert!(all.pinned("h/r/a:1", &a));
        let id_unpinned = Snapshot::new(
            vec![a.clone()],
            labels(&[("h/r/a:1", true), ("h/r/a@sha256:aa", true), ("sha256:1", false)]),
        );
        assert!(!id_unpinned.pinned("h/r/a:1", &a), "kubelet's GC would remove it through the image ID");
        let other_repo = Snapshot::new(vec![a.clone()], labels(&[("h/r/a:1", true), ("h/x/other:1", false)]));
        assert!(other_repo.pinned("h/r/a:1", &a), "another repository's name is not kip's to pin");
        let none = Snapshot::new(vec![a.clone()], labels(&[]));
        assert!(!none.pinned("h/r/a:1", &a), "no record read: not known to be pinned");
    }
}
