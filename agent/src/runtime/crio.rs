//! CRI-O: images through the CRI; pins through `pinned_images` under `[crio.image]`, which CRI-O
//! reads from its main file and then its drop-ins in lexical order, a later list replacing an
//! earlier one. kip writes one drop-in of its own, named to sort last, holding the admin's
//! effective list plus kip's images, then sends SIGHUP to the process behind the socket (CRI-O
//! reloads `pinned_images` live) and confirms through CRI `ImageStatus.pinned`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kip::cri::AuthConfig;

use super::{parse_version, CriOnly, CrioPaths, Keep, Removal, Runtime, RuntimeError, Snapshot};
use crate::cri::{CriClient, ImageInfo, RuntimeInfo};

/// kip's drop-in: `zz-` sorts after the usual `NN-name` drop-ins (OpenShift's `00-default`).
pub const DROP_IN_NAME: &str = "zz-kip-pinned-images.conf";
/// The name a complete new drop-in has for an instant before it is renamed over kip's (and the
/// temporary file of earlier kip versions): never read as the admin's, removed at start-up.
pub const TEMP_NAME: &str = ".zz-kip-pinned-images.conf.tmp";
/// How long after a reload CRI-O may take to show a pin, checked this often. Outside that window
/// one look is enough: a pin CRI-O does not show then is not coming, and the agent's loop must not
/// wait on it image after image.
const CONFIRM_WINDOW: Duration = Duration::from_secs(5);
const CONFIRM_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum CrioError {
    #[error("reading CRI-O's configuration {}: {reason}", path.display())]
    ReadConfig { path: PathBuf, reason: String },
    #[error("writing kip's drop-in {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("signalling CRI-O to reload (SIGHUP to the process behind {}): {reason}", socket.display())]
    Signal { socket: PathBuf, reason: String },
    #[error("CRI-O {version} has no pinned_images (CRI-O 1.28 and later have)")]
    Unsupported { version: String },
    #[error("CRI-O does not report `{reference}` pinned although {} lists it (reloaded with SIGHUP)", path.display())]
    NotConfirmed { reference: String, path: PathBuf },
}

/// The admin's `pinned_images`: the list of the last file, in CRI-O's order, that sets it
/// (kip's own drop-in left out). `None` when no file sets it.
pub fn admin_pins(config: &Path, config_dir: &Path) -> Result<Option<Vec<String>>, CrioError> {
    let mut effective = None;
    for file in config_files(config, config_dir)? {
        if let Some(list) = pinned_images_in(&file)? {
            effective = Some(list);
        }
    }
    Ok(effective)
}

/// Drop-ins that sort after kip's and set `pinned_images`: they would hide kip's list.
pub fn later_overrides(config_dir: &Path) -> Result<Vec<PathBuf>, CrioError> {
    let ours = config_dir.join(DROP_IN_NAME);
    let mut later = Vec::new();
    for file in walk(config_dir)? {
        if file > ours && pinned_images_in(&file)?.is_some() {
            later.push(file);
        }
    }
    Ok(later)
}

