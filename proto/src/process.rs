//! What every kip binary does around its work: structured logs (text or JSON on stderr, level
//! from `RUST_LOG`), waiting for SIGTERM/SIGINT, and rendering its metrics registry.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Returns when the process receives SIGTERM or SIGINT.
pub async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The registry in OpenMetrics text.
pub fn render_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The tasks a process lives for (servers, watches, the main loops). The first one to end
/// before shutdown — returned, failed or panicked — is what `first_end` reports; the binary then
/// exits non-zero so the kubelet restarts it, rather than living on without that task.
#[derive(Default)]
pub struct Supervised {
    set: tokio::task::JoinSet<Result<(), String>>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Supervised {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task`, which should run until shutdown.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.spawn_fallible(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Runs `task`, which should run until shutdown; its error is part of the report.
    pub fn spawn_fallible<F, E>(&mut self, name: &'static str, task: F)
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let handle = self.set.spawn(async move { task.await.map_err(|e| format!("{e:#}")) });
        self.names.insert(handle.id(), name);
    }

    /// The first task to end: its name and how it ended. Never returns when there is none.
    pub async fn first_end(&mut self) -> (&'static str, String) {
        let Some(ended) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match ended {
            Ok((id, Ok(()))) => (id, "returned".to_string()),
            Ok((id, Err(e))) => (id, format!("failed: {e}")),
            Err(e) if e.is_panic() => (e.id(), "panicked".to_string()),
            Err(e) => (e.id(), "was cancelled".to_string()),
        };
        (self.names.remove(&id).unwrap_or("a task"), how)
    }

    /// After shutdown was signalled: waits for the tasks to finish, at most `within`, then
    /// drops (cancels) whatever is left.
    pub async fn wait_all(mut self, within: std::time::Duration) {
        let all = async { while self.set.join_next().await.is_some() {} };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!(left = self.set.len(), "tasks still running after shutdown; cancelling them");
            self.set.shutdown().await;
        }
    }
}

/// A main loop's proof of life for `/healthz`: each turn of the loop beats with the longest
/// silence it may keep before the next; a loop stuck past it makes `/healthz` fail, and the
/// kubelet's liveness probe restarts the process. Healthy until the first beat.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat(std::sync::Arc<std::sync::Mutex<Option<(tokio::time::Instant, std::time::Duration)>>>);

impl Heartbeat {
    pub fn beat(&self, allowed_silence: std::time::Duration) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some((tokio::time::Instant::now(), allowed_silence));
        }
    }

    /// `Err` with the reason when the loop has been silent for longer than it said it would be.
    pub fn check(&self) -> Result<(), String> {
        let Ok(last) = self.0.lock() else { return Err("heartbeat state poisoned".into()) };
        match *last {
            Some((at, allowed)) if at.elapsed() > allowed => {
                Err(format!("main loop silent for {}s (allowed {}s)", at.elapsed().as_secs(), allowed.as_secs()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_how_it_ended() {
        let mut tasks = Supervised::new();
        tasks.spawn("forever", std::future::pending());
        tasks.spawn_fallible("server", async { Err::<(), _>(anyhow::anyhow!("address in use")) });
        assert_eq!(tasks.first_end().await, ("server", "failed: address in use".to_string()));
        tasks.spawn("worker", async { panic!("a bug") });
        assert_eq!(tasks.first_end().await, ("worker", "panicked".to_string()));
        tasks.spawn("follower", async {});
        assert_eq!(tasks.first_end().await, ("follower", "returned".to_string()));
        let pending = tokio::time::timeout(Duration::from_millis(50), tasks.first_end()).await;
        assert!(pending.is_err(), "the task that runs on is not reported");
        tasks.wait_all(Duration::from_millis(50)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_silent_past_its_allowance_is_unhealthy() {
        let beat = Heartbeat::default();
        assert_eq!(beat.check(), Ok(()), "healthy before the loop starts");
        beat.beat(Duration::from_secs(60));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(beat.check(), Ok(()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(beat.check(), Err("main loop silent for 61s (allowed 60s)".into()));
        beat.beat(Duration::from_secs(60));
        assert_eq!(beat.check(), Ok(()));
    }
}
