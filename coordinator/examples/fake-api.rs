//! The in-process fake Kubernetes API of the tests (`tests/common/fake_api.rs`) as a process of
//! its own, for end-to-end scripts that run the real coordinator against it
//! (`tests/e2e/image-sets.sh`): it serves on a loopback port, writes a kubeconfig pointing at it,
//! and stores what it is sent (create, patch, delete, watch) until it is killed.
//!
//! Usage: fake-api KUBECONFIG_PATH — prints the server's URL on stdout once it listens.

#![allow(clippy::unwrap_used, dead_code)] // a test fixture: a failed unwrap ends the script's run

#[path = "../tests/common/fake_api.rs"]
mod fake_api;

use fake_api::FakeApi;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: fake-api KUBECONFIG_PATH");
        return std::process::ExitCode::FAILURE;
    };
    let api = FakeApi::new();
    let door = api.door().await;
    if let Err(e) = std::fs::write(&path, FakeApi::kubeconfig(&door)) {
        eprintln!("fake-api: writing {path}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    println!("{}", door.url);
    std::future::pending::<()>().await;
    std::process::ExitCode::SUCCESS
}
