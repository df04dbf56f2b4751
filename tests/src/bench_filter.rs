//! `make bench-filter`: what an authorization filter costs the server Envoy, per request.
//!
//! Per scenario (principals × policies), one server Envoy per configuration —
//! (A) no authz filter, (B) Envoy's native RBAC with the rules Istio would
//! generate (`authenticated.principal_name`), (C) trustweave-filter, (D)
//! trustweave-filter in dry run — each `--concurrency 1`, mTLS with required
//! client certificates, a direct 200 response. One client Envoy originates mTLS
//! with an SVID to each; `wrk` drives the client. Configurations run interleaved
//! (A B C D A B C D …). The figure that separates the filters is the server
//! Envoy's CPU time (the scheduler's run time of its threads, `/proc/<pid>/task/*/schedstat`) over the run divided
//! by the requests it served: on 2 cores the load generator saturates first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::envoy::Envoy;
use crate::filter::{self, LISTENER, SIDECAR_HCM};
use crate::pki::{IssuedSvid, TrustDomainCa};

/// The caller every benchmark request comes from; always last in every list.
pub const CALLER: &str = "spiffe://gcp.company.com/ns/bench/sa/client";
/// The server's own identity.
pub const SERVER: &str = "spiffe://gcp.company.com/ns/bench/sa/server";

/// One server configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// No authorization filter.
    None,
    /// Envoy's RBAC filter.
    Rbac,
    /// trustweave-filter, enforcing.
    Filter,
    /// trustweave-filter, every policy in dry run.
    DryRun,
    /// trustweave-filter's Rego build with the users' federated guide policy.
    Rego,
    /// The real OPA-Envoy (`opa-envoy-plugin`) as Envoy's `ext_authz`, the same policy.
    OpaEnvoy,
}

impl Variant {
    /// Every variant, in the interleaving order.
    pub const ALL: [Variant; 6] = [
        Self::None,
        Self::Rbac,
        Self::Filter,
        Self::DryRun,
        Self::Rego,
        Self::OpaEnvoy,
    ];

    /// Its column label.
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "A none",
            Self::Rbac => "B RBAC",
            Self::Filter => "C trustweave",
            Self::DryRun => "D dry run",
            Self::Rego => "E Rego",
            Self::OpaEnvoy => "F OPA-Envoy",
        }
    }
}

/// A policy size to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Principals per policy (exact, prefix and suffix mixed).
    pub principals: usize,
    /// Policies.
    pub policies: usize,
}

/// `n` principal patterns, exact / prefix / suffix in turn, none matching [`CALLER`].
fn principals(policy: usize, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 3 {
            0 => format!("spiffe://aws.company.com/ns/p{policy}n{i}/sa/s{i}"),
            1 => format!("spiffe://azure.company.com/ns/p{policy}n{i}/*"),
            _ => format!("*/sa/p{policy}suffix{i}"),
        })
        .collect()
}

/// Each policy's principal list; the allowed caller is last in the last policy.
fn policy_lists(s: Scenario) -> Vec<Vec<String>> {
    (0..s.policies)
        .map(|p| {
            let last = p + 1 == s.policies;
            let mut list = principals(p, s.principals - usize::from(last));
            if last {
                list.push(CALLER.to_string());
            }
            list
        })
        .collect()
}

/// The trustweave-filter configuration for a scenario.
pub fn filter_config(s: Scenario, dry_run: bool) -> String {
    let policies: Vec<Value> = policy_lists(s)
        .into_iter()
        .enumerate()
        .map(|(i, list)| {
            json!({ "name": format!("p{i}"), "action": "ALLOW", "dry_run": dry_run,
                    "rules": [{ "from": { "principals": list } }] })
        })
        .collect();
    let mut config = json!({
        "placement": "sidecar", "layer": "http", "policies": policies,
        "local": { "cloud": "gcp", "region": "us-central1", "trust_domain": "gcp.company.com" },
    });
    if dry_run {
        config["default_action"] = json!("ALLOW");
    }
    config.to_string()
}

/// The users' federated guide policy (Rego), as shipped in `filter/examples/`.
pub fn rego_guide_config() -> String {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../filter/examples/rego-federated.json");
    std::fs::read_to_string(path).expect("filter/examples/rego-federated.json")
}

/// The guide policy of [`rego_guide_config`] written for OPA-Envoy's input
/// document (`input.attributes`): same rules, same data.
pub const OPA_ENVOY_GUIDE_POLICY: &str = r#"package agentweave.authz.federated

import rego.v1

default allow := false

trust_domain(id) := split(trim_prefix(id, "spiffe://"), "/")[0]

caller := input.attributes.source.principal

action := input.attributes.request.http.headers["x-trustweave-action"]

# Same trust domain.
allow if trust_domain(caller) == trust_domain(input.attributes.destination.principal)

# A federated trust domain, for the actions listed for that caller.
allow if {
	trust_domain(caller) in data.federation.allowed_domains
	action in data.federation.allowed_actions[caller]
}
"#;

