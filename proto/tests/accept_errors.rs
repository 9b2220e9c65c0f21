//! The HTTP server out of file descriptors (EMFILE on every accept): it waits with a growing delay
//! between tries instead of spinning a core and writing a log line per try, and serves again as
//! soon as descriptors are free. Its own test binary: it lowers the process's open-files limit.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kip::http;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn count(&self, what: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).matches(what).count()
    }
}

/// Descriptors open now (the listing's own, counted while it reads, excluded).
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count() as u64 - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_server_backs_off_and_recovers() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).init();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router: http::Router = Arc::new(|_| http::text(hyper::StatusCode::OK, "ok\n"));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(http::serve(listener, router, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;

    // One descriptor left: the client's socket takes it, and the server's accept gets EMFILE
    // (the connection waits, complete, in the backlog).
    let limit = getrlimit(Resource::Nofile);
    setrlimit(Resource::Nofile, Rlimit { current: Some(open_fds() + 1), maximum: limit.maximum }).unwrap();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failures = log.count("accepting a connection failed");
    setrlimit(Resource::Nofile, limit).unwrap();

    let logged = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    assert!(failures >= 2, "the accept failed and was tried again: {logged}");
    // 10 ms doubling to 1 s: about 7 tries in a second; a loop without a delay makes thousands.
    assert!(failures <= 20, "{failures} accept errors logged in a second: the loop spins");
    assert!(logged.contains("Too many open files"), "{logged}");

    // Descriptors free again: the waiting connection is served.
    client.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    shutdown.cancel();
    server.await.unwrap();
}
