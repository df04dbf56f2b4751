//! Cloud and region annotation for tracing.
//!
//! This hop's place comes from Envoy's node (`locality.region`, `locality.zone`,
//! node metadata `CLOUD`), overridable in config. The caller's place comes from
//! a trust-domain map and/or a SPIFFE path template (the template wins, being
//! more specific). Request headers name the caller and both places; W3C
//! `baggage` gains OpenTelemetry's `cloud.provider` / `cloud.region` members
//! for this hop, never replacing members already there, within W3C's limits.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::policy::{Caller, Local};
use super::spiffe_id::SpiffeId;

/// W3C baggage: at most this many list-members.
pub const BAGGAGE_MAX_MEMBERS: usize = 64;
/// W3C baggage: at most this many bytes in total.
pub const BAGGAGE_MAX_BYTES: usize = 8192;

/// Names of the annotation headers (all configurable).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    /// Caller SPIFFE ID.
    pub principal: String,
    /// Caller trust domain.
    pub trust_domain: String,
    /// Caller cloud.
    pub caller_cloud: String,
    /// Caller region.
    pub caller_region: String,
    /// This hop's cloud.
    pub local_cloud: String,
    /// This hop's region.
    pub local_region: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        Self {
            principal: "x-trustweave-caller".into(),
            trust_domain: "x-trustweave-caller-trust-domain".into(),
            caller_cloud: "x-trustweave-caller-cloud".into(),
            caller_region: "x-trustweave-caller-region".into(),
            local_cloud: "x-trustweave-cloud".into(),
            local_region: "x-trustweave-region".into(),
        }
    }
}

impl HeaderNames {
    /// `(field, header name)` for every header.
    pub fn all(&self) -> [(&'static str, &str); 6] {
        [
            ("principal", &self.principal),
            ("trust_domain", &self.trust_domain),
            ("caller_cloud", &self.caller_cloud),
            ("caller_region", &self.caller_region),
            ("local_cloud", &self.local_cloud),
            ("local_region", &self.local_region),
        ]
    }
}

/// Cloud and region of a trust domain's workloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Place {
    /// Cloud provider, e.g. `aws`.
    pub cloud: Option<String>,
    /// Region, e.g. `us-east-1`.
    pub region: Option<String>,
}

/// This hop's place as configured (each field overrides Envoy's node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalPlace {
    /// Cloud.
    pub cloud: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Trust domain.
    pub trust_domain: Option<String>,
}

/// What Envoy says about this hop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `node.locality.region`.
    pub region: Option<String>,
    /// `node.locality.zone`.
    pub zone: Option<String>,
    /// Node metadata `CLOUD`.
    pub cloud: Option<String>,
    /// This Envoy's certificate URI SAN, if TLS was terminated.
    pub local_uri_san: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Region,
    Cloud,
}

/// A SPIFFE path template such as `/region/{region}` or `/{cloud}/{region}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTemplate(Vec<Segment>);

impl RegionTemplate {
    /// Parses a template; at least one `{region}` or `{cloud}` segment is required.
    pub fn parse(template: &str) -> Result<Self, String> {
        let rest = template
            .strip_prefix('/')
            .ok_or_else(|| format!("{template:?} must start with '/'"))?;
        let segments: Vec<Segment> = rest
            .split('/')
            .map(|s| match s {
                "{region}" => Segment::Region,
                "{cloud}" => Segment::Cloud,
                other => Segment::Literal(other.to_string()),
            })
            .collect();
        if segments
            .iter()
            .any(|s| matches!(s, Segment::Literal(l) if l.is_empty() || l.contains(['{', '}'])))
        {
            return Err(format!(
                "{template:?}: segments must be non-empty literals, {{region}} or {{cloud}}"
            ));
        }
        if !segments.iter().any(|s| !matches!(s, Segment::Literal(_))) {
            return Err(format!(
                "{template:?} has no {{region}} or {{cloud}} segment"
            ));
        }
        Ok(Self(segments))
    }

    /// Captures from the leading segments of a SPIFFE ID path; extra segments are ignored.
    pub fn capture(&self, path: &str) -> Option<Place> {
        let mut parts = path.strip_prefix('/')?.split('/');
        let mut place = Place::default();
        for segment in &self.0 {
            let part = parts.next()?;
            match segment {
                Segment::Literal(l) if l != part => return None,
                Segment::Literal(_) => {}
                Segment::Region => place.region = Some(part.to_string()),
                Segment::Cloud => place.cloud = Some(part.to_string()),
            }
        }
        Some(place)
    }
}

/// Annotation settings, compiled.
#[derive(Clone, Debug)]
pub struct Annotator {
    /// Header names.
    pub headers: HeaderNames,
    /// Whether to append baggage members.
    pub baggage: bool,
    /// Configured overrides of this hop's place.
    pub local: LocalPlace,
    /// Trust domain → place.
    pub trust_domains: BTreeMap<String, Place>,
    /// SPIFFE path template.
    pub template: Option<RegionTemplate>,
}

impl Annotator {
    /// The caller with its cloud and region resolved.
    pub fn caller(&self, id: SpiffeId) -> Caller {
        let mapped = self
            .trust_domains
            .get(id.trust_domain())
            .cloned()
            .unwrap_or_default();
        let captured = self
            .template
            .as_ref()
            .and_then(|t| t.capture(id.path()))
            .unwrap_or_default();
        Caller {
            cloud: captured.cloud.or(mapped.cloud),
            region: captured.region.or(mapped.region),
            id,
        }
    }

