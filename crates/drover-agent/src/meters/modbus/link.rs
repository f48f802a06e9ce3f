//! One Modbus TCP connection to a gateway, kept open across polls and opened again after an
//! error.
//!
//! The seed opened and closed a TCP connection for every register read (seed weakness 15).
//! [`Link`] connects on first use and keeps the connection until something breaks it: a
//! transport error, a malformed answer, or a timeout (after a timeout the answer may still
//! arrive later and would be taken for the answer to the next request, so the connection is
//! dropped). A Modbus *exception* (the gateway answered "cannot read that") leaves the
//! connection as it is: the gateway is fine, one meter is not.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_modbus::client::{Context, Reader as _};
use tokio_modbus::{ExceptionCode, Slave};

use super::maps::RegisterKind;

/// Where a gateway is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The Modbus unit (slave) ID.
    pub unit: u8,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long one request may take.
    pub timeout: Duration,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} unit {}", self.host, self.port, self.unit)
    }
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {addr} timed out")]
    ConnectTimeout {
        /// The address.
        addr: String,
    },
    /// The gateway did not answer within the request timeout.
    #[error("no answer within {timeout:?}")]
    Timeout {
        /// The timeout.
        timeout: Duration,
    },
    /// The connection broke or the answer was not a valid Modbus frame.
    #[error("connection lost: {0}")]
    Transport(#[from] tokio_modbus::Error),
    /// The gateway answered with a Modbus exception (it could not read those registers).
    #[error("the gateway answered with exception {0}")]
    Exception(ExceptionCode),
    /// The answer held fewer registers than asked for.
    #[error("asked for {asked} registers, got {got}")]
    Short {
        /// Registers asked for.
        asked: u16,
        /// Registers received.
        got: usize,
    },
}

impl LinkError {
    /// Whether the gateway could not be reached at all (so reading other meters now is
    /// pointless), as opposed to one read failing.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            LinkError::Resolve { .. }
                | LinkError::Connect { .. }
                | LinkError::ConnectTimeout { .. }
        )
    }
}

/// A gateway connection that is opened when needed and reused.
pub struct Link {
    endpoint: Endpoint,
    context: Option<Context>,
    connects: u64,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("endpoint", &self.endpoint)
            .field("connected", &self.context.is_some())
            .field("connects", &self.connects)
            .finish()
    }
}

impl Link {
    /// A link to `endpoint`; nothing is connected yet.
    pub fn new(endpoint: Endpoint) -> Link {
        Link {
            endpoint,
            context: None,
            connects: 0,
        }
    }

    /// Where it connects.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// How many TCP connections it has opened so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Reads `count` registers from `start`, connecting first if needed.
    pub async fn read(
        &mut self,
        kind: RegisterKind,
        start: u16,
        count: u16,
    ) -> Result<Vec<u16>, LinkError> {
        let timeout = self.endpoint.timeout;
        let context = self.connected().await?;
        let request = async {
            match kind {
                RegisterKind::Holding => context.read_holding_registers(start, count).await,
                RegisterKind::Input => context.read_input_registers(start, count).await,
            }
        };
        let answer = match tokio::time::timeout(timeout, request).await {
            Err(_elapsed) => {
                self.context = None;
                return Err(LinkError::Timeout { timeout });
            }
            Ok(Err(e)) => {
                self.context = None;
                return Err(e.into());
            }
            Ok(Ok(answer)) => answer,
        };
        let words = answer.map_err(LinkError::Exception)?;
        if words.len() < usize::from(count) {
            return Err(LinkError::Short {
                asked: count,
                got: words.len(),
            });
        }
        Ok(words)
    }

    /// Drops the connection (the next read opens a new one).
    pub fn disconnect(&mut self) {
        self.context = None;
    }

    async fn connected(&mut self) -> Result<&mut Context, LinkError> {
        if self.context.is_none() {
            let stream = connect(&self.endpoint).await?;
            self.connects += 1;
            let slave = Slave(self.endpoint.unit);
            self.context = Some(tokio_modbus::client::tcp::attach_slave(stream, slave));
        }
        self.context.as_mut().ok_or_else(|| LinkError::Connect {
            addr: self.endpoint.host.clone(),
            source: io::Error::other("no connection"),
        })
    }
}

/// Opens a TCP connection to the first address of the endpoint's host that accepts.
async fn connect(endpoint: &Endpoint) -> Result<TcpStream, LinkError> {
    let Endpoint {
        host,
        port,
        connect_timeout,
        ..
    } = endpoint;
    let target = format!("{host}:{port}");
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&target)
            .await
            .map_err(|source| LinkError::Resolve {
                host: host.clone(),
                source,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    // Requests are small and answered one at a time: send them at once.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(LinkError::Connect {
            addr: target.clone(),
            source: last,
        })
    };
    tokio::time::timeout(*connect_timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(LinkError::ConnectTimeout {
                addr: target.clone(),
            })
        })
}
