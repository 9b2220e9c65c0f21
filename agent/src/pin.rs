//! Pinning on containerd: the `io.cri-containerd.pinned=pinned` label, set through the
//! native images API (namespace `k8s.io`) with a field mask so nothing else on the record
//! changes, plus kip's own label recording that kip set the pin, so kip only removes its own.

use std::collections::HashMap;

use kip::containerd::services::images::v1::{
    images_client::ImagesClient, GetImageRequest, Image, ListImagesRequest, UpdateImageRequest,
};
use tonic::transport::Channel;

pub const PIN_LABEL: &str = "io.cri-containerd.pinned";
pub const PIN_VALUE: &str = "pinned";
pub const OWNER_LABEL: &str = "kip.eclipse.dev/pinned-by";
pub const OWNER_VALUE: &str = "kip";
/// The namespace the CRI plugin keeps kubelet's images in.
pub const CRI_NAMESPACE: &str = "k8s.io";

#[derive(Debug, thiserror::Error)]
#[error("containerd images.{op} `{name}` failed: {message}")]
pub struct PinError {
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

pub fn pin_state(labels: &HashMap<String, String>) -> PinState {
    let pinned = labels.get(PIN_LABEL).is_some_and(|v| v == PIN_VALUE);
    let ours = labels.get(OWNER_LABEL).is_some_and(|v| v == OWNER_VALUE);
    match (pinned, ours) {
        (true, true) => PinState::PinnedByKip,
        (true, false) => PinState::PinnedByOther,
        // Our owner label without the pin (someone removed the pin): treat as unpinned.
        (false, _) => PinState::Unpinned,
    }
}

#[derive(Clone, Debug)]
pub struct Pinner {
    images: ImagesClient<Channel>,
}

impl Pinner {
    pub fn new(channel: Channel) -> Self {
        Self { images: ImagesClient::new(channel) }
    }

    /// Pins every given record that is not pinned yet. Records that do not exist are skipped
    /// (a re-pull may have renamed them); returns how many records were changed. Records in
    /// `foreign` were pinned by someone else before a pull: containerd 1.6 drops every label of
    /// a record on a CRI re-pull, so their pin is restored as theirs, without kip's owner label.
    pub async fn pin(&self, names: &[String], foreign: &[String]) -> Result<usize, PinError> {
        let mut changed = 0;
        for name in names {
            let Some(image) = self.get(name).await? else { continue };
            if pin_state(&image.labels) == PinState::Unpinned {
                let owner = if foreign.contains(name) { "" } else { OWNER_VALUE };
                self.set_labels(name, PIN_VALUE, owner).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The records among `names` that someone other than kip has pinned.
    pub async fn pinned_by_others(&self, names: &[String]) -> Result<Vec<String>, PinError> {
        let mut foreign = Vec::new();
        for name in names {
            if let Some(image) = self.get(name).await? {
                if pin_state(&image.labels) == PinState::PinnedByOther {
                    foreign.push(name.clone());
                }
            }
        }
        Ok(foreign)
    }

    /// True when every existing record among `names` carries the pin.
    pub async fn is_pinned(&self, names: &[String]) -> Result<bool, PinError> {
        let mut seen = false;
        for name in names {
            if let Some(image) = self.get(name).await? {
                seen = true;
                if pin_state(&image.labels) == PinState::Unpinned {
                    return Ok(false);
                }
            }
        }
        Ok(seen)
    }

    /// Removes the pin from records kip pinned; pins set by others stay.
    pub async fn unpin(&self, names: &[String]) -> Result<usize, PinError> {
        let mut changed = 0;
        for name in names {
            let Some(image) = self.get(name).await? else { continue };
            if image.labels.get(OWNER_LABEL).is_some_and(|v| v == OWNER_VALUE) {
                // An empty value under the mask deletes the label.
                self.set_labels(name, "", "").await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Names of every record that carries kip's owner label.
    pub async fn kip_pinned_names(&self) -> Result<Vec<String>, PinError> {
        let req = with_namespace(ListImagesRequest { filters: vec![] });
        let resp = self.images.clone().list(req).await.map_err(|s| pin_error("List", "*", &s))?;
        Ok(resp
            .into_inner()
            .images
            .into_iter()
            .filter(|i| i.labels.get(OWNER_LABEL).is_some_and(|v| v == OWNER_VALUE))
            .map(|i| i.name)
            .collect())
    }

    async fn get(&self, name: &str) -> Result<Option<Image>, PinError> {
        let req = with_namespace(GetImageRequest { name: name.to_string() });
        match self.images.clone().get(req).await {
            Ok(resp) => Ok(resp.into_inner().image),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(pin_error("Get", name, &s)),
        }
    }

    async fn set_labels(&self, name: &str, pin: &str, owner: &str) -> Result<(), PinError> {
        let labels =
            HashMap::from([(PIN_LABEL.to_string(), pin.to_string()), (OWNER_LABEL.to_string(), owner.to_string())]);
        let req = UpdateImageRequest {
            image: Some(Image { name: name.to_string(), labels, ..Default::default() }),
            // Never send an empty mask: containerd would replace the whole record, target included.
            update_mask: Some(prost_types::FieldMask { paths: label_mask() }),
            source_date_epoch: None,
        };
        self.images.clone().update(with_namespace(req)).await.map_err(|s| pin_error("Update", name, &s))?;
        Ok(())
    }
}

fn label_mask() -> Vec<String> {
    vec![format!("labels.{PIN_LABEL}"), format!("labels.{OWNER_LABEL}")]
}

fn with_namespace<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("containerd-namespace", tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE));
    req
}

fn pin_error(op: &'static str, name: &str, s: &tonic::Status) -> PinError {
    PinError { op, name: name.to_string(), code: s.code(), message: s.message().to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn pin_ownership_is_read_from_the_labels() {
        assert_eq!(pin_state(&labels(&[])), PinState::Unpinned);
        assert_eq!(pin_state(&labels(&[(PIN_LABEL, "pinned")])), PinState::PinnedByOther);
        assert_eq!(pin_state(&labels(&[(PIN_LABEL, "pinned"), (OWNER_LABEL, "kip")])), PinState::PinnedByKip);
        assert_eq!(pin_state(&labels(&[(OWNER_LABEL, "kip")])), PinState::Unpinned);
        assert_eq!(pin_state(&labels(&[(PIN_LABEL, "yes")])), PinState::Unpinned);
    }

    #[test]
    fn the_mask_names_only_the_two_labels() {
        assert_eq!(label_mask(), vec!["labels.io.cri-containerd.pinned", "labels.kip.eclipse.dev/pinned-by"]);
    }
}
