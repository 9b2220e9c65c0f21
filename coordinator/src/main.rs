//! `kip-coordinator` entry point: validate the configuration (exit non-zero naming the bad
//! variable), then serve the gRPC API and the HTTP endpoints until SIGTERM/SIGINT.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kip::http;
use kip::process::{init_logging, wait_for_signal, LogFormat, Supervised};
use kip_coordinator::auth::{AgentAuth, AuthMode, ServiceAccount, TokenVerifier};
use kip_coordinator::reload::{ConfigMapWatch, ConfigReloader};
use kip_coordinator::{
    config, controller, grpc::CoordinatorService, imageset, leader, metrics::Metrics, state::State, wait_release,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "kip-coordinator",
    version,
    about = "Validates the KIP configuration and publishes the image list to kip agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Directory with one file per configuration key (a mounted ConfigMap); watched for changes.
    /// Keys without a file are read from the environment.
    #[arg(long, env = "KIP_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Address of the gRPC API agents connect to
    #[arg(long, env = "KIP_GRPC_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:50051")]
    grpc_listen: SocketAddr,

    /// Most gRPC connections served at once (one per agent, a few for `wait-release`); more wait
    /// in the kernel's backlog. Above the cluster's node count.
    #[arg(long, env = "KIP_GRPC_MAX_CONNECTIONS", value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    grpc_max_connections: u32,

    /// Address of the HTTP server for /metrics, /healthz, /readyz and /status
    #[arg(long, env = "KIP_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,

    /// How often the config directory is re-read even without a change event
    #[arg(long, env = "KIP_CONFIG_RESYNC", value_name = "DURATION", default_value = "30s", value_parser = kip::duration::bounded("KIP_CONFIG_RESYNC", kip::duration::SECOND, kip::duration::DAY))]
    config_resync: Duration,

    /// How long a node keeps the agent label after its agent stopped reporting (auto mode)
    #[arg(long, env = "KIP_NODE_LABEL_GRACE", value_name = "DURATION", default_value = "5m", value_parser = kip::duration::bounded("KIP_NODE_LABEL_GRACE", kip::duration::SECOND, kip::duration::DAY))]
    node_label_grace: Duration,

    /// The coordinator's own Deployment: owner of the fallback DaemonSet and subject of Events
    #[arg(long, env = "DEPLOYMENT_NAME", value_name = "NAME")]
    deployment_name: Option<String>,

    /// The coordinator's namespace (downward API metadata.namespace)
    #[arg(long, env = "POD_NAMESPACE", value_name = "NAMESPACE")]
    pod_namespace: Option<String>,

    /// The ConfigMap in the coordinator's namespace to follow through the API (changes apply
    /// within a second; --config-dir is followed until the API answers). Its companion
    /// NAME-release (the uninstall hook's) may set KIP_RELEASE.
    #[arg(long, env = "KIP_CONFIG_MAP", value_name = "NAME")]
    config_map: Option<String>,

    /// How long a release (KIP_RELEASE) waits for agents to confirm before node labels go anyway
    #[arg(long, env = "KIP_RELEASE_TIMEOUT", value_name = "DURATION", default_value = "2m", value_parser = kip::duration::bounded("KIP_RELEASE_TIMEOUT", kip::duration::SECOND, kip::duration::DAY))]
    release_timeout: Duration,

    /// The startup gate: kip removes this taint from a node once its images are cached there (the
    /// node pool registers nodes with it; kip never adds it). KEY[=VALUE]:EFFECT; empty: no gate
    #[arg(long, env = "KIP_GATE_TAINT", value_name = "TAINT", default_value = kip_coordinator::gate::DEFAULT_GATE_TAINT, value_parser = clap::value_parser!(kip_coordinator::gate::GateSetting))]
    gate_taint: kip_coordinator::gate::GateSetting,

    /// How long after its creation a gated node goes into service even unverified
    #[arg(long, env = "KIP_GATE_TIMEOUT", value_name = "DURATION", default_value = "15m", value_parser = kip::duration::bounded("KIP_GATE_TIMEOUT", kip::duration::SECOND, 7 * kip::duration::DAY))]
    gate_timeout: Duration,

    /// How agents are authenticated: `tokenreview` verifies each call's ServiceAccount token with
    /// the API server and binds it to the token's node (refusing calls while it cannot verify);
    /// `none` accepts every call (outside Kubernetes only: the demo, tests on loopback)
    #[arg(long, env = "KIP_AGENT_AUTH", value_enum, default_value = "tokenreview")]
    agent_auth: AuthMode,

    /// The agents' ServiceAccount, NAMESPACE:NAME (required with --agent-auth tokenreview)
    #[arg(long, env = "KIP_AGENT_SERVICE_ACCOUNT", value_name = "NAMESPACE:NAME")]
    agent_service_account: Option<ServiceAccount>,

    /// The audience of the agents' projected tokens
    #[arg(long, env = "KIP_AGENT_AUDIENCE", value_name = "AUDIENCE", default_value = kip_coordinator::auth::DEFAULT_AUDIENCE)]
    agent_audience: String,

    /// Resolve listed tags to digests with a registry HEAD (agents then pull only where their
    /// node's digest differs). `false` for clusters whose registries the coordinator cannot reach
    /// (agents then refresh every tag on their own interval)
    #[arg(long, env = "KIP_RESOLVE_TAGS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    resolve_tags: bool,

    /// Pull secrets mounted as directories (`DIR/<secret>/.dockerconfigjson`): the credentials
    /// for the HEADs, the same secrets the agents pull with (IMAGE_PULL_SECRETS)
    #[arg(long, env = "KIP_PULL_SECRETS_DIR", value_name = "DIR")]
    pull_secrets_dir: Option<PathBuf>,

    /// Registries (`host:port`, comma-separated) the coordinator talks plain HTTP to, as the nodes
    /// do through their runtime's mirror configuration
    #[arg(long, env = "KIP_PLAIN_HTTP_REGISTRIES", value_name = "HOST:PORT,...", value_delimiter = ',')]
    plain_http_registries: Vec<String>,

    /// Leader election: the coordination.k8s.io Lease (in the coordinator's namespace) the
    /// replicas take turns on; only its holder grants pull leases and writes to the cluster, the
    /// others serve the list read-only. Empty: no election (outside Kubernetes, the demo)
    #[arg(long, env = "KIP_LEADER_LEASE", value_name = "NAME", default_value = "")]
    leader_lease: String,

    /// This replica's identity in the election (downward API metadata.name)
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pod_name: Option<String>,

    /// With more than one replica: the Service (without a selector) whose EndpointSlice the
    /// leader points at itself, so agents reach the leader only. Empty: the Service selects
    #[arg(long, env = "KIP_LEADER_SERVICE", value_name = "NAME", default_value = "")]
    leader_service: String,

    /// This pod's address (downward API status.podIP), for --leader-service
    #[arg(long, env = "POD_IP", value_name = "IP")]
    pod_ip: Option<std::net::IpAddr>,

    /// Image sets: follow the ImageSet custom resources (kip.eclipse.dev/v1alpha1) and send each
    /// agent its node's list: the KIP ConfigMap's images and those of every set selecting the node
    #[arg(long, env = "KIP_IMAGE_SETS", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    image_sets: bool,

    /// With --image-sets: read the KIP operator's KubernetesImagePuller resources (che.eclipse.org,
    /// what Eclipse Che's imagePuller.enable creates) as sets; kip never writes them
    #[arg(long, env = "KIP_KUBERNETES_IMAGE_PULLER", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    kubernetes_image_puller: bool,

    /// Namespaces whose ImageSets are used (comma-separated; empty: every namespace)
    #[arg(long, env = "KIP_IMAGE_SET_NAMESPACES", value_name = "NS,...", value_delimiter = ',')]
    image_set_namespaces: Vec<String>,

    /// How many images all ImageSets may list together; a set that would go over is not used
    /// (its status says so)
    #[arg(long, env = "KIP_IMAGE_SET_MAX_IMAGES", value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    image_set_max_images: u32,

    /// With --image-sets: each set in use gets a fallback DaemonSet of its own (the KIP
    /// sleep-container layout, its images, on its nodes that have no agent in auto mode); needs
    /// DaemonSet rights in the coordinator's namespace beyond the one fallback DaemonSet's name
    #[arg(long, env = "KIP_IMAGE_SET_FALLBACK", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    image_set_fallback: bool,

    /// With --image-sets: the Secret in the coordinator's namespace into which the leader copies
    /// the sets' imagePullSecrets (the agents mount it); unset, sets' pull secrets are not used
    /// (their status says so)
    #[arg(long, env = "KIP_SET_PULL_SECRETS", value_name = "NAME")]
    set_pull_secrets: Option<String>,

    /// Validate the configuration, print a summary and exit (0 when valid)
    #[arg(long)]
    check_config: bool,

    /// Log format
    #[arg(long, env = "KIP_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Wait until a release (KIP_RELEASE) is done, then print what was cleaned and what was not
    /// (the chart's pre-delete hook runs this). Exits 0 unless --strict and something is left.
    WaitRelease {
        /// The coordinator's /status URL
        #[arg(long, env = "KIP_STATUS_URL", value_name = "URL", default_value = "http://127.0.0.1:8080/status")]
        status_url: String,
        /// Give up after this long (the uninstall goes on)
        #[arg(long, value_name = "DURATION", default_value = "3m", value_parser = kip::duration::bounded("--timeout", kip::duration::SECOND, kip::duration::DAY))]
        timeout: Duration,
        /// Exit 1 when anything was left behind
        #[arg(long)]
        strict: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One TLS provider for every client (the registry client's and kube's): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(Command::WaitRelease { status_url, timeout, strict }) = &cli.command {
        return wait_release(status_url, *timeout, *strict).await;
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kip-coordinator: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_release(status_url: &str, timeout: Duration, strict: bool) -> ExitCode {
    let o = wait_release::wait(status_url, timeout, Duration::from_secs(1)).await;
    println!("released nodes ({}): {}", o.released.len(), o.released.join(", "));
    if !o.cluster.is_empty() {
        println!("cluster: {}", o.cluster);
    }
    if o.done && o.incomplete.is_empty() {
        println!("release complete: no pin, state file, node label or DaemonSet of kip's is left");
        return ExitCode::SUCCESS;
    }
    for line in &o.incomplete {
        println!("left behind: {line}");
    }
    if strict {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The leader election as the command line asks for it (`None`: none).
fn election(cli: &Cli) -> anyhow::Result<Option<leader::Election>> {
    if cli.leader_lease.is_empty() {
        return Ok(None);
    }
    let (Some(namespace), Some(identity)) = (cli.pod_namespace.clone(), cli.pod_name.clone()) else {
        anyhow::bail!(
            "--leader-lease (KIP_LEADER_LEASE) needs --pod-namespace (POD_NAMESPACE) and --pod-name (POD_NAME)"
        );
    };
    let endpoints = match (cli.leader_service.as_str(), cli.pod_ip) {
        ("", _) => None,
        (service, Some(pod_ip)) => Some(leader::Endpoints {
            service: service.to_string(),
            pod_ip,
            ports: vec![("grpc".into(), cli.grpc_listen.port()), ("metrics".into(), cli.listen.port())],
        }),
        (_, None) => anyhow::bail!("--leader-service (KIP_LEADER_SERVICE) needs --pod-ip (POD_IP)"),
    };
    Ok(Some(leader::Election { lease: cli.leader_lease.clone(), namespace, identity, endpoints }))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let raw = config::read_sources(cli.config_dir.as_deref(), &env)?;
    let config = config::validate(&raw)?;
    if cli.check_config {
        println!(
            "configuration valid: {} images, mode {}, DaemonSet {}/{}: {}{}",
            config.images.len(),
            config.mode.as_str(),
            config.namespace,
            config.daemonset_name,
            config.images,
            match config.release {
                kip::v1::Release::None => String::new(),
                r => format!(" (KIP_RELEASE: {})", config::release_name(r)),
            }
        );
        return Ok(());
    }
    tracing::info!(images = config.images.len(), list = %config.images, "configuration valid");

    // The verifier gets the API client once it is reached; until then agent calls are refused.
    let (api_client, api_client_rx) = tokio::sync::watch::channel(None::<kube::Client>);
    let auth = match (cli.agent_auth, cli.agent_service_account.clone()) {
        (AuthMode::None, _) => {
            tracing::warn!("--agent-auth none: any caller may report as any node (use only outside Kubernetes)");
            AgentAuth::None
        }
        (AuthMode::Tokenreview, Some(sa)) => {
            tracing::info!(service_account = %sa.username(), audience = %cli.agent_audience, "agents authenticate with ServiceAccount tokens (TokenReview)");
            AgentAuth::TokenReview(TokenVerifier::new(api_client_rx, sa, cli.agent_audience.clone()))
        }
        (AuthMode::Tokenreview, None) => anyhow::bail!(
            "--agent-auth tokenreview needs the agents' ServiceAccount: --agent-service-account NAMESPACE:NAME (KIP_AGENT_SERVICE_ACCOUNT); outside Kubernetes give --agent-auth none"
        ),
    };
    let auth = Arc::new(auth);
    let metrics = Arc::new(Metrics::new());
    let hub = State::with_release_timeout(config, metrics.clone(), cli.release_timeout);
    if cli.image_sets {
        // Lists are per node from the first stream on.
        hub.use_image_sets();
    }
    let set_limits = kip_coordinator::imageset::sets::Limits {
        namespaces: Some(
            cli.image_set_namespaces.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
        )
        .filter(|n: &std::collections::BTreeSet<String>| !n.is_empty()),
        max_images: cli.image_set_max_images as usize,
    };
    let election = election(&cli)?;
    if election.is_some() {
        // A follower until the Lease is taken: no pull lease is granted before.
        hub.set_leading(false);
    }
    let shutdown = CancellationToken::new();

    let grpc_listener = tokio::net::TcpListener::bind(cli.grpc_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--grpc-listen)", cli.grpc_listen))?;
    let http_listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cli.listen))?;
    tracing::info!(grpc = %cli.grpc_listen, http = %cli.listen, "serving");

    let mut tasks = Supervised::new();
    let heartbeat = kip::process::Heartbeat::default();
    {
        let service = kip::v1::coordinator_server::CoordinatorServer::new(CoordinatorService::new(
            hub.clone(),
            auth.clone(),
            shutdown.clone(),
        ));
        let shutdown = shutdown.clone();
        tasks.spawn_fallible(
            "the gRPC server",
            tonic::transport::Server::builder()
                // Notice agents that vanished without closing their stream.
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(service)
                .serve_with_incoming_shutdown(
                    kip::listen::Listener::new(grpc_listener, cli.grpc_max_connections as usize, "gRPC").incoming(),
                    async move { shutdown.cancelled().await },
                ),
        );
    }
    let router: http::Router = {
        let (hub, heartbeat) = (hub.clone(), heartbeat.clone());
        Arc::new(move |path| match path {
            "/metrics" => http::openmetrics(hub.render_metrics()),
            "/healthz" => http::health(heartbeat.check()),
            // A valid list is published from the start (an invalid one stops start-up).
            "/readyz" => http::readiness(None),
            "/status" => http::json(hyper::StatusCode::OK, format!("{:#}\n", hub.status_json())),
            _ => http::not_found(),
        })
    };
    tasks.spawn("the HTTP server", http::serve(http_listener, router, shutdown.clone()));
    if cli.resolve_tags {
        let resolver = Arc::new(kip_coordinator::resolve::Resolver::new(
            cli.plain_http_registries.clone(),
            cli.pull_secrets_dir.clone(),
            metrics.clone(),
        ));
        tasks.spawn("the tag resolver", resolver.run(hub.clone(), shutdown.clone()));
    } else {
        tracing::info!("--resolve-tags false: agents refresh every tag on their own interval");
    }
    let api_active = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config_map = match (cli.config_map.clone(), cli.pod_namespace.clone()) {
        (Some(name), Some(namespace)) => {
            Some(ConfigMapWatch { namespace, name, env: env.clone(), api_active: api_active.clone() })
        }
        (Some(_), None) => anyhow::bail!("--config-map (KIP_CONFIG_MAP) needs --pod-namespace (POD_NAMESPACE)"),
        (None, _) => None,
    };
    if let Some(dir) = cli.config_dir.clone() {
        let mut r = ConfigReloader::new(dir, env, hub.clone(), raw);
        r.resync_interval = cli.config_resync;
        r.api_active = api_active;
        tasks.spawn("the config directory reloader", r.run(shutdown.clone()));
    }

    // Everything that needs the Kubernetes API; without one (the demo, a laptop) it keeps
    // trying while the list is published regardless.
    let deployment = cli.deployment_name.clone().zip(cli.pod_namespace.clone()).map(|(name, ns)| (ns, name));
    {
        let settings = controller::Settings {
            gate: cli.gate_taint.0.clone(),
            gate_timeout: cli.gate_timeout,
            heartbeat,
            set_fallbacks: cli.image_set_fallback,
            ..controller::Settings::new(cli.node_label_grace)
        };
        let (hub, shutdown, image_sets, pullers) =
            (hub.clone(), shutdown.clone(), cli.image_sets, cli.kubernetes_image_puller);
        let set_secret_copy = match (cli.set_pull_secrets.clone(), cli.pod_namespace.clone()) {
            (Some(name), Some(namespace)) => Some(imageset::secrets::Copy { namespace, name }),
            (Some(_), None) => {
                anyhow::bail!("--set-pull-secrets (KIP_SET_PULL_SECRETS) needs --pod-namespace (POD_NAMESPACE)")
            }
            (None, _) => None,
        };
        tasks.spawn("the Kubernetes controller", async move {
            let work = async {
                let client = kip_coordinator::connect_kube().await;
                api_client.send_replace(Some(client.clone()));
                let watch = async {
                    match config_map {
                        Some(w) => w.run(client.clone(), hub.clone(), shutdown.clone()).await,
                        None => std::future::pending().await,
                    }
                };
                // Every replica follows the nodes (and the image sets): followers serve lists too.
                let (nodes, node_task) = kip_coordinator::watches::watch_nodes(client.clone());
                hub.attach_nodes(nodes.clone());
                let image_sets = async {
                    if !image_sets {
                        return std::future::pending().await;
                    }
                    use imageset::controller::served;
                    let own = served(&client, imageset::GROUP, imageset::VERSION, "imagesets").await;
                    let operator = pullers
                        && served(&client, imageset::puller::GROUP, imageset::puller::VERSION, "kubernetesimagepullers").await;
                    if !own {
                        tracing::warn!("the ImageSet CRD is not installed: no ImageSet is used (install the CRD and restart the coordinator to use them)");
                    }
                    if pullers && !operator {
                        tracing::warn!("the KIP operator's KubernetesImagePuller CRD is not installed: none is read");
                    }
                    let (sets, set_task) = if own {
                        let (view, task) = kip_coordinator::watches::watch_image_sets(client.clone());
                        (Some(view), Box::pin(task) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>)
                    } else {
                        (None, Box::pin(std::future::pending()) as _)
                    };
                    let (puller_view, puller_task) = if operator {
                        let (view, task) = kip_coordinator::watches::watch_pullers(client.clone());
                        (Some(view), Box::pin(task) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>)
                    } else {
                        (None, Box::pin(std::future::pending()) as _)
                    };
                    let follow =
                        imageset::controller::follow(hub.clone(), sets.clone(), puller_view, nodes.clone(), set_limits);
                    let status = async {
                        let Some(sets) = sets else { return std::future::pending().await };
                        hub.until_leading().await;
                        imageset::controller::write_status(client.clone(), hub.clone(), sets, nodes.clone(), shutdown.clone())
                            .await
                    };
                    let pull_secrets = async {
                        hub.until_leading().await;
                        imageset::secrets::run(client.clone(), hub.clone(), set_secret_copy, shutdown.clone()).await
                    };
                    tokio::join!(set_task, puller_task, follow, status, pull_secrets);
                };
                let controllers = async {
                    // Only the leader writes to the cluster (without an election, this one).
                    hub.until_leading().await;
                    Box::pin(controller::start(
                        client.clone(),
                        hub.clone(),
                        nodes.clone(),
                        deployment,
                        settings,
                        shutdown.clone(),
                    ))
                    .await
                };
                tokio::select! {
                    _ = node_task => tracing::error!("the node watch ended"),
                    _ = async { tokio::join!(watch, Box::pin(image_sets), controllers) } => {}
                }
            };
            controller::until_shutdown(&shutdown, work).await;
        });
    }

    if let Some(election) = election {
        let (hub, shutdown) = (hub.clone(), shutdown.clone());
        tasks.spawn_fallible("the leader election", async move {
            let config =
                kip_coordinator::retry_forever("reading the Kubernetes client configuration (leader election)", || {
                    kube::Config::infer()
                })
                .await;
            let client = leader::client(config)?;
            leader::run(client, election, hub, shutdown).await?;
            anyhow::Ok(())
        });
    }

    tokio::select! {
        signal = wait_for_signal() => signal.context("installing the SIGTERM/SIGINT handlers")?,
        (task, how) = tasks.first_end() => {
            // The coordinator cannot work without it: stop, and let the kubelet restart us.
            tracing::error!(task, how, "a task ended unexpectedly; exiting so the coordinator is restarted");
            shutdown.cancel();
            tasks.wait_all(Duration::from_secs(20)).await;
            anyhow::bail!("{task} {how}");
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    tasks.wait_all(Duration::from_secs(20)).await;
    Ok(())
}
