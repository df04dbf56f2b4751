//! State of one incremental (`DeltaSecrets`) stream.
//!
//! Delta xDS is the only way to tell Envoy a resource is gone: a federated
//! bundle removed from the Workload API context is sent as a removed resource.
//! Subscription changes apply whatever the nonce (a stale request that
//! subscribes to a new name is answered at once); a NACK counts only when it
//! answers the latest response. Each resource's version is a digest of its
//! bytes, so a reconnecting Envoy that reports `initial_resource_versions` gets
//! only what actually changed.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

use super::{NonceSource, RequestVerdict};
use crate::render::content_version;
use crate::render::{Rendered, TrustFormat, SECRET_TYPE_URL};

/// The explicit wildcard name of delta xDS.
const WILDCARD: &str = "*";

/// Per-stream protocol state; pure, driven by requests and snapshots.
#[derive(Debug)]
pub struct DeltaStream {
    started: bool,
    wildcard: bool,
    subscribed: BTreeSet<String>,
    format: TrustFormat,
    /// Version of each resource the client holds (reported or sent).
    client_versions: BTreeMap<String, String>,
    last_nonce: Option<String>,
}

impl DeltaStream {
    /// A new stream rendering trust in `format`.
    pub fn new(format: TrustFormat) -> Self {
        Self {
            started: false,
            wildcard: false,
            subscribed: BTreeSet::new(),
            format,
            client_versions: BTreeMap::new(),
            last_nonce: None,
        }
    }

    /// Sets how trust is rendered (chosen from the node of the first request).
    pub fn set_format(&mut self, format: TrustFormat) {
        self.format = format;
    }

    /// Bytes of names and versions this stream holds (for its connection's budget).
    pub fn held_bytes(&self) -> usize {
        let names: usize = self.subscribed.iter().map(String::len).sum();
        let versions: usize = self
            .client_versions
            .iter()
            .map(|(name, version)| name.len().saturating_add(version.len()))
            .sum();
        names.saturating_add(versions)
    }

    /// Names this stream is explicitly subscribed to (for limits).
    pub fn subscribed(&self) -> Option<usize> {
        Some(self.subscribed.len())
    }

    /// Applies one request; `Apply` means a response may now be due.
    pub fn on_request(&mut self, request: &DeltaDiscoveryRequest) -> RequestVerdict {
        let before = (self.wildcard, self.subscribed.len(), self.started);
        let subscribes_new = request
            .resource_names_subscribe
            .iter()
            .any(|n| n != WILDCARD && !self.subscribed.contains(n));
        if !self.started {
            self.started = true;
            self.wildcard = request.resource_names_subscribe.is_empty();
            self.client_versions = request
                .initial_resource_versions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        for name in &request.resource_names_subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.subscribed.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                self.subscribed.remove(name);
                self.client_versions.remove(name);
            }
        }
        let answers_latest = self.last_nonce.as_deref() == Some(request.response_nonce.as_str());
        let subscription_changed =
            subscribes_new || before != (self.wildcard, self.subscribed.len(), self.started);
        match &request.error_detail {
            Some(status) if answers_latest => RequestVerdict::Nack {
                message: status.message.clone(),
            },
            // A stale NACK is ignored, not the subscriptions it carries.
            Some(_) if subscription_changed => RequestVerdict::Apply,
            Some(_) => RequestVerdict::Stale,
            None => RequestVerdict::Apply,
        }
    }

    /// The response due for `rendered`: changed resources and removed ones, if any.
    pub fn response(
        &mut self,
        rendered: &Rendered,
        nonces: &NonceSource,
    ) -> Option<DeltaDiscoveryResponse> {
        if !self.started {
            return None;
        }
        let mut wanted = self.subscribed.clone();
        if self.wildcard {
            wanted.extend(rendered.available().iter().cloned());
        }
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in &wanted {
            match rendered.get(name, self.format) {
                Some(secret) if self.client_versions.get(name) != Some(&secret.version) => {
                    resources.push(Resource {
                        name: name.clone(),
                        version: secret.version.clone(),
                        resource: Some(secret.any.clone()),
                        ..Default::default()
                    });
                }
                Some(_) => {}
                None if self.client_versions.contains_key(name) => removed.push(name.clone()),
                None => {}
            }
        }
        // Wildcard resources that no longer exist.
        removed.extend(
            self.client_versions
                .keys()
                .filter(|name| !wanted.contains(*name))
                .cloned(),
        );
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        for name in &removed {
            self.client_versions.remove(name);
        }
        for resource in &resources {
            self.client_versions
                .insert(resource.name.clone(), resource.version.clone());
        }
        let system_version = content_version(
            self.client_versions
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes())),
        );
        let nonce = nonces.next();
        self.last_nonce = Some(nonce.clone());
        Some(DeltaDiscoveryResponse {
            system_version_info: system_version,
            resources,
            type_url: SECRET_TYPE_URL.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}
