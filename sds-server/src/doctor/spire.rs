//! A SPIRE server as the doctor reads it: `spire-server bundle show`, `bundle
//! list` and `federation list`, each with `-output json`, run where the
//! operator says (the binary beside the socket on a node, or `kubectl exec`
//! from a laptop).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;

use super::bundle::Roots;
use super::source;

/// Largest answer read from the CLI.
const MAX_ANSWER: usize = 8 << 20;

/// How to run `spire-server` for one trust domain.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpireServerCli {
    /// The program and arguments before the subcommand (`["spire-server"]`, or
    /// `["kubectl", "exec", "-n", "spire", "spire-server-0", "--", "/opt/spire/bin/spire-server"]`).
    pub command: Vec<String>,
    /// `-socketPath`, if not the default.
    #[serde(default)]
    pub socket_path: Option<String>,
}

/// A federated bundle as `bundle list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBundle {
    /// Its trust domain.
    pub trust_domain: String,
    /// Its roots.
    pub roots: Roots,
}

/// A federation relationship as `federation list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relationship {
    /// The federated trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint.
    pub url: String,
    /// The endpoint's SPIFFE ID (`https_spiffe`), or none (`https_web`).
    pub endpoint_spiffe_id: Option<String>,
}

#[derive(Deserialize)]
struct BundleJson {
    trust_domain: String,
    #[serde(default)]
    x509_authorities: Vec<AuthorityJson>,
    #[serde(default)]
    sequence_number: Option<String>,
}

#[derive(Deserialize)]
struct AuthorityJson {
    asn1: String,
}

#[derive(Deserialize)]
struct BundleListJson {
    #[serde(default)]
    bundles: Vec<BundleJson>,
}

#[derive(Deserialize)]
struct RelationshipListJson {
    #[serde(default)]
    federation_relationships: Vec<RelationshipJson>,
}

#[derive(Deserialize)]
struct RelationshipJson {
    trust_domain: String,
    bundle_endpoint_url: String,
    #[serde(default)]
    https_spiffe: Option<HttpsSpiffeJson>,
}

#[derive(Deserialize)]
struct HttpsSpiffeJson {
    endpoint_spiffe_id: String,
}

impl SpireServerCli {
    /// The command line for `args`, as an operator would type it.
    pub fn command_line(&self, args: &[&str]) -> String {
        self.argv(args).join(" ")
    }

    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv = self.command.clone();
        argv.extend(args.iter().map(|a| a.to_string()));
        if let Some(socket) = &self.socket_path {
            argv.extend(["-socketPath".to_string(), socket.clone()]);
        }
        argv
    }

    async fn json(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let mut with_output = args.to_vec();
        with_output.extend(["-output", "json"]);
        source::run(&self.argv(&with_output), MAX_ANSWER).await
    }

    /// The server's own bundle (`bundle show`).
    pub async fn own_bundle(&self) -> Result<HeldBundle, String> {
        let answer = self.json(&["bundle", "show"]).await?;
        let bundle: BundleJson = serde_json::from_slice(&answer)
            .map_err(|e| format!("bundle show: unexpected answer: {e}"))?;
        held(bundle).map_err(|e| format!("bundle show: {e}"))
    }

    /// The federated bundles it holds (`bundle list`).
    pub async fn federated_bundles(&self) -> Result<Vec<HeldBundle>, String> {
        let answer = self.json(&["bundle", "list"]).await?;
        let list: BundleListJson = serde_json::from_slice(&answer)
            .map_err(|e| format!("bundle list: unexpected answer: {e}"))?;
        list.bundles
            .into_iter()
            .map(|b| held(b).map_err(|e| format!("bundle list: {e}")))
            .collect()
    }

    /// Its federation relationships (`federation list`).
    pub async fn relationships(&self) -> Result<Vec<Relationship>, String> {
        let answer = self.json(&["federation", "list"]).await?;
        let list: RelationshipListJson = serde_json::from_slice(&answer)
            .map_err(|e| format!("federation list: unexpected answer: {e}"))?;
        Ok(list
            .federation_relationships
            .into_iter()
            .map(|r| Relationship {
                trust_domain: r.trust_domain,
                url: r.bundle_endpoint_url,
                endpoint_spiffe_id: r.https_spiffe.map(|s| s.endpoint_spiffe_id),
            })
            .collect())
    }
}

fn held(bundle: BundleJson) -> Result<HeldBundle, String> {
    let mut ders = Vec::with_capacity(bundle.x509_authorities.len());
    for (i, authority) in bundle.x509_authorities.iter().enumerate() {
        let der = STANDARD
            .decode(&authority.asn1)
            .map_err(|_| format!("x509_authorities[{i}].asn1 is not base64"))?;
        ders.push(der);
    }
    let sequence = bundle.sequence_number.and_then(|s| s.parse().ok());
    Ok(HeldBundle {
        trust_domain: bundle.trust_domain,
        roots: Roots::from_ders(ders, sequence),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spire_json_answers_are_read_and_bad_fields_named() {
        let list = br#"{"bundles":[{"trust_domain":"y.test","refresh_hint":"0","sequence_number":"3",
            "x509_authorities":[{"asn1":"AAEC","tainted":false}],"jwt_authorities":[]}],"next_page_token":""}"#;
        let parsed: BundleListJson = serde_json::from_slice(list).unwrap();
        let bundle = held(parsed.bundles.into_iter().next().unwrap()).unwrap();
        assert_eq!(bundle.trust_domain, "y.test");
        assert_eq!(bundle.roots.sequence, Some(3));
        assert_eq!(bundle.roots.sha256.len(), 1);
        let bad: BundleJson = serde_json::from_slice(
            br#"{"trust_domain":"y.test","x509_authorities":[{"asn1":"AAEC"},{"asn1":"%%"}]}"#,
        )
        .unwrap();
        assert_eq!(
            held(bad).unwrap_err(),
            "x509_authorities[1].asn1 is not base64"
        );
        let relationships: RelationshipListJson = serde_json::from_slice(
            br#"{"federation_relationships":[{"bundle_endpoint_url":"https://127.0.0.1:8443",
            "https_spiffe":{"endpoint_spiffe_id":"spiffe://y.test/spire/server"},"trust_domain":"y.test",
            "trust_domain_bundle":null}],"next_page_token":""}"#,
        )
        .unwrap();
        let r = &relationships.federation_relationships[0];
        assert_eq!(r.bundle_endpoint_url, "https://127.0.0.1:8443");
        assert_eq!(
            r.https_spiffe.as_ref().unwrap().endpoint_spiffe_id,
            "spiffe://y.test/spire/server"
        );
    }
}
