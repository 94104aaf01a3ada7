//! The HTTP server: axum's router on hyper's HTTP/1 connection, with the limits `axum::serve`
//! does not set. A client that trickles its headers, or keeps a connection idle, is closed after
//! [`ServerLimits::header_read_timeout`] (hyper arms that timer whenever the connection waits
//! for a request head, the first one or the next on a keep-alive connection); a body announced
//! larger than the limit is refused with 413 before any of it is read; connections are capped.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use crate::body::MAX_BODY_BYTES;
use crate::error::ApiError;

/// Most connections served at once: each is a task and a socket; past it, new connections wait
/// in the listen backlog instead of exhausting file descriptors.
pub const MAX_CONNECTIONS: usize = 8192;
/// How long in-flight requests may take to finish after shutdown was asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Time limits of the server.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// A request head must arrive within this time, and an idle keep-alive connection is closed
    /// after it.
    pub header_read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Refuse a body whose `Content-Length` is over [`MAX_BODY_BYTES`] before reading it (a client
/// announcing 100 MB is told at once, not waited for), and one that is not a number.
pub async fn limit_content_length(req: Request, next: Next) -> Response {
    if let Some(v) = req.headers().get(CONTENT_LENGTH) {
        match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) if n > MAX_BODY_BYTES as u64 => {
                return ApiError::PayloadTooLarge {
                    limit: MAX_BODY_BYTES,
                }
                .into_response();
            }
            Some(_) => {}
            None => {
                return ApiError::Invalid {
                    field: None,
                    message: "Content-Length is not a number".into(),
                }
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// Resolves once shutdown was asked for (the watch's guard is dropped inside, so the future
/// stays `Send`).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serve `router` on `listener` until `shutdown` resolves; then stop accepting, let in-flight
/// requests finish (up to [`SHUTDOWN_GRACE`]) and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stop = stop_rx.clone();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
            _ = stopped(&mut stop) => break,
        };
        let (socket, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a reset during accept: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = socket.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(socket), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { let _ = r; }
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
    // Wait for connections to finish (each holds a permit until it ends).
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(MAX_CONNECTIONS as u32)).await;
    Ok(())
}
