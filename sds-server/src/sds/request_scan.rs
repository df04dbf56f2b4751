//! Bounds on an SDS request *before* it is decoded.
//!
//! Decoding allocates once per element (a name, a map entry, a metadata
//! field): 64 KiB of one-byte names would become twenty thousand `String`s
//! before any limit on names could be checked. So the wire bytes are walked
//! first — keys and lengths only, no allocation — and a request is refused
//! when any top-level field repeats more than [`MAX_NAMES`] times (names,
//! `initial_resource_versions`, locators) or when it holds more than
//! [`MAX_ELEMENTS`] elements in all (nested messages such as the node's
//! metadata included). Nested length-delimited fields are counted as messages
//! when they parse as one (an over-estimate for text, never an under-estimate
//! of what decoding allocates).

use super::MAX_NAMES;

/// Most protobuf elements one request may hold, nested ones included. Envoy's
/// and Istio's requests hold a few hundred (the node's metadata).
pub const MAX_ELEMENTS: usize = 4096;
/// Deepest nesting walked; deeper fields count as one element each.
const MAX_DEPTH: usize = 16;

/// Why a request was refused before decoding.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// A top-level field repeats more than [`MAX_NAMES`] times.
    #[error("field {field} repeats {count} times in one request; at most {MAX_NAMES}")]
    TooManyEntries {
        /// The protobuf field number.
        field: u32,
        /// How often it appeared (counting stops just past the bound).
        count: usize,
    },
    /// More than [`MAX_ELEMENTS`] elements in all.
    #[error("more than {MAX_ELEMENTS} protobuf elements in one request")]
    TooManyElements,
    /// Not a protobuf message.
    #[error("the request is not a valid protobuf message")]
    Malformed,
}

impl ScanError {
    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooManyEntries { .. } => "too_many_names",
            Self::TooManyElements => "too_many_elements",
            Self::Malformed => "malformed_request",
        }
    }
}

/// Checks one encoded request against the bounds.
pub fn scan(bytes: &[u8]) -> Result<(), ScanError> {
    let mut per_field: Vec<(u32, usize)> = Vec::new();
    let mut elements = 0usize;
    let mut rest = bytes;
    while !rest.is_empty() {
        let (field, body, after) = next_field(rest).ok_or(ScanError::Malformed)?;
        rest = after;
        let distinct = per_field.len();
        match per_field.iter_mut().find(|(f, _)| *f == field) {
            Some((_, count)) => {
                *count = count.saturating_add(1);
                if *count > MAX_NAMES {
                    return Err(ScanError::TooManyEntries {
                        field,
                        count: *count,
                    });
                }
            }
            // A message has few distinct top-level fields; more is malformed.
            None if distinct >= 64 => return Err(ScanError::Malformed),
            None => per_field.push((field, 1)),
        }
        let inside = body.map_or(0, |b| {
            nested_elements(b, 1, MAX_ELEMENTS.saturating_sub(elements))
        });
        elements = elements.saturating_add(1).saturating_add(inside);
        if elements > MAX_ELEMENTS {
            return Err(ScanError::TooManyElements);
        }
    }
    Ok(())
}

/// Elements inside `bytes` if it parses as a message (0 if it does not, or
/// the walk passes `budget` — the caller then sees the total past its bound).
fn nested_elements(bytes: &[u8], depth: usize, budget: usize) -> usize {
    if depth > MAX_DEPTH {
        return 0;
    }
    let mut count = 0usize;
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some((_, body, after)) = next_field(rest) else {
            return 0;
        };
        rest = after;
        count = count.saturating_add(1);
        if let Some(body) = body {
            let inside =
                nested_elements(body, depth.saturating_add(1), budget.saturating_sub(count));
            count = count.saturating_add(inside);
        }
        if count > budget {
            return count;
        }
    }
    count
}

/// One field on the wire: its number, its body when length-delimited, and what follows it.
type Field<'a> = (u32, Option<&'a [u8]>, &'a [u8]);

/// The next field of `bytes`.
fn next_field(bytes: &[u8]) -> Option<Field<'_>> {
    let (key, rest) = varint(bytes)?;
    let field = u32::try_from(key >> 3).ok().filter(|f| *f > 0)?;
    match key & 7 {
        0 => varint(rest).map(|(_, after)| (field, None, after)),
        1 => rest.get(8..).map(|after| (field, None, after)),
        2 => {
            let (len, rest) = varint(rest)?;
            let len = usize::try_from(len).ok()?;
            let body = rest.get(..len)?;
            Some((field, Some(body), rest.get(len..)?))
        }
        5 => rest.get(4..).map(|after| (field, None, after)),
        _ => None,
    }
}

fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for ((i, byte), shift) in bytes.iter().enumerate().take(10).zip((0u32..).step_by(7)) {
        value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            return Some((value, bytes.get(i.saturating_add(1)..)?));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    use prost::Message;

    fn istio_like_node() -> Node {
        let fields = (0..120)
            .map(|i| {
                (
                    format!("ISTIO_META_FIELD_{i}"),
                    Value {
                        kind: Some(Kind::StringValue(format!("value number {i}"))),
                    },
                )
            })
            .collect();
        Node {
            id: "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local".into(),
            cluster: "pod.ns".into(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }

    #[test]
    fn requests_as_envoy_sends_them_pass() {
        let sotw = DiscoveryRequest {
            node: Some(istio_like_node()),
            resource_names: vec!["default".into()],
            type_url: crate::render::SECRET_TYPE_URL.into(),
            ..Default::default()
        };
        assert_eq!(scan(&sotw.encode_to_vec()), Ok(()));
        let delta = DeltaDiscoveryRequest {
            node: Some(istio_like_node()),
            resource_names_subscribe: vec!["ROOTCA".into()],
            initial_resource_versions: [("ROOTCA".to_string(), "abc".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(scan(&delta.encode_to_vec()), Ok(()));
    }

    #[test]
    fn many_names_or_versions_are_refused_before_decoding() {
        let names = DiscoveryRequest {
            resource_names: (0..=MAX_NAMES).map(|_| "a".to_string()).collect(),
            ..Default::default()
        };
        assert!(matches!(
            scan(&names.encode_to_vec()),
            Err(ScanError::TooManyEntries { field: 3, .. })
        ));
        let versions = DeltaDiscoveryRequest {
            initial_resource_versions: (0..=MAX_NAMES)
                .map(|i| (i.to_string(), String::new()))
                .collect(),
            ..Default::default()
        };
        assert!(matches!(
            scan(&versions.encode_to_vec()),
            Err(ScanError::TooManyEntries { field: 5, .. })
        ));
    }

    #[test]
    fn a_node_with_thousands_of_metadata_fields_is_refused() {
        let fields = (0..5000)
            .map(|i| (i.to_string(), Value { kind: None }))
            .collect();
        let request = DiscoveryRequest {
            node: Some(Node {
                metadata: Some(Struct { fields }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            scan(&request.encode_to_vec()),
            Err(ScanError::TooManyElements)
        );
    }

    #[test]
    fn truncated_bytes_are_malformed_and_nothing_panics() {
        let request = DiscoveryRequest {
            node: Some(istio_like_node()),
            resource_names: vec!["default".into()],
            ..Default::default()
        }
        .encode_to_vec();
        for cut in 0..request.len() {
            let _ = scan(&request[..cut]);
        }
        assert_eq!(scan(&[0x0a, 0x05, 0x01]), Err(ScanError::Malformed));
        assert_eq!(scan(&[0xff; 11]), Err(ScanError::Malformed));
    }
}
