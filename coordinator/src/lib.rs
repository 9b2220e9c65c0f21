//! kip-coordinator: validates the KIP configuration, publishes the image list to agents over
//! gRPC (`kip.v1`), and aggregates their reports.

#![forbid(unsafe_code)]

pub mod auth;
pub mod budget;
pub mod config;
pub mod controller;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod gate;
pub mod grpc;
pub mod imageset;
pub mod leader;
pub mod manifest;
pub mod metrics;
pub mod reload;
pub mod resolve;
pub mod state;
pub mod status;
pub mod wait_release;
pub mod watches;

/// A Kubernetes API client (in-cluster or kubeconfig), retried until one can be built.
pub async fn connect_kube() -> kube::Client {
    retry_forever(
        "connecting to the Kubernetes API (the ConfigMap watch, the fallback DaemonSet and node labels wait for it; the image list is published regardless)",
        || async { kube::Client::try_default().await },
    )
    .await
}

/// Retry delays for the coordinator's background work: jittered, 1 s doubling to 60 s.
pub fn backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_secs(1))
        .with_max_delay(std::time::Duration::from_secs(60))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs `op` until it succeeds, with [`backoff`] delays, logging each failure with `what`.
/// Never gives up: callers stop it by dropping the future (the shutdown `select!`).
pub async fn retry_forever<T, E, F, Fut>(what: &str, mut op: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delays = backoff();
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                let delay = delays.next().unwrap_or(std::time::Duration::from_secs(60));
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
