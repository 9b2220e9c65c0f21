//! The agent's HTTP endpoints: `/metrics` (OpenMetrics), `/healthz` (alive), `/readyz`
//! (runtime reachable and every listed image cached at least once).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the agent is not ready, or `None` when it is.
#[derive(Clone, Default)]
pub struct Readiness(Arc<RwLock<Option<String>>>);

impl Readiness {
    pub fn starting() -> Self {
        Self(Arc::new(RwLock::new(Some("starting".into()))))
    }
    pub fn set(&self, not_ready_reason: Option<String>) {
        if let Ok(mut g) = self.0.write() {
            *g = not_ready_reason;
        }
    }
    pub fn get(&self) -> Option<String> {
        self.0.read().map(|g| g.clone()).unwrap_or_else(|_| Some("readiness state poisoned".into()))
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: Readiness, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    continue;
                }
            },
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (metrics, ready) = (metrics.clone(), ready.clone());
                async move { Ok::<_, Infallible>(route(&req, &metrics, &ready)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics, ready: &Readiness) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, metrics.render());
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(OPENMETRICS));
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ready.get() {
            None => text(StatusCode::OK, "ok\n".into()),
            Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
