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
