//! The accept loop: HTTP/1.1 over plain TCP or rustls, and HTTP/2 over rustls when the client
//! offers it (ALPN `h2`), with each connection's peer address handed to handlers, slow clients
//! timed out, and a graceful drain on shutdown.
//!
//! HTTP/2 matters on metered links: HPACK sends a repeated header (the bearer credential, the
//! path, the content type) as one or two bytes, so a telemetry batch costs little beyond its
//! body. Upgrades (the later tunnel) stay on HTTP/1.1.
//!
//! axum's own `serve` does not speak TLS, so connections are accepted here and handed to hyper
//! directly. TLS handshakes run on the connection's own task, so a client that stalls its
//! handshake cannot hold up the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests one HTTP/2 connection may have in flight.
const H2_MAX_STREAMS: u32 = 16;
/// Silence after which the hub pings an HTTP/2 client to see whether it is still there.
const H2_IDLE_PING: Duration = Duration::from_secs(15 * 60);
/// How long a ping may go unanswered before the connection is closed.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) {
    // Connections are tracked so that shutdown can wait for the requests in flight.
    let connections = tokio_util::task::TaskTracker::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually out of file descriptors: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req.map(Body::new))
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true);
            let result =
                match acceptor {
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => return,
                            };
                        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let conn = http2::Builder::new(TokioExecutor::new())
                                .timer(TokioTimer::new())
                                // A device sends one batch at a time; this bounds what one
                                // connection can make the hub buffer (streams × 4 MiB bodies).
                                .max_concurrent_streams(H2_MAX_STREAMS)
                                // Idle connections are pinged only after a long silence (the
                                // agent closes its own after 10 minutes), so live devices on
                                // metered links pay nothing, and dead peers are reaped.
                                .keep_alive_interval(H2_IDLE_PING)
                                .keep_alive_timeout(H2_PING_TIMEOUT)
                                .serve_connection(TokioIo::new(stream), service);
                            drive_h2(conn, &shutdown).await
                        } else {
                            let conn = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades();
                            drive(conn, &shutdown).await
                        }
                    }
                    None => {
                        let conn = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades();
                        drive(conn, &shutdown).await
                    }
                };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("requests still running after the drain timeout; stopping anyway");
        }
    }
}

/// Runs a connection; on shutdown, lets the request in flight finish and then closes it.
async fn drive<I, S, B>(
    conn: http1::UpgradeableConnection<I, S>,
    shutdown: &CancellationToken,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// [`drive`] for an HTTP/2 connection: on shutdown, the requests in flight finish (a GOAWAY
/// tells the client to send no more on it).
async fn drive_h2<I, S, B>(
    conn: http2::Connection<I, S, TokioExecutor>,
    shutdown: &CancellationToken,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// The address a listener is bound to, for URLs.
pub fn url_for(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        format!("{scheme}://localhost:{}", addr.port())
    } else {
        format!("{scheme}://{addr}")
    }
}
