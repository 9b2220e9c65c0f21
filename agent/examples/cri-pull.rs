//! `cri-pull SOCKET IMAGE...`: the benchmark's baseline — every image pulled through the CRI at
//! once from one process (the best a person can do with the runtime's own API: no limit, no
//! pinning, no bookkeeping). Prints the wall time in milliseconds; exit 1 if any pull failed.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use kip_agent::cri::CriClient;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((socket, images)) = args.split_first().filter(|(_, images)| !images.is_empty()) else {
        eprintln!("usage: cri-pull SOCKET IMAGE...");
        return ExitCode::from(2);
    };
    let client = CriClient::new(std::path::Path::new(socket));
    let started = Instant::now();
    let mut pulls = tokio::task::JoinSet::new();
    for image in images.iter().cloned() {
        let client = client.clone();
        pulls.spawn(async move { (client.pull(&image, None, Duration::from_secs(600)).await, image) });
    }
    let mut failed = false;
    while let Some(done) = pulls.join_next().await {
        match done {
            Ok((Ok(_), _)) => {}
            Ok((Err(e), image)) => {
                eprintln!("cri-pull: {image}: {e}");
                failed = true;
            }
            Err(e) => {
                eprintln!("cri-pull: {e}");
                failed = true;
            }
        }
    }
    println!("{}", started.elapsed().as_millis());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
