//! Private keys never appear in logs, errors, `Debug` output, metrics or `inspect`.
//!
//! Everything the server logs (at TRACE) through a busy life — streams, NACKs,
//! rotations, an agent outage, failed fetches — is captured and grepped for
//! every private key it ever held, in DER hex, base64 and PEM form.
//!
//! Uses the Workload API stand-in: the test must know every private key the
//! agent ever handed out, which only an agent it controls can tell it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use trustweave_e2e::http;
use trustweave_e2e::pki::{IssuedSvid, TrustDomainCa};
use trustweave_e2e::sds::{self, DeltaClient, SotwClient};
use trustweave_e2e::workload_api::WorkloadApiStandIn;
use trustweave_sds::render::SECRET_TYPE_URL;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn forms_of(svid: &IssuedSvid) -> Vec<String> {
    let pem = svid.key_pem();
    // Any full line of the PEM body is proof of a leak.
    let mut forms: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_string)
        .collect();
    forms.push(hex::encode(&svid.key_der));
    // `Debug` of a byte slice, as printed inside any larger message: DER, and each PEM body line.
    let byte_list = |bytes: &[u8]| format!("{bytes:?}").trim_matches(['[', ']']).to_string();
    let lines: Vec<String> = forms
        .iter()
        .map(|line| byte_list(line.as_bytes()))
        .collect();
    forms.extend(lines);
    forms.push(byte_list(&svid.key_der));
    forms
}

#[tokio::test]
async fn private_keys_never_appear_in_logs_errors_debug_metrics_or_inspect() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let dir = sds::socket_dir();
    let ca = Arc::new(TrustDomainCa::new("aws.company.com"));
    let id = "spiffe://aws.company.com/ns/payments/sa/api";
    let agent = WorkloadApiStandIn::start(
        sds::path_in(&dir, "agent.sock"),
        ca,
        id,
        Duration::from_secs(3600),
    )
    .await;
    let socket = sds::path_in(&dir, "sds.sock");
    let server = sds::start_ready(sds::test_config(&socket, &agent.endpoint())).await;
    let mut keys = vec![agent.current_svid()];

    let mut sotw = SotwClient::open(&socket).await;
    sotw.request(&["default", "ROOTCA", id], None).await;
    sotw.next().await;
    sotw.nack(
        &["default", "ROOTCA", id],
        "private key does not match certificate",
    )
    .await;
    keys.push(agent.rotate_now());
    sotw.next().await;
    let mut delta = DeltaClient::open(&socket).await;
    delta.change(&["default"], &[]).await;
    delta.next().await;

    agent.stop_serving().await;
    let mut errors = Vec::new();
    let mut client = sds::client(&socket).await;
    for names in [
        vec!["spiffe://missing.example".to_string()],
        vec!["default".into()],
    ] {
        let result = client
            .fetch_secrets(DiscoveryRequest {
                resource_names: names,
                type_url: SECRET_TYPE_URL.into(),
                ..Default::default()
            })
            .await;
        match result {
            Ok(response) => errors.push(format!("{:?}", response.get_ref().version_info)),
            Err(status) => errors.push(format!("{status:?} {status}")),
        }
    }
    agent.start_serving();
    keys.push(agent.rotate_now());
    sotw.request(&["default", "ROOTCA", id], None).await;
    sotw.next().await;

    let snapshot_debug = format!("{:?}", server.snapshots().borrow());
    let metrics = http::get(server.admin_addr().expect("admin"), "/metrics", &[])
        .await
        .expect("metrics")
        .body;
    let reports = trustweave_sds::inspect::inspect(&socket, &["default".into(), "ROOTCA".into()])
        .await
        .expect("inspect");
    let inspect_out = format!(
        "{}{}",
        serde_json::to_string(&reports).expect("json"),
        trustweave_sds::inspect::to_text(&reports)
    );
    server.shutdown().await;

    let logs = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
    assert!(logs.contains("NACK"), "the NACK was logged:\n{logs}");
    assert!(logs.contains("X.509-SVID updated"), "rotations were logged");
    assert!(snapshot_debug.contains("<redacted>"));
    for (what, text) in [
        ("logs", &logs),
        ("errors", &errors.join("\n")),
        ("Debug output", &snapshot_debug),
        ("metrics", &metrics),
        ("inspect", &inspect_out),
    ] {
        for key in &keys {
            for form in forms_of(key) {
                assert!(!text.contains(&form), "a private key appears in {what}");
            }
        }
    }
}
