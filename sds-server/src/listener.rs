//! The SDS Unix socket: created atomically, restricted by mode and peer
//! credentials, and every connection bounded.
//!
//! - **Creation:** the socket is bound inside a fresh private (0700) directory
//!   next to its final path, given its mode there, and `rename`d into place: it
//!   never exists under its final name with the wrong mode, and a stale socket
//!   is replaced atomically. A live server or a non-socket at the path is never
//!   touched.
//! - **Who:** a peer whose UID (SO_PEERCRED, read at accept) is not allowed is
//!   refused; by default only the server's own UID is.
//! - **How many, how long:** connections are capped; a connection that sends
//!   nothing for the idle timeout (a dead peer, a half-open connection, a client
//!   that never completes the HTTP/2 preface) is closed — healthy Envoys answer
//!   the server's HTTP/2 keepalive pings well within it. Accept errors (e.g.
//!   descriptors exhausted) are logged once per episode, counted, and retried
//!   with backoff instead of spinning.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::peer::Peer;

/// Errors raised while preparing the SDS socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The socket's directory could not be created.
    #[error("cannot create directory {dir}: {source}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Something that is not a socket sits at the path; it is never deleted.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another server answers on the socket.
    #[error("{path} is in use by another live server")]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Binding or setting permissions failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Bounds on SDS clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most open connections.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// HTTP/2 keepalive ping interval (a peer must answer within it).
    pub keepalive: Duration,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_streams_per_connection: 100,
            keepalive: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit (as
/// Go's runtime and Envoy do): each SDS connection is a descriptor, and the
/// usual soft limit of 1,024 is below `--max-connections`'s default. Returns
/// the limit now in force.
pub fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current
}

/// The UID this process runs as (the owner of `/proc/self`).
pub fn own_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Binds `path` with `mode` atomically, replacing a stale socket left by a dead server.
pub async fn bind(path: &Path, mode: u32) -> Result<UnixListener, ListenerError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| ListenerError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ListenerError::InUse {
                    path: path.to_path_buf(),
                });
            }
            warn!(path = %path.display(), "replacing a stale socket file");
        }
        Ok(_) => {
            return Err(ListenerError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    // A private directory: nobody else can reach the socket before its mode is set.
    let private = dir.join(format!(
        ".trustweave-sds.{}.{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|source| bind_error(path, source))?;
    let staged = private.join("socket");
    let result = (|| {
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    result.map_err(|source| bind_error(path, source))
}

fn bind_error(path: &Path, source: io::Error) -> ListenerError {
    ListenerError::Bind {
        path: path.to_path_buf(),
        source,
    }
}

/// One accepted SDS connection: the stream, who is at the other end, its slot
/// under the connection cap, and its idle deadline.
pub struct Connection {
    stream: UnixStream,
    peer: Peer,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: Slot,
}

/// Holds a place under the connection cap; frees it (and the gauge) on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
    }
}

/// Every request of the connection carries its [`Peer`] in its extensions.
impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    match Instant::now().checked_add(self.idle_timeout) {
                        Some(deadline) => self.idle.as_mut().reset(deadline),
                        // Too far to represent: `sleep` saturates it.
                        None => self.idle = Box::pin(tokio::time::sleep(self.idle_timeout)),
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "SDS client sent nothing within the idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The accept loop's state.
struct Acceptor {
    listener: UnixListener,
    allowed_uids: Vec<u32>,
    limits: Limits,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    pin_peer_process: bool,
    pins: crate::peer::ProcessPins,
    failing: bool,
    backoff: Duration,
}

impl Acceptor {
    /// The next connection that passes every check (refusals are counted and dropped).
    async fn next(&mut self) -> Connection {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => {
                    if self.failing {
                        warn!("accepting SDS connections again");
                        self.failing = false;
                    }
                    self.backoff = Duration::from_millis(5);
                    stream
                }
                Err(error) => {
                    self.metrics.refuse("accept_error");
                    if !self.failing {
                        warn!(%error, "cannot accept SDS connections; backing off");
                        self.failing = true;
                    } else {
                        debug!(%error, "still cannot accept SDS connections");
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = self.backoff.saturating_mul(2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Some(uid) = self.peer_allowed(&stream) else {
                continue;
            };
            let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
                self.metrics.refuse("connections");
                warn!(
                    max = self.limits.max_connections,
                    "refused SDS client: too many connections"
                );
                continue;
            };
            self.metrics.connections_open.inc();
            let peer = if self.pin_peer_process {
                Peer::of(&stream, uid, &mut self.pins)
            } else {
                Peer::unpinned(uid)
            };
            return Connection {
                stream,
                peer,
                idle_timeout: self.limits.idle_timeout,
                idle: Box::pin(tokio::time::sleep(self.limits.idle_timeout)),
                _slot: Slot {
                    _permit: permit,
                    metrics: Arc::clone(&self.metrics),
                },
            };
        }
    }

    /// The peer's UID when it may connect.
    fn peer_allowed(&self, stream: &UnixStream) -> Option<u32> {
        match stream.peer_cred() {
            Ok(cred) if self.allowed_uids.contains(&cred.uid()) => Some(cred.uid()),
            Ok(cred) => {
                self.metrics.refuse("peer_uid");
                warn!(uid = cred.uid(), pid = ?cred.pid(), "refused SDS client: UID not allowed");
                None
            }
            Err(error) => {
                self.metrics.refuse("peer_uid");
                warn!(%error, "refused SDS client: peer credentials unavailable");
                None
            }
        }
    }
}

/// Accepted connections from peers whose UID is in `allowed_uids`, at most
/// `limits.max_connections` at once; with `pin_peer_process`, each carries a
/// pidfd of its peer's process (node mode).
pub fn incoming(
    listener: UnixListener,
    allowed_uids: Vec<u32>,
    limits: Limits,
    metrics: Arc<Metrics>,
    pin_peer_process: bool,
) -> impl Stream<Item = io::Result<Connection>> {
    let acceptor = Acceptor {
        listener,
        allowed_uids,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        metrics,
        pin_peer_process,
        pins: crate::peer::ProcessPins::default(),
        failing: false,
        backoff: Duration::from_millis(5),
    };
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let connection = acceptor.next().await;
        Some((Ok(connection), acceptor))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_and_files_are_not() {
        let dir = tempfile_dir();
        let path = dir.join("nested/sds.sock");
        let first = bind(&path, 0o600).await.expect("first bind");
        drop(first);
        // The file remains but nobody answers: stale, replaced.
        let second = bind(&path, 0o600).await.expect("rebind over stale socket");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing is left behind but the socket itself.
        let entries: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("sds.sock")]);
        // A live server is not displaced.
        let err = bind(&path, 0o600).await.expect_err("in use");
        assert!(matches!(err, ListenerError::InUse { .. }), "{err}");
        drop(second);
        let file = dir.join("plain");
        std::fs::write(&file, b"x").expect("write");
        let err = bind(&file, 0o600).await.expect_err("not a socket");
        assert!(matches!(err, ListenerError::NotASocket { .. }), "{err}");
        assert!(file.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tw-listener-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
