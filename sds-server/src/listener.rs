//! The SDS Unix socket: created safely, restricted by mode and peer credentials.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::warn;

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

/// Binds `path`, replacing a stale socket file left by a dead server, and sets `mode`.
pub async fn bind(path: &Path, mode: u32) -> Result<UnixListener, ListenerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ListenerError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ListenerError::InUse {
                    path: path.to_path_buf(),
                });
            }
            warn!(path = %path.display(), "replacing a stale socket file");
            std::fs::remove_file(path).map_err(|source| bind_error(path, source))?;
        }
        Ok(_) => {
            return Err(ListenerError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| bind_error(path, source))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| bind_error(path, source))?;
    Ok(listener)
}

fn bind_error(path: &Path, source: io::Error) -> ListenerError {
    ListenerError::Bind {
        path: path.to_path_buf(),
        source,
    }
}

/// Accepted connections, with peers whose UID is not in `allowed_uids` refused
/// (an empty list allows every peer the socket mode lets in).
pub fn incoming(
    listener: UnixListener,
    allowed_uids: Vec<u32>,
) -> impl Stream<Item = io::Result<UnixStream>> {
    UnixListenerStream::new(listener).filter_map(move |accepted| {
        let allowed = match &accepted {
            Ok(stream) if !allowed_uids.is_empty() => match stream.peer_cred() {
                Ok(cred) if allowed_uids.contains(&cred.uid()) => true,
                Ok(cred) => {
                    warn!(uid = cred.uid(), pid = ?cred.pid(), "refused SDS client: UID not allowed");
                    false
                }
                Err(error) => {
                    warn!(%error, "refused SDS client: peer credentials unavailable");
                    false
                }
            },
            _ => true,
        };
        std::future::ready(allowed.then_some(accepted))
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
