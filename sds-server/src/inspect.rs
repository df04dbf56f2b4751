//! `trustweave-sds inspect`: what an SDS server gives Envoy, as an operator needs to see it.
//!
//! Per pod: connects as an SDS client (FetchSecrets), and prints per secret
//! the SPIFFE IDs, serials and validity of certificates, and per trust domain
//! the number of CAs and their SHA-256 fingerprints. Per node (`--workloads`):
//! reads the admin endpoint's `/debug/workloads` and prints, per connected
//! workload, the identity it is served — an SDS client would only be served
//! its own. Private keys are never read out.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, SpiffeCertValidatorConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::render::SECRET_TYPE_URL;

/// Errors of the inspect command.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The admin endpoint could not be read.
    #[error("cannot read http://{addr}/debug/workloads: {reason}")]
    Admin {
        /// The admin address.
        addr: std::net::SocketAddr,
        /// Why.
        reason: String,
    },
    /// The SDS socket could not be reached.
    #[error("cannot connect to SDS socket {path}: {reason}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What one secret holds, without its private key.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SecretReport {
    /// The secret name asked for.
    pub name: String,
    /// `tls_certificate`, `validation_context`, or `error`.
    pub kind: String,
    /// The certificate chain of a `tls_certificate`, leaf first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertReport>,
    /// The trust domains of a `validation_context`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<TrustDomainReport>,
    /// Why the secret could not be fetched or read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One certificate of a chain.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CertReport {
    /// URI SANs that are SPIFFE IDs.
    pub spiffe_ids: Vec<String>,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
}

/// The CAs trusted for one trust domain.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TrustDomainReport {
    /// Trust domain name, or `*` for a PEM `trusted_ca` that is not scoped per domain.
    pub trust_domain: String,
    /// Number of CA certificates.
    pub ca_count: usize,
    /// SHA-256 fingerprints of the CA certificates, hex.
    pub sha256: Vec<String>,
}

/// Fetches each of `names` from the SDS server on `socket` and reports it.
pub async fn inspect(socket: &Path, names: &[String]) -> Result<Vec<SecretReport>, InspectError> {
    let mut client = SecretDiscoveryServiceClient::new(connect(socket).await?);
    let mut reports = Vec::with_capacity(names.len());
    for name in names {
        let request = DiscoveryRequest {
            resource_names: vec![name.clone()],
            type_url: SECRET_TYPE_URL.to_string(),
            ..Default::default()
        };
        let report = match client.fetch_secrets(request).await {
            Ok(response) => match response.into_inner().resources.first() {
                Some(any) => match Secret::decode(any.value.as_slice()) {
                    Ok(secret) => report_secret(name, &secret),
                    Err(e) => error_report(name, format!("undecodable Secret: {e}")),
                },
                None => error_report(name, "empty response".into()),
            },
            Err(status) => error_report(name, format!("{}: {}", status.code(), status.message())),
        };
        reports.push(report);
    }
    Ok(reports)
}

/// Largest `/debug/workloads` answer read (about 1,000 bytes per workload).
const MAX_WORKLOADS_RESPONSE: u64 = 64 << 20;

/// The workloads a node-mode server serves, read from its admin endpoint.
pub async fn workloads(
    admin: std::net::SocketAddr,
) -> Result<Vec<crate::delegated::WorkloadReport>, InspectError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |reason: String| InspectError::Admin {
        addr: admin,
        reason,
    };
    let mut stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| fail(e.to_string()))?;
    stream
        .write_all(
            format!("GET /debug/workloads HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_WORKLOADS_RESPONSE)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("not an HTTP response".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(fail(format!("{status}: {}", body.trim())));
    }
    serde_json::from_str(body).map_err(|e| fail(format!("unexpected body: {e}")))
}

