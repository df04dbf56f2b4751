//! The Envoy SDS v3 gRPC service: `StreamSecrets`, `DeltaSecrets`, `FetchSecrets`.
//!
//! Each stream runs in its own task, owns a pure state machine ([`sotw`] or
//! [`delta`]) and reads only the shared snapshot channel. The node of a
//! stream's first request is kept; its metadata may ask for PEM trust
//! (`disable_spiffe_cert_validation`, as with SPIRE).

pub mod delta;
pub mod request_scan;
pub mod routes;
pub mod sotw;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::value::Kind;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use crate::identities::Identities;
use crate::metrics::{Metrics, ProtocolLabel, RefusalLabel};
use crate::peer::Peer;
use crate::published::Published;
use crate::render::{Rendered, SecretNames, TrustFormat, SECRET_TYPE_URL};

/// Most resource names one request (and one stream) may carry. Envoy asks for
/// one name per stream; SPIRE's agent and Istio's serve a handful.
pub const MAX_NAMES: usize = 100;
/// Longest resource name, in bytes (a SPIFFE ID's limit).
pub const MAX_NAME_LEN: usize = 2048;
/// Longest part of a requested name written to a log line.
const LOG_NAME_MAX: usize = 128;

/// Longest version string a Delta client may report (ours are 16 hex digits).
pub const MAX_VERSION_LEN: usize = 256;
pub use crate::peer::MAX_HELD_BYTES_PER_CONNECTION;

/// The count and length bounds on a list of names.
fn check_bounds(names: &[String], field: &str) -> Result<(), (&'static str, String)> {
    if names.len() > MAX_NAMES {
        return Err((
            "too_many_names",
            format!(
                "{field}: {} names in one request; at most {MAX_NAMES}",
                names.len()
            ),
        ));
    }
    if let Some(name) = names.iter().find(|n| n.len() > MAX_NAME_LEN) {
        return Err((
            "name_too_long",
            format!(
                "{field}: a resource name of {} bytes; at most {MAX_NAME_LEN}",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// The metric label of a request refused while it was read.
fn refused_label(status: &Status) -> &'static str {
    match status.code() {
        tonic::Code::InvalidArgument => {
            ["too_many_names", "too_many_elements", "malformed_request"]
                .into_iter()
                .find(|label| status.message().starts_with(label))
                .unwrap_or("malformed_request")
        }
        _ => "request_too_large",
    }
}

/// Why a request's names are refused (the stream ends with `InvalidArgument`).
fn check_names(names: &[String], secret_names: &SecretNames) -> Result<(), (&'static str, String)> {
    check_bounds(names, "resource names")?;
    for name in names {
        let known = name.is_empty()
            || name == "*"
            || *name == secret_names.default_svid
            || *name == secret_names.default_bundle
            || *name == secret_names.all_bundles
            || (name.starts_with(crate::render::TRUST_DOMAIN_PREFIX)
                && name.bytes().all(|b| b.is_ascii_graphic()));
        if !known {
            return Err((
                "unknown_name",
                format!(
                    "resource name {:?} is not a secret this server serves",
                    truncate(name)
                ),
            ));
        }
    }
    Ok(())
}

/// A name cut for logs.
fn truncate(name: &str) -> String {
    if name.len() <= LOG_NAME_MAX {
        return name.to_string();
    }
    let end = (0..=LOG_NAME_MAX)
        .rev()
        .find(|&i| name.is_char_boundary(i))
        .unwrap_or(0);
    format!(
        "{}…({} bytes)",
        name.get(..end).unwrap_or_default(),
        name.len()
    )
}

/// Names for a log line: at most 8, each truncated.
fn names_for_log(names: &[String]) -> Vec<String> {
    let mut shown: Vec<String> = names.iter().take(8).map(|n| truncate(n)).collect();
    if names.len() > 8 {
        shown.push(format!("…{} more", names.len().saturating_sub(8)));
    }
    shown
}

/// Node metadata key with which an Envoy asks for PEM trust instead of the SPIFFE validator.
pub const DISABLE_SPIFFE_VALIDATION_KEY: &str = "disable_spiffe_cert_validation";

/// What a stream does with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// Accepted; a response may now be due.
    Apply,
    /// Answers an older response (or a NACK of one); ignored.
    Stale,
    /// Envoy rejected the latest response.
    Nack {
        /// Envoy's explanation.
        message: String,
    },
}

/// Hands out nonces unique within this server process.
#[derive(Debug, Default)]
pub struct NonceSource(AtomicU64);

impl NonceSource {
    /// The next nonce.
    pub fn next(&self) -> String {
        self.0
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .to_string()
    }
}

/// The SDS service: shared, read-only state for every stream.
#[derive(Debug, Clone)]
pub struct SdsService {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    identities: Identities,
    names: SecretNames,
    default_format: TrustFormat,
    metrics: Arc<Metrics>,
    nonces: NonceSource,
    stream_ids: AtomicU64,
    /// Becomes `true` when the server shuts down: streams blocked on a stalled client end.
    shutdown: watch::Receiver<bool>,
}

impl SdsService {
    /// A service serving `names` from `identities`.
    pub fn new(
        identities: Identities,
        names: SecretNames,
        default_format: TrustFormat,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                identities,
                names,
                default_format,
                metrics,
                nonces: NonceSource::default(),
                stream_ids: AtomicU64::new(0),
                shutdown,
            }),
        }
    }
}

