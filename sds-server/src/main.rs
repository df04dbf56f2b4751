//! `trustweave-sds`: serve SDS (default) or inspect a running server.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trustweave_sds::config::{LogFormat, ServeArgs, DEFAULT_SDS_SOCKET};
use trustweave_sds::inspect;

/// Envoy SDS v3 server backed by SPIRE (the Workload API per pod, the Delegated Identity API per node).
#[derive(Parser, Debug)]
#[command(
    name = "trustweave-sds",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect to an SDS server as Envoy would and show what it serves (never
    /// the key); with `--workloads`, what a node-mode server serves each workload.
    Inspect {
        /// Node mode: list every connected workload and its identity, read from
        /// the admin endpoint's `/debug/workloads`.
        #[arg(long)]
        workloads: bool,
        /// The admin endpoint, for `--workloads`.
        #[arg(long, default_value = trustweave_sds::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        /// The SDS socket.
        #[arg(long, default_value = DEFAULT_SDS_SOCKET)]
        sds_socket: PathBuf,
        /// Secret names to fetch (repeatable); default `default` and `ROOTCA`.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Find the broken link when cross-cloud calls fail: bundles across
    /// clouds (SPIRE servers, bundle endpoints, trustweave-sds, Envoys), one
    /// call explained (`call`), the MSS at a gateway (`mtu`). Exit 0 when
    /// nothing is broken, 1 when something is, 2 when it cannot run.
    Doctor(DoctorArgs),
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct DoctorArgs {
    #[command(subcommand)]
    command: Option<DoctorCommand>,
    /// The mesh: trust domains, their SPIRE servers' CLI, nodes, Envoys and gateways (JSON; see docs/operations.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum DoctorCommand {
    /// Explain whether `caller` can call `callee`, hop by hop.
    Call {
        /// The mesh configuration.
        #[arg(long)]
        config: PathBuf,
        /// The caller's SPIFFE ID.
        caller: String,
        /// The callee: an Envoy's name, its SPIFFE ID or its service host.
        callee: String,
        /// The action asked for (the policy's action header).
        #[arg(long)]
        action: Option<String>,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Path.
        #[arg(long, default_value = "/")]
        path: String,
        /// Extra request header `name=value` (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// The SNI the caller's sidecar sends (default: from the callee's service).
        #[arg(long)]
        sni: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The MSS a connection to a gateway gets, against the path MTU.
    Mtu {
        /// The gateway's cross-network address, `ip:port`.
        address: String,
        /// An exported service's SNI, to measure the certificate chain behind it.
        #[arg(long)]
        sni: Option<String>,
        /// The path MTU between clouds.
        #[arg(long, default_value_t = trustweave_sds::doctor::config::DEFAULT_PATH_MTU)]
        path_mtu: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=value"))?;
    Ok((name.trim().to_ascii_lowercase(), value.to_string()))
}

/// Runs a doctor command; its exit status.
async fn doctor(args: DoctorArgs) -> i32 {
    use trustweave_sds::doctor::{self, report::Report};
    let print = |report: &Report, json: bool| {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(report).unwrap_or_default()
            );
        } else {
            print!("{}", report.to_text());
        }
        i32::from(report.broken)
    };
    let load = |path: &std::path::Path| {
        doctor::load(path).map_err(|e| {
            eprintln!("trustweave-sds doctor: {e}");
            2
        })
    };
    match args.command {
        None => {
            let Some(path) = args.config else {
                eprintln!("trustweave-sds doctor: --config <mesh.json> is required");
                return 2;
            };
            match load(&path) {
                Ok(config) => print(&doctor::run(&config).await, args.json),
                Err(code) => code,
            }
        }
        Some(DoctorCommand::Call {
            config,
            caller,
            callee,
            action,
            method,
            path,
            headers,
            sni,
            json,
        }) => match load(&config) {
            Ok(config) => {
                let request = doctor::call::Request {
                    action,
                    method,
                    path,
                    headers,
                    sni,
                };
                let checks = doctor::call::explain(&config, &caller, &callee, &request).await;
                print(&Report::new(checks), json)
            }
            Err(code) => code,
        },
        Some(DoctorCommand::Mtu {
            address,
            sni,
            path_mtu,
            json,
        }) => {
            let check = doctor::mtu::check(&address, &address, sni.as_deref(), path_mtu).await;
            print(&Report::new(vec![check]), json)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Inspect {
            workloads: true,
            admin_addr,
            json,
            ..
        }) => {
            let workloads = inspect::workloads(admin_addr).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&workloads)?);
            } else {
                print!("{}", inspect::workloads_to_text(&workloads));
            }
            Ok(())
        }
        Some(Command::Inspect {
            sds_socket,
            names,
            json,
            ..
        }) => {
            let names = if names.is_empty() {
                vec!["default".to_string(), "ROOTCA".to_string()]
            } else {
                names
            };
            let reports = inspect::inspect(&sds_socket, &names).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", inspect::to_text(&reports));
            }
            if reports.iter().any(|r| r.error.is_some()) {
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::Doctor(args)) => std::process::exit(doctor(args).await),
        None => serve(cli.serve).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = args.validate()?;
    let descriptors = trustweave_sds::listener::raise_descriptor_limit();
    if descriptors.is_some_and(|limit| limit < config.limits.max_connections as u64 + 64) {
        tracing::warn!(
            ?descriptors,
            max_connections = config.limits.max_connections,
            "the descriptor limit is below --max-connections; connections beyond it are refused at accept"
        );
    }
    let mut server = trustweave_sds::start(config)
        .await
        .context("start-up failed")?;
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        _ = server.wait() => anyhow::bail!("SDS server stopped unexpectedly"),
    }
    server.shutdown().await;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log file or collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
