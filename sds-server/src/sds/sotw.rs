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

use std::collections::{BTreeMap, BTreeSet};

use super::{content_version, NonceSource, RequestVerdict};
use crate::render::{self, SecretNames, TrustFormat, SECRET_TYPE_URL};
use crate::snapshot::IdentitySnapshot;
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
    /// Encoded bytes of each secret as last sent on this stream.
    sent: BTreeMap<String, Vec<u8>>,
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

    /// The response due for `snapshot`, if any requested secret changed.
    pub fn response(
        &mut self,
        snapshot: &IdentitySnapshot,
        names: &SecretNames,
        nonces: &NonceSource,
    ) -> Option<DiscoveryResponse> {
        let requested: Vec<String> = match &self.subscription {
            Subscription::Pending => return None,
            Subscription::Wildcard => render::available_names(snapshot, names),
            Subscription::Names(set) => set.iter().cloned().collect(),
        };
        let rendered: Vec<(String, envoy_types::pb::google::protobuf::Any)> = requested
            .into_iter()
            .filter_map(|name| {
                render::render(snapshot, names, self.format, &name)
                    .map(|secret| (name, render::to_any(secret)))
            })
            .collect();
        let changed = rendered
            .iter()
            .any(|(name, any)| self.sent.get(name) != Some(&any.value));
        let shrunk = self.subscription == Subscription::Wildcard
            && self
                .sent
                .keys()
                .any(|sent| !rendered.iter().any(|(name, _)| name == sent));
        if !changed && !shrunk {
            return None;
        }
        if shrunk {
            self.sent.clear();
        }
        let version = content_version(
            rendered
                .iter()
                .map(|(n, a)| (n.as_str(), a.value.as_slice())),
        );
        let nonce = nonces.next();
        for (name, any) in &rendered {
            self.sent.insert(name.clone(), any.value.clone());
        }
        self.last_nonce = Some(nonce.clone());
        Some(DiscoveryResponse {
            version_info: version,
            resources: rendered.into_iter().map(|(_, any)| any).collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            nonce,
            ..Default::default()
        })
    }
}
