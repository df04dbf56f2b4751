//! One view of a trust domain's bundle, wherever it was read: its X.509
//! roots by SHA-256, and how two views differ.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What is known of one root CA certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootFacts {
    /// Serial as Envoy's `/certs` prints it ([`crate::snapshot::serial_hex`]).
    pub serial: String,
    /// Start of validity, seconds since the epoch (the CA's preparation).
    pub not_before: i64,
}

/// The X.509 roots one holder has for one trust domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roots {
    /// SHA-256 (hex) of each root's DER.
    pub sha256: BTreeSet<String>,
    /// The DER of each root, where the holder showed it (not trustweave-sds' admin).
    pub ders: BTreeMap<String, Vec<u8>>,
    /// The bundle's sequence number, where the holder keeps one (SPIRE).
    pub sequence: Option<u64>,
}

impl Roots {
    /// Roots from DER certificates.
    pub fn from_ders(ders: Vec<Vec<u8>>, sequence: Option<u64>) -> Self {
        let mut roots = Self {
            sequence,
            ..Self::default()
        };
        for der in ders {
            let fingerprint = hex::encode(Sha256::digest(&der));
            roots.sha256.insert(fingerprint.clone());
            roots.ders.insert(fingerprint, der);
        }
        roots
    }

    /// Roots known only by their fingerprints.
    pub fn from_fingerprints(fingerprints: impl IntoIterator<Item = String>) -> Self {
        Self {
            sha256: fingerprints.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Facts of the root with fingerprint `sha256`, if its DER is known here.
    pub fn facts(&self, sha256: &str) -> Option<RootFacts> {
        let der = self.ders.get(sha256)?;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        Some(RootFacts {
            serial: crate::snapshot::serial_hex(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
        })
    }

    /// The DER roots, for chain verification.
    pub fn der_list(&self) -> Vec<&[u8]> {
        self.ders.values().map(Vec::as_slice).collect()
    }
}

/// How a held view differs from the view it should equal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Difference {
    /// Roots the reference has and the holder lacks.
    pub lacking: Vec<String>,
    /// Roots the holder still has and the reference dropped.
    pub extra: Vec<String>,
}

impl Difference {
    /// `held` against `reference`.
    pub fn of(held: &Roots, reference: &Roots) -> Self {
        Self {
            lacking: reference.sha256.difference(&held.sha256).cloned().collect(),
            extra: held.sha256.difference(&reference.sha256).cloned().collect(),
        }
    }

    /// Whether the views hold the same roots.
    pub fn is_empty(&self) -> bool {
        self.lacking.is_empty() && self.extra.is_empty()
    }

    /// "lacks root 1a2b… (serial 5f…, issued 4m ago); still trusts 9c8d… (dropped)".
    pub fn describe(&self, reference: &Roots, held: &Roots, now: i64) -> String {
        let name = |sha: &str, facts: Option<RootFacts>| {
            let short: String = sha.chars().take(12).collect();
            match facts {
                Some(f) => format!(
                    "{short}… (serial {}, issued {} ago)",
                    f.serial,
                    age(now.saturating_sub(f.not_before))
                ),
                None => format!("{short}…"),
            }
        };
        let mut parts = Vec::new();
        if !self.lacking.is_empty() {
            let roots: Vec<String> = self
                .lacking
                .iter()
                .map(|s| name(s, reference.facts(s)))
                .collect();
            parts.push(format!("lacks root {}", roots.join(", ")));
        }
        if !self.extra.is_empty() {
            let roots: Vec<String> = self.extra.iter().map(|s| name(s, held.facts(s))).collect();
            parts.push(format!(
                "still trusts {} (no longer in the bundle)",
                roots.join(", ")
            ));
        }
        // SPIRE keeps no sequence for a federated copy (it shows 0).
        if let (Some(held @ 1..), Some(current)) = (held.sequence, reference.sequence) {
            parts.push(format!("sequence {held}, current {current}"));
        }
        parts.join("; ")
    }
}

/// `95s`, `4m`, `3h`, `2d`.
pub fn age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{}s", s.max(0)),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_difference_names_what_is_lacking_and_what_is_extra() {
        let reference = Roots::from_fingerprints(["aa".to_string(), "bb".to_string()]);
        let held = Roots::from_fingerprints(["bb".to_string(), "cc".to_string()]);
        let difference = Difference::of(&held, &reference);
        assert_eq!(difference.lacking, ["aa"]);
        assert_eq!(difference.extra, ["cc"]);
        let text = difference.describe(&reference, &held, 0);
        assert!(text.contains("lacks root aa…") && text.contains("still trusts cc…"));
        assert!(Difference::of(&reference, &reference).is_empty());
    }
}
