//! What the coordinator benchmarks share: light agents (a `Watch` stream and reports on one
//! HTTP/2 connection each, as real agents have) and the coordinator's usage from /proc.

#![allow(dead_code)] // each benchmark uses part of it

use std::time::Duration;

use kip::v1::{self, coordinator_client::CoordinatorClient};
use tonic::transport::Endpoint;

/// A benchmark's exit: its JSON on stdout, or its error named after it on stderr.
pub fn finish(name: &str, outcome: Result<serde_json::Value, String>) -> std::process::ExitCode {
    match outcome {
        Ok(json) => {
            println!("{json}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A process's resident memory (kB) and CPU time (ms) from /proc.
pub fn usage(pid: &str) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}: {e}"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or("no VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces, in parentheses): from the state
    // letter on, utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or("short stat");
    let ticks = tick(11)? + tick(12)?;
    // Linux reports in USER_HZ, 100 on every architecture kip runs on.
    Ok((rss, ticks * 10))
}

/// A process's CPU time (ms, at nanosecond precision): the sum over its threads of the time
/// the scheduler ran them (`/proc/PID/task/*/schedstat`); finer than `usage`'s clock ticks.
pub fn cpu_ms(pid: &str) -> Result<f64, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    let mut ns: u64 = 0;
    for task in tasks.flatten() {
        // A thread that ended meanwhile has nothing left to count.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        ns += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(ns as f64 / 1e6)
}

/// A process's peak resident memory (kB).
pub fn peak_rss(pid: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no VmHWM".to_string())
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub struct Agent {
    pub node: String,
    pub client: CoordinatorClient<tonic::transport::Channel>,
    pub stream: tonic::Streaming<v1::ImageListUpdate>,
    /// The list the stream delivered last.
    pub list: v1::ImageListUpdate,
}

/// A light agent for `node`: its own connection, its Watch stream open with the current list.
pub async fn connect(url: &str, node: String) -> Result<Agent, String> {
    let channel = Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| format!("agent {node}: {e}"))?;
    let mut client = CoordinatorClient::new(channel);
    let request = v1::WatchRequest { node_name: node.clone(), agent_version: "bench".into() };
    let mut stream = client.watch(request).await.map_err(|e| format!("agent {node}: {e}"))?.into_inner();
    // The current list comes at once.
    let list = stream.message().await.map_err(|e| e.to_string())?.ok_or("stream ended")?;
    Ok(Agent { node, client, stream, list })
}

/// A light agent for each node of `nodes`, connected in waves of 256 (so the listen backlog is
/// not the thing measured).
pub async fn connect_all(url: &str, nodes: impl Iterator<Item = String>) -> Result<Vec<Agent>, String> {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut connecting = tokio::task::JoinSet::new();
    for node in nodes {
        let (url, gate) = (url.to_string(), gate.clone());
        connecting.spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            connect(&url, node).await
        });
    }
    let mut agents = Vec::new();
    while let Some(agent) = connecting.join_next().await {
        agents.push(agent.map_err(|e| e.to_string())??);
    }
    Ok(agents)
}

impl Agent {
    /// What a real agent reports once every image of `list` is cached and pinned.
    pub fn report(&self, list: &v1::ImageListUpdate) -> v1::NodeReport {
        v1::NodeReport {
            node_name: self.node.clone(),
            runtime: Some(v1::RuntimeState { available: true, name: "bench".into(), ..Default::default() }),
            generation: list.generation,
            images: list
                .images
                .iter()
                .map(|i| v1::ImageState {
                    name: i.name.clone(),
                    image: i.image.clone(),
                    cached: true,
                    pinned: true,
                    ..Default::default()
                })
                .collect(),
            agent_version: "bench".into(),
            ..Default::default()
        }
    }
}
