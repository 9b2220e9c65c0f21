//! `cri-inspect SOCKET IMAGE...`: what the runtime's CRI says of each image, one line each:
//! `pinned`, `unpinned` or `absent`. The end-to-end tests use it to check pins the way kubelet
//! sees them (CRI `ImageStatus.pinned`), independently of kip-agent's own logic; it plays the
//! part of `crictl inspecti`, which these machines cannot install.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use hyper_util::rt::TokioIo;
use kip::cri::{image_service_client::ImageServiceClient, ImageSpec, ImageStatusRequest};
use tonic::transport::{Endpoint, Uri};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((socket, images)) = args.split_first().filter(|(_, images)| !images.is_empty()) else {
        eprintln!("usage: cri-inspect SOCKET IMAGE...");
        return ExitCode::from(2);
    };
    let socket = socket.clone();
    let channel =
        Endpoint::from_static("http://[::]:0").connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }));
    let mut client = ImageServiceClient::new(channel);
    for image in images {
        let req = ImageStatusRequest {
            image: Some(ImageSpec { image: image.clone(), ..Default::default() }),
            verbose: false,
        };
        match client.image_status(req).await {
            Ok(resp) => println!(
                "{}",
                match resp.into_inner().image {
                    None => "absent",
                    Some(i) if i.pinned => "pinned",
                    Some(_) => "unpinned",
                }
            ),
            Err(status) => {
                eprintln!("cri-inspect: ImageStatus {image}: {}", status.message());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
