//! Binds the listeners (port 0 works, for tests) and runs the proxy until shutdown.

use std::net::SocketAddr;

use crate::config::Config;

/// A running proxy: its bound addresses and a handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// Starts the proxy and admin listeners on the configured addresses.
pub async fn start(_config: Config) -> Result<Running, StartError> {
    todo!()
}

impl Running {
    /// Stops accepting, lets in-flight calls finish (bounded by `timeouts.shutdown`), then returns.
    pub async fn shutdown(self) {
        todo!()
    }
}
