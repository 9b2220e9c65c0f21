//! The published image list: one generation of the configuration with the digests the
//! coordinator resolved, a watch channel every agent stream follows, and the resolver's answers.

use std::collections::BTreeMap;
use std::sync::Arc;

use kip::v1;
use tokio::sync::watch;

use super::{image_labels, State};
use crate::config::KipConfig;
use crate::resolve::Resolved;

/// One published generation of the configuration.
#[derive(Debug)]
pub struct Published {
    pub generation: u64,
    pub config: KipConfig,
    /// The digest each listed tag resolves to (by normalized reference), where the coordinator
    /// resolved it; agents whose node has it do not pull.
    pub digests: BTreeMap<String, String>,
}

impl Published {
    pub fn to_update(&self) -> v1::ImageListUpdate {
        let p = &self.config.policy;
        // A release keeps nothing: the list goes out empty.
        let images = match self.config.release {
            v1::Release::None => self.config.images.entries(),
            _ => &[],
        };
        v1::ImageListUpdate {
            generation: self.generation,
            release: self.config.release.into(),
            images: images
                .iter()
                .map(|e| v1::Image {
                    name: e.name.clone(),
                    image: e.image.clone(),
                    digest: self.digests.get(&e.reference).cloned().unwrap_or_default(),
                    pull_secrets: Vec::new(),
                })
                .collect(),
            policy: Some(v1::PullPolicy {
                max_parallel_pulls: p.max_parallel_pulls.unwrap_or(0),
                refresh_interval_seconds: self.config.refresh_interval.as_secs().max(1),
                check_interval_seconds: p.check_interval.map_or(0, |d| d.as_secs().max(1)),
                pull_timeout_seconds: p.pull_timeout.map_or(0, |d| d.as_secs().max(1)),
            }),
        }
    }
}

impl State {
    pub fn current(&self) -> Arc<Published> {
        self.list.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.list.subscribe()
    }

    /// Publishes `config` as a new generation unless it equals the current one.
    /// Returns the new generation, or `None` when nothing changed.
    pub fn publish(&self, mut config: KipConfig) -> Option<u64> {
        // Decided inside the channel's lock: the resolver publishes digests concurrently.
        let mut published = None;
        self.list.send_if_modified(|current| {
            if current.config.release != v1::Release::None && config.release != current.config.release {
                // The uninstall hook's ConfigMap goes away before the coordinator does: a release
                // is final for this process (a restart caches again).
                tracing::warn!(
                    release = current.config.release.as_str_name(),
                    "KIP_RELEASE changed after a release; the release stays in force until the coordinator restarts"
                );
                config.release = current.config.release;
            }
            if current.config == config {
                return false;
            }
            // Digests of tags still listed stay until the resolver has looked again.
            let digests = current
                .digests
                .iter()
                .filter(|(r, _)| self.lists(&config, r))
                .map(|(r, d)| (r.clone(), d.clone()))
                .collect();
            let next = Arc::new(Published { generation: current.generation + 1, config: config.clone(), digests });
            published = Some((current.clone(), next.clone()));
            *current = next;
            true
        });
        let (previous, next) = published?;
        let (old, new) = (&previous.config.images, &next.config.images);
        let added: Vec<&str> =
            new.entries().iter().filter(|e| !old.entries().contains(e)).map(|e| e.name.as_str()).collect();
        let removed: Vec<&str> =
            old.entries().iter().filter(|e| !new.entries().contains(e)).map(|e| e.name.as_str()).collect();
        tracing::info!(
            generation = next.generation,
            images = new.len(),
            added = ?added,
            removed = ?removed,
            "published a new image list"
        );
        self.metrics.config_generation.set(next.generation as i64);
        self.metrics.images_desired.set(new.len() as i64);
        self.metrics.config_reloads.inc();
        self.refresh_image_metrics(&next);
        self.track_release(&next.config);
        Some(next.generation)
    }

    /// Takes the resolver's answers: logs what changed, sets `kip_image_resolved`, and publishes a
    /// new generation when a digest changed. Answers for references no longer listed are dropped.
    pub fn set_resolution(&self, answers: BTreeMap<String, Resolved>) {
        let current = self.current();
        // The default list's tags and every set's in use; a set gone takes its digests along.
        let watched = self.watched_tags();
        let listed = |r: &String| watched.contains_key(r);
        let answers: BTreeMap<String, Resolved> = answers.into_iter().filter(|(r, _)| listed(r)).collect();
        // Tags the round did not ask about (listed after it started) keep what was known.
        let old = self.resolution.read().map(|r| r.clone()).unwrap_or_default();
        let mut merged: BTreeMap<String, Resolved> =
            old.iter().filter(|(r, _)| listed(r)).map(|(r, a)| (r.clone(), a.clone())).collect();
        for (reference, now) in &answers {
            if old.get(reference) != Some(now) {
                match (now, old.get(reference)) {
                    (Resolved::Digest(d), Some(Resolved::Digest(before))) => {
                        tracing::info!(image = %reference, digest = %d, before = %before, "tag moved: nodes pull it once")
                    }
                    (Resolved::Digest(d), _) => {
                        tracing::info!(image = %reference, digest = %d, "tag resolved by the coordinator: nodes that have it do not pull")
                    }
                    (Resolved::Unresolved(why), _) => {
                        tracing::warn!(image = %reference, why = %why, "tag not resolved: agents refresh it on their own interval")
                    }
                }
            }
            merged.insert(reference.clone(), now.clone());
        }
        for e in current.config.images.entries() {
            let resolved = matches!(merged.get(&e.reference), Some(Resolved::Digest(_)));
            self.metrics.image_resolved.get_or_create(&image_labels(e)).set(resolved as i64);
        }
        if let Ok(mut r) = self.resolution.write() {
            *r = merged;
        }
        let mut published = None;
        self.list.send_if_modified(|current| {
            // Decided on the list as it is now (it may have changed since the round began): an
            // answer changes its tag's digest; a tag without an answer keeps its own.
            let listed_now = |r: &String| self.lists(&current.config, r);
            let mut digests = current.digests.clone();
            digests.retain(|r, _| listed_now(r));
            for (reference, answer) in &answers {
                match answer {
                    Resolved::Digest(d) if listed_now(reference) => {
                        digests.insert(reference.clone(), d.clone());
                    }
                    _ => {
                        digests.remove(reference);
                    }
                }
            }
            if digests == current.digests {
                return false;
            }
            let next =
                Arc::new(Published { generation: current.generation + 1, config: current.config.clone(), digests });
            published = Some(next.clone());
            *current = next;
            true
        });
        if let Some(next) = published {
            tracing::info!(generation = next.generation, resolved = next.digests.len(), "published new digests");
            self.metrics.config_generation.set(next.generation as i64);
        }
    }

    /// What the resolver last said per listed tag.
    pub fn resolution(&self) -> BTreeMap<String, Resolved> {
        self.resolution.read().map(|r| r.clone()).unwrap_or_default()
    }
}
