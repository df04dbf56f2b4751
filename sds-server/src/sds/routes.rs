//! The gRPC routes of the SDS service, with codec buffers sized for SDS.
//!
//! The same three methods as the generated `SecretDiscoveryServiceServer`, but
//! its codec gives every stream an 8 KiB decode buffer and an 8 KiB encode
//! buffer up front — 32 KiB per Envoy (two streams), for requests of a few
//! hundred bytes. Here both start at [`CODEC_BUFFER`] and grow only as a
//! message needs; a request is at most [`MAX_REQUEST_BYTES`], and its wire
//! bytes are checked against the bounds of [`super::request_scan`] before
//! anything is decoded.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Buf;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::codegen::{http, BoxFuture, StdError};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use super::{request_scan, SdsService};

/// Initial size of each stream's encode and decode buffer.
pub const CODEC_BUFFER: usize = 1024;
/// Largest request read. Envoy's requests are a few hundred bytes to a few
/// KiB (Istio's node metadata); a larger one ends its stream with
/// `RESOURCE_EXHAUSTED` and is counted.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// The gRPC service name.
const SERVICE: &str = "envoy.service.secret.v3.SecretDiscoveryService";

/// Prost encoding with right-sized buffers.
struct SdsCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SdsCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T, U> Codec for SdsCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ScannedDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ScannedDecoder(ProstCodec::<T, U>::raw_decoder(settings()))
    }
}

/// Prost decoding behind [`request_scan::scan`]: a request past the bounds is
/// refused with `INVALID_ARGUMENT` before one element of it is allocated.
struct ScannedDecoder<D>(D);

impl<D> Decoder for ScannedDecoder<D>
where
    D: Decoder<Error = Status>,
{
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        // The decode buffer is one contiguous `BytesMut`: its chunk is the whole message.
        if src.chunk().len() != src.remaining() {
            return Err(Status::internal("request split across decode buffers"));
        }
        if let Err(error) = request_scan::scan(src.chunk()) {
            return Err(refusal(&error));
        }
        self.0.decode(src)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The status a request refused by the scan ends its stream with: its
/// message starts with the metric label, so that the stream can count it.
fn refusal(error: &request_scan::ScanError) -> Status {
    Status::invalid_argument(format!("{}: {error}", error.label()))
}

fn settings() -> BufferSettings {
    BufferSettings::new(CODEC_BUFFER, 32 * 1024)
}

fn grpc<T, U>() -> Grpc<SdsCodec<T, U>>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    Grpc::new(SdsCodec::default()).apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None)
}

/// The SDS service as a tower service for tonic's router.
#[derive(Clone, Debug)]
pub struct SdsRoutes(pub SdsService);

struct StreamSecrets(SdsService);

impl StreamingService<DiscoveryRequest> for StreamSecrets {
    type Response = DiscoveryResponse;
    type ResponseStream = <SdsService as SecretDiscoveryService>::StreamSecretsStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.stream_secrets(request).await })
    }
}

struct DeltaSecrets(SdsService);

impl StreamingService<DeltaDiscoveryRequest> for DeltaSecrets {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = <SdsService as SecretDiscoveryService>::DeltaSecretsStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.delta_secrets(request).await })
    }
}

struct FetchSecrets(SdsService);

impl UnaryService<DiscoveryRequest> for FetchSecrets {
    type Response = DiscoveryResponse;
    type Future = BoxFuture<Response<DiscoveryResponse>, Status>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.fetch_secrets(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for SdsRoutes
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.0.clone();
        let method = request
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .map(str::to_string);
        Box::pin(async move {
            Ok(match method.as_deref() {
                Some("StreamSecrets") => {
                    grpc::<DiscoveryResponse, DiscoveryRequest>()
                        .streaming(StreamSecrets(service), request)
                        .await
                }
                Some("DeltaSecrets") => {
                    grpc::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>()
                        .streaming(DeltaSecrets(service), request)
                        .await
                }
                Some("FetchSecrets") => {
                    grpc::<DiscoveryResponse, DiscoveryRequest>()
                        .unary(FetchSecrets(service), request)
                        .await
                }
                _ => Status::unimplemented("not an SDS method").into_http(),
            })
        })
    }
}

impl NamedService for SdsRoutes {
    const NAME: &'static str = SERVICE;
}
