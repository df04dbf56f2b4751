//! trustweave-filter under attack, in real Envoy 1.40 with the shipped `.wasm`
//! and the `istio/` EnvoyFilter settings: hostile bytes, XFCC tricks, Istio's
//! DENY semantics, ambiguous headers, paths, and L4 server-first upstreams.

use trustweave_e2e::envoy::Envoy;
use trustweave_e2e::filter;
use trustweave_e2e::filter_fixture::*;
use trustweave_e2e::http::HttpResponse;
use trustweave_e2e::pki::{IssuedSvid, TrustDomainCa};
use trustweave_e2e::sds;
use trustweave_e2e::tls_client::{self, raw_head};
use trustweave_e2e::upstream::{self, BannerServer, BANNER};

async fn raw(
    addr: std::net::SocketAddr,
    client: &IssuedSvid,
    path: &str,
    host: &str,
    headers: &[(&str, &[u8])],
) -> HttpResponse {
    tls_client::request_raw(addr, client, &raw_head(path, host, headers))
        .await
        .expect("mTLS request")
}

async fn status(
    addr: std::net::SocketAddr,
    client: &IssuedSvid,
    path: &str,
    headers: &[(&str, &[u8])],
) -> u16 {
    raw(addr, client, path, "inventory.gcp.internal", headers)
        .await
        .status
}

/// Envoy's log shows no wasm failure (a trap logs the failed callback).
fn assert_no_trap(envoy: &Envoy) {
    let log = envoy.log();
    for sign in [
        "panicked",
        "Function: proxy_on",
        "wasm trap",
        "Plugin crashed",
    ] {
        assert!(!log.contains(sign), "{sign} in Envoy's log:\n{log}");
    }
}

#[tokio::test]
async fn one_ff_byte_never_traps_the_vm() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let (peer, stranger) = (pki.svid(GCP_PEER), pki.svid(STRANGER));
    let ff: &[u8] = b"a\xffb";
    // A denied peer, then an allowed one, over HTTP/1 (also inside XFCC) and HTTP/2.
    assert_eq!(status(addr, &stranger, "/x", &[("x-junk", ff)]).await, 403);
    assert_eq!(
        status(addr, &peer, "/invoices", &[("x-junk", ff)]).await,
        200
    );
    assert_eq!(
        status(addr, &peer, "/invoices", &[("x-forwarded-client-cert", ff)]).await,
        200,
        "the peer's certificate is still found behind a malformed client XFCC"
    );
    let h2 = tls_client::request_h2(addr, &stranger, "/x", &[("x-junk", ff)])
        .await
        .expect("HTTP/2");
    assert_eq!(h2, 403);
    let h2 = tls_client::request_h2(addr, &peer, "/invoices", &[("x-junk", ff)])
        .await
        .expect("HTTP/2");
    assert_eq!(h2, 200);
    // The VM still decides: every later request gets its policy's answer, not 503.
    for _ in 0..4 {
        assert_eq!(status(addr, &peer, "/invoices", &[]).await, 200);
        assert_eq!(status(addr, &stranger, "/x", &[]).await, 403);
    }
    assert_no_trap(&envoy);
}

#[tokio::test]
async fn a_malformed_value_can_trigger_a_deny_never_an_allow() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"policies":[
        {"name":"no-debug","action":"DENY","rules":[{"to":{"headers":{"x-debug":["on"]}}}]},
        {"name":"tenant","action":"ALLOW","rules":[{"to":{"headers":{"x-tenant":["public"]}}}]}]}"#;
    let (envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    let peer = pki.svid(GCP_PEER);
    let public: &[u8] = b"public";
    assert_eq!(status(addr, &peer, "/", &[("x-tenant", public)]).await, 200);
    assert_eq!(
        status(
            addr,
            &peer,
            "/",
            &[("x-tenant", public), ("x-debug", b"\xff")]
        )
        .await,
        403,
        "a malformed value could be `on`"
    );
    assert_eq!(
        status(addr, &peer, "/", &[("x-tenant", b"pub\xff")]).await,
        403,
        "a malformed value is never `public`"
    );
    assert_no_trap(&envoy);
}