/// The main file (when it exists), then every file under the drop-in directory as CRI-O walks
/// it (recursively, lexical order, dot-files too), without kip's own drop-in and its temporary
/// name.
fn config_files(config: &Path, config_dir: &Path) -> Result<Vec<PathBuf>, CrioError> {
    let (ours, temp) = (config_dir.join(DROP_IN_NAME), config_dir.join(TEMP_NAME));
    let mut files: Vec<PathBuf> = config.is_file().then(|| config.to_path_buf()).into_iter().collect();
    files.extend(walk(config_dir)?.into_iter().filter(|f| *f != ours && *f != temp));
    Ok(files)
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>, CrioError> {
    let read_err = |e: std::io::Error| CrioError::ReadConfig { path: dir.to_path_buf(), reason: e.to_string() };
    let mut entries: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>().map_err(read_err)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(read_err(e)),
    };
    entries.sort();
    let mut files = Vec::new();
    for path in entries {
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

fn pinned_images_in(file: &Path) -> Result<Option<Vec<String>>, CrioError> {
    let err = |reason: String| CrioError::ReadConfig { path: file.to_path_buf(), reason };
    let text = fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.message().to_string()))?;
    let Some(value) = doc.get("crio").and_then(|c| c.get("image")).and_then(|i| i.get("pinned_images")) else {
        return Ok(None);
    };
    let list = value.as_array().ok_or_else(|| err("crio.image.pinned_images is not a list".into()))?;
    list.iter()
        .map(|v| {
            v.as_str().map(str::to_string).ok_or_else(|| err("crio.image.pinned_images holds a non-string".into()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `pinned_images` came with CRI-O 1.28; a version kip cannot read is given the benefit of the
/// doubt (the confirmation through `ImageStatus.pinned` tells the truth either way).
pub fn has_pinned_images(version: &str) -> bool {
    parse_version(version).is_none_or(|v| v >= (1, 28, 0))
}

/// kip's drop-in: the admin's patterns first (never dropped), then kip's images.
pub fn render_drop_in<'a>(admin: &'a [String], kip: impl IntoIterator<Item = &'a String>) -> String {
    let mut out = String::from(
        "# Written by kip-agent (kip.eclipse.dev); rewritten whenever kip's images or the admin's own\n\
         # pinned_images change. CRI-O's last pinned_images replaces earlier ones, so this list repeats\n\
         # the admin's own (from the main file and the other drop-ins) before kip's images.\n\
         [crio.image]\npinned_images = [\n",
    );
    let mut seen = std::collections::HashSet::new();
    for pattern in admin.iter().chain(kip) {
        if seen.insert(pattern.as_str()) {
            out.push_str(&format!("  {},\n", toml::Value::String(pattern.clone())));
        }
    }
    out.push_str("]\n");
    out
}

/// Writes `content` to `dir/name` so that CRI-O, which parses every file under `dir` (dot-files
/// and subdirectories too: one it cannot parse fails the whole reload, and its next start), never
/// sees a partial file: the content goes into an unnamed file (`O_TMPFILE`), synced, linked under
/// [`TEMP_NAME`] only once complete and renamed over the drop-in; then the directory is synced.
/// A crash leaves either nothing or a complete file under the temporary name (removed at start-up).
fn write_atomically(dir: &Path, name: &str, content: &str) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags, CWD};
    let (path, temp) = (dir.join(name), dir.join(TEMP_NAME));
    remove_if_present(&temp)?;
    let flags = OFlags::WRONLY | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(0o644);
    let linked = match rustix::fs::openat(CWD, dir, flags | OFlags::TMPFILE, mode) {
        Ok(fd) => {
            let mut file = fs::File::from(fd);
            file.write_all(content.as_bytes())?;
            file.sync_all()?;
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
            rustix::fs::linkat(CWD, proc_path.as_str(), CWD, &temp, AtFlags::SYMLINK_FOLLOW)
                .map_err(std::io::Error::from)
        }
        // A filesystem without O_TMPFILE: a named temporary file, removed again on failure.
        Err(e) if [rustix::io::Errno::OPNOTSUPP, rustix::io::Errno::ISDIR, rustix::io::Errno::INVAL].contains(&e) => {
            fs::File::create(&temp)
                .and_then(|mut file| file.write_all(content.as_bytes()).and_then(|()| file.sync_all()))
        }
        Err(e) => Err(e.into()),
    };
    let written = linked.and_then(|()| fs::rename(&temp, &path));
    if written.is_err() {
        let _ = fs::remove_file(&temp); // nothing half-written stays among CRI-O's drop-ins
    }
    written?;
    fs::File::open(dir)?.sync_all()
}

fn remove_if_present(path: &Path) -> std::io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The PID of the process serving `socket`, from the peer credentials of a connection to it
/// (in this process's PID namespace; 0 when that process is not visible from it).
pub fn socket_peer_pid(socket: &Path) -> std::io::Result<i32> {
    let stream = UnixStream::connect(socket)?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.pid())
}

/// Whether the process behind the socket may be sent SIGHUP: it must be CRI-O itself. The peer
/// of a socket is whoever called `listen()`: PID 1 under systemd socket activation, or a CRI
/// proxy in front of CRI-O, neither of which should ever get kip's signal.
pub fn check_signal_target(pid: i32, comm: Option<&str>) -> Result<(), String> {
    check_pid(pid)?;
    match comm {
        Some("crio") => Ok(()),
        Some(other) => Err(format!(
            "the process behind the socket is `{other}` (PID {pid}), not CRI-O (a CRI proxy?): not signalled"
        )),
        None => Err(format!("cannot read /proc/{pid}/comm to check that PID {pid} is CRI-O: not signalled")),
    }
}

fn check_pid(pid: i32) -> Result<(), String> {
    if pid <= 0 {
        return Err("CRI-O's process is not visible from the agent's PID namespace (the agent needs hostPID)".into());
    }
    if pid == 1 {
        return Err(
            "the socket's listener is PID 1 (systemd socket activation or an init), not CRI-O: not signalled".into()
        );
    }
    Ok(())
}

fn comm_of(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_string())
}

