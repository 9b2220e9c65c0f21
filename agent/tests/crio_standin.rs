//! kip's CRI-O backend against a stand-in CRI-O: a separate process (this test binary run again
//! with `--ignored --exact standin_main`) serving the CRI image service on a unix socket and
//! doing what CRI-O does with `pinned_images` (see ../shared/RUNTIME-NOTES.md): read the main
//! file and then every drop-in in lexical order, the last list wins, reload on SIGHUP, report
//! `pinned` for names that match exactly, by trailing-`*` glob or by `*keyword*`. Its parsing is
//! its own, not kip's, so the two can disagree and fail the test.

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kip::cri::image_service_server::{ImageService, ImageServiceServer};
use kip::cri::{
    Image, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse, ListImagesRequest,
    ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest, RemoveImageResponse,
};
use kip_agent::cri::{CriClient, RuntimeInfo};
use kip_agent::runtime::crio::{Crio, DROP_IN_NAME};
use kip_agent::runtime::{CrioPaths, Keep, Runtime};
use tonic::{Request, Response, Status};

const A: &str = "docker.io/library/busybox:1.36";
const B: &str = "quay.io/team/app@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const ADMINS: &str = "quay.io/admin-keep-me:1";
const PAUSE: &str = "registry.k8s.io/pause:3.10";
const UNMATCHED: &str = "quay.io/team/renamed:1";

// ---- the stand-in ----

struct StandIn {
    images: Mutex<BTreeSet<String>>,
    pins: Mutex<Vec<String>>,
}

impl StandIn {
    fn pinned(&self, name: &str) -> bool {
        // UNMATCHED stands for a name CRI-O stores differently from kip's reference.
        name == PAUSE || (name != UNMATCHED && self.pins.lock().unwrap().iter().any(|p| matches(p, name)))
    }
}

fn matches(pattern: &str, name: &str) -> bool {
    let (name, pattern) = (name.to_lowercase(), pattern.to_lowercase());
    if pattern.len() > 1 && pattern.starts_with('*') && pattern.ends_with('*') {
        name.contains(&pattern[1..pattern.len() - 1])
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        name.starts_with(prefix)
    } else {
        name == pattern
    }
}

/// CRI-O's order: the main file, then the drop-in directory walked in lexical order.
fn read_pins(config: &Path, dir: &Path) -> Vec<String> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut paths: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            if p.is_dir() {
                files(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut all = vec![config.to_path_buf()];
    files(dir, &mut all);
    let mut pins = Vec::new();
    for file in all.iter().filter(|f| f.is_file()) {
        let doc: toml::Table = std::fs::read_to_string(file).unwrap().parse().unwrap();
        if let Some(list) = doc.get("crio").and_then(|c| c.get("image")).and_then(|i| i.get("pinned_images")) {
            pins = list.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        }
    }
    pins
}

/// The gRPC face of the shared stand-in state.
struct Service(Arc<StandIn>);

impl std::ops::Deref for Service {
    type Target = StandIn;
    fn deref(&self) -> &StandIn {
        &self.0
    }
}

#[tonic::async_trait]
impl ImageService for Service {
    async fn list_images(&self, _: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        let names: Vec<String> = self.images.lock().unwrap().iter().cloned().collect();
        let images = names.iter().map(|n| image(n, self.pinned(n))).collect();
        Ok(Response::new(ListImagesResponse { images }))
    }
    async fn image_status(&self, req: Request<ImageStatusRequest>) -> Result<Response<ImageStatusResponse>, Status> {
        let name = req.into_inner().image.unwrap_or_default().image;
        let present = self.images.lock().unwrap().contains(&name);
        let image = present.then(|| image(&name, self.pinned(&name)));
        Ok(Response::new(ImageStatusResponse { image, info: Default::default() }))
    }
    async fn pull_image(&self, req: Request<PullImageRequest>) -> Result<Response<PullImageResponse>, Status> {
        let name = req.into_inner().image.unwrap_or_default().image;
        self.images.lock().unwrap().insert(name.clone());
        Ok(Response::new(PullImageResponse { image_ref: name }))
    }
    async fn remove_image(&self, req: Request<RemoveImageRequest>) -> Result<Response<RemoveImageResponse>, Status> {
        self.images.lock().unwrap().remove(&req.into_inner().image.unwrap_or_default().image);
        Ok(Response::new(RemoveImageResponse {}))
    }
    async fn image_fs_info(&self, _: Request<ImageFsInfoRequest>) -> Result<Response<ImageFsInfoResponse>, Status> {
        Err(Status::unimplemented("not in the stand-in"))
    }
}

fn image(name: &str, pinned: bool) -> Image {
    let (tags, digests) =
        if name.contains('@') { (vec![], vec![name.to_string()]) } else { (vec![name.to_string()], vec![]) };
    Image { id: format!("{:x}", name.len()), repo_tags: tags, repo_digests: digests, pinned, ..Default::default() }
}

/// The stand-in's process: runs only when started by `Node::start` (hence ignored).
#[tokio::test]
#[ignore = "the CRI-O stand-in process, started by the other tests"]
async fn standin_main() {
    let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap());
    let (socket, config, dir, reloads) =
        (var("STANDIN_SOCKET"), var("STANDIN_CONFIG"), var("STANDIN_DIR"), var("STANDIN_RELOADS"));
    let images =
        std::env::var("STANDIN_IMAGES").unwrap().split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
    let state = Arc::new(StandIn { images: Mutex::new(images), pins: Mutex::new(read_pins(&config, &dir)) });
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    {
        let state = state.clone();
        tokio::spawn(async move {
            let mut count = 0;
            while hup.recv().await.is_some() {
                *state.pins.lock().unwrap() = read_pins(&config, &dir);
                count += 1;
                std::fs::write(&reloads, count.to_string()).unwrap();
            }
        });
    }
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tonic::transport::Server::builder()
        .add_service(ImageServiceServer::new(Service(state)))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .unwrap();
}