#[tokio::test]
async fn xfcc_text_never_decides_the_peers_identity() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    // (a) An unbalanced quote would swallow Envoy's own element in a text parser.
    let two = pki.gcp.issue_with_uris(&[GCP_PEER, ORCHESTRATOR], TTL);
    let open_quote = format!("URI={GCP_PEER};x=\"");
    assert_eq!(
        status(
            addr,
            &two,
            "/invoices",
            &[("x-forwarded-client-cert", open_quote.as_bytes())]
        )
        .await,
        403
    );
    // (b) A SAN that reads as two XFCC elements is one URI SAN that is no SPIFFE ID.
    let split = format!("{GCP_PEER},URI={ORCHESTRATOR}");
    let forged = pki.gcp.issue_with_uris(&[&split], TTL);
    assert_eq!(status(addr, &forged, "/jobs", &[]).await, 403);
    // A copy of another workload's certificate text in XFCC does not match the digest.
    let other = pki.svid(GCP_PEER).cert_pem();
    let copied = format!(
        "Cert=\"{}\"",
        trustweave_engine::certificate::url_encode_pem(&other)
    );
    assert_eq!(
        status(
            addr,
            &pki.svid(STRANGER),
            "/invoices",
            &[("x-forwarded-client-cert", copied.as_bytes())]
        )
        .await,
        403
    );
}

#[tokio::test]
async fn a_split_san_through_a_deny_only_gateway_impersonates_nobody() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_sidecar, sidecar_addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let deny_only = r#"{"placement":"gateway","policies":[
        {"name":"no-onprem","action":"DENY","rules":[{"from":{"trust_domains":["onprem.company.com"]}}]}]}"#;
    let gateway_filter = filter::gateway_http_filter(deny_only);
    let gateway =
        filter::terminating_gateway(&pki.svid(GATEWAY), &pki.all(), gateway_filter, sidecar_addr);
    let (_gateway, gateway_addr) = start(&dir, "gateway", &gateway).await;
    let split = format!("{GCP_PEER},URI={ORCHESTRATOR}");
    let forged = pki.gcp.issue_with_uris(&[&split], TTL);
    let response = raw(
        gateway_addr,
        &forged,
        "/jobs",
        "inventory.gcp.internal",
        &[("x-trustweave-action", b"ping")],
    )
    .await;
    // Allowed only as an anonymous ping: the backend sees no caller at all.
    let seen = received(&response);
    assert_eq!(one(&seen, "x-trustweave-caller"), None, "{seen:?}");
    let denied = raw(
        gateway_addr,
        &forged,
        "/jobs",
        "inventory.gcp.internal",
        &[],
    )
    .await;
    assert_eq!(denied.status, 403, "the orchestrator rule never matches");
    // The real orchestrator through the same gateway is still forwarded.
    let seen = received(&call(gateway_addr, &pki.svid(ORCHESTRATOR), "/jobs", &[]).await);
    assert_eq!(one(&seen, "x-trustweave-caller"), Some(ORCHESTRATOR));
}

#[tokio::test]
async fn hosts_compare_case_insensitively_with_or_without_port() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"default_action":"ALLOW","policies":[
        {"name":"no-admin","action":"DENY","rules":[{"to":{"hosts":["admin.example.com"]}}]}]}"#;
    let (_envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    let peer = pki.svid(GCP_PEER);
    for host in [
        "admin.example.com",
        "ADMIN.EXAMPLE.COM",
        "Admin.Example.Com:8443",
        "admin.example.com.",
    ] {
        assert_eq!(raw(addr, &peer, "/", host, &[]).await.status, 403, "{host}");
    }
    assert_eq!(
        raw(addr, &peer, "/", "www.example.com", &[]).await.status,
        200
    );
}

#[tokio::test]
async fn every_value_of_a_repeated_header_is_checked() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"policies":[
        {"name":"no-debug","action":"DENY","rules":[{"to":{"headers":{"x-debug":["on"]}}}]},
        {"name":"no-trace","action":"DENY","rules":[{"when":[{"key":"request.headers[x-trace]","values":["on"]}]}]},
        {"name":"ping","action":"ALLOW","rules":[{"to":{"actions":["ping"]}}]}]}"#;
    let (_envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    let peer = pki.svid(GCP_PEER);
    let ping: (&str, &[u8]) = ("x-trustweave-action", b"ping");
    assert_eq!(status(addr, &peer, "/", &[ping]).await, 200);
    assert_eq!(
        status(
            addr,
            &peer,
            "/",
            &[ping, ("x-debug", b"off"), ("x-debug", b"on")]
        )
        .await,
        403
    );
    assert_eq!(
        status(
            addr,
            &peer,
            "/",
            &[ping, ("x-trace", b"off"), ("x-trace", b"on")]
        )
        .await,
        403
    );
    assert_eq!(
        status(addr, &peer, "/", &[ping, ("x-trustweave-action", b"admin")]).await,
        403,
        "an ALLOW on the action holds only if every value is allowed"
    );
}

