//! `fanout-bench URL COORDINATOR_PID AGENTS TRIGGER...`: the coordinator fan-out benchmark's
//! client. Opens AGENTS light agent streams (`Watch`, one HTTP/2 connection each, as real agents
//! have) to the coordinator at URL, waits until every one has the current list, runs TRIGGER (a
//! command that changes the list) and measures when each stream receives the new generation;
//! then every agent reports once. Prints one JSON object: connect time, the latency percentiles
//! of the change, the coordinator's resident memory before and after the connections (read from
//! /proc/COORDINATOR_PID) and its CPU time for the round of reports.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

mod common;

use common::{connect_all, percentile, usage};

#[tokio::main]
async fn main() -> ExitCode {
    common::finish("fanout-bench", run().await)
}

async fn run() -> Result<serde_json::Value, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, pid, agents, trigger @ ..] = args.as_slice() else {
        return Err("usage: fanout-bench URL COORDINATOR_PID AGENTS TRIGGER...".into());
    };
    let agents: usize = agents.parse().map_err(|_| "AGENTS: a number")?;
    if trigger.is_empty() {
        return Err("no TRIGGER command".into());
    }
    let (rss_before, _) = usage(pid)?;
    let started = Instant::now();
    let connected = connect_all(url, (0..agents).map(|i| format!("bench-{i}"))).await?;
    let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_after, _) = usage(pid)?;

    // Every stream waits for the next generation; once all have it, each reports once.
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (go, _) = tokio::sync::watch::channel(false);
    let mut reporting = tokio::task::JoinSet::new();
    for mut agent in connected {
        let (arrived_tx, mut go) = (arrived_tx.clone(), go.subscribe());
        reporting.spawn(async move {
            let update = agent.stream.message().await.map_err(|e| e.to_string())?.ok_or("stream ended")?;
            let _ = arrived_tx.send(Instant::now());
            go.wait_for(|go| *go).await.map_err(|e| e.to_string())?;
            let report = agent.report(&update);
            agent.client.report(report).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        });
    }
    drop(arrived_tx);
    let changed = Instant::now();
    let status = std::process::Command::new(&trigger[0])
        .args(&trigger[1..])
        .status()
        .map_err(|e| format!("{}: {e}", trigger[0]))?;
    if !status.success() {
        return Err(format!("the trigger exited {status}"));
    }
    let mut latencies = Vec::with_capacity(agents);
    tokio::time::timeout(Duration::from_secs(120), async {
        while latencies.len() < agents {
            let Some(at) = arrived_rx.recv().await else { break };
            latencies.push(at.duration_since(changed).as_secs_f64() * 1000.0);
        }
    })
    .await
    .map_err(|_| format!("the change reached {} of {agents} agents within 120 s", latencies.len()))?;
    if latencies.len() < agents {
        return Err(format!("{} of {agents} streams ended before the change", agents - latencies.len()));
    }
    // Every agent reports once, all together; the coordinator's CPU time for that round.
    let (_, cpu_before) = usage(pid)?;
    let reports_started = Instant::now();
    go.send_replace(true);
    while let Some(r) = reporting.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let report_wall_ms = reports_started.elapsed().as_secs_f64() * 1000.0;
    let (_, cpu_after) = usage(pid)?;
    latencies.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "agents": agents,
        "connect_ms": connect_ms,
        "p50_ms": percentile(&latencies, 0.5),
        "p99_ms": percentile(&latencies, 0.99),
        "max_ms": latencies.last().copied().unwrap_or(0.0),
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "per_connection_kb": (rss_after.saturating_sub(rss_before)) as f64 / agents as f64,
        "report_cpu_ms": cpu_after.saturating_sub(cpu_before),
        "report_wall_ms": report_wall_ms,
    }))
}
