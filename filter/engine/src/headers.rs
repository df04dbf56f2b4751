//! A request's headers as Envoy hands them over, and how an ambiguous value is read.
//!
//! Values are bytes: HTTP allows obs-text (0x80–0xFF), and a value that is not
//! UTF-8 must never trap the VM. Names are lower-case tokens (Envoy's codecs
//! reject anything else). A header may be repeated; a value may be malformed.
//! Neither may make a policy more permissive than it is for a plain request:
//!
//! - a fact with several values has several *readings*: each value, and the
//!   values joined with `,` (what Envoy's RBAC and most frameworks see);
//! - a malformed (non-UTF-8) value is a reading that could be anything;
//! - an ALLOW rule matches only if it matches under **every** reading, a DENY
//!   (or AUDIT) rule matches if it matches under **any** reading.

/// The header Envoy uses for forwarded client certificates.
pub const XFCC: &str = "x-forwarded-client-cert";

/// How a rule reads a fact that has several readings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantifier {
    /// ALLOW: every reading must satisfy the condition.
    Every,
    /// DENY and AUDIT: one reading satisfying the condition is enough.
    Any,
}

/// One reading of a fact: its text, or `None` when it is malformed (could be anything).
pub type Reading<'a> = Option<&'a str>;

impl Quantifier {
    /// Whether `condition` holds for `readings` (which must not be empty) under this quantifier.
    pub fn holds<'a>(
        self,
        readings: &[Reading<'a>],
        mut condition: impl FnMut(&'a str) -> bool,
    ) -> bool {
        match self {
            Self::Every => readings.iter().all(|r| r.is_some_and(&mut condition)),
            Self::Any => readings.iter().any(|r| r.is_none_or(&mut condition)),
        }
    }
}

/// The request headers, names lower-case, values as bytes, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, Vec<u8>)>,
}

impl Headers {
    /// No headers.
    pub const EMPTY: Self = Self {
        entries: Vec::new(),
    };

    /// Wraps what the host returned.
    pub fn new(entries: Vec<(String, Vec<u8>)>) -> Self {
        Self { entries }
    }

    /// From text pairs (tests and the CLI); names are lower-cased.
    pub fn from_text<N: AsRef<str>, V: AsRef<str>>(pairs: &[(N, V)]) -> Self {
        Self::new(
            pairs
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_ref().to_ascii_lowercase(),
                        v.as_ref().as_bytes().to_vec(),
                    )
                })
                .collect(),
        )
    }

    /// Removes every value of each of `names`.
    pub fn remove_all(&mut self, names: &[String]) {
        if !names.is_empty() {
            self.entries.retain(|(n, _)| !names.contains(n));
        }
    }

    /// Every entry, in order.
    pub fn entries(&self) -> &[(String, Vec<u8>)] {
        &self.entries
    }

    /// Whether a header `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|(n, _)| n == name)
    }

    /// The raw values of header `name`, in order.
    pub fn raw<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The readings of header `name` (empty when absent): each value, plus the
    /// values joined with `,` when there are several. The joined reading is
    /// stored in `joined`, which must outlive the readings.
    pub fn readings<'a>(&'a self, name: &'a str, joined: &'a mut String) -> Vec<Reading<'a>> {
        let values: Vec<Reading<'a>> = self
            .raw(name)
            .map(|v| std::str::from_utf8(v).ok())
            .collect();
        if values.len() > 1 && values.iter().all(Option::is_some) {
            *joined = values
                .iter()
                .flatten()
                .copied()
                .collect::<Vec<_>>()
                .join(",");
            let mut all = values;
            all.push(Some(joined.as_str()));
            return all;
        }
        values
    }

    /// The single value of a header Envoy guarantees to be single (`:path`,
    /// `:method`, `:authority`): `Some(None)` when it is not UTF-8.
    pub fn single(&self, name: &str) -> Option<Reading<'_>> {
        self.raw_first(name).map(|v| std::str::from_utf8(v).ok())
    }

    fn raw_first(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of header `name` joined with `,`, bytes that are not UTF-8
    /// replaced (for searching ASCII structure such as XFCC's `Cert=`).
    pub fn joined_lossy(&self, name: &str) -> Option<String> {
        let values: Vec<String> = self
            .raw(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    /// Every value of header `name` that is UTF-8, joined with `,` (for
    /// list-valued headers such as `baggage`); `None` when absent or when any
    /// value is malformed.
    pub fn joined_text(&self, name: &str) -> Option<String> {
        let values: Option<Vec<&str>> = self
            .raw(name)
            .map(|v| std::str::from_utf8(v).ok())
            .collect();
        values.filter(|v| !v.is_empty()).map(|v| v.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_of_repeated_and_malformed_values() {
        let h = Headers::new(vec![
            ("x-debug".into(), b"off".to_vec()),
            ("x-debug".into(), b"on".to_vec()),
            ("x-bin".into(), vec![b'a', 0xFF]),
            ("x-one".into(), b"v".to_vec()),
        ]);
        let mut joined = String::new();
        let r = h.readings("x-debug", &mut joined);
        assert_eq!(r, vec![Some("off"), Some("on"), Some("off,on")]);
        let mut j = String::new();
        assert_eq!(h.readings("x-bin", &mut j), vec![None]);
        let mut j = String::new();
        assert_eq!(h.readings("x-one", &mut j), vec![Some("v")]);
        let mut j = String::new();
        assert!(h.readings("absent", &mut j).is_empty());
        assert_eq!(h.single("x-bin"), Some(None));
        assert_eq!(h.joined_text("x-debug").as_deref(), Some("off,on"));
        assert_eq!(h.joined_text("x-bin"), None);
    }

    #[test]
    fn quantifiers_never_let_ambiguity_help_an_allow() {
        let on = |v: &str| v == "on";
        let readings = [Some("off"), Some("on"), Some("off,on")];
        assert!(
            Quantifier::Any.holds(&readings, on),
            "DENY sees the second value"
        );
        assert!(
            !Quantifier::Every.holds(&readings, on),
            "ALLOW needs every reading"
        );
        assert!(
            Quantifier::Any.holds(&[None], on),
            "malformed could be anything"
        );
        assert!(!Quantifier::Every.holds(&[None], on));
        assert!(Quantifier::Every.holds(&[Some("on")], on));
    }
}