#[tokio::test]
async fn a_bare_trust_domain_is_not_a_caller() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let bare = pki.gcp.issue_with_uris(&["spiffe://gcp.company.com"], TTL);
    // Envoy's SPIFFE validator refuses such a leaf at the handshake; with a plain
    // PEM trust anchor it gets through TLS and the filter must refuse it.
    let http = with_pem_trust(
        worker_bootstrap(&pki, shipped_sidecar_filter()).await,
        &pki.gcp,
    );
    let (_http, addr) = start(&dir, "pem-sidecar", &http).await;
    assert_eq!(
        status(addr, &pki.svid(GCP_PEER), "/invoices", &[]).await,
        200
    );
    assert_eq!(status(addr, &bare, "/invoices", &[]).await, 403);
    // At L4 too (the shipped same-trust-domain TCP policy).
    let counter = upstream::ByteCounter::start().await;
    let tcp = with_pem_trust(
        filter::tcp_with_identity(
            &pki.svid(WORKER),
            &pki.all(),
            filter::istio_filter(filter::SIDECAR_NETWORK),
            counter.addr,
        ),
        &pki.gcp,
    );
    let (_tcp, tcp_addr) = start(&dir, "pem-tcp", &tcp).await;
    let refused = tls_client::exchange(tcp_addr, &bare, b"hello", 5).await;
    assert!(
        refused.as_ref().map(Vec::is_empty).unwrap_or(true),
        "{refused:?}"
    );
    assert_eq!(counter.received(), 0);
}

#[tokio::test]
async fn a_positional_array_is_not_a_configuration() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let log = refused_configuration(
        &dir,
        &pki,
        "array",
        filter::http_filter(r#"["sidecar","http","ALLOW"]"#),
    )
    .await;
    assert!(log.contains("invalid configuration"), "{log}");
    assert!(log.contains("is an array"), "{log}");
}

#[tokio::test]
async fn deny_not_principals_refuses_callers_without_identity() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"default_action":"ALLOW","policies":[
        {"name":"require-identity","action":"DENY","rules":[{"from":{"not_principals":["*"]}}]}]}"#;
    let (_envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    assert_eq!(status(addr, &pki.svid(GCP_PEER), "/", &[]).await, 200);
    let two = pki.gcp.issue_with_uris(&[GCP_PEER, ORCHESTRATOR], TTL);
    assert_eq!(status(addr, &two, "/", &[]).await, 403);
    // A plaintext listener: no certificate, no identity.
    let echo = upstream::start_header_echo().await;
    let plain = filter::plaintext_sidecar(filter::http_filter(config), echo);
    let (_plain, plain_addr) = start(&dir, "plaintext", &plain).await;
    let response = trustweave_e2e::http::get(plain_addr, "/", &[])
        .await
        .expect("request");
    assert_eq!(response.status, 403);
    assert_eq!(response.body, "RBAC: access denied");
}

#[tokio::test]
async fn a_trusted_gateway_that_forwards_no_caller_is_not_the_caller() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let gateway = pki.svid(GATEWAY);
    // Same trust domain would allow the gateway itself; it only ever vouches for others.
    assert_eq!(status(addr, &gateway, "/invoices", &[]).await, 403);
    let seen = received(
        &raw(
            addr,
            &gateway,
            "/status",
            "inventory.gcp.internal",
            &[("x-trustweave-action", b"ping")],
        )
        .await,
    );
    assert_eq!(one(&seen, "x-trustweave-caller"), None);
}

#[tokio::test]
async fn baggage_members_the_filter_owns_are_replaced() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let seen = received(
        &raw(
            addr,
            &pki.svid(GCP_PEER),
            "/invoices",
            "inventory.gcp.internal",
            &[(
                "baggage",
                b"cloud.provider=aws,userId=alice,cloud.region=eu-west-9",
            )],
        )
        .await,
    );
    assert_eq!(
        seen.get("baggage").map(Vec::as_slice),
        Some(&["userId=alice,cloud.provider=gcp,cloud.region=us-central1,trustweave.hops=gcp:us-central1".to_string()][..])
    );
}