/// SIGHUP to CRI-O through a pidfd opened before the check, so the process checked is the one
/// signalled even if its PID is reused meanwhile.
fn reload(socket: &Path) -> Result<i32, CrioError> {
    let err = |reason: String| CrioError::Signal { socket: socket.to_path_buf(), reason };
    let pid = socket_peer_pid(socket).map_err(|e| err(e.to_string()))?;
    check_pid(pid).map_err(err)?;
    let raw = rustix::process::Pid::from_raw(pid).ok_or_else(|| err(format!("invalid PID {pid}")))?;
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .map_err(|e| err(format!("pidfd_open({pid}): {e}")))?;
    check_signal_target(pid, comm_of(pid).as_deref()).map_err(err)?;
    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::HUP)
        .map_err(|e| err(format!("pidfd_send_signal({pid}, SIGHUP): {e}")))?;
    Ok(pid)
}

/// kip's side of the drop-in, kept under one lock: the set of references kip wants pinned is the
/// only source of the file (never what was last written), and rendering, writing and signalling
/// happen under the same lock, so parallel pins cannot lose one another.
#[derive(Debug, Default)]
struct PinState {
    /// kip's references: what the drop-in pins besides the admin's list.
    desired: BTreeSet<String>,
    /// When CRI-O was last told to reload.
    reloaded_at: Option<tokio::time::Instant>,
    /// Why the drop-in could not be written or CRI-O not signalled (cleared by a success).
    problem: Option<String>,
    /// Listed images CRI-O does not show pinned although the drop-in lists them, and why.
    unconfirmed: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct Crio {
    /// Images, status and pulls: plain CRI.
    base: CriOnly,
    paths: CrioPaths,
    state: Arc<Mutex<PinState>>,
}

impl Crio {
    /// Also picks up what an earlier agent on this node left: its drop-in's images (so the first
    /// pin after a restart does not drop the others) and a temporary file (removed).
    pub fn new(cri: CriClient, info: RuntimeInfo, paths: CrioPaths) -> Self {
        let mut state = PinState::default();
        if !has_pinned_images(&info.version) {
            state.problem = Some(CrioError::Unsupported { version: info.version.clone() }.to_string());
        }
        if let Err(e) = remove_if_present(&paths.config_dir.join(TEMP_NAME)) {
            tracing::warn!(file = %paths.config_dir.join(TEMP_NAME).display(), error = %e, "cannot remove a temporary file left by an earlier kip");
        }
        state.desired = earlier_images(&paths);
        Self { base: CriOnly::new(cri, info), paths, state: Arc::new(Mutex::new(state)) }
    }

