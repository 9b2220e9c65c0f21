//! Fixtures shared by the coordinator's integration tests: a valid configuration and the real
//! gRPC server on a loopback port.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses part of it; a failed unwrap fails the test

pub mod fake_api;
pub mod registry;

use std::sync::Arc;

use kip_coordinator::auth::AgentAuth;
use kip_coordinator::{config, grpc::CoordinatorService, state::State};
use tokio_util::sync::CancellationToken;

/// A configuration with `IMAGES=images` and every other key at its default.
pub fn config_with(images: &str) -> config::KipConfig {
    let raw: config::RawConfig = [("IMAGES".to_string(), images.to_string())].into_iter().collect();
    config::validate(&raw).expect("valid test config")
}

/// The coordinator's gRPC service, served on 127.0.0.1 until `shutdown`.
pub struct Served {
    pub url: String,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

pub async fn serve(hub: Arc<State>, auth: AgentAuth) -> Served {
    serve_on(hub, auth, "127.0.0.1:0").await
}

/// As [`serve`], on `addr` (the address of a server stopped before: a restarted coordinator).
pub async fn serve_on(hub: Arc<State>, auth: AgentAuth, addr: &str) -> Served {
    let shutdown = CancellationToken::new();
    let service = kip::v1::coordinator_server::CoordinatorServer::new(CoordinatorService::new(
        hub,
        Arc::new(auth),
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = shutdown.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
                stop.cancelled().await
            }),
    );
    Served { url, shutdown, server }
}

/// A projected token as the kubelet writes it: a JWT for audience `kip` expiring in `life`, whose
/// claims carry `name` (what the stub API server answers by). The signature is the API's affair.
/// Two calls a second apart give two tokens: keep one where the same token must be sent again.
pub fn jwt(name: &str, life: std::time::Duration) -> String {
    let exp = (std::time::SystemTime::now() + life).duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    jwt_expiring_at(name, exp)
}

/// As [`jwt`], expiring at `exp` (seconds since the epoch): the same token at every call.
pub fn jwt_expiring_at(name: &str, exp: u64) -> String {
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = serde_json::json!({"aud": ["kip"], "exp": exp, "test": name});
    format!("{}.{}.c2lnbmF0dXJl", b64(serde_json::json!({"alg": "RS256"})), b64(claims))
}

/// The `name` a token of [`jwt`] carries.
pub fn name_in(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap_or_default();
    let claims: serde_json::Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    claims["test"].as_str().unwrap_or_default().to_string()
}