#[tokio::test]
async fn a_federated_domain_cannot_claim_this_region_in_its_path() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let claimer = pki.svid("spiffe://azure.company.com/region/us-central1/x");
    assert_eq!(status(addr, &claimer, "/x", &[]).await, 403);
    let seen = received(
        &raw(
            addr,
            &claimer,
            "/status",
            "inventory.gcp.internal",
            &[("x-trustweave-action", b"ping")],
        )
        .await,
    );
    assert_eq!(one(&seen, "x-trustweave-caller-region"), Some("eastus"));
}

#[tokio::test]
async fn l4_a_denied_caller_never_reaches_a_server_first_upstream() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let banner = BannerServer::start().await;
    let bootstrap = filter::tcp_with_identity(
        &pki.svid(WORKER),
        &pki.all(),
        filter::istio_filter(filter::SIDECAR_NETWORK),
        banner.addr,
    );
    let (_envoy, addr) = start(&dir, "tcp-banner", &bootstrap).await;
    let refused = tls_client::exchange(addr, &pki.svid(CATALOG), b"x", BANNER.len()).await;
    assert!(
        refused.as_ref().map(Vec::is_empty).unwrap_or(true),
        "the denied caller read {refused:?}"
    );
    assert_eq!(banner.accepted(), 0, "no upstream connection was made");
    let allowed = tls_client::exchange(addr, &pki.svid(GCP_PEER), b"hello", BANNER.len() + 5)
        .await
        .expect("allowed");
    assert_eq!(&allowed[..BANNER.len()], BANNER);
    assert_eq!(&allowed[BANNER.len()..], b"hello");
    assert_eq!(banner.accepted(), 1);
}

#[tokio::test]
async fn paths_are_decided_as_envoy_routes_them() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"default_action":"ALLOW","policies":[
        {"name":"no-admin","action":"DENY","rules":[{"to":{"paths":["/admin","/admin/*"]}}]}]}"#;
    let (_envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    let peer = pki.svid(GCP_PEER);
    for path in [
        "/admin",
        "//admin",
        "/a/../admin",
        "/a/%2e%2e/admin",
        "/admin%2Fsecrets",
        "/admin/./x?y=1",
    ] {
        assert_eq!(status(addr, &peer, path, &[]).await, 403, "{path}");
    }
    assert_eq!(status(addr, &peer, "/public", &[]).await, 200);
}

// The second round of attacks (issue 20, A).

/// A DENY-only policy naming Azure: only a caller that sheds its identity passes.
const DENY_AZURE: &str = r#"{"policies":[{"name":"no-azure","action":"DENY","rules":[{"from":{"trust_domains":["azure.company.com"]}}]}]}"#;

#[tokio::test]
async fn a_caller_cannot_shed_its_identity_behind_client_xfcc_text() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (envoy, addr) = sidecar(&dir, &pki, filter::http_filter(DENY_AZURE)).await;
    let (azure, gcp) = (pki.svid(STRANGER), pki.svid(GCP_PEER));
    let decoys = "Cert=\"x\",".repeat(40);
    let claimed = format!("By={WORKER};Hash={};Cert=\"garbage\"", digest(&azure));
    let other_cert = xfcc_element(WORKER, &gcp).replace(&digest(&gcp), &digest(&azure));
    for prefix in [
        "Cert=\"".to_string(),
        "x=\"".to_string(),
        decoys.clone(),
        claimed,
        other_cert,
    ] {
        let xfcc = [("x-forwarded-client-cert", prefix.as_bytes())];
        assert_eq!(
            status(addr, &azure, "/", &xfcc).await,
            403,
            "Azure behind {prefix:.40}"
        );
        assert_eq!(
            status(addr, &gcp, "/", &xfcc).await,
            200,
            "GCP behind {prefix:.40}"
        );
    }
    let h2 = tls_client::request_h2(
        addr,
        &azure,
        "/",
        &[("x-forwarded-client-cert", decoys.as_bytes())],
    )
    .await
    .expect("HTTP/2");
    assert_eq!(h2, 403, "over HTTP/2");
    assert_no_trap(&envoy);

    // A connection manager without `cert` details: a certificate cannot be
    // verified, so every caller that presents one is denied (and counted).
    let mut bootstrap = worker_bootstrap(&pki, filter::http_filter(DENY_AZURE)).await;
    hcm_config(&mut bootstrap)["set_current_client_cert_details"] =
        serde_json::json!({ "uri": true });
    let (no_cert, addr) = start(&dir, "no-cert-details", &bootstrap).await;
    assert_eq!(status(addr, &gcp, "/", &[]).await, 403);
    assert_eq!(status(addr, &azure, "/", &[]).await, 403);
    assert_eq!(
        filter_counter(&no_cert, "trustweave.unverifiable_peer").await,
        2
    );
}

