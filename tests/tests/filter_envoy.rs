//! trustweave-filter loaded into real Envoy 1.40 (V8): authorization per policy,
//! annotation, anti-spoofing, forwarded callers, dry run, fail-closed
//! configuration, L4 enforcement and the passthrough SNI allowlist.

use std::time::Duration;

use trustweave_e2e::envoy::Envoy;
use trustweave_e2e::filter;
use trustweave_e2e::filter_fixture::*;
use trustweave_e2e::sds;
use trustweave_e2e::tls_client;
use trustweave_e2e::upstream::ByteCounter;
use trustweave_e2e::wait::wait_until;

#[tokio::test]
async fn sidecar_enforces_the_multi_cloud_policy_and_annotates() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;

    // Same trust domain: allowed, annotated, W3C baggage appended.
    let seen = received(
        &call(
            addr,
            &pki.svid(GCP_PEER),
            "/invoices",
            &[("baggage", "userId=alice")],
        )
        .await,
    );
    assert_eq!(one(&seen, "x-trustweave-caller"), Some(GCP_PEER));
    assert_eq!(
        one(&seen, "x-trustweave-caller-trust-domain"),
        Some("gcp.company.com")
    );
    assert_eq!(one(&seen, "x-trustweave-caller-cloud"), Some("gcp"));
    assert_eq!(
        one(&seen, "x-trustweave-caller-region"),
        Some("us-central1")
    );
    assert_eq!(one(&seen, "x-trustweave-cloud"), Some("gcp"));
    assert_eq!(one(&seen, "x-trustweave-region"), Some("us-central1"));
    assert_eq!(
        one(&seen, "baggage"),
        Some("userId=alice,cloud.provider=gcp,cloud.region=us-central1,trustweave.hops=gcp:us-central1")
    );
    assert_eq!(
        one(&seen, "x-forwarded-client-cert"),
        None,
        "XFCC is not passed to the app"
    );

    // A federated caller only for its listed actions.
    let catalog = pki.svid(CATALOG);
    let seen = received(
        &call(
            addr,
            &catalog,
            "/items",
            &[("x-trustweave-action", "inventory.read")],
        )
        .await,
    );
    assert_eq!(one(&seen, "x-trustweave-caller-cloud"), Some("aws"));
    let denied = call(
        addr,
        &catalog,
        "/items",
        &[("x-trustweave-action", "inventory.write")],
    )
    .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body, "RBAC: access denied");

    // The orchestrator may call central workers (this sidecar's own SPIFFE ID matches).
    received(&call(addr, &pki.svid(ORCHESTRATOR), "/jobs", &[]).await);

    // Health actions from anyone; nothing else for a stranger.
    let stranger = pki.svid(STRANGER);
    received(
        &call(
            addr,
            &stranger,
            "/status",
            &[("x-trustweave-action", "ping")],
        )
        .await,
    );
    assert_eq!(call(addr, &stranger, "/status", &[]).await.status, 403);
}

#[tokio::test]
async fn spoofed_headers_are_stripped_and_xfcc_from_untrusted_peers_ignored() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let stranger = pki.svid(STRANGER);
    let spoof_xfcc = format!("URI={ORCHESTRATOR}");
    let seen = received(
        &call(
            addr,
            &stranger,
            "/status",
            &[
                ("x-trustweave-action", "ping"),
                ("x-trustweave-caller", ORCHESTRATOR),
                ("x-trustweave-caller-region", "us-central1"),
                ("x-forwarded-client-cert", &spoof_xfcc),
            ],
        )
        .await,
    );
    assert_eq!(one(&seen, "x-trustweave-caller"), Some(STRANGER));
    assert_eq!(seen.get("x-trustweave-caller").map(Vec::len), Some(1));
    assert_eq!(
        one(&seen, "x-trustweave-caller-region"),
        Some("eastus"),
        "from the trust-domain map, not the request"
    );
    assert_eq!(one(&seen, "x-forwarded-client-cert"), None);
    // The forged forwarded caller grants nothing.
    let denied = call(
        addr,
        &stranger,
        "/jobs",
        &[("x-forwarded-client-cert", &spoof_xfcc)],
    )
    .await;
    assert_eq!(denied.status, 403);
}

#[tokio::test]
async fn a_certificate_with_two_uri_sans_has_no_identity() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_envoy, addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    // First URI SAN in this sidecar's own trust domain: the same-trust-domain rule would allow it.
    let two = pki.gcp.issue_with_uris(&[GCP_PEER, ORCHESTRATOR], TTL);
    assert_eq!(call(addr, &two, "/invoices", &[]).await.status, 403);
    // Anonymous-safe actions still work, without any caller annotation.
    let seen = received(
        &call(
            addr,
            &two,
            "/status",
            &[("x-trustweave-action", "health_check")],
        )
        .await,
    );
    assert_eq!(one(&seen, "x-trustweave-caller"), None);
    // The same identity with one URI SAN is allowed.
    received(&call(addr, &pki.svid(GCP_PEER), "/invoices", &[]).await);
}

