//! Follows the configuration: in a cluster the ConfigMap through the API (a watch: a change is
//! published within a second), and the mounted directory (inotify through `notify`, plus a
//! periodic re-read) outside one or until the API answers. Each change is validated again; a
//! valid one is published, an invalid one is logged and counted and the last good list stays.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client};
use notify::Watcher as _;
use tokio_util::sync::CancellationToken;

use crate::config::{self, RawConfig};
use crate::state::State;

/// Validates `raw` and publishes it when it is valid and differs from the last one looked at;
/// refuses it otherwise (counted once per distinct content). Shared by both sources.
pub struct ConfigSink {
    pub hub: Arc<State>,
    last_raw: Option<RawConfig>,
}

impl ConfigSink {
    pub fn new(hub: Arc<State>, initial: Option<RawConfig>) -> Self {
        Self { hub, last_raw: initial }
    }

    pub fn apply(&mut self, raw: RawConfig, source: &str) {
        if self.last_raw.as_ref() == Some(&raw) {
            return;
        }
        self.last_raw = Some(raw.clone());
        match config::validate(&raw) {
            Ok(config) => {
                if self.hub.publish(config).is_none() {
                    tracing::debug!(source, "the configuration source changed but the configuration did not");
                }
            }
            Err(e) => {
                self.hub.metrics.config_reload_errors.inc();
                tracing::error!(error = %e, source, generation = self.hub.current().generation, "configuration change refused; the last good list stays published");
            }
        }
    }
}

/// Events come in bursts (Kubernetes writes a new directory, then swaps `..data`): wait this
/// long after the first one before reading.
const DEBOUNCE: Duration = Duration::from_millis(100);

pub struct ConfigReloader {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
    pub resync_interval: Duration,
    /// Set once the ConfigMap came through the API: the directory (which the kubelet updates up
    /// to a minute later) must not publish an older list over it.
    pub api_active: Arc<AtomicBool>,
    sink: ConfigSink,
}

impl ConfigReloader {
    pub fn new(dir: PathBuf, env: HashMap<String, String>, hub: Arc<State>, initial: RawConfig) -> Self {
        Self {
            dir,
            env,
            resync_interval: Duration::from_secs(30),
            api_active: Arc::default(),
            sink: ConfigSink::new(hub, Some(initial)),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
            let _ = tx.send(());
        })
        .and_then(|mut w| w.watch(&self.dir, notify::RecursiveMode::NonRecursive).map(|_| w));
        // Keep the watcher alive for the whole loop; without it the periodic re-read still works.
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the config directory; re-reading it every {}s", self.resync_interval.as_secs());
                None
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(self.resync_interval) => {}
            }
            self.reload();
        }
    }

    /// Reads and validates the directory; publishes a valid change.
    pub fn reload(&mut self) {
        if self.api_active.load(Ordering::SeqCst) {
            return;
        }
        match config::read_sources(Some(&self.dir), &self.env) {
            Ok(raw) => self.sink.apply(raw, "directory"),
            Err(e) => {
                self.sink.hub.metrics.config_reload_errors.inc();
                tracing::error!(error = %e, "reading the configuration failed; the last good list stays published");
            }
        }
    }
}

/// The ConfigMap `name` and its uninstall companion `name-release` (created by the chart's
/// pre-delete hook, `KIP_RELEASE` only), followed through the API.
pub struct ConfigMapWatch {
    pub namespace: String,
    pub name: String,
    pub env: HashMap<String, String>,
    pub api_active: Arc<AtomicBool>,
}

/// A ConfigMap's `data`.
type Data = BTreeMap<String, String>;

/// The name of the ConfigMap that asks for a release (the chart's pre-delete hook creates it).
pub fn release_config_map(name: &str) -> String {
    format!("{name}-release")
}

/// Pure: the raw configuration from the main ConfigMap's data and the release ConfigMap's,
/// over the environment. Only `KIP_RELEASE` is taken from the release ConfigMap.
pub fn raw_from_config_maps(main: &Data, release: Option<&Data>, env: &HashMap<String, String>) -> RawConfig {
    let mut raw = config::from_data(main, env);
    if let Some(v) = release.and_then(|r| r.get("KIP_RELEASE")) {
        raw.insert("KIP_RELEASE".into(), v.clone());
    }
    raw
}

