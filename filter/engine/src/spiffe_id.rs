//! SPIFFE ID parsing, strictly per the SPIFFE ID standard.
//!
//! `spiffe://<trust-domain><path>`: the trust domain is lower-case
//! `[a-z0-9.-_]`, non-empty; the path is empty or `/`-separated segments of
//! `[A-Za-z0-9.-_]`, none empty, `.` or `..`. Percent-encoding, ports, userinfo,
//! query and fragment are all invalid (their characters are outside both sets).

use std::fmt;
use std::sync::Arc;

/// Longest SPIFFE ID accepted, in bytes (the standard's limit for URI SANs).
pub const MAX_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// A valid SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// Shared: an identity is cloned per request from the certificate cache.
    id: Arc<str>,
    trust_domain_len: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// It does not start with `spiffe://`.
    #[error("scheme must be spiffe://")]
    Scheme,
    /// The trust domain is empty.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `[a-z0-9.-_]` (upper case, `:`, `@`, `%`...).
    #[error("trust domain has invalid character {0:?}")]
    TrustDomainChar(char),
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("path has an empty segment")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("path has a dot segment")]
    DotSegment,
    /// A path character is outside `[A-Za-z0-9.-_]` (`%`, `?`, `#`...).
    #[error("path has invalid character {0:?}")]
    PathChar(char),
    /// Longer than [`MAX_LEN`].
    #[error("longer than {MAX_LEN} bytes")]
    TooLong,
}

impl SpiffeId {
    /// Parses and validates `s`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() > MAX_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::Scheme)?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(IdError::EmptySegment),
                    "." | ".." => return Err(IdError::DotSegment),
                    _ => {
                        if let Some(c) = segment.chars().find(|c| !is_path_char(*c)) {
                            return Err(IdError::PathChar(c));
                        }
                    }
                }
            }
        }
        Ok(Self {
            id: Arc::from(s),
            trust_domain_len: trust_domain.len(),
        })
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, without scheme.
    pub fn trust_domain(&self) -> &str {
        let end = SCHEME.len().saturating_add(self.trust_domain_len);
        self.id.get(SCHEME.len()..end).unwrap_or_default()
    }

    /// The path (empty, or starting with `/`).
    pub fn path(&self) -> &str {
        let start = SCHEME.len().saturating_add(self.trust_domain_len);
        self.id.get(start..).unwrap_or_default()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Validates a bare trust domain name.
pub fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    match td.chars().find(|c| !is_trust_domain_char(*c)) {
        Some(c) => Err(IdError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for (id, td, path) in [
            (
                "spiffe://aws.company.com/ns/payments/sa/api",
                "aws.company.com",
                "/ns/payments/sa/api",
            ),
            ("spiffe://example.org", "example.org", ""),
            (
                "spiffe://a_b-c.9/Upper.Case-ok_1",
                "a_b-c.9",
                "/Upper.Case-ok_1",
            ),
            (
                "spiffe://example.org/region/aws-us-east-1/agent",
                "example.org",
                "/region/aws-us-east-1/agent",
            ),
            ("spiffe://example.org/..a/b..", "example.org", "/..a/b.."),
        ] {
            let parsed = SpiffeId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(parsed.trust_domain(), td);
            assert_eq!(parsed.path(), path);
            assert_eq!(parsed.as_str(), id);
        }
    }

    #[test]
    fn invalid_ids() {
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_LEN));
        for (id, err) in [
            ("", IdError::Scheme),
            ("https://example.org/x", IdError::Scheme),
            ("SPIFFE://example.org/x", IdError::Scheme),
            ("spiffe://", IdError::EmptyTrustDomain),
            ("spiffe:///path", IdError::EmptyTrustDomain),
            ("spiffe://Example.org/x", IdError::TrustDomainChar('E')),
            ("spiffe://example.org:8443/x", IdError::TrustDomainChar(':')),
            ("spiffe://user@example.org/x", IdError::TrustDomainChar('@')),
            ("spiffe://exa%6dple.org/x", IdError::TrustDomainChar('%')),
            ("spiffe://example.org/", IdError::EmptySegment),
            ("spiffe://example.org//x", IdError::EmptySegment),
            ("spiffe://example.org/x/", IdError::EmptySegment),
            ("spiffe://example.org/./x", IdError::DotSegment),
            ("spiffe://example.org/x/..", IdError::DotSegment),
            ("spiffe://example.org/x%20y", IdError::PathChar('%')),
            ("spiffe://example.org/x?q=1", IdError::PathChar('?')),
            ("spiffe://example.org/x#frag", IdError::PathChar('#')),
            ("spiffe://example.org/ü", IdError::PathChar('ü')),
            (long.as_str(), IdError::TooLong),
        ] {
            assert_eq!(SpiffeId::parse(id), Err(err), "{id}");
        }
    }
}
