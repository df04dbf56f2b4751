//! Cloud and region annotation for tracing.
//!
//! This hop's place comes from Envoy's node (`locality.region`, `locality.zone`,
//! node metadata `CLOUD`), overridable in config. The caller's place comes from
//! a trust-domain map and/or a SPIFFE path template; a place read from a path
//! counts only where that trust domain's own entry lists it (`path_regions`,
//! `path_clouds`), so a federated domain cannot claim another's region.
//! Request headers name the caller and both places. The filter owns W3C
//! `baggage`'s OpenTelemetry `cloud.provider` / `cloud.region` members: a
//! client's are replaced by this hop's, other members are kept within W3C's
//! limits. Each hop also appends its place to the `trustweave.hops` member
//! (`gcp:us-central1>azure:eastus`, at most [`HOPS_MAX`] hops), so a request
//! carries the clouds it crossed — an annotation for traces, never an identity.

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
    /// Regions this trust domain's workloads may claim in their SPIFFE path
    /// (`region_from_path`); a claim outside the list is ignored.
    #[serde(default)]
    pub path_regions: Vec<String>,
    /// Clouds this trust domain's workloads may claim in their SPIFFE path.
    #[serde(default)]
    pub path_clouds: Vec<String>,
}

/// How the `baggage` header changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaggageChange {
    /// Leave it as it is.
    Keep,
    /// Replace every value with this one.
    Set(String),
    /// Remove it (it held only members the filter owns, and this hop has none).
    Remove,
}

/// The baggage member to which each hop appends `cloud:region`.
pub const HOPS_BAGGAGE_KEY: &str = "trustweave.hops";
/// At most this many hops are kept in [`HOPS_BAGGAGE_KEY`] (the oldest are dropped).
pub const HOPS_MAX: usize = 16;
/// A hop entry longer than this (from a client) is dropped.
const HOP_MAX_BYTES: usize = 64;

/// The baggage keys the filter owns.
pub const OWNED_BAGGAGE_KEYS: [&str; 3] = ["cloud.provider", "cloud.region", HOPS_BAGGAGE_KEY];

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
        let entry = self.trust_domains.get(id.trust_domain());
        let captured = self
            .template
            .as_ref()
            .and_then(|t| t.capture(id.path()))
            .unwrap_or_default();
        // A place claimed in the path counts only where the domain's own entry allows it.
        let allowed = |claim: Option<String>, list: fn(&Place) -> &Vec<String>| {
            claim.filter(|c| entry.is_some_and(|e| list(e).contains(c)))
        };
        let region = allowed(captured.region, |e| &e.path_regions);
        let cloud = allowed(captured.cloud, |e| &e.path_clouds);
        Caller {
            cloud: cloud.or_else(|| entry.and_then(|e| e.cloud.clone())),
            region: region.or_else(|| entry.and_then(|e| e.region.clone())),
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

    /// The new `baggage`: the client's members as they came, without the ones
    /// the filter owns (in every configuration), then this hop's members while
    /// W3C's limits allow (64 members, 8192 bytes): the filter never drops a
    /// member it does not own; its own give way (as the W3C text allows).
    pub fn baggage(&self, existing: Option<&str>, local: &Local) -> BaggageChange {
        let members = || {
            existing
                .into_iter()
                .flat_map(|s| s.split(','))
                .map(str::trim)
                .filter(|m| !m.is_empty())
        };
        let is_owned = |m: &str| OWNED_BAGGAGE_KEYS.contains(&baggage_key(m));
        let mut owned: Vec<String> = Vec::new();
        if self.baggage {
            for (key, value) in OWNED_BAGGAGE_KEYS
                .into_iter()
                .zip([&local.cloud, &local.region])
            {
                if let Some(value) = value {
                    let mut member = String::new();
                    push_member(&mut member, key, |out| percent_encode_into(value, b"", out));
                    owned.push(member);
                }
            }
            let previous_hops = members()
                .find(|m| baggage_key(m) == HOPS_BAGGAGE_KEY)
                .and_then(|m| m.split_once('='))
                .map(|(_, value)| value.split(';').next().unwrap_or("").trim());
            if let Some(hops) = hops(previous_hops, local) {
                let mut member = String::new();
                push_member(&mut member, HOPS_BAGGAGE_KEY, |out| out.push_str(&hops));
                owned.push(member);
            }
        }
        if owned.is_empty() && !members().any(is_owned) {
            return BaggageChange::Keep;
        }
        let others: Vec<&str> = members().filter(|m| !is_owned(m)).collect();
        let mut value = others.join(",");
        let mut room_members = BAGGAGE_MAX_MEMBERS.saturating_sub(others.len());
        for member in owned {
            let added = member.len().saturating_add(usize::from(!value.is_empty()));
            if room_members == 0 || value.len().saturating_add(added) > BAGGAGE_MAX_BYTES {
                break;
            }
            if !value.is_empty() {
                value.push(',');
            }
            value.push_str(&member);
            room_members = room_members.saturating_sub(1);
        }
        if value.is_empty() {
            BaggageChange::Remove
        } else {
            BaggageChange::Set(value)
        }
    }
}

