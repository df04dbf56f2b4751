//! Envoy configuration for trustweave-filter in each placement, as the tests run it.
//!
//! The wasm filter entries are read from the EnvoyFilter resources in `istio/`
//! (only the `.wasm` path is pointed at the build here), and so is each
//! placement's `forward_client_cert_details`: the tests run what Istio patches
//! in. Identities are static inline certificates, isolating the filter from SDS.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::pki::{IssuedSvid, TrustDomainCa};

/// A built module: `$<env>`, else `file` in the workspace's `wasm` profile output; fails with `hint`.
fn built_wasm(env: &str, file: &str, hint: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/wasm32-wasip1/wasm")
            .join(file)
    });
    assert!(path.exists(), "{} is missing: {hint}", path.display());
    path
}

/// The built filter: `$TRUSTWEAVE_WASM`, else the workspace's `wasm` profile output.
pub fn wasm_path() -> PathBuf {
    built_wasm(
        "TRUSTWEAVE_WASM",
        "trustweave_filter.wasm",
        "build it with `cargo build -p trustweave-filter --lib --target wasm32-wasip1 --profile wasm` (make test does)",
    )
}

/// The build with Rego mode: `$TRUSTWEAVE_REGO_WASM`, else the `wasm` profile output `make wasm` copies.
pub fn rego_wasm_path() -> PathBuf {
    built_wasm(
        "TRUSTWEAVE_REGO_WASM",
        "trustweave_filter_rego.wasm",
        "make wasm builds it",
    )
}

/// The test-only build that traps on `x-trustweave-test-trap` (feature `test-trap`), which `make wasm` copies.
pub fn trap_wasm_path() -> PathBuf {
    built_wasm(
        "TRUSTWEAVE_TRAP_WASM",
        "trustweave_filter_trap.wasm",
        "make wasm builds it",
    )
}

/// Istio's sidecar HTTP entry running the Rego build with `config_json`.
pub fn rego_filter(config_json: &str) -> Value {
    with_module(
        http_filter(config_json),
        &rego_wasm_path(),
        "trustweave-rego",
    )
}

/// `entry` loading another module, in a VM of its own (`vm_id`).
pub fn with_module(mut entry: Value, module: &std::path::Path, vm_id: &str) -> Value {
    entry["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = json!(module);
    entry["typed_config"]["config"]["vm_config"]["vm_id"] = json!(vm_id);
    entry
}

/// The shipped HCM `tracing` block whose `custom_tags` put the annotations on spans.
pub fn tracing_custom_tags() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../filter/examples/tracing-custom-tags.json");
    serde_json::from_slice(&std::fs::read(path).expect("tracing example"))
        .expect("tracing example is JSON")
}

fn istio_documents(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../istio")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("YAML document"))
        .collect()
}

