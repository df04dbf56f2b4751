//! State of one state-of-the-world (`StreamSecrets`) stream.
//!
//! Rules, as Envoy and SPIRE users expect them:
//! - the first request with no names is a wildcard; later empty names unsubscribe;
//! - a request whose `response_nonce` is not the latest sent is stale and ignored;
//! - a request with `error_detail` is a NACK: counted and logged, the rejected
//!   content is not resent, the next real change is;
//! - a response is sent only when a requested secret's bytes differ from what
//!   this stream last sent; it carries every requested secret available, no other;
//! - a name not (yet) available is held and answered when it appears.
//!
//! The stream keeps each sent secret's *version* (a digest of its bytes,
//! computed once per snapshot in [`Rendered`]), never the secret itself.

use std::collections::{BTreeMap, BTreeSet};

use super::{NonceSource, RequestVerdict};
use crate::render::content_version;
use crate::render::{Rendered, TrustFormat, SECRET_TYPE_URL};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

#[derive(Debug, PartialEq, Eq)]
enum Subscription {
    /// No request seen yet.
    Pending,
    /// Everything the snapshot can serve.
    Wildcard,
    /// Exactly these names (possibly none: unsubscribed).
    Names(BTreeSet<String>),
}

/// Per-stream protocol state; pure, driven by requests and snapshots.
#[derive(Debug)]
pub struct SotwStream {
    subscription: Subscription,
    format: TrustFormat,
    /// Version of each secret as last sent on this stream.
    sent: BTreeMap<String, String>,
    last_nonce: Option<String>,
}

impl SotwStream {
    /// A new stream rendering trust in `format`.
    pub fn new(format: TrustFormat) -> Self {
        Self {
            subscription: Subscription::Pending,
            format,
            sent: BTreeMap::new(),
            last_nonce: None,
        }
    }

    /// Sets how trust is rendered (chosen from the node of the first request).
    pub fn set_format(&mut self, format: TrustFormat) {
        self.format = format;
    }

    /// Applies one request; `Apply` means a response may now be due.
    pub fn on_request(&mut self, request: &DiscoveryRequest) -> RequestVerdict {
        if let Some(last) = &self.last_nonce {
            if request.response_nonce != *last {
                return RequestVerdict::Stale;
            }
        }
        let names: BTreeSet<String> = request
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        self.subscription = match (&self.subscription, names.is_empty()) {
            (Subscription::Pending, true) => Subscription::Wildcard,
            (_, _) => Subscription::Names(names),
        };
        if let Subscription::Names(names) = &self.subscription {
            // Forget what was sent for names dropped, so a later re-subscribe is answered.
            self.sent.retain(|name, _| names.contains(name));
        }
        match &request.error_detail {
            Some(status) => RequestVerdict::Nack {
                message: status.message.clone(),
            },
            None => RequestVerdict::Apply,
        }
    }

    /// The response due for `rendered`, if any requested secret changed.
    pub fn response(
        &mut self,
        rendered: &Rendered,
        nonces: &NonceSource,
    ) -> Option<DiscoveryResponse> {
        let format = self.format;
        let current: Vec<(&str, &crate::render::RenderedSecret)> = match &self.subscription {
            Subscription::Pending => return None,
            Subscription::Wildcard => rendered
                .available()
                .iter()
                .filter_map(|name| rendered.get(name, format).map(|r| (name.as_str(), r)))
                .collect(),
            Subscription::Names(set) => set
                .iter()
                .filter_map(|name| rendered.get(name, format).map(|r| (name.as_str(), r)))
                .collect(),
        };
        let changed = current
            .iter()
            .any(|(name, r)| self.sent.get(*name) != Some(&r.version));
        let shrunk = self.subscription == Subscription::Wildcard
            && self
                .sent
                .keys()
                .any(|sent| !current.iter().any(|(name, _)| name == sent));
        if !changed && !shrunk {
            return None;
        }
        self.sent = current
            .iter()
            .map(|(name, r)| (name.to_string(), r.version.clone()))
            .collect();
        let version = content_version(
            current
                .iter()
                .map(|(name, r)| (*name, r.version.as_bytes())),
        );
        let nonce = nonces.next();
        self.last_nonce = Some(nonce.clone());
        Some(DiscoveryResponse {
            version_info: version,
            resources: current.into_iter().map(|(_, r)| r.any.clone()).collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Bytes of names and versions this stream holds (for its connection's budget).
    pub fn held_bytes(&self) -> usize {
        let names: usize = match &self.subscription {
            Subscription::Names(names) => names.iter().map(String::len).sum(),
            _ => 0,
        };
        let sent: usize = self
            .sent
            .iter()
            .map(|(name, version)| name.len().saturating_add(version.len()))
            .sum();
        names.saturating_add(sent)
    }

    /// Names this stream is subscribed to (for limits and logs); `None` for a wildcard.
    pub fn subscribed(&self) -> Option<usize> {
        match &self.subscription {
            Subscription::Names(names) => Some(names.len()),
            _ => None,
        }
    }
}
