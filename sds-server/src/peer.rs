//! Who is at the other end of an SDS connection: the peer's process, taken at accept.
//!
//! The kernel records the peer's credentials when it connects (SO_PEERCRED).
//! A PID alone is a name that can be reused once the process exits, so the
//! server pins it with a *pidfd* (`pidfd_open`) right at accept. A pidfd always
//! refers to one process: it becomes readable when that process exits, so the
//! server can tell "still the same process" (not readable) from "gone, the PID
//! may now be someone else's" (readable) — the rule SPIRE's Delegated Identity
//! API leaves to its callers.
//!
//! The one window left is between the peer's `connect` and our `accept`: a
//! peer that exits inside it, with its PID reused inside it too, would be
//! mistaken for the new holder. SO_PEERPIDFD (Linux ≥ 6.5) closes it; `rustix`
//! does not expose it yet and this crate forbids `unsafe`.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, Pid, PidfdFlags};
use tokio::net::UnixStream;

/// How often a pinned process is checked for exit.
pub const EXIT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A handle on one process that stays bound to it (never to a later holder of its PID).
#[derive(Debug)]
pub struct ProcessHandle {
    pid: u32,
    pidfd: OwnedFd,
}

impl ProcessHandle {
    /// A handle on the process that has `pid` now.
    pub fn open(pid: u32) -> io::Result<Self> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a PID"))?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
        Ok(Self { pid, pidfd })
    }

    /// The process's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (its PID may then name another process).
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(0) => false,
            Ok(_) => true,
            // A handle that cannot be polled proves nothing: treat the process as gone.
            Err(_) => true,
        }
    }

    /// Resolves when the process exits (noticed within [`EXIT_CHECK_INTERVAL`]).
    ///
    /// Polled rather than registered with the reactor: tokio's `AsyncFd`
    /// registration is `unsafe` and this crate forbids it. Most exits are
    /// seen sooner anyway, as the kernel closes the process's SDS connections.
    pub async fn exited(&self) {
        while !self.has_exited() {
            tokio::time::sleep(EXIT_CHECK_INTERVAL).await;
        }
    }
}

/// The PID the kernel recorded for the peer of `stream` when it connected.
pub fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    stream
        .peer_cred()?
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer has no PID in this PID namespace",
            )
        })
}

/// Pins the processes of accepted connections, one pidfd per live process:
/// an Envoy opens a connection or two, but a thousand workloads must not cost
/// two descriptors per connection. Owned by the accept loop.
#[derive(Debug, Default)]
pub struct ProcessPins {
    pinned: std::collections::HashMap<u32, std::sync::Weak<ProcessHandle>>,
    inserted: usize,
}

impl ProcessPins {
    /// The pinned process of `pid`: the live handle already held for it (a
    /// live process holds its PID, so it is the same process), or a new one.
    pub fn pin(&mut self, pid: u32) -> io::Result<Arc<ProcessHandle>> {
        if let Some(held) = self.pinned.get(&pid).and_then(std::sync::Weak::upgrade) {
            if !held.has_exited() {
                return Ok(held);
            }
        }
        let handle = Arc::new(ProcessHandle::open(pid)?);
        self.pinned.insert(pid, Arc::downgrade(&handle));
        self.inserted += 1;
        if self.inserted.is_multiple_of(1024) {
            self.pinned.retain(|_, held| held.strong_count() > 0);
        }
        Ok(handle)
    }

    /// Processes pinned now.
    pub fn len(&self) -> usize {
        self.pinned
            .values()
            .filter(|h| h.strong_count() > 0)
            .count()
    }

    /// Whether no process is pinned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The peer of one accepted SDS connection, handed to every stream it opens.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's UID (SO_PEERCRED).
    pub uid: u32,
    /// The peer's process, when it could be pinned.
    pub process: Option<Arc<ProcessHandle>>,
}

impl Peer {
    /// Reads the peer of `stream` at accept, pinning its process through `pins`.
    pub fn of(stream: &UnixStream, uid: u32, pins: &mut ProcessPins) -> Self {
        Self {
            uid,
            process: peer_pid(stream).and_then(|pid| pins.pin(pid)).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_of_one_live_process_share_one_pidfd() {
        let mut pins = ProcessPins::default();
        let first = pins.pin(std::process::id()).expect("pin");
        let second = pins.pin(std::process::id()).expect("pin");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(pins.len(), 1);
        drop((first, second));
        assert!(pins.is_empty());
    }

    #[tokio::test]
    async fn the_peer_of_a_socket_is_the_connecting_process() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let handle = ProcessHandle::open(peer_pid(&a).expect("peer pid")).expect("pidfd");
        assert_eq!(handle.pid(), std::process::id());
        assert!(!handle.has_exited());
    }
}
