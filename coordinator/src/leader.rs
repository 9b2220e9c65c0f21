//! One coordinator acts at a time: leader election on a `coordination.k8s.io` Lease
//! (kube-lease-manager, server-side apply). Only the leader grants pull leases and runs the
//! cluster controllers (labels, gates, the fallback DaemonSet, the release); a follower keeps its
//! list current and serves it read-only, refuses pull leases (`Unavailable`: the agent treats it
//! as an unreachable coordinator) and waits for the Lease.
//!
//! With more than one replica the chart's Service has no selector: the leader publishes the
//! Service's EndpointSlice with its own address, so agents reach the leader only.
//!
//! A leader that cannot renew the Lease stops the process at once (Kubernetes restarts it):
//! its API calls give up after [`CALL_TIMEOUT`], before the Lease runs out, so by the time
//! another replica may take the Lease this one no longer acts. On SIGTERM the Lease is released
//! for the next leader to take at once.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

use crate::state::State;

/// How long the Lease lasts without renewal, and how long before its end the leader renews it.
pub const LEASE_SECONDS: u64 = 15;
const RENEW_BEFORE_END: u64 = 5;
/// Every API call of the election gives up after this: well inside [`RENEW_BEFORE_END`].
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What the election needs to know.
#[derive(Clone, Debug)]
pub struct Election {
    /// The Lease's name and namespace.
    pub lease: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Where agents reach the leader: the Service whose EndpointSlice the leader publishes, and
    /// this pod's address (`None`: the Service selects the pods itself).
    pub endpoints: Option<Endpoints>,
}

#[derive(Clone, Debug)]
pub struct Endpoints {
    pub service: String,
    pub pod_ip: std::net::IpAddr,
    /// The Service's ports by name, as this pod serves them.
    pub ports: Vec<(String, u16)>,
}

/// The election ended other than by shutdown: this replica led and no longer does.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error("another coordinator holds the Lease {0} now")]
    TakenOver(String),
    #[error("renewing the Lease {lease} failed ({error}); stopping before another coordinator may take it")]
    RenewFailed { lease: String, error: String },
}

/// The election's client: `config` with every call bounded by [`CALL_TIMEOUT`].
pub fn client(mut config: kube::Config) -> Result<Client, kube::Error> {
    config.connect_timeout = Some(CALL_TIMEOUT);
    config.read_timeout = Some(CALL_TIMEOUT);
    config.write_timeout = Some(CALL_TIMEOUT);
    Client::try_from(config)
}

/// Pure: the EndpointSlice that sends the Service's traffic to this pod.
pub fn endpoint_slice(namespace: &str, identity: &str, e: &Endpoints) -> EndpointSlice {
    let address_type = if e.pod_ip.is_ipv4() { "IPv4" } else { "IPv6" };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-leader", e.service),
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": e.service,
                "endpointslice.kubernetes.io/managed-by": "kip.eclipse.dev",
                "app.kubernetes.io/managed-by": "kip",
            },
        },
        "addressType": address_type,
        "endpoints": [{
            "addresses": [e.pod_ip.to_string()],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": identity},
        }],
        "ports": e.ports.iter().map(|(name, port)| serde_json::json!({"name": name, "port": port, "protocol": "TCP"})).collect::<Vec<_>>(),
    }))
    .unwrap_or_default()
}