impl Shared {
    fn format_for(&self, node: Option<&Node>) -> TrustFormat {
        let asks_for_pem = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION_KEY))
            .and_then(|v| v.kind.as_ref())
            .is_some_and(|kind| match kind {
                Kind::BoolValue(b) => *b,
                Kind::StringValue(s) => s.eq_ignore_ascii_case("true"),
                _ => false,
            });
        if asks_for_pem {
            TrustFormat::Pem
        } else {
            self.default_format
        }
    }

    fn record_nack(&self, protocol: &'static str, names: &[String], message: &str) {
        self.metrics
            .nacks
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
        let names = names_for_log(names);
        let message = truncate(message);
        warn!(?names, error = %message, "Envoy rejected secrets (NACK); not resending the same content");
    }

    /// Counts a push; its latency only when an identity change caused it (the
    /// first answer to a new subscription measures nothing about propagation).
    fn record_push(
        &self,
        protocol: &'static str,
        caused_by_change: Option<&Published>,
        names: &[String],
        version: &str,
    ) {
        self.metrics
            .pushes
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
        if let Some(published) = caused_by_change {
            self.metrics
                .push_latency
                .observe(published.at.elapsed().as_secs_f64());
        }
        debug!(names = ?names_for_log(names), version, "pushed secrets");
    }

    fn refuse(&self, reason: &'static str) {
        self.metrics
            .refused
            .get_or_create(&RefusalLabel { reason })
            .inc();
    }
}

fn check_type_url(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "type_url {type_url:?} is not served here; only {SECRET_TYPE_URL}"
        )))
    }
}

/// Decrements the open-stream gauge when a stream task ends.
struct OpenStream {
    metrics: Arc<Metrics>,
    protocol: &'static str,
}

