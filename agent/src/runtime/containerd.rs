//! containerd: images through the CRI, pins as the label `io.cri-containerd.pinned=pinned` on
//! every record of the image (namespace `k8s.io`) plus kip's own `kip.eclipse.dev/pinned-by=kip`
//! and `kip.eclipse.dev/pinned-as=<the record's name>`, so kip only ever removes pins it set (not
//! those of a copy an admin made with `ctr images tag`). Labels change through the native images API, and an
//! update always carries the whole record as read (target included) with a field mask naming
//! only kip's two labels: containerd >= 1.7 crashes on an update without a target, and an empty
//! mask would replace the whole record.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kip::containerd::services::images::v1::{
    images_client::ImagesClient, DeleteImageRequest, GetImageRequest, Image, ListImagesRequest, UpdateImageRequest,
};
use kip::cri::AuthConfig;
use tonic::transport::Channel;

use super::{
    every_record_pinned, parse_version, plan_removal, CriOnly, Keep, Removal, RemovalVerdict, Runtime, RuntimeError,
    Snapshot,
};
use crate::cri::{unix_channel, CriClient, ImageInfo, RuntimeInfo};

pub const PIN_LABEL: &str = "io.cri-containerd.pinned";
pub const PIN_VALUE: &str = "pinned";
pub const OWNER_LABEL: &str = "kip.eclipse.dev/pinned-by";
pub const OWNER_VALUE: &str = "kip";
/// The name of the record kip pinned, set with the pin: a copy of the record under another name
/// (`ctr images tag` copies every label, kip's included, on 1.6 and 1.7) is then not kip's, and
/// kip neither unpins nor deletes it. Records pinned by kip before this label count as kip's.
pub const PINNED_AS_LABEL: &str = "kip.eclipse.dev/pinned-as";
/// The namespace the CRI plugin keeps kubelet's images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

#[derive(Debug, thiserror::Error)]
#[error("containerd images.{op} `{name}` failed: {message}")]
pub struct LabelError {
    pub op: &'static str,
    pub name: String,
    pub code: tonic::Code,
    pub message: String,
}

/// Who holds the pin on one image record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinState {
    Unpinned,
    PinnedByKip,
    /// Pinned by someone else (kubelet config, an admin): kip never removes it.
    PinnedByOther,
}

/// Whether the record `name` carries kip's marks as kip set them on it: its owner label, and no
/// `pinned-as` naming another record (a copy made with `ctr images tag` is not kip's).
fn claimed_by_kip(name: &str, labels: &HashMap<String, String>) -> bool {
    labels.get(OWNER_LABEL).is_some_and(|v| v == OWNER_VALUE)
        && labels.get(PINNED_AS_LABEL).is_none_or(|v| v.is_empty() || v == name)
}

pub fn pin_state(name: &str, labels: &HashMap<String, String>) -> PinState {
    let pinned = labels.get(PIN_LABEL).is_some_and(|v| v == PIN_VALUE);
    let ours = claimed_by_kip(name, labels);
    match (pinned, ours) {
        (true, true) => PinState::PinnedByKip,
        (true, false) => PinState::PinnedByOther,
        // Our owner label without the pin (someone removed the pin): treat as unpinned.
        (false, _) => PinState::Unpinned,
    }
}

/// The label change kip makes to one record: the record as read, with kip's two labels set
/// (`Some`) or deleted (`None`; an empty value under the mask deletes a label). Every other
/// field and label goes back exactly as read.
pub fn relabel(mut record: Image, pin: Option<&str>) -> UpdateImageRequest {
    match pin {
        Some(owner) => {
            record.labels.insert(PIN_LABEL.to_string(), PIN_VALUE.to_string());
            record.labels.insert(OWNER_LABEL.to_string(), owner.to_string());
            record.labels.insert(PINNED_AS_LABEL.to_string(), record.name.clone());
        }
        None => {
            for label in [PIN_LABEL, OWNER_LABEL, PINNED_AS_LABEL] {
                record.labels.insert(label.to_string(), String::new());
            }
        }
    }
    UpdateImageRequest {
        image: Some(record),
        update_mask: Some(prost_types::FieldMask {
            paths: [PIN_LABEL, OWNER_LABEL, PINNED_AS_LABEL].iter().map(|l| format!("labels.{l}")).collect(),
        }),
        source_date_epoch: None,
    }
}