fn config_patches(file: &str) -> Vec<Value> {
    istio_documents(file)
        .iter()
        .flat_map(|doc| {
            doc["spec"]["configPatches"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// The wasm filter entry an Istio EnvoyFilter in `istio/` patches in, with its
/// file path pointed at the filter built here. The tests run exactly this.
pub fn istio_filter(file: &str) -> Value {
    let mut entry = config_patches(file)
        .into_iter()
        .map(|patch| patch["patch"]["value"].clone())
        .find(|value| value["name"].as_str().is_some_and(|n| n.ends_with(".wasm")))
        .unwrap_or_else(|| panic!("istio/{file} patches in no wasm filter"));
    entry["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = json!(wasm_path());
    entry
}

/// The network filter an Istio EnvoyFilter in `istio/` inserts before
/// `tcp_proxy`, as it is (one with no module file, e.g. the TCP RBAC filter).
pub fn istio_tcp_filter(file: &str) -> Value {
    config_patches(file)
        .into_iter()
        .find(|p| {
            p["patch"]["operation"] == "INSERT_BEFORE"
                && p["match"]["listener"]["filterChain"]["filter"]["name"]
                    == "envoy.filters.network.tcp_proxy"
        })
        .map(|p| p["patch"]["value"].clone())
        .unwrap_or_else(|| panic!("istio/{file} inserts nothing before tcp_proxy"))
}

/// The fields an Istio EnvoyFilter in `istio/` MERGEs into the typed config of
/// the network filter `filter` (e.g. the HCM's XFCC and path normalization).
pub fn istio_merged_fields(file: &str, filter: &str) -> serde_json::Map<String, Value> {
    let mut fields = config_patches(file)
        .iter()
        .find(|p| {
            p["patch"]["operation"] == "MERGE"
                && p["match"]["listener"]["filterChain"]["filter"]["name"] == filter
        })
        .and_then(|p| p["patch"]["value"]["typed_config"].as_object().cloned())
        .unwrap_or_else(|| panic!("istio/{file} merges nothing into {filter}"));
    fields.remove("@type");
    fields
}

/// The listener fields an Istio EnvoyFilter in `istio/` MERGEs into a listener
/// (e.g. the east-west gateway's MSS clamp).
pub fn istio_listener_fields(file: &str) -> serde_json::Map<String, Value> {
    config_patches(file)
        .iter()
        .find(|p| p["applyTo"] == "LISTENER" && p["patch"]["operation"] == "MERGE")
        .and_then(|p| p["patch"]["value"].as_object().cloned())
        .unwrap_or_else(|| panic!("istio/{file} merges nothing into a listener"))
}

/// The HCM fields an Istio EnvoyFilter in `istio/` merges in.
pub fn istio_hcm_fields(file: &str) -> serde_json::Map<String, Value> {
    istio_merged_fields(file, "envoy.filters.network.http_connection_manager")
}

/// Istio's sidecar HTTP entry with another filter configuration (for focused tests).
pub fn http_filter(config_json: &str) -> Value {
    with_configuration(istio_filter(SIDECAR_HTTP), config_json)
}

/// Istio's east-west gateway HTTP entry with another filter configuration.
pub fn gateway_http_filter(config_json: &str) -> Value {
    with_configuration(istio_filter(GATEWAY_HTTP), config_json)
}

/// Istio's sidecar network entry with another filter configuration.
pub fn network_filter(config_json: &str) -> Value {
    with_configuration(istio_filter(SIDECAR_NETWORK), config_json)
}

fn with_configuration(mut entry: Value, config_json: &str) -> Value {
    entry["typed_config"]["config"]["configuration"]["value"] = json!(config_json);
    entry
}

/// `istio/` file: sidecar inbound, HTTP.
pub const SIDECAR_HTTP: &str = "envoyfilter-sidecar-http.yaml";
/// `istio/` file: the sidecar inbound connection manager settings the filter relies on.
pub const SIDECAR_HCM: &str = "envoyfilter-sidecar-hcm.yaml";
/// `istio/` file: sidecar inbound, TCP.
pub const SIDECAR_NETWORK: &str = "envoyfilter-sidecar-network.yaml";
/// `istio/` file: sidecar inbound, TCP, for the OCI install paths (RBAC), GCP's copy.
pub const SIDECAR_TCP_RBAC: &str = "clouds/gcp/envoyfilter-sidecar-tcp-rbac.yaml";
/// `istio/` file: TLS-terminating east-west gateway.
pub const GATEWAY_HTTP: &str = "envoyfilter-gateway-http.yaml";
/// `istio/` file: passthrough east-west gateway.
pub const GATEWAY_SNI: &str = "envoyfilter-gateway-sni.yaml";
/// `istio/` file: the east-west gateway's TCP MSS clamp.
pub const GATEWAY_MSS: &str = "envoyfilter-gateway-mss.yaml";

fn inline(text: String) -> Value {
    json!({ "inline_string": text })
}

/// A `common_tls_context` with a static certificate and SPIFFE-validator trust in `trusted`.
pub fn tls_context(svid: &IssuedSvid, trusted: &[&TrustDomainCa]) -> Value {
    let domains: Vec<Value> = trusted
        .iter()
        .map(|ca| json!({ "name": ca.trust_domain(), "trust_bundle": inline(ca.root_pem()) }))
        .collect();
    json!({
        "tls_certificates": [{ "certificate_chain": inline(svid.cert_pem()), "private_key": inline(svid.key_pem()) }],
        "validation_context": {
            "custom_validator_config": {
                "name": "envoy.tls.cert_validator.spiffe",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig",
                    "trust_domains": domains
                }
            }
        }
    })
}

pub(crate) fn downstream_tls(svid: &IssuedSvid, trusted: &[&TrustDomainCa]) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": tls_context(svid, trusted)
        }
    })
}

pub(crate) fn upstream_tls(
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    sni: Option<&str>,
) -> Value {
    let mut context = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": tls_context(svid, trusted)
    });
    if let Some(sni) = sni {
        context["sni"] = json!(sni);
    }
    json!({ "name": "envoy.transport_sockets.tls", "typed_config": context })
}

pub(crate) fn cluster(name: &str, addr: SocketAddr, transport_socket: Option<Value>) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                "address": addr.ip().to_string(), "port_value": addr.port() } } } }] }]
        }
    });
    if let Some(ts) = transport_socket {
        c["transport_socket"] = ts;
    }
    c
}

pub(crate) fn loopback_any_port() -> Value {
    json!({ "socket_address": { "address": "127.0.0.1", "port_value": 0 } })
}

