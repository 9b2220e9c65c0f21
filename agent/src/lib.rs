//! kip-agent: keeps a list of images cached and pinned on one node through its CRI socket.

#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod cri;
pub mod follow;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod runtime;
