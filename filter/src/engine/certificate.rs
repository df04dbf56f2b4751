//! The peer's certificate, read from the certificate itself — never from text a client can shape.
//!
//! Envoy's wasm property `connection.uri_san_peer_certificate` yields only the
//! first URI SAN, and Envoy writes SAN values into `x-forwarded-client-cert`
//! unescaped, after whatever the client sent. So the URI SANs are counted from
//! the DER certificate:
//!
//! - **Direct peer:** Envoy appends `Cert="<url-encoded PEM>"` for it
//!   (`set_current_client_cert_details.cert`). Every `Cert=` value in the header
//!   is a candidate; the one whose SHA-256 equals
//!   `connection.sha256_peer_certificate_digest` (a property Envoy computes from
//!   the handshake) *is* the peer's certificate, wherever it sits in the text.
//!   A client can copy its own certificate there, which changes nothing.
//! - **Caller forwarded by a trusted gateway:** the gateway (`SANITIZE_SET`)
//!   writes the header's first element itself; its leading `By=` / `Hash=` /
//!   `Cert=` pairs come before any SAN text, so they are read from the start of
//!   the header and nowhere else.
//!
//! Parsed results are cached per worker by digest ([`CertCache`]): a connection's
//! requests after its first cost a hash-map lookup.

use rustc_hash::FxHashMap as HashMap;

use sha2::{Digest, Sha256};

use super::identity::{workload_identity, Identity};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What one verified certificate says about identity: its URI SANs, in order,
/// or why they could not be read (which yields no identity).
pub type CertSans = Result<Vec<String>, String>;

/// Longest `x-forwarded-client-cert` searched, in bytes (Envoy's default header limit is 60 KiB).
pub const MAX_XFCC_BYTES: usize = 64 * 1024;
/// Most `Cert=` candidates tried in one header.
pub const MAX_CANDIDATES: usize = 16;
/// Most certificates remembered per worker; the cache is emptied when full.
pub const CACHE_CAPACITY: usize = 4096;

/// The URI SANs of a DER certificate.
pub fn sans_from_der(der: &[u8]) -> CertSans {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("peer certificate does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("peer certificate has trailing bytes".into());
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("peer certificate SAN extension is invalid: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Lower-case hex SHA-256 of `der`.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`).
pub fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The DER of the first `CERTIFICATE` block of a PEM text.
pub fn pem_to_der(pem: &[u8]) -> Option<Vec<u8>> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    (block.label == "CERTIFICATE").then_some(block.contents)
}

/// The DER certificate of one XFCC `Cert` value (quoted, url-encoded PEM).
fn cert_value_to_der(value: &str) -> Option<Vec<u8>> {
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    pem_to_der(&percent_decode(inner)?)
}

/// Every `Cert=` value in the header text, wherever it is, at most [`MAX_CANDIDATES`].
fn cert_candidates(xfcc: &str) -> impl Iterator<Item = &str> {
    let mut rest = xfcc;
    std::iter::from_fn(move || {
        let at = find_ignore_case(rest, "cert=")?;
        let value = &rest[at + 5..];
        let end = if let Some(quoted) = value.strip_prefix('"') {
            quoted.find('"').map_or(value.len(), |i| i + 2)
        } else {
            value.find([';', ',']).unwrap_or(value.len())
        };
        rest = &value[end..];
        Some(&value[..end])
    })
    .take(MAX_CANDIDATES)
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// The direct peer's certificate: the `Cert=` value whose SHA-256 is `digest`.
pub fn locate_peer(xfcc: Option<&str>, digest: &str) -> CertSans {
    const HINT: &str = "set set_current_client_cert_details.cert on the connection manager";
    let Some(xfcc) = xfcc.filter(|x| x.len() <= MAX_XFCC_BYTES) else {
        return Err(format!(
            "x-forwarded-client-cert carries no certificate for the peer ({HINT})"
        ));
    };
    for candidate in cert_candidates(xfcc) {
        if let Some(der) = cert_value_to_der(candidate) {
            if sha256_hex(&der).eq_ignore_ascii_case(digest) {
                return sans_from_der(&der);
            }
        }
    }
    Err(format!(
        "x-forwarded-client-cert carries no certificate matching the peer's digest ({HINT})"
    ))
}

/// The certificate a trusted gateway forwarded, as written in the header's first element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded<'a> {
    /// The element's `Hash=` (the certificate's SHA-256), if written.
    pub hash: Option<&'a str>,
    /// The element's `Cert=` value (quoted, url-encoded PEM).
    pub cert: &'a str,
}

impl Forwarded<'_> {
    /// The forwarded certificate's URI SANs (checked against its `Hash=`).
    pub fn sans(&self) -> CertSans {
        let der = cert_value_to_der(self.cert)
            .ok_or_else(|| "the gateway's forwarded certificate does not decode".to_string())?;
        match self.hash {
            Some(h) if !sha256_hex(&der).eq_ignore_ascii_case(h) => {
                Err("the gateway's forwarded certificate does not match its Hash".into())
            }
            _ => sans_from_der(&der),
        }
    }
}

/// The caller a trusted gateway forwarded: the `Cert=` of the header's first
/// element, read only among the element's leading `By=` / `Hash=` pairs, which
/// precede every SAN value Envoy writes. `None` when the gateway forwarded no
/// certificate there.
pub fn forwarded_by_gateway(xfcc: Option<&str>) -> Option<Forwarded<'_>> {
    let mut rest = xfcc.filter(|x| x.len() <= MAX_XFCC_BYTES)?;
    let mut hash = None;
    loop {
        let (key, after) = rest.split_once('=')?;
        if let Some(quoted) = after.strip_prefix('"') {
            let close = quoted.find('"')? + 2;
            return key.eq_ignore_ascii_case("cert").then_some(Forwarded {
                hash,
                cert: &after[..close],
            });
        }
        let end = after.find([';', ',']).unwrap_or(after.len());
        if key.eq_ignore_ascii_case("hash") {
            hash = Some(&after[..end]);
        } else if !key.eq_ignore_ascii_case("by") {
            // Envoy writes Cert right after By and Hash: anything else first means no certificate.
            return None;
        }
        match after.as_bytes().get(end) {
            Some(b';') => rest = &after[end + 1..],
            _ => return None,
        }
    }
}

