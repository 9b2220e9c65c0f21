//! What kip's coordinator and agents share: the `kip.v1` API, the KIP `IMAGES` syntax,
//! duration parsing, the small HTTP server for `/metrics`, `/healthz` and `/readyz`, and the
//! process plumbing (logs, signals) every binary shares. With the `runtime-apis` feature, also
//! the generated CRI and containerd APIs the agent talks to.

#![forbid(unsafe_code)]

pub mod duration;
pub mod http;
pub mod images;
pub mod listen;
pub mod process;
pub mod pull_secrets;
pub mod reference;

/// The `kip.v1` gRPC API (coordinator ⇄ agents), generated from `proto/kip/v1/kip.proto`.
pub mod v1 {
    tonic::include_proto!("kip.v1");

    /// The metadata key the coordinator sets on its refusals (a token it cannot verify now, a bad
    /// token, a call without a node name): an agent tells a coordinator that answers from one it
    /// cannot reach, and waits for the pull budget only on the first. "Shutting down" is left
    /// unmarked on purpose: a coordinator that is going away may stay away.
    pub const ANSWERED_BY: &str = "kip-answered-by";

    /// `status` marked as the coordinator's own answer.
    pub fn coordinator_status(mut status: tonic::Status) -> tonic::Status {
        status.metadata_mut().insert(ANSWERED_BY, tonic::metadata::MetadataValue::from_static("coordinator"));
        status
    }
}

/// The CRI (`runtime.v1`): the image and runtime services every Kubernetes runtime serves.
#[cfg(feature = "runtime-apis")]
pub mod cri {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
    tonic::include_proto!("runtime.v1");
}

/// containerd's native API, as much of it as kip needs: the images service (labels = pins).
/// The modules follow the protobuf packages, so generated cross-package paths resolve as they are.
#[cfg(feature = "runtime-apis")]
pub mod containerd {
    pub mod types {
        #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod images {
            pub mod v1 {
                #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
    }
}
