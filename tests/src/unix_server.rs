//! A gRPC server on a Unix socket that a test stops and restarts, as a SPIRE
//! agent restarts: both agent stand-ins serve through it.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

/// The socket, whether it is served, and the serving task.
#[derive(Debug)]
pub struct UnixServer {
    socket: PathBuf,
    serving: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl UnixServer {
    /// A server for `socket`, not serving yet.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            serving: watch::channel(false).0,
            task: Mutex::new(None),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Turns `false` when serving stops (open streams end on it).
    pub fn serving(&self) -> watch::Receiver<bool> {
        self.serving.subscribe()
    }

    /// (Re)starts serving `service` on the socket, replacing a stale socket file.
    pub fn start<S>(&self, service: S)
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir).expect("socket dir");
        }
        let listener = UnixListener::bind(&self.socket)
            .unwrap_or_else(|e| panic!("bind {}: {e}", self.socket.display()));
        self.serving.send_replace(true);
        let mut stop = self.serving.subscribe();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = stop.wait_for(|s| !*s).await;
                })
                .await;
        });
        *self.task.lock().expect("lock") = Some(task);
    }

    /// Stops serving: open streams end, the socket is removed.
    pub async fn stop(&self) {
        self.serving.send_replace(false);
        let task = self.task.lock().expect("lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
