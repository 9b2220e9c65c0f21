//! Command line and environment of `kip-agent`. Every flag has an environment variable,
//! as a DaemonSet sets them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
pub use kip::process::LogFormat;

use kip::duration::{bounded, CHECK_INTERVAL, HOUR, MINUTE, PULL_TIMEOUT, REFRESH_INTERVAL, SECOND};
use kip::images::ImageList;

use crate::reconcile::Policy;

#[derive(Debug, Parser)]
#[command(
    name = "kip-agent",
    version,
    about = "Keeps a list of container images cached and pinned on this node through its CRI socket"
)]
#[command(group(clap::ArgGroup::new("list-source").args(["images", "coordinator"]).required(true)))]
pub struct Cli {
    /// The runtime's CRI socket [default: the first that exists of /run/containerd/containerd.sock,
    /// /run/k3s/containerd/containerd.sock, /run/crio/crio.sock, /var/run/crio/crio.sock, under --host-prefix]
    #[arg(long, env = "KIP_CRI_SOCKET", value_name = "PATH")]
    pub cri_socket: Option<PathBuf>,

    /// Where the node's filesystem appears in the agent's container, for finding the socket
    /// (the chart mounts the node's /run at /host/run and sets /host)
    #[arg(long, env = "KIP_HOST_PREFIX", value_name = "DIR", default_value = "/")]
    pub host_prefix: PathBuf,

    /// Images to keep, in KIP syntax: `name=image;name=image;` (standalone use)
    #[arg(long, env = "IMAGES", value_name = "LIST", value_parser = parse_images)]
    pub images: Option<ImageList>,

    /// The coordinator's gRPC URL (e.g. http://kip-coordinator:50051): follow its image list
    #[arg(long, env = "KIP_COORDINATOR", value_name = "URL", conflicts_with = "once")]
    pub coordinator: Option<String>,

    /// This node's name, as the coordinator knows it (the downward API's spec.nodeName)
    #[arg(long, env = "NODE_NAME", value_name = "NAME", required_if_eq_any = [("coordinator", "*")])]
    pub node_name: Option<String>,

    /// A file with this pod's ServiceAccount token for the coordinator (a projected token with
    /// audience kip; re-read for every call, as the kubelet rotates it)
    #[arg(long, env = "KIP_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Where the last list from the coordinator is kept, so a restart without the coordinator keeps the images
    #[arg(long, env = "KIP_STATE_DIR", value_name = "DIR", default_value = "/var/lib/kip")]
    pub state_dir: PathBuf,

    /// Address of the HTTP server for /metrics, /healthz and /readyz
    #[arg(long, env = "KIP_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Directory of mounted pull secrets (DIR/<secret>/.dockerconfigjson, config.json or .dockercfg)
    #[arg(long, env = "KIP_PULL_SECRETS_DIR", value_name = "DIR")]
    pub pull_secrets_dir: Option<PathBuf>,

    /// Directory of the coordinator's copy of the image sets' pull secrets (DIR/<namespace>.<secret>,
    /// a mounted Secret the coordinator writes)
    #[arg(long, env = "KIP_SET_PULL_SECRETS_DIR", value_name = "DIR")]
    pub set_pull_secrets_dir: Option<PathBuf>,

    /// How many pulls may run at once
    #[arg(long, env = "KIP_MAX_PARALLEL_PULLS", value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_parallel_pulls: u16,

    /// Time limit of one pull (e.g. 90s, 5m, 1h30m)
    #[arg(long, env = "KIP_PULL_TIMEOUT", value_name = "DURATION", default_value = "30m", value_parser = bounded("KIP_PULL_TIMEOUT", PULL_TIMEOUT.0, PULL_TIMEOUT.1))]
    pub pull_timeout: Duration,

    /// Deadline of every other runtime call (list, status, remove, labels): past it the runtime
    /// counts as not answering (kip_cri_up 0, /readyz 503, retried with backoff)
    #[arg(long, env = "KIP_RUNTIME_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = bounded("KIP_RUNTIME_TIMEOUT", SECOND, 10 * MINUTE))]
    pub runtime_timeout: Duration,

    /// How long to wait for a pull lease while the coordinator does not answer before pulling on
    /// this agent's own limits (a coordinator that answers "not yet" is waited for)
    #[arg(long, env = "KIP_LEASE_TIMEOUT", value_name = "DURATION", default_value = "1m", value_parser = bounded("KIP_LEASE_TIMEOUT", SECOND, HOUR))]
    pub lease_timeout: Duration,

    /// How often to verify that the images are still there
    #[arg(long, env = "KIP_CHECK_INTERVAL", value_name = "DURATION", default_value = "60s", value_parser = bounded("KIP_CHECK_INTERVAL", CHECK_INTERVAL.0, CHECK_INTERVAL.1))]
    pub check_interval: Duration,

    /// How often tags are pulled again so a moved tag is noticed [default: CACHING_INTERVAL_HOURS hours, else 1h]
    #[arg(long, env = "KIP_REFRESH_INTERVAL", value_name = "DURATION", value_parser = bounded("KIP_REFRESH_INTERVAL", REFRESH_INTERVAL.0, REFRESH_INTERVAL.1))]
    pub refresh_interval: Option<Duration>,

    /// KIP's refresh interval in hours, used when --refresh-interval is not given (at most 30 days)
    #[arg(long, env = "CACHING_INTERVAL_HOURS", value_name = "HOURS", hide = true, value_parser = clap::value_parser!(u32).range(1..=i64::from(kip::duration::MAX_CACHING_INTERVAL_HOURS)))]
    pub caching_interval_hours: Option<u32>,

    /// CRI-O's main configuration file (read for the admin's own pinned_images)
    #[arg(long, env = "KIP_CRIO_CONFIG", value_name = "FILE", default_value = "/etc/crio/crio.conf")]
    pub crio_config: PathBuf,

