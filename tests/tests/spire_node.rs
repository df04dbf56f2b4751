//! Node mode against the real SPIRE 1.13 server and agent: trustweave-sds is
//! the agent's authorized delegate (its own entry, by its binary's path), and
//! every Envoy runs as its own UID, registered with `unix:uid:N` as the guide
//! registers workloads. What SPIRE grants — and stops granting — is what each
//! Envoy is served.
//!
//! One test, one SPIRE: the steps share the server and agent (a SPIRE start
//! and its entry sync take seconds).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use trustweave_e2e::envoy::{self, normalize_serial, Envoy, PEER_HEADER};
use trustweave_e2e::http;
use trustweave_e2e::mesh::node_sds;
use trustweave_e2e::real_spire::{SpireAgent, SpireServer};
use trustweave_e2e::sds;
use trustweave_e2e::wait::wait_until;
use trustweave_sds::RunningServer;

const TD: &str = "aws.company.com";
const AGENT_ID: &str = "spiffe://aws.company.com/agent/node-1";
const DELEGATE_ID: &str = "spiffe://aws.company.com/ns/spire/sa/trustweave-sds";
const SERVER_ID: &str = "spiffe://aws.company.com/ns/orders/sa/server";
const CLIENT_ID: &str = "spiffe://aws.company.com/ns/checkout/sa/client";
const INSPECT_ID: &str = "spiffe://aws.company.com/ns/ops/sa/inspector";
const SERVER_UID: u32 = 1101;
const CLIENT_UID: u32 = 1102;
const INSPECT_UID: u32 = 1103;
const UNREGISTERED_UID: u32 = 1104;

fn open_to_all(path: &Path) {
    std::fs::create_dir_all(path).expect("dir");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
}

fn served_serial(sds: &RunningServer, pid: u32) -> Option<String> {
    sds.workloads()
        .into_iter()
        .find(|w| w.pid == pid)
        .and_then(|w| w.serial)
}

/// Waits until the node serves `envoy` an SVID and Envoy holds it; its serial.
async fn served_and_held(sds: &RunningServer, envoy: &Envoy) -> String {
    let pid = envoy.pid().expect("running");
    wait_until("SPIRE's SVID served", Duration::from_secs(30), || {
        let found = served_serial(sds, pid).is_some();
        async move { found }
    })
    .await;
    let serial = normalize_serial(&served_serial(sds, pid).expect("serial"));
    wait_until(
        "the SVID in Envoy's /certs",
        Duration::from_secs(10),
        || async { envoy.cert_serials().await.contains(&serial) },
    )
    .await;
    serial
}

/// `trustweave-sds inspect` (FetchSecrets) run as `uid`: the SPIFFE ID of its
/// `default`, or the error it printed.
async fn inspect_as(uid: u32, socket: &Path) -> Result<String, String> {
    let output = tokio::process::Command::new(envoy::runnable_by_others(&node_sds::binary()))
        .args(["inspect", "--json", "--name", "default", "--sds-socket"])
        .arg(socket)
        .uid(uid)
        .gid(uid)
        .output()
        .await
        .expect("run inspect");
    let reports: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&output.stderr)))?;
    let report = &reports[0];
    match report["certificates"][0]["spiffe_ids"][0].as_str() {
        Some(id) => Ok(id.to_string()),
        None => Err(report["error"].as_str().unwrap_or("no error").to_string()),
    }
}

