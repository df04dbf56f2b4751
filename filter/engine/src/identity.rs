//! Who is calling: the direct peer's certificate, or a trusted gateway's forwarded caller.
//!
//! An identity is a certificate with exactly one URI SAN that is a SPIFFE ID
//! with a non-root path (X509-SVID). Anything else — no certificate, two URI
//! SANs, a bare trust domain — is *no identity*, never a guess. DNS SANs and
//! the subject are never used. A peer that presented a certificate the filter
//! cannot locate or parse is *unverifiable*: the request is denied, whatever
//! the policy (a caller must never shed its identity by hiding its certificate).
//!
//! The URI SANs come from the certificate itself (see [`super::certificate`]);
//! with `uri_san_check: first_only` (the only choice at L4) the first URI SAN
//! Envoy reports stands for the whole certificate.

use super::certificate::{self, CertCache, Located};
use super::config::Config;
use super::headers::Headers;
use super::headers::XFCC;
use super::spiffe_id::SpiffeId;
pub use super::svid::{workload_identity, CertSans, Identity};

/// What the direct peer presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// No client certificate.
    Absent,
    /// A certificate the filter cannot locate or parse (why): the request is denied.
    Unverifiable(String),
    /// A certificate, and what it proves.
    Certificate(Identity),
}

/// Where the identity facts of one request come from.
pub trait PeerCertificates {
    /// What the direct peer presented. `headers` are the request's, for
    /// `x-forwarded-client-cert`.
    fn peer(&mut self, headers: &Headers) -> Peer;
    /// What the certificate of the caller the trusted gateway `gateway` (the
    /// direct peer) forwarded proves, or why there is no forwarded caller.
    fn forwarded(&mut self, headers: &Headers, gateway: &SpiffeId) -> Identity;
}

/// Certificates stated outright (tests and `trustweave-policy check`).
#[derive(Clone, Debug, Default)]
pub struct StatedCertificates {
    /// The direct peer's URI SANs.
    pub peer: Option<CertSans>,
    /// The forwarded caller's URI SANs.
    pub forwarded: Option<CertSans>,
}

impl PeerCertificates for StatedCertificates {
    fn peer(&mut self, _: &Headers) -> Peer {
        self.peer.as_ref().map_or(Peer::Absent, |sans| {
            Peer::Certificate(workload_identity(sans))
        })
    }
    fn forwarded(&mut self, _: &Headers, _: &SpiffeId) -> Identity {
        self.forwarded.as_ref().map_or_else(
            || Err("the trusted gateway forwarded no caller".into()),
            workload_identity,
        )
    }
}

/// How the shim learned about the direct peer.
#[derive(Clone, Debug)]
pub enum PeerFacts {
    /// `connection.sha256_peer_certificate_digest` (`None`: no client certificate).
    Digest(Option<String>),
    /// `connection.uri_san_peer_certificate` (`uri_san_check: first_only`).
    FirstUriSan(Option<String>),
    /// Envoy's answer could not be read (a failed host call, not UTF-8): why.
    Unreadable(String),
}

/// What Envoy tells the filter, resolved to identities through a per-worker cache.
pub struct EnvoyCertificates<'a> {
    /// What Envoy said about the peer.
    pub peer: PeerFacts,
    /// What each certificate proves, by digest.
    pub cache: &'a mut CertCache,
}

/// The request's `x-forwarded-client-cert`, every value joined (bytes that are
/// not UTF-8 replaced: only its ASCII structure is searched). Read only when a
/// certificate is not in the cache, or a gateway forwarded one.
fn xfcc_text(headers: &Headers) -> Option<String> {
    headers.joined_lossy(XFCC)
}

