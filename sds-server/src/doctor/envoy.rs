//! An Envoy as the doctor reads it, from its admin `/config_dump`: the SVID
//! it presents (`default`), the roots it trusts per trust domain (`ROOTCA`,
//! the SPIFFE validator's `trust_domains`), its node (region, `CLOUD`), and
//! every trustweave-filter configuration in its listeners. The private key
//! is never read (Envoy redacts it; the doctor does not look).

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;

use super::bundle::Roots;

/// Largest `/config_dump` read.
pub const MAX_CONFIG_DUMP: usize = 64 << 20;
/// The admin path read.
pub const CONFIG_DUMP_PATH: &str = "/config_dump";

static NULL: Value = Value::Null;

/// The value at JSON pointer `pointer` under `value`, or null.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value.pointer(pointer).unwrap_or(&NULL)
}

/// What one Envoy holds.
#[derive(Clone, Debug, Default)]
pub struct EnvoyView {
    /// The SPIFFE ID of the certificate it presents, if any.
    pub spiffe_id: Option<String>,
    /// The chain it presents, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// The roots it trusts, per trust domain (`*` for an unscoped `trusted_ca`).
    pub trusts: BTreeMap<String, Roots>,
    /// `node.locality.region`.
    pub region: Option<String>,
    /// `node.locality.zone`.
    pub zone: Option<String>,
    /// Node metadata `CLOUD`.
    pub cloud: Option<String>,
    /// trustweave-filter configurations (JSON text), in listener order.
    pub filter_configs: Vec<String>,
}

/// Reads a `/config_dump` answer.
pub fn parse(dump: &[u8]) -> Result<EnvoyView, String> {
    let dump: Value =
        serde_json::from_slice(dump).map_err(|e| format!("config_dump: not JSON: {e}"))?;
    let configs = at(&dump, "/configs")
        .as_array()
        .ok_or("config_dump: no configs")?;
    let mut view = EnvoyView::default();
    for config in configs {
        let kind = at(config, "/@type").as_str().unwrap_or_default();
        if kind.ends_with("BootstrapConfigDump") {
            let node = at(config, "/bootstrap/node");
            let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
            view.region = text(at(node, "/locality/region"));
            view.zone = text(at(node, "/locality/zone"));
            view.cloud = text(at(node, "/metadata/CLOUD"));
        } else if kind.ends_with("SecretsConfigDump") {
            let secrets = at(config, "/dynamic_active_secrets")
                .as_array()
                .into_iter()
                .flatten()
                .chain(
                    at(config, "/static_secrets")
                        .as_array()
                        .into_iter()
                        .flatten(),
                );
            for entry in secrets {
                read_secret(at(entry, "/secret"), &mut view)?;
            }
        } else if kind.ends_with("ListenersConfigDump") {
            collect_filter_configs(config, &mut view.filter_configs);
        }
    }
    Ok(view)
}

fn read_secret(secret: &Value, view: &mut EnvoyView) -> Result<(), String> {
    let name = at(secret, "/name").as_str().unwrap_or_default();
    if let Some(chain) = secret.get("tls_certificate") {
        if name == "default" || view.chain.is_empty() {
            view.chain = pem_ders(&chain["certificate_chain"])
                .map_err(|e| format!("secret {name}: certificate_chain: {e}"))?;
            view.spiffe_id = view.chain.first().and_then(|leaf| {
                let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
                super::endpoint::uri_sans(&cert)
                    .into_iter()
                    .find(|u| u.starts_with("spiffe://"))
            });
        }
    }
    if let Some(context) = secret.get("validation_context") {
        let spiffe = at(
            context,
            "/custom_validator_config/typed_config/trust_domains",
        );
        match spiffe.as_array() {
            Some(domains) => {
                for domain in domains {
                    let td = at(domain, "/name").as_str().unwrap_or_default().to_string();
                    let ders = pem_ders(at(domain, "/trust_bundle"))
                        .map_err(|e| format!("secret {name}: trust_domains {td}: {e}"))?;
                    view.trusts.insert(td, Roots::from_ders(ders, None));
                }
            }
            None => {
                let ders = pem_ders(at(context, "/trusted_ca"))
                    .map_err(|e| format!("secret {name}: trusted_ca: {e}"))?;
                if !ders.is_empty() {
                    view.trusts.insert("*".into(), Roots::from_ders(ders, None));
                }
            }
        }
    }
    Ok(())
}

/// The certificates of a data source (`inline_bytes` is base64 in JSON).
fn pem_ders(source: &Value) -> Result<Vec<Vec<u8>>, String> {
    let pem = if let Some(b64) = at(source, "/inline_bytes").as_str() {
        STANDARD
            .decode(b64)
            .map_err(|_| "inline_bytes is not base64".to_string())?
    } else if let Some(text) = at(source, "/inline_string").as_str() {
        text.as_bytes().to_vec()
    } else {
        return Ok(Vec::new());
    };
    let blocks = pem::parse_many(pem).map_err(|e| format!("not PEM: {e}"))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect())
}

/// Every `configuration.value` of a wasm config whose `root_id` is `trustweave`.
fn collect_filter_configs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.get("root_id").and_then(Value::as_str) == Some("trustweave") {
                if let Some(text) = map
                    .get("configuration")
                    .and_then(|c| c.get("value"))
                    .and_then(Value::as_str)
                {
                    out.push(text.to_string());
                }
            }
            for child in map.values() {
                collect_filter_configs(child, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_filter_configs(item, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_config_dump_yields_trust_node_and_filter_configs() {
        let cert = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let pem = cert.cert.pem();
        let dump = serde_json::json!({ "configs": [
            { "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
              "bootstrap": { "node": { "locality": { "region": "us-east-1" }, "metadata": { "CLOUD": "aws" } } } },
            { "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
              "static_listeners": [{ "listener": { "filter_chains": [{ "filters": [{ "typed_config": { "config": {
                  "root_id": "trustweave", "configuration": { "value": "{\"policies\":[]}" } } } }] }] } }] },
            { "@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
              "dynamic_active_secrets": [{ "name": "ROOTCA", "secret": { "name": "ROOTCA", "validation_context": {
                  "custom_validator_config": { "typed_config": { "trust_domains": [
                      { "name": "aws.company.com", "trust_bundle": { "inline_bytes": STANDARD.encode(&pem) } } ] } } } } }] }
        ]});
        let view = parse(dump.to_string().as_bytes()).unwrap();
        assert_eq!(view.region.as_deref(), Some("us-east-1"));
        assert_eq!(view.cloud.as_deref(), Some("aws"));
        assert_eq!(view.filter_configs, ["{\"policies\":[]}"]);
        assert_eq!(view.trusts["aws.company.com"].sha256.len(), 1);
        let bad = serde_json::json!({ "configs": [{ "@type": "x.SecretsConfigDump", "dynamic_active_secrets": [
            { "secret": { "name": "ROOTCA", "validation_context": { "trusted_ca": { "inline_bytes": "%%" } } } } ] }] });
        assert_eq!(
            parse(bad.to_string().as_bytes()).unwrap_err(),
            "secret ROOTCA: trusted_ca: inline_bytes is not base64"
        );
    }
}
