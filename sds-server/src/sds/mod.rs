//! The Envoy SDS v3 gRPC service: `StreamSecrets`, `DeltaSecrets`, `FetchSecrets`.
//!
//! Each stream runs in its own task, owns a pure state machine ([`sotw`] or
//! [`delta`]) and reads only the shared snapshot channel. The node of a
//! stream's first request is kept; its metadata may ask for PEM trust
//! (`disable_spiffe_cert_validation`, as with SPIRE).

pub mod delta;
pub mod sotw;

use std::fmt::Write as _;
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
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn, Instrument};

use crate::metrics::{Metrics, ProtocolLabel};
use crate::render::{self, SecretNames, TrustFormat, SECRET_TYPE_URL};
use crate::snapshot::{IdentitySnapshot, Published};

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
        (self.0.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }
}

/// A short digest of named contents; changes whenever any content changes.
pub fn content_version<'a>(items: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = Sha256::new();
    for (name, bytes) in items {
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    }
    let digest = hasher.finalize();
    digest[..8].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The SDS service: shared, read-only state for every stream.
#[derive(Debug, Clone)]
pub struct SdsService {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    snapshots: watch::Receiver<Arc<Published>>,
    names: SecretNames,
    default_format: TrustFormat,
    metrics: Arc<Metrics>,
    nonces: NonceSource,
    stream_ids: AtomicU64,
}

impl SdsService {
    /// A service serving `names` from the snapshots published on `snapshots`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Published>>,
        names: SecretNames,
        default_format: TrustFormat,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                snapshots,
                names,
                default_format,
                metrics,
                nonces: NonceSource::default(),
                stream_ids: AtomicU64::new(0),
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
        warn!(?names, error = %message, "Envoy rejected secrets (NACK); not resending the same content");
    }

    fn record_push(
        &self,
        protocol: &'static str,
        published: &Published,
        names: &[String],
        version: &str,
    ) {
        self.metrics
            .pushes
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
        self.metrics
            .push_latency
            .observe(published.at.elapsed().as_secs_f64());
        debug!(?names, version, "pushed secrets");
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
    fn on_request(&mut self, request: &Self::Request) -> RequestVerdict;
    fn response(
        &mut self,
        snapshot: &IdentitySnapshot,
        names: &SecretNames,
        nonces: &NonceSource,
    ) -> Option<Self::Response>;
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
    fn response(
        &mut self,
        snapshot: &IdentitySnapshot,
        names: &SecretNames,
        nonces: &NonceSource,
    ) -> Option<DiscoveryResponse> {
        sotw::SotwStream::response(self, snapshot, names, nonces)
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
        snapshot: &IdentitySnapshot,
        names: &SecretNames,
        nonces: &NonceSource,
    ) -> Option<DeltaDiscoveryResponse> {
        delta::DeltaStream::response(self, snapshot, names, nonces)
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
    mut inbound: Streaming<P::Request>,
) -> ResponseStream<P::Response> {
    let (tx, rx) = mpsc::channel(4);
    let id = shared.stream_ids.fetch_add(1, Ordering::Relaxed) + 1;
    let span = tracing::info_span!("sds_stream", id, protocol = P::NAME);
    tokio::spawn(
        async move {
            let _open = OpenStream::new(Arc::clone(&shared.metrics), P::NAME);
            let mut snapshots = shared.snapshots.clone();
            let mut state = P::new(shared.default_format);
            let mut node_seen = false;
            let mut names: Vec<String> = Vec::new();
            loop {
                match next_event(&mut inbound, &mut snapshots).await {
                    Event::Closed => break,
                    Event::Snapshot => {}
                    Event::Request(request) => {
                        if let Err(status) = check_type_url(P::type_url(&request)) {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                        if !node_seen {
                            node_seen = true;
                            let node = P::node(&request);
                            state.set_format(shared.format_for(node));
                            info!(node = node.map(|n| n.id.as_str()).unwrap_or(""), names = ?P::names(&request), "SDS stream opened");
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
                        names = P::names(&request).to_vec();
                    }
                }
                let published = Arc::clone(&snapshots.borrow_and_update());
                if let Some(response) = state.response(&published.snapshot, &shared.names, &shared.nonces) {
                    let (sent, version) = P::describe(&response);
                    let sent = if sent.is_empty() { names.clone() } else { sent };
                    shared.record_push(P::NAME, &published, &sent, version);
                    if tx.send(Ok(response)).await.is_err() {
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
        Ok(Response::new(spawn_stream::<sotw::SotwStream>(
            Arc::clone(&self.inner),
            request.into_inner(),
        )))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Ok(Response::new(spawn_stream::<delta::DeltaStream>(
            Arc::clone(&self.inner),
            request.into_inner(),
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let shared = &self.inner;
        let request = request.into_inner();
        check_type_url(&request.type_url)?;
        let format = shared.format_for(request.node.as_ref());
        let published = Arc::clone(&shared.snapshots.borrow());
        let snapshot = &published.snapshot;
        let requested: Vec<String> = request
            .resource_names
            .iter()
            .filter(|n| !n.is_empty())
            .cloned()
            .collect();
        let requested = if requested.is_empty() {
            render::available_names(snapshot, &shared.names)
        } else {
            requested
        };
        let mut resources = Vec::with_capacity(requested.len());
        let mut missing = Vec::new();
        for name in &requested {
            match render::render(snapshot, &shared.names, format, name) {
                Some(secret) => resources.push(render::to_any(secret)),
                None => missing.push(name.as_str()),
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

/// The tonic server wrapper for [`SdsService`].
pub fn server(
    service: SdsService,
) -> envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer<SdsService>{
    envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer::new(service)
}
