//! The proxy-wasm shim: read what Envoy knows, call the engine, act.
//!
//! Nothing from the host or the network can panic here: every hostcall result
//! is handled, missing properties are `None`, header values are read as bytes
//! (proxy-wasm's `get_map` decodes them as UTF-8 and unwraps: one 0xFF byte
//! would trap the VM), and an unconfigured or misconfigured plugin denies
//! (fail closed). Envoy is asked only for what the configuration's policies read.

use rustc_hash::FxHashMap as HashMap;
use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use trustweave_engine::annotate::NodeFacts;
use trustweave_engine::certificate::CertCache;
use trustweave_engine::config::{self, Config, Layer, UriSanCheck};
use trustweave_engine::headers::Headers;
use trustweave_engine::identity::{EnvoyCertificates, PeerFacts};
use trustweave_engine::metrics::{self, MetricSink};
use trustweave_engine::{evaluate_http, evaluate_network, HttpInput, NetworkInput, DENY_BODY};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Counter ids by name, defined once per configuration.
#[derive(Default)]
struct Counters(HashMap<String, u32>);

impl MetricSink for &Counters {
    fn increment(&mut self, name: &str) {
        if let Some(id) = self.0.get(name) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}

/// One configuration: compiled policy, counter ids, and the node's place.
struct State {
    config: Config,
    counters: Counters,
    node: NodeFacts,
}

#[derive(Default)]
struct Root {
    state: Option<Rc<State>>,
    /// Parsed peer certificates by digest, shared by this worker's requests.
    certificates: Rc<RefCell<CertCache>>,
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, &format!("trustweave-filter: {message}"));
}

fn property(path: &[&str]) -> Option<String> {
    read_property(path).ok().flatten()
}

/// A property as text: `Ok(None)` when Envoy has none; an error when the host
/// call fails or the value is not UTF-8 (a request that depends on it is denied).
fn read_property(path: &[&str]) -> Result<Option<String>, String> {
    match hostcalls::get_property(path.to_vec()) {
        Ok(Some(bytes)) if !bytes.is_empty() => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| format!("property {} is not UTF-8", path.join("."))),
        Ok(_) => Ok(None),
        Err(status) => Err(format!("property {}: {status:?}", path.join("."))),
    }
}

fn port_property(path: &[&str]) -> Option<u32> {
    let bytes = hostcalls::get_property(path.to_vec()).ok()??;
    let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    u32::try_from(i64::from_le_bytes(raw)).ok()
}

/// What Envoy's node says about this hop: fixed for the Envoy's life, read once per configuration.
fn node_place() -> NodeFacts {
    let node = |field: &[&str]| {
        let mut xds = vec!["xds", "node"];
        xds.extend_from_slice(field);
        property(&xds).or_else(|| {
            let mut legacy = vec!["node"];
            legacy.extend_from_slice(field);
            property(&legacy)
        })
    };
    NodeFacts {
        region: node(&["locality", "region"]),
        zone: node(&["locality", "zone"]),
        cloud: node(&["metadata", "CLOUD"]),
        local_uri_san: None,
    }
}

/// The node's place, plus this connection's own certificate URI SAN when a policy reads it.
fn node_facts(state: &State) -> NodeFacts {
    NodeFacts {
        local_uri_san: if state.config.reads.local_certificate {
            property(&["connection", "uri_san_local_certificate"])
        } else {
            None
        },
        ..state.node.clone()
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            _ => Vec::new(),
        };
        let bytes = if bytes.is_empty() {
            b"{}".to_vec()
        } else {
            bytes
        };
        match config::parse(&bytes) {
            Ok(config) => {
                let mut counters = Counters::default();
                for name in metrics::all_names(&config) {
                    if let Ok(id) = hostcalls::define_metric(MetricType::Counter, &name) {
                        counters.0.insert(name, id);
                    }
                }
                log(
                    LogLevel::Info,
                    &format!(
                        "configured: {:?} {:?}, {} policies",
                        config.placement,
                        config.layer,
                        config.policies.len()
                    ),
                );
                self.state = Some(Rc::new(State {
                    config,
                    counters,
                    node: node_place(),
                }));
                // Certificates parsed under the previous configuration stay valid facts.
                true
            }
            Err(errors) => {
                log(
                    LogLevel::Critical,
                    &format!("invalid configuration, refusing it: {errors}"),
                );
                self.state = None;
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        match self.state.as_deref().map(|state| state.config.layer) {
            Some(Layer::Network) => Some(ContextType::StreamContext),
            _ => Some(ContextType::HttpContext),
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HttpFilter {
            state: self.state.clone(),
            certificates: Rc::clone(&self.certificates),
        }))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(NetworkFilter {
            state: self.state.clone(),
            decided: false,
        }))
    }
}

struct HttpFilter {
    state: Option<Rc<State>>,
    certificates: Rc<RefCell<CertCache>>,
}

impl Context for HttpFilter {}

impl HttpFilter {
    fn deny(&self, extra: &[(String, String)]) -> Action {
        self.respond(403, DENY_BODY, extra)
    }

