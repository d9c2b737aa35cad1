//! Binding the listeners: a socket passed by systemd, or a new one with a deep accept queue.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::info;

/// A passed socket when there is one, else a new one bound to `addr`.
pub fn listen_or_take(
    passed: Option<std::net::TcpListener>,
    addr: SocketAddr,
    key: &str,
) -> anyhow::Result<TcpListener> {
    match passed {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            info!(key, addr = %listener.local_addr()?, "using the socket passed by the service manager");
            Ok(TcpListener::from_std(listener)?)
        }
        None => listen(addr, key),
    }
}

/// The accept queue asked for; Linux caps it at `net.core.somaxconn` (4096 since 5.4), as
/// systemd's `Backlog=` default does. tokio's 1024 overflows under a connection flood: the
/// SYNs of real clients are then dropped and retried only after 1 s, 3 s, 7 s.
const LISTEN_BACKLOG: u32 = 4096;

pub fn listen(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As std and tokio do: a restart can bind while old connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().with_context(|| format!("cannot listen on {addr} ({key})"))
}
