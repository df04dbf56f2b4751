//! Command-line configuration of `trustweave-sds serve`, validated into a [`ServerConfig`].
//!
//! Invalid values fail start-up with a message naming the flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::delegated::DelegatedConfig;
use crate::render::{SecretNames, TrustFormat, TRUST_DOMAIN_PREFIX};
use crate::source::SourceConfig;

/// Istio's path for an external SDS socket.
pub const DEFAULT_SDS_SOCKET: &str = "/var/run/secrets/workload-spiffe-uds/socket";

/// Default admin address: loopback, outside Istio's reserved 15000–15099 range.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15200";

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag}: {reason}")]
pub struct ConfigError {
    /// The flag at fault, e.g. `--socket-mode`.
    pub flag: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where identities come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// Per pod or host: the Workload API, one identity for every client (VMs, non-Kubernetes hosts).
    WorkloadApi,
    /// Per node: each client's own identity, by its PID, from SPIRE's Delegated Identity API.
    Delegated,
}

/// Flags of the SDS server.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Where identities come from: `workload-api` (one identity, per pod or
    /// host) or `delegated` (per node: each Envoy its own, via the SPIRE
    /// agent's Delegated Identity API).
    #[arg(long, value_enum, default_value = "workload-api")]
    pub source: SourceKind,

    /// SPIFFE Workload API endpoint (the SPIRE agent socket): a path or `unix:` URI.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub workload_api_socket: Option<String>,

    /// SPIRE agent admin socket (Delegated Identity API), for `--source delegated`.
    #[arg(long, env = "SPIRE_ADMIN_ENDPOINT_SOCKET")]
    pub admin_socket: Option<String>,

    /// Unix socket on which Envoy reaches this SDS server.
    #[arg(long, default_value = DEFAULT_SDS_SOCKET)]
    pub sds_socket: PathBuf,

    /// Octal file mode of the SDS socket.
    #[arg(long, default_value = "0600")]
    pub socket_mode: String,

    /// UIDs allowed to connect (checked with SO_PEERCRED), comma-separated;
    /// default: the server's own UID only.
    #[arg(long, value_delimiter = ',')]
    pub allowed_uids: Vec<u32>,

    /// Most open SDS connections.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,

    /// A connection that sends nothing for this many seconds is closed
    /// (Envoy answers the server's keepalive pings, sent every third of it).
    #[arg(long, default_value_t = 90)]
    pub idle_timeout_secs: u64,

    /// Name of the default X.509-SVID secret.
    #[arg(long, default_value = "default")]
    pub default_svid_name: String,

    /// Name of the trust secret Istio asks for (own plus federated bundles).
    #[arg(long, default_value = "ROOTCA")]
    pub default_bundle_name: String,

    /// Second name for the aggregate of every bundle.
    #[arg(long, default_value = "ALL")]
    pub default_all_bundles_name: String,

    /// How trust is rendered for Envoys that do not ask otherwise.
    #[arg(long, value_enum, default_value = "spiffe")]
    pub rootca_format: TrustFormat,

    /// Address of the admin endpoint (`/healthz`, `/readyz`, `/metrics`); `off` disables it.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,

    /// Loopback address serving `/debug/*` (the node's workload map), for an
    /// admin address that is not loopback; `off` (the default) disables it.
    #[arg(long, default_value = "off")]
    pub debug_addr: String,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// First Workload API reconnect delay, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub reconnect_min_ms: u64,

    /// Largest Workload API reconnect delay, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub reconnect_max_ms: u64,
}

/// The identity source, validated.
#[derive(Debug, Clone)]
pub enum Source {
    /// The Workload API: one identity for every client.
    WorkloadApi(SourceConfig),
    /// The Delegated Identity API: each client its own identity.
    Delegated(DelegatedConfig),
}