#[tokio::test]
async fn a_forwarded_caller_counts_only_from_a_sanitizing_gateway() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (sidecar_envoy, sidecar_addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let pass_all = r#"{"placement":"gateway","default_action":"ALLOW"}"#;
    let gateway_filter = filter::gateway_http_filter(pass_all);
    let mut gateway = filter::terminating_gateway(
        &pki.svid(GATEWAY),
        &pki.all(),
        gateway_filter.clone(),
        sidecar_addr,
    );
    // Misconfigured: the gateway appends to what the client sent.
    hcm_config(&mut gateway)["forward_client_cert_details"] = "APPEND_FORWARD".into();
    let (_gateway, gateway_addr) = start(&dir, "append-gateway", &gateway).await;
    // A self-made CA's "orchestrator", written as the gateway would write it.
    let forged = TrustDomainCa::new("aws.company.com").issue_svid(ORCHESTRATOR, TTL);
    let element = xfcc_element(GATEWAY, &forged);
    let response = raw(
        gateway_addr,
        &pki.svid(STRANGER),
        "/jobs",
        "inventory.gcp.internal",
        &[("x-forwarded-client-cert", element.as_bytes())],
    )
    .await;
    assert_eq!(response.status, 403, "{response:?}");
    assert!(filter_counter(&sidecar_envoy, "trustweave.forwarded_refused").await >= 1);

    // Through a SANITIZE_SET gateway the real orchestrator is forwarded.
    let gateway =
        filter::terminating_gateway(&pki.svid(GATEWAY), &pki.all(), gateway_filter, sidecar_addr);
    let (_gateway, gateway_addr) = start(&dir, "gateway", &gateway).await;
    let seen = received(&call(gateway_addr, &pki.svid(ORCHESTRATOR), "/jobs", &[]).await);
    assert_eq!(one(&seen, "x-trustweave-caller"), Some(ORCHESTRATOR));
}

#[tokio::test]
async fn underscore_spellings_of_owned_headers_never_reach_the_app() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let spoofed: &[(&str, &[u8])] = &[
        ("x_trustweave_caller", ORCHESTRATOR.as_bytes()),
        (
            "x_forwarded_client_cert",
            b"By=x;URI=spiffe://aws.company.com/ns/ops/sa/orchestrator",
        ),
    ];
    // The shipped connection manager drops them; without it, the filter does.
    let shipped = worker_bootstrap(&pki, shipped_sidecar_filter()).await;
    let mut bare = worker_bootstrap(&pki, shipped_sidecar_filter()).await;
    hcm_config(&mut bare)
        .as_object_mut()
        .expect("hcm")
        .remove("common_http_protocol_options");
    for (name, bootstrap) in [("shipped-hcm", shipped), ("bare-hcm", bare)] {
        let (_envoy, addr) = start(&dir, name, &bootstrap).await;
        let response = raw(
            addr,
            &pki.svid(GCP_PEER),
            "/invoices",
            "inventory.gcp.internal",
            spoofed,
        )
        .await;
        let seen = received(&response);
        for header in ["x_trustweave_caller", "x_forwarded_client_cert"] {
            assert_eq!(one(&seen, header), None, "{name}: {seen:?}");
        }
        assert_eq!(one(&seen, "x-trustweave-caller"), Some(GCP_PEER), "{name}");
    }
}

#[tokio::test]
async fn more_than_one_host_is_denied() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"default_action":"ALLOW","policies":[
        {"name":"no-admin","action":"DENY","rules":[{"to":{"hosts":["admin.example.com"]}}]}]}"#;
    let (_envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    let peer = pki.svid(GCP_PEER);
    let one_host = raw(addr, &peer, "/", "shop.example.com", &[]).await;
    assert_eq!(one_host.status, 200);
    let two = raw(addr, &peer, "/", "admin.example.com", &[("host", b"x")]).await;
    assert_eq!(two.status, 403, "{two:?}");
    let two = raw(addr, &peer, "/", "x", &[("host", b"admin.example.com")]).await;
    assert_eq!(two.status, 403, "{two:?}");
}

