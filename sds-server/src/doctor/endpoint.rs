//! A SPIFFE bundle endpoint as a federated peer reaches it: DNS, TCP, TLS,
//! then the `https_spiffe` check — the server's chain must lead to a root of
//! the bundle *that peer* holds for the endpoint's trust domain, and its leaf
//! must name exactly the endpoint's SPIFFE ID. One probe per URL; the check
//! is made per holder, since each holds its own copy.
//!
//! The document is parsed as hostile: bounded, one certificate per key, CAs only.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::bundle::Roots;

/// Largest bundle document read.
pub const MAX_DOCUMENT: usize = 64 * 1024;
/// Most keys a document may carry.
pub const MAX_KEYS: usize = 64;
/// How long each step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a probe stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The URL is not `https://host:port`.
    Url,
    /// The name did not resolve.
    Dns,
    /// No TCP connection.
    Tcp,
    /// The TLS handshake failed.
    Tls,
    /// No 200 answer, or not a SPIFFE bundle.
    Http,
}

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeError {
    /// Where.
    pub stage: Stage,
    /// Why.
    pub reason: String,
}

/// What a reachable endpoint presented and published.
#[derive(Clone, Debug)]
pub struct Reached {
    /// The server's certificate chain, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// The bundle it published, or why it could not be read.
    pub document: Result<Roots, String>,
}

/// Probes the bundle endpoint at `url` (`https://host:port[/path]`).
pub async fn probe(url: &str) -> Result<Reached, ProbeError> {
    let fail = |stage, reason: String| ProbeError { stage, reason };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| fail(Stage::Url, "not an https:// URL".into()))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let target = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let addrs: Vec<std::net::SocketAddr> =
        tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host(target.as_str()))
            .await
            .map_err(|_| fail(Stage::Dns, format!("{host}: no answer")))?
            .map_err(|e| fail(Stage::Dns, format!("{host}: {e}")))?
            .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| fail(Stage::Dns, format!("{host}: no address")))?;
    let tcp = tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| fail(Stage::Tcp, format!("{addr}: connect timed out")))?
        .map_err(|e| fail(Stage::Tcp, format!("{addr}: {e}")))?;
    let (config, recorder) = recording_client_config().map_err(|e| fail(Stage::Tls, e))?;
    let name = match addr.ip().to_string().parse::<std::net::IpAddr>() {
        Ok(ip) if host.parse::<std::net::IpAddr>().is_ok() => ServerName::IpAddress(ip.into()),
        _ => ServerName::try_from(host.clone())
            .map_err(|_| fail(Stage::Url, format!("{host}: not a host name")))?,
    };
    let mut tls = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| fail(Stage::Tls, "handshake timed out".into()))?
    .map_err(|e| fail(Stage::Tls, e.to_string()))?;
    let chain = recorder.chain();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let exchange = async {
        tls.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut tls)
            .take((MAX_DOCUMENT + 8192) as u64)
            .read_to_end(&mut raw)
            .await?;
        Ok::<_, std::io::Error>(raw)
    };
    let document = match tokio::time::timeout(STEP_TIMEOUT, exchange).await {
        Err(_) => Err("no answer".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(raw)) => super::source::parse_response(&raw).and_then(|body| parse_document(&body)),
    };
    Ok(Reached { chain, document })
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    keys: Vec<Key>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
}

