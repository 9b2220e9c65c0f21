//! The agent's side of the cluster's pull budget: before it pulls, the agent asks the
//! coordinator for a lease (`PullLease`), renews it while pulls run and gives it back when none
//! is left. So that nothing waits forever, it pulls on its own limits (`--max-parallel-pulls`)
//! when the coordinator has not answered for `--lease-timeout`, and at once when the coordinator
//! does not know the call (an older version). The work loop only sees "may pull now or not".

use std::sync::Arc;
use std::time::Duration;

use kip::v1;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::follow::{self, BearerToken};
use crate::metrics::Metrics;
use crate::reconcile;

/// How the agent came to pull.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// The coordinator granted a lease.
    Granted,
    /// The coordinator did not answer for the lease timeout: the agent's own limits apply.
    Unreachable,
    /// The coordinator has no pull budget (an older version).
    Unsupported,
}

impl Allowed {
    pub fn as_str(self) -> &'static str {
        match self {
            Allowed::Granted => "granted",
            Allowed::Unreachable => "coordinator_unreachable",
            Allowed::Unsupported => "unsupported",
        }
    }
}

/// Pure: after a lease call failed with `code` (`from_coordinator`: the coordinator itself
/// refused it), having failed since `since`, may the agent go ahead on its own limits at `now`?
/// Only a coordinator that cannot be reached is waited for no longer than the lease timeout; one
/// that answers (even "cannot verify your token now", when the API server struggles) keeps the
/// budget, or every agent would pull at once just when the cluster is under stress.
pub fn go_ahead_after_failure(
    code: tonic::Code,
    from_coordinator: bool,
    since: Instant,
    now: Instant,
    timeout: Duration,
) -> Option<Allowed> {
    use tonic::Code;
    match code {
        Code::Unimplemented => Some(Allowed::Unsupported),
        _ if from_coordinator => None,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
            if now.duration_since(since) >= timeout =>
        {
            Some(Allowed::Unreachable)
        }
        _ => None,
    }
}

/// How long a granted lease is kept between renewals: a third of its life as the coordinator
/// said it (so two renewals may be lost), within 1 s and 10 s.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// The work loop's end: says when it wants to pull, learns when it may.
pub struct LeaseHandle {
    want: watch::Sender<bool>,
    allowed: watch::Receiver<Option<Allowed>>,
}

impl LeaseHandle {
    pub fn want(&self, want: bool) {
        self.want.send_if_modified(|w| std::mem::replace(w, want) != want);
    }

    pub fn may_pull(&self) -> bool {
        self.allowed.borrow().is_some()
    }