/// Appends `key=value` (the value written by `value`) to a list of members.
fn push_member(list: &mut String, key: &str, value: impl FnOnce(&mut String)) {
    if !list.is_empty() {
        list.push(',');
    }
    list.push_str(key);
    list.push('=');
    value(list);
}

/// The hops so far (a client's value, kept only where it is well formed) and
/// this hop's `cloud:region`, the last [`HOPS_MAX`].
fn hops(previous: Option<&str>, local: &Local) -> Option<String> {
    let mut entries: Vec<String> = previous
        .into_iter()
        .flat_map(|value| value.split('>'))
        .filter(|e| !e.is_empty() && e.len() <= HOP_MAX_BYTES && e.bytes().all(is_plain_octet))
        .map(str::to_string)
        .collect();
    if local.cloud.is_some() || local.region.is_some() {
        let mut entry = String::new();
        percent_encode_into(local.cloud.as_deref().unwrap_or("-"), b":>", &mut entry);
        entry.push(':');
        percent_encode_into(local.region.as_deref().unwrap_or("-"), b":>", &mut entry);
        entries.push(entry);
    }
    let skip = entries.len().saturating_sub(HOPS_MAX);
    entries
        .get(skip..)
        .filter(|kept| !kept.is_empty())
        .map(|kept| kept.join(">"))
}

/// A W3C `baggage-octet` other than `%` (which would start an escape).
fn is_plain_octet(b: u8) -> bool {
    matches!(b, b'!' | b'#'..=b'+' | b'-'..=b':' | b'<'..=b'[' | b']'..=b'~') && b != b'%'
}

/// The key of a W3C baggage list-member.
fn baggage_key(member: &str) -> &str {
    member.split(['=', ';']).next().unwrap_or("").trim()
}

/// The upper-case hex digit of a nibble (`0..=15`).
fn hex_digit(nibble: u8) -> char {
    char::from_digit(u32::from(nibble & 15), 16)
        .unwrap_or('0')
        .to_ascii_uppercase()
}

