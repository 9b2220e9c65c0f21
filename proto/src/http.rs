//! A small HTTP/1 server for the operational endpoints of the agent and the coordinator.
//! Each binary supplies its own router (path → response); this module does the plumbing.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{header, Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub type HttpResponse = Response<Full<Bytes>>;

/// Answers GET/HEAD requests by path.
pub type Router = Arc<dyn Fn(&str) -> HttpResponse + Send + Sync>;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
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
        let router = router.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move {
                    Ok::<_, Infallible>(if req.method() == Method::GET || req.method() == Method::HEAD {
                        router(req.uri().path())
                    } else {
                        text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n")
                    })
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

pub fn text(status: StatusCode, body: impl Into<String>) -> HttpResponse {
    with_type(status, body.into(), "text/plain; charset=utf-8")
}

pub fn openmetrics(body: String) -> HttpResponse {
    with_type(StatusCode::OK, body, OPENMETRICS)
}

pub fn json(status: StatusCode, body: String) -> HttpResponse {
    with_type(status, body, "application/json")
}

pub fn not_found() -> HttpResponse {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// `/readyz`: 200 `ok`, or 503 with the reason.
pub fn readiness(not_ready_reason: Option<String>) -> HttpResponse {
    match not_ready_reason {
        None => text(StatusCode::OK, "ok\n"),
        Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}
