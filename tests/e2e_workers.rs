//! End-to-end: the proxy listener served by several worker threads (one event loop and one
//! `SO_REUSEPORT` listener each). Every worker decides against the same limiter, so a user's
//! quota is one quota however their connections are spread; and the shared port cannot be joined
//! by a second cliqgate.

mod support;

use std::num::NonZeroUsize;

use cliqgate::app::{start_with_workers, Running, StartError};
use cliqgate::config::Config;
use support::*;
use tokio::task::JoinSet;

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const PER: Duration = Duration::from_secs(2);
const LOCK: Duration = Duration::from_secs(60);
const LIMIT: u32 = 5;
const WORKERS: NonZeroUsize = NonZeroUsize::new(2).unwrap();

fn config(upstream: &str, listen: Option<std::net::SocketAddr>) -> Config {
    let mut yaml = config_yaml(
        upstream,
        &format!(
            "routes:\n  - name: chats.post_message\n    method: POST\n    path: \"{CHAT}\"\n    limit: {LIMIT}\n    per: \"{}ms\"\n    lock: \"60s\"\n    on_limit: reject\n",
            PER.as_millis()
        ),
    );
    if let Some(addr) = listen {
        yaml = yaml.replacen(
            "listen: \"127.0.0.1:0\"\n",
            &format!("listen: \"{addr}\"\n"),
            1,
        );
    }
    Config::from_yaml(&yaml).expect("test config is valid")
}

async fn start(upstream: &str) -> Running {
    start_with_workers(config(upstream, None), WORKERS)
        .await
        .expect("proxy starts with two workers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_quota_per_user_across_worker_threads() {
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK)]).await;
    let running = start(&stub.url()).await;
    let url = format!("{}/api/v3/chats/C1/message", base_url(&running));

    // Each call on its own connection, so the kernel spreads them over both workers' listeners.
    let calls = 40;
    let mut set = JoinSet::new();
    for _ in 0..calls {
        let url = url.clone();
        set.spawn(async move { Client::new().post(&url, "alice", r#"{"text":"hi"}"#).await });
    }
    let mut forwarded = 0;
    let mut refused = 0;
    while let Some(answer) = set.join_next().await {
        match answer.expect("call task").status {
            StatusCode::OK => forwarded += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }

    assert_eq!(forwarded, LIMIT as usize, "exactly the quota is forwarded");
    assert_eq!(refused, calls - LIMIT as usize);
    assert_eq!(stub.count_for(CHAT, "alice"), LIMIT as usize);
    assert_eq!(stub.violations(), 0, "Zoho saw no call over the limit");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_cannot_join_the_port() {
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK)]).await;
    let first = start(&stub.url()).await;
    let taken = first.proxy_addr;

    // SO_REUSEPORT would let it bind; cliqgate refuses, as a proxy without it would.
    let second = start_with_workers(config(&stub.url(), Some(taken)), WORKERS).await;
    match second {
        Err(StartError::Bind { addr, .. }) => assert_eq!(addr, taken),
        Err(other) => panic!("expected a bind error, got {other}"),
        Ok(_) => panic!("a second proxy joined {taken}"),
    }

    // The first still serves, and once it stops the port is free for a successor.
    let answer = Client::new()
        .post(
            &format!("{}/api/v3/chats/C1/message", base_url(&first)),
            "bob",
            "{}",
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    first.shutdown().await;
    let successor = start_with_workers(config(&stub.url(), Some(taken)), WORKERS)
        .await
        .expect("the port is free once the first proxy stopped");
    assert_eq!(successor.proxy_addr, taken);
    successor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_evenly_over_the_workers() {
    let stub = ZohoStub::start(vec![StubRoute::new(Method::POST, CHAT, LIMIT, PER, LOCK)]).await;
    let running = start(&stub.url()).await;
    let url = format!("{}/api/v3/chats/C1/message", base_url(&running));
    let per_worker = |metrics: &str| -> Vec<f64> {
        (0..WORKERS.get())
            .map(|w| {
                metric_value(
                    metrics,
                    "cliqgate_worker_connections",
                    &[("worker", &w.to_string())],
                )
                .expect("a connection count per worker")
            })
            .collect()
    };

    // One kept-alive connection per client, opened one after another: each is accepted (and
    // answered) before the next connects. The kernel picks a worker's listener by a hash of
    // the addresses; left to it, the shares drift apart within a few connections. Every third
    // connection is HTTP/2 (h2c), which is handed over the same way.
    let connections = 32;
    let mut clients = Vec::new();
    for n in 0..connections {
        let client = if n % 3 == 0 {
            Client::h2c()
        } else {
            Client::new()
        };
        let answer = client.post(&url, &format!("user{n}"), "{}").await;
        assert_eq!(answer.status, StatusCode::OK, "a call on connection {n}");
        clients.push(client);
        let shares = per_worker(&scrape(running.admin_addr).await);
        let (fewest, most) = (
            shares.iter().copied().fold(f64::MAX, f64::min),
            shares.iter().copied().fold(0.0, f64::max),
        );
        assert!(
            most - fewest <= 1.0,
            "after {} connections: {shares:?}",
            n + 1
        );
        assert_eq!(
            shares.iter().sum::<f64>(),
            f64::from(n + 1),
            "every connection counted once"
        );
    }

    // Every connection still works where it ended up, handed over or not.
    for (n, client) in clients.iter().enumerate() {
        let answer = client.post(&url, &format!("user{n}"), "{}").await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "a second call on connection {n}"
        );
    }
    assert_eq!(stub.violations(), 0);

    // Closed connections are no longer counted.
    drop(clients);
    wait_for(
        "every worker's count back to 0",
        Duration::from_secs(5),
        || async { per_worker(&scrape(running.admin_addr).await) == vec![0.0; WORKERS.get()] },
    )
    .await;
    running.shutdown().await;
}