impl PeerCertificates for EnvoyCertificates<'_> {
    fn peer(&mut self, headers: &Headers) -> Peer {
        match &self.peer {
            PeerFacts::FirstUriSan(uri) => uri
                .as_ref()
                .filter(|u| !u.is_empty())
                .map_or(Peer::Absent, |u| {
                    Peer::Certificate(workload_identity(&Ok(vec![u.clone()])))
                }),
            PeerFacts::Digest(None) => Peer::Absent,
            PeerFacts::Digest(Some(digest)) => {
                match self.cache.get_or_insert(digest, || {
                    certificate::locate_peer(xfcc_text(headers).as_deref(), digest)
                }) {
                    Located::Found(identity) => Peer::Certificate(identity),
                    Located::NotFound(why) => Peer::Unverifiable(why),
                }
            }
            PeerFacts::Unreadable(why) => Peer::Unverifiable(why.clone()),
        }
    }

    fn forwarded(&mut self, headers: &Headers, gateway: &SpiffeId) -> Identity {
        let PeerFacts::Digest(Some(digest)) = &self.peer else {
            return Err("a forwarded caller needs the peer's digest (uri_san_check: xfcc)".into());
        };
        let xfcc = xfcc_text(headers);
        let own = certificate::own_element(xfcc.as_deref(), digest)?;
        let forwarded = certificate::forwarded_by_gateway(own.before, gateway.as_str())?;
        // Its shape is checked on every request; its certificate is parsed once.
        match self
            .cache
            .get_or_insert(forwarded.hash, || forwarded.sans())
        {
            Located::Found(identity) => {
                forwarded.check_rest(self.cache.uri_pairs(forwarded.hash))?;
                identity
            }
            Located::NotFound(why) => Err(why),
        }
    }
}

/// The result of resolving the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The caller, if an identity was established.
    pub caller: Option<SpiffeId>,
    /// The direct peer, if it presented a valid identity.
    pub peer: Option<SpiffeId>,
    /// Whether the caller was forwarded by a trusted gateway.
    pub via_gateway: bool,
    /// Why there is no identity, if there is none.
    pub no_identity: Option<String>,
    /// Why the peer's certificate cannot be verified, if so: the request is denied.
    pub unverifiable: Option<String>,
    /// Why a trusted gateway's forwarded caller was refused, if it was (counted).
    pub forwarded_refused: Option<String>,
}

impl Resolved {
    fn none(peer: Option<SpiffeId>, reason: impl Into<String>) -> Self {
        Self {
            caller: None,
            peer,
            via_gateway: false,
            no_identity: Some(reason.into()),
            unverifiable: None,
            forwarded_refused: None,
        }
    }

    /// Whether the direct peer is one of the trusted gateways.
    pub fn peer_is_trusted_gateway(&self, config: &Config) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|p| config.trusted_gateways.contains(p.as_str()))
    }
}

/// Resolves the caller of an HTTP request.
pub fn resolve(config: &Config, certs: &mut dyn PeerCertificates, headers: &Headers) -> Resolved {
    let peer = match certs.peer(headers) {
        Peer::Absent => return Resolved::none(None, "no peer certificate"),
        Peer::Unverifiable(reason) => {
            let mut resolved = Resolved::none(None, format!("peer: {reason}"));
            resolved.unverifiable = Some(reason);
            return resolved;
        }
        Peer::Certificate(Ok(id)) => id,
        Peer::Certificate(Err(reason)) => return Resolved::none(None, format!("peer: {reason}")),
    };
    if !config.trusted_gateways.contains(peer.as_str()) {
        return Resolved {
            caller: Some(peer.clone()),
            peer: Some(peer),
            via_gateway: false,
            no_identity: None,
            unverifiable: None,
            forwarded_refused: None,
        };
    }
    // A trusted gateway is never the caller itself: it vouches for the caller it verified.
    match certs.forwarded(headers, &peer) {
        Err(reason) => {
            let mut resolved = Resolved::none(Some(peer), format!("forwarded caller: {reason}"));
            resolved.forwarded_refused = Some(reason);
            resolved
        }
        Ok(caller) if caller == peer => {
            Resolved::none(Some(peer), "trusted gateway forwarded itself as the caller")
        }
        Ok(caller) => Resolved {
            caller: Some(caller),
            peer: Some(peer),
            via_gateway: true,
            no_identity: None,
            unverifiable: None,
            forwarded_refused: None,
        },
    }
}

/// Resolves the caller at L4, where only the first URI SAN is visible.
pub fn resolve_network(peer_uri_san: Option<&str>) -> Resolved {
    match peer_uri_san.filter(|s| !s.is_empty()) {
        None => Resolved::none(None, "no peer certificate URI SAN"),
        Some(uri) => match workload_identity(&Ok(vec![uri.to_string()])) {
            Ok(id) => Resolved {
                caller: Some(id.clone()),
                peer: Some(id),
                via_gateway: false,
                no_identity: None,
                unverifiable: None,
                forwarded_refused: None,
            },
            Err(reason) => Resolved::none(None, format!("peer: {reason}")),
        },
    }
}
