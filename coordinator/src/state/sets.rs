//! Image sets in the shared state: the sets in use (`imageset::sets::accept`), the node labels
//! they select by, and each node's list as its agent's stream sends it. Every replica keeps this
//! (followers serve lists too); the leader writes the sets' status.
//!
//! Nothing is sent before it is known: while the sets or the node's labels are not listed yet, a
//! node's stream waits (its agent keeps working with the list it has), because a list without a
//! set's images would make the agent let go of that set's pins.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use std::time::Duration;

use kip::images::{ImageEntry, ImageList};
use kip::pull_secrets::{Credentials, Keyring};
use kip::v1;
use tokio::sync::watch;

use super::State;
use crate::config::KipConfig;
use crate::imageset::sets::{node_list, node_pull_secrets, node_refresh_interval, selecting, tag_intervals, Accepted};
use crate::watches::{NodeView, Touch, Workloads};

/// A node's labels as last seen, and the channel its stream waits on.
type Labels = (BTreeMap<String, String>, watch::Sender<u64>);

/// The image sets part of the state.
pub struct Sets {
    /// Image sets are used (`--image-sets`): lists are per node.
    enabled: std::sync::atomic::AtomicBool,
    /// The sets in use (`None` until the ImageSet watch has listed them).
    accepted: watch::Sender<Option<Arc<Accepted>>>,
    /// The node watch, once the API is reached.
    nodes: OnceLock<NodeView>,
    /// Each node's labels as last seen, and a channel its stream waits on.
    labels: Mutex<HashMap<String, Labels>>,
    /// Bumped on every change of any node's list (the generation agents are sent).
    generation: AtomicU64,
    /// What is wrong with the sets' pull secrets, by (namespace, secret) (the copy's writer).
    secret_problems: watch::Sender<SecretProblems>,
    /// The leader's watch of the fallback pods (a set's status counts a node they serve).
    fallback: Mutex<Option<Workloads>>,
    /// The sets' pull secrets as the leader last read them, by key (`<namespace>.<secret>`):
    /// the resolver's credentials for the sets' tags.
    keyrings: watch::Sender<BTreeMap<String, Keyring>>,
}

/// Why a set's pull secret is not in the coordinator's copy, by (namespace, secret).
pub type SecretProblems = BTreeMap<(String, String), String>;

impl Default for Sets {
    fn default() -> Self {
        Self {
            enabled: Default::default(),
            accepted: watch::channel(None).0,
            nodes: OnceLock::new(),
            labels: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            secret_problems: watch::channel(SecretProblems::new()).0,
            fallback: Mutex::new(None),
            keyrings: watch::channel(BTreeMap::new()).0,
        }
    }
}

impl State {
    /// Lists are per node from now on (before the gRPC server starts).
    pub fn use_image_sets(&self) {
        self.sets.enabled.store(true, Ordering::SeqCst);
    }

    pub fn image_sets_enabled(&self) -> bool {
        self.sets.enabled.load(Ordering::SeqCst)
    }

