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
//! As SPIRE's peertracker (`pkg/common/peertracker/tracker_linux.go`) does, the
//! pinned process must also *be* the peer: its `/proc/<pid>` owner (UID and
//! GID) must be the socket's credentials, and its start time is recorded, so
//! two handles on one PID are the same process only if their start times agree.
//!
//! The PIDs are handed to the SPIRE agent, which reads them in *its* PID
//! namespace: [`check_agent_pid_namespace`] refuses an agent that does not
//! share this server's.
//!
//! The one window left is between the peer's `connect` and our `accept`: a
//! peer that exits inside it, with its PID reused inside it too by a process
//! of the same UID and GID, would be mistaken for the new holder.
//! SO_PEERPIDFD (Linux ≥ 6.5) closes it; `rustix` does not expose it yet and
//! this crate forbids `unsafe`.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Clock ticks after boot at which the process started (`/proc/<pid>/stat`, field 22).
    start_time: u64,
    pidfd: OwnedFd,
}

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`, after the
/// parenthesised command name, which may itself hold spaces and parentheses).
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/stat");
    let after_name = stat.rfind(')').ok_or_else(bad)?;
    // Fields after the name start at field 3 (state); the start time is field 22.
    stat.get(after_name.saturating_add(1)..)
        .ok_or_else(bad)?
        .split_ascii_whitespace()
        .nth(22 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(bad)
}

impl ProcessHandle {
    /// A handle on the process that has `pid` now.
    pub fn open(pid: u32) -> io::Result<Self> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a PID"))?;
        let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
        let start_time = start_time(pid)?;
        let handle = Self {
            pid,
            start_time,
            pidfd,
        };
        // Read after the pidfd was opened and before it says "exited": the
        // start time is the pinned process's own.
        if handle.has_exited() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the process exited",
            ));
        }
        Ok(handle)
    }

    /// A handle on the peer process `pid`, which must run as `uid`/`gid` (the
    /// socket's credentials) — the owner of its `/proc/<pid>`, as SPIRE checks.
    pub fn open_peer(pid: u32, uid: u32, gid: u32) -> io::Result<Self> {
        let handle = Self::open(pid)?;
        let owner = std::fs::metadata(format!("/proc/{pid}"))?;
        if (owner.uid(), owner.gid()) != (uid, gid) || handle.has_exited() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the process holding PID {pid} runs as {}:{}, not as the peer's {uid}:{gid}",
                    owner.uid(),
                    owner.gid()
                ),
            ));
        }
        Ok(handle)
    }

    /// The process's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether `other` is a handle on this very process (same PID, same start time).
    pub fn is_same_process(&self, other: &ProcessHandle) -> bool {
        self.pid == other.pid && self.start_time == other.start_time
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

/// The credentials the kernel recorded for the peer of `stream` when it
/// connected: PID (in this PID namespace), UID, GID.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<(u32, u32, u32)> {
    let cred = stream.peer_cred()?;
    let pid = cred
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer has no PID in this PID namespace",
            )
        })?;
    Ok((pid, cred.uid(), cred.gid()))
}

/// The PID the kernel recorded for the peer of `stream` when it connected.
pub fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    peer_credentials(stream).map(|(pid, _, _)| pid)
}

/// How many PID namespaces, from this server's down to its own, hold `pid`
/// (the `NSpid` line of `/proc/<pid>/status`): 1 means it shares ours.
pub fn pid_namespace_depth(pid: u32) -> io::Result<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .map(|pids| pids.split_ascii_whitespace().count())
        .filter(|depth| *depth > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no NSpid in /proc/<pid>/status"))
}

/// Checks that the SPIRE agent behind the admin socket `endpoint` shares this
/// server's PID namespace: the PIDs this server sends it are read in the
/// agent's namespace, so any other would attest the wrong processes. An agent
/// that cannot be reached passes (the subscription will fail and be retried).
pub async fn check_agent_pid_namespace(endpoint: &str) -> Result<(), String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let Ok(stream) = UnixStream::connect(path).await else {
        return Ok(());
    };
    let (pid, _, _) = peer_credentials(&stream).map_err(|_| {
        "the SPIRE agent's process is not visible in this server's PID namespace (run both with the host's: hostPID)".to_string()
    })?;
    match pid_namespace_depth(pid) {
        Ok(1) => Ok(()),
        Ok(_) => Err(format!(
            "the SPIRE agent (PID {pid} here) runs in a PID namespace of its own: it would read this server's PIDs as other processes (run both with the host's: hostPID)"
        )),
        Err(error) => Err(format!("cannot read the SPIRE agent's PID namespace: {error}")),
    }
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
    /// The pinned peer process of `pid` running as `uid`/`gid`: the live
    /// handle already held for it (a live process holds its PID, so it is the
    /// same process), or a new one.
    pub fn pin(&mut self, pid: u32, uid: u32, gid: u32) -> io::Result<Arc<ProcessHandle>> {
        let handle = Arc::new(ProcessHandle::open_peer(pid, uid, gid)?);
        if let Some(held) = self.pinned.get(&pid).and_then(std::sync::Weak::upgrade) {
            if !held.has_exited() && held.is_same_process(&handle) {
                return Ok(held);
            }
        }
        self.pinned.insert(pid, Arc::downgrade(&handle));
        self.inserted = self.inserted.wrapping_add(1);
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

/// Most bytes of names and versions all streams of one connection may hold
/// together (Envoy holds a few dozen; see SECURITY.md for the worst case).
pub const MAX_HELD_BYTES_PER_CONNECTION: usize = 64 << 10;

/// What the streams of one connection hold, against
/// [`MAX_HELD_BYTES_PER_CONNECTION`]: a connection's many streams share one budget.
#[derive(Debug, Default)]
pub struct ConnectionBudget {
    held: AtomicUsize,
}

impl ConnectionBudget {
    /// A stream's share of the budget, nothing charged yet.
    pub fn charge(self: &Arc<Self>) -> HeldBytes {
        HeldBytes {
            budget: Arc::clone(self),
            charged: 0,
        }
    }

    /// Bytes held now by the connection's streams.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One stream's charge on its connection's budget, released when dropped.
#[derive(Debug)]
pub struct HeldBytes {
    budget: Arc<ConnectionBudget>,
    charged: usize,
}

impl HeldBytes {
    /// Charges `bytes` in place of this stream's previous charge; `false` (and
    /// nothing changed) when the connection would pass its budget.
    pub fn recharge(&mut self, bytes: usize) -> bool {
        let charged = self.charged;
        let updated = self
            .budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                let total = held.saturating_sub(charged).saturating_add(bytes);
                (total <= MAX_HELD_BYTES_PER_CONNECTION).then_some(total)
            });
        if updated.is_ok() {
            self.charged = bytes;
        }
        updated.is_ok()
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        let charged = self.charged;
        let _ = self
            .budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(charged))
            });
    }
}

/// The peer of one accepted SDS connection, handed to every stream it opens.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's UID (SO_PEERCRED).
    pub uid: u32,
    /// The peer's process, when it could be pinned.
    pub process: Option<Arc<ProcessHandle>>,
    /// What the connection's streams hold.
    pub budget: Arc<ConnectionBudget>,
}

impl Peer {
    /// Reads the peer of `stream` at accept, pinning its process through `pins`.
    pub fn of(stream: &UnixStream, uid: u32, pins: &mut ProcessPins) -> Self {
        let process = peer_credentials(stream).and_then(|(pid, uid, gid)| pins.pin(pid, uid, gid));
        if let Err(error) = &process {
            tracing::warn!(uid, %error, "SDS client's process cannot be pinned");
        }
        Self {
            uid,
            process: process.ok(),
            budget: Arc::default(),
        }
    }

    /// A peer whose process is not pinned (per-pod mode needs none).
    pub fn unpinned(uid: u32) -> Self {
        Self {
            uid,
            process: None,
            budget: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_of_one_live_process_share_one_pidfd() {
        let mut pins = ProcessPins::default();
        let (uid, gid) = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        let first = pins.pin(std::process::id(), uid, gid).expect("pin");
        let second = pins.pin(std::process::id(), uid, gid).expect("pin");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(pins.len(), 1);
        drop((first, second));
        assert!(pins.is_empty());
    }

    #[test]
    fn streams_of_one_connection_share_one_budget() {
        let budget = Arc::new(ConnectionBudget::default());
        let mut first = budget.charge();
        let mut second = budget.charge();
        assert!(first.recharge(MAX_HELD_BYTES_PER_CONNECTION - 10));
        assert!(!second.recharge(11));
        assert!(second.recharge(10));
        assert!(first.recharge(5));
        assert_eq!(budget.held(), 15);
        drop(first);
        assert_eq!(budget.held(), 10);
        drop(second);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn the_peer_of_a_socket_is_the_connecting_process() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let handle = ProcessHandle::open(peer_pid(&a).expect("peer pid")).expect("pidfd");
        assert_eq!(handle.pid(), std::process::id());
        assert!(!handle.has_exited());
        assert!(handle.is_same_process(&ProcessHandle::open(std::process::id()).expect("again")));
    }

    #[test]
    fn a_peer_whose_proc_owner_is_not_its_credentials_is_refused() {
        let (uid, gid) = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        let error =
            ProcessHandle::open_peer(std::process::id(), uid + 1, gid).expect_err("other uid");
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn start_times_parse_past_names_with_spaces_and_parentheses() {
        assert!(start_time(std::process::id()).expect("own") > 0);
        assert_eq!(pid_namespace_depth(std::process::id()).expect("own"), 1);
    }
}
