//! An OTLP/gRPC trace receiver (what an OpenTelemetry collector offers on
//! 4317): every Envoy's OpenTelemetry tracer exports its spans here, and the
//! test reads them back. It listens on a Unix socket, which Envoys in any
//! network namespace reach alike.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// One span as received.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// `service.name` of the exporting Envoy.
    pub service: String,
    /// Trace ID, hex.
    pub trace_id: String,
    /// Span ID, hex.
    pub span_id: String,
    /// Parent span ID, hex (empty for a root).
    pub parent_span_id: String,
    /// Operation name.
    pub name: String,
    /// String attributes (tags).
    pub attributes: BTreeMap<String, String>,
}

/// A running receiver.
#[derive(Clone)]
pub struct OtlpReceiver {
    socket: PathBuf,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

fn string_attributes(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some((kv.key.clone(), s.clone())),
            AnyValue::IntValue(i) => Some((kv.key.clone(), i.to_string())),
            AnyValue::BoolValue(b) => Some((kv.key.clone(), b.to_string())),
            _ => None,
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for OtlpReceiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| string_attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    name: span.name.clone(),
                    attributes: string_attributes(&span.attributes),
                });
            }
        }
        self.spans.lock().expect("spans").extend(received);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpReceiver {
    /// Starts the receiver on Unix socket `socket`.
    pub async fn start(socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind OTLP");
        let receiver = Self {
            socket: socket.to_path_buf(),
            spans: Arc::default(),
        };
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        receiver
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans").clone()
    }

    /// The spans of trace `trace_id`.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}
