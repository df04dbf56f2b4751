//! Where a cloud's data plane runs: on this host's loopback, or in its own
//! network namespace (when the harness runs as root).
//!
//! In namespace mode each cloud gets a namespace with one veth interface on a
//! "WAN" bridge that lives in a namespace of its own; the clouds' addresses
//! exist only inside their namespaces (`10.<subnet>.<cloud>.<host>/16`), and
//! the host's network is not touched. Envoys run inside (`ip netns exec`);
//! the test reaches into a namespace with sockets created by a thread that
//! has entered it (`setns`): a socket belongs to the namespace it was created
//! in, whichever thread uses it later. Unix sockets (SDS, the agent's admin
//! API, the OTLP receiver) are files and cross namespaces unchanged.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command as StdCommand;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// A network namespace this harness created; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = StdCommand::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl NetNs {
    /// Whether namespaces can be used here: root, and a namespace with a
    /// bridge and a veth pair can be made (a probe, deleted at once).
    /// Probed once per process.
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(Self::probe)
    }

    fn probe() -> bool {
        if !rustix::process::geteuid().is_root() {
            return false;
        }
        let Ok(probe) = Self::create(&format!("tw-probe-{}", std::process::id())) else {
            return false;
        };
        probe.ip(&["link", "add", "br0", "type", "bridge"]).is_ok()
            && probe
                .ip(&[
                    "link", "add", "name", "twa", "type", "veth", "peer", "name", "twb",
                ])
                .is_ok()
    }

    /// Creates namespace `name` (replacing a stale one) with its loopback up.
    pub fn create(name: &str) -> std::io::Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip <args>` inside it.
    pub fn ip(&self, args: &[&str]) -> std::io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread that has entered this namespace.
    fn inside<T: Send>(&self, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
        let file = std::fs::File::open(Path::new("/run/netns").join(&self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    rustix::thread::move_into_link_name_space(
                        file.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )?;
                    f()
                })
                .join()
                .map_err(|_| std::io::Error::other("namespace thread panicked"))?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Where a cloud's data plane runs.
#[derive(Clone, Debug)]
pub enum Site {
    /// This host's network (loopback addresses).
    Host,
    /// A network namespace of its own.
    Namespace(Arc<NetNs>),
}

impl Site {
    /// A TCP listener on `addr`, in this site's network.
    pub async fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        match self {
            Site::Host => TcpListener::bind(addr).await,
            Site::Namespace(ns) => {
                let std = ns.inside(|| {
                    let listener = std::net::TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })?;
                TcpListener::from_std(std)
            }
        }
    }

    /// A TCP connection to `addr`, from inside this site's network.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        match self {
            Site::Host => TcpStream::connect(addr).await,
            Site::Namespace(ns) => {
                let ns = Arc::clone(ns);
                let std = tokio::task::spawn_blocking(move || {
                    ns.inside(|| {
                        let stream = std::net::TcpStream::connect_timeout(
                            &addr,
                            std::time::Duration::from_secs(5),
                        )?;
                        stream.set_nonblocking(true)?;
                        Ok(stream)
                    })
                })
                .await
                .map_err(std::io::Error::other)??;
                TcpStream::from_std(std)
            }
        }
    }

    /// A body-less HTTP request to `addr` from inside this site's network;
    /// the whole response (see [`crate::http::request`]).
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<crate::http::HttpResponse> {
        crate::http::request_on(self.connect(addr).await?, method, path, headers).await
    }

    /// A command that runs `program` in this site's network.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Site::Host => Command::new(program),
            Site::Namespace(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns.name()]).arg(program);
                command
            }
        }
    }
}

/// The namespaces of a mesh: one per cloud, joined by a bridge in a WAN namespace.
#[derive(Debug)]
pub struct Namespaces {
    /// One per cloud, in plan order.
    pub clouds: Vec<Arc<NetNs>>,
    /// Holds the bridge (dropped last).
    _wan: NetNs,
}

impl Namespaces {
    /// Creates `tw<subnet>-wan` with a bridge and, per cloud, `tw<subnet>-<cloud>`
    /// with `eth0` on that bridge carrying `addresses[cloud]` (/16).
    pub fn create(
        subnet: u8,
        clouds: &[&str],
        addresses: &[Vec<std::net::IpAddr>],
    ) -> std::io::Result<Self> {
        let wan = NetNs::create(&format!("tw{subnet}-wan"))?;
        wan.ip(&["link", "add", "br0", "type", "bridge"])?;
        wan.ip(&["link", "set", "br0", "up"])?;
        let mut namespaces = Vec::new();
        for (i, (cloud, addrs)) in clouds.iter().zip(addresses).enumerate() {
            let ns = NetNs::create(&format!("tw{subnet}-{cloud}"))?;
            let port = format!("c{i}");
            ip(&[
                "link",
                "add",
                &port,
                "netns",
                wan.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            wan.ip(&["link", "set", &port, "master", "br0", "up"])?;
            for addr in addrs {
                ns.ip(&["addr", "add", &format!("{addr}/16"), "dev", "eth0"])?;
            }
            ns.ip(&["link", "set", "eth0", "up"])?;
            namespaces.push(Arc::new(ns));
        }
        Ok(Self {
            clouds: namespaces,
            _wan: wan,
        })
    }
}