async fn call(envoy: &Envoy) -> http::HttpResponse {
    let addr: SocketAddr = envoy.listener(envoy::PLAIN_LISTENER).await;
    http::get(addr, "/", &[])
        .await
        .expect("request through client Envoy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_mode_serves_what_the_real_spire_agent_grants() {
    let root = sds::socket_dir();
    let mut server = SpireServer::start(&root.path().join("srv"), TD)
        .await
        .expect("spire-server");
    let mut agent = SpireAgent::start(&server, &root.path().join("ag"), AGENT_ID, &[DELEGATE_ID])
        .await
        .expect("spire-agent");
    // The delegate is this test process (trustweave-sds runs in it), by its binary.
    let exe = std::fs::canonicalize(std::env::current_exe().expect("exe")).expect("exe path");
    let by_path = format!("unix:path:{}", exe.display());
    server
        .create_entry(AGENT_ID, DELEGATE_ID, &[&by_path], &[])
        .await
        .expect("delegate entry");
    let mut entries = Vec::new();
    for (id, uid) in [
        (SERVER_ID, SERVER_UID),
        (CLIENT_ID, CLIENT_UID),
        (INSPECT_ID, INSPECT_UID),
    ] {
        let selector = format!("unix:uid:{uid}");
        entries.push(
            server
                .create_entry(AGENT_ID, id, &[&selector], &[])
                .await
                .expect("workload entry"),
        );
    }

    let node_dir = root.path().join("node");
    open_to_all(root.path());
    open_to_all(&node_dir);
    let socket = node_dir.join("socket");
    let mut config = sds::node_config(&socket, &format!("unix:{}", agent.admin_socket()));
    config.socket_mode = 0o666;
    config.allowed_uids = vec![SERVER_UID, CLIENT_UID, INSPECT_UID, UNREGISTERED_UID];
    let sds = trustweave_sds::start(config).await.expect("trustweave-sds");
    // The agent learns the delegate's entry at its next sync (about 5 s).
    wait_until(
        "the agent's bundles reach trustweave-sds",
        Duration::from_secs(30),
        || async { sds.is_ready() },
    )
    .await;

    // 1. Each Envoy holds the SVID SPIRE issued for its UID; mTLS between them.
    let server_envoy = Envoy::start_as_user(
        SERVER_UID,
        "server",
        &node_dir,
        &envoy::server_bootstrap("server", &socket),
    )
    .await;
    server_envoy.wait_live().await;
    let upstream = server_envoy.listener(envoy::MTLS_LISTENER).await;
    let client_envoy = Envoy::start_as_user(
        CLIENT_UID,
        "client",
        &node_dir,
        &envoy::client_bootstrap("client", &socket, upstream, "spiffe://aws.company.com/"),
    )
    .await;
    client_envoy.wait_live().await;
    let server_serial = served_and_held(&sds, &server_envoy).await;
    let client_serial = served_and_held(&sds, &client_envoy).await;
    assert_ne!(server_serial, client_serial);
    let report = sds.workloads();
    let id_of = |pid: u32| {
        report
            .iter()
            .find(|w| w.pid == pid)
            .and_then(|w| w.spiffe_id.clone())
    };
    assert_eq!(
        id_of(server_envoy.pid().expect("pid")).as_deref(),
        Some(SERVER_ID)
    );
    assert_eq!(
        id_of(client_envoy.pid().expect("pid")).as_deref(),
        Some(CLIENT_ID)
    );
    let ok = call(&client_envoy).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header(PEER_HEADER), Some(CLIENT_ID));

    // 2. FetchSecrets in node mode (a process of its own each time): its SVID;
    // a UID no entry matches gets none.
    assert_eq!(
        inspect_as(INSPECT_UID, &socket).await,
        Ok(INSPECT_ID.to_string())
    );
    assert!(inspect_as(UNREGISTERED_UID, &socket).await.is_err());

    // 3. The agent restarts: the node keeps serving (last good across the
    // outage), and the restarted agent's new SVIDs (its cache is in memory:
    // it mints them again) reach every Envoy.
    agent.stop().await;
    assert_eq!(
        served_serial(&sds, server_envoy.pid().expect("pid")).map(|s| normalize_serial(&s)),
        Some(server_serial.clone()),
        "kept while the agent is down"
    );
    assert_eq!(call(&client_envoy).await.status, 200);
    agent.restart(&server).await.expect("agent restart");
    wait_until(
        "the restarted agent's SVID served",
        Duration::from_secs(30),
        || {
            let pid = server_envoy.pid().expect("pid");
            let changed =
                served_serial(&sds, pid).is_some_and(|s| normalize_serial(&s) != server_serial);
            async move { changed }
        },
    )
    .await;
    served_and_held(&sds, &server_envoy).await;
    served_and_held(&sds, &client_envoy).await;
    let ok = call(&client_envoy).await;
    assert_eq!(
        ok.status, 200,
        "calls pass across the agent restart: {ok:?}"
    );
    wait_until(
        "fetch works after the agent restart",
        Duration::from_secs(30),
        || async { inspect_as(INSPECT_UID, &socket).await.is_ok() },
    )
    .await;

    // 4. The SPIRE server stops: the agent keeps serving, so does the node.
    server.stop().await;
    assert_eq!(
        inspect_as(INSPECT_UID, &socket).await,
        Ok(INSPECT_ID.to_string())
    );
    assert_eq!(call(&client_envoy).await.status, 200);
    server.restart().await.expect("server restart");

    // 5. The client's entry is deleted while its Envoy is connected: SPIRE sends
    // an empty update on the open subscription, and the node withdraws the SVID.
    server
        .delete_entry(&entries[1])
        .await
        .expect("delete entry");
    let client_pid = client_envoy.pid().expect("pid");
    wait_until(
        "the deleted entry's SVID withdrawn",
        Duration::from_secs(30),
        || {
            let gone = served_serial(&sds, client_pid).is_none();
            async move { gone }
        },
    )
    .await;
    assert!(
        served_serial(&sds, server_envoy.pid().expect("pid")).is_some(),
        "the other workload is untouched"
    );
    let metrics = http::get(sds.admin_addr().expect("admin"), "/metrics", &[])
        .await
        .expect("metrics");
    assert!(
        metrics
            .body
            .contains("trustweave_sds_attestation_failures_total{reason=\"withdrawn\"} 1"),
        "{}",
        metrics.body
    );
    drop(agent);
}
