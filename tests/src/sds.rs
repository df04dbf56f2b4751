//! trustweave-sds in-process, and an SDS client that plays Envoy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;
use trustweave_sds::config::{ServerConfig, Source};
use trustweave_sds::delegated::DelegatedConfig;
use trustweave_sds::inspect::{report_secret, SecretReport};
use trustweave_sds::render::{SecretNames, TrustFormat, SECRET_TYPE_URL};
use trustweave_sds::source::SourceConfig;
use trustweave_sds::RunningServer;

use crate::wait::wait_until;

/// A server configuration for tests: admin on an ephemeral loopback port, fast reconnects.
pub fn test_config(sds_socket: &Path, workload_api_endpoint: &str) -> ServerConfig {
    ServerConfig {
        source: Source::WorkloadApi(SourceConfig {
            endpoint: workload_api_endpoint.to_string(),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            first_context_timeout: Duration::from_secs(2),
        }),
        sds_socket: sds_socket.to_path_buf(),
        socket_mode: 0o600,
        allowed_uids: trustweave_sds::listener::own_uid().into_iter().collect(),
        limits: trustweave_sds::listener::Limits::default(),
        names: SecretNames::default(),
        trust_format: TrustFormat::Spiffe,
        admin_addr: Some("127.0.0.1:0".parse().expect("addr")),
        debug_addr: None,
    }
}

/// A node-mode configuration for tests: the Delegated Identity API at `admin_endpoint`.
pub fn node_config(sds_socket: &Path, admin_endpoint: &str) -> ServerConfig {
    ServerConfig {
        source: Source::Delegated(DelegatedConfig {
            endpoint: admin_endpoint.to_string(),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        }),
        ..test_config(sds_socket, admin_endpoint)
    }
}

/// Starts trustweave-sds and waits until it is ready (per pod: holds a valid
/// SVID; per node: holds the agent's bundles).
pub async fn start_ready(config: ServerConfig) -> RunningServer {
    let server = trustweave_sds::start(config)
        .await
        .expect("start trustweave-sds");
    wait_until("trustweave-sds ready", Duration::from_secs(10), || async {
        server.is_ready()
    })
    .await;
    server
}

/// An SDS gRPC client on a Unix socket.
pub async fn client(socket: &Path) -> SecretDiscoveryServiceClient<Channel> {
    let channel = trustweave_sds::inspect::connect(socket)
        .await
        .expect("connect to SDS socket");
    SecretDiscoveryServiceClient::new(channel)
}

/// Decodes a response resource into a `Secret`, checking its type URL.
pub fn decode_secret(any: &Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    Secret::decode(any.value.as_slice()).expect("decode Secret")
}

/// What a resource holds, as `inspect` reports it (never the key).
pub fn report(any: &Any) -> SecretReport {
    let secret = decode_secret(any);
    report_secret(&secret.name.clone(), &secret)
}

/// The next message of a response stream; fails the test after 10 s or on a closed stream.
async fn next_message<T>(responses: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response within 10 s")
        .expect("stream healthy")
        .expect("stream open")
}

/// A state-of-the-world stream, driven request by request as Envoy would.
pub struct SotwClient {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    /// Nonce of the last response received.
    pub last_nonce: String,
    /// Version of the last response received.
    pub last_version: String,
}

impl SotwClient {
    /// Opens `StreamSecrets` on `socket`.
    pub async fn open(socket: &Path) -> Self {
        let (requests, rx) = mpsc::channel(8);
        let responses = client(socket)
            .await
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .expect("open StreamSecrets")
            .into_inner();
        Self {
            requests,
            responses,
            last_nonce: String::new(),
            last_version: String::new(),
        }
    }

    /// Sends a raw request.
    pub async fn send(&self, request: DiscoveryRequest) {
        self.requests.send(request).await.expect("send request");
    }

