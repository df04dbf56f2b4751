//! `bench-filter`: server Envoy CPU per request for no filter, Envoy's RBAC,
//! trustweave-filter and its dry run, interleaved, at several policy sizes.
//! Writes its section of BENCHMARKS.md (`--output`); `--smoke` runs one tiny
//! scenario to keep the harness working (no figures are judged).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use trustweave_e2e::bench_filter::{
    self, client_bootstrap, cpu_micros, median_range, refused, run_wrk, served, server_bootstrap,
    OpaEnvoy, Sample, Scenario, Variant, CALLER, SERVER,
};
use trustweave_e2e::bench_plot::{self, Axis, Series};

/// What one scenario measured, for the peer table and the plot.
struct ScenarioResult {
    scenario: Scenario,
    /// Server CPU per request added to no filter, µs.
    added: [(Variant, f64); 4],
    /// Client latency p50 / p99, µs.
    latency: [(Variant, (f64, f64)); 3],
}

impl ScenarioResult {
    fn added(&self, variant: Variant) -> f64 {
        self.added
            .iter()
            .find(|(v, _)| *v == variant)
            .map_or(f64::NAN, |(_, x)| *x)
    }

    fn latency(&self, variant: Variant) -> (f64, f64) {
        self.latency
            .iter()
            .find(|(v, _)| *v == variant)
            .map_or((f64::NAN, f64::NAN), |(_, l)| *l)
    }
}

/// Rego mode (E) against OPA-Envoy (F): added CPU and latency, and the ratios.
fn peer_table(results: &[ScenarioResult]) -> String {
    let mut out = String::from(
        "| principals × policies | E − A CPU | F − A CPU | F / E CPU | p50 A / E / F | E − A, F − A p50 | F / E p50 | p99 A / E / F |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let (e, f) = (r.added(Variant::Rego), r.added(Variant::OpaEnvoy));
        let (a50, a99) = r.latency(Variant::None);
        let (e50, e99) = r.latency(Variant::Rego);
        let (f50, f99) = r.latency(Variant::OpaEnvoy);
        out.push_str(&format!(
            "| {} × {} | {e:.1} µs | {f:.1} µs | {:.1}× | {a50:.0} / {e50:.0} / {f50:.0} µs | {:.0} µs, {:.0} µs | {:.1}× | {a99:.0} / {e99:.0} / {f99:.0} µs |\n",
            r.scenario.principals,
            r.scenario.policies,
            f / e,
            e50 - a50,
            f50 - a50,
            (f50 - a50) / (e50 - a50),
        ));
    }
    out
}

/// Added CPU against principals (one policy), per configuration, log-log.
fn plot_added_cpu(path: &std::path::Path, results: &[ScenarioResult]) -> anyhow::Result<()> {
    let one_policy: Vec<&ScenarioResult> = results
        .iter()
        .filter(|r| r.scenario.policies == 1)
        .collect();
    let series: Vec<Series> = [
        (Variant::Rbac, "B Envoy RBAC"),
        (Variant::Filter, "C trustweave-filter"),
        (Variant::Rego, "E trustweave Rego (guide policy)"),
        (Variant::OpaEnvoy, "F OPA-Envoy (guide policy)"),
    ]
    .into_iter()
    .map(|(variant, name)| Series {
        name: name.to_string(),
        points: one_policy
            .iter()
            .map(|r| (r.scenario.principals as f64, r.added(variant)))
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .collect(),
    })
    .collect();
    bench_plot::line_chart(
        path,
        "Server CPU added per request (vs no filter), one policy",
        Axis::log("principals in the policy"),
        Axis::log("µs per request"),
        &series,
    )
}
use trustweave_e2e::envoy::Envoy;
use trustweave_e2e::filter::LISTENER;
use trustweave_e2e::pki::TrustDomainCa;

