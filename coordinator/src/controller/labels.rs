//! The one writer of the `kip.eclipse.dev/agent` node label: a merge patch only where the node
//! shows another value, and no second patch while the watch has not caught up with the first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::time::Instant;

use crate::manifest::AGENT_LABEL;
use crate::watches::NodeFacts;

/// How long a patched value is trusted over what the watch shows: after that the watch is the
/// truth again (someone may have changed the label back, or the patch's event was lost).
const SHOWN_WITHIN: Duration = Duration::from_secs(30);

pub struct Labels {
    client: Client,
    /// Values this process set that the node watch may not show yet.
    patched: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

/// What became of one node's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labelled {
    /// Already as wanted (or just patched so, the watch not showing it yet): no request.
    Unchanged,
    Patched,
    /// The node is gone.
    NotFound,
}

/// Label patches that failed in one bulk pass (the others were sent all the same).
#[derive(Debug)]
pub struct LabelsFailed {
    pub patched: usize,
    pub failed: Vec<(String, kube::Error)>,
}

impl std::fmt::Display for LabelsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (node, first) = match self.failed.first() {
            Some((node, e)) => (node.as_str(), e.to_string()),
            None => ("", String::new()),
        };
        write!(f, "{} node(s) could not be labelled ({} were), first {node}: {first}", self.failed.len(), self.patched)
    }
}

impl Labels {
    pub fn new(client: Client) -> Self {
        Self { client, patched: Mutex::new(HashMap::new()) }
    }

    /// The value `node` has as far as this process knows: what it patched lately, else what the
    /// watch shows.
    fn believed(&self, node: &NodeFacts) -> Option<String> {
        let Ok(mut patched) = self.patched.lock() else { return node.label.clone() };
        match patched.get(&node.name) {
            Some((value, at)) if *value != node.label && at.elapsed() < SHOWN_WITHIN => value.clone(),
            Some(_) => {
                // The watch shows it (or has had time to): it is the truth again.
                patched.remove(&node.name);
                node.label.clone()
            }
            None => node.label.clone(),
        }
    }

    /// Sets `node`'s label to `want` (`None` removes it) unless it has that value already.
    pub async fn set(&self, node: &NodeFacts, want: Option<&str>) -> Result<Labelled, kube::Error> {
        if self.believed(node).as_deref() == want {
            return Ok(Labelled::Unchanged);
        }
        let value = want.map_or(serde_json::Value::Null, |v| serde_json::json!(v));
        let patch = serde_json::json!({"metadata": {"labels": {AGENT_LABEL: value}}});
        let api = Api::<Node>::all(self.client.clone());
        match api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(node = %node.name, label = AGENT_LABEL, value = want.unwrap_or("(removed)"), "node label updated");
                if let Ok(mut patched) = self.patched.lock() {
                    patched.insert(node.name.clone(), (want.map(str::to_string), Instant::now()));
                }
                Ok(Labelled::Patched)
            }
            // A node deleted since the watch saw it has nothing to label.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                tracing::warn!(node = %node.name, "node not found; not labelling it");
                Ok(Labelled::NotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Sets each node in `desired` that `nodes` shows to its value. One node refused (a webhook,
    /// a policy) does not keep the others unlabelled: every node is tried, the failures reported
    /// together. Returns how many nodes were patched.
    pub async fn set_all(
        &self,
        desired: &BTreeMap<String, Option<&str>>,
        nodes: &[NodeFacts],
    ) -> Result<usize, LabelsFailed> {
        let (mut patched, mut failed) = (0, Vec::new());
        for node in nodes {
            let Some(want) = desired.get(&node.name) else { continue };
            match self.set(node, *want).await {
                Ok(Labelled::Patched) => patched += 1,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "labelling the node failed");
                    failed.push((node.name.clone(), e));
                }
            }
        }
        if failed.is_empty() {
            Ok(patched)
        } else {
            Err(LabelsFailed { patched, failed })
        }
    }
}