#[derive(Deserialize)]
struct Key {
    #[serde(rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

/// Parses a SPIFFE bundle document: its X.509 roots and sequence.
pub fn parse_document(body: &[u8]) -> Result<Roots, String> {
    if body.len() > MAX_DOCUMENT {
        return Err(format!("bundle: larger than {MAX_DOCUMENT} bytes"));
    }
    let document: Document =
        serde_json::from_slice(body).map_err(|e| format!("bundle: not a SPIFFE bundle: {e}"))?;
    if document.keys.len() > MAX_KEYS {
        return Err(format!("keys: more than {MAX_KEYS}"));
    }
    let mut ders = Vec::new();
    for (i, key) in document.keys.iter().enumerate() {
        if key.usage.as_deref() != Some("x509-svid") {
            continue;
        }
        let [cert] = key.x5c.as_slice() else {
            return Err(format!("keys[{i}].x5c: must hold exactly one certificate"));
        };
        let der = STANDARD
            .decode(cert)
            .map_err(|_| format!("keys[{i}].x5c: not base64"))?;
        match X509Certificate::from_der(&der) {
            Ok((rest, parsed)) if rest.is_empty() && parsed.is_ca() => ders.push(der),
            _ => return Err(format!("keys[{i}].x5c: not a CA certificate")),
        }
    }
    if ders.is_empty() {
        return Err("keys: no x509-svid authority".into());
    }
    Ok(Roots::from_ders(ders, document.spiffe_sequence))
}

/// `https_spiffe` as a holder of `roots` checks it: the chain leads to one of
/// `roots` and the leaf's only URI SAN is `endpoint_id`.
pub fn check(chain: &[Vec<u8>], roots: &Roots, endpoint_id: &str) -> Result<(), String> {
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate presented")?;
    let (_, parsed) =
        X509Certificate::from_der(leaf).map_err(|_| "unparsable certificate".to_string())?;
    let uris = uri_sans(&parsed);
    if uris != [endpoint_id] {
        return Err(format!(
            "presents {} where {endpoint_id} is expected",
            if uris.is_empty() {
                "no SPIFFE ID".to_string()
            } else {
                uris.join(", ")
            }
        ));
    }
    verify_chain(leaf, intermediates, roots, webpki::KeyUsage::server_auth())
}

/// Whether `leaf` (with `intermediates`) chains to one of `roots` for `usage`, now.
pub fn verify_chain(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &Roots,
    usage: webpki::KeyUsage,
) -> Result<(), String> {
    let root_ders: Vec<CertificateDer<'_>> = roots
        .der_list()
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let anchors: Vec<_> = root_ders
        .iter()
        .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
        .collect();
    if anchors.is_empty() {
        return Err("no root to verify against".into());
    }
    let leaf = CertificateDer::from(leaf);
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let cert =
        webpki::EndEntityCert::try_from(&leaf).map_err(|_| "unparsable certificate".to_string())?;
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    cert.verify_for_usage(
        algorithms,
        &anchors,
        &intermediates,
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(drop)
    .map_err(|e| format!("does not chain to the bundle held: {e:?}"))
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
            _ => None,
        })
        .flatten()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// A TLS client configuration that records the server's chain (checked
/// afterwards, per holder) and verifies only the handshake signatures.
pub fn recording_client_config() -> Result<(rustls::ClientConfig, Arc<Recorder>), String> {
    let recorder = Arc::new(Recorder::new());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&recorder.provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&recorder) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    Ok((config, recorder))
}

/// Accepts any chain (checked per holder afterwards) but records it; the
/// handshake signatures are verified, so the server holds the leaf's key.
#[derive(Debug)]
pub struct Recorder {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            chain: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The chain the server presented, leaf first.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        self.chain.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut chain) = self.chain.lock() {
            *chain = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.as_ref().to_vec())
                .collect();
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hostile_documents_are_refused_naming_the_field() {
        assert!(parse_document(b"\"x\"").unwrap_err().starts_with("bundle:"));
        assert_eq!(
            parse_document(br#"{"keys":[{"use":"jwt-svid","kid":"a"}]}"#).unwrap_err(),
            "keys: no x509-svid authority"
        );
        assert_eq!(
            parse_document(br#"{"keys":[{"use":"x509-svid","x5c":["AA","AA"]}]}"#).unwrap_err(),
            "keys[0].x5c: must hold exactly one certificate"
        );
        assert_eq!(
            parse_document(br#"{"keys":[{"use":"x509-svid","x5c":["AAEC"]}]}"#).unwrap_err(),
            "keys[0].x5c: not a CA certificate"
        );
        let many = format!(r#"{{"keys":[{}]}}"#, vec!["{}"; 65].join(","));
        assert_eq!(
            parse_document(many.as_bytes()).unwrap_err(),
            "keys: more than 64"
        );
        assert!(parse_document(&vec![b' '; MAX_DOCUMENT + 1])
            .unwrap_err()
            .contains("larger than"));
    }

    #[tokio::test]
    async fn unreachable_endpoints_say_where_they_stopped() {
        assert_eq!(probe("http://x").await.unwrap_err().stage, Stage::Url);
        assert_eq!(
            probe("https://name.invalid:8443").await.unwrap_err().stage,
            Stage::Dns
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let refused = probe(&format!("https://{addr}")).await.unwrap_err();
        assert_eq!(refused.stage, Stage::Tcp, "{refused:?}");
    }
}