/// A running `opa-envoy-plugin` serving [`OPA_ENVOY_GUIDE_POLICY`] on a Unix
/// socket (decision logs off, as a production deployment would sample them);
/// killed on drop.
pub struct OpaEnvoy {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl OpaEnvoy {
    /// The binary `scripts/setup.sh` builds from `tests/opa-envoy/`.
    pub fn binary() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/opa-envoy/opa-envoy-plugin")
    }

    /// Starts it in `dir` with the guide policy and its data; waits until it listens.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let binary = Self::binary();
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: run scripts/setup.sh (it builds opa-envoy-plugin from tests/opa-envoy)",
            binary.display()
        );
        let socket = dir.join("opa.sock");
        let config = dir.join("opa.yaml");
        std::fs::write(
            &config,
            format!(
                "plugins:\n  envoy_ext_authz_grpc:\n    addr: unix://{}\n    path: agentweave/authz/federated/allow\n    skip-request-body-parse: true\n",
                socket.display()
            ),
        )?;
        let policy = dir.join("federated.rego");
        std::fs::write(&policy, OPA_ENVOY_GUIDE_POLICY)?;
        let guide: Value = serde_json::from_str(&rego_guide_config())?;
        let data = dir.join("data.json");
        std::fs::write(&data, guide["rego"]["data"].to_string())?;
        let log = std::fs::File::create(dir.join("opa-envoy.log"))?;
        let child = Command::new(&binary)
            .arg("run")
            .arg("--server")
            .arg(format!(
                "--addr=unix://{}",
                dir.join("opa-http.sock").display()
            ))
            .arg(format!("--config-file={}", config.display()))
            .arg("--disable-telemetry")
            .arg(&policy)
            .arg(&data)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start opa-envoy-plugin")?;
        let started = std::time::Instant::now();
        while !socket.exists() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "opa-envoy-plugin does not listen; see {}",
                dir.join("opa-envoy.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, socket })
    }

    /// Its ext_authz socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for OpaEnvoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Envoy's RBAC filter with the rules Istio generates for the same policies.
pub fn rbac_filter(s: Scenario) -> Value {
    let matcher = |p: &str| {
        let string_match = if p == "*" {
            json!({ "safe_regex": { "regex": ".+" } })
        } else if let Some(suffix) = p.strip_prefix('*') {
            json!({ "suffix": suffix })
        } else if let Some(prefix) = p.strip_suffix('*') {
            json!({ "prefix": prefix })
        } else {
            json!({ "exact": p })
        };
        json!({ "authenticated": { "principal_name": string_match } })
    };
    let policies: serde_json::Map<String, Value> = policy_lists(s)
        .into_iter()
        .enumerate()
        .map(|(i, list)| {
            let ids: Vec<Value> = list.iter().map(|p| matcher(p)).collect();
            (
                format!("ns[bench]-policy[p{i}]-rule[0]"),
                json!({ "permissions": [{ "any": true }],
                        "principals": [{ "or_ids": { "ids": ids } }] }),
            )
        })
        .collect();
    json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": { "action": "ALLOW", "policies": policies }
        }
    })
}

/// The server bootstrap for one variant: mTLS in, the authz filter, a direct 200
/// (`opa`: OPA-Envoy's socket, for [`Variant::OpaEnvoy`]).
pub fn server_bootstrap(
    variant: Variant,
    s: Scenario,
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
    opa: Option<&Path>,
) -> Value {
    let mut filters = match variant {
        Variant::None => vec![],
        Variant::Rbac => vec![rbac_filter(s)],
        Variant::Filter => vec![filter::http_filter(&filter_config(s, false))],
        Variant::DryRun => vec![filter::http_filter(&filter_config(s, true))],
        Variant::Rego => vec![filter::rego_filter(&rego_guide_config())],
        Variant::OpaEnvoy => vec![filter::ext_authz_filter()],
    };
    filters.push(filter::router());
    let mut hcm = filter::hcm("inbound", Some(SIDECAR_HCM), filters, "unused");
    hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0] = json!({
        "match": { "prefix": "/" },
        "direct_response": { "status": 200, "body": { "inline_string": "ok" } }
    });
    let listener = json!({
        "name": LISTENER,
        "address": filter::loopback_any_port(),
        "filter_chains": [{
            "transport_socket": filter::downstream_tls(svid, trusted),
            "filters": [hcm]
        }]
    });
    let clusters = match (variant, opa) {
        (Variant::OpaEnvoy, Some(socket)) => vec![filter::opa_cluster(socket)],
        _ => vec![],
    };
    filter::bootstrap("bench-server", json!({}), vec![listener], clusters)
}

/// The client bootstrap: one plaintext listener per server, each originating mTLS to it.
pub fn client_bootstrap(
    servers: &[SocketAddr],
    svid: &IssuedSvid,
    trusted: &[&TrustDomainCa],
) -> Value {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for (i, addr) in servers.iter().enumerate() {
        let name = format!("to{i}");
        listeners.push(json!({
            "name": name,
            "address": filter::loopback_any_port(),
            "filter_chains": [{ "filters": [filter::hcm(&name, None, vec![filter::router()], &name)] }]
        }));
        clusters.push(filter::cluster(
            &name,
            *addr,
            Some(filter::upstream_tls(svid, trusted, None)),
        ));
    }
    filter::bootstrap("bench-client", json!({}), listeners, clusters)
}

