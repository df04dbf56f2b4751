//! The peer's certificate, read from the certificate itself — never from text a client can shape.
//!
//! Envoy's wasm property `connection.uri_san_peer_certificate` yields only the
//! first URI SAN, and Envoy writes SAN values into `x-forwarded-client-cert`
//! unescaped, after whatever the client sent (`APPEND_FORWARD`). So the URI
//! SANs are counted from the DER certificate, found in Envoy's own element:
//!
//! - **Direct peer:** Envoy appends `By=<own URI SAN>;Hash=<digest>;Cert="<url-encoded
//!   PEM>"` for it (`Hash` always; `Cert` with `set_current_client_cert_details.cert`).
//!   Its element is found **from the end**, by the exact text `Hash=<digest>`, where
//!   `digest` is `connection.sha256_peer_certificate_digest` (a property Envoy computes
//!   from the handshake): client text comes before Envoy's element, and a certificate
//!   cannot name its own digest in its SANs. The `Cert=` right after it is decoded
//!   once and must hash to the digest. A peer that presented a certificate the filter
//!   cannot locate this way is **unverifiable** — the request is denied — never
//!   "no identity". The work per request is one linear search and at most one decode.
//! - **Caller forwarded by a trusted gateway:** everything before Envoy's own element
//!   is what the gateway sent. It is a forwarded caller only when it is exactly one
//!   element, exactly as a `SANITIZE_SET` gateway with `cert` (and `uri`) details
//!   writes it: `By=<the gateway's own SPIFFE ID>;Hash=<h>;Cert="<c>"` and then nothing,
//!   or `;URI=<san>` for each URI SAN of that certificate, in order — compared with
//!   the text the certificate implies, so no client text can pass for it (a gateway
//!   misconfigured with `APPEND_FORWARD` puts the client's text first, which fails).
//!
//! Parsed results are cached per worker by digest ([`CertCache`]): a connection's
//! requests after its first cost a hash-map lookup.

use rustc_hash::FxHashMap as HashMap;

use sha2::{Digest, Sha256};

use super::svid::{workload_identity, Identity};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use super::svid::CertSans;

/// Longest `x-forwarded-client-cert` searched, in bytes (Envoy's default header limit is 60 KiB).
pub const MAX_XFCC_BYTES: usize = 64 * 1024;
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
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let high = hex_value(bytes.next()?)?;
            let low = hex_value(bytes.next()?)?;
            out.push(high << 4 | low);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

/// The value of one hex digit.
pub fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|v| u8::try_from(v).ok())
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

/// The `"…"` value at the start of `text`, quotes included (`None`: not quoted, or never closed).
fn quoted_prefix(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('"')?;
    let close = inner.find('"')?;
    // `"` is one byte: the value is `close` bytes between two quotes.
    text.get(..close.checked_add(2)?)
}

/// Envoy's own element for the direct peer, located from the end of the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnElement<'a> {
    /// Everything before the element (and its separating comma): what the
    /// previous hop sent, or what the client wrote.
    pub before: &'a str,
    /// The element's `Cert=` value (quoted, url-encoded PEM).
    pub cert: &'a str,
}

/// Locates Envoy's element for the peer with certificate `digest`: the last
/// `Hash=<digest>` in the header, its `Cert=` right after it, its `By=` right
/// before it; an error saying what is missing otherwise.
pub fn own_element<'a>(xfcc: Option<&'a str>, digest: &str) -> Result<OwnElement<'a>, String> {
    const HINT: &str = "set set_current_client_cert_details.cert on the connection manager";
    let Some(xfcc) = xfcc else {
        return Err(format!(
            "x-forwarded-client-cert is missing for a peer that presented a certificate ({HINT})"
        ));
    };
    if xfcc.len() > MAX_XFCC_BYTES {
        return Err("x-forwarded-client-cert is longer than 64 KiB".into());
    }
    if digest.len() != 64
        || !digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("the peer certificate digest is not lower-case SHA-256 hex".into());
    }
    let hash = format!("Hash={digest}");
    let Some(at) = xfcc.rfind(&hash) else {
        return Err(format!(
            "x-forwarded-client-cert has no element of Envoy's for the peer's digest ({HINT})"
        ));
    };
    let after = xfcc
        .get(at.saturating_add(hash.len())..)
        .unwrap_or_default();
    // The quoted value right after `;Cert=` (url-encoded PEM holds no quote).
    let cert = after
        .strip_prefix(";Cert=")
        .and_then(quoted_prefix)
        .ok_or_else(|| format!("Envoy's element for the peer has no Cert ({HINT})"))?;
    // The element starts at `By=<own URI SAN>;` (absent when this Envoy has no URI SAN).
    let head = &xfcc[..at];
    let start = match head.strip_suffix(';') {
        None if head.is_empty() || head.ends_with(',') => at,
        None => return Err("Envoy's element for the peer is not where Envoy writes it".into()),
        Some(by_part) => {
            let by = by_part
                .rfind("By=")
                .filter(|&b| {
                    by_part
                        .get(b.saturating_add(3)..)
                        .is_some_and(|own| !own.contains([',', ';', '"']))
                })
                .ok_or("Envoy's element for the peer is not where Envoy writes it")?;
            if by > 0 && !by_part[..by].ends_with(',') {
                return Err("Envoy's element for the peer is not where Envoy writes it".into());
            }
            by
        }
    };
    let before = xfcc[..start].strip_suffix(',').unwrap_or(&xfcc[..start]);
    Ok(OwnElement { before, cert })
}

