//! The validated identity state that every SDS stream renders from.
//!
//! A snapshot is built from one Workload API X.509 context. It holds only what
//! may be served: SVIDs that are inside their validity window and the trust
//! bundles of the workload's own and federated trust domains. Snapshots are
//! immutable and shared through a `watch` channel; the source publishes a new
//! one on every change, streams never talk to the source.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Instant, SystemTime};

use x509_parser::prelude::{FromDer, X509Certificate};

/// Errors raised while turning Workload API material into a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A certificate could not be parsed as DER X.509.
    #[error("certificate for {owner} is not valid DER X.509: {reason}")]
    BadCertificate {
        /// The SPIFFE ID or trust domain the certificate belongs to.
        owner: String,
        /// The parser's explanation.
        reason: String,
    },
}

/// A DER-encoded PKCS#8 private key. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyDer(Vec<u8>);

impl PrivateKeyDer {
    /// Wraps DER bytes of a PKCS#8 private key.
    pub fn new(der: Vec<u8>) -> Self {
        Self(der)
    }

    /// The key as PKCS#8 PEM, for Envoy's inline `private_key`.
    pub fn to_pem(&self) -> Vec<u8> {
        pem::encode(&pem::Pem::new("PRIVATE KEY", self.0.clone())).into_bytes()
    }
}

impl fmt::Debug for PrivateKeyDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyDer(<redacted>)")
    }
}

/// Facts read off a leaf certificate, for logs, metrics and `inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// Serial number as lower-case hex without separators (as Envoy's `/certs` shows it).
    pub serial_hex: String,
    /// Start of the validity window.
    pub not_before: SystemTime,
    /// End of the validity window.
    pub not_after: SystemTime,
}

impl CertFacts {
    /// Reads serial and validity from one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let validity = cert.validity();
        Ok(Self {
            serial_hex: hex::encode(cert.raw_serial()),
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
        })
    }

    /// Whether `now` lies inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    let secs = std::time::Duration::from_secs(unix_seconds.unsigned_abs());
    if unix_seconds >= 0 {
        SystemTime::UNIX_EPOCH + secs
    } else {
        SystemTime::UNIX_EPOCH - secs
    }
}

/// One X.509-SVID: its SPIFFE ID, chain (leaf first) and private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svid {
    /// The SPIFFE ID in the leaf's URI SAN.
    pub spiffe_id: String,
    /// DER certificates, leaf first, then intermediates.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's private key.
    pub private_key: PrivateKeyDer,
    /// Serial and validity of the leaf.
    pub leaf: CertFacts,
}

/// The root CAs of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    /// DER root certificates, in the order the Workload API gave them.
    pub roots_der: Vec<Vec<u8>>,
}

/// Everything trustweave-sds can serve at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentitySnapshot {
    /// Valid SVIDs; the first is the workload's default SVID.
    pub svids: Vec<Svid>,
    /// The workload's own trust domain (from the default SVID), if known.
    pub own_trust_domain: Option<String>,
    /// Trust bundles by trust domain name (own and federated), sorted by name.
    pub bundles: BTreeMap<String, TrustBundle>,
}

impl IdentitySnapshot {
    /// Builds a snapshot from a Workload API context, dropping SVIDs not valid at `now`.
    pub fn from_context(
        context: &spiffe::X509Context,
        now: SystemTime,
    ) -> Result<Self, SnapshotError> {
        let mut svids = Vec::new();
        for svid in context.svids() {
            let spiffe_id = svid.spiffe_id().to_string();
            let leaf = CertFacts::from_der(svid.leaf().as_ref()).map_err(|reason| {
                SnapshotError::BadCertificate {
                    owner: spiffe_id.clone(),
                    reason,
                }
            })?;
            svids.push(Svid {
                spiffe_id,
                chain_der: svid
                    .cert_chain()
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect(),
                private_key: PrivateKeyDer::new(svid.private_key().as_ref().to_vec()),
                leaf,
            });
        }
        let own_trust_domain = context
            .svids()
            .first()
            .map(|svid| svid.spiffe_id().trust_domain_name().to_string());
        let bundles = context
            .bundle_set()
            .iter()
            .map(|(td, bundle)| {
                let roots_der = bundle
                    .authorities()
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect();
                (td.to_string(), TrustBundle { roots_der })
            })
            .collect();
        Ok(Self {
            svids,
            own_trust_domain,
            bundles,
        }
        .without_expired(now))
    }

    /// The same snapshot without SVIDs that are not valid at `now`.
    pub fn without_expired(mut self, now: SystemTime) -> Self {
        self.svids.retain(|svid| svid.leaf.is_valid_at(now));
        self
    }

    /// The workload's default SVID (the first one the Workload API listed).
    pub fn default_svid(&self) -> Option<&Svid> {
        self.svids.first()
    }

    /// The earliest moment an SVID held here stops being valid.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.svids.iter().map(|svid| svid.leaf.not_after).min()
    }
}

/// A snapshot as published on the watch channel, with the moment it was published.
#[derive(Clone, Debug)]
pub struct Published {
    /// The identity state.
    pub snapshot: IdentitySnapshot,
    /// When it was published (for push latency).
    pub at: Instant,
}

impl Published {
    /// Wraps `snapshot`, stamped now.
    pub fn now(snapshot: IdentitySnapshot) -> Self {
        Self {
            snapshot,
            at: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_debug_is_redacted() {
        let key = PrivateKeyDer::new(vec![0x30, 0x82, 0x01, 0x02]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "PrivateKeyDer(<redacted>)");
    }

    #[test]
    fn negative_unix_times_are_before_the_epoch() {
        assert!(to_system_time(-5) < SystemTime::UNIX_EPOCH);
        assert_eq!(
            to_system_time(5),
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5)
        );
    }
}
