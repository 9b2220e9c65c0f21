//! `kip-agent` entry point: parse the command line, connect to the runtime, then either
//! cache everything once (`--once`) or keep doing it until SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use kip_agent::agent::{self, Agent, Runtime};
use kip_agent::cli::{Cli, LogFormat};
use kip_agent::http::{self, Readiness};
use kip_agent::metrics::Metrics;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kip-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = kip_agent::cri::find_socket(cli.cri_socket.as_deref())?;
    let rt = Runtime::connect(&socket).await?;
    tracing::info!(socket = %socket.display(), runtime = %rt.info.name, version = %rt.info.version, images = cli.images.len(), "connected to the runtime");
    if rt.pinner.is_none() {
        tracing::warn!(runtime = %rt.info.name, "no pinning API for this runtime; images are kept by pulling them again when they disappear");
    }
    let policy = cli.policy();

    if cli.once {
        let outcomes = agent::run_once(&rt, &cli.images, cli.pull_secrets_dir.as_deref(), &policy).await;
        return Ok(print_summary(&outcomes));
    }

    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::starting();
    let listener = tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("cannot listen on {} (--listen)", cli.listen))?;
    tracing::info!(addr = %cli.listen, "serving /metrics, /healthz, /readyz");
    let server = tokio::spawn(kip::http::serve(listener, http::router(metrics.clone(), ready.clone()), shutdown.clone()));

    let mut agent = Agent::new(rt, cli.images.clone(), policy, metrics, ready);
    agent.secrets_dir = cli.pull_secrets_dir.clone();
    agent.remove_unlisted = cli.remove_unlisted;
    let worker = tokio::spawn(agent.run(shutdown.clone()));

    wait_for_signal().await?;
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = tokio::join!(worker, server);
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn print_summary(outcomes: &[agent::OnceOutcome]) -> ExitCode {
    println!("{:<20} {:<8} {:<8} {:<73} IMAGE", "NAME", "CACHED", "PINNED", "DIGEST");
    for o in outcomes {
        let (cached, pinned, digest) = match &o.result {
            Ok(obs) => (obs.present, obs.pinned, obs.digest.clone().unwrap_or_default()),
            Err(_) => (false, false, String::new()),
        };
        println!("{:<20} {:<8} {:<8} {:<73} {}", o.entry.name, yes_no(cached), yes_no(pinned), digest, o.entry.image);
    }
    let failures: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match &o.result {
            Err(e) => Some(format!("image `{}` ({}): {e}", o.entry.name, o.entry.image)),
            Ok(obs) if !obs.pinned => Some(format!("image `{}` ({}): cached but not pinned (the runtime has no pinning API)", o.entry.name, o.entry.image)),
            Ok(_) => None,
        })
        .collect();
    for f in &failures {
        eprintln!("kip-agent: error: {f}");
    }
    println!("{} of {} images cached and pinned", outcomes.len() - failures.len(), outcomes.len());
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
