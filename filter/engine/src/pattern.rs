//! String patterns, as in Istio's AuthorizationPolicy: exact, `prefix*`,
//! `*suffix`, and `*` (present and non-empty).
//!
//! A [`PatternSet`] is compiled once per configuration. Matching costs a hash
//! lookup for exact values plus one lookup per distinct prefix or suffix
//! *length* — independent of how many patterns the set holds.

use std::collections::BTreeSet;

// FxHash: the keys come from the configuration, and SipHash costs more than the
// rest of a request's matching inside the wasm VM.
use rustc_hash::FxHashSet as HashSet;

/// One parsed pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// The whole value.
    Exact(String),
    /// Values starting with this (from `prefix*`).
    Prefix(String),
    /// Values ending with this (from `*suffix`).
    Suffix(String),
    /// Any non-empty value (from `*`).
    Present,
}

/// Why a pattern is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Empty string.
    #[error("empty pattern")]
    Empty,
    /// `*` somewhere other than the start or the end, or at both.
    #[error("{0:?}: '*' is allowed only as the whole pattern, a prefix or a suffix")]
    Wildcard(String),
}

impl Pattern {
    /// Parses one pattern.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s == "*" {
            return Ok(Self::Present);
        }
        let stars = s.matches('*').count();
        match (stars, s.strip_prefix('*'), s.strip_suffix('*')) {
            (0, _, _) => Ok(Self::Exact(s.to_string())),
            (1, Some(suffix), None) => Ok(Self::Suffix(suffix.to_string())),
            (1, None, Some(prefix)) => Ok(Self::Prefix(prefix.to_string())),
            _ => Err(PatternError::Wildcard(s.to_string())),
        }
    }
}

/// A compiled set of patterns; matches when any pattern matches.
#[derive(Clone, Debug, Default)]
pub struct PatternSet {
    exact: HashSet<String>,
    prefixes: HashSet<String>,
    prefix_lengths: BTreeSet<usize>,
    suffixes: HashSet<String>,
    suffix_lengths: BTreeSet<usize>,
    present: bool,
    len: usize,
}

impl PatternSet {
    /// Compiles `patterns`; the error carries the index of the bad one.
    pub fn compile<S: AsRef<str>>(patterns: &[S]) -> Result<Self, (usize, PatternError)> {
        let mut set = Self::default();
        for (i, raw) in patterns.iter().enumerate() {
            match Pattern::parse(raw.as_ref()).map_err(|e| (i, e))? {
                Pattern::Exact(v) => {
                    set.exact.insert(v);
                }
                Pattern::Prefix(p) => {
                    set.prefix_lengths.insert(p.len());
                    set.prefixes.insert(p);
                }
                Pattern::Suffix(s) => {
                    set.suffix_lengths.insert(s.len());
                    set.suffixes.insert(s);
                }
                Pattern::Present => set.present = true,
            }
        }
        set.len = patterns.len();
        Ok(set)
    }

    /// Whether no pattern was given (an absent condition).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `value` matches any pattern.
    pub fn matches(&self, value: &str) -> bool {
        if self.present && !value.is_empty() {
            return true;
        }
        if self.exact.contains(value) {
            return true;
        }
        let bytes = value.len();
        let prefix_hit = self
            .prefix_lengths
            .iter()
            .take_while(|n| **n <= bytes)
            .any(|n| value.get(..*n).is_some_and(|p| self.prefixes.contains(p)));
        prefix_hit
            || self
                .suffix_lengths
                .iter()
                .take_while(|n| **n <= bytes)
                .any(|n| {
                    value
                        .get(bytes.saturating_sub(*n)..)
                        .is_some_and(|s| self.suffixes.contains(s))
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        assert_eq!(Pattern::parse("/a"), Ok(Pattern::Exact("/a".into())));
        assert_eq!(Pattern::parse("/a*"), Ok(Pattern::Prefix("/a".into())));
        assert_eq!(Pattern::parse("*.svc"), Ok(Pattern::Suffix(".svc".into())));
        assert_eq!(Pattern::parse("*"), Ok(Pattern::Present));
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        for bad in ["a*b", "*a*", "**", "a**"] {
            assert!(
                matches!(Pattern::parse(bad), Err(PatternError::Wildcard(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn matching_table() {
        let set = PatternSet::compile(&[
            "/exact",
            "/api/*",
            "*/health",
            "spiffe://gcp.company.com/region/gcp-us-central1/worker*",
        ])
        .expect("valid");
        for (value, expected) in [
            ("/exact", true),
            ("/exact/more", false),
            ("/api/", true),
            ("/api/v1/items", true),
            ("/ap", false),
            ("/svc/health", true),
            ("/health", true),
            ("health", false),
            (
                "spiffe://gcp.company.com/region/gcp-us-central1/worker-7",
                true,
            ),
            (
                "spiffe://gcp.company.com/region/gcp-us-east1/worker-7",
                false,
            ),
            ("", false),
            ("/é/health", true),
        ] {
            assert_eq!(set.matches(value), expected, "{value}");
        }
        let any = PatternSet::compile(&["*"]).expect("valid");
        assert!(any.matches("x"));
        assert!(!any.matches(""), "'*' means present and non-empty");
        assert!(PatternSet::compile::<&str>(&[]).expect("empty").is_empty());
        assert_eq!(
            PatternSet::compile(&["ok", "a*b"])
                .map(|_| ())
                .expect_err("second is invalid")
                .0,
            1
        );
    }
}