    /// CRI-O's drop-in directory: kip writes its pinned_images drop-in here
    #[arg(long, env = "KIP_CRIO_CONFIG_DIR", value_name = "DIR", default_value = "/etc/crio/crio.conf.d")]
    pub crio_config_dir: PathBuf,

    /// Also delete (not only unpin) images kip pinned that left the list
    #[arg(long, env = "KIP_REMOVE_UNLISTED")]
    pub remove_unlisted: bool,

    /// Cache and pin everything once, print a summary, and exit (0 only if all succeeded)
    #[arg(long)]
    pub once: bool,

    /// Log format
    #[arg(long, env = "KIP_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Cli {
    /// Where the agent finds registry credentials.
    pub fn pull_secrets(&self) -> crate::agent::PullSecrets {
        crate::agent::PullSecrets { dir: self.pull_secrets_dir.clone(), sets_dir: self.set_pull_secrets_dir.clone() }
    }

    pub fn crio_paths(&self) -> crate::runtime::CrioPaths {
        crate::runtime::CrioPaths { config: self.crio_config.clone(), config_dir: self.crio_config_dir.clone() }
    }

    pub fn policy(&self) -> Policy {
        let refresh = self
            .refresh_interval
            .or(self.caching_interval_hours.map(|h| Duration::from_secs(u64::from(h) * 3600)))
            .unwrap_or(Duration::from_secs(3600));
        Policy {
            max_parallel_pulls: usize::from(self.max_parallel_pulls),
            pull_timeout: self.pull_timeout,
            check_interval: self.check_interval,
            refresh_interval: refresh,
            ..Policy::default()
        }
    }
}

fn parse_images(s: &str) -> Result<ImageList, String> {
    ImageList::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_caching_interval_hours() {
        let cli = Cli::try_parse_from(["kip-agent", "--images", "a=busybox"]).unwrap();
        assert_eq!(cli.policy().refresh_interval, Duration::from_secs(3600));
        assert_eq!(cli.policy().check_interval, Duration::from_secs(60));
        assert_eq!(cli.policy().pull_timeout, Duration::from_secs(1800));
        assert_eq!(cli.policy().max_parallel_pulls, 3);
        let cli = Cli::try_parse_from(["kip-agent", "--images", "a=busybox", "--caching-interval-hours", "5"]).unwrap();
        assert_eq!(cli.policy().refresh_interval, Duration::from_secs(5 * 3600));
        let cli = Cli::try_parse_from([
            "kip-agent",
            "--images",
            "a=busybox",
            "--caching-interval-hours",
            "5",
            "--refresh-interval",
            "10m",
        ])
        .unwrap();
        assert_eq!(cli.policy().refresh_interval, Duration::from_secs(600), "the explicit flag wins");
    }

    #[test]
    fn exactly_one_list_source() {
        let err = Cli::try_parse_from(["kip-agent"]).unwrap_err().to_string();
        assert!(err.contains("--images") && err.contains("--coordinator"), "{err}");
        let err = Cli::try_parse_from([
            "kip-agent",
            "--images",
            "a=b",
            "--coordinator",
            "http://c:50051",
            "--node-name",
            "n",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot be used with"), "{err}");
        let cli = Cli::try_parse_from(["kip-agent", "--coordinator", "http://c:50051", "--node-name", "n1"]).unwrap();
        assert_eq!((cli.coordinator.as_deref(), cli.node_name.as_deref()), (Some("http://c:50051"), Some("n1")));
        assert_eq!(cli.state_dir, PathBuf::from("/var/lib/kip"));
        let err = Cli::try_parse_from(["kip-agent", "--coordinator", "http://c:50051", "--once", "--node-name", "n"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--once"), "{err}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = Cli::try_parse_from(["kip-agent", "--images", "a=busybox;b"]).unwrap_err().to_string();
        assert!(err.contains("--images") && err.contains("IMAGES entry 2 `b`: expected `name=image`"), "{err}");
        let err = Cli::try_parse_from(["kip-agent", "--images", "a=busybox", "--pull-timeout", "forever"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pull-timeout"), "{err}");
        let err = Cli::try_parse_from(["kip-agent", "--images", "a=busybox", "--max-parallel-pulls", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-parallel-pulls"), "{err}");
    }

    #[test]
    fn intervals_and_timeouts_are_bounded() {
        let parse = |flag: &str, value: &str| Cli::try_parse_from(["kip-agent", "--images", "a=busybox", flag, value]);
        for (flag, var, too_small, too_big) in [
            ("--check-interval", "KIP_CHECK_INTERVAL", "1ms", "300000000000y"),
            ("--refresh-interval", "KIP_REFRESH_INTERVAL", "500ms", "31d"),
            ("--pull-timeout", "KIP_PULL_TIMEOUT", "10ms", "25h"),
            ("--lease-timeout", "KIP_LEASE_TIMEOUT", "1ms", "2h"),
            ("--runtime-timeout", "KIP_RUNTIME_TIMEOUT", "1ms", "11m"),
        ] {
            for bad in [too_small, too_big] {
                let err = parse(flag, bad).unwrap_err().to_string();
                assert!(err.contains(flag) && err.contains(var) && err.contains("out of range"), "{flag} {bad}: {err}");
            }
        }
        assert_eq!(parse("--check-interval", "1d").unwrap().policy().check_interval, Duration::from_secs(86_400));
        let err = parse("--caching-interval-hours", "100000").unwrap_err().to_string();
        assert!(err.contains("--caching-interval-hours"), "{err}");
        assert_eq!(parse("--runtime-timeout", "5s").unwrap().runtime_timeout, Duration::from_secs(5));
    }
}
