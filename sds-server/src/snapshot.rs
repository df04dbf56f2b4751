//! The validated identity state that every SDS stream renders from.
//!
//! A snapshot is built from one Workload API X.509 context. Its `default` SVID
//! is pinned: the first SVID of the latest context, never another one. SVIDs
//! are served from the moment the Workload API sends them (a few seconds of
//! clock skew must not cause an outage, as SPIRE's own SDS does not) and
//! withdrawn exactly at `notAfter`; a workload whose pinned SVID expired has no
//! `default` until the Workload API sends a new context. Material that cannot
//! be served — a certificate that does not parse, a private key that does not
//! belong to its certificate, an SVID whose trust domain has no bundle — is
//! refused whole, and the source keeps the last good snapshot.
//!
//! Snapshots are immutable and shared through a `watch` channel; the source
//! task is their only writer (see [`crate::source`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

/// Why Workload API material was refused (kept typed: logs and metrics name the reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// A certificate could not be parsed as DER X.509.
    #[error("certificate for {owner} is not valid DER X.509: {reason}")]
    BadCertificate {
        /// The SPIFFE ID or trust domain the certificate belongs to.
        owner: String,
        /// The parser's explanation.
        reason: String,
    },
    /// The private key does not belong to the leaf certificate.
    #[error("the private key of {spiffe_id} does not match its certificate")]
    KeyMismatch {
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
    },
    /// An SVID's own trust domain has no bundle: peers could not be verified.
    #[error("no trust bundle for {trust_domain}, the trust domain of {spiffe_id}")]
    NoBundle {
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
        /// Its trust domain.
        trust_domain: String,
    },
    /// The context holds no SVID at all.
    #[error("the Workload API context holds no X.509-SVID")]
    NoSvid,
    /// The context's default SVID has already expired.
    #[error("the default X.509-SVID {spiffe_id} sent by the Workload API has already expired")]
    Expired {
        /// Its SPIFFE ID.
        spiffe_id: String,
    },
}

impl SnapshotError {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadCertificate { .. } => "bad_certificate",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::NoBundle { .. } => "no_bundle",
            Self::NoSvid => "no_svid",
            Self::Expired { .. } => "expired",
        }
    }
}

/// A DER-encoded PKCS#8 private key, zeroized when dropped. Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyDer(Zeroizing<Vec<u8>>);

impl PrivateKeyDer {
    /// Wraps DER bytes of a PKCS#8 private key.
    pub fn new(der: Vec<u8>) -> Self {
        Self(Zeroizing::new(der))
    }

    /// The key as PKCS#8 PEM, for Envoy's inline `private_key` (zeroized when dropped).
    pub fn to_pem(&self) -> Zeroizing<Vec<u8>> {
        let pem = Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", self.0.to_vec())));
        Zeroizing::new(pem.as_bytes().to_vec())
    }

    /// Whether this key's public half is `public_key` (a certificate's
    /// `subjectPublicKey` bits).
    pub fn matches_public_key(&self, public_key: &[u8]) -> bool {
        rcgen::KeyPair::try_from(self.0.as_slice())
            .map(|pair| pair.public_key_raw() == public_key)
            .unwrap_or(false)
    }
}

impl fmt::Debug for PrivateKeyDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyDer(<redacted>)")
    }
}