/// A connection manager with the fields `istio_file` merges in (XFCC handling,
/// path normalization), or none (`None`, a plain client).
pub(crate) fn hcm(
    stat_prefix: &str,
    istio_file: Option<&str>,
    filters: Vec<Value>,
    cluster: &str,
) -> Value {
    let mut hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                }]
            },
            "http_filters": filters
        }
    });
    if let Some(file) = istio_file {
        for (key, value) in istio_hcm_fields(file) {
            hcm["typed_config"][key] = value;
        }
    }
    hcm
}

fn with_tracing(mut hcm: Value) -> Value {
    hcm["typed_config"]["tracing"] = tracing_custom_tags();
    hcm
}

pub(crate) fn router() -> Value {
    json!({ "name": "envoy.filters.http.router", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } })
}

pub(crate) fn bootstrap(
    node_id: &str,
    node_extra: Value,
    listeners: Vec<Value>,
    clusters: Vec<Value>,
) -> Value {
    let mut node = json!({ "id": node_id, "cluster": node_id });
    if let Value::Object(extra) = node_extra {
        for (k, v) in extra {
            node[k] = v;
        }
    }
    json!({
        "node": node,
        "admin": { "address": loopback_any_port() },
        "static_resources": { "listeners": listeners, "clusters": clusters }
    })
}

/// Name of the listener in every filter bootstrap.
pub const LISTENER: &str = "trustweave";

/// Destination sidecar inbound: mTLS, XFCC `APPEND_FORWARD` with the peer's URIs, the filter, → `upstream`.
pub fn sidecar(
    node_id: &str,
    node_extra: Value,
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    filter: Value,
    upstream: SocketAddr,
) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "filter_chains": [{
            "transport_socket": downstream_tls(svid, trusted),
            "filters": [with_tracing(hcm("inbound", Some(SIDECAR_HCM), vec![filter, router()], "app"))]
        }]
    });
    bootstrap(
        node_id,
        node_extra,
        vec![listener],
        vec![cluster("app", upstream, None)],
    )
}

/// Envoy's `ext_authz` filter asking the gRPC cluster `opa` (OPA-Envoy), failing closed.
pub fn ext_authz_filter() -> Value {
    json!({
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": false,
            "grpc_service": { "envoy_grpc": { "cluster_name": "opa" }, "timeout": "5s" }
        }
    })
}

/// The HTTP/2 cluster `opa` on OPA-Envoy's Unix socket.
pub fn opa_cluster(socket: &std::path::Path) -> Value {
    json!({
        "name": "opa",
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        },
        "load_assignment": {
            "cluster_name": "opa",
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "pipe": { "path": socket } } } }] }]
        }
    })
}

/// This GCP worker's sidecar with OPA-Envoy (`opa-envoy-plugin`, gRPC on the
/// Unix socket `opa_socket`) as `ext_authz` first, then `filter`, then the
/// router to `upstream`; the same connection manager on an mTLS listener
/// (`LISTENER`) and a plaintext one (`plaintext`, callers without identity).
pub fn sidecar_beside_ext_authz(
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    opa_socket: &std::path::Path,
    filter: Value,
    upstream: SocketAddr,
) -> Value {
    let ext_authz = ext_authz_filter();
    let manager = || {
        hcm(
            "inbound",
            Some(SIDECAR_HCM),
            vec![ext_authz.clone(), filter.clone(), router()],
            "app",
        )
    };
    let listeners = vec![
        json!({
            "name": LISTENER,
            "address": loopback_any_port(),
            "filter_chains": [{ "transport_socket": downstream_tls(svid, trusted), "filters": [manager()] }]
        }),
        json!({
            "name": "plaintext",
            "address": loopback_any_port(),
            "filter_chains": [{ "filters": [manager()] }]
        }),
    ];
    let opa = opa_cluster(opa_socket);
    bootstrap(
        "worker",
        json!({ "locality": { "region": "us-central1", "zone": "us-central1-a" }, "metadata": { "CLOUD": "gcp" } }),
        listeners,
        vec![cluster("app", upstream, None), opa],
    )
}

/// A plaintext inbound listener (no TLS: no caller identity) with Istio's sidecar HCM and `filter`.
pub fn plaintext_sidecar(filter: Value, upstream: SocketAddr) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "filter_chains": [{
            "filters": [hcm("inbound", Some(SIDECAR_HCM), vec![filter, router()], "app")]
        }]
    });
    bootstrap(
        "plaintext",
        json!({}),
        vec![listener],
        vec![cluster("app", upstream, None)],
    )
}

