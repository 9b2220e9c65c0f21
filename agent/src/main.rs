//! `kip-agent` entry point: parse the command line, connect to the runtime, then either
//! cache everything once (`--once`) or keep doing it until SIGTERM/SIGINT.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use kip::process::{init_logging, wait_for_signal, Supervised};
use kip_agent::agent::{self, Agent, ListSource};
use kip_agent::cli::Cli;
use kip_agent::follow;
use kip_agent::http::{self, Readiness};
use kip_agent::metrics::Metrics;
use kip_agent::runtime::{NodeRuntime, Runtime as _};
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

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let policy = cli.policy();
    if cli.once {
        let images = cli.images.clone().context("--once needs --images")?;
        let rt = connect_runtime(&cli).await?;
        let outcomes = agent::run_once(&rt, &images, &cli.pull_secrets(), &policy).await;
        return Ok(print_summary(&outcomes, rt.pin_problem()));
    }

    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::starting();
    let heartbeat = kip::process::Heartbeat::default();
    let mut tasks = Supervised::new();
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cli.listen))?;
    tracing::info!(addr = %cli.listen, "serving /metrics, /healthz, /readyz");
    tasks.spawn(
        "the HTTP server",
        kip::http::serve(listener, http::router(metrics.clone(), ready.clone(), heartbeat.clone()), shutdown.clone()),
    );

    let mut list_rx = None;
    let state_file = cli.state_dir.join(follow::STATE_FILE);
    let mut lease = None;
    let (source, reports) = match (&cli.coordinator, &cli.images) {
        (Some(url), _) => {
            let node = cli.node_name.clone().context("--node-name (NODE_NAME) is required with --coordinator")?;
            let channel = follow::coordinator_channel(url)
                .with_context(|| format!("--coordinator `{url}` is not a usable URL"))?;
            let initial = match follow::load_state(&cli.state_dir) {
                Ok(Some(saved)) => {
                    tracing::info!(
                        generation = saved.generation,
                        images = saved.list.len(),
                        "working with the list saved in the state directory until the coordinator answers"
                    );
                    Some(saved)
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring the saved list");
                    None
                }
            };
            let (updates, updates_rx) = tokio::sync::watch::channel(initial);
            list_rx = Some(updates_rx.clone());
            let connected = Arc::new(tokio::sync::Notify::new());
            let token = follow::BearerToken { file: cli.token_file.clone() };
            let follower = follow::Follower {
                channel: channel.clone(),
                token: token.clone(),
                url: url.clone(),
                node_name: node.clone(),
                state_dir: cli.state_dir.clone(),
                updates,
                connected: connected.clone(),
            };
            tasks.spawn("the list follower", follower.run(shutdown.clone()));
            let (report_tx, report_rx) = tokio::sync::watch::channel(kip::v1::NodeReport::default());
            let (handle, lease_task) = kip_agent::lease::LeaseClient {
                channel: channel.clone(),
                token: token.clone(),
                node: node.clone(),
                timeout: cli.lease_timeout,
                metrics: metrics.clone(),
            }
            .start(shutdown.clone());
            lease = Some(handle);
            tasks.spawn("the pull lease client", lease_task);
            tasks.spawn("the reporter", follow::report_changes(channel, token, report_rx, connected, shutdown.clone()));
            (ListSource::Coordinator(updates_rx), Some((node, report_tx)))
        }
        (None, Some(images)) => (ListSource::Fixed(images.clone()), None),
        (None, None) => anyhow::bail!("give --images or --coordinator"),
    };

    // With a coordinator, a node without a usable runtime is reported (the coordinator falls
    // back to the sleep DaemonSet there) and the agent keeps trying; standalone, it is an error.
    let rt = loop {
        match connect_runtime(&cli).await {
            Ok(rt) => break rt,
            Err(e) => {
                let (Some((node, tx)), Some(rx)) = (&reports, list_rx.as_mut()) else { return Err(e) };
                let transient = e.downcast_ref::<kip_agent::cri::CriError>().is_some_and(|e| e.is_transient());
                tracing::warn!(error = %e, transient, "no usable runtime; reporting it and retrying in 30s");
                ready.set(Some(format!("{e}")));
                // Without a runtime kip pinned nothing here: a release only takes the state file.
                let releasing = rx.borrow_and_update().as_ref().is_some_and(|u| u.release != kip::v1::Release::None);
                let release = releasing.then(|| follow::remove_state(&state_file));
                tx.send_replace(kip::v1::NodeReport {
                    node_name: node.clone(),
                    runtime: Some(kip::v1::RuntimeState {
                        available: false,
                        error: format!("{e:#}"),
                        not_answering: transient,
                        ..Default::default()
                    }),
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    released: matches!(release, Some(Ok(()))),
                    release_error: match release {
                        Some(Err(e)) => e.to_string(),
                        _ => String::new(),
                    },
                    ..Default::default()
                });
                tokio::select! {
                    _ = wait_for_signal() => {
                        shutdown.cancel();
                        tasks.wait_all(SHUTDOWN_GRACE).await;
                        return Ok(ExitCode::SUCCESS);
                    }
                    (task, how) = tasks.first_end() => return Ok(ended_unexpectedly(task, &how, &shutdown, tasks).await),
                    Ok(()) = rx.changed() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                }
            }
        }
    };

    let mut agent = Agent::new(rt, source, policy, metrics, ready);
    agent.secrets = cli.pull_secrets();
    agent.remove_unlisted = cli.remove_unlisted;
    if cli.coordinator.is_some() {
        agent.state_file = Some(state_file);
    }
    agent.reports = reports;
    agent.lease = lease;
    agent.heartbeat = heartbeat;
    tasks.spawn("the image worker", agent.run(shutdown.clone()));

    tokio::select! {
        signal = wait_for_signal() => signal.context("installing the SIGTERM/SIGINT handlers")?,
        (task, how) = tasks.first_end() => return Ok(ended_unexpectedly(task, &how, &shutdown, tasks).await),
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    tasks.wait_all(SHUTDOWN_GRACE).await;
    Ok(ExitCode::SUCCESS)
}

