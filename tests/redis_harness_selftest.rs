//! Tests of the `redis-server` harness itself (tests/support/redis.rs): the Redis-store tests
//! trust it to start a private server, crash it, bring it back empty and let them look inside.

mod support;

use std::io::ErrorKind;
use std::path::Path;

use support::*;

#[tokio::test]
async fn start_answers_commands() {
    let redis = RedisServer::start().await;
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
    assert_eq!(redis.command(&["PING"]).await, "PONG");
    assert_eq!(
        redis.command(&["SET", "k", "v a l", "EX", "100"]).await,
        "OK"
    );
    assert_eq!(redis.command(&["GET", "k"]).await, "v a l");
    assert_eq!(redis.command(&["GET", "missing"]).await, "(nil)");
    assert_eq!(redis.command(&["INCR", "n"]).await, "1");
    assert_eq!(redis.command(&["DBSIZE"]).await, "2");
    let ttl: u64 = redis.command(&["TTL", "k"]).await.parse().unwrap();
    assert!((98..=100).contains(&ttl), "TTL {ttl}");
    let mut keys: Vec<String> = redis
        .command(&["KEYS", "*"])
        .await
        .lines()
        .map(String::from)
        .collect();
    keys.sort();
    assert_eq!(keys, ["k", "n"]);
    let error = redis.command(&["NO-SUCH-COMMAND"]).await;
    assert!(error.starts_with("(error) ERR"), "{error}");
}

#[tokio::test]
async fn two_servers_get_different_ports_and_data() {
    let (a, b) = tokio::join!(RedisServer::start(), RedisServer::start());
    assert_ne!(a.port(), b.port());
    assert_eq!(a.command(&["SET", "only-in-a", "1"]).await, "OK");
    assert_eq!(b.command(&["EXISTS", "only-in-a"]).await, "0");
}

#[tokio::test]
async fn kill_refuses_connections_and_restart_comes_back_empty() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    assert_eq!(redis.command(&["SET", "k", "v"]).await, "OK");

    redis.kill().await;
    assert_eq!(redis.pid(), None);
    let refused = redis.try_command(&["PING"]).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    redis.restart().await;
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["PING"]).await, "PONG");
    assert_eq!(redis.command(&["GET", "k"]).await, "(nil)");
    assert_eq!(redis.command(&["DBSIZE"]).await, "0");
}

#[tokio::test]
async fn drop_kills_the_server() {
    let redis = RedisServer::start().await;
    let (port, pid) = (redis.port(), redis.pid().unwrap());
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(redis);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists"
    );
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
}

#[tokio::test]
async fn pause_holds_commands() {
    let redis = RedisServer::start().await;
    redis.pause(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(redis.command(&["GET", "k"]).await, "(nil)");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}