/// What each certificate proves, by digest, per worker (a connection's later
/// requests skip the parse): its workload identity, or why it has none.
#[derive(Debug, Default)]
pub struct CertCache {
    entries: HashMap<String, Identity>,
    /// How many certificates were parsed (cache misses), for metrics.
    pub parsed: u64,
}

impl CertCache {
    /// What the certificate with `digest` proves: cached, or read by `locate`
    /// (remembered when the certificate was found: a certificate that could not
    /// be located may be found on the next request).
    pub fn get_or_insert(&mut self, digest: &str, locate: impl FnOnce() -> CertSans) -> Identity {
        if let Some(hit) = self.entries.get(digest) {
            return hit.clone();
        }
        let sans = locate();
        self.parsed += 1;
        let found = sans.is_ok();
        let identity = workload_identity(&sans);
        if found && !digest.is_empty() {
            if self.entries.len() >= CACHE_CAPACITY {
                self.entries.clear();
            }
            self.entries.insert(digest.to_string(), identity.clone());
        }
        identity
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Url-encodes a PEM text as Envoy writes it into XFCC (for tests and the CLI).
pub fn url_encode_pem(pem: &str) -> String {
    pem.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some(&b"a b+c"[..]));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%+F"), None);
        assert_eq!(percent_decode("%FF").as_deref(), Some(&[0xFF][..]));
    }

    #[test]
    fn candidates_are_found_anywhere_and_bounded() {
        let text = r#"URI=x;x=",Cert="a%20b";URI=y,By=z;Cert=plain,cert="q""#;
        let found: Vec<&str> = cert_candidates(text).collect();
        assert_eq!(found, vec![r#""a%20b""#, "plain", r#""q""#]);
        let many = "Cert=\"x\";".repeat(100);
        assert_eq!(cert_candidates(&many).count(), MAX_CANDIDATES);
        assert_eq!(
            cert_candidates(r#"Cert=""#).collect::<Vec<_>>(),
            vec![r#"""#]
        );
    }

    #[test]
    fn forwarded_reads_only_the_leading_pairs() {
        assert!(forwarded_by_gateway(None).is_none());
        assert!(forwarded_by_gateway(Some("URI=spiffe://a/b;Cert=\"x\"")).is_none());
        assert!(forwarded_by_gateway(Some("By=spiffe://a/g;Hash=ab,Cert=\"x\"")).is_none());
        let forwarded =
            forwarded_by_gateway(Some("By=spiffe://a/g;Hash=ab;Cert=\"%zz\";URI=u")).expect("cert");
        assert_eq!(forwarded.hash, Some("ab"));
        assert!(forwarded.sans().is_err());
    }

    #[test]
    fn cache_is_bounded_and_remembers_only_found_certificates() {
        let mut cache = CertCache::default();
        for i in 0..CACHE_CAPACITY + 10 {
            let _ = cache.get_or_insert(&format!("{i:064x}"), || Ok(vec![]));
        }
        assert!(cache.len() <= CACHE_CAPACITY);
        let _ = cache.get_or_insert("miss", || Err("not found".into()));
        let before = cache.parsed;
        let _ = cache.get_or_insert("miss", || Ok(vec!["u".into()]));
        assert_eq!(cache.parsed, before + 1, "a failure is not cached");
        assert!(
            cache
                .get_or_insert("miss", || unreachable!("cached"))
                .is_err(),
            "u is no SPIFFE ID"
        );
    }
}
