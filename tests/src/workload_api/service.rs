//! The `SpiffeWorkloadAPI` gRPC service, written against tonic's server
//! primitives (no protoc): `FetchX509SVID` and `FetchX509Bundles` stream; the
//! JWT methods answer `Unimplemented`. Like SPIRE, every call must carry the
//! `workload.spiffe.io: true` header.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, StdError};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use super::proto::{X509BundlesRequest, X509BundlesResponse, X509SvidRequest, X509SvidResponse};
use super::Material;

/// The gRPC service name.
pub const SERVICE_NAME: &str = "SpiffeWorkloadAPI";
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Serves the current [`Material`] and every change to it.
#[derive(Clone)]
pub struct WorkloadApiService {
    material: watch::Receiver<Option<Arc<Material>>>,
    serving: watch::Receiver<bool>,
}

impl WorkloadApiService {
    /// A service reading `material`; its streams end when `serving` turns false.
    pub fn new(
        material: watch::Receiver<Option<Arc<Material>>>,
        serving: watch::Receiver<bool>,
    ) -> Self {
        Self { material, serving }
    }

    fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
        match request
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some("true") => Ok(()),
            _ => Err(Status::invalid_argument(
                "security header missing from request",
            )),
        }
    }

    /// A stream of `render(material)` on every material change until serving stops.
    fn watch_stream<T: Send + 'static>(
        &self,
        render: fn(&Material) -> T,
    ) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
        let mut material = self.material.clone();
        let mut serving = self.serving.clone();
        Box::pin(async_stream(move |tx| async move {
            loop {
                let current = material.borrow_and_update().clone();
                if let Some(current) = current {
                    if tx.send(Ok(render(&current))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = material.changed() => if changed.is_err() { return },
                    _ = async { serving.wait_for(|s| !*s).await.is_ok() } => {
                        let _ = tx.send(Err(Status::unavailable("agent stopped"))).await;
                        return;
                    }
                }
            }
        }))
    }
}

/// A stream fed by a spawned producer through a small channel (both agent stand-ins use it).
pub fn async_stream<T, F, Fut>(producer: F) -> impl Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(producer(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct FetchX509Svid(WorkloadApiService);

impl ServerStreamingService<X509SvidRequest> for FetchX509Svid {
    type Response = X509SvidResponse;
    type ResponseStream = BoxStream<X509SvidResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<X509SvidRequest>) -> Self::Future {
        let result = WorkloadApiService::check_header(&request)
            .map(|()| Response::new(self.0.watch_stream(Material::svid_response)));
        Box::pin(async move { result })
    }
}

struct FetchX509Bundles(WorkloadApiService);

impl ServerStreamingService<X509BundlesRequest> for FetchX509Bundles {
    type Response = X509BundlesResponse;
    type ResponseStream = BoxStream<X509BundlesResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<X509BundlesRequest>) -> Self::Future {
        let result = WorkloadApiService::check_header(&request)
            .map(|()| Response::new(self.0.watch_stream(Material::bundles_response)));
        Box::pin(async move { result })
    }
}

impl<B> tower::Service<http::Request<B>> for WorkloadApiService
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
        let service = self.clone();
        match request.uri().path() {
            "/SpiffeWorkloadAPI/FetchX509SVID" => Box::pin(async move {
                let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(FetchX509Svid(service), request).await)
            }),
            "/SpiffeWorkloadAPI/FetchX509Bundles" => Box::pin(async move {
                let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc
                    .server_streaming(FetchX509Bundles(service), request)
                    .await)
            }),
            _ => Box::pin(async move {
                Ok(Status::unimplemented("not served by the stand-in").into_http())
            }),
        }
    }
}

impl NamedService for WorkloadApiService {
    const NAME: &'static str = SERVICE_NAME;
}