    /// The sets in use changed (the ImageSet watch, checked by `accept`).
    pub fn set_accepted(&self, accepted: Accepted) {
        let changed = self.sets.accepted.send_if_modified(|current| {
            if current.as_deref() == Some(&accepted) {
                return false;
            }
            *current = Some(Arc::new(accepted));
            true
        });
        if changed {
            self.sets.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn accepted_sets(&self) -> Option<Arc<Accepted>> {
        self.sets.accepted.borrow().clone()
    }

    /// The copy of the sets' pull secrets was written: what it could not take, and why.
    pub fn set_secret_problems(&self, problems: SecretProblems) {
        self.sets.secret_problems.send_if_modified(|current| {
            let changed = *current != problems;
            *current = problems;
            changed
        });
    }

    pub fn secret_problems(&self) -> SecretProblems {
        self.sets.secret_problems.borrow().clone()
    }

    pub fn subscribe_secret_problems(&self) -> watch::Receiver<SecretProblems> {
        self.sets.secret_problems.subscribe()
    }

    pub fn subscribe_sets(&self) -> watch::Receiver<Option<Arc<Accepted>>> {
        self.sets.accepted.subscribe()
    }

    /// The sets' pull secrets as read (the leader's copy).
    pub fn set_pull_secret_keyrings(&self, keyrings: BTreeMap<String, Keyring>) {
        self.sets.keyrings.send_if_modified(|current| {
            let changed = *current != keyrings;
            *current = keyrings;
            changed
        });
    }

    /// Changes when the sets' pull secrets as read change (the resolver asks their tags again).
    pub fn subscribe_keyrings(&self) -> watch::Receiver<BTreeMap<String, Keyring>> {
        self.sets.keyrings.subscribe()
    }

    /// For each entry some set in use lists with pull secrets, the first of those secrets'
    /// credentials for its registry (by reference).
    pub fn set_credentials(&self, entries: &[ImageEntry]) -> BTreeMap<String, Credentials> {
        let Some(accepted) = self.accepted_sets().filter(|_| self.image_sets_enabled()) else {
            return BTreeMap::new();
        };
        let all: Vec<_> = accepted.sets.iter().collect();
        let keys = node_pull_secrets(&all);
        let keyrings = self.sets.keyrings.borrow();
        entries
            .iter()
            .filter_map(|e| {
                let creds = keys.get(&e.reference)?.iter().find_map(|k| keyrings.get(k)?.for_registry(&e.registry))?;
                Some((e.reference.clone(), creds.clone()))
            })
            .collect()
    }

    /// The leader's watch of the fallback DaemonSets' pods (replaced when the DaemonSet moves).
    pub fn attach_fallback(&self, workloads: Workloads) {
        if let Ok(mut fallback) = self.sets.fallback.lock() {
            *fallback = Some(workloads);
        }
    }

    /// The fallback pods' change counter, once the leader watches them.
    pub fn fallback_changes(&self) -> Option<watch::Receiver<u64>> {
        let workloads = self.sets.fallback.lock().ok().and_then(|f| f.clone())?;
        let mut changes = workloads.pods.changed.clone();
        changes.mark_unchanged();
        Some(changes)
    }

    /// The images the fallback pods Ready on each node run (empty until the leader watches them).
    pub fn fallback_images(&self) -> HashMap<String, BTreeSet<String>> {
        let workloads = self.sets.fallback.lock().ok().and_then(|f| f.clone());
        workloads.map(|w| w.fallback_images()).unwrap_or_default()
    }

    /// The node watch every replica follows (node labels select sets).
    pub fn attach_nodes(&self, nodes: NodeView) {
        let _ = self.sets.nodes.set(nodes);
    }

    /// A node's labels as the watch shows them (`None`: not listed yet, or no such node).
    fn node_labels(&self, node: &str) -> Option<BTreeMap<String, String>> {
        let view = self.sets.nodes.get()?;
        if !view.listed() {
            return None;
        }
        let object = view.store.get(&kube::runtime::reflector::ObjectRef::new(node))?;
        Some(object.metadata.labels.clone().unwrap_or_default())
    }

    /// Waits on this to see `node`'s labels change.
    pub fn subscribe_labels(&self, node: &str) -> watch::Receiver<u64> {
        let Ok(mut labels) = self.sets.labels.lock() else { return watch::channel(0).1 };
        let entry = labels
            .entry(node.to_string())
            .or_insert_with(|| (self.node_labels(node).unwrap_or_default(), watch::channel(0).0));
        entry.1.subscribe()
    }

    /// The node watch showed `touch`: the streams of nodes whose labels changed look again.
    pub fn labels_touched(&self, touch: &Touch) {
        let Ok(mut labels) = self.sets.labels.lock() else { return };
        let mut changed = false;
        let mut look = |node: &str, (known, tx): &mut Labels| {
            let now = self.node_labels(node).unwrap_or_default();
            if now != *known {
                *known = now;
                tx.send_modify(|v| *v += 1);
                changed = true;
            }
        };
        match touch {
            Touch::One(node) => {
                if let Some(entry) = labels.get_mut(node) {
                    look(node, entry);
                }
            }
            Touch::All => {
                for (node, entry) in labels.iter_mut() {
                    look(node, entry);
                }
            }
        }
        if changed {
            self.sets.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The list `node` should have (`None`: not known yet; wait). Without image sets: the
    /// published list, as every node gets it.
    pub fn images_for(&self, node: &str) -> Option<ImageList> {
        self.node_lists(node).map(|(list, _, _)| list)
    }

    /// `node`'s list, refresh interval and the sets' pull-secret keys per image (`None`: not
    /// known yet).
    fn node_lists(&self, node: &str) -> Option<(ImageList, Duration, BTreeMap<String, Vec<String>>)> {
        let published = self.current();
        let interval = published.config.refresh_interval;
        if !self.image_sets_enabled() || published.config.release != v1::Release::None {
            return Some((published.config.images.clone(), interval, BTreeMap::new()));
        }
        let accepted = self.accepted_sets()?;
        let labels = self.node_labels(node)?;
        // The KIP ConfigMap is the default set, for the nodes its NODE_SELECTOR picks (as KIP's
        // DaemonSet runs only there).
        let selected = published.config.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v));
        let none = ImageList::default();
        let default = if selected { &published.config.images } else { &none };
        let sets = selecting(&accepted.sets, &labels);
        Some((node_list(default, &sets), node_refresh_interval(interval, &sets), node_pull_secrets(&sets)))
    }

    /// Every tag the coordinator keeps resolved, and how often: the published list's and every
    /// set's in use (none during a release).
    pub fn watched_tags(&self) -> BTreeMap<String, (ImageEntry, Duration)> {
        let published = self.current();
        if published.config.release != v1::Release::None {
            return BTreeMap::new();
        }
        let accepted = if self.image_sets_enabled() { self.accepted_sets() } else { None };
        let sets = accepted.as_ref().map_or(&[][..], |a| a.sets.as_slice());
        tag_intervals(&published.config.images, published.config.refresh_interval, sets)
    }

    /// Whether `config`'s list or a set in use lists `reference` (its digest is kept).
    pub(super) fn lists(&self, config: &KipConfig, reference: &str) -> bool {
        config.images.contains_reference(reference)
            || (self.image_sets_enabled()
                && self.accepted_sets().is_some_and(|a| a.sets.iter().any(|s| s.images.contains_reference(reference))))
    }

    /// What `node`'s agent is sent (`None`: not known yet).
    pub fn update_for(&self, node: &str) -> Option<v1::ImageListUpdate> {
        let published = self.current();
        let mut update = published.to_update();
        if !self.image_sets_enabled() || published.config.release != v1::Release::None {
            return Some(update);
        }
        let (list, refresh, pull_secrets) = self.node_lists(node)?;
        update.generation = published.generation + self.sets.generation.load(Ordering::SeqCst);
        if let Some(policy) = update.policy.as_mut() {
            policy.refresh_interval_seconds = refresh.as_secs().max(1);
        }
        update.images = list
            .entries()
            .iter()
            .map(|e| v1::Image {
                name: e.name.clone(),
                image: e.image.clone(),
                digest: published.digests.get(&e.reference).cloned().unwrap_or_default(),
                pull_secrets: pull_secrets.get(&e.reference).cloned().unwrap_or_default(),
            })
            .collect();
        Some(update)
    }
}