#[tokio::test]
async fn a_terminating_gateway_forwards_the_verified_caller_to_a_trusting_sidecar() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let (_sidecar, sidecar_addr) = sidecar(&dir, &pki, shipped_sidecar_filter()).await;
    let gateway = filter::terminating_gateway(
        &pki.svid(GATEWAY),
        &pki.all(),
        filter::istio_filter(filter::GATEWAY_HTTP),
        sidecar_addr,
    );
    let (_gateway, gateway_addr) = start(&dir, "gateway", &gateway).await;

    // The sidecar decides on the caller the gateway verified, not on the gateway.
    let seen = received(&call(gateway_addr, &pki.svid(ORCHESTRATOR), "/jobs", &[]).await);
    assert_eq!(one(&seen, "x-trustweave-caller"), Some(ORCHESTRATOR));
    assert_eq!(one(&seen, "x-trustweave-caller-cloud"), Some("aws"));
    let catalog = pki.svid(CATALOG);
    let denied = call(
        gateway_addr,
        &catalog,
        "/items",
        &[("x-trustweave-action", "inventory.write")],
    )
    .await;
    assert_eq!(
        denied.status, 403,
        "denied at the sidecar for the forwarded caller"
    );
    // The gateway itself refuses what its own policy does not allow.
    let refused = call(gateway_addr, &pki.svid(GCP_PEER), "/invoices", &[]).await;
    assert_eq!(refused.status, 403);
}

#[tokio::test]
async fn dry_run_is_counted_in_envoy_stats_but_not_enforced() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config = r#"{"default_action":"ALLOW","deny_policy_header":"x-trustweave-denied-by","policies":[
        {"name":"shadow-no-aws","action":"DENY","dry_run":true,"rules":[{"from":{"trust_domains":["aws.company.com"]}}]},
        {"name":"no-azure","action":"DENY","rules":[{"from":{"trust_domains":["azure.company.com"]}}]}]}"#;
    let (envoy, addr) = sidecar(&dir, &pki, filter::http_filter(config)).await;
    let seen = received(&call(addr, &pki.svid(CATALOG), "/items", &[]).await);
    // No `local` in this config: this hop's place comes from Envoy's node.
    assert_eq!(one(&seen, "x-trustweave-region"), Some("us-central1"));
    assert_eq!(one(&seen, "x-trustweave-cloud"), Some("gcp"));
    let denied = call(addr, &pki.svid(STRANGER), "/items", &[]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-trustweave-denied-by"), Some("no-azure"));
    let stats = envoy.admin_get("/stats?filter=trustweave").await;
    let value = |suffix: &str| {
        stats
            .lines()
            .find(|l| l.contains(suffix))
            .and_then(|l| l.rsplit(": ").next())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert_eq!(
        value("trustweave.policy.shadow-no-aws.dry_run_would_deny:"),
        Some(1),
        "{stats}"
    );
    assert_eq!(
        value("trustweave.policy.no-azure.denied:"),
        Some(1),
        "{stats}"
    );
    assert_eq!(value("trustweave.allowed:"), Some(1), "{stats}");
}

#[tokio::test]
async fn an_invalid_configuration_fails_closed_naming_the_field() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let config =
        r#"{"policies":[{"name":"ok","action":"ALLOW","rules":[{"to":{"methods":["get"]}}]}]}"#;
    let log = refused_configuration(&dir, &pki, "invalid", filter::http_filter(config)).await;
    assert!(log.contains("policies[0].rules[0].to.methods[0]"), "{log}");
    assert!(log.contains("invalid configuration"), "{log}");
}

#[tokio::test]
async fn l4_deny_closes_the_connection_before_any_byte_reaches_the_upstream() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let counter = ByteCounter::start().await;
    // The shipped L4 policy: same trust domain as this (GCP) workload only.
    let bootstrap = filter::tcp_with_identity(
        &pki.svid(WORKER),
        &pki.all(),
        filter::istio_filter(filter::SIDECAR_NETWORK),
        counter.addr,
    );
    let (envoy, addr) = start(&dir, "tcp", &bootstrap).await;
    let echoed = tls_client::exchange(addr, &pki.svid(GCP_PEER), b"hello", 5)
        .await
        .expect("allowed");
    assert_eq!(echoed, b"hello", "the allowed caller reaches the upstream");
    assert_eq!(counter.received(), 5);
    let refused = tls_client::exchange(addr, &pki.svid(CATALOG), b"secret", 6).await;
    assert!(
        refused.as_ref().map(|b| b.is_empty()).unwrap_or(true),
        "closed, nothing answered: {refused:?}"
    );
    wait_until("the denial is counted", Duration::from_secs(5), || async {
        envoy
            .admin_get("/stats?filter=trustweave.denied")
            .await
            .contains("trustweave.denied: 1")
    })
    .await;
    assert_eq!(
        counter.received(),
        5,
        "no byte of the denied connection reached the upstream"
    );
}