    /// Subscribes to `names`, acknowledging the last response (first request: with `node`).
    pub async fn request(&self, names: &[&str], node: Option<Node>) {
        self.send(DiscoveryRequest {
            node,
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            version_info: self.last_version.clone(),
            response_nonce: self.last_nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// Rejects the last response (NACK), keeping `names`.
    pub async fn nack(&self, names: &[&str], message: &str) {
        self.send(DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            version_info: String::new(),
            response_nonce: self.last_nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: message.to_string(),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .await;
    }

    /// The next response, failing the test if none comes within 10 s.
    pub async fn next(&mut self) -> DiscoveryResponse {
        let response = next_message(&mut self.responses).await;
        self.last_nonce = response.nonce.clone();
        self.last_version = response.version_info.clone();
        response
    }

    /// The next response if one is ready, else waits (for polling loops with a timeout).
    pub async fn try_next(&mut self) -> Option<DiscoveryResponse> {
        let response = self.responses.message().await.ok().flatten()?;
        self.last_nonce = response.nonce.clone();
        self.last_version = response.version_info.clone();
        Some(response)
    }

    /// The status the server ended the stream with (fails the test after 10 s or on a response).
    pub async fn refused(&mut self) -> tonic::Status {
        refusal(&mut self.responses).await
    }

    /// Asserts nothing arrives for `quiet` (used only where absence is the behaviour under test).
    pub async fn expect_nothing(&mut self, quiet: Duration) {
        if let Ok(message) = tokio::time::timeout(quiet, self.responses.message()).await {
            panic!(
                "expected no response, got {:?}",
                message.map(|m| m.map(|r| r.version_info))
            );
        }
    }
}

/// An incremental stream, driven as Envoy would.
pub struct DeltaClient {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
    /// Nonce of the last response received.
    pub last_nonce: String,
}

impl DeltaClient {
    /// Opens `DeltaSecrets` on `socket`.
    pub async fn open(socket: &Path) -> Self {
        let (requests, rx) = mpsc::channel(8);
        let responses = client(socket)
            .await
            .delta_secrets(ReceiverStream::new(rx))
            .await
            .expect("open DeltaSecrets")
            .into_inner();
        Self {
            requests,
            responses,
            last_nonce: String::new(),
        }
    }

    /// Sends a raw request.
    pub async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.expect("send request");
    }

    /// Subscribes to and unsubscribes from names, acknowledging the last response.
    pub async fn change(&self, subscribe: &[&str], unsubscribe: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.to_string(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
            response_nonce: self.last_nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// The next response, failing the test if none comes within 10 s.
    pub async fn next(&mut self) -> DeltaDiscoveryResponse {
        let response = next_message(&mut self.responses).await;
        self.last_nonce = response.nonce.clone();
        response
    }

    /// The status the server ended the stream with (fails the test after 10 s or on a response).
    pub async fn refused(&mut self) -> tonic::Status {
        refusal(&mut self.responses).await
    }
}

/// The status a server ended `responses` with (fails the test after 10 s or on a response).
async fn refusal<T>(responses: &mut Streaming<T>) -> tonic::Status {
    match tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("the stream ends within 10 s")
    {
        Err(status) => status,
        // Never the response itself: it may hold a private key.
        Ok(Some(_)) => panic!("expected the stream to be refused, got a response"),
        Ok(None) => panic!("expected the stream to be refused, it ended cleanly"),
    }
}

/// A scratch directory for sockets; Unix socket paths must stay short.
pub fn socket_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tw-")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// `dir/name` as a path.
pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// A `StreamSecrets` client that subscribes and then never reads: its HTTP/2
/// stream window is 1 KiB, so the server's sends to it block almost at once
/// (while its connection still answers pings, as a stuck Envoy's would).
pub struct StalledClient {
    _request_body: h2::SendStream<bytes::Bytes>,
    _response: h2::client::ResponseFuture,
}

impl StalledClient {
    /// Connects to `socket` and subscribes to `names`.
    pub async fn open(socket: &Path, names: &[&str]) -> Self {
        let io = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(1024)
            .handshake::<_, bytes::Bytes>(io)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = http::Request::post(
            "http://sds/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        )
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
        let mut send = send.ready().await.expect("ready");
        let (response, mut body) = send.send_request(request, false).expect("send request");
        let message = DiscoveryRequest {
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&u32::try_from(message.len()).expect("size").to_be_bytes());
        frame.extend_from_slice(&message);
        body.send_data(bytes::Bytes::from(frame), false)
            .expect("send message");
        Self {
            _request_body: body,
            _response: response,
        }
    }
}
