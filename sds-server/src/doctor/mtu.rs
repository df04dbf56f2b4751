//! Path MTU at a gateway: the MSS a peer's connection to it gets (what the
//! gateway advertises, clamped or not) and whether the server certificate
//! flight crosses the cloud perimeter in segments that fit its path MTU.
//! Handshakes stall, not fail, when a segment exceeds a tunnel's MTU and the
//! ICMP "fragmentation needed" is filtered — hence the 1300 clamp.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::report::{Check, Status};

/// The MSS the shipped EnvoyFilter (`istio/envoyfilter-gateway-mss.yaml`) sets.
pub const CLAMP: u32 = 1300;
/// IPv4 and TCP headers (without options) on each segment.
const HEADERS: u32 = 40;

/// Checks the gateway at `address` (`ip:port`) from here; with `sni`, also
/// measures the certificate chain the service behind it presents.
pub async fn check(name: &str, address: &str, sni: Option<&str>, path_mtu: u32) -> Check {
    let holder = format!("gateway {name}");
    let stream = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Check::new(&holder, address, Status::Unreachable, e.to_string()),
        Err(_) => return Check::new(&holder, address, Status::Unreachable, "connect timed out"),
    };
    let mss = match socket2::SockRef::from(&stream).tcp_mss() {
        Ok(mss) => mss,
        Err(e) => {
            return Check::new(
                &holder,
                address,
                Status::Unreachable,
                format!("TCP_MAXSEG: {e}"),
            )
        }
    };
    let route_mtu = rustix::net::sockopt::ip_mtu(&stream).ok();
    let chain = match sni {
        Some(sni) => chain_size(stream, sni).await,
        None => None,
    };
    let segment = mss.saturating_add(HEADERS);
    let flight = match chain {
        Some((certs, bytes)) => format!(
            "; the certificate chain behind it ({certs} certs, {bytes} bytes) takes {} segment(s)",
            bytes.div_ceil(mss.max(1) as usize)
        ),
        None => String::new(),
    };
    let route = route_mtu.map_or(String::new(), |mtu| format!(", route MTU {mtu}"));
    if mss <= CLAMP && segment <= path_mtu {
        Check::new(
            &holder,
            address,
            Status::Ok,
            format!("MSS {mss} (clamped){route}: segments of ≤ {segment} bytes fit the {path_mtu}-byte path MTU{flight}"),
        )
    } else {
        Check::new(
            &holder,
            address,
            Status::NoClamp,
            format!("MSS {mss}{route}: segments of {segment} bytes exceed the {path_mtu}-byte cross-cloud path MTU{flight}; handshakes stall where ICMP is filtered"),
        )
        .fix(format!("clamp the MSS on :15443 to {CLAMP}: `kubectl apply -f istio/envoyfilter-gateway-mss.yaml`"))
    }
}

/// The number and total size of the certificates the server behind `sni` presents.
async fn chain_size(stream: tokio::net::TcpStream, sni: &str) -> Option<(usize, usize)> {
    let name = ServerName::try_from(sni.to_string()).ok()?;
    let (config, recorder) = super::endpoint::recording_client_config().ok()?;
    // The handshake may end without a client certificate; the chain came first.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream),
    )
    .await;
    let chain = recorder.chain();
    (!chain.is_empty()).then(|| (chain.len(), chain.iter().map(Vec::len).sum()))
}