/// A port whose protocol Istio auto-detects has a TCP chain beside its HTTP
/// chain (mTLS without Istio's HTTP ALPN). The caller policy holds on it with
/// every install path's TCP enforcer: the L4 filter (EnvoyFilter and file
/// paths) and the RBAC filter (OCI and Rego paths); the HTTP chain stays the
/// HTTP policy's (a federated caller keeps its actions there).
#[tokio::test]
async fn the_tcp_chain_of_an_auto_detected_port_enforces_the_caller_policy() {
    let enforcers = [
        (
            filter::istio_filter(filter::SIDECAR_NETWORK),
            filter::SIDECAR_NETWORK,
            "trustweave.denied",
        ),
        (
            filter::istio_tcp_filter(filter::SIDECAR_TCP_RBAC),
            filter::SIDECAR_TCP_RBAC,
            "trustweave_tcp.rbac.denied",
        ),
    ];
    for (tcp_filter, tcp_file, denied_stat) in enforcers {
        let pki = Pki::new();
        let dir = sds::socket_dir();
        let counter = ByteCounter::start().await;
        let echo = trustweave_e2e::upstream::start_header_echo().await;
        let bootstrap = filter::auto_detected_port(
            &pki.svid(WORKER),
            &pki.all(),
            (shipped_sidecar_filter(), echo),
            (tcp_filter, tcp_file, counter.addr),
        );
        let (envoy, addr) = start(&dir, "auto", &bootstrap).await;

        // HTTP chain: the federated caller's listed action is allowed.
        let http = tls_client::request_with_alpn(
            addr,
            &pki.svid(CATALOG),
            b"istio-http/1.1",
            "/items",
            &[("x-trustweave-action", "inventory.read")],
        )
        .await
        .expect("HTTP chain");
        assert_eq!(
            one(&received(&http), "x-trustweave-caller"),
            Some(CATALOG),
            "{tcp_file}: the HTTP chain decides by the HTTP policy"
        );

        // TCP chain: same trust domain through, the federated caller refused.
        let echoed = tls_client::exchange(addr, &pki.svid(GCP_PEER), b"hello", 5)
            .await
            .expect("allowed");
        assert_eq!(echoed, b"hello", "{tcp_file}: the same trust domain passes");
        let refused = tls_client::exchange(addr, &pki.svid(CATALOG), b"inventory.read", 14).await;
        assert!(
            refused.as_ref().map(|b| b.is_empty()).unwrap_or(true),
            "{tcp_file}: closed, nothing answered: {refused:?}"
        );
        wait_until(
            &format!("{tcp_file}: the denial is counted ({denied_stat})"),
            Duration::from_secs(5),
            || async {
                envoy
                    .admin_get(&format!("/stats?filter={denied_stat}"))
                    .await
                    .contains(&format!("{denied_stat}: 1"))
            },
        )
        .await;
        assert_eq!(
            counter.received(),
            5,
            "{tcp_file}: no byte of the refused connection reached the app"
        );
    }
}

#[tokio::test]
async fn passthrough_gateway_allows_only_exported_snis() {
    let pki = Pki::new();
    let dir = sds::socket_dir();
    let open = r#"{"default_action":"ALLOW"}"#;
    let (_sidecar, sidecar_addr) = sidecar(&dir, &pki, filter::http_filter(open)).await;
    // The shipped allowlist: one named service, and everything in namespace `exported`.
    let exported = "outbound_.8080_._.inventory.shop.svc.cluster.local";
    let hidden = "outbound_.9090_._.secrets.vault.svc.cluster.local";
    let by_namespace = "outbound_.443_._.reports.exported.svc.cluster.local";
    let gateway =
        filter::passthrough_gateway(filter::istio_filter(filter::GATEWAY_SNI), sidecar_addr);
    let (gateway, gateway_addr) = start(&dir, "passthrough", &gateway).await;
    let client = filter::sni_client(
        &pki.svid(CATALOG),
        &pki.all(),
        gateway_addr,
        &[exported, hidden, by_namespace],
    );
    let client = Envoy::start("client", dir.path(), &client).await;
    client.wait_live().await;
    let through = trustweave_e2e::http::get(client.listener("sni0").await, "/", &[])
        .await
        .expect("request");
    assert_eq!(through.status, 200, "{through:?}");
    let blocked = trustweave_e2e::http::get(client.listener("sni1").await, "/", &[])
        .await
        .expect("request");
    assert_eq!(blocked.status, 503, "{blocked:?}");
    let namespace = trustweave_e2e::http::get(client.listener("sni2").await, "/", &[])
        .await
        .expect("request");
    assert_eq!(namespace.status, 200, "{namespace:?}");
    let stats = gateway.admin_get("/stats?filter=trustweave.sni").await;
    assert!(stats.contains("trustweave.sni_allowed: 2"), "{stats}");
    assert!(stats.contains("trustweave.sni_denied: 1"), "{stats}");
}