// ---- the tests ----

struct Node {
    dir: tempfile::TempDir,
    child: Child,
    crio: Crio,
}

impl Node {
    fn start(images: &[&str], admin_main: &str, admin_drop_in: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        std::fs::create_dir_all(p("crio.conf.d")).unwrap();
        std::fs::write(p("crio.conf"), admin_main).unwrap();
        std::fs::write(p("crio.conf.d/00-default"), "[crio.runtime]\nlog_level = \"info\"\n").unwrap();
        if let Some(text) = admin_drop_in {
            std::fs::write(p("crio.conf.d/10-admin.conf"), text).unwrap();
        }
        // Started through a link named `crio`: kip signals only a process whose name is CRI-O's.
        std::os::unix::fs::symlink(std::env::current_exe().unwrap(), p("crio")).unwrap();
        let child = Command::new(p("crio"))
            .args(["--ignored", "--exact", "standin_main", "--nocapture", "--test-threads=1"])
            .env("STANDIN_SOCKET", p("crio.sock"))
            .env("STANDIN_CONFIG", p("crio.conf"))
            .env("STANDIN_DIR", p("crio.conf.d"))
            .env("STANDIN_RELOADS", p("reloads"))
            .env("STANDIN_IMAGES", images.join(","))
            .spawn()
            .unwrap();
        // Ready when it accepts a connection (the file appears at bind, before listen).
        for _ in 0..1000 {
            if std::os::unix::net::UnixStream::connect(p("crio.sock")).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let paths = CrioPaths { config: p("crio.conf"), config_dir: p("crio.conf.d") };
        let info = RuntimeInfo { name: "cri-o".into(), version: "1.36.3".into() };
        let crio = Crio::new(CriClient::new(&p("crio.sock")), info, paths);
        Self { dir, child, crio }
    }

    fn reloads(&self) -> u32 {
        std::fs::read_to_string(self.dir.path().join("reloads")).map_or(0, |s| s.parse().unwrap())
    }

    fn drop_in_list(&self) -> Vec<String> {
        let doc: toml::Table = std::fs::read_to_string(self.crio.drop_in_path()).unwrap().parse().unwrap();
        let list = doc["crio"]["image"]["pinned_images"].as_array().unwrap();
        list.iter().map(|v| v.as_str().unwrap().to_string()).collect()
    }

    async fn pinned(&self, name: &str) -> bool {
        self.crio.status(name).await.unwrap().unwrap().pinned
    }

    async fn wait_reloads(&self, n: u32) {
        for _ in 0..1000 {
            if self.reloads() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the stand-in saw {} reloads, not {n}", self.reloads());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keep(references: &[&str]) -> Keep {
    Keep { references: references.iter().map(|r| r.to_string()).collect(), records: Default::default() }
}

fn standalone(dir: &Path, socket: &Path, config_dir: PathBuf) -> Crio {
    Crio::new(
        CriClient::new(socket),
        RuntimeInfo { name: "cri-o".into(), version: "1.36.3".into() },
        CrioPaths { config: dir.join("crio.conf"), config_dir },
    )
}

#[tokio::test]
async fn pins_by_tag_and_by_digest_through_kip_s_drop_in_and_a_sighup_to_the_socket_s_peer() {
    let node = Node::start(
        &[A, B, ADMINS, PAUSE],
        "[crio.image]\npinned_images = [\"overridden/by-the-drop-in\"]\n",
        Some("[crio.image]\npinned_images = [\"quay.io/admin-keep*\"]\n"),
    );
    assert!(node.pinned(ADMINS).await && !node.pinned(A).await, "the admin's list before kip");

    let released = node.crio.sync_pins(&keep(&[A, B])).await.unwrap();
    assert!(released.is_empty());
    node.wait_reloads(1).await;
    assert_eq!(node.drop_in_list(), vec!["quay.io/admin-keep*", A, B], "the admin's effective list, then kip's");
    for name in [A, B] {
        let status = node.crio.status(name).await.unwrap().unwrap();
        assert!(node.crio.pin(name, &status).await.unwrap(), "{name} confirmed pinned");
        assert!(node.pinned(name).await, "{name}");
    }
    assert!(node.pinned(ADMINS).await, "the admin's pattern still pins");
    assert_eq!(node.crio.pin_problem(), None);

    // Nothing changed: no rewrite, no signal.
    node.crio.sync_pins(&keep(&[A, B])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node.reloads(), 1);

    // B leaves the list: rewritten without it, signalled again, the admin's pattern kept.
    assert_eq!(node.crio.sync_pins(&keep(&[A])).await.unwrap(), vec![B.to_string()]);
    node.wait_reloads(2).await;
    assert_eq!(node.drop_in_list(), vec!["quay.io/admin-keep*", A]);
    assert!(!node.pinned(B).await && node.pinned(A).await && node.pinned(ADMINS).await);
    assert!(node.pinned(PAUSE).await, "CRI-O's pause image is its own business");
}

#[tokio::test]
async fn an_image_pinned_on_arrival_is_confirmed_without_another_write() {
    let node = Node::start(&[], "", None);
    node.crio.sync_pins(&keep(&[A])).await.unwrap();
    node.wait_reloads(1).await;
    assert_eq!(node.drop_in_list(), vec![A], "no admin list: kip's images only");
    let pulled = node.crio.pull(A, None, None, Duration::from_secs(10)).await.unwrap().unwrap();
    assert!(pulled.pinned, "pinned the moment it arrived");
    assert!(node.crio.pin(A, &pulled).await.unwrap());
    assert_eq!(node.reloads(), 1);
}

#[tokio::test]
async fn a_config_dir_kip_cannot_write_is_reported_and_images_stay_cached() {
    let node = Node::start(&[A], "", None);
    // Something kip cannot replace where its drop-in goes (as root, permissions would not stop it).
    let blocked = node.dir.path().join("crio.conf.d").join(DROP_IN_NAME);
    std::fs::create_dir(&blocked).unwrap();
    let crio = standalone(node.dir.path(), &node.dir.path().join("crio.sock"), node.dir.path().join("crio.conf.d"));
    let e = crio.sync_pins(&keep(&[A])).await.unwrap_err().to_string();
    let expected = format!("writing kip's drop-in {}", blocked.display());
    assert!(e.starts_with(&expected), "{e}");
    assert_eq!(crio.pin_problem(), Some(e));
    let status = crio.status(A).await.unwrap().unwrap();
    assert!(crio.pin(A, &status).await.is_err());
    assert!(crio.status(A).await.unwrap().is_some(), "still cached");
    assert_eq!(node.reloads(), 0);
    let left: Vec<_> =
        std::fs::read_dir(node.dir.path().join("crio.conf.d")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "00-default and the blocker, no temporary file: {left:?}");
}

#[tokio::test]
async fn a_failed_signal_is_reported_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gone.sock");
    let crio = standalone(dir.path(), &socket, dir.path().join("crio.conf.d"));
    let e = crio.sync_pins(&keep(&[A])).await.unwrap_err().to_string();
    let expected = format!("signalling CRI-O to reload (SIGHUP to the process behind {})", socket.display());
    assert!(e.starts_with(&expected), "{e}");
    assert_eq!(crio.pin_problem(), Some(e));
    assert!(dir.path().join("crio.conf.d").join(DROP_IN_NAME).exists(), "written; the next change signals again");
}

#[tokio::test]
async fn a_crio_older_than_pinned_images_is_reported_and_its_config_left_alone() {
    let node = Node::start(&[A], "", None);
    let crio = Crio::new(
        CriClient::new(&node.dir.path().join("crio.sock")),
        RuntimeInfo { name: "cri-o".into(), version: "1.27.4".into() },
        CrioPaths { config: node.dir.path().join("crio.conf"), config_dir: node.dir.path().join("crio.conf.d") },
    );
    let expected = "CRI-O 1.27.4 has no pinned_images (CRI-O 1.28 and later have)";
    assert_eq!(crio.pin_problem().as_deref(), Some(expected), "known from the start");
    assert_eq!(crio.sync_pins(&keep(&[A])).await.unwrap_err().to_string(), expected);
    assert!(!crio.drop_in_path().exists(), "nothing written");
    assert_eq!(node.reloads(), 0, "nothing signalled");
}

#[tokio::test]
async fn a_pin_crio_never_shows_is_reported_per_image_and_cleared_when_it_goes() {
    let node = Node::start(&[A, UNMATCHED], "", None);
    node.crio.sync_pins(&keep(&[A, UNMATCHED])).await.unwrap();
    node.wait_reloads(1).await;
    let status = node.crio.status(UNMATCHED).await.unwrap().unwrap();
    let e = node.crio.pin(UNMATCHED, &status).await.unwrap_err().to_string();
    assert!(e.starts_with(&format!("CRI-O does not report `{UNMATCHED}` pinned although")), "{e}");
    let a = node.crio.status(A).await.unwrap().unwrap();
    assert!(node.crio.pin(A, &a).await.unwrap(), "another image's confirmed pin");
    assert_eq!(node.crio.pin_problem(), Some(e), "does not hide the one still missing");
    node.crio.sync_pins(&keep(&[A])).await.unwrap();
    assert_eq!(node.crio.pin_problem(), None, "gone with the image that left the list");
}

/// The uninstall's release on CRI-O: the agent's release path (every pin of kip's, then the
/// runtime's leftovers) deletes kip's drop-in and makes CRI-O reload without it; the admin's
/// own list is in force again and nothing of kip's stays in the config dir.
#[tokio::test]
async fn a_release_deletes_kip_s_drop_in_and_crio_reloads_the_admin_s_list() {
    let node = Node::start(&[A, ADMINS], "", Some("[crio.image]\npinned_images = [\"quay.io/admin-keep*\"]\n"));
    node.crio.sync_pins(&keep(&[A])).await.unwrap();
    node.wait_reloads(1).await;
    let status = node.crio.status(A).await.unwrap().unwrap();
    assert!(node.crio.pin(A, &status).await.unwrap());
    let state_file = node.dir.path().join("image-list.json");
    std::fs::write(&state_file, "{}").unwrap();

    let released = kip_agent::agent::release_node(&node.crio, false, Some(&state_file)).await.unwrap();
    assert_eq!(released, 1, "kip's one reference");
    assert!(!node.crio.drop_in_path().exists(), "kip's drop-in is gone");
    assert!(!state_file.exists(), "the state file is gone");
    // Two SIGHUPs close together may reach CRI-O as one: wait for the outcome, not a count.
    for _ in 0..1000 {
        if !node.pinned(A).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!node.pinned(A).await, "CRI-O reloaded without kip's list");
    assert!(node.pinned(ADMINS).await, "the admin's list is in force again");
    // A second release (an agent restarted during the uninstall) finds nothing and signals nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reloads = node.reloads();
    assert_eq!(kip_agent::agent::release_node(&node.crio, false, Some(&state_file)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!node.crio.drop_in_path().exists());
    assert_eq!(node.reloads(), reloads, "no signal for nothing");
}