impl OpenStream {
    fn new(metrics: Arc<Metrics>, protocol: &'static str) -> Self {
        metrics
            .streams_open
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
        Self { metrics, protocol }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics
            .streams_open
            .get_or_create(&ProtocolLabel {
                protocol: self.protocol,
            })
            .dec();
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Outcome of one wake-up of a stream task.
enum Event<R> {
    Request(R),
    Snapshot,
    /// A request refused while it was read (too large, or past the bounds of
    /// [`request_scan`] before decoding).
    Refused(Status),
    Closed,
}

async fn next_event<R>(
    inbound: &mut Streaming<R>,
    snapshots: &mut watch::Receiver<Arc<Published>>,
) -> Event<R> {
    tokio::select! {
        message = inbound.message() => match message {
            Ok(Some(request)) => Event::Request(request),
            Ok(None) => Event::Closed,
            Err(status) if matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::ResourceExhausted) => {
                Event::Refused(status)
            }
            Err(status) => {
                debug!(%status, "stream ended by the client");
                Event::Closed
            }
        },
        changed = snapshots.changed() => match changed {
            Ok(()) => Event::Snapshot,
            Err(_) => Event::Closed,
        },
    }
}

/// What differs between the state-of-the-world and the incremental protocol.
trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// Metric and log label.
    const NAME: &'static str;
    fn new(format: TrustFormat) -> Self;
    fn set_format(&mut self, format: TrustFormat);
    fn type_url(request: &Self::Request) -> &str;
    fn node(request: &Self::Request) -> Option<&Node>;
    /// The names a request is about, for logs.
    fn names(request: &Self::Request) -> &[String];
    /// Bounds on what the request carries besides its names.
    fn check_rest(_request: &Self::Request) -> Result<(), (&'static str, String)> {
        Ok(())
    }
    /// Bytes of names and versions this stream holds (charged to its connection).
    fn held_bytes(&self) -> usize;
    fn on_request(&mut self, request: &Self::Request) -> RequestVerdict;
    fn response(&mut self, rendered: &Rendered, nonces: &NonceSource) -> Option<Self::Response>;
    /// Names explicitly subscribed on this stream.
    fn subscribed(&self) -> Option<usize>;
    /// Names and version of a response, for logs.
    fn describe(response: &Self::Response) -> (Vec<String>, &str);
}

impl Protocol for sotw::SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "sotw";
    fn new(format: TrustFormat) -> Self {
        sotw::SotwStream::new(format)
    }
    fn set_format(&mut self, format: TrustFormat) {
        sotw::SotwStream::set_format(self, format);
    }
    fn type_url(request: &DiscoveryRequest) -> &str {
        &request.type_url
    }
    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn names(request: &DiscoveryRequest) -> &[String] {
        &request.resource_names
    }
    fn on_request(&mut self, request: &DiscoveryRequest) -> RequestVerdict {
        sotw::SotwStream::on_request(self, request)
    }
    fn response(&mut self, rendered: &Rendered, nonces: &NonceSource) -> Option<DiscoveryResponse> {
        sotw::SotwStream::response(self, rendered, nonces)
    }
    fn subscribed(&self) -> Option<usize> {
        sotw::SotwStream::subscribed(self)
    }
    fn held_bytes(&self) -> usize {
        sotw::SotwStream::held_bytes(self)
    }
    fn describe(response: &DiscoveryResponse) -> (Vec<String>, &str) {
        (Vec::new(), &response.version_info)
    }
}

impl Protocol for delta::DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";
    fn new(format: TrustFormat) -> Self {
        delta::DeltaStream::new(format)
    }
    fn set_format(&mut self, format: TrustFormat) {
        delta::DeltaStream::set_format(self, format);
    }
    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }
    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn names(request: &DeltaDiscoveryRequest) -> &[String] {
        &request.resource_names_subscribe
    }
    fn on_request(&mut self, request: &DeltaDiscoveryRequest) -> RequestVerdict {
        delta::DeltaStream::on_request(self, request)
    }
    fn response(
        &mut self,
        rendered: &Rendered,
        nonces: &NonceSource,
    ) -> Option<DeltaDiscoveryResponse> {
        delta::DeltaStream::response(self, rendered, nonces)
    }
    fn subscribed(&self) -> Option<usize> {
        delta::DeltaStream::subscribed(self)
    }
    fn held_bytes(&self) -> usize {
        delta::DeltaStream::held_bytes(self)
    }
    fn check_rest(request: &DeltaDiscoveryRequest) -> Result<(), (&'static str, String)> {
        check_bounds(
            &request.resource_names_unsubscribe,
            "resource_names_unsubscribe",
        )?;
        if request.initial_resource_versions.len() > MAX_NAMES {
            return Err((
                "too_many_names",
                format!(
                    "initial_resource_versions: {} entries; at most {MAX_NAMES}",
                    request.initial_resource_versions.len()
                ),
            ));
        }
        for (name, version) in &request.initial_resource_versions {
            if name.len() > MAX_NAME_LEN || version.len() > MAX_VERSION_LEN {
                return Err((
                    "name_too_long",
                    format!("initial_resource_versions: an entry past {MAX_NAME_LEN} bytes of name or {MAX_VERSION_LEN} of version"),
                ));
            }
        }
        Ok(())
    }
    fn describe(response: &DeltaDiscoveryResponse) -> (Vec<String>, &str) {
        let mut names: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
        names.extend(response.removed_resources.iter().map(|n| format!("-{n}")));
        (names, &response.system_version_info)
    }
}

