//! The CRI v1 ImageService and RuntimeService `Version` over the runtime's unix socket.
//! One lazily connected channel: tonic reconnects by itself after the runtime restarts,
//! so a failed call is reported and the next one simply tries again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kip::cri::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient, AuthConfig, Image,
    ImageSpec, ImageStatusRequest, ListImagesRequest, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// Where the common runtimes put their CRI socket, in the order they are tried. CRI-O's
/// `/var/run/crio` is `/run/crio` on every current distribution; both are tried, so a node's
/// `/run` mounted alone (as the chart does) is enough.
pub const DEFAULT_SOCKETS: [&str; 4] = [
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
];

/// How long any runtime call but a pull may take (`--runtime-timeout`): past it the runtime
/// counts as not answering (a wedged runtime that accepts connections and never replies).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("no CRI socket found; tried {}", .tried.join(", "))]
    NoSocket { tried: Vec<String> },
    #[error("CRI socket {socket} does not answer Version: {reason}")]
    NotAnswering { socket: PathBuf, reason: String },
    #[error("CRI socket {socket} is not a CRI runtime: {reason}")]
    NotCri { socket: PathBuf, reason: String },
    #[error("CRI {op} `{image}` failed: {message}")]
    Call { op: &'static str, image: String, code: tonic::Code, message: String },
    #[error("CRI {op} `{image}` timed out after {}", humantime::format_duration(*.timeout))]
    Timeout { op: &'static str, image: String, timeout: Duration },
}

impl CriError {
    /// True for what passes: a socket that exists but does not answer (yet). False for a node
    /// without a CRI socket, or with something on it that is no CRI runtime.
    pub fn is_transient(&self) -> bool {
        match self {
            CriError::NoSocket { .. } | CriError::NotCri { .. } => false,
            other => other.is_runtime_down(),
        }
    }

    /// True when the runtime itself could not be reached or did not answer in time (as opposed
    /// to a per-image failure; a pull past its own `--pull-timeout` is one).
    pub fn is_runtime_down(&self) -> bool {
        match self {
            CriError::NotAnswering { .. } | CriError::Call { code: tonic::Code::Unavailable, .. } => true,
            CriError::Timeout { op, .. } => *op != "PullImage",
            _ => false,
        }
    }
}

/// Picks the socket: the explicit one, or the first default that exists under `host_prefix`
/// (where the node's filesystem appears in the agent's container; `/` outside one).
pub fn find_socket(explicit: Option<&Path>, host_prefix: &Path) -> Result<PathBuf, CriError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let candidates: Vec<PathBuf> =
        DEFAULT_SOCKETS.iter().map(|s| host_prefix.join(s.trim_start_matches('/'))).collect();
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| CriError::NoSocket { tried: candidates.iter().map(|p| p.display().to_string()).collect() })
}

/// A lazily connected channel to a unix socket (also used for containerd's native API).
pub fn unix_channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    // The URI is required by the API but never used: the connector dials the socket.
    Endpoint::from_static("http://[::]:0").connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let socket = socket.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
    }))
}

/// Runtime identity, from CRI `Version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub name: String,
    pub version: String,
}

/// What the runtime knows of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub pinned: bool,
}

impl ImageInfo {
    /// The records that belong to `reference`: the tags and digests of its own repository and
    /// the image ID. Other repositories' names for the same content are not ours to pin.
    pub fn refs_of(&self, reference: &str) -> Vec<String> {
        let repo = repository_of(reference);
        let mut refs: Vec<String> =
            self.repo_tags.iter().chain(&self.repo_digests).filter(|r| repository_of(r) == repo).cloned().collect();
        refs.push(self.id.clone());
        refs
    }

    /// The digest this image has in `reference`'s repository (what a tag resolves to now).
    pub fn digest_in(&self, reference: &str) -> Option<&str> {
        self.digests_in(reference).next()
    }

    /// Every digest this image has in `reference`'s repository.
    pub fn digests_in<'a>(&'a self, reference: &str) -> impl Iterator<Item = &'a str> + 'a {
        let repo = repository_of(reference).to_string();
        self.repo_digests
            .iter()
            .filter_map(|d| d.split_once('@'))
            .filter(move |(r, _)| *r == repo.as_str())
            .map(|(_, d)| d)
    }
}

impl From<Image> for ImageInfo {
    fn from(i: Image) -> Self {
        Self { id: i.id, repo_tags: i.repo_tags, repo_digests: i.repo_digests, pinned: i.pinned }
    }
}