#[derive(Parser, Debug)]
#[command(name = "bench-filter")]
struct Args {
    /// One tiny scenario, one short round: checks the harness, judges nothing.
    #[arg(long)]
    smoke: bool,
    /// Interleaved rounds per scenario.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Measured seconds per configuration per round (whole seconds: wrk's unit).
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Only these variants (labels' letters, e.g. `AC`), for quick comparisons.
    #[arg(long)]
    only: Option<String>,
    /// Only the first scenario (10 principals, 1 policy).
    #[arg(long)]
    first: bool,
    /// File whose `filter` section is rewritten.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (scenarios, rounds, measure) = if args.smoke {
        (
            vec![Scenario {
                principals: 10,
                policies: 1,
            }],
            1,
            Duration::from_secs(1),
        )
    } else {
        (
            vec![
                Scenario {
                    principals: 10,
                    policies: 1,
                },
                Scenario {
                    principals: 1_000,
                    policies: 1,
                },
                Scenario {
                    principals: 10_000,
                    policies: 1,
                },
                Scenario {
                    principals: 10,
                    policies: 10,
                },
                Scenario {
                    principals: 10,
                    policies: 100,
                },
            ],
            args.rounds,
            Duration::from_secs(args.seconds),
        )
    };
    let scenarios = if args.first {
        scenarios.into_iter().take(1).collect()
    } else {
        scenarios
    };
    let variants: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| {
            args.only
                .as_deref()
                .is_none_or(|only| only.contains(&v.label()[..1]))
        })
        .collect();
    let ca = TrustDomainCa::new("gcp.company.com");
    let ttl = Duration::from_secs(24 * 3600);
    let (server_svid, client_svid) = (ca.issue_svid(SERVER, ttl), ca.issue_svid(CALLER, ttl));
    let dir = tempfile::tempdir()?;
    // One OPA-Envoy for every scenario (its policy does not change), on the servers' core.
    let opa = if variants.contains(&Variant::OpaEnvoy) {
        let opa = OpaEnvoy::start(dir.path())?;
        bench_filter::pin(opa.pid(), bench_filter::cores().0);
        Some(opa)
    } else {
        None
    };
    let mut results: Vec<ScenarioResult> = Vec::new();
    let mut table = String::from(
        "| principals × policies | A none | B RBAC | C trustweave | D dry run | E Rego (guide policy) | F OPA-Envoy (Envoy + OPA) | B − A | C − A | E − A | F − A | (B − A) / (C − A) | C rps, p50 / p99 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for scenario in &scenarios {
        let mut servers = Vec::new();
        for variant in variants.iter().copied() {
            let name = format!(
                "server-{variant:?}-{}x{}",
                scenario.principals, scenario.policies
            );
            let envoy = Envoy::start(
                &name,
                dir.path(),
                &server_bootstrap(
                    variant,
                    *scenario,
                    &server_svid,
                    &[&ca],
                    opa.as_ref().map(|o| o.socket()),
                ),
            )
            .await;
            envoy.wait_live().await;
            if let Some(pid) = envoy.pid() {
                bench_filter::pin(pid, bench_filter::cores().0);
            }
            let addr = envoy.listener(LISTENER).await;
            servers.push((variant, envoy, addr));
        }
        let addrs: Vec<_> = servers.iter().map(|(_, _, a)| *a).collect();
        let client = Envoy::start(
            "client",
            dir.path(),
            &client_bootstrap(&addrs, &client_svid, &[&ca]),
        )
        .await;
        client.wait_live().await;
        if let Some(pid) = client.pid() {
            bench_filter::pin(pid, bench_filter::cores().1);
        }
        let mut entries = Vec::new();
        for i in 0..servers.len() {
            entries.push(client.listener(&format!("to{i}")).await);
        }
        let mut samples: Vec<Sample> = Vec::new();
        for round in 0..=rounds {
            for (i, (variant, envoy, _)) in servers.iter().enumerate() {
                let pid = envoy
                    .pid()
                    .ok_or_else(|| anyhow::anyhow!("server exited"))?;
                // OPA-Envoy's CPU counts with its Envoy's: both serve the request.
                let helper = match (variant, &opa) {
                    (Variant::OpaEnvoy, Some(opa)) => Some(opa.pid()),
                    _ => None,
                };
                let cpu_now = || cpu_micros(pid) + helper.map_or(0, cpu_micros);
                let (cpu0, served0) = (cpu_now(), served(envoy).await);
                let wrk = run_wrk(entries[i], measure, args.connections)?;
                let (cpu1, served1) = (cpu_now(), served(envoy).await);
                let requests = served1 - served0;
                anyhow::ensure!(
                    refused(envoy).await == 0,
                    "{variant:?} refused the allowed caller"
                );
                anyhow::ensure!(requests > 0, "{variant:?} served nothing");
                // Round 0 warms every configuration up and is not counted.
                if round > 0 {
                    samples.push(Sample {
                        variant: *variant,
                        cpu_us_per_request: (cpu1 - cpu0) as f64 / requests as f64,
                        requests,
                        wrk,
                    });
                }
            }
        }
        for (variant, envoy, _) in &servers {
            if matches!(variant, Variant::Filter | Variant::DryRun | Variant::Rego) {
                let stats = envoy
                    .admin_get("/stats?filter=trustweave.peer_certificates_parsed")
                    .await;
                eprintln!("{variant:?}: {}", stats.trim());
            }
        }
        let figures = |v: Variant, f: fn(&Sample) -> f64| {
            let mut values: Vec<f64> = samples.iter().filter(|s| s.variant == v).map(f).collect();
            median_range(&mut values)
        };
        let cpu = |v| figures(v, |s| s.cpu_us_per_request);
        let cell = |v| {
            let (m, lo, hi) = cpu(v);
            format!("{m:.1} µs ({lo:.1}–{hi:.1})")
        };
        let (a, b, c, e) = (
            cpu(Variant::None).0,
            cpu(Variant::Rbac).0,
            cpu(Variant::Filter).0,
            cpu(Variant::Rego).0,
        );
        let f = cpu(Variant::OpaEnvoy).0;
        let latency = |v| {
            (
                figures(v, |s| s.wrk.p50_us).0,
                figures(v, |s| s.wrk.p99_us).0,
            )
        };
        results.push(ScenarioResult {
            scenario: *scenario,
            added: [
                (Variant::Rbac, b - a),
                (Variant::Filter, c - a),
                (Variant::Rego, e - a),
                (Variant::OpaEnvoy, f - a),
            ],
            latency: [
                (Variant::None, latency(Variant::None)),
                (Variant::Rego, latency(Variant::Rego)),
                (Variant::OpaEnvoy, latency(Variant::OpaEnvoy)),
            ],
        });
        let (rps, p50, p99) = (
            figures(Variant::Filter, |s| s.wrk.rps).0,
            figures(Variant::Filter, |s| s.wrk.p50_us).0,
            figures(Variant::Filter, |s| s.wrk.p99_us).0,
        );
        let row = format!(
            "| {} × {} | {} | {} | {} | {} | {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.1}× | {:.0}, {:.0} / {:.0} µs |\n",
            scenario.principals,
            scenario.policies,
            cell(Variant::None),
            cell(Variant::Rbac),
            cell(Variant::Filter),
            cell(Variant::DryRun),
            cell(Variant::Rego),
            cell(Variant::OpaEnvoy),
            b - a,
            c - a,
            e - a,
            f - a,
            (b - a) / (c - a),
            rps,
            p50,
            p99
        );
        print!("{row}");
        table.push_str(&row);
    }
    let peers = peer_table(&results);
    let plot = args
        .output
        .as_ref()
        .map(|output| output.with_file_name("docs/bench/filter-added-cpu.svg"));
    if let Some(plot) = &plot {
        plot_added_cpu(plot, &results)?;
        println!("wrote {}", plot.display());
    }
    let body = format!(
        "## Filter overhead (`make bench-filter`)\n\n\
         Machine: {}. Server Envoy `--concurrency 1`, mTLS with required client certificates, \
         direct 200 response, pinned to a core of its own; client Envoy originating mTLS with an \
         SVID and `wrk -t1 -c{}` share the other core; \
         configurations interleaved (A B C D E F × {} rounds after a warm-up round, {} s each). \
         Figures: server Envoy CPU time (scheduler run time of its threads, `/proc/<pid>/task/*/schedstat`) per request \
         served, median (min–max) over rounds. B is Envoy's RBAC with Istio's \
         `authenticated.principal_name` matchers; C and D are trustweave-filter as shipped \
         (identity from the certificate, annotation headers and baggage set); E is the Rego \
         build running the users' federated guide policy (`filter/examples/rego-federated.json`, \
         the same for every row); F is the real OPA-Envoy (`opa-envoy-plugin` v1.10.0-envoy, \
         built from `tests/opa-envoy/`) as Envoy's `ext_authz` over a Unix socket with the same \
         policy written for its input (`bench_filter::OPA_ENVOY_GUIDE_POLICY`, decision logs off), \
         its process pinned to the server's core and its CPU added to its Envoy's; the allowed \
         caller is last in every list (exact, prefix and suffix patterns mixed).\n\n{table}\n\
         ### Rego against OPA-Envoy\n\n\
         The same guide policy, the same requests: what each adds to no filter (A), in server CPU \
         per request and in latency at the client (wrk through the client Envoy; on 2 cores the \
         latency is the load generator's as much as the server's).\n\n{peers}\n\
         ![Added server CPU per request against principals](docs/bench/filter-added-cpu.svg)\n",
        bench_filter::machine_facts(),
        args.connections,
        rounds,
        measure.as_secs(),
    );
    if let Some(path) = &args.output {
        bench_filter::write_section(path, "filter", &body)?;
        println!("wrote {}", path.display());
    }
    println!("bench-filter: {} scenarios measured", scenarios.len());
    Ok(())
}
