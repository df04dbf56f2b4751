//! An mTLS client presenting any test certificate (rustls), for filter tests.
//!
//! It does not verify the server: these tests are about what the server (Envoy
//! with the filter) does with the client's certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::http::HttpResponse;
use crate::pki::IssuedSvid;

/// How a client judges the server's certificate chain (leaf, intermediates, now).
pub(crate) type ChainCheck = Box<
    dyn Fn(&CertificateDer<'_>, &[CertificateDer<'_>], UnixTime) -> Result<(), rustls::Error>
        + Send
        + Sync,
>;

/// A server verifier that judges the chain with a [`ChainCheck`] and the
/// handshake signatures with the provider's algorithms.
pub(crate) struct CheckedServer {
    provider: Arc<rustls::crypto::CryptoProvider>,
    check: ChainCheck,
}

impl CheckedServer {
    /// A verifier using `check` for the chain.
    pub(crate) fn new(provider: Arc<rustls::crypto::CryptoProvider>, check: ChainCheck) -> Self {
        Self { provider, check }
    }
}

impl std::fmt::Debug for CheckedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckedServer")
    }
}

impl ServerCertVerifier for CheckedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        (self.check)(end_entity, intermediates, now).map(|()| ServerCertVerified::assertion())
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

fn connector(client: &IssuedSvid) -> TlsConnector {
    connector_with_alpn(client, Vec::new())
}

fn connector_with_alpn(client: &IssuedSvid, alpn: Vec<Vec<u8>>) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CheckedServer::new(
            provider,
            Box::new(|_, _, _| Ok(())),
        )))
        .with_client_auth_cert(
            vec![CertificateDer::from(client.leaf_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client.key_der.clone())),
        )
        .expect("client certificate");
    let mut config = config;
    config.alpn_protocols = alpn;
    TlsConnector::from(Arc::new(config))
}

/// Opens an mTLS connection presenting `client`, writes `data`, and reads until
/// `want` bytes arrived or the server closed (at most 10 s).
pub async fn exchange(
    addr: SocketAddr,
    client: &IssuedSvid,
    data: &[u8],
    want: usize,
) -> std::io::Result<Vec<u8>> {
    exchange_with(connector(client), addr, data, want).await
}

async fn exchange_with(
    connector: TlsConnector,
    addr: SocketAddr,
    data: &[u8],
    want: usize,
) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("trustweave.test").expect("server name");
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(data).await?;
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while out.len() < want {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // A peer that closes without close_notify still answered what it answered.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s")
        })??;
    Ok(out)
}

/// Sends one HTTP/1.1 request over mTLS presenting `client`.
pub async fn request(
    addr: SocketAddr,
    client: &IssuedSvid,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let raw = exchange(
        addr,
        client,
        &request_head(method, path, headers),
        usize::MAX,
    )
    .await?;
    crate::http::parse(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
    })
}

/// Sends one HTTP/1.1 GET over mTLS presenting `client` and offering `alpn`
/// (Istio's client sidecars offer `istio-http/1.1` to reach an HTTP chain).
pub async fn request_with_alpn(
    addr: SocketAddr,
    client: &IssuedSvid,
    alpn: &[u8],
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let raw = exchange_with(
        connector_with_alpn(client, vec![alpn.to_vec()]),
        addr,
        &request_head("GET", path, headers),
        usize::MAX,
    )
    .await?;
    crate::http::parse(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
    })
}

fn request_head(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: inventory.gcp.internal\r\nconnection: close\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Sends a raw HTTP/1.1 request head (any bytes, e.g. obs-text values or
/// repeated headers) over mTLS presenting `client`; the server closes after answering.
pub async fn request_raw(
    addr: SocketAddr,
    client: &IssuedSvid,
    head: &[u8],
) -> std::io::Result<HttpResponse> {
    let raw = exchange(addr, client, head, usize::MAX).await?;
    crate::http::parse(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
    })
}

/// A raw request head: `GET path`, `host`, `connection: close`, then `headers` as given (bytes).
pub fn raw_head(path: &str, host: &str, headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut head =
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n").into_bytes();
    for (name, value) in headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Sends one HTTP/2 GET over mTLS (ALPN h2) with header values as bytes; returns the status.
pub async fn request_h2(
    addr: SocketAddr,
    client: &IssuedSvid,
    path: &str,
    headers: &[(&str, &[u8])],
) -> std::io::Result<u16> {
    let to_io = |e: h2::Error| std::io::Error::other(e.to_string());
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("trustweave.test").expect("server name");
    let tls = connector_with_alpn(client, vec![b"h2".to_vec()])
        .connect(name, tcp)
        .await?;
    let (mut send, connection) = h2::client::handshake(tls).await.map_err(to_io)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = http::Request::builder()
        .method("GET")
        .uri(format!("https://inventory.gcp.internal{path}"));
    for (name, value) in headers {
        let value = http::HeaderValue::from_bytes(value)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        request = request.header(*name, value);
    }
    let request = request
        .body(())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (response, _) = send.send_request(request, true).map_err(to_io)?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), response)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no HTTP/2 answer"))?
        .map_err(to_io)?;
    Ok(response.status().as_u16())
}