/// `host:5000/a/b:tag` and `host:5000/a/b@sha256:…` → `host:5000/a/b`.
pub fn repository_of(reference: &str) -> &str {
    let without_digest = reference.split_once('@').map_or(reference, |(r, _)| r);
    match without_digest.rfind(':') {
        // A colon after the last slash is a tag; before it, a registry port.
        Some(i) if !without_digest[i..].contains('/') => &without_digest[..i],
        _ => without_digest,
    }
}

/// `call` within `timeout`, or a [`CriError::Timeout`] naming the call.
pub async fn within<T>(
    timeout: Duration,
    op: &'static str,
    image: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, CriError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(answer) => answer.map_err(|s| call_error(op, image, &s)),
        Err(_) => Err(CriError::Timeout { op, image: image.to_string(), timeout }),
    }
}

#[derive(Clone, Debug)]
pub struct CriClient {
    socket: PathBuf,
    call_timeout: Duration,
    images: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
}

impl CriClient {
    pub fn new(socket: &Path) -> Self {
        let channel = unix_channel(socket);
        Self {
            socket: socket.to_path_buf(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            images: ImageServiceClient::new(channel.clone()),
            runtime: RuntimeServiceClient::new(channel),
        }
    }

    /// The deadline of every call but a pull (the pull has its own).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn version(&self) -> Result<RuntimeInfo, CriError> {
        let not_answering = |reason: String| CriError::NotAnswering { socket: self.socket.clone(), reason };
        let mut client = self.runtime.clone();
        let call = client.version(VersionRequest { version: "v1".into() });
        let resp = tokio::time::timeout(self.call_timeout, call)
            .await
            .map_err(|_| not_answering(format!("no answer within {}", humantime::format_duration(self.call_timeout))))?
            .map_err(|s| match s.code() {
                // It answered, and it is not the CRI (or not its v1): that will not change.
                tonic::Code::Unimplemented => {
                    CriError::NotCri { socket: self.socket.clone(), reason: status_reason(&s) }
                }
                _ => not_answering(status_reason(&s)),
            })?
            .into_inner();
        Ok(RuntimeInfo { name: resp.runtime_name, version: resp.runtime_version })
    }

    /// `None` when the image is absent (CRI answers with an empty image, not an error).
    pub async fn image_status(&self, image: &str) -> Result<Option<ImageInfo>, CriError> {
        let req = ImageStatusRequest { image: Some(image_spec(image)), verbose: false };
        let mut client = self.images.clone();
        let resp = within(self.call_timeout, "ImageStatus", image, client.image_status(req)).await?.into_inner();
        Ok(resp.image.map(ImageInfo::from))
    }

    /// Every image the runtime has (CRI `ListImages`; containerd ignores filters, none is sent).
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>, CriError> {
        let req = ListImagesRequest { filter: None };
        let mut client = self.images.clone();
        let resp = within(self.call_timeout, "ListImages", "*", client.list_images(req)).await?;
        Ok(resp.into_inner().images.into_iter().map(ImageInfo::from).collect())
    }

    /// Pulls `image`, giving up after `timeout` (dropping the call cancels the pull).
    pub async fn pull(&self, image: &str, auth: Option<AuthConfig>, timeout: Duration) -> Result<String, CriError> {
        let req = PullImageRequest { image: Some(image_spec(image)), auth, sandbox_config: Some(sandbox_config()) };
        let mut client = self.images.clone();
        Ok(within(timeout, "PullImage", image, client.pull_image(req)).await?.into_inner().image_ref)
    }

    pub async fn remove(&self, image: &str) -> Result<(), CriError> {
        let req = kip::cri::RemoveImageRequest { image: Some(image_spec(image)) };
        let mut client = self.images.clone();
        within(self.call_timeout, "RemoveImage", image, client.remove_image(req)).await?;
        Ok(())
    }
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.to_string(), ..Default::default() }
}

/// Some runtimes misbehave on a pull without sandbox config; kubelet and OpenKruise always send one.
fn sandbox_config() -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "kip-agent".into(),
            uid: "kip-agent".into(),
            namespace: "kip".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

fn status_reason(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    }
}