impl Source {
    /// The endpoint, for logs.
    pub fn endpoint(&self) -> &str {
        match self {
            Self::WorkloadApi(config) => &config.endpoint,
            Self::Delegated(config) => &config.endpoint,
        }
    }
}

/// Checks an endpoint flag: an absolute path or a `unix:`/`tcp:` URI.
fn endpoint_flag(
    flag: &'static str,
    value: Option<&String>,
    hint: &str,
) -> Result<String, ConfigError> {
    let endpoint = value
        .cloned()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| invalid(flag, format!("not set; {hint}")))?;
    if !(endpoint.starts_with('/') || endpoint.starts_with("unix:") || endpoint.starts_with("tcp:"))
    {
        return Err(invalid(
            flag,
            format!("{endpoint:?} is neither an absolute path nor a unix:/tcp: URI"),
        ));
    }
    Ok(endpoint)
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where identities come from.
    pub source: Source,
    /// Path of the SDS socket.
    pub sds_socket: PathBuf,
    /// File mode of the SDS socket.
    pub socket_mode: u32,
    /// UIDs allowed to connect.
    pub allowed_uids: Vec<u32>,
    /// Bounds on clients.
    pub limits: crate::listener::Limits,
    /// Secret names served.
    pub names: SecretNames,
    /// Default trust rendering.
    pub trust_format: TrustFormat,
    /// Admin endpoint address, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Loopback address of `/debug/*`, if enabled.
    pub debug_addr: Option<SocketAddr>,
}

