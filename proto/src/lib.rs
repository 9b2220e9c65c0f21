//! What kip's coordinator and agents share: the `kip.v1` API, the KIP `IMAGES` syntax,
//! duration parsing and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

pub mod duration;
pub mod http;
pub mod images;

/// The `kip.v1` gRPC API (coordinator ⇄ agents), generated from `proto/kip/v1/kip.proto`.
pub mod v1 {
    tonic::include_proto!("kip.v1");
}