    /// This hop, from configuration first and Envoy's node second.
    pub fn local(&self, node: &NodeFacts) -> Local {
        let principal = node
            .local_uri_san
            .as_deref()
            .and_then(|s| SpiffeId::parse(s).ok());
        Local {
            trust_domain: self
                .local
                .trust_domain
                .clone()
                .or_else(|| principal.as_ref().map(|p| p.trust_domain().to_string())),
            principal: principal.map(|p| p.as_str().to_string()),
            cloud: self.local.cloud.clone().or_else(|| node.cloud.clone()),
            region: self.local.region.clone().or_else(|| node.region.clone()),
        }
    }

    /// Header names a downstream must not set (removed unless the peer is a trusted gateway).
    pub fn spoofable_headers(&self) -> Vec<&str> {
        self.headers.all().iter().map(|(_, name)| *name).collect()
    }

    /// Headers to set on the request: `(name, Some(value))` to set, `(name, None)` to remove.
    pub fn request_headers(
        &self,
        caller: Option<&Caller>,
        local: &Local,
    ) -> Vec<(String, Option<String>)> {
        let h = &self.headers;
        vec![
            (
                h.principal.clone(),
                caller.map(|c| c.id.as_str().to_string()),
            ),
            (
                h.trust_domain.clone(),
                caller.map(|c| c.id.trust_domain().to_string()),
            ),
            (h.caller_cloud.clone(), caller.and_then(|c| c.cloud.clone())),
            (
                h.caller_region.clone(),
                caller.and_then(|c| c.region.clone()),
            ),
            (h.local_cloud.clone(), local.cloud.clone()),
            (h.local_region.clone(), local.region.clone()),
        ]
    }

    /// The new `baggage` value, or `None` to leave the header as it is.
    pub fn baggage(&self, existing: Option<&str>, local: &Local) -> Option<String> {
        if !self.baggage {
            return None;
        }
        let existing = existing.map(str::trim).filter(|s| !s.is_empty());
        let present: Vec<&str> = existing
            .map(|s| {
                s.split(',')
                    .filter_map(|m| m.split(['=', ';']).next())
                    .map(str::trim)
                    .collect()
            })
            .unwrap_or_default();
        let mut added: Vec<String> = [
            ("cloud.provider", &local.cloud),
            ("cloud.region", &local.region),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| (key, v)))
        .filter(|(key, _)| !present.contains(key))
        .map(|(key, value)| format!("{key}={}", percent_encode(value)))
        .collect();
        if added.is_empty() {
            return None;
        }
        let mut members: Vec<String> = existing.map(|s| vec![s.to_string()]).unwrap_or_default();
        members.append(&mut added);
        let value = members.join(",");
        let count = value.split(',').count();
        (count <= BAGGAGE_MAX_MEMBERS && value.len() <= BAGGAGE_MAX_BYTES).then_some(value)
    }
}

/// Percent-encodes what W3C baggage values may not carry raw.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'!' | b'#'..=b'+' | b'-'..=b':' | b'<'..=b'[' | b']'..=b'~' if b != b'%' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotator(template: Option<&str>) -> Annotator {
        Annotator {
            headers: HeaderNames::default(),
            baggage: true,
            local: LocalPlace::default(),
            trust_domains: [(
                "aws.company.com".to_string(),
                Place {
                    cloud: Some("aws".into()),
                    region: Some("us-east-1".into()),
                },
            )]
            .into_iter()
            .collect(),
            template: template.map(|t| RegionTemplate::parse(t).expect("template")),
        }
    }

    #[test]
    fn caller_place_from_map_and_template() {
        let a = annotator(Some("/region/{region}"));
        let c = a.caller(SpiffeId::parse("spiffe://aws.company.com/ns/a/sa/b").expect("id"));
        assert_eq!(
            (c.cloud.as_deref(), c.region.as_deref()),
            (Some("aws"), Some("us-east-1"))
        );
        let c = a.caller(
            SpiffeId::parse("spiffe://example.org/region/aws-us-east-1/agent").expect("id"),
        );
        assert_eq!(
            (c.cloud, c.region.as_deref()),
            (None, Some("aws-us-east-1"))
        );
        let both = annotator(Some("/{cloud}/{region}"))
            .caller(SpiffeId::parse("spiffe://x.org/gcp/us-central1/w").expect("id"));
        assert_eq!(
            (both.cloud.as_deref(), both.region.as_deref()),
            (Some("gcp"), Some("us-central1"))
        );
        assert!(RegionTemplate::parse("region/{region}").is_err());
        assert!(RegionTemplate::parse("/region").is_err());
        assert!(RegionTemplate::parse("/a//{region}").is_err());
    }

    #[test]
    fn baggage_appends_without_clobbering_and_within_limits() {
        let a = annotator(None);
        let local = Local {
            cloud: Some("gcp".into()),
            region: Some("us-central1".into()),
            ..Default::default()
        };
        assert_eq!(
            a.baggage(None, &local).as_deref(),
            Some("cloud.provider=gcp,cloud.region=us-central1")
        );
        assert_eq!(
            a.baggage(Some("userId=alice, cloud.provider=aws;prop=1"), &local)
                .as_deref(),
            Some("userId=alice, cloud.provider=aws;prop=1,cloud.region=us-central1")
        );
        assert_eq!(
            a.baggage(Some("cloud.provider=aws,cloud.region=x"), &local),
            None
        );
        let full: Vec<String> = (0..63).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            a.baggage(Some(&full.join(",")), &local),
            None,
            "would exceed 64 members"
        );
        let big = format!("k={}", "v".repeat(8180));
        assert_eq!(
            a.baggage(Some(&big), &local),
            None,
            "would exceed 8192 bytes"
        );
        let spaced = Local {
            region: Some("eu west,1".into()),
            ..Default::default()
        };
        assert_eq!(
            a.baggage(None, &spaced).as_deref(),
            Some("cloud.region=eu%20west%2C1")
        );
    }
}