fn call_error(op: &'static str, image: &str, s: &tonic::Status) -> CriError {
    CriError::Call { op, image: image.to_string(), code: s.code(), message: status_reason(s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_socket_wins_even_if_absent() {
        let p = find_socket(Some(Path::new("/tmp/does-not-exist.sock")), Path::new("/")).unwrap();
        assert_eq!(p, Path::new("/tmp/does-not-exist.sock"));
    }

    #[test]
    fn the_first_default_socket_under_the_host_prefix_is_found() {
        let host = tempfile::tempdir().unwrap();
        let err = find_socket(None, host.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("{}/run/containerd/containerd.sock", host.path().display())), "{err}");
        std::fs::create_dir_all(host.path().join("run/crio")).unwrap();
        let _crio = std::os::unix::net::UnixListener::bind(host.path().join("run/crio/crio.sock")).unwrap();
        assert_eq!(find_socket(None, host.path()).unwrap(), host.path().join("run/crio/crio.sock"));
        std::fs::create_dir_all(host.path().join("run/k3s/containerd")).unwrap();
        let _k3s =
            std::os::unix::net::UnixListener::bind(host.path().join("run/k3s/containerd/containerd.sock")).unwrap();
        assert_eq!(find_socket(None, host.path()).unwrap(), host.path().join("run/k3s/containerd/containerd.sock"));
    }

    #[test]
    fn refs_of_an_image_are_its_own_repository_and_the_id() {
        let info = ImageInfo {
            id: "sha256:aaa".into(),
            repo_tags: vec!["h:5000/r/x:1".into(), "h:5000/r/other:2".into()],
            repo_digests: vec!["h:5000/r/other@sha256:ccc".into(), "h:5000/r/x@sha256:bbb".into()],
            pinned: false,
        };
        assert_eq!(info.refs_of("h:5000/r/x:1"), vec!["h:5000/r/x:1", "h:5000/r/x@sha256:bbb", "sha256:aaa"]);
        assert_eq!(
            info.refs_of("h:5000/r/other@sha256:ccc"),
            vec!["h:5000/r/other:2", "h:5000/r/other@sha256:ccc", "sha256:aaa"]
        );
        assert_eq!(info.digest_in("h:5000/r/x:1"), Some("sha256:bbb"));
        assert_eq!(info.digest_in("h:5000/r/none:1"), None);
    }

    #[test]
    fn repository_of_strips_tag_and_digest_but_not_the_port() {
        assert_eq!(repository_of("h:5000/a/b:1"), "h:5000/a/b");
        assert_eq!(repository_of("h:5000/a/b@sha256:abc"), "h:5000/a/b");
        assert_eq!(repository_of("h:5000/a/b"), "h:5000/a/b");
        assert_eq!(repository_of("docker.io/library/busybox:latest"), "docker.io/library/busybox");
    }

    /// A wedged runtime: the socket accepts connections and never answers a byte.
    fn wedged_socket(dir: &Path) -> (PathBuf, std::thread::JoinHandle<()>) {
        let socket = dir.join("wedged.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let held = std::thread::spawn(move || {
            let mut open = Vec::new();
            for conn in listener.incoming().take(8) {
                open.push(conn); // kept open, never read from nor written to
            }
            std::thread::sleep(Duration::from_secs(3600));
        });
        (socket, held)
    }

    #[tokio::test]
    async fn every_call_to_a_runtime_that_never_answers_ends_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, _held) = wedged_socket(dir.path());
        let cri = CriClient::new(&socket).with_call_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = cri.list_images().await.unwrap_err();
        assert!(matches!(e, CriError::Timeout { op: "ListImages", .. }) && e.is_runtime_down(), "{e}");
        assert_eq!(e.to_string(), "CRI ListImages `*` timed out after 300ms");
        let e = cri.image_status("r/a:1").await.unwrap_err();
        assert!(e.is_runtime_down() && e.to_string().contains("ImageStatus `r/a:1` timed out"), "{e}");
        let e = cri.remove("r/a:1").await.unwrap_err();
        assert!(e.is_runtime_down() && e.to_string().contains("RemoveImage"), "{e}");
        let e = cri.version().await.unwrap_err();
        assert!(e.is_runtime_down() && e.to_string().contains("no answer within 300ms"), "{e}");
        let e = cri.pull("r/a:1", None, Duration::from_millis(300)).await.unwrap_err();
        assert!(!e.is_runtime_down(), "a pull past its own time limit is that image's failure: {e}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn unreachable_socket_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nothing.sock");
        let err = CriClient::new(&socket).version().await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("CRI socket {} does not answer Version", socket.display())), "{msg}");
        assert!(err.is_runtime_down());
    }
}
