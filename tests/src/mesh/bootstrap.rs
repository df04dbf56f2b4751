//! Envoy configurations of the mesh, as Istio would generate them for one
//! cluster of a multi-primary, multi-network mesh.
//!
//! - A **sidecar**: inbound on the pod's `15006` (mTLS with `default`/`ROOTCA`
//!   from SDS over `sds-grpc`, the filter entry from `istio/clouds/<cloud>/`,
//!   Istio's inbound HCM settings) to the app on `8080`; outbound on `15001`,
//!   one virtual host per service, each over mTLS with the service's SNI
//!   (`outbound_.8080_._.<host>`) and its exact SPIFFE ID — to the service's
//!   pod in the same cloud, to that cloud's east-west gateway otherwise. Both
//!   connection managers trace with Envoy's OpenTelemetry tracer and the
//!   shipped `custom_tags`.
//! - An **east-west gateway** in `AUTO_PASSTHROUGH`: `15443`, TLS inspector,
//!   one filter chain per local service by SNI, the filter's SNI allowlist
//!   (`istio/envoyfilter-gateway-sni.yaml`), `tcp_proxy`, and the listener
//!   options of `istio/envoyfilter-gateway-mss.yaml` (MSS 1300).

use std::net::SocketAddr;
use std::path::Path;

use serde_json::{json, Value};

use crate::envoy::{grpc_unix_cluster, istio_downstream_tls, sds_cluster, sds_secret};
use crate::filter::{self, hcm, router, tcp_proxy};

/// One outbound destination of a sidecar.
#[derive(Clone, Debug)]
pub struct Route {
    /// Service host (`search.search.svc.cluster.local`).
    pub host: String,
    /// SNI Istio uses for it.
    pub sni: String,
    /// The only SPIFFE ID accepted from it.
    pub spiffe_id: String,
    /// Where the connection goes (its pod, or its cloud's gateway).
    pub endpoint: SocketAddr,
}

/// What a sidecar needs to know.
#[derive(Clone, Debug)]
pub struct Sidecar<'a> {
    /// Node ID.
    pub node_id: &'a str,
    /// `service.name` on its spans.
    pub service_name: &'a str,
    /// Region (node locality).
    pub region: &'a str,
    /// Inbound listener (`pod:15006`).
    pub inbound: SocketAddr,
    /// Outbound listener (`pod:15001`).
    pub outbound: SocketAddr,
    /// The app (`pod:8080`).
    pub app: SocketAddr,
    /// The filter entry for the inbound connection manager (none: no filter).
    pub filter: Option<Value>,
    /// Outbound destinations.
    pub routes: &'a [Route],
    /// The node's SDS socket.
    pub sds_socket: &'a Path,
    /// The OTLP receiver's socket.
    pub otlp: &'a Path,
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({ "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() } })
}

fn static_cluster(name: &str, addr: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": { "cluster_name": name, "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket_address(addr) } }] }] }
    })
}

/// The shipped `tracing` block (sampling, `custom_tags`) with Envoy's OpenTelemetry tracer.
fn tracing(service_name: &str) -> Value {
    let mut tracing = filter::tracing_custom_tags();
    tracing["provider"] = json!({
        "name": "envoy.tracers.opentelemetry",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": { "envoy_grpc": { "cluster_name": "otlp" }, "timeout": "1s" },
            "service_name": service_name
        }
    });
    tracing
}

/// Istio's upstream mTLS: `default` and `ROOTCA` from SDS, the peer's exact SPIFFE ID, the SNI.
fn upstream_tls(route: &Route) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": route.sni,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [sds_secret("default")],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": { "exact": route.spiffe_id } }]
                    },
                    "validation_context_sds_secret_config": sds_secret("ROOTCA")
                }
            }
        }
    })
}

fn outbound_cluster(route: &Route) -> Value {
    let mut cluster = static_cluster(&format!("outbound|8080||{}", route.host), route.endpoint);
    cluster["transport_socket"] = upstream_tls(route);
    // One request per connection: every call is a handshake, so the faults
    // (rotation, federation, restarts) are seen on handshakes.
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": { "max_requests_per_connection": 1 },
            "explicit_http_config": { "http_protocol_options": {} }
        }
    });
    cluster
}

fn bootstrap(node_id: &str, region: &str, listeners: Vec<Value>, clusters: Vec<Value>) -> Value {
    json!({
        "node": { "id": node_id, "cluster": node_id, "locality": { "region": region } },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": { "listeners": listeners, "clusters": clusters },
        "layered_runtime": { "layers": [{ "name": "static", "static_layer": {
            // Export each span as it ends, so the test reads traces without waiting.
            "tracing.opentelemetry.min_flush_spans": 1
        } }] }
    })
}

/// A sidecar's bootstrap.
pub fn sidecar(s: &Sidecar<'_>) -> Value {
    let mut inbound_filters = Vec::new();
    inbound_filters.extend(s.filter.clone());
    inbound_filters.push(router());
    let mut inbound_hcm = hcm("inbound", Some(filter::SIDECAR_HCM), inbound_filters, "app");
    inbound_hcm["typed_config"]["tracing"] = tracing(s.service_name);
    let inbound = json!({
        "name": "virtualInbound",
        "address": socket_address(s.inbound),
        "filter_chains": [{
            "transport_socket": istio_downstream_tls(),
            "filters": [inbound_hcm]
        }]
    });
    let virtual_hosts: Vec<Value> = s
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.host,
                "domains": [r.host, format!("{}:8080", r.host)],
                "routes": [{ "match": { "prefix": "/" }, "route": {
                    "cluster": format!("outbound|8080||{}", r.host),
                    "retry_policy": { "num_retries": 0 }
                } }]
            })
        })
        .collect();
    let outbound = json!({
        "name": "virtualOutbound",
        "address": socket_address(s.outbound),
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "outbound",
                "route_config": { "virtual_hosts": virtual_hosts },
                "http_filters": [router()],
                "tracing": tracing(s.service_name)
            }
        }] }]
    });
    let mut clusters = vec![
        static_cluster("app", s.app),
        grpc_unix_cluster("otlp", s.otlp),
        sds_cluster(s.sds_socket),
    ];
    clusters.extend(s.routes.iter().map(outbound_cluster));
    bootstrap(s.node_id, s.region, vec![inbound, outbound], clusters)
}

/// An `AUTO_PASSTHROUGH` east-west gateway on `listen`: one chain per `(sni, pod inbound)`.
pub fn eastwest_gateway(
    node_id: &str,
    region: &str,
    listen: SocketAddr,
    chains: &[(String, SocketAddr)],
) -> Value {
    let sni_filter = filter::istio_filter(filter::GATEWAY_SNI);
    let mut clusters = Vec::new();
    let filter_chains: Vec<Value> = chains
        .iter()
        .enumerate()
        .map(|(i, (sni, pod))| {
            let cluster = format!("passthrough{i}");
            clusters.push(static_cluster(&cluster, *pod));
            json!({
                "filter_chain_match": { "server_names": [sni] },
                "filters": [sni_filter.clone(), tcp_proxy(&cluster)]
            })
        })
        .collect();
    let mut listener = json!({
        "name": "0.0.0.0_15443",
        "address": socket_address(listen),
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" }
        }],
        "filter_chains": filter_chains
    });
    for (key, value) in filter::istio_listener_fields(filter::GATEWAY_MSS) {
        listener[key] = value;
    }
    bootstrap(node_id, region, vec![listener], clusters)
}
