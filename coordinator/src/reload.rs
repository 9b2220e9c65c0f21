//! Follows a mounted ConfigMap directory: on every change (inotify through `notify`, plus a
//! periodic re-read as a safety net) the configuration is read and validated again; a valid
//! change is published, an invalid one is logged and counted and the last good list stays.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher as _;
use tokio_util::sync::CancellationToken;

use crate::config::{self, RawConfig};
use crate::hub::Hub;

/// Events come in bursts (Kubernetes writes a new directory, then swaps `..data`): wait this
/// long after the first one before reading.
const DEBOUNCE: Duration = Duration::from_millis(100);

pub struct ConfigReloader {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
    pub hub: Arc<Hub>,
    pub resync_interval: Duration,
    /// The raw values last looked at, so an unchanged (or unchanged broken) config is not
    /// validated, logged and counted again on every event.
    last_raw: Option<RawConfig>,
}

impl ConfigReloader {
    pub fn new(dir: PathBuf, env: HashMap<String, String>, hub: Arc<Hub>, initial: RawConfig) -> Self {
        Self { dir, env, hub, resync_interval: Duration::from_secs(30), last_raw: Some(initial) }
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
        let raw = match config::read_sources(Some(&self.dir), &self.env) {
            Ok(raw) => raw,
            Err(e) => {
                self.hub.metrics.config_reload_errors.inc();
                tracing::error!(error = %e, "reading the configuration failed; the last good list stays published");
                return;
            }
        };
        if self.last_raw.as_ref() == Some(&raw) {
            return;
        }
        self.last_raw = Some(raw.clone());
        match config::validate(&raw) {
            Ok(config) => {
                if self.hub.publish(config).is_none() {
                    tracing::debug!("configuration files changed but the configuration did not");
                }
            }
            Err(e) => {
                self.hub.metrics.config_reload_errors.inc();
                tracing::error!(error = %e, generation = self.hub.current().generation, "configuration change refused; the last good list stays published");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn a_broken_change_is_counted_once_and_the_last_good_list_stays() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("IMAGES"), "a=busybox").unwrap();
        let env = HashMap::new();
        let raw = config::read_sources(Some(dir.path()), &env).unwrap();
        let hub = Hub::new(config::validate(&raw).unwrap(), Arc::new(Metrics::new()));
        let mut reloader = ConfigReloader::new(dir.path().to_path_buf(), env, hub.clone(), raw);

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
