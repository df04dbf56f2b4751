//! The SDS fan-out benchmark's parts: Envoy-like clients (one connection each,
//! one SotW stream per secret name, every response ACKed), and the figures.
//!
//! Clients run in separate processes (`bench-sds client`), each process one
//! workload (one PID, as node mode attests), each printing one line per
//! response received: `<name> <unix nanos>`. The coordinator reads those lines
//! to time an update from the moment it was made to each stream's receipt.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trustweave_sds::render::SECRET_TYPE_URL;

/// Secret names each client subscribes to, one stream each (as Istio's Envoy does).
pub const NAMES: [&str; 2] = ["default", "ROOTCA"];

/// What a client prints, before the name, when a stream of that name ends: `ended:default <nanos>`.
pub const ENDED: &str = "ended:";

/// Wall-clock nanoseconds (one clock for every process on the machine).
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One SotW stream for `name` on `channel`: ACKs every response and reports it on `lines`.
async fn stream(
    channel: tonic::transport::Channel,
    name: &'static str,
    lines: mpsc::UnboundedSender<String>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
    let request = |version: String, nonce: String| DiscoveryRequest {
        resource_names: vec![name.to_string()],
        type_url: SECRET_TYPE_URL.to_string(),
        version_info: version,
        response_nonce: nonce,
        ..Default::default()
    };
    tx.send(request(String::new(), String::new())).await?;
    let mut responses = SecretDiscoveryServiceClient::new(channel)
        .stream_secrets(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        let DiscoveryResponse {
            version_info,
            nonce,
            ..
        } = response;
        let _ = lines.send(format!("{name} {}\n", now_nanos()));
        tx.send(request(version_info, nonce)).await?;
    }
    Ok(())
}

/// Connects, retrying while the server's listen backlog is full (thousands of
/// clients connecting at once, as after a node restart).
async fn connect(socket: &Path) -> anyhow::Result<tonic::transport::Channel> {
    let mut attempt = 0;
    loop {
        match trustweave_sds::inspect::connect(socket).await {
            Ok(channel) => return Ok(channel),
            Err(_) if attempt < 200 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(..20))).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Runs `connections` Envoy-like clients on `socket` until stdin closes,
/// printing `ready` once every stream got its first response, and
/// `ended:<name> <nanos>` for each stream that ends.
pub async fn run_clients(socket: &Path, connections: usize) -> anyhow::Result<()> {
    let (lines, mut received) = mpsc::unbounded_channel::<String>();
    for _ in 0..connections {
        let channel = connect(socket).await?;
        for name in NAMES {
            let lines = lines.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                // A stream the server ends (or fails) is reported, never reopened.
                let _ = stream(channel, name, lines.clone()).await;
                let _ = lines.send(format!("{ENDED}{name} {}\n", now_nanos()));
            });
        }
    }
    drop(lines);
    let mut stdout = tokio::io::stdout();
    let mut first = 0;
    let expected = connections * NAMES.len();
    let mut stdin_closed = Box::pin(async {
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
    });
    loop {
        tokio::select! {
            line = received.recv() => {
                let Some(line) = line else { return Ok(()) };
                if line.starts_with(ENDED) {
                    stdout.write_all(line.as_bytes()).await?;
                } else if first < expected {
                    first += 1;
                    if first == expected {
                        stdout.write_all(b"ready\n").await?;
                    }
                } else {
                    stdout.write_all(line.as_bytes()).await?;
                }
                stdout.flush().await?;
            }
            () = &mut stdin_closed => return Ok(()),
        }
    }
}

/// p50, p99 and max of `samples` (milliseconds), or zeros when empty.
pub fn percentiles(samples: &mut [f64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort_by(f64::total_cmp);
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.50), at(0.99), samples[samples.len() - 1])
}

/// Resident memory of a process, KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory (`VmHWM`) of `pid` in KiB (0 when unreadable).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// One `kB` field of `/proc/<pid>/status` (0 when unreadable).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// How long to wait for every stream to receive one update.
pub const UPDATE_TIMEOUT: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentiles(&mut samples), (50.0, 99.0, 100.0));
        assert_eq!(percentiles(&mut []), (0.0, 0.0, 0.0));
    }
}