/// TLS-terminating east-west gateway: mTLS in, XFCC `SANITIZE_SET` (the verified caller
/// only), the filter, then mTLS with the gateway's own SVID to `next_hop`.
pub fn terminating_gateway(
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    filter: Value,
    next_hop: SocketAddr,
) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "filter_chains": [{
            "transport_socket": downstream_tls(svid, trusted),
            "filters": [hcm("gateway", Some(GATEWAY_HTTP), vec![filter, router()], "next_hop")]
        }]
    });
    bootstrap(
        "eastwest-gateway",
        json!({}),
        vec![listener],
        vec![cluster(
            "next_hop",
            next_hop,
            Some(upstream_tls(svid, trusted, None)),
        )],
    )
}

/// L4 identity enforcement: mTLS terminated, the network filter, then `tcp_proxy` to `upstream`.
pub fn tcp_with_identity(
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    filter: Value,
    upstream: SocketAddr,
) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "filter_chains": [{
            "transport_socket": downstream_tls(svid, trusted),
            "filters": [filter, sidecar_tcp_proxy("upstream")]
        }]
    });
    bootstrap(
        "tcp-sidecar",
        json!({}),
        vec![listener],
        vec![cluster("upstream", upstream, None)],
    )
}

/// Istio's inbound listener for a port whose protocol it auto-detects, under
/// STRICT mTLS (pilot `filterchain_options.go`,
/// `inboundStrictFilterChainMatchOptions`): TLS offering Istio's HTTP ALPN
/// goes to the connection manager with `http_filter`, to `http_upstream`; any
/// other TLS to `tcp_filter` and `tcp_proxy` (with what `tcp_file` merges into
/// it), to `tcp_upstream`.
pub fn auto_detected_port(
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    (http_filter, http_upstream): (Value, SocketAddr),
    (tcp_filter, tcp_file, tcp_upstream): (Value, &str, SocketAddr),
) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "listener_filters": [tls_inspector()],
        "filter_chains": [
            {
                "filter_chain_match": {
                    "transport_protocol": "tls",
                    "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
                },
                "transport_socket": downstream_tls(svid, trusted),
                "filters": [hcm("inbound", Some(SIDECAR_HCM), vec![http_filter, router()], "app")]
            },
            {
                "filter_chain_match": { "transport_protocol": "tls" },
                "transport_socket": downstream_tls(svid, trusted),
                "filters": [tcp_filter, merged_tcp_proxy(tcp_file, "tcp-app")]
            }
        ]
    });
    bootstrap(
        "auto-detected",
        json!({}),
        vec![listener],
        vec![
            cluster("app", http_upstream, None),
            cluster("tcp-app", tcp_upstream, None),
        ],
    )
}

/// The TLS inspector listener filter (SNI and ALPN for filter chain matching).
fn tls_inspector() -> Value {
    json!({
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" }
    })
}

/// `tcp_proxy` with what Istio's sidecar network EnvoyFilter merges into it.
fn sidecar_tcp_proxy(cluster: &str) -> Value {
    merged_tcp_proxy(SIDECAR_NETWORK, cluster)
}

/// `tcp_proxy` with what the EnvoyFilter `file` merges into it.
fn merged_tcp_proxy(file: &str, cluster: &str) -> Value {
    let mut proxy = tcp_proxy(cluster);
    for (key, value) in istio_merged_fields(file, "envoy.filters.network.tcp_proxy") {
        proxy["typed_config"][key] = value;
    }
    proxy
}

pub(crate) fn tcp_proxy(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "tcp", "cluster": cluster
        }
    })
}

/// `AUTO_PASSTHROUGH` east-west gateway: TLS is not terminated; SNI is read by the
/// TLS inspector, the filter allows or refuses the connection, `tcp_proxy` passes it on.
pub fn passthrough_gateway(filter: Value, upstream: SocketAddr) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "listener_filters": [tls_inspector()],
        "filter_chains": [{ "filters": [filter, tcp_proxy("upstream")] }]
    });
    bootstrap(
        "eastwest-passthrough",
        json!({}),
        vec![listener],
        vec![cluster("upstream", upstream, None)],
    )
}

/// A client Envoy with one plaintext listener per SNI, each forwarding over mTLS with that SNI.
pub fn sni_client(
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    upstream: SocketAddr,
    snis: &[&str],
) -> Value {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (i, sni) in snis.iter().enumerate() {
        let name = format!("sni{i}");
        listeners.push(json!({
            "name": name,
            "address": loopback_any_port(),
            "filter_chains": [{ "filters": [hcm(&name, None, vec![router()], &name)] }]
        }));
        clusters.push(cluster(
            &name,
            upstream,
            Some(upstream_tls(svid, trusted, Some(sni))),
        ));
    }
    bootstrap("sni-client", json!({}), listeners, clusters)
}
