//! Rendering a snapshot into named Envoy `Secret`s: a pure function.
//!
//! Names served (each renameable, like SPIRE's `default_svid_name`,
//! `default_bundle_name` and `default_all_bundles_name`):
//! - `default`: the default X.509-SVID as a `tls_certificate`;
//! - each SVID's SPIFFE ID: that SVID as a `tls_certificate`;
//! - `ROOTCA` and `ALL`: the own and every federated trust domain's bundle;
//! - `spiffe://<trust-domain>`: one trust domain's bundle.
//!
//! Trust is rendered as Envoy's SPIFFE certificate validator (one entry per
//! trust domain, sorted by name, no SAN matchers) or, in PEM mode, as a plain
//! `trusted_ca`. A plain `trusted_ca` cannot scope a root to its trust domain,
//! so in PEM mode `ROOTCA` holds the **own** trust domain's roots only (as
//! SPIRE does): otherwise any federated CA could mint identities in ours.
//! Federated roots reach PEM clients only by their explicit names (`ALL`,
//! `spiffe://<td>`).
//!
//! [`Rendered`] renders every secret of a snapshot once, when it is published;
//! every stream shares those bytes and keeps only their versions.

use envoy_types::pb::envoy::config::core::v3::{
    data_source::Specifier, DataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, spiffe_cert_validator_config::TrustDomain as SpiffeTrustDomain,
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use zeroize::Zeroize;

use crate::snapshot::{IdentitySnapshot, Svid, TrustBundle};

/// Type URL of an Envoy v3 `Secret`, the only type this server serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";

/// Prefix of the per-trust-domain bundle names.
pub const TRUST_DOMAIN_PREFIX: &str = "spiffe://";

/// The well-known secret names this server answers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretNames {
    /// The workload's default SVID (Istio: `default`).
    pub default_svid: String,
    /// The trust aggregate Istio asks for (Istio: `ROOTCA`).
    pub default_bundle: String,
    /// The same aggregate under a second name (SPIRE: `ALL`).
    pub all_bundles: String,
}

impl Default for SecretNames {
    fn default() -> Self {
        Self {
            default_svid: "default".into(),
            default_bundle: "ROOTCA".into(),
            all_bundles: "ALL".into(),
        }
    }
}

/// How trust bundles are rendered for one Envoy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrustFormat {
    /// Envoy's SPIFFE certificate validator, one entry per trust domain.
    Spiffe,
    /// A `trusted_ca` with every root concatenated (no per-domain scoping).
    Pem,
}

/// Renders the secret called `name`, or `None` when the snapshot cannot serve it (yet).
pub fn render(
    snapshot: &IdentitySnapshot,
    names: &SecretNames,
    format: TrustFormat,
    name: &str,
) -> Option<Secret> {
    if name == names.default_svid {
        return snapshot
            .default_svid()
            .map(|svid| tls_certificate(name, svid));
    }
    if name == names.default_bundle && format == TrustFormat::Pem {
        let own = snapshot
            .own_trust_domain
            .as_ref()
            .and_then(|td| snapshot.bundles.get_key_value(td));
        return validation_context(name, own.into_iter(), format);
    }
    if name == names.default_bundle || name == names.all_bundles {
        return validation_context(name, snapshot.bundles.iter(), format);
    }
    if let Some(td) = name.strip_prefix(TRUST_DOMAIN_PREFIX) {
        if let Some(bundle) = snapshot.bundles.get_key_value(td) {
            return validation_context(name, std::iter::once(bundle), format);
        }
    }
    snapshot
        .svids
        .iter()
        .find(|svid| svid.spiffe_id == name)
        .map(|svid| tls_certificate(name, svid))
}

/// Every name the snapshot can serve now, sorted: what a wildcard subscription receives.
pub fn available_names(snapshot: &IdentitySnapshot, names: &SecretNames) -> Vec<String> {
    let mut all = Vec::new();
    if snapshot.default_svid().is_some() {
        all.push(names.default_svid.clone());
    }
    if !snapshot.bundles.is_empty() {
        all.push(names.default_bundle.clone());
        all.push(names.all_bundles.clone());
    }
    all.extend(
        snapshot
            .bundles
            .keys()
            .map(|td| format!("{TRUST_DOMAIN_PREFIX}{td}")),
    );
    all.extend(snapshot.svids.iter().map(|svid| svid.spiffe_id.clone()));
    all.sort();
    all.dedup();
    all
}

/// Packs a secret as the `Any` Envoy expects in a discovery response.
pub fn to_any(secret: Secret) -> Any {
    pack_any(secret)
}