/// Takes part in the election until `shutdown` (`Ok`) or until this replica, having led, no
/// longer does (`Err`: the process ends). `state` says whether it leads.
pub async fn run(
    client: Client,
    election: Election,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<(), Lost> {
    state.set_leading(false);
    let manager = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        m = crate::retry_forever("setting up the leader election's Lease", || {
            LeaseManagerBuilder::new(client.clone(), &election.lease)
                .with_namespace(&election.namespace)
                .with_identity(&election.identity)
                .with_duration(LEASE_SECONDS)
                .with_grace(RENEW_BEFORE_END)
                .build()
        }) => m,
    };
    tracing::info!(lease = %election.lease, identity = %election.identity, "waiting for the leader Lease; serving the list read-only meanwhile");
    let mut leading = false;
    let mut delays = crate::backoff();
    // Publishing the EndpointSlice runs beside the renewals (which must never wait for it).
    let publishing = shutdown.child_token();
    let _stop_publishing = publishing.clone().drop_guard();
    loop {
        let changed = tokio::select! {
            _ = shutdown.cancelled() => {
                if leading {
                    state.set_leading(false);
                    // The next leader takes the Lease at once instead of waiting for it to run out.
                    match tokio::time::timeout(CALL_TIMEOUT, manager.release()).await {
                        Ok(Ok(())) => tracing::info!(lease = %election.lease, "released the leader Lease"),
                        _ => tracing::warn!(lease = %election.lease, "releasing the leader Lease failed; the next leader waits for it to run out"),
                    }
                }
                return Ok(());
            }
            c = manager.changed() => c,
        };
        match changed {
            Ok(true) => {
                leading = true;
                delays = crate::backoff();
                tracing::info!(lease = %election.lease, identity = %election.identity, "leading: this coordinator grants pull leases and writes to the cluster");
                state.set_leading(true);
                if let Some(e) = election.endpoints.clone() {
                    let (client, election, stop) = (client.clone(), election.clone(), publishing.clone());
                    tokio::spawn(async move { publish_endpoints(&client, &election, &e, &stop).await });
                }
            }
            Ok(false) if leading => {
                state.set_leading(false);
                return Err(Lost::TakenOver(election.lease.clone()));
            }
            Ok(false) => {}
            Err(e) if leading => {
                state.set_leading(false);
                return Err(Lost::RenewFailed { lease: election.lease.clone(), error: e.to_string() });
            }
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(60));
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "the leader election failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Points the Service at this pod (server-side apply: one request, the same for a takeover).
/// Retried until it succeeds or shutdown: agents cannot reach a leader without it.
async fn publish_endpoints(client: &Client, election: &Election, e: &Endpoints, shutdown: &CancellationToken) {
    let slice = endpoint_slice(&election.namespace, &election.identity, e);
    let api = Api::<EndpointSlice>::namespaced(client.clone(), &election.namespace);
    let name = format!("{}-leader", e.service);
    let (params, patch) = (PatchParams::apply(crate::controller::FIELD_MANAGER).force(), Patch::Apply(&slice));
    let apply = || api.patch(&name, &params, &patch);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = crate::retry_forever("publishing the leader's EndpointSlice", apply) => {
            tracing::info!(service = %e.service, address = %e.pod_ip, "the Service now sends agents to this coordinator");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_slice_names_the_service_and_this_pod_only() {
        let e = Endpoints {
            service: "kip-coordinator".into(),
            pod_ip: "10.1.2.3".parse().unwrap(),
            ports: vec![("grpc".into(), 50051), ("metrics".into(), 8080)],
        };
        let slice = serde_json::to_value(endpoint_slice("kip", "kip-coordinator-abc", &e)).unwrap();
        assert_eq!(slice["metadata"]["labels"]["kubernetes.io/service-name"], "kip-coordinator");
        assert_eq!(slice["addressType"], "IPv4");
        assert_eq!(slice["endpoints"][0]["addresses"], serde_json::json!(["10.1.2.3"]));
        assert_eq!(slice["endpoints"][0]["targetRef"]["name"], "kip-coordinator-abc");
        assert_eq!(slice["ports"][0], serde_json::json!({"name": "grpc", "port": 50051, "protocol": "TCP"}));
        let v6 = Endpoints { pod_ip: "fd00::1".parse().unwrap(), ..e };
        assert_eq!(serde_json::to_value(endpoint_slice("kip", "p", &v6)).unwrap()["addressType"], "IPv6");
    }
}
