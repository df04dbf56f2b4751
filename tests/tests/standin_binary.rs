//! The `workload-api-standin` binary as documented: agents on sockets, federation
//! between listed trust domains, SIGHUP rotates; read with the `spiffe` crate's client.

use std::process::Stdio;
use std::time::Duration;

use spiffe::WorkloadApiClient;
use tokio::process::Command;
use trustweave_e2e::sds;
use trustweave_e2e::wait::wait_until;

async fn context(socket: &std::path::Path) -> Option<spiffe::X509Context> {
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .ok()?;
    client.fetch_x509_context().await.ok()
}

fn serial(context: &spiffe::X509Context) -> Vec<u8> {
    context.svids()[0].leaf().as_ref().to_vec()
}

#[tokio::test]
async fn serves_federated_agents_and_rotates_on_sighup() {
    let dir = sds::socket_dir();
    let aws = dir.path().join("aws.sock");
    let gcp = dir.path().join("gcp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_workload-api-standin"))
        .arg("--agent")
        .arg(format!(
            "{}=spiffe://aws.company.com/ns/a/sa/client",
            aws.display()
        ))
        .arg("--agent")
        .arg(format!(
            "{}=spiffe://gcp.company.com/ns/b/sa/server",
            gcp.display()
        ))
        .args(["--federate", "aws.company.com,gcp.company.com"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run workload-api-standin");
    wait_until("both agents serve", Duration::from_secs(10), || async {
        context(&aws).await.is_some() && context(&gcp).await.is_some()
    })
    .await;
    let first = context(&aws).await.expect("aws context");
    assert_eq!(
        first.svids()[0].spiffe_id().to_string(),
        "spiffe://aws.company.com/ns/a/sa/client"
    );
    let mut domains: Vec<String> = first
        .bundle_set()
        .iter()
        .map(|(td, _)| td.to_string())
        .collect();
    domains.sort();
    assert_eq!(
        domains,
        vec!["aws.company.com", "gcp.company.com"],
        "own and federated bundles"
    );

    let pid = child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_until(
        "SIGHUP rotated the SVID",
        Duration::from_secs(10),
        || async {
            context(&aws)
                .await
                .is_some_and(|c| serial(&c) != serial(&first))
        },
    )
    .await;
    let _ = child.start_kill();
}

#[tokio::test]
async fn a_bad_agent_spec_is_refused_with_its_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_workload-api-standin"))
        .args(["--agent", "/tmp/x.sock=not-a-spiffe-id"])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--agent") && err.contains("not a SPIFFE ID"),
        "{err}"
    );
}
