//! A small HTTP/1 server for the operational endpoints of the agent and the coordinator, and
//! the one GET that reads them back (the uninstall hook reads the coordinator's `/status`).
//! Each binary supplies its own router (path → response); this module does the plumbing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{header, Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::listen::Listener;

pub type HttpResponse = Response<Full<Bytes>>;

/// Answers GET/HEAD requests by path.
pub type Router = Arc<dyn Fn(&str) -> HttpResponse + Send + Sync>;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once; more wait in the kernel's backlog. Probes, a scrape or two and
/// the uninstall hook's reads need a handful; the port is reachable from every pod.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client has to send a request's headers, also the most a kept-alive connection may
/// stay idle: a client that connects and says nothing holds no slot for longer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let listener = Listener::new(listener, MAX_CONNECTIONS, "HTTP");
    let mut conn_builder = hyper::server::conn::http1::Builder::new();
    // hyper enforces the header read timeout only with a timer.
    conn_builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let conn_builder = Arc::new(conn_builder);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            connection = listener.accept() => connection,
        };
        let conn_builder = conn_builder.clone();
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
            if let Err(e) = conn_builder.serve_connection(TokioIo::new(stream), svc).await {
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

/// `/healthz`: 200 while the main loops beat, 503 with the reason once one is stuck.
pub fn health(heartbeat: Result<(), String>) -> HttpResponse {
    match heartbeat {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {reason}\n")),
    }
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

/// `GET url` (plain HTTP, as the endpoints above serve it): the status code and the body.
/// Errors name the URL; the whole exchange is bounded by `timeout`.
pub async fn get(url: &str, timeout: std::time::Duration) -> Result<(StatusCode, String), String> {
    use http_body_util::{BodyExt as _, Empty};
    let fail = |what: String| format!("GET {url}: {what}");
    let uri: hyper::Uri = url.parse().map_err(|e| fail(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(fail("only http:// URLs are supported".into()));
    }
    let host = uri.host().ok_or_else(|| fail("no host".into()))?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let exchange = async {
        let stream =
            tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::get(path)
            .header(header::HOST, host.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r.map_err(fail),
        Err(_) => Err(fail(format!("no answer within {}s", timeout.as_secs()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn get_reads_back_what_serve_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let router: Router = Arc::new(|path| match path {
            "/status" => json(StatusCode::OK, "{\"ok\":true}".into()),
            _ => not_found(),
        });
        let server = tokio::spawn(serve(listener, router, shutdown.clone()));
        let t = std::time::Duration::from_secs(10);
        let (status, body) = get(&format!("http://{addr}/status"), t).await.unwrap();
        assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"ok\":true}"));
        let (status, _) = get(&format!("http://{addr}/nope"), t).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
        let err = get("https://example.invalid/status", t).await.unwrap_err();
        assert!(err.contains("only http://"), "{err}");
        shutdown.cancel();
        server.await.unwrap();
        let err = get(&format!("http://{addr}/status"), t).await.unwrap_err();
        assert!(err.starts_with(&format!("GET http://{addr}/status: ")), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_no_whole_request_is_cut_off_after_the_header_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let router: Router = Arc::new(|_| text(StatusCode::OK, "ok\n"));
        let server = tokio::spawn(serve(listener, router, shutdown.clone()));
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let started = tokio::time::Instant::now();
        for client in [&mut silent, &mut slow] {
            let mut rest = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(120), client.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "the connection is still open after two minutes");
        }
        assert!(started.elapsed() <= HEADER_READ_TIMEOUT + Duration::from_secs(1), "{:?}", started.elapsed());
        shutdown.cancel();
        server.await.unwrap();
    }
}