/// Percent-encodes into `out` what W3C baggage values may not carry raw, and `also`.
fn percent_encode_into(value: &str, also: &[u8], out: &mut String) {
    for b in value.bytes() {
        match b {
            b if is_plain_octet(b) && !also.contains(&b) => out.push(b as char),
            _ => {
                out.push('%');
                out.push(hex_digit(b >> 4));
                out.push(hex_digit(b & 15));
            }
        }
    }
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
                    ..Place::default()
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
        let mut both = annotator(Some("/{cloud}/{region}"));
        both.trust_domains.insert(
            "x.org".into(),
            Place {
                path_regions: vec!["us-central1".into()],
                path_clouds: vec!["gcp".into()],
                ..Place::default()
            },
        );
        let both = both.caller(SpiffeId::parse("spiffe://x.org/gcp/us-central1/w").expect("id"));
        assert_eq!(
            (both.cloud.as_deref(), both.region.as_deref()),
            (Some("gcp"), Some("us-central1"))
        );
        assert!(RegionTemplate::parse("region/{region}").is_err());
        assert!(RegionTemplate::parse("/region").is_err());
        assert!(RegionTemplate::parse("/a//{region}").is_err());
    }

    #[test]
    fn baggage_owned_members_are_replaced_others_kept_within_limits() {
        let a = annotator(None);
        let local = Local {
            cloud: Some("gcp".into()),
            region: Some("us-central1".into()),
            ..Default::default()
        };
        let set = |v: &str| BaggageChange::Set(v.to_string());
        assert_eq!(
            a.baggage(None, &local),
            set("cloud.provider=gcp,cloud.region=us-central1,trustweave.hops=gcp:us-central1")
        );
        assert_eq!(
            a.baggage(Some("userId=alice, cloud.provider=aws;prop=1"), &local),
            set("userId=alice,cloud.provider=gcp,cloud.region=us-central1,trustweave.hops=gcp:us-central1"),
            "the client's cloud.provider is replaced"
        );
        assert_eq!(
            a.baggage(Some("cloud.provider=aws,cloud.region=x"), &Local::default()),
            BaggageChange::Remove,
            "members the filter owns never pass through"
        );
        assert_eq!(
            a.baggage(Some("k=v"), &Local::default()),
            BaggageChange::Keep
        );
        // W3C limits: the client's members are never dropped; this hop's give way.
        let full: Vec<String> = (0..62).map(|i| format!("k{i}=v")).collect();
        let BaggageChange::Set(value) = a.baggage(Some(&full.join(",")), &local) else {
            panic!("set")
        };
        assert_eq!(value.split(',').count(), BAGGAGE_MAX_MEMBERS);
        assert!(value.starts_with(&full.join(",")));
        assert!(value.ends_with("cloud.provider=gcp,cloud.region=us-central1"));
        let over: Vec<String> = (0..70).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            a.baggage(Some(&over.join(",")), &local),
            set(&over.join(",")),
            "over the limit already: nothing added, nothing dropped"
        );
        let big = format!("k={}", "v".repeat(8180));
        assert_eq!(a.baggage(Some(&big), &local), set(&big));
        // Owned in every configuration: with baggage off, the client's owned members still go.
        let mut off = annotator(None);
        off.baggage = false;
        assert_eq!(
            off.baggage(
                Some("userId=alice,cloud.region=x,trustweave.hops=a:b"),
                &local
            ),
            set("userId=alice")
        );
        assert_eq!(
            off.baggage(Some("userId=alice"), &local),
            BaggageChange::Keep
        );
        let spaced = Local {
            region: Some("eu west,1".into()),
            ..Default::default()
        };
        assert_eq!(
            a.baggage(None, &spaced),
            set("cloud.region=eu%20west%2C1,trustweave.hops=-:eu%20west%2C1")
        );
    }

    #[test]
    fn each_hop_appends_its_place_and_a_clients_hops_stay_bounded() {
        let a = annotator(None);
        let local = Local {
            cloud: Some("azure".into()),
            region: Some("east:us>1".into()),
            ..Default::default()
        };
        let set = |v: &str| BaggageChange::Set(v.to_string());
        assert_eq!(
            a.baggage(Some("trustweave.hops=aws:us-east-1>gcp:us-central1;p=1,k=v"), &local),
            set("k=v,cloud.provider=azure,cloud.region=east:us>1,trustweave.hops=aws:us-east-1>gcp:us-central1>azure:east%3Aus%3E1")
        );
        // Malformed entries (a `%`, too long) are dropped, and only the last HOPS_MAX kept.
        let long = "x".repeat(HOP_MAX_BYTES + 1);
        let many: Vec<String> = (0..40).map(|i| format!("c{i}:r")).collect();
        let client = format!("trustweave.hops=%41:b>{long}>{}", many.join(">"));
        let BaggageChange::Set(value) = a.baggage(Some(&client), &Local::default()) else {
            panic!("set")
        };
        let hops = value
            .strip_prefix("trustweave.hops=")
            .expect("only the hops");
        let kept: Vec<&str> = hops.split('>').collect();
        assert_eq!(kept.len(), HOPS_MAX);
        assert_eq!(kept.last(), Some(&"c39:r"));
    }

    #[test]
    fn a_federated_domain_cannot_claim_another_region_in_its_path() {
        let mut a = annotator(Some("/region/{region}"));
        a.trust_domains.insert(
            "gcp.company.com".into(),
            Place {
                cloud: Some("gcp".into()),
                region: Some("us-central1".into()),
                path_regions: vec!["us-central1".into(), "europe-west1".into()],
                path_clouds: vec![],
            },
        );
        let caller = |id: &str| a.caller(SpiffeId::parse(id).expect("id"));
        assert_eq!(
            caller("spiffe://gcp.company.com/region/europe-west1/w")
                .region
                .as_deref(),
            Some("europe-west1")
        );
        // aws.company.com's entry lists no path regions: its claim is ignored.
        assert_eq!(
            caller("spiffe://aws.company.com/region/us-central1/w")
                .region
                .as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            caller("spiffe://azure.company.com/region/us-central1/x").region,
            None,
            "no entry, no claim"
        );
    }
}
