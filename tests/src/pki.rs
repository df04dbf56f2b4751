//! A test PKI: one self-signed root CA per SPIFFE trust domain, issuing X.509-SVIDs.
//!
//! Certificates follow the X.509-SVID profile: the leaf has exactly one URI SAN
//! (its SPIFFE ID), `digitalSignature`, no CA flag; the CA carries the trust
//! domain's SPIFFE ID and `keyCertSign`.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

/// One trust domain's certificate authority.
pub struct TrustDomainCa {
    trust_domain: String,
    root_der: Vec<u8>,
    /// Intermediate CAs between the root and leaves (DER), nearest the leaf first.
    intermediates_der: Vec<Vec<u8>>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TrustDomainCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustDomainCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// An issued X.509-SVID (chain and PKCS#8 key, DER).
#[derive(Clone)]
pub struct IssuedSvid {
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: String,
    /// Leaf certificate, DER.
    pub leaf_der: Vec<u8>,
    /// PKCS#8 private key, DER.
    pub key_der: Vec<u8>,
    /// Serial number, lower-case hex, as Envoy's `/certs` prints it.
    pub serial_hex: String,
    /// Intermediate CAs that complete the chain to the root (DER), nearest first.
    pub intermediates_der: Vec<Vec<u8>>,
}

impl std::fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial_hex", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

impl IssuedSvid {
    /// Leaf certificate and intermediates as PEM, leaf first.
    pub fn cert_pem(&self) -> String {
        let chain: Vec<pem::Pem> = std::iter::once(&self.leaf_der)
            .chain(&self.intermediates_der)
            .map(|der| pem::Pem::new("CERTIFICATE", der.clone()))
            .collect();
        pem::encode_many(&chain)
    }

    /// Leaf certificate and intermediates as concatenated DER (the Workload API's `x509_svid`).
    pub fn chain_der(&self) -> Vec<u8> {
        std::iter::once(&self.leaf_der)
            .chain(&self.intermediates_der)
            .flatten()
            .copied()
            .collect()
    }

    /// Private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PRIVATE KEY", self.key_der.clone()))
    }
}

fn ca_params(trust_domain: &str, name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{trust_domain} {name}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Trustweave test PKI");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(30);
    params.serial_number = Some(random_serial());
    params
}

impl TrustDomainCa {
    /// A root CA for `trust_domain` that signs SVIDs through an intermediate CA,
    /// as SPIRE does with an upstream authority; the bundle holds the root only.
    pub fn with_intermediate(trust_domain: &str) -> Self {
        let root_params = ca_params(trust_domain, "root CA");
        let root_key = KeyPair::generate().expect("generate CA key");
        let root = root_params.self_signed(&root_key).expect("self-sign CA");
        let root_issuer = Issuer::new(root_params, root_key);
        let mut params = ca_params(trust_domain, "intermediate CA");
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate intermediate key");
        let intermediate = params
            .signed_by(&key, &root_issuer)
            .expect("sign intermediate");
        Self {
            trust_domain: trust_domain.to_string(),
            root_der: root.der().to_vec(),
            intermediates_der: vec![intermediate.der().to_vec()],
            issuer: Issuer::new(params, key),
        }
    }

    /// A new root CA for `trust_domain` (e.g. `aws.company.com`) that signs SVIDs directly.
    pub fn new(trust_domain: &str) -> Self {
        Self::named(trust_domain, "root CA")
    }

    /// The CA that takes over from this one when the trust domain rotates its
    /// root (a new key, a distinct name, the same trust domain).
    pub fn successor(&self) -> Self {
        Self::named(
            &self.trust_domain,
            &format!("root CA {:08x}", fastrand::u32(..)),
        )
    }

    fn named(trust_domain: &str, name: &str) -> Self {
        let params = ca_params(trust_domain, name);
        let key = KeyPair::generate().expect("generate CA key");
        let root = params.self_signed(&key).expect("self-sign CA");
        Self {
            trust_domain: trust_domain.to_string(),
            root_der: root.der().to_vec(),
            intermediates_der: Vec::new(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.root_der.clone()))
    }

    /// Issues an X.509-SVID for `spiffe_id`, valid from a minute ago for `ttl`.
    pub fn issue_svid(&self, spiffe_id: &str, ttl: Duration) -> IssuedSvid {
        self.issue_with_uris(&[spiffe_id], ttl)
    }

    /// Issues a leaf whose URI SANs are exactly `uris` (tests use several to probe validators).
    pub fn issue_with_uris(&self, uris: &[&str], ttl: Duration) -> IssuedSvid {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            uris,
            now - time::Duration::minutes(1),
            now + time::Duration::try_from(ttl).expect("ttl fits"),
        )
    }

    /// Issues a leaf for `uris` valid from `not_before` to `not_after` (e.g. already expired).
    pub fn issue_with_validity(
        &self,
        uris: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> IssuedSvid {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "SPIRE");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = uris.iter().map(|u| uri_san(u)).collect();
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        IssuedSvid {
            spiffe_id: uris.first().map(|s| s.to_string()).unwrap_or_default(),
            leaf_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            serial_hex,
            intermediates_der: self.intermediates_der.clone(),
        }
    }
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("ASCII URI"))
}

/// A positive 16-byte serial (high bit clear, first byte non-zero) so its hex form is canonical.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}