    pub fn drop_in_path(&self) -> PathBuf {
        self.paths.config_dir.join(DROP_IN_NAME)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PinState> {
        // A panic while holding it cannot leave the record half-updated: recover the value.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes kip's references with `change`, then (same lock) makes the drop-in match them and
    /// the admin's current list. Records the outcome as the pin problem.
    fn update<T>(&self, change: impl FnOnce(&mut BTreeSet<String>) -> T) -> Result<T, CrioError> {
        let mut state = self.lock();
        let out = change(&mut state.desired);
        match self.write_if_changed(&state.desired) {
            Ok(rewritten) => {
                if rewritten {
                    state.reloaded_at = Some(tokio::time::Instant::now());
                }
                state.problem = None;
                Ok(out)
            }
            Err(e) => {
                state.problem = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Renders the drop-in from the admin's effective list (read now) and `kip`, and writes it
    /// plus a SIGHUP only when the file on disk differs. True when it was rewritten.
    fn write_if_changed(&self, kip: &BTreeSet<String>) -> Result<bool, CrioError> {
        if !has_pinned_images(&self.base.info().version) {
            return Err(CrioError::Unsupported { version: self.base.info().version.clone() });
        }
        let path = self.drop_in_path();
        let admin = admin_pins(&self.paths.config, &self.paths.config_dir)?.unwrap_or_default();
        // Unreadable (not a file?) counts as different: the write then says what is wrong.
        let on_disk = fs::read_to_string(&path).map_err(|e| e.kind());
        if kip.is_empty() && on_disk == Err(std::io::ErrorKind::NotFound) {
            return Ok(false); // nothing of kip's to pin, and no file to correct
        }
        let rendered = render_drop_in(&admin, kip);
        if on_disk.as_deref() == Ok(rendered.as_str()) {
            return Ok(false);
        }
        let write_err = |e: std::io::Error| CrioError::Write { path: path.clone(), reason: e.to_string() };
        fs::create_dir_all(&self.paths.config_dir).map_err(write_err)?;
        write_atomically(&self.paths.config_dir, DROP_IN_NAME, &rendered).map_err(write_err)?;
        let pid = reload(self.base.socket())?;
        tracing::info!(file = %path.display(), images = kip.len(), admin_patterns = admin.len(), crio_pid = pid, "wrote kip's pinned_images drop-in; CRI-O reloads it");
        for later in later_overrides(&self.paths.config_dir)? {
            tracing::warn!(file = %later.display(), "this drop-in sorts after kip's and sets pinned_images: CRI-O uses its list instead of kip's");
        }
        Ok(true)
    }

    /// At every check: the admin may have edited their own list (or removed kip's file) since.
    fn refresh(&self) {
        let before = self.lock().problem.clone();
        if let Err(e) = self.update(|_| ()) {
            if before.as_deref() != Some(e.to_string().as_str()) {
                tracing::warn!(error = %e, "keeping kip's CRI-O drop-in current failed; will retry at the next check");
            }
        }
    }
}

/// kip's images in the drop-in an earlier agent wrote: its list without the admin's patterns.
fn earlier_images(paths: &CrioPaths) -> BTreeSet<String> {
    let ours = paths.config_dir.join(DROP_IN_NAME);
    let Ok(Some(written)) = pinned_images_in(&ours) else { return BTreeSet::new() };
    let admin: BTreeSet<String> =
        admin_pins(&paths.config, &paths.config_dir).ok().flatten().unwrap_or_default().into_iter().collect();
    written.into_iter().filter(|r| !admin.contains(r)).collect()
}

impl Runtime for Crio {
    fn info(&self) -> &RuntimeInfo {
        self.base.info()
    }
    fn socket(&self) -> &Path {
        self.base.socket()
    }
    fn pin_problem(&self) -> Option<String> {
        let state = self.lock();
        state.problem.clone().or_else(|| state.unconfirmed.values().next().cloned())
    }

    async fn snapshot(&self) -> Result<Snapshot, RuntimeError> {
        self.refresh();
        self.base.snapshot().await
    }
    async fn status(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        self.base.status(reference).await
    }

    async fn pull(
        &self,
        reference: &str,
        known: Option<&ImageInfo>,
        auth: Option<AuthConfig>,
        timeout: Duration,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        self.base.pull(reference, known, auth, timeout).await
    }

    async fn is_pinned(&self, _reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        Ok(image.pinned)
    }

    async fn pin(&self, reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        // Recorded even when CRI-O already pins it (the admin's pattern, an earlier agent's file):
        // the next write must keep it.
        self.update(|kip| kip.insert(reference.to_string()))?;
        if image.pinned {
            return Ok(true);
        }
        let deadline = self.lock().reloaded_at.map(|t| kip::duration::after(t, CONFIRM_WINDOW));
        loop {
            if self.base.status(reference).await?.is_some_and(|i| i.pinned) {
                self.lock().unconfirmed.remove(reference);
                return Ok(true);
            }
            if deadline.is_none_or(|d| tokio::time::Instant::now() >= d) {
                break;
            }
            tokio::time::sleep(CONFIRM_EVERY).await;
        }
        let e = CrioError::NotConfirmed { reference: reference.to_string(), path: self.drop_in_path() };
        self.lock().unconfirmed.insert(reference.to_string(), e.to_string());
        Err(e.into())
    }

    async fn sync_pins(&self, keep: &Keep) -> Result<Vec<String>, RuntimeError> {
        // Every listed reference, present or not: CRI-O pins an image the moment it arrives.
        let wanted: BTreeSet<String> = keep.references.iter().cloned().collect();
        self.lock().unconfirmed.retain(|r, _| wanted.contains(r));
        let released = self.update(|kip| {
            let released: Vec<String> = kip.difference(&wanted).cloned().collect();
            *kip = wanted;
            released
        })?;
        Ok(released)
    }

    async fn remove_released(&self, released: &[String]) -> Result<Removal, RuntimeError> {
        self.base.remove_released(released).await
    }

    /// Deletes kip's drop-in and makes CRI-O reload without it: the admin's own list (or
    /// CRI-O's default) is in force again and nothing of kip's stays in /etc/crio.
    async fn release(&self) -> Result<(), RuntimeError> {
        let path = self.drop_in_path();
        let mut state = self.lock();
        let io_err =
            |path: &Path, e: std::io::Error| CrioError::Write { path: path.to_path_buf(), reason: e.to_string() };
        let temp = self.paths.config_dir.join(TEMP_NAME);
        remove_if_present(&temp).map_err(|e| io_err(&temp, e))?;
        let removed = remove_if_present(&path).map_err(|e| io_err(&path, e))?;
        state.desired.clear();
        state.unconfirmed.clear();
        if !removed {
            return Ok(());
        }
        let pid = reload(self.base.socket())?;
        tracing::info!(file = %path.display(), crio_pid = pid, "removed kip's pinned_images drop-in; CRI-O reloads without it");
        state.reloaded_at = Some(tokio::time::Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn the_admin_list_is_the_last_one_set_in_crio_s_order() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("crio.conf");
        let drop_ins = dir.path().join("crio.conf.d");
        assert_eq!(admin_pins(&main, &drop_ins).unwrap(), None, "nothing there at all");
        write(&main, "[crio.image]\npinned_images = [\"main/*\"]\n");
        assert_eq!(admin_pins(&main, &drop_ins).unwrap(), Some(vec!["main/*".to_string()]));
        write(&drop_ins.join("00-default"), "[crio.runtime]\nlog_level = \"info\"\n");
        write(&drop_ins.join("10-pins.conf"), "[crio.image]\npinned_images = [\"quay.io/a*\", \"*keyword*\"]\n");
        write(&drop_ins.join("20-other.conf"), "[crio.image]\npause_image = \"x\"\n");
        // kip's own file never counts as the admin's.
        write(&drop_ins.join(DROP_IN_NAME), "[crio.image]\npinned_images = [\"kip/image:1\"]\n");
        assert_eq!(
            admin_pins(&main, &drop_ins).unwrap(),
            Some(vec!["quay.io/a*".to_string(), "*keyword*".to_string()])
        );
        // Subdirectories are walked too, in order ("30-dir/x" after "20-other.conf").
        write(&drop_ins.join("30-dir/x.conf"), "[crio.image]\npinned_images = []\n");
        assert_eq!(admin_pins(&main, &drop_ins).unwrap(), Some(vec![]));
    }

    #[test]
    fn a_broken_config_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let drop_ins = dir.path().join("d");
        write(&drop_ins.join("10-bad.conf"), "[crio.image\n");
        let e = admin_pins(&dir.path().join("none"), &drop_ins).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("reading CRI-O's configuration {}", drop_ins.join("10-bad.conf").display())),
            "{e}"
        );
        write(&drop_ins.join("10-bad.conf"), "[crio.image]\npinned_images = \"not-a-list\"\n");
        assert!(admin_pins(&dir.path().join("none"), &drop_ins).unwrap_err().to_string().contains("is not a list"));
    }

    #[test]
    fn pinned_images_exists_from_crio_1_28() {
        for v in ["1.28.0", "1.36.3", "v1.30.1", "2.0.0", "unknown"] {
            assert!(has_pinned_images(v), "{v}");
        }
        for v in ["1.27.4", "1.24.0"] {
            assert!(!has_pinned_images(v), "{v}");
        }
    }

    #[test]
    fn kip_s_drop_in_sorts_after_the_usual_names() {
        let ours = PathBuf::from("/d").join(DROP_IN_NAME);
        for other in ["00-default", "99-custom.conf", "crio.conf", "zz-admin.conf", "10-x/y.conf"] {
            assert!(PathBuf::from("/d").join(other) < ours, "{other}");
        }
    }

    #[test]
    fn later_drop_ins_that_set_the_list_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("zzz-late.conf"), "[crio.image]\npinned_images = [\"x\"]\n");
        write(&dir.path().join("zzzz-harmless.conf"), "[crio.runtime]\n");
        assert_eq!(later_overrides(dir.path()).unwrap(), vec![dir.path().join("zzz-late.conf")]);
    }

    #[test]
    fn the_drop_in_keeps_the_admin_s_patterns_and_adds_kip_s_images_once() {
        let text = render_drop_in(
            &["quay.io/admin*".into(), "*key\"word*".into()],
            &["docker.io/library/busybox:1.36".into(), "quay.io/admin*".into()],
        );
        let doc: toml::Table = text.parse().unwrap();
        let list: Vec<&str> =
            doc["crio"]["image"]["pinned_images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(list, vec!["quay.io/admin*", "*key\"word*", "docker.io/library/busybox:1.36"]);
    }