/// The direct peer's certificate, from Envoy's own element: its URI SANs, or
/// why it cannot be verified (the request is then denied).
pub fn locate_peer(xfcc: Option<&str>, digest: &str) -> CertSans {
    let element = own_element(xfcc, digest)?;
    let der = cert_value_to_der(element.cert)
        .ok_or("Envoy's Cert for the peer does not decode as a PEM certificate")?;
    if sha256_hex(&der) != digest {
        return Err("Envoy's Cert for the peer does not match the peer's digest".into());
    }
    sans_from_der(&der)
}

/// The certificate a trusted gateway forwarded, as its element says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded<'a> {
    /// The element's `Hash=` (the certificate's SHA-256, lower-case hex).
    pub hash: &'a str,
    /// The element's `Cert=` value (quoted, url-encoded PEM).
    pub cert: &'a str,
    /// What follows the `Cert=` value in the element (`;URI=…` pairs, or nothing).
    pub rest: &'a str,
}

impl Forwarded<'_> {
    /// The forwarded certificate's URI SANs, checked against its `Hash=`.
    pub fn sans(&self) -> CertSans {
        let der = cert_value_to_der(self.cert)
            .ok_or("the gateway's forwarded certificate does not decode")?;
        if sha256_hex(&der) != self.hash {
            return Err("the gateway's forwarded certificate does not match its Hash".into());
        }
        sans_from_der(&der)
    }

    /// Checks that the element ends right after `Cert=`, or with exactly the
    /// `URI=` pairs its certificate implies (`uri_pairs`, see [`uri_pairs`]).
    pub fn check_rest(&self, uri_pairs: Option<&str>) -> Result<(), String> {
        if self.rest.is_empty() || Some(self.rest) == uri_pairs {
            Ok(())
        } else {
            Err("the gateway's element holds more than its certificate's URI SANs: not one element a SANITIZE_SET gateway wrote".into())
        }
    }
}

/// The `;URI=` pairs Envoy writes for a certificate with these URI SANs (`;URI=` for none).
pub fn uri_pairs(sans: &[String]) -> String {
    if sans.is_empty() {
        ";URI=".into()
    } else {
        sans.iter().map(|s| format!(";URI={s}")).collect()
    }
}

/// What locating a certificate gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// Found and parsed: what it proves.
    Found(Identity),
    /// Not found, or not parsable: why.
    NotFound(String),
}

/// The caller a trusted gateway forwarded: `before` (what precedes Envoy's
/// own element) must be one element beginning `By=<gateway_id>;Hash=<h>;Cert="<c>"`;
/// an error saying why it is not a forwarded caller otherwise. Its end is checked
/// by [`Forwarded::sans`].
pub fn forwarded_by_gateway<'a>(
    before: &'a str,
    gateway_id: &str,
) -> Result<Forwarded<'a>, String> {
    if before.is_empty() {
        return Err("the trusted gateway forwarded no caller".into());
    }
    let not_one = || {
        "the gateway's x-forwarded-client-cert is not one element By=<the gateway>;Hash=;Cert= (is the gateway SANITIZE_SET?)".to_string()
    };
    let rest = before
        .strip_prefix("By=")
        .and_then(|r| r.strip_prefix(gateway_id))
        .and_then(|r| r.strip_prefix(";Hash="))
        .ok_or_else(not_one)?;
    let hash = rest.get(..64).ok_or_else(not_one)?;
    if !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(not_one());
    }
    let after_hash = rest.get(64..).ok_or_else(not_one)?;
    let cert_and_rest = after_hash.strip_prefix(";Cert=").ok_or_else(not_one)?;
    let cert = quoted_prefix(cert_and_rest).ok_or_else(not_one)?;
    Ok(Forwarded {
        hash,
        cert,
        rest: cert_and_rest.get(cert.len()..).unwrap_or_default(),
    })
}

