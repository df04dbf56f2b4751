//! `trustweave-policy`: test a trustweave-filter policy before rollout.
//!
//! - `validate FILE`: every error with its field path; exit 0 valid, 2 invalid.
//! - `check FILE --principal spiffe://… [--method --path --host --header k=v --sni --port
//!   --via-gateway ID --local-principal ID]`: the decision, the deciding policy and
//!   rule, and the annotations that would be added; exit 0 allow, 1 deny, 2 invalid.
//!
//! `check` runs the very engine the `.wasm` runs, as Envoy would feed it: the
//! caller is a peer certificate whose one URI SAN is `--principal` (with
//! `--via-gateway`, the gateway is the peer and `--principal` the caller it
//! forwarded).

#![forbid(unsafe_code)]

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    std::process::exit(cli::run());
}

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::path::PathBuf;

    use clap::{Parser, Subcommand};
    use trustweave_engine::annotate::NodeFacts;
    use trustweave_engine::config::{self, Config, Layer};
    use trustweave_engine::decide::Decision;
    use trustweave_engine::headers::Headers;
    use trustweave_engine::identity::StatedCertificates;
    use trustweave_engine::{evaluate_http, evaluate_network, HttpInput, NetworkInput};

    /// Validate and try out trustweave-filter policies.
    #[derive(Parser, Debug)]
    #[command(name = "trustweave-policy", version)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand, Debug)]
    enum Command {
        /// List every error of a configuration, with its field path.
        Validate {
            /// The JSON configuration.
            file: PathBuf,
        },
        /// Decide one request and show the annotations.
        Check(Box<CheckArgs>),
    }

    #[derive(clap::Args, Debug)]
    struct CheckArgs {
        /// The JSON configuration.
        file: PathBuf,
        /// The caller's SPIFFE ID (the peer certificate's URI SAN); omit for no identity.
        #[arg(long)]
        principal: Option<String>,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Path (with query, as sent).
        #[arg(long, default_value = "/")]
        path: String,
        /// Host / authority.
        #[arg(long, default_value = "")]
        host: String,
        /// Extra request header `name=value` (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// TLS SNI.
        #[arg(long)]
        sni: Option<String>,
        /// Destination port.
        #[arg(long)]
        port: Option<u32>,
        /// The caller arrives through this gateway (the direct peer), which forwarded it.
        #[arg(long)]
        via_gateway: Option<String>,
        /// This workload's own SPIFFE ID.
        #[arg(long)]
        local_principal: Option<String>,
        /// This hop's region (as Envoy's node locality would say).
        #[arg(long)]
        local_region: Option<String>,
        /// This hop's cloud (as node metadata CLOUD would say).
        #[arg(long)]
        local_cloud: Option<String>,
        /// Rego mode: print the input document the policy is given (JSON) first.
        #[arg(long)]
        print_input: bool,
    }

    fn parse_header(s: &str) -> Result<(String, String), String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected name=value"))?;
        Ok((name.trim().to_ascii_lowercase(), value.to_string()))
    }

    fn load(file: &PathBuf) -> Result<Config, i32> {
        let bytes = std::fs::read(file).map_err(|e| {
            eprintln!("{}: {e}", file.display());
            2
        })?;
        config::parse(&bytes).map_err(|errors| {
            for error in &errors.0 {
                eprintln!("{}: {error}", file.display());
            }
            2
        })
    }

    /// Runs the CLI; returns the exit code.
    pub fn run() -> i32 {
        match Cli::parse().command {
            Command::Validate { file } => match load(&file) {
                Ok(config) => {
                    println!(
                        "{}: valid ({} policies)",
                        file.display(),
                        config.policies.len()
                    );
                    0
                }
                Err(code) => code,
            },
            Command::Check(args) => match load(&args.file) {
                Ok(config) => check(&config, &args),
                Err(code) => code,
            },
        }
    }

    fn check(config: &Config, args: &CheckArgs) -> i32 {
        let node = NodeFacts {
            region: args.local_region.clone(),
            cloud: args.local_cloud.clone(),
            zone: None,
            local_uri_san: args.local_principal.clone(),
        };
        let peer = args.via_gateway.as_deref().or(args.principal.as_deref());
        if config.layer == Layer::Network {
            let outcome = evaluate_network(
                config,
                &NetworkInput {
                    peer_uri_san: peer,
                    sni: args.sni.as_deref(),
                    port: args.port,
                    node,
                },
            );
            print_decision(&outcome.decision, outcome.no_identity.as_deref());
            return if outcome.decision.allowed { 0 } else { 1 };
        }
        let mut headers = vec![
            (":method".to_string(), args.method.clone()),
            (":path".to_string(), args.path.clone()),
            (":authority".to_string(), args.host.clone()),
        ];
        headers.extend(args.headers.iter().cloned());
        // The peer's certificate as Envoy proved it; with --via-gateway the gateway
        // is the peer and forwarded the caller's certificate.
        let sans = |id: &String| Ok(vec![id.clone()]);
        let mut certs = StatedCertificates {
            peer: peer.map(|p| Ok(vec![p.to_string()])),
            forwarded: args
                .via_gateway
                .as_ref()
                .and(args.principal.as_ref())
                .map(sans),
        };
        let outcome = evaluate_http(
            config,
            HttpInput {
                headers: Headers::from_text(&headers),
                port: args.port,
                sni: args.sni.clone(),
                node,
                unreadable: None,
            },
            &mut certs,
        );
        #[cfg(feature = "rego")]
        if args.print_input {
            match &outcome.rego_input {
                Some(input) => println!(
                    "input: {}",
                    serde_json::to_string(input).unwrap_or_default()
                ),
                None => println!("input: (not a Rego configuration)"),
            }
        }
        print_decision(&outcome.decision, outcome.no_identity.as_deref());
        if let Some(caller) = &outcome.caller {
            println!(
                "caller:   {} (trust domain {}, cloud {}, region {})",
                caller.id,
                caller.id.trust_domain(),
                caller.cloud.as_deref().unwrap_or("-"),
                caller.region.as_deref().unwrap_or("-")
            );
        }
        if outcome.decision.allowed {
            println!("annotations:");
            for (name, value) in &outcome.set {
                println!("  {name}: {value}");
            }
            for name in outcome
                .remove
                .iter()
                .filter(|n| !outcome.set.iter().any(|(s, _)| s == *n))
            {
                println!("  (removed) {name}");
            }
        } else {
            println!("response: 403 {:?}", trustweave_engine::DENY_BODY);
            for (name, value) in &outcome.deny_headers {
                println!("  {name}: {value}");
            }
        }
        if outcome.decision.allowed {
            0
        } else {
            1
        }
    }

    fn print_decision(decision: &Decision, no_identity: Option<&str>) {
        println!(
            "decision: {}",
            if decision.allowed { "ALLOW" } else { "DENY" }
        );
        println!("reason:   {:?}", decision.reason);
        match &decision.policy {
            Some((policy, rule)) => println!("policy:   {policy} (rule {rule})"),
            None => println!("policy:   -"),
        }
        if let Some(reason) = no_identity {
            println!("identity: none ({reason})");
        }
        for (policy, shadow) in &decision.dry_run {
            println!("dry-run:  {policy} {shadow:?}");
        }
        for policy in &decision.audited {
            println!("audit:    {policy}");
        }
    }
}
