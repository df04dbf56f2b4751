//! Shared set-up of the filter's real-Envoy tests: three trust domains, the
//! identities of the users' multi-cloud guide, and a GCP worker's sidecar.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::envoy::Envoy;
use crate::filter::{self, LISTENER};
use crate::http::HttpResponse;
use crate::pki::{IssuedSvid, TrustDomainCa};
use crate::tls_client;
use crate::upstream;

/// This sidecar's workload: a GCP worker in us-central1.
pub const WORKER: &str = "spiffe://gcp.company.com/region/gcp-us-central1/worker-1";
/// GCP's east-west gateway (trusted to forward callers).
pub const GATEWAY: &str = "spiffe://gcp.company.com/ns/istio-system/sa/istio-eastwestgateway";
/// A workload in GCP's own trust domain.
pub const GCP_PEER: &str = "spiffe://gcp.company.com/ns/billing/sa/invoicer";
/// An AWS workload allowed `inventory.read` only.
pub const CATALOG: &str = "spiffe://aws.company.com/ns/shop/sa/catalog";
/// The AWS orchestrator, allowed to call central workers.
pub const ORCHESTRATOR: &str = "spiffe://aws.company.com/ns/ops/sa/orchestrator";
/// An Azure workload no policy names.
pub const STRANGER: &str = "spiffe://azure.company.com/ns/x/sa/stranger";
/// Lifetime of test SVIDs.
pub const TTL: Duration = Duration::from_secs(3600);

/// One CA per cloud's trust domain.
pub struct Pki {
    /// aws.company.com
    pub aws: TrustDomainCa,
    /// gcp.company.com
    pub gcp: TrustDomainCa,
    /// azure.company.com
    pub azure: TrustDomainCa,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// Three fresh CAs.
    pub fn new() -> Self {
        Self {
            aws: TrustDomainCa::new("aws.company.com"),
            gcp: TrustDomainCa::new("gcp.company.com"),
            azure: TrustDomainCa::new("azure.company.com"),
        }
    }

    /// Every CA (all three domains trusted).
    pub fn all(&self) -> Vec<&TrustDomainCa> {
        vec![&self.aws, &self.gcp, &self.azure]
    }

    /// An SVID for `id` from its trust domain's CA.
    pub fn svid(&self, id: &str) -> IssuedSvid {
        let ca = [&self.aws, &self.gcp, &self.azure]
            .into_iter()
            .find(|ca| id.starts_with(&format!("spiffe://{}/", ca.trust_domain())))
            .expect("known trust domain");
        ca.issue_svid(id, TTL)
    }
}

/// The shipped sidecar filter: the users' multi-cloud policy, as Istio patches it in.
pub fn shipped_sidecar_filter() -> Value {
    filter::istio_filter(filter::SIDECAR_HTTP)
}

/// Envoy node locality and metadata of a GCP us-central1 workload.
pub fn gcp_node() -> Value {
    json!({ "locality": { "region": "us-central1", "zone": "us-central1-a" }, "metadata": { "CLOUD": "gcp" } })
}

/// Starts Envoy and returns it with its `trustweave` listener's address.
pub async fn start(dir: &tempfile::TempDir, name: &str, bootstrap: &Value) -> (Envoy, SocketAddr) {
    let envoy = Envoy::start(name, dir.path(), bootstrap).await;
    envoy.wait_live().await;
    let addr = envoy.listener(LISTENER).await;
    (envoy, addr)
}

/// One HTTP/1.1 request over mTLS presenting `client`.
pub async fn call(
    addr: SocketAddr,
    client: &IssuedSvid,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    tls_client::request(addr, client, "GET", path, headers)
        .await
        .expect("mTLS request")
}

/// Headers the upstream received (the echo server's JSON body).
pub fn received(response: &HttpResponse) -> BTreeMap<String, Vec<String>> {
    assert_eq!(response.status, 200, "{response:?}");
    serde_json::from_str(&response.body).expect("echo JSON")
}

/// The first value of header `name`.
pub fn one<'a>(headers: &'a BTreeMap<String, Vec<String>>, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.first())
        .map(String::as_str)
}

/// A destination sidecar (this GCP worker) running `filter`, in front of the header echo.
pub async fn sidecar(dir: &tempfile::TempDir, pki: &Pki, filter: Value) -> (Envoy, SocketAddr) {
    start(dir, "sidecar", &worker_bootstrap(pki, filter).await).await
}

/// The bootstrap of this GCP worker's sidecar running `filter`, in front of a new header echo.
pub async fn worker_bootstrap(pki: &Pki, filter: Value) -> Value {
    let echo = upstream::start_header_echo().await;
    filter::sidecar(
        "worker",
        gcp_node(),
        &pki.svid(WORKER),
        &pki.all(),
        filter,
        echo,
    )
}

/// `bootstrap` with its listener trusting `ca`'s root as a plain PEM `trusted_ca`
/// (no SPIFFE validator: what an Envoy without SPIFFE validation accepts).
pub fn with_pem_trust(mut bootstrap: Value, ca: &TrustDomainCa) -> Value {
    bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
        ["typed_config"]["common_tls_context"]["validation_context"] =
        json!({ "trusted_ca": { "inline_string": ca.root_pem() } });
    bootstrap
}

/// Starts this GCP worker's sidecar with `filter` and waits until Envoy refuses
/// the configuration and exits; returns Envoy's log.
pub async fn refused_configuration(
    dir: &tempfile::TempDir,
    pki: &Pki,
    name: &str,
    filter: Value,
) -> String {
    let bootstrap = worker_bootstrap(pki, filter).await;
    let mut envoy = Envoy::start(name, dir.path(), &bootstrap).await;
    crate::wait::wait_until(
        "Envoy refuses the configuration",
        Duration::from_secs(20),
        || {
            let done = !envoy.is_running();
            async move { done }
        },
    )
    .await;
    envoy.log()
}

/// The connection manager of a filter bootstrap's first listener (to patch its fields).
pub fn hcm_config(bootstrap: &mut Value) -> &mut Value {
    &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]
}

/// The SHA-256 Envoy computes for a leaf certificate (`Hash=` in XFCC).
pub fn digest(svid: &IssuedSvid) -> String {
    trustweave_engine::certificate::sha256_hex(&svid.leaf_der)
}

/// An XFCC element as Envoy writes it for `svid` (`By`, `Hash`, `Cert`, `URI`).
pub fn xfcc_element(by: &str, svid: &IssuedSvid) -> String {
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", svid.leaf_der.clone()));
    format!(
        "By={by};Hash={};Cert=\"{}\";URI={}",
        digest(svid),
        trustweave_engine::certificate::url_encode_pem(&pem),
        svid.spiffe_id
    )
}

/// A counter the filter defines (Envoy may prefix wasm stats, e.g. `wasmcustom.`).
pub async fn filter_counter(envoy: &Envoy, name: &str) -> u64 {
    let stats = envoy.admin_get(&format!("/stats?filter={name}")).await;
    stats
        .lines()
        .find_map(|line| {
            let (stat, value) = line.rsplit_once(": ")?;
            (stat == name || stat.ends_with(&format!(".{name}")))
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}