/// One certificate the cache knows.
#[derive(Debug)]
struct Known {
    identity: Identity,
    uri_pairs: String,
}

/// What each certificate proves, by digest, per worker (a connection's later
/// requests skip the parse): its workload identity, or why it has none.
#[derive(Debug, Default)]
pub struct CertCache {
    entries: HashMap<String, Known>,
    /// How many certificates were parsed (cache misses), for metrics.
    pub parsed: u64,
}

impl CertCache {
    /// What the certificate with `digest` proves: cached, or read by `locate`
    /// (remembered when the certificate was found; a certificate not found
    /// costs one `locate` per request, which is one search and one decode).
    pub fn get_or_insert(&mut self, digest: &str, locate: impl FnOnce() -> CertSans) -> Located {
        if let Some(hit) = self.entries.get(digest) {
            return Located::Found(hit.identity.clone());
        }
        self.parsed = self.parsed.saturating_add(1);
        let sans = match locate() {
            Ok(sans) => sans,
            Err(why) => return Located::NotFound(why),
        };
        let identity = workload_identity(&Ok(sans.clone()));
        if !digest.is_empty() {
            if self.entries.len() >= CACHE_CAPACITY {
                self.entries.clear();
            }
            self.entries.insert(
                digest.to_string(),
                Known {
                    identity: identity.clone(),
                    uri_pairs: uri_pairs(&sans),
                },
            );
        }
        Located::Found(identity)
    }

    /// The `;URI=` pairs of a known certificate.
    pub fn uri_pairs(&self, digest: &str) -> Option<&str> {
        self.entries.get(digest).map(|k| k.uri_pairs.as_str())
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

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn own_element_is_found_from_the_end_by_its_hash() {
        let own = format!("By=spiffe://a/me;Hash={DIGEST};Cert=\"x\";URI=spiffe://b/c");
        let element = own_element(Some(&own), DIGEST).expect("found");
        assert_eq!((element.before, element.cert), ("", "\"x\""));
        // Client text first: decoys, a copy of the hash, an unbalanced quote.
        let hostile = format!("Cert=\"decoy\",Hash={DIGEST};Cert=\"copy\",URI=\"open,{own}");
        let element = own_element(Some(&hostile), DIGEST).expect("found");
        assert_eq!(element.cert, "\"x\"");
        assert_eq!(
            element.before,
            format!("Cert=\"decoy\",Hash={DIGEST};Cert=\"copy\",URI=\"open")
        );
        let without_cert = format!("By=spiffe://a/me;Hash={DIGEST};URI=u");
        let no_cert = own_element(Some(&without_cert), DIGEST);
        assert!(matches!(no_cert, Err(e) if e.contains("no Cert")));
        assert!(own_element(Some("Hash=ab;Cert=\"x\""), DIGEST).is_err());
        assert!(own_element(None, DIGEST).is_err());
        assert!(own_element(Some(&own), &DIGEST.to_uppercase()).is_err());
        assert!(
            own_element(Some(&format!("x{own}")), DIGEST).is_err(),
            "glued to client text"
        );
    }

    #[test]
    fn forwarded_is_exactly_one_gateway_element() {
        let gw = "spiffe://a/gw";
        let one = format!("By={gw};Hash={DIGEST};Cert=\"%zz\";URI=spiffe://a/b");
        let forwarded = forwarded_by_gateway(&one, gw).expect("shape");
        assert_eq!(forwarded.hash, DIGEST);
        assert_eq!(forwarded.cert, "\"%zz\"");
        assert_eq!(forwarded.rest, ";URI=spiffe://a/b");
        assert!(forwarded.sans().is_err(), "does not decode");
        assert!(forwarded_by_gateway("", gw).is_err());
        assert!(forwarded_by_gateway(&format!("x,{one}"), gw).is_err());
        assert!(forwarded_by_gateway(&one.replace(gw, "spiffe://a/other"), gw).is_err());
        assert!(forwarded_by_gateway(&format!("By={gw};Hash=ab;Cert=\"x\""), gw).is_err());
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
            matches!(
                cache.get_or_insert("miss", || unreachable!("cached")),
                Located::Found(Err(_))
            ),
            "u is no SPIFFE ID"
        );
        assert_eq!(cache.uri_pairs("miss"), Some(";URI=u"));
    }
}
