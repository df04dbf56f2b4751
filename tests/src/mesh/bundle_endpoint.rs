//! SPIFFE bundle endpoints, as SPIRE servers federate: each publishes its trust
//! bundle in the SPIFFE bundle format (a JWKS whose `x509-svid` keys carry one
//! root each in `x5c`) over HTTPS, authenticated as `https_spiffe` — the
//! endpoint presents the SPIRE server's own SVID, which the client verifies
//! against the bundle it already holds for that trust domain (bootstrapped
//! once, then the last one fetched) and the endpoint's expected SPIFFE ID.
//!
//! Everything fetched is hostile until parsed: the body is bounded, every key
//! is checked (one certificate per `x5c`, a CA, its key equal to the JWK's),
//! and a bundle without X.509 roots is refused rather than trusted as empty.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::pki::IssuedSvid;
use crate::tls_client::CheckedServer;

/// The largest bundle document accepted.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;
/// The most keys a bundle document may carry.
pub const MAX_BUNDLE_KEYS: usize = 64;

/// What a bundle endpoint publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedBundle {
    /// Root CA certificates (DER).
    pub roots: Vec<Vec<u8>>,
    /// `spiffe_sequence`: grows with every change.
    pub sequence: u64,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
}

/// Encodes a bundle in the SPIFFE bundle format.
pub fn encode(bundle: &PublishedBundle) -> Vec<u8> {
    let keys: Vec<serde_json::Value> = bundle
        .roots
        .iter()
        .map(|der| {
            let (x, y) = ec_point(der).expect("the test PKI's roots are P-256");
            json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
                "x5c": [STANDARD.encode(der)],
            })
        })
        .collect();
    serde_json::to_vec(&json!({
        "keys": keys,
        "spiffe_sequence": bundle.sequence,
        "spiffe_refresh_hint": bundle.refresh_hint.as_secs(),
    }))
    .expect("JSON")
}

/// A bundle document that is not a usable SPIFFE bundle.
#[derive(Debug, PartialEq, Eq)]
pub struct BundleError(pub String);