/// How long the tasks get to finish after SIGTERM (the pod's grace period is 30 s).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// A task the agent cannot work without ended: stop the rest and exit non-zero, so the kubelet
/// restarts the agent instead of it living on half-dead.
async fn ended_unexpectedly(task: &str, how: &str, shutdown: &CancellationToken, tasks: Supervised) -> ExitCode {
    tracing::error!(task, how, "a task ended unexpectedly; exiting so the agent is restarted");
    eprintln!("kip-agent: error: {task} {how}");
    shutdown.cancel();
    tasks.wait_all(SHUTDOWN_GRACE).await;
    ExitCode::FAILURE
}

async fn connect_runtime(cli: &Cli) -> anyhow::Result<NodeRuntime> {
    let socket = kip_agent::cri::find_socket(cli.cri_socket.as_deref(), &cli.host_prefix)?;
    let rt = NodeRuntime::connect(&socket, &cli.crio_paths(), cli.runtime_timeout).await?;
    tracing::info!(socket = %socket.display(), runtime = %rt.info().name, version = %rt.info().version, "connected to the runtime");
    if let Some(problem) = rt.pin_problem() {
        tracing::warn!(runtime = %rt.info().name, problem, "images are kept by pulling them again when they disappear");
    }
    Ok(rt)
}

fn print_summary(outcomes: &[agent::OnceOutcome], pin_problem: Option<String>) -> ExitCode {
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
            Ok(obs) if !obs.pinned => Some(format!(
                "image `{}` ({}): cached but not pinned ({})",
                o.entry.name,
                o.entry.image,
                pin_problem.as_deref().unwrap_or("the runtime does not report the pin")
            )),
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
