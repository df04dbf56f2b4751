//! Who is calling: the direct peer's certificate, or a trusted gateway's forwarded caller.
//!
//! The peer is the URI SAN Envoy reports (`connection.uri_san_peer_certificate`,
//! the first one only). With `uri_san_check: xfcc` the last element of
//! `x-forwarded-client-cert` — the one Envoy itself appends for the direct peer
//! when its HTTP connection manager has `set_current_client_cert_details.uri` —
//! must list exactly that one URI SAN; a certificate with several yields no
//! identity. When the peer is a trusted gateway, the element before it names
//! the caller the gateway verified. DNS SANs and the subject are never used.

use super::config::{Config, UriSanCheck};
use super::spiffe_id::SpiffeId;
use super::xfcc;

/// The result of resolving the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The caller, if an identity was established.
    pub caller: Option<SpiffeId>,
    /// The direct peer, if it presented a valid SPIFFE ID.
    pub peer: Option<SpiffeId>,
    /// Whether the caller was forwarded by a trusted gateway.
    pub via_gateway: bool,
    /// Why there is no identity, if there is none.
    pub no_identity: Option<String>,
}

impl Resolved {
    fn none(peer: Option<SpiffeId>, reason: impl Into<String>) -> Self {
        Self {
            caller: None,
            peer,
            via_gateway: false,
            no_identity: Some(reason.into()),
        }
    }

    /// Whether the direct peer is one of the trusted gateways.
    pub fn peer_is_trusted_gateway(&self, config: &Config) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| config.trusted_gateways.contains(p.as_str()))
    }
}

/// Resolves the caller from the peer's first URI SAN and the XFCC header (HTTP only).
pub fn resolve(config: &Config, peer_uri_san: Option<&str>, xfcc_header: Option<&str>) -> Resolved {
    let Some(first) = peer_uri_san.filter(|s| !s.is_empty()) else {
        return Resolved::none(None, "no peer certificate URI SAN");
    };
    let peer = match SpiffeId::parse(first) {
        Ok(id) => id,
        Err(e) => return Resolved::none(None, format!("peer URI SAN is not a SPIFFE ID: {e}")),
    };
    let elements = xfcc_header.map(xfcc::parse).unwrap_or_default();
    let direct = elements
        .last()
        .filter(|e| e.uris.first().map(String::as_str) == Some(first));
    if config.uri_san_check == UriSanCheck::Xfcc {
        match direct {
            None => {
                return Resolved::none(
                    Some(peer),
                    "cannot count the peer's URI SANs: x-forwarded-client-cert lacks Envoy's element for the direct peer (set set_current_client_cert_details.uri)",
                )
            }
            Some(e) if e.uris.len() != 1 => {
                return Resolved::none(Some(peer), format!("peer certificate has {} URI SANs; exactly one is required", e.uris.len()))
            }
            Some(_) => {}
        }
    }
    if !config.trusted_gateways.contains(peer.as_str()) {
        return Resolved {
            caller: Some(peer.clone()),
            peer: Some(peer),
            via_gateway: false,
            no_identity: None,
        };
    }
    // A trusted gateway: the element before its own names the caller it verified.
    let before = if direct.is_some() {
        elements.len().checked_sub(2)
    } else {
        elements.len().checked_sub(1)
    };
    match before.and_then(|i| elements.get(i)) {
        None => Resolved {
            caller: Some(peer.clone()),
            peer: Some(peer),
            via_gateway: false,
            no_identity: None,
        },
        Some(e) if e.uris.len() != 1 => Resolved::none(
            Some(peer),
            format!(
                "gateway forwarded a caller with {} URI SANs; exactly one is required",
                e.uris.len()
            ),
        ),
        Some(e) => match SpiffeId::parse(&e.uris[0]) {
            Ok(caller) => Resolved {
                caller: Some(caller),
                peer: Some(peer),
                via_gateway: true,
                no_identity: None,
            },
            Err(err) => Resolved::none(
                Some(peer),
                format!("gateway forwarded an invalid SPIFFE ID: {err}"),
            ),
        },
    }
}

/// Resolves the caller at L4, where only the first URI SAN is visible.
pub fn resolve_network(peer_uri_san: Option<&str>) -> Resolved {
    match peer_uri_san.filter(|s| !s.is_empty()).map(SpiffeId::parse) {
        None => Resolved::none(None, "no peer certificate URI SAN"),
        Some(Err(e)) => Resolved::none(None, format!("peer URI SAN is not a SPIFFE ID: {e}")),
        Some(Ok(id)) => Resolved {
            caller: Some(id.clone()),
            peer: Some(id),
            via_gateway: false,
            no_identity: None,
        },
    }
}
