//! kip-coordinator: validates the KIP configuration, publishes the image list to agents over
//! gRPC (`kip.v1`), and aggregates their reports.

#![forbid(unsafe_code)]

pub mod config;
pub mod daemonset;
pub mod fallback;
pub mod grpc;
pub mod hub;
pub mod metrics;
pub mod reload;

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
