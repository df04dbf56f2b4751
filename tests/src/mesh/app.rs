//! The workload behind each sidecar: an echo service that answers with the
//! headers it received, and relays when asked — the way the users' services
//! call each other through their own sidecar, propagating the trace context
//! (`traceparent`, `tracestate`) and `baggage` they received.
//!
//! A request carrying `x-hops: host/action,host/action` is relayed to the
//! first `host` (through this workload's sidecar outbound listener) asking for
//! `action`, with the rest of the hops; the answer embeds the relayed answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::netns::Site;
use crate::http;

/// Header naming the hops still to make.
pub const HOPS_HEADER: &str = "x-hops";
/// The action header the filter reads (`action_header` in the shipped configuration).
pub const ACTION_HEADER: &str = "x-trustweave-action";
/// Headers a service propagates on its onward calls.
const PROPAGATED: [&str; 3] = ["traceparent", "tracestate", "baggage"];

/// A running workload application.
pub struct App {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
}

impl App {
    /// Serves on `addr` in `site` as `name`; onward calls go to `sidecar_outbound`.
    pub async fn start(
        site: &Site,
        addr: SocketAddr,
        name: &str,
        sidecar_outbound: SocketAddr,
    ) -> Self {
        let listener: TcpListener = site.bind(addr).await.expect("bind app");
        let site = site.clone();
        let received = Arc::new(AtomicUsize::new(0));
        let (counter, name) = (Arc::clone(&received), name.to_string());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let (name, site) = (name.clone(), site.clone());
                tokio::spawn(async move {
                    let Some(headers) = http::read_request_headers(&mut stream).await else {
                        return;
                    };
                    let body = answer(&name, headers, &site, sidecar_outbound)
                        .await
                        .to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Self { addr, received }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests that reached it.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

async fn answer(
    name: &str,
    headers: BTreeMap<String, Vec<String>>,
    site: &Site,
    sidecar_outbound: SocketAddr,
) -> Value {
    let first = |h: &str| headers.get(h).and_then(|v| v.first()).cloned();
    let next = match first(HOPS_HEADER) {
        Some(hops) => {
            let (hop, rest) = hops.split_once(',').unwrap_or((&hops, ""));
            let (host, action) = hop.split_once('/').unwrap_or((hop, ""));
            let mut onward: Vec<(&str, String)> = vec![
                ("host", host.to_string()),
                (ACTION_HEADER, action.to_string()),
            ];
            if !rest.is_empty() {
                onward.push((HOPS_HEADER, rest.to_string()));
            }
            for h in PROPAGATED {
                if let Some(v) = first(h) {
                    onward.push((h, v));
                }
            }
            let onward: Vec<(&str, &str)> = onward.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let response = match site.connect(sidecar_outbound).await {
                Ok(stream) => http::request_on(stream, "GET", "/", &onward).await,
                Err(e) => Err(e),
            };
            match response {
                Ok(r) => json!({
                    "status": r.status,
                    "answer": serde_json::from_str::<Value>(&r.body).unwrap_or(json!(r.body)),
                }),
                Err(e) => json!({ "status": 0, "answer": e.to_string() }),
            }
        }
        None => Value::Null,
    };
    json!({ "service": name, "headers": headers, "next": next })
}
