//! Fixtures shared by the coordinator's unit tests.

use kip::v1;

/// A report of `node` whose agent reaches containerd and works on generation 1, with
/// `(name, image, cached, pinned)` per image.
pub fn report(node: &str, images: &[(&str, &str, bool, bool)]) -> v1::NodeReport {
    v1::NodeReport {
        node_name: node.into(),
        runtime: Some(v1::RuntimeState { available: true, name: "containerd".into(), ..Default::default() }),
        generation: 1,
        images: images
            .iter()
            .map(|(n, i, cached, pinned)| v1::ImageState {
                name: n.to_string(),
                image: i.to_string(),
                cached: *cached,
                pinned: *pinned,
                ..Default::default()
            })
            .collect(),
        agent_version: "test".into(),
        ..Default::default()
    }
}