/// Runs one stream in its own task: requests and snapshot changes in, responses out.
fn spawn_stream<P: Protocol>(
    shared: Arc<Shared>,
    peer: Option<Peer>,
    mut inbound: Streaming<P::Request>,
) -> ResponseStream<P::Response> {
    let (tx, rx) = mpsc::channel(4);
    let id = shared
        .stream_ids
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(1);
    let span = tracing::info_span!("sds_stream", id, protocol = P::NAME);
    tokio::spawn(
        async move {
            let _open = OpenStream::new(Arc::clone(&shared.metrics), P::NAME);
            // Held for the stream's life: in node mode, its workload's subscription.
            let identity = shared.identities.for_peer(peer.as_ref(), &shared.metrics);
            let mut snapshots = identity.snapshots.clone();
            let mut shutdown = shared.shutdown.clone();
            let mut state = P::new(shared.default_format);
            let mut node_seen = false;
            let mut names: Vec<String> = Vec::new();
            let mut held = peer.as_ref().map(|p| p.budget.charge());
            loop {
                let event = tokio::select! {
                    event = next_event(&mut inbound, &mut snapshots) => event,
                    _ = shutdown.wait_for(|stop| *stop) => Event::Closed,
                };
                let caused_by_change = match event {
                    Event::Closed => break,
                    Event::Refused(status) => {
                        let reason = refused_label(&status);
                        shared.refuse(reason);
                        warn!(reason, "refused an SDS request: {}", truncate(status.message()));
                        let _ = tx.try_send(Err(status));
                        break;
                    }
                    Event::Snapshot => true,
                    Event::Request(request) => {
                        if let Err(status) = check_type_url(P::type_url(&request)) {
                            shared.refuse("type_url");
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                        if let Err((reason, message)) = check_names(P::names(&request), &shared.names).and_then(|()| P::check_rest(&request)) {
                            shared.refuse(reason);
                            warn!(reason, "refused an SDS request: {message}");
                            let _ = tx.try_send(Err(Status::invalid_argument(message)));
                            break;
                        }
                        if !node_seen {
                            node_seen = true;
                            let node = P::node(&request);
                            state.set_format(shared.format_for(node));
                            info!(node = node.map(|n| truncate(&n.id)).unwrap_or_default(), names = ?names_for_log(P::names(&request)), "SDS stream opened");
                        }
                        match state.on_request(&request) {
                            RequestVerdict::Stale => {
                                debug!("ignoring a request that answers an older response");
                                continue;
                            }
                            // Not resent: the response below only goes out if content changed.
                            RequestVerdict::Nack { message } => shared.record_nack(P::NAME, P::names(&request), &message),
                            RequestVerdict::Apply => {}
                        }
                        if state.subscribed().is_some_and(|n| n > MAX_NAMES) {
                            shared.refuse("too_many_names");
                            let _ = tx.try_send(Err(Status::invalid_argument(format!("more than {MAX_NAMES} names subscribed on one stream"))));
                            break;
                        }
                        if let Some(held) = held.as_mut() {
                            if !held.recharge(state.held_bytes()) {
                                shared.refuse("connection_budget");
                                warn!("refused an SDS request: the connection's streams would hold more than {MAX_HELD_BYTES_PER_CONNECTION} bytes of names");
                                let _ = tx.try_send(Err(Status::resource_exhausted(format!("this connection's streams hold more than {MAX_HELD_BYTES_PER_CONNECTION} bytes of names"))));
                                break;
                            }
                        }
                        names = P::names(&request).to_vec();
                        false
                    }
                };
                let published = Arc::clone(&snapshots.borrow_and_update());
                if let Some(response) = state.response(&published.rendered, &shared.nonces) {
                    let (sent, version) = P::describe(&response);
                    let sent = if sent.is_empty() { names.clone() } else { sent };
                    shared.record_push(P::NAME, caused_by_change.then_some(&*published), &sent, version);
                    // A client that stopped reading blocks only its own stream, and never shutdown.
                    let delivered = tokio::select! {
                        sent = tx.send(Ok(response)) => sent.is_ok(),
                        _ = shutdown.wait_for(|stop| *stop) => false,
                    };
                    if !delivered {
                        break;
                    }
                }
            }
            info!("SDS stream closed");
        }
        .instrument(span),
    );
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        Ok(Response::new(spawn_stream::<sotw::SotwStream>(
            Arc::clone(&self.inner),
            peer,
            request.into_inner(),
        )))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        Ok(Response::new(spawn_stream::<delta::DeltaStream>(
            Arc::clone(&self.inner),
            peer,
            request.into_inner(),
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let shared = &self.inner;
        let identity = shared
            .identities
            .for_peer(request.extensions().get::<Peer>(), &shared.metrics);
        let request = request.into_inner();
        check_type_url(&request.type_url)?;
        if let Err((reason, message)) = check_names(&request.resource_names, &shared.names) {
            shared.refuse(reason);
            return Err(Status::invalid_argument(message));
        }
        let format = shared.format_for(request.node.as_ref());
        if let Some(lease) = identity.lease {
            // Node mode: the workload's subscription may be new; wait (within
            // the caller's deadline, which tonic enforces) for SPIRE's first
            // answer, and keep the subscription a while so that repeated calls
            // reuse it instead of attesting again.
            if !lease
                .first_answer(crate::delegated::FETCH_FIRST_ANSWER_WAIT)
                .await
            {
                debug!(
                    pid = lease.pid(),
                    "no answer from SPIRE for this workload in time"
                );
            }
            let kept = Arc::clone(&lease);
            tokio::spawn(async move {
                tokio::time::sleep(crate::delegated::FETCH_LINGER).await;
                drop(kept);
            });
        }
        let published = Arc::clone(&identity.snapshots.borrow());
        let rendered = &published.rendered;
        let requested: Vec<String> = request
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        let requested = if requested.is_empty() {
            rendered.available().to_vec()
        } else {
            requested
        };
        let mut resources = Vec::with_capacity(requested.len());
        let mut missing = Vec::new();
        for name in &requested {
            match rendered.get(name, format) {
                Some(secret) => resources.push(secret.any.clone()),
                None => missing.push(truncate(name)),
            }
        }
        if !missing.is_empty() {
            return Err(Status::not_found(format!(
                "secrets not available: {missing:?}"
            )));
        }
        shared
            .metrics
            .pushes
            .get_or_create(&ProtocolLabel { protocol: "fetch" })
            .inc();
        Ok(Response::new(DiscoveryResponse {
            version_info: String::new(),
            resources,
            type_url: request.type_url,
            nonce: String::new(),
            ..Default::default()
        }))
    }
}

/// The tonic service for [`SdsService`] (see [`routes`] for its codec buffers).
pub fn server(service: SdsService) -> routes::SdsRoutes {
    routes::SdsRoutes(service)
}
