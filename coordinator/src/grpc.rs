//! The `kip.v1.Coordinator` gRPC service: `Watch` streams the published list to an agent
//! (the current one at once, then every change); `Report` stores the agent's state; `PullLease`
//! hands out the cluster's pull budget.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt as _;
use kip::v1::{self, coordinator_server::Coordinator};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::AgentAuth;
use crate::state::State;

pub struct CoordinatorService {
    hub: Arc<State>,
    /// Who may call as which node (`--agent-auth`).
    auth: Arc<AgentAuth>,
    /// Ends every Watch stream, so a graceful shutdown does not wait for them forever.
    shutdown: CancellationToken,
}

impl CoordinatorService {
    pub fn new(hub: Arc<State>, auth: Arc<AgentAuth>, shutdown: CancellationToken) -> Self {
        Self { hub, auth, shutdown }
    }
}

/// Counts an open Watch stream for as long as it lives.
struct ConnectedGuard {
    hub: Arc<State>,
    node: String,
    /// Set when the stream ended because its token's life did: routine (the agent is back within
    /// a second with its rotated token), so not worth an info line per agent every ten minutes.
    token_ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.hub.metrics.agents_connected.dec();
        self.hub.node_stream(&self.node, false);
        if self.token_ended.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!(node = %self.node, "agent stream ended before its token expires; the agent reconnects");
        } else {
            tracing::info!(node = %self.node, "agent disconnected");
        }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::ImageListUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type WatchStream = UpdateStream;

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        if request.get_ref().node_name.trim().is_empty() {
            return Err(kip::v1::coordinator_status(Status::invalid_argument("node_name is empty")));
        }
        let token_good_until =
            self.auth.check(request.metadata(), &request.get_ref().node_name, &self.hub.metrics).await?;
        let req = request.into_inner();
        self.hub.metrics.agents_connected.inc();
        if self.hub.node_stream(&req.node_name, true) {
            tracing::info!(node = %req.node_name, agent_version = %req.agent_version, "agent connected");
        } else {
            tracing::debug!(node = %req.node_name, agent_version = %req.agent_version, "agent reconnected");
        }
        // A percentage budget grows with the connected nodes.
        self.hub.leases.budget_changed();
        let token_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = ConnectedGuard { hub: self.hub.clone(), node: req.node_name, token_ended: token_ended.clone() };
        let updates = if self.hub.image_sets_enabled() {
            node_updates(self.hub.clone(), guard.node.clone())
                .map(move |u| {
                    let _alive = &guard;
                    Ok(u)
                })
                .boxed()
        } else {
            // WatchStream yields the current value first, then each new one (skipping stale ones).
            tokio_stream::wrappers::WatchStream::new(self.hub.subscribe())
                .map(move |published| {
                    let _alive = &guard;
                    Ok(published.to_update())
                })
                .boxed()
        };
        // The stream ends with the coordinator, or shortly before the caller's token expires: the
        // agent reconnects with its rotated token, checked again (a stream never outlives the
        // token that opened it, nor the pod the token is bound to).
        let token_life = token_good_until.map(|until| {
            let left = until
                .checked_sub(crate::auth::STREAM_END_BEFORE_EXPIRY)
                .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                .unwrap_or_default();
            kip::duration::after(tokio::time::Instant::now(), left)
        });
        let shutdown = self.shutdown.clone();
        let ended = async move {
            match token_life {
                Some(at) => tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until(at) => token_ended.store(true, std::sync::atomic::Ordering::Relaxed),
                },
                None => shutdown.cancelled().await,
            }
        };
        let updates = updates.take_until(ended);
        Ok(Response::new(Box::pin(updates)))
    }

    async fn report(&self, request: Request<v1::NodeReport>) -> Result<Response<v1::ReportAck>, Status> {
        if request.get_ref().node_name.trim().is_empty() {
            return Err(kip::v1::coordinator_status(Status::invalid_argument("node_name is empty")));
        }
        self.auth.check(request.metadata(), &request.get_ref().node_name, &self.hub.metrics).await?;
        let report = request.into_inner();
        self.hub.record_report(report);
        Ok(Response::new(v1::ReportAck {}))
    }

    async fn pull_lease(&self, request: Request<v1::LeaseRequest>) -> Result<Response<v1::LeaseReply>, Status> {
        let node = request.get_ref().node_name.trim().to_string();
        if node.is_empty() {
            return Err(kip::v1::coordinator_status(Status::invalid_argument("node_name is empty")));
        }
        self.auth.check(request.metadata(), &node, &self.hub.metrics).await?;
        let metrics = &self.hub.metrics;
        if request.get_ref().release {
            self.hub.leases.release(&node, metrics);
            return Ok(Response::new(v1::LeaseReply { granted: false, ..Default::default() }));
        }
        if !self.hub.is_leading() {
            // Not marked as the coordinator's own answer: the agent treats a standby as it treats
            // an unreachable coordinator (the Service sends agents to the leader).
            return Err(Status::unavailable("this coordinator is a standby; the leader grants pull leases"));
        }
        let hub = &self.hub;
        let slots = || hub.pull_slots();
        let reply = tokio::select! {
            r = self.hub.leases.acquire(&node, slots, metrics) => r,
            _ = self.shutdown.cancelled() => return Err(Status::unavailable("the coordinator is shutting down")),
        };
        Ok(Response::new(v1::LeaseReply {
            granted: reply.granted,
            ttl_ms: reply.ttl.as_millis() as u64,
            budget: reply.slots as u32,
            in_use: reply.in_use as u32,
        }))
    }
}

/// With image sets: `node`'s own list, first as soon as it is known, then at each change of the
/// published list, of the sets in use or of the node's labels (only when the node's list or
/// policy changed: another node's set is no news to this one).
fn node_updates(state: Arc<State>, node: String) -> impl tokio_stream::Stream<Item = v1::ImageListUpdate> + Send {
    let waits = (state.subscribe(), state.subscribe_sets(), state.subscribe_labels(&node));
    futures_util::stream::unfold(
        (state, node, waits, None::<v1::ImageListUpdate>),
        |(state, node, mut waits, last)| async move {
            loop {
                if let Some(update) = state.update_for(&node) {
                    let same = last.as_ref().is_some_and(|l| {
                        (&l.images, &l.policy, l.release) == (&update.images, &update.policy, update.release)
                    });
                    if !same {
                        let sent = update.clone();
                        return Some((sent, (state, node, waits, Some(update))));
                    }
                }
                let (lists, sets, labels) = &mut waits;
                let changed = tokio::select! {
                    r = lists.changed() => r.is_ok(),
                    r = sets.changed() => r.is_ok(),
                    r = labels.changed() => r.is_ok(),
                };
                if !changed {
                    return None;
                }
            }
        },
    )
}