fn tls_certificate(name: &str, svid: &Svid) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(pem_certificates(&svid.chain_der))),
            private_key: Some(inline(svid.private_key.to_pem().to_vec())),
            ..Default::default()
        })),
    }
}

/// One secret, encoded once: its version (a digest of name and bytes) and the
/// `Any` every stream sends. Bytes holding a private key are zeroized on drop
/// and never shown by `Debug`.
pub struct RenderedSecret {
    /// Digest of the name and encoded bytes; changes iff the content changes.
    pub version: String,
    /// The packed `Secret`.
    pub any: Any,
}

impl RenderedSecret {
    fn new(name: &str, secret: Secret) -> Self {
        let any = to_any(secret);
        Self {
            version: content_version([(name, any.value.as_slice())]),
            any,
        }
    }
}

impl std::fmt::Debug for RenderedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderedSecret")
            .field("version", &self.version)
            .field("bytes", &self.any.value.len())
            .finish()
    }
}

impl Drop for RenderedSecret {
    fn drop(&mut self) {
        self.any.value.zeroize();
    }
}

/// Every secret one snapshot can serve, rendered once and shared by all streams.
#[derive(Debug, Default)]
pub struct Rendered {
    /// Names available now, sorted: what a wildcard subscription receives.
    available: Vec<String>,
    /// Secrets in the SPIFFE-validator format, by name.
    spiffe: BTreeMap<String, RenderedSecret>,
    /// The trust secrets in PEM format (certificates are the same in both formats).
    pem: BTreeMap<String, RenderedSecret>,
}

impl Rendered {
    /// Renders every name `snapshot` can serve.
    pub fn new(snapshot: &IdentitySnapshot, names: &SecretNames) -> Self {
        let available = available_names(snapshot, names);
        let render_as = |format: TrustFormat, only_trust: bool| {
            available
                .iter()
                .filter(|name| !only_trust || is_trust_name(names, name))
                .filter_map(|name| {
                    render(snapshot, names, format, name)
                        .map(|secret| (name.clone(), RenderedSecret::new(name, secret)))
                })
                .collect()
        };
        Self {
            spiffe: render_as(TrustFormat::Spiffe, false),
            pem: render_as(TrustFormat::Pem, true),
            available,
        }
    }

    /// Every name available now, sorted.
    pub fn available(&self) -> &[String] {
        &self.available
    }

    /// The secret `name` in `format`, if the snapshot can serve it.
    pub fn get(&self, name: &str, format: TrustFormat) -> Option<&RenderedSecret> {
        match format {
            TrustFormat::Pem => self.pem.get(name).or_else(|| self.spiffe.get(name)),
            TrustFormat::Spiffe => self.spiffe.get(name),
        }
    }
}

/// Whether `name` is a trust secret (rendered differently per format).
fn is_trust_name(names: &SecretNames, name: &str) -> bool {
    name == names.default_bundle
        || name == names.all_bundles
        || name
            .strip_prefix(TRUST_DOMAIN_PREFIX)
            .is_some_and(|rest| !rest.contains('/'))
}

fn validation_context<'a>(
    name: &str,
    bundles: impl Iterator<Item = (&'a String, &'a TrustBundle)>,
    format: TrustFormat,
) -> Option<Secret> {
    let bundles: Vec<_> = bundles.filter(|(_, b)| !b.roots_der.is_empty()).collect();
    if bundles.is_empty() {
        return None;
    }
    let context = match format {
        TrustFormat::Pem => {
            let roots: Vec<Vec<u8>> = bundles
                .iter()
                .flat_map(|(_, b)| b.roots_der.iter().cloned())
                .collect();
            CertificateValidationContext {
                trusted_ca: Some(inline(pem_certificates(&roots))),
                ..Default::default()
            }
        }
        TrustFormat::Spiffe => {
            // `bundles` comes from a BTreeMap: sorted by name, no duplicates.
            let trust_domains = bundles
                .iter()
                .map(|(td, bundle)| SpiffeTrustDomain {
                    name: (*td).clone(),
                    trust_bundle: Some(inline(pem_certificates(&bundle.roots_der))),
                    ..Default::default()
                })
                .collect();
            let config = SpiffeCertValidatorConfig {
                trust_domains,
                ..Default::default()
            };
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR_NAME.to_string(),
                    typed_config: Some(pack_any(config)),
                }),
                ..Default::default()
            }
        }
    };
    Some(Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(context)),
    })
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..Default::default()
    }
}

fn pem_certificates(ders: &[Vec<u8>]) -> Vec<u8> {
    let blocks: Vec<pem::Pem> = ders
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.clone()))
        .collect();
    pem::encode_many(&blocks).into_bytes()
}

