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