/// A DER serial as Envoy's `/certs` shows it: lower-case hex of its bytes
/// without leading zero bytes (DER adds `00` before a high bit; BoringSSL's
/// `BN_bn2hex` drops it), `0` for zero.
pub fn serial_hex(raw: &[u8]) -> String {
    let significant = raw
        .iter()
        .position(|b| *b != 0)
        .map_or(&[][..], |at| raw.get(at..).unwrap_or_default());
    if significant.is_empty() {
        "0".into()
    } else {
        hex::encode(significant)
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
        Self::with_public_key(der).map(|(facts, _)| facts)
    }

    /// Serial, validity and the `subjectPublicKey` bits of one DER certificate.
    fn with_public_key(der: &[u8]) -> Result<(Self, Vec<u8>), String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let validity = cert.validity();
        let facts = Self {
            serial_hex: serial_hex(cert.raw_serial()),
            not_before: to_system_time(validity.not_before.timestamp())
                .ok_or("notBefore is out of range")?,
            not_after: to_system_time(validity.not_after.timestamp())
                .ok_or("notAfter is out of range")?,
        };
        Ok((facts, cert.public_key().subject_public_key.data.to_vec()))
    }

    /// Whether the certificate has expired at `now` (`notAfter` reached).
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// `None` if the platform's clock cannot represent it.
fn to_system_time(unix_seconds: i64) -> Option<SystemTime> {
    let secs = std::time::Duration::from_secs(unix_seconds.unsigned_abs());
    if unix_seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(secs)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(secs)
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

impl Svid {
    /// Checks and wraps one SVID: the leaf parses and the key is the leaf's.
    pub fn new(
        spiffe_id: String,
        chain_der: Vec<Vec<u8>>,
        private_key: PrivateKeyDer,
    ) -> Result<Self, SnapshotError> {
        let leaf_der = chain_der
            .first()
            .ok_or_else(|| SnapshotError::BadCertificate {
                owner: spiffe_id.clone(),
                reason: "empty certificate chain".into(),
            })?;
        let (leaf, spki) = CertFacts::with_public_key(leaf_der).map_err(|reason| {
            SnapshotError::BadCertificate {
                owner: spiffe_id.clone(),
                reason,
            }
        })?;
        for der in chain_der.iter().skip(1) {
            CertFacts::from_der(der).map_err(|reason| SnapshotError::BadCertificate {
                owner: spiffe_id.clone(),
                reason,
            })?;
        }
        if !private_key.matches_public_key(&spki) {
            return Err(SnapshotError::KeyMismatch { spiffe_id });
        }
        Ok(Self {
            spiffe_id,
            chain_der,
            private_key,
            leaf,
        })
    }

    /// The SVID's trust domain (the host of its SPIFFE ID).
    pub fn trust_domain(&self) -> &str {
        let rest = self
            .spiffe_id
            .strip_prefix("spiffe://")
            .unwrap_or(&self.spiffe_id);
        rest.split('/').next().unwrap_or(rest)
    }
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
    /// The pinned default SVID: the first SVID of the latest context, while unexpired.
    pub default: Option<Svid>,
    /// Every unexpired SVID of the latest context, in its order (served by SPIFFE ID).
    pub svids: Vec<Svid>,
    /// The workload's own trust domain (from the first SVID of the latest context).
    pub own_trust_domain: Option<String>,
    /// Trust bundles by trust domain name (own and federated), sorted by name.
    pub bundles: BTreeMap<String, TrustBundle>,
}

impl IdentitySnapshot {
    /// Builds a snapshot from one context's SVIDs (in order) and bundles,
    /// dropping SVIDs expired at `now`; refuses material that cannot be served.
    pub fn from_parts(
        svids: Vec<Svid>,
        bundles: BTreeMap<String, TrustBundle>,
        now: SystemTime,
    ) -> Result<Self, SnapshotError> {
        let first = svids.first().ok_or(SnapshotError::NoSvid)?;
        if first.leaf.is_expired_at(now) {
            return Err(SnapshotError::Expired {
                spiffe_id: first.spiffe_id.clone(),
            });
        }
        for svid in &svids {
            let td = svid.trust_domain();
            if bundles.get(td).is_none_or(|b| b.roots_der.is_empty()) {
                return Err(SnapshotError::NoBundle {
                    spiffe_id: svid.spiffe_id.clone(),
                    trust_domain: td.to_string(),
                });
            }
        }
        for (td, bundle) in &bundles {
            for der in &bundle.roots_der {
                CertFacts::from_der(der).map_err(|reason| SnapshotError::BadCertificate {
                    owner: td.clone(),
                    reason,
                })?;
            }
        }
        Ok(Self {
            default: Some(first.clone()),
            own_trust_domain: Some(first.trust_domain().to_string()),
            svids,
            bundles,
        }
        .without_expired(now))
    }

    /// Builds a snapshot from a Workload API context (see [`IdentitySnapshot::from_parts`]).
    pub fn from_context(
        context: &spiffe::X509Context,
        now: SystemTime,
    ) -> Result<Self, SnapshotError> {
        let svids = context
            .svids()
            .iter()
            .map(|svid| {
                Svid::new(
                    svid.spiffe_id().to_string(),
                    svid.cert_chain()
                        .iter()
                        .map(|c| c.as_ref().to_vec())
                        .collect(),
                    PrivateKeyDer::new(svid.private_key().as_ref().to_vec()),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
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
        Self::from_parts(svids, bundles, now)
    }

    /// The same snapshot without SVIDs expired at `now`; the pinned default is
    /// withdrawn when it expires, never replaced by another SVID.
    pub fn without_expired(mut self, now: SystemTime) -> Self {
        self.svids.retain(|svid| !svid.leaf.is_expired_at(now));
        if self
            .default
            .as_ref()
            .is_some_and(|svid| svid.leaf.is_expired_at(now))
        {
            self.default = None;
        }
        self
    }

    /// The workload's default SVID (pinned; see the module documentation).
    pub fn default_svid(&self) -> Option<&Svid> {
        self.default.as_ref()
    }

    /// The earliest moment an SVID held here expires.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.default
            .iter()
            .chain(&self.svids)
            .map(|svid| svid.leaf.not_after)
            .min()
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
    fn serials_read_as_envoy_shows_them() {
        assert_eq!(serial_hex(&[0x00, 0xf8, 0x4e]), "f84e");
        assert_eq!(serial_hex(&[0x0f, 0x01]), "0f01");
        assert_eq!(serial_hex(&[0x00]), "0");
        assert_eq!(serial_hex(&[]), "0");
    }

    #[test]
    fn negative_unix_times_are_before_the_epoch() {
        assert!(to_system_time(-5) < Some(SystemTime::UNIX_EPOCH));
        assert_eq!(
            to_system_time(5),
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5))
        );
    }
}