impl ServeArgs {
    /// Validates the flags.
    pub fn validate(&self) -> Result<ServerConfig, ConfigError> {
        let socket_mode = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "--socket-mode",
                    format!("{:?} is not an octal mode like 0600", self.socket_mode),
                )
            })?;
        if self.sds_socket.as_os_str().is_empty() {
            return Err(invalid("--sds-socket", "empty path"));
        }
        let names = SecretNames {
            default_svid: self.default_svid_name.clone(),
            default_bundle: self.default_bundle_name.clone(),
            all_bundles: self.default_all_bundles_name.clone(),
        };
        for (flag, name) in [
            ("--default-svid-name", &names.default_svid),
            ("--default-bundle-name", &names.default_bundle),
            ("--default-all-bundles-name", &names.all_bundles),
        ] {
            if name.is_empty() {
                return Err(invalid(flag, "empty name"));
            }
            if name.starts_with(TRUST_DOMAIN_PREFIX) {
                return Err(invalid(
                    flag,
                    format!("{name:?} would shadow SPIFFE IDs and trust domains"),
                ));
            }
        }
        if names.default_svid == names.default_bundle || names.default_svid == names.all_bundles {
            return Err(invalid(
                "--default-svid-name",
                "must differ from the bundle names",
            ));
        }
        let admin_addr = match self.admin_addr.as_str() {
            "off" | "" => None,
            addr => Some(
                addr.parse()
                    .map_err(|e| invalid("--admin-addr", format!("{addr:?}: {e}")))?,
            ),
        };
        let debug_addr = match self.debug_addr.as_str() {
            "off" | "" => None,
            addr => {
                let parsed: SocketAddr = addr
                    .parse()
                    .map_err(|e| invalid("--debug-addr", format!("{addr:?}: {e}")))?;
                if !parsed.ip().is_loopback() {
                    return Err(invalid(
                        "--debug-addr",
                        format!(
                            "{addr:?} is not loopback: /debug/* lists every workload of the node"
                        ),
                    ));
                }
                Some(parsed)
            }
        };
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(invalid(
                "--reconnect-min-ms",
                "must be positive and not above --reconnect-max-ms",
            ));
        }
        let allowed_uids = if self.allowed_uids.is_empty() {
            vec![crate::listener::own_uid().ok_or_else(|| {
                invalid(
                    "--allowed-uids",
                    "not set and the server's own UID is unknown",
                )
            })?]
        } else {
            self.allowed_uids.clone()
        };
        if self.max_connections == 0 {
            return Err(invalid("--max-connections", "must be positive"));
        }
        if self.idle_timeout_secs < 3 {
            return Err(invalid("--idle-timeout-secs", "must be at least 3"));
        }
        let limits = crate::listener::Limits {
            max_connections: self.max_connections,
            keepalive: Duration::from_secs(self.idle_timeout_secs / 3),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            ..crate::listener::Limits::default()
        };
        let min_backoff = Duration::from_millis(self.reconnect_min_ms);
        let max_backoff = Duration::from_millis(self.reconnect_max_ms);
        let source = match self.source {
            SourceKind::WorkloadApi => Source::WorkloadApi(SourceConfig {
                endpoint: endpoint_flag(
                    "--workload-api-socket",
                    self.workload_api_socket.as_ref(),
                    "(nor SPIFFE_ENDPOINT_SOCKET); point it at the SPIRE agent socket",
                )?,
                min_backoff,
                max_backoff,
                first_context_timeout: crate::source::FIRST_CONTEXT_TIMEOUT,
            }),
            SourceKind::Delegated => Source::Delegated(DelegatedConfig {
                endpoint: endpoint_flag(
                    "--admin-socket",
                    self.admin_socket.as_ref(),
                    "(nor SPIRE_ADMIN_ENDPOINT_SOCKET); point it at the SPIRE agent's admin_socket_path",
                )?,
                min_backoff,
                max_backoff,
            }),
        };
        Ok(ServerConfig {
            source,
            sds_socket: self.sds_socket.clone(),
            socket_mode,
            allowed_uids,
            limits,
            names,
            trust_format: self.rootca_format,
            admin_addr,
            debug_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServerConfig, ConfigError> {
        let mut argv = vec!["t"];
        if !extra.contains(&"--workload-api-socket") && !extra.contains(&"delegated") {
            argv.extend(["--workload-api-socket", "/run/agent.sock"]);
        }
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args.validate()
    }

    #[test]
    fn defaults_follow_istio_conventions() {
        let config = parse(&[]).expect("valid");
        assert_eq!(config.sds_socket, PathBuf::from(DEFAULT_SDS_SOCKET));
        assert_eq!(config.socket_mode, 0o600);
        assert_eq!(config.names, SecretNames::default());
        assert_eq!(
            config.allowed_uids,
            vec![crate::listener::own_uid().expect("uid")],
            "only the server's own UID by default"
        );
        let admin = config.admin_addr.expect("admin on");
        assert!(admin.ip().is_loopback());
        assert!(!(15000..=15099).contains(&admin.port()));
    }

    #[test]
    fn node_mode_reads_the_admin_socket() {
        let config = parse(&[
            "--source",
            "delegated",
            "--admin-socket",
            "/run/spire/admin.sock",
        ])
        .expect("valid");
        match config.source {
            Source::Delegated(delegated) => assert_eq!(delegated.endpoint, "/run/spire/admin.sock"),
            other => panic!("expected the delegated source, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (&["--socket-mode", "999"][..], "--socket-mode"),
            (&["--admin-addr", "nowhere"][..], "--admin-addr"),
            (
                &["--default-svid-name", "ROOTCA"][..],
                "--default-svid-name",
            ),
            (
                &["--default-bundle-name", "spiffe://x"][..],
                "--default-bundle-name",
            ),
            (&["--reconnect-min-ms", "0"][..], "--reconnect-min-ms"),
            (
                &["--workload-api-socket", "relative.sock"][..],
                "--workload-api-socket",
            ),
            (&["--source", "delegated"][..], "--admin-socket"),
            (
                &["--source", "delegated", "--admin-socket", "admin.sock"][..],
                "--admin-socket",
            ),
        ] {
            let err = parse(args).expect_err("invalid");
            assert_eq!(err.flag, flag, "{err}");
            assert!(err.to_string().contains(flag));
        }
    }
}
