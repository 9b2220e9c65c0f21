//! Kubernetes Events on the coordinator's Deployment, through one kube `Recorder` for the whole
//! process: repeats of an Event (same reason, action and note) become one Event series with a
//! count instead of one object each.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

/// Where Events go (`None`: nowhere, e.g. the Deployment was not found).
#[derive(Clone)]
pub struct Events(Option<(Recorder, ObjectReference)>);

impl Events {
    /// Events about `regarding` (the coordinator's Deployment), reported by this pod.
    pub fn new(client: &Client, regarding: Option<ObjectReference>) -> Self {
        Self(regarding.map(|r| {
            let reporter = Reporter { controller: "kip-coordinator".into(), instance: std::env::var("POD_NAME").ok() };
            (Recorder::new(client.clone(), reporter), r)
        }))
    }

    /// Namespace of the Deployment the Events are about.
    pub fn namespace(&self) -> Option<&str> {
        self.0.as_ref().and_then(|(_, r)| r.namespace.as_deref())
    }

    /// Records one Event; a failure to record is logged, never passed on.
    pub async fn record(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let Some((recorder, reference)) = &self.0 else { return };
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(e) = recorder.publish(&ev, reference).await {
            tracing::warn!(error = %e, reason, "cannot record an Event");
        }
    }
}
