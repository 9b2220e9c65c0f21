//! kip-coordinator: validates the KIP configuration, publishes the image list to agents over
//! gRPC (`kip.v1`), and aggregates their reports.

pub mod config;
pub mod daemonset;
pub mod grpc;
pub mod hub;
pub mod metrics;
pub mod reload;