    #[test]
    fn the_drop_in_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), DROP_IN_NAME, "one").unwrap();
        write_atomically(dir.path(), DROP_IN_NAME, "two").unwrap();
        assert_eq!(fs::read_to_string(dir.path().join(DROP_IN_NAME)).unwrap(), "two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(DROP_IN_NAME)], "no temporary file left behind");
    }

    #[test]
    fn only_crio_itself_is_ever_signalled() {
        assert_eq!(check_signal_target(4242, Some("crio")), Ok(()));
        let pid1 = check_signal_target(1, Some("crio")).unwrap_err();
        assert!(pid1.contains("PID 1 (systemd socket activation"), "{pid1}");
        assert!(check_signal_target(0, Some("crio")).unwrap_err().contains("needs hostPID"));
        let proxy = check_signal_target(4242, Some("cri-proxy")).unwrap_err();
        assert_eq!(
            proxy,
            "the process behind the socket is `cri-proxy` (PID 4242), not CRI-O (a CRI proxy?): not signalled"
        );
        assert!(check_signal_target(4242, Some("crio-wrapper")).is_err(), "the exact name only");
        assert!(check_signal_target(4242, None).unwrap_err().contains("cannot read /proc/4242/comm"));
    }

    /// The socket's listener here is this test process, not CRI-O: kip must refuse to signal it
    /// (before, it sent SIGHUP to whoever listened, which would have ended this test process).
    #[test]
    fn a_socket_served_by_another_program_gets_no_signal() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("proxy.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let e = reload(&socket).unwrap_err().to_string();
        let me = comm_of(std::process::id() as i32).unwrap();
        assert!(e.contains(&format!("the process behind the socket is `{me}`")), "{e}");
        assert!(
            e.starts_with(&format!("signalling CRI-O to reload (SIGHUP to the process behind {})", socket.display()))
        );
    }

    #[test]
    fn the_peer_of_a_socket_is_the_process_serving_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(socket_peer_pid(&socket).unwrap(), std::process::id() as i32);
    }
}
