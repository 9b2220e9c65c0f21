//! What kip's coordinator and agents share: the `kip.v1` API, the KIP `IMAGES` syntax,
//! duration parsing, the small HTTP server for `/metrics`, `/healthz` and `/readyz`, and the
//! process plumbing (logs, signals) every binary shares.

pub mod duration;
pub mod http;
pub mod images;
pub mod process;

/// The `kip.v1` gRPC API (coordinator ⇄ agents), generated from `proto/kip/v1/kip.proto`.
pub mod v1 {
    tonic::include_proto!("kip.v1");
}
