//! Compiles every protobuf API the workspace speaks, with the vendored protoc, so a plain
//! `cargo build` needs nothing from the system: kip's own `kip.v1` always, and with the
//! `runtime-apis` feature (the agent) the CRI `runtime.v1` and containerd's images service.
//! Those two are the upstream files under `proto/vendor/` (see its README); crates that ship
//! them (k8s-cri, containerd-client) run protoc from the system in their own build scripts.

use std::path::PathBuf;

const KIP: &str = "proto/kip/v1/kip.proto";
const CRI: &str = "proto/vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto";
const CONTAINERD_IMAGES: &str = "proto/vendor/github.com/containerd/containerd/api/services/images/v1/images.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let well_known = protoc_bin_vendored::include_path()?;

    println!("cargo:rerun-if-changed=proto/kip");
    tonic_prost_build::configure().compile_with_config(
        prost_config()?,
        &[PathBuf::from(KIP)],
        &[PathBuf::from("proto"), well_known.clone()],
    )?;

    if std::env::var_os("CARGO_FEATURE_RUNTIME_APIS").is_some() {
        println!("cargo:rerun-if-changed=proto/vendor");
        // Servers too: the agent's tests stand a fake runtime up behind a real socket.
        tonic_prost_build::configure().compile_with_config(
            prost_config()?,
            &[PathBuf::from(CRI), PathBuf::from(CONTAINERD_IMAGES)],
            &[PathBuf::from("proto/vendor"), well_known],
        )?;
    }
    Ok(())
}

/// prost's settings with the vendored protoc (never one from `PATH` or `PROTOC`).
fn prost_config() -> Result<tonic_prost_build::Config, Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    Ok(config)
}
