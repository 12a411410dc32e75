//! Warning events on Services that the agent cannot proxy as asked (a
//! frontend another Service holds, maps full), so that `kubectl describe
//! service` says why, beside the agent's log and metrics. A task publishes
//! them with kube-rs' Recorder, which turns repeats into one event's
//! series; in manifests mode there is no API and the log says it alone.
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc;

use crate::model::ServiceId;

/// Why a Service is not (fully) proxied; the events' `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warning {
    /// One of its frontends belongs to an older Service.
    FrontendConflict,
    /// The BPF maps have no room for it.
    MapsFull,
}

impl Warning {
    fn reason(self) -> &'static str {
        match self {
            Warning::FrontendConflict => "FrontendConflict",
            Warning::MapsFull => "MapsFull",
        }
    }
}

/// Where the sync loop reports warnings about Services. Never blocks it:
/// publishing happens on a task, and a failure to publish is only logged.
#[derive(Clone, Default)]
pub struct EventSink(Option<mpsc::UnboundedSender<(ServiceId, Warning, String)>>);

impl EventSink {
    /// No API to publish to (manifests mode, tests).
    pub fn none() -> Self {
        EventSink(None)
    }

    /// Publishes to the cluster as controller `svclb`, instance `node`.
    pub fn to_api(client: Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "svclb".to_string(),
            instance: Some(node.to_string()),
        };
        let recorder = Recorder::new(client, reporter);
        let (tx, mut rx) = mpsc::unbounded_channel::<(ServiceId, Warning, String)>();
        tokio::spawn(async move {
            while let Some((service, warning, note)) = rx.recv().await {
                let event = Event {
                    type_: EventType::Warning,
                    reason: warning.reason().to_string(),
                    // The API caps a note at 1 kB.
                    note: Some(note.chars().take(1000).collect()),
                    action: "Proxy".to_string(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &reference(&service)).await {
                    tracing::warn!(%service, error = %e, "publishing an event");
                }
            }
        });
        EventSink(Some(tx))
    }

    pub fn warn(&self, service: &ServiceId, warning: Warning, note: String) {
        if let Some(tx) = &self.0 {
            let _ = tx.send((service.clone(), warning, note));
        }
    }
}

fn reference(service: &ServiceId) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Service".to_string()),
        namespace: Some(service.namespace.clone()),
        name: Some(service.name.clone()),
        ..Default::default()
    }
}
