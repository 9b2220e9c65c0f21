//! kip's CRI-O backend against the real CRI-O of `../shared/rig/crio` (CRI-O 1.36 and crictl
//! built from upstream; see its README): a registry and a CRI-O per test, everything under the
//! test's own directory. Judged with crictl (`crictl images -o json`, `"pinned"`) and CRI-O's own
//! log. Where the rig (or root, runc, conmon) is missing each test says so and passes as skipped,
//! unless `KIP_REQUIRE_CRIO_RIG=1` (set by `tests/run.sh` when the rig exists) makes it fail.

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kip_agent::cri::{CriClient, RuntimeInfo};
use kip_agent::runtime::crio::{Crio, DROP_IN_NAME, TEMP_NAME};
use kip_agent::runtime::{CrioPaths, Keep, Runtime};

struct Rig {
    scripts: PathBuf,
    dir: tempfile::TempDir,
    registry: String,
}

/// The rig's directory, or why the tests cannot use it here.
fn rig_dir() -> Result<PathBuf, String> {
    let dir = std::env::var_os("KIP_CRIO_RIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/rig/crio"));
    if !dir.join("bin/crio").exists() {
        return Err(format!("no CRI-O rig at {}", dir.display()));
    }
    if !rustix::process::geteuid().is_root() {
        return Err("CRI-O needs root".into());
    }
    for tool in ["runc", "conmon", "umoci", "skopeo", "docker-registry"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
        if !found.status.success() {
            return Err(format!("`{tool}` is not installed (tests/install-deps.sh installs it)"));
        }
    }
    Ok(dir)
}

