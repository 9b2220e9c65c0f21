//! `kip-coordinator wait-release`: what the chart's pre-delete hook runs once it has created the
//! release ConfigMap. Reads the coordinator's `/status` until the release is done (or this
//! command's own timeout passes), then says what was cleaned and what was not.

use std::time::Duration;

/// What a release came to, from `/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub done: bool,
    pub released: Vec<String>,
    pub pending: Vec<String>,
    pub cluster: String,
    /// What could not be cleaned, one line each (empty when all is clean).
    pub incomplete: Vec<String>,
}

impl Outcome {
    /// Pure: the release part of a `/status` document; `None` while the coordinator has no
    /// release (the ConfigMap has not reached it yet).
    pub fn of(status: &serde_json::Value) -> Option<Self> {
        let r = status.get("release")?;
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
        };
        Some(Self {
            done: r.get("done").and_then(serde_json::Value::as_bool).unwrap_or(false),
            released: strings(&r["released"]),
            pending: r["pending"]
                .as_object()
                .map(|m| m.iter().map(|(n, why)| format!("{n} ({})", why.as_str().unwrap_or(""))).collect())
                .unwrap_or_default(),
            cluster: r["cluster"].as_str().unwrap_or_default().to_string(),
            incomplete: strings(&r["incomplete"]),
        })
    }
}

/// Polls `status_url` every `every` until the release is done or `timeout` passes. Never fails:
/// a coordinator that cannot be reached or never finishes gives an outcome that says so.
pub async fn wait(status_url: &str, timeout: Duration, every: Duration) -> Outcome {
    let deadline = kip::duration::after(tokio::time::Instant::now(), timeout);
    let mut last_error = String::from("no answer yet");
    let mut last: Option<Outcome> = None;
    loop {
        match kip::http::get(status_url, Duration::from_secs(10)).await {
            Ok((status, body)) if status.is_success() => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => match Outcome::of(&v) {
                    Some(o) if o.done => return o,
                    Some(o) => {
                        if last.as_ref().map(|l| (&l.released, &l.pending)) != Some((&o.released, &o.pending)) {
                            tracing::info!(released = o.released.len(), pending = ?o.pending, cluster = %o.cluster, "release in progress");
                        }
                        last = Some(o);
                    }
                    None => last_error = "the coordinator has no release yet (KIP_RELEASE not seen)".into(),
                },
                Err(e) => last_error = format!("GET {status_url}: not JSON: {e}"),
            },
            Ok((status, _)) => last_error = format!("GET {status_url}: HTTP {status}"),
            Err(e) => last_error = e,
        }
        if kip::duration::after(tokio::time::Instant::now(), every) > deadline {
            let mut o = last.unwrap_or_default();
            o.done = false;
            o.incomplete = o.pending.iter().map(|p| format!("node {p}: did not confirm")).collect();
            o.incomplete.push(format!("gave up waiting after {}s: {last_error}", timeout.as_secs()));
            return o;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_is_read_from_the_status_document() {
        assert_eq!(Outcome::of(&serde_json::json!({"generation": 1, "nodes": {}})), None);
        let status = serde_json::json!({"release": {
            "kind": "unpin", "done": true, "released": ["n1"], "pending": {"n2": "its agent is not connected"},
            "cluster": "DaemonSet deleted, 2 node labels removed",
            "incomplete": ["node n2: pins, state file or drop-in of kip's may be left (its agent is not connected)"]
        }});
        let o = Outcome::of(&status).unwrap();
        assert!(o.done);
        assert_eq!(o.released, vec!["n1"]);
        assert_eq!(o.pending, vec!["n2 (its agent is not connected)"]);
        assert_eq!(o.incomplete.len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_ends_the_wait_with_the_reason() {
        // A port nothing listens on: bind, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/status");
        let o = wait(&url, Duration::from_millis(300), Duration::from_millis(100)).await;
        assert!(!o.done);
        let last = o.incomplete.last().unwrap();
        assert!(last.starts_with("gave up waiting after 0s: GET http://127.0.0.1:"), "{last}");
    }
}