/// Labels a record had before a pull and has lost since; a label the CRI changed (rather than
/// dropped) is the CRI's to set and stays as it is now.
pub fn lost_labels(before: &HashMap<String, String>, now: &HashMap<String, String>) -> HashMap<String, String> {
    before.iter().filter(|(k, _)| !now.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The record as it is now with `lost` labels put back, the mask naming only those.
pub fn restore_labels(mut record: Image, lost: HashMap<String, String>) -> UpdateImageRequest {
    let mut paths: Vec<String> = lost.keys().map(|k| format!("labels.{k}")).collect();
    paths.sort();
    record.labels.extend(lost);
    UpdateImageRequest {
        image: Some(record),
        update_mask: Some(prost_types::FieldMask { paths }),
        source_date_epoch: None,
    }
}

/// Whether this containerd reports pins through CRI `Image.pinned` (1.6.22, 1.7.3, 2.0 and
/// later). Older ones store the label but say nothing, so kip reads the labels itself.
pub fn reports_pins(version: &str) -> bool {
    match parse_version(version) {
        Some((1, 6, patch)) => patch >= 22,
        Some((1, 7, patch)) => patch >= 3,
        Some((1, minor, _)) => minor > 7,
        Some((major, _, _)) => major >= 2,
        None => false,
    }
}

#[derive(Clone, Debug)]
pub struct Containerd {
    /// Images, status and pulls: plain CRI.
    base: CriOnly,
    images: ImagesClient<Channel>,
    reports_pins: bool,
    /// The CRI client's deadline, for the native calls too.
    call_timeout: Duration,
}

/// `call` within `timeout`; an elapsed one is `DeadlineExceeded`, which counts as containerd
/// not answering.
async fn within<T>(
    timeout: Duration,
    op: &'static str,
    name: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<Result<T, tonic::Status>, LabelError> {
    tokio::time::timeout(timeout, call).await.map_err(|_| LabelError {
        op,
        name: name.to_string(),
        code: tonic::Code::DeadlineExceeded,
        message: format!("no answer within {}", humantime::format_duration(timeout)),
    })
}

impl Containerd {
    pub fn new(cri: CriClient, info: RuntimeInfo) -> Self {
        let images = ImagesClient::new(unix_channel(cri.socket()));
        let reports_pins = reports_pins(&info.version);
        let call_timeout = cri.call_timeout();
        Self { base: CriOnly::new(cri, info), images, reports_pins, call_timeout }
    }

    async fn get(&self, name: &str) -> Result<Option<Image>, LabelError> {
        let req = with_namespace(GetImageRequest { name: name.to_string() });
        match within(self.call_timeout, "Get", name, self.images.clone().get(req)).await? {
            Ok(resp) => Ok(resp.into_inner().image),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(label_error("Get", name, &s)),
        }
    }

    async fn update(&self, req: UpdateImageRequest) -> Result<(), LabelError> {
        let name = req.image.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        if req.image.as_ref().is_none_or(|i| i.target.is_none()) {
            // Never send what would crash containerd >= 1.7 (see the module docs).
            return Err(LabelError {
                op: "Update",
                name,
                code: tonic::Code::FailedPrecondition,
                message: "refused to send a record without its target".into(),
            });
        }
        match within(self.call_timeout, "Update", &name, self.images.clone().update(with_namespace(req))).await? {
            Ok(_) => Ok(()),
            // Removed between Get and Update (kubelet GC): nothing left to label.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(label_error("Update", &name, &s)),
        }
    }

    /// Deletes one record, only while it still points at the target it was read with (the
    /// field is ignored by 1.6, which has no such check).
    async fn delete(&self, record: &Image) -> Result<(), LabelError> {
        let req = with_namespace(DeleteImageRequest {
            name: record.name.clone(),
            sync: false,
            target: record.target.clone(),
        });
        match within(self.call_timeout, "Delete", &record.name, self.images.clone().delete(req)).await? {
            Ok(_) => Ok(()),
            // Gone already (kubelet GC), or re-pointed since it was read: not kip's to delete.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(label_error("Delete", &record.name, &s)),
        }
    }

    /// Every image record of the CRI's namespace, labels included.
    async fn list(&self) -> Result<Vec<Image>, LabelError> {
        let req = with_namespace(ListImagesRequest { filters: vec![] });
        let listed = within(self.call_timeout, "List", "*", self.images.clone().list(req)).await?;
        Ok(listed.map_err(|s| label_error("List", "*", &s))?.into_inner().images)
    }

    /// Pins every unpinned record in `names` as kip's; returns how many changed.
    async fn pin_records(&self, names: &[String]) -> Result<usize, LabelError> {
        let mut changed = 0;
        for name in names {
            let Some(record) = self.get(name).await? else { continue };
            if pin_state(&record.name, &record.labels) == PinState::Unpinned {
                self.update(relabel(record, Some(OWNER_VALUE))).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }
}

impl Runtime for Containerd {
    fn info(&self) -> &RuntimeInfo {
        self.base.info()
    }
    fn socket(&self) -> &std::path::Path {
        self.base.socket()
    }
    fn pin_problem(&self) -> Option<String> {
        None
    }

    async fn snapshot(&self) -> Result<Snapshot, RuntimeError> {
        let images = self.base.snapshot().await?;
        if self.reports_pins {
            return Ok(images);
        }
        let records = self.list().await?;
        let pins = records
            .into_iter()
            .map(|r| (r.name.clone(), pin_state(&r.name, &r.labels) != PinState::Unpinned))
            .collect();
        Ok(Snapshot { record_pins: Some(pins), ..images })
    }

    async fn status(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        self.base.status(reference).await
    }

    async fn pull(
        &self,
        reference: &str,
        known: Option<&ImageInfo>,
        auth: Option<AuthConfig>,
        timeout: Duration,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        // A CRI pull of an image that is already there rewrites its records' labels (seen on
        // 1.6.20, 1.7.24 and 2.1.9): remember them so an admin's labels and pins, and kip's
        // own, are put back as they were.
        let mut before = Vec::new();
        for name in known.map(|image| image.refs_of(reference)).unwrap_or_default() {
            before.extend(self.get(&name).await?);
        }
        let after = self.base.pull(reference, known, auth, timeout).await?;
        for old in before {
            let Some(now) = self.get(&old.name).await? else { continue };
            let lost = lost_labels(&old.labels, &now.labels);
            if !lost.is_empty() {
                tracing::info!(image = reference, record = %now.name, labels = ?lost.keys().collect::<Vec<_>>(), "restoring labels the pull removed");
                self.update(restore_labels(now, lost)).await?;
            }
        }
        Ok(after)
    }

    async fn is_pinned(&self, reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        if self.reports_pins || image.pinned {
            return Ok(image.pinned);
        }
        // Older containerd: every record of the image must carry a pin (kip's or anyone's).
        let records = image.refs_of(reference);
        let mut pins = HashMap::new();
        for name in &records {
            if let Some(record) = self.get(name).await? {
                pins.insert(record.name.clone(), pin_state(&record.name, &record.labels) != PinState::Unpinned);
            }
        }
        Ok(every_record_pinned(&records, &pins))
    }

    async fn pin(&self, reference: &str, image: &ImageInfo) -> Result<bool, RuntimeError> {
        let changed = self.pin_records(&image.refs_of(reference)).await?;
        if changed > 0 {
            tracing::info!(image = reference, records = changed, "pinned");
        }
        Ok(true)
    }

    async fn sync_pins(&self, keep: &Keep) -> Result<Vec<String>, RuntimeError> {
        let ours: Vec<Image> = self
            .list()
            .await?
            .into_iter()
            // Kip's label without the pin (someone took the pin off) is still cleaned up.
            .filter(|r| claimed_by_kip(&r.name, &r.labels))
            .collect();
        let released = crate::reconcile::to_release(ours.iter().map(|r| r.name.as_str()), keep);
        for record in ours.into_iter().filter(|r| released.contains(&r.name)) {
            self.update(relabel(record, None)).await?;
        }
        Ok(released)
    }

    /// Through the native images API, record by record: the CRI's `RemoveImage` would delete
    /// every name of the image, an admin's `ctr images tag` of the same content included. The
    /// records of one image are those with the same target; only an image whose every record
    /// is kip's ([`plan_removal`]) is deleted, each record conditional on its target.
    async fn remove_released(&self, released: &[String]) -> Result<Removal, RuntimeError> {
        let mut images: BTreeMap<String, Vec<Image>> = BTreeMap::new();
        for record in self.list().await? {
            if let Some(target) = &record.target {
                images.entry(target.digest.clone()).or_default().push(record);
            }
        }
        let images: Vec<Vec<Image>> = images.into_values().collect();
        let names: Vec<Vec<String>> = images.iter().map(|g| g.iter().map(|r| r.name.clone()).collect()).collect();
        let mut removal = Removal::default();
        for (i, verdict) in plan_removal(&names, released) {
            match verdict {
                RemovalVerdict::Delete => {
                    // The image ID record last: the CRI finds the image by it until the end.
                    let mut records: Vec<&Image> = images[i].iter().collect();
                    records.sort_by_key(|r| r.name.starts_with("sha256:"));
                    for record in records {
                        self.delete(record).await?;
                        removal.deleted.push(record.name.clone());
                    }
                }
                RemovalVerdict::Keep { name, why } => removal.kept.push((name, why)),
            }
        }
        Ok(removal)
    }
}

fn with_namespace<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("containerd-namespace", tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE));
    req
}

fn label_error(op: &'static str, name: &str, s: &tonic::Status) -> LabelError {
    LabelError { op, name: name.to_string(), code: s.code(), message: s.message().to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kip::containerd::types::Descriptor;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn record() -> Image {
        Image {
            name: "r/a:1".into(),
            labels: labels(&[("io.cri-containerd.image", "managed"), ("example.com/owner", "admin")]),
            target: Some(Descriptor {
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                digest: "sha256:aaa".into(),
                size: 123,
                annotations: HashMap::new(),
            }),
            created_at: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
            updated_at: Some(prost_types::Timestamp { seconds: 2, nanos: 0 }),
        }
    }

    #[test]
    fn pin_ownership_is_read_from_the_labels() {
        let n = "r/a:1";
        assert_eq!(pin_state(n, &labels(&[])), PinState::Unpinned);
        assert_eq!(pin_state(n, &labels(&[(PIN_LABEL, "pinned")])), PinState::PinnedByOther);
        assert_eq!(pin_state(n, &labels(&[(PIN_LABEL, "pinned"), (OWNER_LABEL, "kip")])), PinState::PinnedByKip);
        assert_eq!(pin_state(n, &labels(&[(OWNER_LABEL, "kip")])), PinState::Unpinned);
        assert_eq!(pin_state(n, &labels(&[(PIN_LABEL, "yes")])), PinState::Unpinned);
        let kips = [(PIN_LABEL, "pinned"), (OWNER_LABEL, "kip"), (PINNED_AS_LABEL, "r/a:1")];
        assert_eq!(pin_state(n, &labels(&kips)), PinState::PinnedByKip);
        // `ctr images tag r/a:1 admin/keep:1` copies every label: the copy is not kip's.
        assert_eq!(pin_state("admin/keep:1", &labels(&kips)), PinState::PinnedByOther);
    }

    #[test]
    fn an_update_sends_the_whole_record_and_masks_only_kip_s_labels() {
        let req = relabel(record(), Some(OWNER_VALUE));
        let sent = req.image.unwrap();
        let expected = record();
        assert_eq!(sent.target, expected.target, "the target goes back as read");
        assert_eq!((sent.created_at, sent.updated_at), (expected.created_at, expected.updated_at));
        assert_eq!(sent.labels.get("example.com/owner").map(String::as_str), Some("admin"));
        assert_eq!(sent.labels.get(PIN_LABEL).map(String::as_str), Some(PIN_VALUE));
        assert_eq!(sent.labels.get(OWNER_LABEL).map(String::as_str), Some(OWNER_VALUE));
        assert_eq!(sent.labels.get(PINNED_AS_LABEL), Some(&sent.name), "the record's own name");
        assert_eq!(
            req.update_mask.unwrap().paths,
            vec![
                "labels.io.cri-containerd.pinned",
                "labels.kip.eclipse.dev/pinned-by",
                "labels.kip.eclipse.dev/pinned-as"
            ]
        );
    }

    #[test]
    fn unpinning_empties_kip_s_labels_under_the_mask_and_keeps_the_rest() {
        let mut pinned = record();
        pinned.labels.insert(PIN_LABEL.into(), PIN_VALUE.into());
        pinned.labels.insert(OWNER_LABEL.into(), OWNER_VALUE.into());
        let req = relabel(pinned, None);
        let sent = req.image.unwrap();
        assert!(sent.target.is_some());
        assert_eq!(sent.labels.get(PIN_LABEL).map(String::as_str), Some(""));
        assert_eq!(sent.labels.get(OWNER_LABEL).map(String::as_str), Some(""));
        assert_eq!(sent.labels.get(PINNED_AS_LABEL).map(String::as_str), Some(""));
        assert_eq!(sent.labels.get("io.cri-containerd.image").map(String::as_str), Some("managed"));
        assert_eq!(req.update_mask.unwrap().paths.len(), 3);
    }

    #[test]
    fn labels_a_pull_dropped_are_restored_and_nothing_else_is_touched() {
        let before = labels(&[
            ("io.cri-containerd.image", "managed"),
            ("example.com/owner", "admin"),
            (PIN_LABEL, PIN_VALUE),
            ("io.cri-containerd.other", "old"),
        ]);
        let now = labels(&[("io.cri-containerd.image", "managed"), ("io.cri-containerd.other", "new")]);
        let lost = lost_labels(&before, &now);
        assert_eq!(lost, labels(&[("example.com/owner", "admin"), (PIN_LABEL, PIN_VALUE)]));
        let mut now_record = record();
        now_record.labels = now;
        let req = restore_labels(now_record, lost);
        assert_eq!(req.update_mask.unwrap().paths, vec!["labels.example.com/owner", "labels.io.cri-containerd.pinned"]);
        let sent = req.image.unwrap();
        assert!(sent.target.is_some(), "sent whole, target included");
        assert_eq!(
            sent.labels.get("io.cri-containerd.other").map(String::as_str),
            Some("new"),
            "the CRI's change stays"
        );
        assert!(lost_labels(&before, &before).is_empty());
    }

    #[test]
    fn versions_that_report_pins_through_the_cri() {
        for v in ["1.6.22", "1.6.38~ds1", "v1.7.3", "1.7.24~ds1", "1.8.0", "2.0.0", "2.1.9+unknown", "v2.3.4"] {
            assert!(reports_pins(v), "{v}");
        }
        for v in ["1.6.20~ds1", "1.6.21", "v1.7.2", "1.5.18", "", "devel", "v1"] {
            assert!(!reports_pins(v), "{v}");
        }
    }
}