/// A short digest of named contents; changes whenever any content changes.
pub fn content_version<'a>(items: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = Sha256::new();
    for (name, bytes) in items {
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    }
    let digest = hasher.finalize();
    digest.iter().take(8).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{CertFacts, PrivateKeyDer};
    use std::time::{Duration, SystemTime};

    fn snapshot(domains: &[&str]) -> IdentitySnapshot {
        let now = SystemTime::now();
        let svid = Svid {
            spiffe_id: "spiffe://a.example/w".into(),
            chain_der: vec![vec![1, 2, 3]],
            private_key: PrivateKeyDer::new(vec![9, 9, 9]),
            leaf: CertFacts {
                serial_hex: "01".into(),
                not_before: now,
                not_after: now + Duration::from_secs(60),
            },
        };
        IdentitySnapshot {
            default: Some(svid.clone()),
            svids: vec![svid],
            own_trust_domain: Some("a.example".into()),
            bundles: domains
                .iter()
                .map(|td| {
                    (
                        td.to_string(),
                        TrustBundle {
                            roots_der: vec![td.as_bytes().to_vec()],
                        },
                    )
                })
                .collect(),
        }
    }

    fn spiffe_domains(secret: &Secret) -> Vec<String> {
        let Some(secret::Type::ValidationContext(ctx)) = &secret.r#type else {
            panic!("not a validation context");
        };
        let any = ctx
            .custom_validator_config
            .as_ref()
            .and_then(|c| c.typed_config.as_ref())
            .expect("validator");
        let config = <SpiffeCertValidatorConfig as prost::Message>::decode(any.value.as_slice())
            .expect("decode");
        config.trust_domains.into_iter().map(|t| t.name).collect()
    }

    #[test]
    fn rootca_lists_every_domain_once_sorted() {
        let s = snapshot(&["z.example", "a.example", "m.example"]);
        let names = SecretNames::default();
        for name in ["ROOTCA", "ALL"] {
            let secret = render(&s, &names, TrustFormat::Spiffe, name).expect("rendered");
            assert_eq!(secret.name, name);
            assert_eq!(
                spiffe_domains(&secret),
                vec!["a.example", "m.example", "z.example"]
            );
        }
        let one = render(&s, &names, TrustFormat::Spiffe, "spiffe://m.example").expect("one");
        assert_eq!(spiffe_domains(&one), vec!["m.example"]);
        assert!(render(&s, &names, TrustFormat::Spiffe, "spiffe://absent.example").is_none());
    }

    fn pem_roots(secret: Secret) -> usize {
        let Some(secret::Type::ValidationContext(ctx)) = secret.r#type else {
            panic!("validation context");
        };
        assert!(ctx.custom_validator_config.is_none());
        let Some(Specifier::InlineBytes(pem)) = ctx.trusted_ca.and_then(|d| d.specifier) else {
            panic!("inline trusted_ca");
        };
        pem::parse_many(pem).expect("pem").len()
    }

    #[test]
    fn pem_rootca_holds_the_own_trust_domain_only() {
        let s = snapshot(&["a.example", "b.example"]);
        let names = SecretNames::default();
        let rootca = render(&s, &names, TrustFormat::Pem, "ROOTCA").expect("rendered");
        assert_eq!(
            pem_roots(rootca),
            1,
            "a federated CA must not mint IDs in a.example"
        );
        let all = render(&s, &names, TrustFormat::Pem, "ALL").expect("rendered");
        assert_eq!(pem_roots(all), 2, "ALL is the explicit aggregate");
        let rendered = Rendered::new(&s, &names);
        let shared = rendered
            .get("ROOTCA", TrustFormat::Pem)
            .expect("pem rootca");
        assert_ne!(
            Some(&shared.version),
            rendered
                .get("ROOTCA", TrustFormat::Spiffe)
                .map(|r| &r.version)
        );
    }

    #[test]
    fn renamed_names_are_honoured_and_nothing_without_material() {
        let names = SecretNames {
            default_svid: "svid".into(),
            default_bundle: "trust".into(),
            all_bundles: "everything".into(),
        };
        let s = snapshot(&["a.example"]);
        assert!(render(&s, &names, TrustFormat::Spiffe, "svid").is_some());
        assert!(render(&s, &names, TrustFormat::Spiffe, "default").is_none());
        assert!(render(&s, &names, TrustFormat::Spiffe, "spiffe://a.example/w").is_some());
        let empty = IdentitySnapshot::default();
        assert!(available_names(&empty, &names).is_empty());
        assert!(render(&empty, &names, TrustFormat::Spiffe, "trust").is_none());
        assert_eq!(
            available_names(&s, &names),
            vec![
                "everything",
                "spiffe://a.example",
                "spiffe://a.example/w",
                "svid",
                "trust"
            ]
        );
    }
}