/// Workloads as text: one block per workload.
pub fn workloads_to_text(workloads: &[crate::delegated::WorkloadReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if workloads.is_empty() {
        out.push_str("no workload connected\n");
    }
    for w in workloads {
        let _ = writeln!(out, "workload pid {} ({} SDS streams)", w.pid, w.streams);
        match (&w.spiffe_id, &w.serial) {
            (Some(id), Some(serial)) => {
                let _ = writeln!(out, "  default: {id} serial {serial}");
            }
            _ => out.push_str("  default: none (not attested, or no registration entry)\n"),
        }
        let _ = writeln!(out, "  trusts:  {}", w.trust_domains.join(", "));
    }
    out
}

/// Connects a gRPC channel to a Unix socket.
pub async fn connect(socket: &Path) -> Result<Channel, InspectError> {
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    });
    Endpoint::from_static("http://sds.invalid")
        .connect_with_connector(connector)
        .await
        .map_err(|e| InspectError::Connect {
            path: socket.to_path_buf(),
            reason: e.to_string(),
        })
}

fn error_report(name: &str, error: String) -> SecretReport {
    SecretReport {
        name: name.to_string(),
        kind: "error".into(),
        certificates: Vec::new(),
        trust_domains: Vec::new(),
        error: Some(error),
    }
}

/// Reports a decoded secret; only public parts are read.
pub fn report_secret(name: &str, secret: &Secret) -> SecretReport {
    let mut report = error_report(name, String::new());
    report.error = None;
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => {
            report.kind = "tls_certificate".into();
            report.certificates = pem_ders(tls.certificate_chain.as_ref())
                .iter()
                .map(|der| cert_report(der))
                .collect();
        }
        Some(secret::Type::ValidationContext(context)) => {
            report.kind = "validation_context".into();
            report.trust_domains = trust_domains(context);
        }
        _ => {
            report.kind = "error".into();
            report.error =
                Some("secret holds neither a certificate nor a validation context".into());
        }
    }
    report
}

fn trust_domains(context: &CertificateValidationContext) -> Vec<TrustDomainReport> {
    let spiffe = context
        .custom_validator_config
        .as_ref()
        .and_then(|c| c.typed_config.as_ref())
        .and_then(|any| SpiffeCertValidatorConfig::decode(any.value.as_slice()).ok());
    match spiffe {
        Some(config) => config
            .trust_domains
            .iter()
            .map(|td| domain_report(&td.name, &pem_ders(td.trust_bundle.as_ref())))
            .collect(),
        None => vec![domain_report("*", &pem_ders(context.trusted_ca.as_ref()))],
    }
}

fn domain_report(name: &str, ders: &[Vec<u8>]) -> TrustDomainReport {
    TrustDomainReport {
        trust_domain: name.to_string(),
        ca_count: ders.len(),
        sha256: ders
            .iter()
            .map(|der| hex::encode(Sha256::digest(der)))
            .collect(),
    }
}

fn pem_ders(source: Option<&DataSource>) -> Vec<Vec<u8>> {
    let bytes = match source.and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => return Vec::new(),
    };
    pem::parse_many(bytes)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

fn cert_report(der: &[u8]) -> CertReport {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return CertReport {
            spiffe_ids: Vec::new(),
            serial: "unparseable certificate".into(),
            not_before: String::new(),
            not_after: String::new(),
        };
    };
    let spiffe_ids = cert
        .extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
            _ => None,
        })
        .collect();
    let rfc3339 = |t: x509_parser::time::ASN1Time| {
        t.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    CertReport {
        spiffe_ids,
        serial: crate::snapshot::serial_hex(cert.raw_serial()),
        not_before: rfc3339(cert.validity().not_before),
        not_after: rfc3339(cert.validity().not_after),
    }
}

/// Human-readable rendering of reports.
pub fn to_text(reports: &[SecretReport]) -> String {
    let mut out = String::new();
    for report in reports {
        out.push_str(&format!("{} ({})\n", report.name, report.kind));
        if let Some(error) = &report.error {
            out.push_str(&format!("  error: {error}\n"));
        }
        for cert in &report.certificates {
            let ids = if cert.spiffe_ids.is_empty() {
                "(no SPIFFE ID)".to_string()
            } else {
                cert.spiffe_ids.join(", ")
            };
            out.push_str(&format!(
                "  cert {ids}\n    serial {}\n    valid  {} .. {}\n",
                cert.serial, cert.not_before, cert.not_after
            ));
        }
        for td in &report.trust_domains {
            out.push_str(&format!(
                "  trust domain {}: {} CA(s)\n",
                td.trust_domain, td.ca_count
            ));
            for fp in &td.sha256 {
                out.push_str(&format!("    sha256 {fp}\n"));
            }
        }
    }
    out
}
