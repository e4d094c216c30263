//! The HTTP server loop: hyper with limits axum's default loop does not set.
//!
//! - a client must send its request headers within `header_timeout`
//!   (slow-header connections are closed);
//! - at most `max_connections` connections at once (more are closed at
//!   accept);
//! - shutdown stops accepting, lets requests in flight finish for at most
//!   `drain`, then closes what is left: a stalled client cannot hold the
//!   service open.
//!
//! Each request carries its peer address (`ConnectInfo`), for per-address
//! limits and trusted proxies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// The server's connection limits.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight.
    pub drain: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            drain: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    eprintln!("afflio: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Over the connection limit: closed at once.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = app.clone().map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.map(axum::body::Body::new)
        });
        let svc = hyper_util::service::TowerToHyperService::new(svc);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // Requests in flight may finish; after `drain`, whatever is left is closed.
    let _ = tokio::time::timeout(limits.drain, graceful.shutdown()).await;
    Ok(())
}

/// The address a request came from (set by [`serve`]).
pub fn peer<B>(req: &axum::http::Request<B>) -> Option<SocketAddr> {
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_headers_are_cut_off_and_shutdown_is_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let limits = ServerLimits {
            header_timeout: Duration::from_millis(300),
            max_connections: 2,
            drain: Duration::from_millis(300),
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async move {
            let _ = stop_rx.await;
        }));
        let started = std::time::Instant::now();
        let closed = tokio::task::spawn_blocking(move || {
            // Partial headers, never finished: the server closes the connection.
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            // A complete request on a fresh connection is served.
            let mut ok = std::net::TcpStream::connect(addr).unwrap();
            ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut resp = String::new();
            ok.read_to_string(&mut resp).unwrap();
            (started.elapsed(), resp)
        })
        .await
        .unwrap();
        assert!(closed.0 < Duration::from_secs(3), "the slow client was cut off after {:?}", closed.0);
        assert!(closed.1.starts_with("HTTP/1.1 200"), "{}", closed.1);
        // A connection that stalls does not hold shutdown open.
        let stalled = std::net::TcpStream::connect(addr).unwrap();
        let t = std::time::Instant::now();
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(t.elapsed() < Duration::from_secs(3), "shutdown took {:?}", t.elapsed());
        drop(stalled);
    }
}
