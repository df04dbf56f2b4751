//! Envoy configuration for trustweave-filter in each placement, as the tests run it.
//!
//! The filter's own configuration is JSON handed to the wasm plugin as a
//! `StringValue` (what Istio's `WasmPlugin.pluginConfig` and an EnvoyFilter's
//! wasm `configuration` become). Identities here are static inline
//! certificates, so that these tests isolate the filter from SDS.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::pki::{IssuedSvid, TrustDomainCa};

/// The built filter: `$TRUSTWEAVE_WASM`, else the workspace's `wasm` profile output.
pub fn wasm_path() -> PathBuf {
    let path = std::env::var_os("TRUSTWEAVE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/wasm32-wasip1/wasm/trustweave_filter.wasm")
        });
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p trustweave-filter --lib --target wasm32-wasip1 --profile wasm` (make test does)",
        path.display()
    );
    path
}

/// The path of the shipped multi-cloud example policy (also the default in `istio/`).
pub fn example_policy_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../filter/examples/multi-cloud-policy.json")
}

/// The shipped HCM `tracing` block whose `custom_tags` put the annotations on spans.
pub fn tracing_custom_tags() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../filter/examples/tracing-custom-tags.json");
    serde_json::from_slice(&std::fs::read(path).expect("tracing example"))
        .expect("tracing example is JSON")
}

fn wasm_config(config_json: &str) -> Value {
    json!({
        "name": "trustweave",
        "root_id": "trustweave",
        "vm_config": {
            "vm_id": "trustweave",
            "runtime": "envoy.wasm.runtime.v8",
            "code": { "local": { "filename": wasm_path() } }
        },
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": config_json
        },
        "failure_policy": "FAIL_CLOSED"
    })
}

/// The HTTP filter entry.
pub fn http_filter(config_json: &str) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": wasm_config(config_json)
        }
    })
}

/// The network filter entry.
pub fn network_filter(config_json: &str) -> Value {
    json!({
        "name": "envoy.filters.network.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
            "config": wasm_config(config_json)
        }
    })
}

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

fn downstream_tls(svid: &IssuedSvid, trusted: &[&TrustDomainCa]) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": tls_context(svid, trusted)
        }
    })
}

fn upstream_tls(svid: &IssuedSvid, trusted: &[&TrustDomainCa], sni: Option<&str>) -> Value {
    let mut context = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": tls_context(svid, trusted)
    });
    if let Some(sni) = sni {
        context["sni"] = json!(sni);
    }
    json!({ "name": "envoy.transport_sockets.tls", "typed_config": context })
}

fn cluster(name: &str, addr: SocketAddr, transport_socket: Option<Value>) -> Value {
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

fn loopback_any_port() -> Value {
    json!({ "socket_address": { "address": "127.0.0.1", "port_value": 0 } })
}

/// How the connection manager treats `x-forwarded-client-cert`, per placement (as Istio sets it).
fn hcm(stat_prefix: &str, forward_client_cert: &str, filters: Vec<Value>, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "forward_client_cert_details": forward_client_cert,
            "set_current_client_cert_details": { "uri": true },
            "route_config": {
                "virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                }]
            },
            "http_filters": filters
        }
    })
}

fn with_tracing(mut hcm: Value) -> Value {
    hcm["typed_config"]["tracing"] = tracing_custom_tags();
    hcm
}

fn router() -> Value {
    json!({ "name": "envoy.filters.http.router", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } })
}

fn bootstrap(
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
    filter_json: &str,
    upstream: SocketAddr,
) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "filter_chains": [{
            "transport_socket": downstream_tls(svid, trusted),
            "filters": [with_tracing(hcm("inbound", "APPEND_FORWARD", vec![http_filter(filter_json), router()], "app"))]
        }]
    });
    bootstrap(
        node_id,
        node_extra,
        vec![listener],
        vec![cluster("app", upstream, None)],
    )
}

/// TLS-terminating east-west gateway: mTLS in, XFCC `SANITIZE_SET` (the verified caller
/// only), the filter, then mTLS with the gateway's own SVID to `next_hop`.
pub fn terminating_gateway(
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    filter_json: &str,
    next_hop: SocketAddr,
) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "filter_chains": [{
            "transport_socket": downstream_tls(svid, trusted),
            "filters": [hcm("gateway", "SANITIZE_SET", vec![http_filter(filter_json), router()], "next_hop")]
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
    filter_json: &str,
    upstream: SocketAddr,
) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "filter_chains": [{
            "transport_socket": downstream_tls(svid, trusted),
            "filters": [network_filter(filter_json), tcp_proxy("upstream")]
        }]
    });
    bootstrap(
        "tcp-sidecar",
        json!({}),
        vec![listener],
        vec![cluster("upstream", upstream, None)],
    )
}

fn tcp_proxy(cluster: &str) -> Value {
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
pub fn passthrough_gateway(filter_json: &str, upstream: SocketAddr) -> Value {
    let listener = json!({
        "name": LISTENER,
        "address": loopback_any_port(),
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" }
        }],
        "filter_chains": [{ "filters": [network_filter(filter_json), tcp_proxy("upstream")] }]
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
            "filter_chains": [{ "filters": [hcm(&name, "SANITIZE", vec![router()], &name)] }]
        }));
        clusters.push(cluster(
            &name,
            upstream,
            Some(upstream_tls(svid, trusted, Some(sni))),
        ));
    }
    bootstrap("sni-client", json!({}), listeners, clusters)
}
