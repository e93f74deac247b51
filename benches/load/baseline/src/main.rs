//! Baseline for benches/load/run.sh (BASELINE=1): the least a reverse proxy on cliqgate's stack
//! (tokio, hyper 1, hyper-util's auto server builder and legacy pooled client) does per call:
//! rewrite the URI, forward, stream the answer back. No routing, limiting, metrics or logging.
//!
//!     cliqgate-load-baseline <listen addr> <upstream host:port>
//!
//! By default it runs like cliqgate: one tokio multi-thread runtime (a worker per core). With
//! PER_CORE=N it runs N single-threaded runtimes instead, each with its own SO_REUSEPORT listener
//! and its own client pool (nginx's worker model).
//!
//! With RELAY=1 (and PER_CORE=N) it is no HTTP proxy at all: each caller connection gets its own
//! upstream connection and bytes are copied both ways unparsed. That is the floor for any
//! user-space proxy on this machine: the same reads and writes per call, nothing else.
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;

type B = BoxBody<Bytes, hyper::Error>;

fn main() {
    let listen = std::env::args().nth(1).expect("listen addr");
    let upstream = std::env::args().nth(2).expect("upstream authority");
    let per_core: usize = std::env::var("PER_CORE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if per_core == 0 {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(serve(listen, upstream, false));
        return;
    }
    // nginx's model: one single-threaded runtime per core, each with its own SO_REUSEPORT
    // listener and its own upstream pool: a call never leaves the thread that accepted it.
    let threads: Vec<_> = (0..per_core)
        .map(|_| {
            let (listen, upstream) = (listen.clone(), upstream.clone());
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(serve(listen, upstream, true))
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

async fn serve(listen: String, upstream: String, reuseport: bool) {
    if std::env::var("RELAY").is_ok_and(|v| v == "1") {
        return relay(bind(&listen, reuseport).await, upstream).await;
    }
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, B> = Client::builder(TokioExecutor::new()).build(http);
    let listener = bind(&listen, reuseport).await;
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let client = client.clone();
                let upstream = upstream.clone();
                async move {
                    let (mut parts, body) = req.into_parts();
                    let pq = parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    parts.uri = format!("http://{upstream}{pq}").parse().unwrap();
                    let req = Request::from_parts(parts, body.boxed());
                    let resp = match client.request(req).await {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(_) => Response::builder()
                            .status(502)
                            .body(http_body_util::Empty::new().map_err(|n| match n {}).boxed())
                            .unwrap(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// One upstream connection per caller connection, bytes copied both ways.
async fn relay(listener: tokio::net::TcpListener, upstream: String) {
    loop {
        let (mut caller, _) = listener.accept().await.unwrap();
        let _ = caller.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut caller, &mut up).await;
        });
    }
}

async fn bind(listen: &str, reuseport: bool) -> tokio::net::TcpListener {
    if reuseport {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseport(true).unwrap();
        sock.set_reuseaddr(true).unwrap();
        sock.bind(listen.parse().unwrap()).unwrap();
        sock.listen(4096).unwrap()
    } else {
        tokio::net::TcpListener::bind(listen).await.unwrap()
    }
}