impl std::fmt::Display for BundleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    spiffe_sequence: Option<u64>,
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Deserialize)]
struct Jwk {
    #[serde(rename = "use")]
    usage: Option<String>,
    kty: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

/// Parses a SPIFFE bundle document: its X.509 roots, sequence and refresh hint.
pub fn parse(body: &[u8]) -> Result<PublishedBundle, BundleError> {
    let fail = |field: &str, why: &str| BundleError(format!("{field}: {why}"));
    if body.len() > MAX_BUNDLE_BYTES {
        return Err(fail("bundle", "larger than 64 KiB"));
    }
    let jwks: Jwks = serde_json::from_slice(body).map_err(|e| fail("bundle", &e.to_string()))?;
    if jwks.keys.len() > MAX_BUNDLE_KEYS {
        return Err(fail("keys", "more than 64 keys"));
    }
    let mut roots = Vec::new();
    for (i, key) in jwks.keys.iter().enumerate() {
        if key.usage.as_deref() != Some("x509-svid") {
            continue; // JWT authorities are not ours to use.
        }
        let field = format!("keys[{i}]");
        let [cert] = key.x5c.as_slice() else {
            return Err(fail(&field, "x5c must hold exactly one certificate"));
        };
        let der = STANDARD
            .decode(cert)
            .map_err(|_| fail(&field, "x5c is not base64"))?;
        let (rest, parsed) =
            X509Certificate::from_der(&der).map_err(|_| fail(&field, "x5c is not X.509"))?;
        if !rest.is_empty() || !parsed.is_ca() {
            return Err(fail(&field, "x5c is not a CA certificate"));
        }
        let (x, y) = ec_point(&der).ok_or_else(|| fail(&field, "not a P-256 key"))?;
        let matches = key.kty.as_deref() == Some("EC")
            && key.crv.as_deref() == Some("P-256")
            && key.x.as_deref() == Some(&URL_SAFE_NO_PAD.encode(x))
            && key.y.as_deref() == Some(&URL_SAFE_NO_PAD.encode(y));
        if !matches {
            return Err(fail(&field, "the JWK's key is not the certificate's"));
        }
        roots.push(der);
    }
    if roots.is_empty() {
        return Err(fail("keys", "no x509-svid authority"));
    }
    Ok(PublishedBundle {
        roots,
        sequence: jwks.spiffe_sequence.unwrap_or(0),
        refresh_hint: Duration::from_secs(jwks.spiffe_refresh_hint.unwrap_or(0)),
    })
}

/// The P-256 public point `(x, y)` of a certificate.
fn ec_point(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let point = cert.public_key().subject_public_key.data.as_ref();
    match point {
        [0x04, xy @ ..] if xy.len() == 64 => Some((xy[..32].to_vec(), xy[32..].to_vec())),
        _ => None,
    }
}

/// A running bundle endpoint: serves what it is told to publish until stopped.
pub struct BundleEndpoint {
    addr: SocketAddr,
    published: watch::Sender<PublishedBundle>,
    serving: watch::Sender<bool>,
    svid: watch::Sender<IssuedSvid>,
}

impl BundleEndpoint {
    /// Serves `bundle` on `addr` with the SPIRE server's `svid`.
    pub async fn start(addr: SocketAddr, svid: IssuedSvid, bundle: PublishedBundle) -> Arc<Self> {
        let listener = TcpListener::bind(addr).await.expect("bind bundle endpoint");
        let endpoint = Arc::new(Self {
            addr: listener.local_addr().expect("addr"),
            published: watch::channel(bundle).0,
            serving: watch::channel(true).0,
            svid: watch::channel(svid).0,
        });
        let (published, serving, svid) = (
            endpoint.published.subscribe(),
            endpoint.serving.subscribe(),
            endpoint.svid.subscribe(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if !*serving.borrow() {
                    continue; // Unreachable: the connection is dropped unanswered.
                }
                let body = encode(&published.borrow());
                let acceptor = acceptor(&svid.borrow());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        endpoint
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes `bundle` from now on.
    pub fn publish(&self, bundle: PublishedBundle) {
        self.published.send_replace(bundle);
    }

    /// What it publishes now.
    pub fn published(&self) -> PublishedBundle {
        self.published.borrow().clone()
    }

    /// Presents `svid` from now on (the SPIRE server's SVID rotates with its CA).
    pub fn present(&self, svid: IssuedSvid) {
        self.svid.send_replace(svid);
    }

    /// Whether it answers (`false`: connections are dropped unanswered).
    pub fn set_serving(&self, serving: bool) {
        self.serving.send_replace(serving);
    }
}

fn acceptor(svid: &IssuedSvid) -> TlsAcceptor {
    let chain = std::iter::once(&svid.leaf_der)
        .chain(&svid.intermediates_der)
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(
        chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_der.clone())),
    )
    .expect("server certificate");
    TlsAcceptor::from(Arc::new(config))
}

/// Fetches and parses the bundle at `addr`, authenticating the endpoint as
/// `endpoint_id` against `trusted_roots` (`https_spiffe`).
pub async fn fetch(
    addr: SocketAddr,
    endpoint_id: &str,
    trusted_roots: &[Vec<u8>],
    timeout: Duration,
) -> Result<PublishedBundle, BundleError> {
    let fail = |why: String| BundleError(format!("{addr}: {why}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (roots, id, algorithms) = (
        trusted_roots.to_vec(),
        endpoint_id.to_string(),
        Arc::clone(&provider),
    );
    let verifier = CheckedServer::new(
        Arc::clone(&provider),
        Box::new(move |leaf, intermediates, now| {
            check_spiffe_server(leaf, intermediates, now, &roots, &id, &algorithms)
        }),
    );
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: spire-server\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut raw = Vec::new();
        tls.take((MAX_BUNDLE_BYTES + 4096) as u64)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let response = crate::http::parse(&raw).ok_or_else(|| fail("malformed HTTP".into()))?;
        if response.status != 200 {
            return Err(fail(format!("HTTP {}", response.status)));
        }
        parse(response.body.as_bytes()).map_err(|e| fail(e.0))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail("timed out".into()))?
}

/// `https_spiffe`: the endpoint's chain must lead to a root of the bundle held
/// for its trust domain, and its leaf must name exactly `endpoint_id`.
fn check_spiffe_server(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    roots: &[Vec<u8>],
    endpoint_id: &str,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(), rustls::Error> {
    let invalid = |why: &str| rustls::Error::General(why.to_string());
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let anchors: Vec<_> = root_ders
        .iter()
        .filter_map(|der| webpki::anchor_from_trusted_cert(der).ok())
        .collect();
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|_| invalid("unparsable certificate"))?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| invalid(&format!("chain: {e}")))?;
    let (_, parsed) = X509Certificate::from_der(end_entity.as_ref())
        .map_err(|_| invalid("unparsable certificate"))?;
    let uris: Vec<&str> = parsed
        .extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(&san.general_names),
            _ => None,
        })
        .flatten()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    if uris != [endpoint_id] {
        return Err(invalid("not the expected bundle endpoint SPIFFE ID"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::TrustDomainCa;

    fn bundle(cas: &[&TrustDomainCa]) -> PublishedBundle {
        PublishedBundle {
            roots: cas.iter().map(|ca| ca.root_der().to_vec()).collect(),
            sequence: 7,
            refresh_hint: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_published_bundle_parses_back() {
        let (a, b) = (TrustDomainCa::new("a.org"), TrustDomainCa::new("a.org"));
        let published = bundle(&[&a, &b]);
        assert_eq!(parse(&encode(&published)), Ok(published));
    }

    #[test]
    fn hostile_documents_are_refused_naming_the_field() {
        let ca = TrustDomainCa::new("a.org");
        let good: serde_json::Value =
            serde_json::from_slice(&encode(&bundle(&[&ca]))).expect("json");
        let refused = |doc: serde_json::Value| parse(&serde_json::to_vec(&doc).expect("json"));
        let mut two = good.clone();
        two["keys"][0]["x5c"] = json!([good["keys"][0]["x5c"][0], good["keys"][0]["x5c"][0]]);
        assert!(refused(two)
            .expect_err("refused")
            .0
            .starts_with("keys[0]: x5c"));
        let mut other_key = good.clone();
        let other = TrustDomainCa::new("a.org");
        let other_doc: serde_json::Value =
            serde_json::from_slice(&encode(&bundle(&[&other]))).expect("json");
        other_key["keys"][0]["x"] = other_doc["keys"][0]["x"].clone();
        assert!(refused(other_key)
            .expect_err("refused")
            .0
            .contains("not the certificate's"));
        let leaf = ca.issue_svid("spiffe://a.org/w", Duration::from_secs(60));
        let mut not_ca = good.clone();
        not_ca["keys"][0]["x5c"] = json!([STANDARD.encode(&leaf.leaf_der)]);
        assert!(refused(not_ca).expect_err("refused").0.contains("not a CA"));
        let mut jwt_only = good.clone();
        jwt_only["keys"][0]["use"] = json!("jwt-svid");
        assert_eq!(
            refused(jwt_only),
            Err(BundleError("keys: no x509-svid authority".into()))
        );
        assert!(parse(&vec![b' '; MAX_BUNDLE_BYTES + 1]).is_err());
        assert!(parse(b"[]").is_err());
    }
}