impl ConfigMapWatch {
    pub async fn run(self, client: Client, hub: Arc<State>, shutdown: CancellationToken) {
        let api = Api::<ConfigMap>::namespaced(client, &self.namespace);
        let release_name = release_config_map(&self.name);
        let by_name = |n: &str| watcher::Config::default().fields(&format!("metadata.name={n}"));
        let main = watcher(api.clone(), by_name(&self.name)).default_backoff().map(|e| (true, e));
        let release = watcher(api, by_name(&release_name)).default_backoff().map(|e| (false, e));
        let mut events = std::pin::pin!(futures_util::stream::select(main, release));
        let mut sink = ConfigSink::new(hub, None);
        let mut main_data: Option<Data> = None;
        let mut release_data: Option<Data> = None;
        loop {
            let (is_main, event) = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = events.next() => match next { Some(e) => e, None => return },
            };
            let slot = if is_main { &mut main_data } else { &mut release_data };
            match event {
                // A (re-)list is taken whole, at its end: no warning and no half state in between.
                Ok(watcher::Event::Init) => {
                    *slot = None;
                    continue;
                }
                Ok(watcher::Event::InitApply(cm)) => {
                    *slot = Some(cm.data.unwrap_or_default());
                    continue;
                }
                Ok(watcher::Event::InitDone) => {}
                Ok(watcher::Event::Apply(cm)) => *slot = Some(cm.data.unwrap_or_default()),
                Ok(watcher::Event::Delete(_)) => *slot = None,
                Err(e) => {
                    tracing::warn!(error = %e, config_map = %self.name, "watching the ConfigMap failed; retrying (the mounted directory is followed meanwhile)");
                    continue;
                }
            }
            let Some(main) = &main_data else {
                if is_main {
                    tracing::warn!(config_map = %self.name, namespace = %self.namespace, "the ConfigMap is not there; the last good list stays published");
                }
                continue;
            };
            if !self.api_active.swap(true, Ordering::SeqCst) {
                tracing::info!(config_map = %self.name, namespace = %self.namespace, "following the ConfigMap through the API");
            }
            sink.apply(raw_from_config_maps(main, release_data.as_ref(), &self.env), "ConfigMap");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn the_release_config_map_adds_kip_release_only() {
        let env = HashMap::from([("CACHING_INTERVAL_HOURS".to_string(), "2".to_string())]);
        let main = BTreeMap::from([("IMAGES".to_string(), "a=busybox".to_string()), ("OTHER".into(), "x".into())]);
        let release = BTreeMap::from([("KIP_RELEASE".to_string(), "unpin".to_string()), ("IMAGES".into(), "".into())]);
        let raw = raw_from_config_maps(&main, Some(&release), &env);
        assert_eq!(
            raw,
            RawConfig::from([
                ("CACHING_INTERVAL_HOURS".into(), "2".into()),
                ("IMAGES".into(), "a=busybox".into()),
                ("KIP_RELEASE".into(), "unpin".into()),
            ])
        );
        assert_eq!(raw_from_config_maps(&main, None, &env).get("KIP_RELEASE"), None);
        assert_eq!(release_config_map("k8s-image-puller"), "k8s-image-puller-release");
    }

    /// A mounted-ConfigMap-like directory with `IMAGES=a=busybox`, its hub and reloader.
    fn reloader() -> (tempfile::TempDir, Arc<State>, ConfigReloader) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("IMAGES"), "a=busybox").unwrap();
        let env = HashMap::new();
        let raw = config::read_sources(Some(dir.path()), &env).unwrap();
        let hub = State::new(config::validate(&raw).unwrap(), Arc::new(Metrics::new()));
        let reloader = ConfigReloader::new(dir.path().to_path_buf(), env, hub.clone(), raw);
        (dir, hub, reloader)
    }

    #[test]
    fn the_directory_stands_down_once_the_api_delivers() {
        let (dir, hub, mut reloader) = reloader();
        reloader.api_active.store(true, Ordering::SeqCst);
        std::fs::write(dir.path().join("IMAGES"), "a=busybox;old=nginx").unwrap();
        reloader.reload();
        assert_eq!(hub.current().generation, 1, "a stale directory never overwrites what the API delivered");
    }

    #[test]
    fn a_broken_change_is_counted_once_and_the_last_good_list_stays() {
        let (dir, hub, mut reloader) = reloader();

        std::fs::write(dir.path().join("CACHING_CPU_LIMIT"), "lots").unwrap();
        reloader.reload();
        reloader.reload();
        assert_eq!(hub.metrics.config_reload_errors.get(), 1, "the same broken content counts once");
        assert_eq!(hub.current().generation, 1);

        std::fs::remove_file(dir.path().join("CACHING_CPU_LIMIT")).unwrap();
        std::fs::write(dir.path().join("IMAGES"), "a=busybox;b=nginx").unwrap();
        reloader.reload();
        assert_eq!(hub.current().generation, 2);
        assert_eq!(hub.current().config.images.len(), 2);
    }
}