fn run(script: &Path, args: &[&str]) -> String {
    let out = Command::new(script).args(args).output().unwrap();
    assert!(out.status.success(), "{} {args:?}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Rig {
    /// A registry and a CRI-O of their own, or `None` (said on stderr) where the rig cannot run.
    fn start(test: &str) -> Option<Self> {
        let scripts = match rig_dir() {
            Ok(dir) => dir,
            Err(why) if std::env::var("KIP_REQUIRE_CRIO_RIG").as_deref() == Ok("1") => {
                panic!("KIP_REQUIRE_CRIO_RIG=1 but the real CRI-O cannot run: {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED {test} (real CRI-O): {why}");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let registry = run(&scripts.join("start-registry.sh"), &[dir.path().join("reg").to_str().unwrap()]);
        let rig = Self { scripts, dir, registry };
        run(&rig.scripts.join("start-crio.sh"), &[rig.crio_dir().to_str().unwrap(), &rig.registry]);
        Some(rig)
    }

    fn crio_dir(&self) -> PathBuf {
        self.dir.path().join("crio")
    }

    fn drop_ins(&self) -> PathBuf {
        self.crio_dir().join("crio.conf.d")
    }

    /// kip's backend for this CRI-O, as the agent builds it (a fresh one is an agent restart).
    async fn backend(&self) -> Crio {
        let cri = CriClient::new(&self.crio_dir().join("crio.sock"));
        let info = cri.version().await.unwrap();
        assert_eq!(info, RuntimeInfo { name: "cri-o".into(), version: info.version.clone() });
        let paths = CrioPaths { config: self.crio_dir().join("crio.conf"), config_dir: self.drop_ins() };
        Crio::new(cri, info, paths)
    }

    /// `count` distinct images pushed as `REG/t/NAME-I:1`; their references.
    fn push(&self, name: &str, count: usize) -> Vec<String> {
        let (make, push) = (self.scripts.join("make-test-image.sh"), self.scripts.join("push-image.sh"));
        (0..count)
            .map(|i| {
                let oci = self.dir.path().join(format!("oci-{name}-{i}"));
                run(&make, &[oci.to_str().unwrap(), "1", &format!("{name}-{i}")]);
                let reference = format!("{}/t/{name}-{i}:1", self.registry);
                run(&push, &[&format!("oci:{}:1", oci.display()), &reference]);
                reference
            })
            .collect()
    }

    fn crictl(&self, args: &[&str]) -> String {
        let endpoint = format!("unix://{}", self.crio_dir().join("crio.sock").display());
        let out = Command::new(self.scripts.join("bin/crictl"))
            .env("CRI_CONFIG_FILE", self.scripts.join("bin/crictl.yaml"))
            .arg("--runtime-endpoint")
            .arg(endpoint)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "crictl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every tag crictl lists → `"pinned"` as crictl reports it.
    fn crictl_pins(&self) -> BTreeMap<String, bool> {
        let doc: serde_json::Value = serde_json::from_str(&self.crictl(&["images", "-o", "json"])).unwrap();
        let mut pins = BTreeMap::new();
        for image in doc["images"].as_array().unwrap() {
            for tag in image["repoTags"].as_array().unwrap() {
                pins.insert(tag.as_str().unwrap().to_string(), image["pinned"].as_bool().unwrap_or(false));
            }
        }
        pins
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(self.crio_dir().join("crio.log")).map_or(0, |m| m.len() as usize)
    }

    /// Waits until CRI-O logs a finished reload after `offset` in its log; fails on a refused one.
    async fn wait_reload(&self, offset: usize) {
        for _ in 0..150 {
            let log = std::fs::read(self.crio_dir().join("crio.log")).unwrap();
            let new = String::from_utf8_lossy(&log[offset.min(log.len())..]).to_string();
            assert!(!new.contains("Unable to reload configuration"), "CRI-O refused a reload: {new}");
            if new.contains("Configuration reload completed") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("CRI-O logged no finished reload within 30 s");
    }

    /// As an admin would: the rig's `crio-pin.sh` writes `10-admin-pins.conf` and SIGHUPs CRI-O.
    fn admin_pins(&self, patterns: &[&str]) {
        let mut args = vec![self.crio_dir().to_str().unwrap().to_string()];
        args.extend(patterns.iter().map(|p| p.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&self.scripts.join("crio-pin.sh"), &args);
    }
}

impl Rig {
    /// The rig's registry, restarted on its port and storage wanting `user`/`password` (htpasswd):
    /// CRI-O keeps it as its insecure registry, and every pull now needs the login.
    fn require_login(&self, user: &str, password: &str) {
        let reg = self.dir.path().join("reg");
        run(&self.scripts.join("stop-registry.sh"), &[reg.to_str().unwrap()]);
        let htpasswd = Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap();
        assert!(htpasswd.status.success(), "htpasswd (tests/install-deps.sh installs it)");
        std::fs::write(reg.join("htpasswd"), htpasswd.stdout).unwrap();
        let config = reg.join("registry.yml");
        let mut yaml = std::fs::read_to_string(&config).unwrap();
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: kip-rig\n    path: {}\n",
            reg.join("htpasswd").display()
        ));
        std::fs::write(&config, yaml).unwrap();
        // Started as the rig's script starts it (in the background, its PID recorded), so
        // stop-registry.sh stops this one too.
        let started = Command::new("sh")
            .arg("-c")
            .arg(r#"setsid docker-registry serve "$1" >/dev/null 2>&1 </dev/null & echo $!"#)
            .arg("sh")
            .arg(&config)
            .output()
            .unwrap();
        std::fs::write(reg.join("registry.pid"), String::from_utf8_lossy(&started.stdout).trim()).unwrap();
        for _ in 0..100 {
            let status = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}/v2/", self.registry)])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&status.stdout) == "401" {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the registry did not come back wanting a login on {}", self.registry);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = Command::new(self.scripts.join("stop-crio.sh")).arg(self.crio_dir()).status();
        let _ = Command::new(self.scripts.join("stop-registry.sh")).arg(self.dir.path().join("reg")).status();
    }
}

fn keep(references: &[String]) -> Keep {
    Keep { references: references.to_vec(), records: Default::default() }
}

/// Issue 20 item 1: parallel pulls used to copy the last written list, add one image and write,
/// so the last writer won and other images dropped out of the drop-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_images_pulled_five_at_a_time_are_all_pinned() {
    let Some(rig) = Rig::start("ten_images_pulled_five_at_a_time_are_all_pinned") else { return };
    let images = rig.push("par", 10);
    let out = Command::new(env!("CARGO_BIN_EXE_kip-agent"))
        .args(["--once", "--max-parallel-pulls", "5", "--images"])
        .arg(images.iter().enumerate().map(|(i, r)| format!("i{i}={r}")).collect::<Vec<_>>().join(";"))
        .arg("--cri-socket")
        .arg(rig.crio_dir().join("crio.sock"))
        .arg("--crio-config")
        .arg(rig.crio_dir().join("crio.conf"))
        .arg("--crio-config-dir")
        .arg(rig.drop_ins())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kip-agent --once failed: {stderr}");
    let pins = rig.crictl_pins();
    for reference in &images {
        assert_eq!(pins.get(reference), Some(&true), "{reference} in crictl images -o json: {pins:?}");
    }

    // And straight at the backend: ten pins at once on four threads, every one kept.
    let more = rig.push("conc", 10);
    let crio = rig.backend().await;
    let mut tasks = tokio::task::JoinSet::new();
    for reference in more.clone() {
        let crio = crio.clone();
        tasks.spawn(async move {
            let image = crio.pull(&reference, None, None, Duration::from_secs(60)).await.unwrap().unwrap();
            crio.pin(&reference, &image).await.unwrap()
        });
    }
    assert!(tasks.join_all().await.into_iter().all(|pinned| pinned));
    let pins = rig.crictl_pins();
    for reference in &more {
        assert_eq!(pins.get(reference), Some(&true), "{reference}: {pins:?}");
    }
}

/// Issue 20 item 1: after a write that failed, the next pin wrote a one-image list.
#[tokio::test]
async fn a_failed_write_loses_no_image_at_the_next_pin() {
    let Some(rig) = Rig::start("a_failed_write_loses_no_image_at_the_next_pin") else { return };
    let images = rig.push("fail", 3);
    let crio = rig.backend().await;
    let mut pulled = Vec::new();
    for r in &images {
        pulled.push(crio.pull(r, None, None, Duration::from_secs(60)).await.unwrap().unwrap());
    }
    assert!(crio.pin(&images[0], &pulled[0]).await.unwrap());
    // An admin's drop-in that does not parse: kip cannot know the admin's list, so it writes nothing.
    let broken = rig.drop_ins().join("10-broken.conf");
    std::fs::write(&broken, "[crio.image\n").unwrap();
    let e = crio.pin(&images[1], &pulled[1]).await.unwrap_err().to_string();
    assert!(e.contains("10-broken.conf"), "{e}");
    std::fs::remove_file(&broken).unwrap();
    assert!(crio.pin(&images[2], &pulled[2]).await.unwrap());
    let pins = rig.crictl_pins();
    for r in &images {
        assert_eq!(pins.get(r), Some(&true), "{r}: {pins:?}");
    }
    assert_eq!(crio.pin_problem(), None);
}

/// Issue 20 item 2: an admin who edits their own `pinned_images` while kip runs is heard at the
/// next check, not when kip's own list next changes.
#[tokio::test]
async fn an_admin_s_new_pattern_takes_effect_at_the_next_check() {
    let Some(rig) = Rig::start("an_admin_s_new_pattern_takes_effect_at_the_next_check") else { return };
    let images = rig.push("adm", 2);
    let (kips, admins) = (&images[0], &images[1]);
    let crio = rig.backend().await;
    for r in &images {
        crio.pull(r, None, None, Duration::from_secs(60)).await.unwrap();
    }
    let offset = rig.log_len();
    crio.sync_pins(&keep(std::slice::from_ref(kips))).await.unwrap();
    rig.wait_reload(offset).await;
    assert_eq!(rig.crictl_pins().get(kips), Some(&true));

    // The admin pins their image in their own drop-in: kip's file sorts last and hides it.
    rig.admin_pins(&[admins]);
    assert_eq!(rig.crictl_pins().get(admins), Some(&false), "hidden by kip's drop-in until kip rewrites it");
    let offset = rig.log_len();
    crio.snapshot().await.unwrap(); // what every check does first
    rig.wait_reload(offset).await;
    let pins = rig.crictl_pins();
    assert_eq!(pins.get(admins), Some(&true), "the admin's pattern, at the next check: {pins:?}");
    assert_eq!(pins.get(kips), Some(&true));
    let text = std::fs::read_to_string(rig.drop_ins().join(DROP_IN_NAME)).unwrap();
    assert!(text.find(admins.as_str()) < text.find(kips.as_str()), "the admin's list first:\n{text}");

    // Nothing changed since: no rewrite, no signal.
    let offset = rig.log_len();
    crio.snapshot().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = std::fs::read(rig.crio_dir().join("crio.log")).unwrap();
    assert!(!String::from_utf8_lossy(&log[offset..]).contains("reload"), "no reload for nothing");
}

/// Issue 20 items 1 and 3: an agent restarted with kip's drop-in in place keeps every image in it
/// when it pins the next one; a temporary file an older kip left (CRI-O parses every file in the
/// directory, so a broken one fails every reload) is removed at start-up, never read as the
/// admin's, and no named temporary file is left by a write.
#[tokio::test]
async fn a_restarted_agent_keeps_its_pins_and_clears_a_leftover_temporary_file() {
    let Some(rig) = Rig::start("a_restarted_agent_keeps_its_pins_and_clears_a_leftover_temporary_file") else {
        return;
    };
    let images = rig.push("rst", 2);
    let first = rig.backend().await;
    let a = first.pull(&images[0], None, None, Duration::from_secs(60)).await.unwrap().unwrap();
    assert!(first.pin(&images[0], &a).await.unwrap());
    drop(first);

    let leftover = rig.drop_ins().join(TEMP_NAME);
    std::fs::write(&leftover, "[crio.image\npinned_images = [\"half-writ").unwrap();
    let again = rig.backend().await;
    assert!(!leftover.exists(), "removed at start-up");
    let b = again.pull(&images[1], None, None, Duration::from_secs(60)).await.unwrap().unwrap();
    let offset = rig.log_len();
    assert!(again.pin(&images[1], &b).await.unwrap());
    rig.wait_reload(offset).await;
    let pins = rig.crictl_pins();
    assert_eq!((pins.get(&images[0]), pins.get(&images[1])), (Some(&true), Some(&true)), "{pins:?}");
    let names: Vec<_> = std::fs::read_dir(rig.drop_ins()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from(DROP_IN_NAME)], "only kip's drop-in");

    // The release removes kip's file (and any leftover) and CRI-O reloads without it.
    std::fs::write(&leftover, "x").unwrap();
    let offset = rig.log_len();
    kip_agent::agent::release_node(&again, false, None).await.unwrap();
    rig.wait_reload(offset).await;
    assert!(std::fs::read_dir(rig.drop_ins()).unwrap().next().is_none(), "nothing of kip's left");
    let pins = rig.crictl_pins();
    assert_eq!((pins.get(&images[0]), pins.get(&images[1])), (Some(&false), Some(&false)), "{pins:?}");
}

/// Issue 20 item 8: a release with `remove` (and `--remove-unlisted`) deletes an image kip pinned
/// only where no name kip does not own is on it: the same content pulled as an admin's
/// `admin/keep:1` stays, under both names; the image only kip named is deleted.
#[tokio::test]
async fn removal_keeps_an_image_that_also_carries_an_admin_s_name() {
    let Some(rig) = Rig::start("removal_keeps_an_image_that_also_carries_an_admin_s_name") else { return };
    let images = rig.push("rm", 2);
    let admins = format!("{}/admin/keep:1", rig.registry);
    let oci = rig.dir.path().join("oci-rm-0");
    run(&rig.scripts.join("push-image.sh"), &[&format!("oci:{}:1", oci.display()), &admins]);
    rig.crictl(&["pull", &admins]);
    let crio = rig.backend().await;
    for r in &images {
        let image = crio.pull(r, None, None, Duration::from_secs(60)).await.unwrap().unwrap();
        assert!(crio.pin(r, &image).await.unwrap());
    }
    let shared = crio.status(&images[0]).await.unwrap().unwrap();
    assert!(shared.repo_tags.contains(&admins), "one image under both names: {shared:?}");

    let offset = rig.log_len();
    kip_agent::agent::release_node(&crio, true, None).await.unwrap();
    rig.wait_reload(offset).await;
    let tags = rig.crictl_pins();
    assert!(!tags.contains_key(&images[1]), "the image only kip named is deleted: {tags:?}");
    assert!(tags.contains_key(&admins), "the admin's name stays: {tags:?}");
    assert!(tags.contains_key(&images[0]), "the image it names stays whole: {tags:?}");
}

/// Image sets' pull secrets on CRI-O: an image a set lists is pulled with the set's secret as the
/// coordinator's copy holds it (a file per `<namespace>.<secret>`), sent as the CRI `AuthConfig`;
/// without it the registry refuses the pull, naming no credential.
#[tokio::test]
async fn a_set_s_pull_secret_pulls_a_private_image_through_cri_o() {
    use base64::Engine as _;
    let Some(rig) = Rig::start("a_set_s_pull_secret_pulls_a_private_image_through_cri_o") else { return };
    let images = rig.push("private", 1);
    rig.require_login("team-robot", "t3am-Pa55-crio");
    let sets = tempfile::tempdir().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("team-robot:t3am-Pa55-crio");
    std::fs::write(sets.path().join("ml.team"), format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, rig.registry))
        .unwrap();
    let secrets = kip_agent::agent::PullSecrets { dir: None, sets_dir: Some(sets.path().into()) };
    let list = kip::images::ImageList::parse(&format!("model={}", images[0])).unwrap();
    let entry = &list.entries()[0];
    let crio = rig.backend().await;
    let refused = kip_agent::agent::pull_and_pin(&crio, &secrets, &[], entry, Duration::from_secs(60), None).await;
    let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(!why.is_empty(), "pulled from a registry that wants a login, without one");
    assert!(!why.contains("t3am-Pa55-crio") && !why.contains(&auth), "{why}");
    let keys = ["ml.team".to_string()];
    let pulled = kip_agent::agent::pull_and_pin(&crio, &secrets, &keys, entry, Duration::from_secs(60), None).await;
    assert!(pulled.is_ok(), "{:?}", pulled.err().map(|e| e.to_string()));
    assert_eq!(rig.crictl_pins().get(&images[0]), Some(&true), "{:?}", rig.crictl_pins());
}