    /// Resolves when the permission changes; never when `lease` is `None` (no budget).
    pub async fn changed(lease: &mut Option<LeaseHandle>) {
        match lease {
            Some(l) => {
                if l.allowed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

pub struct LeaseClient {
    pub channel: tonic::transport::Channel,
    pub token: BearerToken,
    pub node: String,
    /// How long an unreachable coordinator is waited for (`--lease-timeout`).
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
}

impl LeaseClient {
    /// The agent's handle on the lease, and the task that keeps it (to be run, by the caller's
    /// supervisor); the task ends with `shutdown`.
    pub fn start(self, shutdown: CancellationToken) -> (LeaseHandle, impl std::future::Future<Output = ()> + Send) {
        let (want, want_rx) = watch::channel(false);
        let (allowed_tx, allowed) = watch::channel(None);
        (LeaseHandle { want, allowed }, self.run(want_rx, allowed_tx, shutdown))
    }

    async fn run(
        self,
        mut want: watch::Receiver<bool>,
        allowed: watch::Sender<Option<Allowed>>,
        shutdown: CancellationToken,
    ) {
        let mut client = follow::client(self.channel.clone(), self.token.clone());
        loop {
            // Idle until the work loop has something to pull.
            while !*want.borrow_and_update() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = want.changed() => if changed.is_err() { return },
                }
            }
            let asked = Instant::now();
            let Some((how, ttl)) = self.acquire(&mut client, &mut want, &shutdown).await else {
                if shutdown.is_cancelled() {
                    return;
                }
                continue; // nothing to pull any more
            };
            self.metrics
                .pull_lease_wait
                .get_or_create(&crate::metrics::OutcomeLabels { outcome: how.as_str() })
                .observe(asked.elapsed().as_secs_f64());
            if how != Allowed::Granted {
                tracing::warn!(
                    how = how.as_str(),
                    waited_ms = asked.elapsed().as_millis() as u64,
                    "pulling without a lease from the coordinator (own --max-parallel-pulls)"
                );
            }
            allowed.send_replace(Some(how));
            self.hold(&mut client, &mut want, how, ttl, &shutdown).await;
            // Held no more (done, or lost): no pull starts until the lease is asked for again.
            allowed.send_replace(None);
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    fn request(&self, release: bool) -> v1::LeaseRequest {
        v1::LeaseRequest { node_name: self.node.clone(), release }
    }

    /// Asks until granted or the fallback applies; `None` when the pulls are no longer wanted.
    async fn acquire(
        &self,
        client: &mut follow::Client,
        want: &mut watch::Receiver<bool>,
        shutdown: &CancellationToken,
    ) -> Option<(Allowed, Duration)> {
        let mut failing_since: Option<Instant> = None;
        let mut backoff = reconcile::retry_backoff(Duration::from_millis(500), Duration::from_secs(5));
        loop {
            let asked = Instant::now();
            let call = tokio::select! {
                _ = shutdown.cancelled() => return None,
                changed = want.changed() => {
                    if changed.is_err() || !*want.borrow_and_update() {
                        return None;
                    }
                    continue;
                }
                call = client.pull_lease(self.request(false)) => call,
            };
            let delay = match call {
                Ok(reply) if reply.get_ref().granted => {
                    return Some((Allowed::Granted, Duration::from_millis(reply.get_ref().ttl_ms)))
                }
                Ok(reply) => {
                    failing_since = None;
                    let r = reply.get_ref();
                    tracing::debug!(in_use = r.in_use, budget = r.budget, "waiting for a pull lease");
                    // The coordinator waits for a slot before it answers; one that answers at
                    // once is not asked again at once.
                    if asked.elapsed() >= Duration::from_secs(1) {
                        continue;
                    }
                    Duration::from_secs(1)
                }
                Err(status) => {
                    let now = Instant::now();
                    let since = *failing_since.get_or_insert(now);
                    let from_coordinator = status.metadata().contains_key(v1::ANSWERED_BY);
                    if let Some(how) = go_ahead_after_failure(status.code(), from_coordinator, since, now, self.timeout)
                    {
                        return Some((how, Duration::ZERO));
                    }
                    tracing::debug!(error = %status, "pull lease not answered; asking again");
                    backoff.next().unwrap_or(Duration::from_secs(5))
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Keeps a granted lease (renewing at a third of its life, `ttl`) while pulls are wanted,
    /// then gives it back. A renewal the coordinator answers "not granted" (the lease expired, its
    /// renewals lost, and the slot went to another node; or a restarted coordinator gave it away)
    /// ends the hold at once: the agent starts no pull until it holds a lease again. Without a
    /// lease (the fallbacks) it only waits for the pulls to end.
    async fn hold(
        &self,
        client: &mut follow::Client,
        want: &mut watch::Receiver<bool>,
        how: Allowed,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) {
        let renew_every = renew_every(ttl);
        while *want.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = want.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(renew_every), if how == Allowed::Granted => {
                    match client.pull_lease(self.request(false)).await {
                        Ok(reply) if reply.get_ref().granted => {}
                        Ok(reply) => {
                            let r = reply.get_ref();
                            tracing::warn!(in_use = r.in_use, budget = r.budget,
                                "pull lease lost (not renewed in time, now held by others): no new pull until it is granted again");
                            self.metrics.pull_leases_lost.inc();
                            return;
                        }
                        // A lost renewal is retried at the next turn; pulls in flight cannot be
                        // paused, and a coordinator that restarted grants it again or not.
                        Err(status) => tracing::debug!(error = %status, "pull lease renewal failed"),
                    }
                }
            }
        }
        if how == Allowed::Granted {
            let give_back = client.pull_lease(self.request(true));
            if let Err(e) = tokio::time::timeout(Duration::from_secs(5), give_back)
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("giving the pull lease back")))
            {
                tracing::debug!(error = %e, "pull lease not given back; it expires on its own");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_coordinator_is_waited_for_only_until_the_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(60);
        let later = t0 + timeout;
        use tonic::Code;
        assert_eq!(go_ahead_after_failure(Code::Unavailable, false, t0, t0 + Duration::from_secs(59), timeout), None);
        assert_eq!(go_ahead_after_failure(Code::Unavailable, false, t0, later, timeout), Some(Allowed::Unreachable));
        assert_eq!(
            go_ahead_after_failure(Code::DeadlineExceeded, false, t0, later, timeout),
            Some(Allowed::Unreachable)
        );
        assert_eq!(go_ahead_after_failure(Code::Unimplemented, false, t0, t0, timeout), Some(Allowed::Unsupported));
        // The coordinator answered: it is there, and the budget holds however long it refuses.
        assert_eq!(go_ahead_after_failure(Code::Unavailable, true, t0, later, timeout), None);
        assert_eq!(go_ahead_after_failure(Code::PermissionDenied, false, t0, later, timeout), None);
        assert_eq!(go_ahead_after_failure(Code::Unauthenticated, false, t0, later, timeout), None);
    }

    #[test]
    fn a_lease_is_renewed_at_a_third_of_its_life() {
        assert_eq!(renew_every(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(renew_every(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(renew_every(Duration::ZERO), Duration::from_secs(1), "an old coordinator that sends no ttl");
        assert_eq!(renew_every(Duration::from_secs(600)), Duration::from_secs(10));
    }
}