#[tokio::test]
async fn owned_baggage_members_go_in_every_configuration() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"baggage":false,"default_action":"ALLOW"}"#;
    let (_envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    let sent: &[u8] =
        b"userId=alice,cloud.provider=aws,cloud.region=us-east-1,trustweave.hops=aws:us-east-1";
    let response = raw(
        addr,
        &pki.svid(GCP_PEER),
        "/",
        "inventory.gcp.internal",
        &[("baggage", sent)],
    )
    .await;
    let seen = received(&response);
    assert_eq!(one(&seen, "baggage"), Some("userId=alice"), "{seen:?}");
}

#[tokio::test]
async fn a_denied_request_is_logged_with_its_real_caller() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let log = dir.path().join("access.log");
    let mut bootstrap = worker_bootstrap(&pki, shipped_sidecar_filter()).await;
    hcm_config(&mut bootstrap)["access_log"] = serde_json::json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": log,
            "log_format": { "text_format_source": { "inline_string": "caller=%REQ(X-TRUSTWEAVE-CALLER)% status=%RESPONSE_CODE%\n" } }
        }
    }]);
    let (_envoy, addr) = start(&dir, "logged", &bootstrap).await;
    let claimed = [("x-trustweave-caller", ORCHESTRATOR.as_bytes())];
    assert_eq!(
        status(addr, &pki.svid(STRANGER), "/jobs", &claimed).await,
        403
    );
    trustweave_e2e::wait::wait_until(
        "the access log line",
        std::time::Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { text.contains("status=403") }
        },
    )
    .await;
    let text = std::fs::read_to_string(&log).expect("access log");
    assert!(
        text.contains(&format!("caller={STRANGER} status=403")),
        "{text}"
    );
    assert!(!text.contains(ORCHESTRATOR), "{text}");
}

#[tokio::test]
async fn a_duplicate_key_is_a_configuration_error() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"policies":[{"name":"a","action":"DENY","rules":[{}],"action":"ALLOW"}]}"#;
    let log = refused_configuration(&dir, &pki, "duplicate", filter::http_filter(config)).await;
    assert!(log.contains("duplicate key `policies[0].action`"), "{log}");
}

#[tokio::test]
async fn a_trapped_vm_is_replaced_and_fails_closed_until_it_is() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    // The shipped entry (its failure_policy from istio/), running the test module that traps on demand.
    let shipped = shipped_sidecar_filter();
    assert_eq!(
        shipped["typed_config"]["config"]["failure_policy"], "FAIL_RELOAD",
        "the shipped failure policy"
    );
    let entry = filter::with_module(shipped, &filter::trap_wasm_path(), "trustweave-trap");
    let (envoy, addr) = sidecar(&dir, &pki, entry).await;
    let (peer, stranger) = (pki.svid(GCP_PEER), pki.svid(STRANGER));
    assert_eq!(status(addr, &peer, "/invoices", &[]).await, 200);
    let trapped = status(
        addr,
        &peer,
        "/invoices",
        &[("x-trustweave-test-trap", b"1")],
    )
    .await;
    assert_ne!(trapped, 200, "the trapping request fails closed");
    // Until the VM is replaced, nothing is allowed that the policy denies; then it decides again.
    let while_reloading = std::cell::RefCell::new(Vec::new());
    trustweave_e2e::wait::wait_until(
        "the VM replaced",
        std::time::Duration::from_secs(20),
        || async {
            let denied = status(addr, &stranger, "/x", &[]).await;
            while_reloading.borrow_mut().push(denied);
            status(addr, &peer, "/invoices", &[]).await == 200
        },
    )
    .await;
    let while_reloading = while_reloading.into_inner();
    assert!(
        while_reloading.iter().all(|s| *s != 200),
        "{while_reloading:?}"
    );
    assert_eq!(status(addr, &stranger, "/x", &[]).await, 403);
    // Not vacuous: the VM trapped, and a new one was configured after it.
    let log = envoy.log();
    let trap = log
        .find("proxy_on_request_headers failed")
        .unwrap_or_else(|| panic!("no trap in Envoy's log:\n{log}"));
    assert!(log[trap..].contains("configured: Sidecar Http"), "{log}");
}