/// Pins every thread of `pid` to `cpu` (`taskset`), so that the measured server
/// has a core of its own and the load generator and client share the other.
pub fn pin(pid: u32, cpu: usize) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output();
}

/// The core the servers run on (the last), and the one load runs on (the first).
pub fn cores() -> (usize, usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (n.saturating_sub(1), 0)
}

/// CPU time of a process so far, in microseconds: the sum over its threads of
/// the run time the scheduler accounted (`/proc/<pid>/task/*/schedstat`, in
/// nanoseconds; `utime`/`stime` are sampled at clock ticks and far coarser).
pub fn cpu_micros(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| {
            stat.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum();
    nanos / 1_000
}

/// Requests the server Envoy's listener answered (its HCM's 2xx, 4xx and 5xx).
pub async fn served(envoy: &Envoy) -> u64 {
    responses(envoy, "2xx|4xx|5xx").await
}

/// Non-2xx answers the server gave (a benchmark where the caller is refused measures nothing).
pub async fn refused(envoy: &Envoy) -> u64 {
    responses(envoy, "4xx|5xx").await
}

/// The sum of the listener's response counters of `classes` (a regex alternation).
async fn responses(envoy: &Envoy, classes: &str) -> u64 {
    envoy
        .admin_get(&format!(
            "/stats?filter=^http.inbound.downstream_rq_({classes})$"
        ))
        .await
        .lines()
        .filter_map(|l| l.rsplit_once(": "))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// What `wrk` reported for one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

fn parse_latency(text: &str) -> Option<f64> {
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))?;
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => value,
        "ms" => value * 1e3,
        "s" => value * 1e6,
        _ => return None,
    })
}

/// Parses wrk's `--latency` output.
pub fn parse_wrk(output: &str) -> WrkResult {
    let mut result = WrkResult::default();
    for line in output.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => result.rps = v.parse().unwrap_or(0.0),
            (Some("50%"), Some(v)) => result.p50_us = parse_latency(v).unwrap_or(0.0),
            (Some("99%"), Some(v)) => result.p99_us = parse_latency(v).unwrap_or(0.0),
            _ => {}
        }
    }
    result
}

/// Runs `wrk` against `addr` for `duration` in whole seconds, at least one (one
/// thread, `connections` keep-alive connections).
pub fn run_wrk(
    addr: SocketAddr,
    duration: Duration,
    connections: u32,
) -> std::io::Result<WrkResult> {
    let seconds = duration.as_secs().max(1);
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .arg(format!("http://{addr}/"))
        .output()?;
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "wrk failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(parse_wrk(&String::from_utf8_lossy(&output.stdout)))
}

/// One measured run of one variant.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Which configuration.
    pub variant: Variant,
    /// Server CPU per request, µs.
    pub cpu_us_per_request: f64,
    /// Requests served.
    pub requests: u64,
    /// What wrk saw.
    pub wrk: WrkResult,
}

/// Median and range of a set of figures.
pub fn median_range(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

/// The machine, as BENCHMARKS.md states it.
pub fn machine_facts() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("?".to_string(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1048576.0)
        });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let envoy = Command::new(crate::envoy::binary())
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        // "…/envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        .and_then(|v| {
            let build = v.split("version:").nth(1)?.split_whitespace().next()?;
            build.split('/').nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| "?".into());
    format!("{cores} cores ({cpu}), {memory} memory, Envoy {envoy}")
}

/// Replaces the text between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in `file`
/// (appending the section when absent).
pub fn write_section(file: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let current = std::fs::read_to_string(file).unwrap_or_else(|_| {
        "# Benchmarks\n\nGenerated by the benchmark programs (`make bench-filter`); not hand-edited.\n".into()
    });
    let section = format!("{begin}\n{body}\n{end}");
    let updated = match (current.find(&begin), current.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{}{}", &current[..b], section, &current[e + end.len()..])
        }
        _ => format!("{}\n{}\n", current.trim_end(), section),
    };
    std::fs::write(file, updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let out = "Running 1s test\n  Latency Distribution\n     50%  412.00us\n     75%  1.02ms\n     99%    2.50ms\n  1234 requests in 1.00s\nRequests/sec:   1234.56\n";
        let r = parse_wrk(out);
        assert_eq!((r.rps, r.p50_us, r.p99_us), (1234.56, 412.0, 2500.0));
    }

    #[test]
    fn the_caller_is_last_and_only_in_the_last_policy() {
        let lists = policy_lists(Scenario {
            principals: 10,
            policies: 3,
        });
        assert_eq!(lists.len(), 3);
        assert!(lists.iter().all(|l| l.len() == 10));
        assert_eq!(lists[2].last().map(String::as_str), Some(CALLER));
        assert!(!lists[0].contains(&CALLER.to_string()));
    }
}