    fn respond(&self, status: u32, body: &str, extra: &[(String, String)]) -> Action {
        let mut headers: Vec<(&str, &str)> = vec![("content-type", "text/plain")];
        headers.extend(extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        if hostcalls::send_http_response(status, headers, Some(body.as_bytes())).is_err() {
            log(LogLevel::Error, "could not send the denial");
        }
        Action::Pause
    }
}

impl HttpContext for HttpFilter {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        if let Ok(Some(_)) =
            hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-trustweave-test-trap")
        {
            // The test module's trap on demand (see Cargo.toml): a wasm `unreachable`.
            std::process::abort();
        }
        let Some(state) = self.state.clone() else {
            log(LogLevel::Error, "denied: plugin has no valid configuration");
            return self.deny(&[]);
        };
        let (config, counters) = (&state.config, &state.counters);
        // A host call that fails denies the request: it never reads as an empty request.
        let mut unreadable = None;
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(headers) => Headers::new(headers),
            Err(status) => {
                unreadable = Some(format!("request headers: {status:?}"));
                Headers::default()
            }
        };
        let peer = match config.uri_san_check {
            UriSanCheck::Xfcc => {
                match read_property(&["connection", "sha256_peer_certificate_digest"]) {
                    Ok(digest) => PeerFacts::Digest(digest),
                    Err(why) => PeerFacts::Unreadable(why),
                }
            }
            UriSanCheck::FirstOnly => {
                match read_property(&["connection", "uri_san_peer_certificate"]) {
                    Ok(uri) => PeerFacts::FirstUriSan(uri),
                    Err(why) => PeerFacts::Unreadable(why),
                }
            }
        };
        let input = HttpInput {
            headers,
            port: config
                .reads
                .port
                .then(|| port_property(&["destination", "port"]))
                .flatten(),
            sni: config
                .reads
                .sni
                .then(|| property(&["connection", "requested_server_name"]))
                .flatten(),
            node: node_facts(&state),
            unreadable,
        };
        let Ok(mut cache) = self.certificates.try_borrow_mut() else {
            log(LogLevel::Error, "denied: certificate cache in use");
            return self.deny(&[]);
        };
        let parsed_before = cache.parsed;
        let outcome = evaluate_http(
            config,
            input,
            &mut EnvoyCertificates {
                peer,
                cache: &mut cache,
            },
        );
        if cache.parsed != parsed_before {
            (&mut &*counters).increment("trustweave.peer_certificates_parsed");
        }
        drop(cache);
        metrics::record(
            &outcome.decision,
            outcome.no_identity.is_some(),
            &mut &*counters,
        );
        if let Some(line) = &outcome.log {
            log(LogLevel::Info, line);
        }
        if outcome.rego_error {
            (&mut &*counters).increment("trustweave.rego_errors");
        }
        if outcome.unverifiable.is_some() {
            (&mut &*counters).increment("trustweave.unverifiable_peer");
        }
        if outcome.forwarded_refused.is_some() {
            (&mut &*counters).increment("trustweave.forwarded_refused");
        }
        // On every outcome, before it is acted on: the access log and spans read
        // the request's headers after this filter, so they must be ours.
        let mut written = true;
        for name in &outcome.remove {
            written &= hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None).is_ok();
        }
        for (name, value) in &outcome.set {
            written &=
                hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)).is_ok();
        }
        if !outcome.decision.allowed {
            return self.respond(
                outcome.deny_status,
                &outcome.deny_body,
                &outcome.deny_headers,
            );
        }
        if !written {
            log(
                LogLevel::Error,
                "denied: request headers could not be rewritten",
            );
            return self.deny(&[]);
        }
        Action::Continue
    }
}

struct NetworkFilter {
    state: Option<Rc<State>>,
    decided: bool,
}

impl Context for NetworkFilter {}

impl StreamContext for NetworkFilter {
    fn on_downstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        if self.decided {
            return Action::Continue;
        }
        // The first bytes arrive after any TLS handshake: the peer certificate is known now.
        let allowed = match self.state.clone() {
            None => {
                log(
                    LogLevel::Error,
                    "denied connection: plugin has no valid configuration",
                );
                false
            }
            Some(state) => {
                let (config, counters) = (&state.config, &state.counters);
                let peer = match read_property(&["connection", "uri_san_peer_certificate"]) {
                    Ok(peer) => peer,
                    Err(why) => {
                        log(LogLevel::Error, &format!("denied connection: {why}"));
                        let _ = hostcalls::close_downstream();
                        return Action::Pause;
                    }
                };
                let sni = config
                    .reads
                    .sni
                    .then(|| property(&["connection", "requested_server_name"]))
                    .flatten();
                let input = NetworkInput {
                    peer_uri_san: peer.as_deref(),
                    sni: sni.as_deref(),
                    port: config
                        .reads
                        .port
                        .then(|| port_property(&["destination", "port"]))
                        .flatten(),
                    node: node_facts(&state),
                };
                let outcome = evaluate_network(config, &input);
                let mut sink = counters;
                if config.placement == config::Placement::Passthrough {
                    sink.increment(if outcome.decision.allowed {
                        "trustweave.sni_allowed"
                    } else {
                        "trustweave.sni_denied"
                    });
                } else {
                    metrics::record(&outcome.decision, outcome.no_identity.is_some(), &mut sink);
                }
                if let Some(line) = &outcome.log {
                    log(LogLevel::Info, line);
                }
                outcome.decision.allowed
            }
        };
        if allowed {
            self.decided = true;
            Action::Continue
        } else {
            // Nothing is passed on: the data stays here and the connection is closed.
            let _ = hostcalls::close_downstream();
            Action::Pause
        }
    }
}
