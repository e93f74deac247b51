//! End to end with the Redis store (issue 3): several real cliqgate replicas share one real
//! `redis-server`, in front of the Zoho-like stub that enforces the sliding window per
//! (route, user) and records every threshold crossing.
//!
//! Every test starts its own redis-server (tests/support/redis.rs), its own stub and its own
//! proxies, all on loopback ports the OS picks. Windows are short so the file runs in seconds.
//!
//! A brand-new Redis has no epoch key, so cliqgate treats its first window as if every quota had
//! just been used (its guard against a Redis that lost its data). Tests that want an immediate
//! burst first set `cliqgate:epoch` to 1, as on a Redis that has been running for a long time. The
//! outage tests restart Redis empty on purpose, and check that guard keeps Zoho's window safe.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cliqgate::app::Running;
use support::*;
use tokio::task::JoinSet;

const CHAT: &str = "/api/v3/chats/{chat_id}/message";
const ROUTE: &str = "chats.post_message";
/// Divisible by 2 and by 3, so every replica's share (`limit / replicas`) is whole.
const LIMIT: u32 = 6;
/// Zoho's (the stub's) window in the timed tests: short, so an outage spans several windows in a
/// few seconds.
const PER: Duration = Duration::from_millis(600);
/// Absorbs loopback and scheduler jitter between a proxy's send and the stub's arrival.
const MARGIN: Duration = Duration::from_millis(150);
/// The proxies' window: `per + safety_margin`.
const WINDOW: Duration = PER.saturating_add(MARGIN);
/// The stub's lock: long enough that no lock ends during a test, so a violation stays visible.
const STUB_LOCK: Duration = Duration::from_secs(60);
/// Window of the burst tests: long enough that a whole burst of concurrent calls is decided within
/// one window even on a loaded machine (the test never waits for it to pass).
const BURST_PER: Duration = Duration::from_secs(5);
/// Proxy replicas in the fleet tests.
const REPLICAS: usize = 3;
/// Users in the burst tests, each sending `3 x LIMIT` calls at once.
const BURST_USERS: usize = 10;
/// Per Redis operation. Generous: a slow script on a loaded CI machine must not count as an
/// outage (a killed Redis refuses connections at once, so the outage tests do not wait on it).
const STORE_TIMEOUT: &str = "1s";
const STORE_CONNECT_TIMEOUT: &str = "500ms";
/// Users of the background load in the outage tests, and the pause between one user's calls:
/// every user then asks far more often than its quota allows, on every replica in turn.
const LOAD_USERS: usize = 4;
const LOAD_PAUSE: Duration = Duration::from_millis(25);
/// Bound on a replica noticing Redis went away or came back: its probe runs every 1 s while up,
/// every 250 ms while down, and a failing call notices at once.
const HEALTH_DEADLINE: Duration = Duration::from_secs(5);
/// Bound on loopback forwarding of a call decided just before Redis was killed: stub arrivals
/// later than this after the kill were decided during the outage.
const IN_FLIGHT: Duration = Duration::from_millis(500);
/// Bound on Redis's own expiry (active expiry runs ten times a second) after a key's TTL.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Set-up

/// How the fleet is configured.
#[derive(Clone, Copy)]
struct Setup {
    /// `reject` or `local`.
    on_error: &'static str,
    replicas: u32,
    /// `reject` or `queue` (queue: `max_wait: 10s`).
    on_limit: &'static str,
    /// The route's `per` (the stub uses the same).
    per: Duration,
    /// The route's `lock` (what cliqgate applies when the stub signals a throttle).
    lock: Duration,
    limit: u32,
}

impl Setup {
    fn new(on_error: &'static str, replicas: u32, on_limit: &'static str) -> Self {
        Setup {
            on_error,
            replicas,
            on_limit,
            per: PER,
            lock: STUB_LOCK,
            limit: LIMIT,
        }
    }

    fn yaml(&self, upstream: &str, redis_url: &str) -> String {
        let max_wait = if self.on_limit == "queue" {
            "    max_wait: \"10s\"\n"
        } else {
            ""
        };
        config_yaml(
            upstream,
            &format!(
                "safety_margin: \"{margin}ms\"
store:
  kind: redis
  url: \"{redis_url}\"
  on_error: {on_error}
  replicas: {replicas}
  timeout: \"{STORE_TIMEOUT}\"
  connect_timeout: \"{STORE_CONNECT_TIMEOUT}\"
routes:
  - name: {ROUTE}
    method: POST
    path: \"{CHAT}\"
    limit: {limit}
    per: \"{per}ms\"
    lock: \"{lock}ms\"
    on_limit: {on_limit}
{max_wait}",
                margin = MARGIN.as_millis(),
                on_error = self.on_error,
                replicas = self.replicas,
                limit = self.limit,
                per = self.per.as_millis(),
                lock = self.lock.as_millis(),
                on_limit = self.on_limit,
            ),
        )
    }
}

/// Marks `redis` as a long-running Redis (its data began long ago): no conservative first window.
async fn old_epoch(redis: &RedisServer) {
    assert_eq!(redis.command(&["SET", "cliqgate:epoch", "1"]).await, "OK");
}

/// The stub (as Zoho) with `limit` per `per` on [`CHAT`], locking for [`STUB_LOCK`].
async fn stub(limit: u32, per: Duration) -> ZohoStub {
    ZohoStub::start(vec![StubRoute::new(
        Method::POST,
        CHAT,
        limit,
        per,
        STUB_LOCK,
    )])
    .await
}

/// Several proxies with one config, as behind a load balancer.
struct Fleet {
    proxies: Vec<Running>,
}

impl Fleet {
    async fn start(n: usize, yaml: &str) -> Fleet {
        let mut proxies = Vec::new();
        for _ in 0..n {
            proxies.push(start_proxy(yaml).await);
        }
        Fleet { proxies }
    }

    fn chat_url(&self, replica: usize, chat: &str) -> String {
        format!(
            "{}/api/v3/chats/{chat}/message",
            base_url(&self.proxies[replica])
        )
    }

    fn chat_urls(&self) -> Vec<String> {
        (0..self.proxies.len())
            .map(|i| self.chat_url(i, "C1"))
            .collect()
    }

    /// One call per replica as user `warmup`: opens each replica's (lazily made) Redis
    /// connection, so that connecting on a loaded machine during a burst cannot count as an outage.
    async fn warm_up(&self) {
        let client = Client::new();
        for i in 0..self.proxies.len() {
            let r = client.post(&self.chat_url(i, "C0"), "warmup", "{}").await;
            assert_eq!(r.status, StatusCode::OK, "replica {i}: {}", r.text());
        }
        assert!(self.all_readyz(StatusCode::OK).await, "ready after warm-up");
    }

    async fn admin_status(&self, replica: usize, path: &str) -> StatusCode {
        let url = format!("http://{}{path}", self.proxies[replica].admin_addr);
        Client::new()
            .send(request(Method::GET, &url, None, Bytes::new()))
            .await
            .status
    }

    /// Whether every replica's `/readyz` answers `want`.
    async fn all_readyz(&self, want: StatusCode) -> bool {
        for i in 0..self.proxies.len() {
            if self.admin_status(i, "/readyz").await != want {
                return false;
            }
        }
        true
    }

    async fn metrics(&self, replica: usize) -> String {
        scrape(self.proxies[replica].admin_addr).await
    }

    /// `cliqgate_store_errors_total` of each replica, all operations together.
    async fn store_errors(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for i in 0..self.proxies.len() {
            out.push(metric_sum(
                &self.metrics(i).await,
                "cliqgate_store_errors_total",
                &[],
            ));
        }
        out
    }

    /// `cliqgate_requests_total` for [`ROUTE`] and `decision`, summed over the replicas.
    async fn decisions(&self, decision: &str) -> f64 {
        let mut sum = 0.0;
        for i in 0..self.proxies.len() {
            sum += metric_sum(
                &self.metrics(i).await,
                "cliqgate_requests_total",
                &[("route", ROUTE), ("decision", decision)],
            );
        }
        sum
    }

    async fn shutdown(self) {
        for proxy in self.proxies {
            proxy.shutdown().await;
        }
    }
}

/// Every cliqgate key in `redis` except the epoch and the identity scheme, which live for ever.
async fn user_keys(redis: &RedisServer) -> BTreeSet<String> {
    redis
        .command(&["KEYS", "cliqgate:*"])
        .await
        .lines()
        .filter(|k| !k.is_empty() && !["cliqgate:epoch", "cliqgate:identity_scheme"].contains(k))
        .map(String::from)
        .collect()
}

/// Splits `cliqgate:{ROUTE:<32 hex>}:<kind>` into (user hex, kind); panics on any other shape.
fn parse_key(key: &str) -> (String, String) {
    let rest = key
        .strip_prefix(&format!("cliqgate:{{{ROUTE}:"))
        .unwrap_or_else(|| panic!("{key:?} does not start with the hash tag {{{ROUTE}:"));
    let (user, kind) = rest
        .split_once("}:")
        .unwrap_or_else(|| panic!("{key:?}: the hash tag is not closed before the kind"));
    assert!(
        user.len() == 32 && user.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key:?}: the user part is not a 128-bit hash in hex"
    );
    (user.to_owned(), kind.to_owned())
}

/// Answers every call to the stub with Zoho's plain 429 throttle signal.
fn throttle_everything(stub: &ZohoStub) {
    let shape = ThrottleShape::Http429Plain;
    stub.set_fixed_response(Some(
        FixedResponse::new(shape.status(), shape.body())
            .header("content-type", "application/json;charset=UTF-8"),
    ));
}

/// The error `code` of a JSON answer, if it has one.
fn code_of(response: &TestResponse) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(&response.body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
}

/// Fires `calls` concurrent calls for each of `users` users, call `c` of user `u` to replica
/// `(u + c) % replicas`; returns (user, status, code) per call.
async fn fleet_burst(
    fleet: &Fleet,
    users: usize,
    calls: usize,
) -> Vec<(String, StatusCode, Option<String>)> {
    let client = Client::new();
    let urls = fleet.chat_urls();
    let mut set = JoinSet::new();
    for u in 0..users {
        for c in 0..calls {
            let (client, url, user) = (
                client.clone(),
                urls[(u + c) % urls.len()].clone(),
                format!("user{u}"),
            );
            set.spawn(async move {
                let r = client.post(&url, &user, r#"{"text":"alert"}"#).await;
                let code = code_of(&r);
                (user, r.status, code)
            });
        }
    }
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        out.push(done.expect("call task"));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Background load for the outage tests

/// One call of the background load, as its caller saw it.
#[derive(Clone, Debug)]
struct Call {
    user: String,
    started: Instant,
    ended: Instant,
    status: StatusCode,
    code: Option<String>,
}

/// [`LOAD_USERS`] users calling in a loop, each spreading its calls over every replica in turn.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
    tasks: JoinSet<()>,
}

impl Load {
    fn start(urls: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        let client = Client::new();
        for u in 0..LOAD_USERS {
            let (stop, calls, client, urls) =
                (stop.clone(), calls.clone(), client.clone(), urls.clone());
            tasks.spawn(async move {
                let user = format!("user{u}");
                let mut i = u;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let r = client.post(&urls[i % urls.len()], &user, "{}").await;
                    let call = Call {
                        user: user.clone(),
                        started,
                        ended: Instant::now(),
                        status: r.status,
                        code: code_of(&r),
                    };
                    calls.lock().unwrap().push(call);
                    i += 1;
                    tokio::time::sleep(LOAD_PAUSE).await;
                }
            });
        }
        Load { stop, calls, tasks }
    }

    /// Whether a call ended after `after` with `status`.
    fn saw(&self, status: StatusCode, after: Instant) -> bool {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.status == status && c.ended > after)
    }

    /// Stops the load and returns every call made.
    async fn finish(mut self) -> Vec<Call> {
        self.stop.store(true, Ordering::Relaxed);
        let joined = tokio::time::timeout(CLIENT_TIMEOUT + Duration::from_secs(5), async {
            while let Some(done) = self.tasks.join_next().await {
                done.expect("load task");
            }
        })
        .await;
        assert!(joined.is_ok(), "the load did not stop");
        let calls = self.calls.lock().unwrap().clone();
        calls
    }
}

/// What happened around one Redis outage (kill, then restart empty) under load.
struct Outage {
    redis: RedisServer,
    stub: ZohoStub,
    fleet: Fleet,
    calls: Vec<Call>,
    killed_at: Instant,
    restart_at: Instant,
    /// When every replica answered ready again after the restart.
    ready_at: Instant,
    errors_before: Vec<f64>,
}

impl Outage {
    /// Calls made wholly while Redis was down.
    fn during(&self) -> Vec<&Call> {
        self.calls
            .iter()
            .filter(|c| c.started >= self.killed_at && c.ended <= self.restart_at)
            .collect()
    }

    /// Stub arrivals (every user) in `[from, to)`.
    fn arrivals_between(&self, from: Instant, to: Instant) -> Vec<Instant> {
        self.stub
            .arrivals()
            .iter()
            .map(|a| a.at)
            .filter(|&at| at >= from && at < to)
            .collect()
    }
}

/// Runs [`REPLICAS`] replicas under load, kills Redis, keeps it down for `hold` after every
/// replica reports not-ready, restarts it empty, waits until every replica is ready again and a
/// call got through, lets the load run one more window, and stops it.
async fn outage(setup: Setup, hold: Duration) -> Outage {
    let mut redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(LIMIT, PER).await;
    let fleet = Fleet::start(REPLICAS, &setup.yaml(&stub.url(), &redis.url())).await;
    let errors_before = fleet.store_errors().await;
    assert!(
        fleet.all_readyz(StatusCode::OK).await,
        "ready before the outage"
    );

    let load = Load::start(fleet.chat_urls());
    let started = Instant::now();
    wait_for(
        "calls flowing before the outage",
        HEALTH_DEADLINE,
        || async { load.saw(StatusCode::OK, started) },
    )
    .await;
    tokio::time::sleep(WINDOW).await;

    redis.kill().await;
    let killed_at = Instant::now();
    wait_for(
        "every replica to report not-ready",
        HEALTH_DEADLINE,
        || async { fleet.all_readyz(StatusCode::SERVICE_UNAVAILABLE).await },
    )
    .await;
    tokio::time::sleep(hold).await;
    assert!(
        fleet.all_readyz(StatusCode::SERVICE_UNAVAILABLE).await,
        "a replica reported ready while Redis was down"
    );

    let restart_at = Instant::now();
    redis.restart().await;
    wait_for(
        "every replica to be ready again",
        HEALTH_DEADLINE,
        || async { fleet.all_readyz(StatusCode::OK).await },
    )
    .await;
    let ready_at = Instant::now();
    // The first window after the restart is conservative (empty Redis); then calls go again.
    wait_for(
        "a call forwarded after the restart",
        WINDOW * 3 + HEALTH_DEADLINE,
        || async { load.saw(StatusCode::OK, ready_at) },
    )
    .await;
    tokio::time::sleep(WINDOW).await;
    let calls = load.finish().await;
    Outage {
        redis,
        stub,
        fleet,
        calls,
        killed_at,
        restart_at,
        ready_at,
        errors_before,
    }
}

/// What every outage test checks: nobody crashed, errors were counted, calls flow after the
/// restart, and Zoho's window held for every user over the whole run.
async fn assert_outage_common(o: &Outage) {
    for i in 0..o.fleet.proxies.len() {
        assert_eq!(
            o.fleet.admin_status(i, "/healthz").await,
            StatusCode::OK,
            "replica {i} is alive"
        );
    }
    let errors_after = o.fleet.store_errors().await;
    for (i, (before, after)) in o.errors_before.iter().zip(&errors_after).enumerate() {
        assert!(
            after > before,
            "replica {i}: cliqgate_store_errors_total did not grow ({before} -> {after})"
        );
    }
    assert!(
        o.calls
            .iter()
            .any(|c| c.ended > o.restart_at && c.status == StatusCode::OK),
        "calls flow after the restart"
    );
    assert_eq!(o.stub.violations(), 0, "the stub saw a threshold crossed");
    for u in 0..LOAD_USERS {
        let user = format!("user{u}");
        let most = o.stub.max_in_any_window(CHAT, &user, PER);
        assert!(most <= LIMIT as usize, "{user}: {most} calls in one window");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_quota_in_reject_mode() {
    let redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(LIMIT, BURST_PER).await;
    let setup = Setup {
        per: BURST_PER,
        ..Setup::new("reject", REPLICAS as u32, "reject")
    };
    let fleet = Fleet::start(REPLICAS, &setup.yaml(&stub.url(), &redis.url())).await;
    fleet.warm_up().await;

    let calls = 3 * LIMIT as usize;
    let results = fleet_burst(&fleet, BURST_USERS, calls).await;

    assert_eq!(stub.violations(), 0, "the stub saw a threshold crossed");
    for u in 0..BURST_USERS {
        let user = format!("user{u}");
        let mine: Vec<_> = results.iter().filter(|(who, ..)| *who == user).collect();
        let ok = mine.iter().filter(|(_, s, _)| *s == StatusCode::OK).count();
        let refused: Vec<_> = mine
            .iter()
            .filter(|(_, s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
            .collect();
        assert_eq!(
            ok, LIMIT as usize,
            "{user}: the fleet as a whole gives exactly one quota"
        );
        assert_eq!(ok + refused.len(), calls, "{user}: every call 200 or 429");
        assert!(
            refused
                .iter()
                .all(|(.., code)| code.as_deref() == Some("rate_limit_exceeded")),
            "{user}: refusals are cliqgate's own"
        );
        assert_eq!(stub.count_for(CHAT, &user), LIMIT as usize);
    }
    // Plus one warm-up call per replica.
    let forwarded = fleet.decisions("forwarded").await - REPLICAS as f64;
    assert_eq!(forwarded, f64::from(LIMIT) * BURST_USERS as f64);
    assert_eq!(
        fleet.decisions("rejected").await,
        f64::from(2 * LIMIT) * BURST_USERS as f64
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_quota_in_queue_mode() {
    let redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(LIMIT, PER).await;
    let setup = Setup::new("reject", REPLICAS as u32, "queue");
    let fleet = Fleet::start(REPLICAS, &setup.yaml(&stub.url(), &redis.url())).await;
    fleet.warm_up().await;

    let calls = 3 * LIMIT as usize; // three windows' worth: two of them queued
    let results = fleet_burst(&fleet, BURST_USERS, calls).await;

    let not_ok: Vec<_> = results
        .iter()
        .filter(|(_, s, _)| *s != StatusCode::OK)
        .collect();
    assert!(
        not_ok.is_empty(),
        "queued calls all go out eventually: {not_ok:?}"
    );
    assert_eq!(stub.violations(), 0, "the stub saw a threshold crossed");
    for u in 0..BURST_USERS {
        let user = format!("user{u}");
        assert_eq!(stub.count_for(CHAT, &user), calls);
        let most = stub.max_in_any_window(CHAT, &user, PER);
        assert!(most <= LIMIT as usize, "{user}: {most} calls in one window");
    }
    assert_eq!(
        fleet.decisions("forwarded").await - REPLICAS as f64, // minus the warm-up calls
        f64::from(LIMIT) * BURST_USERS as f64,
        "the first window goes at once, across the fleet"
    );
    assert_eq!(
        fleet.decisions("delayed").await,
        (calls - LIMIT as usize) as f64 * BURST_USERS as f64
    );
    fleet.shutdown().await;
}

/// The proxy's lock in [`lock_learned_by_one_replica_refuses_on_the_others`]: long enough that it
/// holds for the whole test.
const PROXY_LOCK: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_learned_by_one_replica_refuses_on_the_others() {
    let redis = RedisServer::start().await;
    old_epoch(&redis).await;
    // Zoho's own quota is never reached here: the throttle comes from an outside client.
    let stub = stub(100, BURST_PER).await;
    let setup = Setup {
        per: BURST_PER,
        lock: PROXY_LOCK,
        limit: 10,
        ..Setup::new("reject", REPLICAS as u32, "reject")
    };
    let fleet = Fleet::start(REPLICAS, &setup.yaml(&stub.url(), &redis.url())).await;
    let client = Client::new();

    // Zoho throttles alice (another client used her quota): replica 0 meets the signal.
    throttle_everything(&stub);
    let throttled = client.post(&fleet.chat_url(0, "C1"), "alice", "{}").await;
    stub.set_fixed_response(None);
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        throttled.body,
        Bytes::from_static(ThrottleShape::Http429Plain.body().as_bytes()),
        "Zoho's answer is passed on as it came"
    );

    // The lock is recorded in Redis as the throttle answer goes back.
    wait_for(
        "the lock to reach Redis",
        Duration::from_secs(2),
        || async { user_keys(&redis).await.iter().any(|k| k.ends_with(":lock")) },
    )
    .await;
    let arrivals = stub.count_for(CHAT, "alice");
    assert_eq!(arrivals, 1);

    // The other replicas refuse alice at once, without asking Zoho, whatever the chat.
    for replica in [1, 2, 1, 2, 0] {
        let refused = client
            .post(
                &fleet.chat_url(replica, &format!("C{replica}")),
                "alice",
                "{}",
            )
            .await;
        assert_eq!(
            refused.status,
            StatusCode::TOO_MANY_REQUESTS,
            "replica {replica}: {}",
            refused.text()
        );
        assert_eq!(
            code_of(&refused).as_deref(),
            Some("rate_limit_exceeded"),
            "replica {replica}: cliqgate's own refusal"
        );
        let retry_after: u64 = refused
            .header("retry-after")
            .expect("a lock refusal carries Retry-After")
            .parse()
            .expect("whole seconds");
        assert!(
            (1..=PROXY_LOCK.as_secs()).contains(&retry_after),
            "replica {replica}: Retry-After {retry_after}"
        );
    }
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        arrivals,
        "a call for the locked (route, user) reached Zoho"
    );
    for replica in 1..REPLICAS {
        let m = fleet.metrics(replica).await;
        assert_eq!(
            metric_value(
                &m,
                "cliqgate_requests_total",
                &[("route", ROUTE), ("decision", "locked")]
            ),
            Some(2.0),
            "replica {replica}"
        );
        assert_eq!(
            metric_value(&m, "cliqgate_upstream_throttled_total", &[("route", ROUTE)]),
            Some(0.0),
            "replica {replica} learned the lock from Redis, not from Zoho"
        );
    }

    // Another user is unaffected, on every replica.
    for replica in 0..REPLICAS {
        let bob = client
            .post(&fleet.chat_url(replica, "C1"), "bob", "{}")
            .await;
        assert_eq!(
            bob.status,
            StatusCode::OK,
            "replica {replica}: {}",
            bob.text()
        );
    }
    assert_eq!(stub.count_for(CHAT, "bob"), REPLICAS);
    fleet.shutdown().await;
}

/// The route's lock in [`keys_are_hash_tagged_and_expire_on_their_own`]: short, so the test can
/// watch the lock key expire too.
const SHORT_LOCK: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_hash_tagged_and_expire_on_their_own() {
    let redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(LIMIT, PER).await;
    let setup = Setup {
        lock: SHORT_LOCK,
        ..Setup::new("reject", 1, "reject")
    };
    let fleet = Fleet::start(1, &setup.yaml(&stub.url(), &redis.url())).await;
    let client = Client::new();
    let url = fleet.chat_url(0, "C1");

    for user in ["alice", "bob"] {
        for _ in 0..2 {
            assert_eq!(client.post(&url, user, "{}").await.status, StatusCode::OK);
        }
    }
    // carol is throttled by Zoho: her (route, user) gets a lock key as well.
    throttle_everything(&stub);
    let throttled = client.post(&url, "carol", "{}").await;
    stub.set_fixed_response(None);
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    wait_for(
        "the lock to reach Redis",
        Duration::from_secs(2),
        || async { user_keys(&redis).await.iter().any(|k| k.ends_with(":lock")) },
    )
    .await;

    let keys = user_keys(&redis).await;
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut users = BTreeSet::new();
    let most_ms = (WINDOW + SHORT_LOCK + Duration::from_secs(1)).as_millis() as i64;
    for key in &keys {
        let (user, kind) = parse_key(key);
        users.insert(user);
        *kinds.entry(kind).or_default() += 1;
        let pttl: i64 = redis
            .command(&["PTTL", key])
            .await
            .parse()
            .expect("PTTL is an integer");
        assert!(
            pttl > 0 && pttl <= most_ms,
            "{key}: PTTL {pttl} ms, expected in 1..={most_ms} (window + lock + 1 s)"
        );
    }
    assert_eq!(users.len(), 3, "one hash tag per (route, user): {keys:?}");
    assert_eq!(
        kinds,
        BTreeMap::from([("lock".to_owned(), 1), ("w".to_owned(), 3)]),
        "a send log per user, a lock for carol: {keys:?}"
    );

    // Nothing is swept by cliqgate: Redis drops every key by itself.
    wait_for(
        "every (route, user) key to expire",
        Duration::from_millis(most_ms as u64) + EXPIRY_SLACK,
        || async { user_keys(&redis).await.is_empty() },
    )
    .await;
    let mut left: Vec<String> = redis
        .command(&["KEYS", "cliqgate:*"])
        .await
        .lines()
        .map(String::from)
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["cliqgate:epoch", "cliqgate:identity_scheme"],
        "only the global epoch and identity scheme keys are left"
    );
    assert_eq!(stub.violations(), 0);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_on_error_reject_refuses_then_recovers() {
    let setup = Setup::new("reject", REPLICAS as u32, "reject");
    let o = outage(setup, WINDOW).await;

    // While Redis was down every limited call was refused with 503 in Zoho's envelope.
    let during = o.during();
    assert!(!during.is_empty(), "no call was made during the outage");
    for call in &during {
        assert_eq!(
            (call.status, call.code.as_deref()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")),
            "{call:?}"
        );
    }
    // ... and nothing reached Zoho but calls decided before the kill.
    let sent = o.arrivals_between(o.killed_at + IN_FLIGHT, o.restart_at);
    assert!(
        sent.is_empty(),
        "{} calls were sent while Redis was down",
        sent.len()
    );
    assert_outage_common(&o).await;
    // Redis came back empty: whatever the fleet sent just before is unknown to it, so for one
    // window after its data began nothing goes through it (in reject mode nothing goes at all).
    let quiet = o.arrivals_between(o.restart_at, o.restart_at + WINDOW - MARGIN / 3);
    assert!(
        quiet.is_empty(),
        "{} calls sent in the first window after Redis restarted empty",
        quiet.len()
    );
    // The conservative first window after the restart refuses, it does not fail.
    assert!(
        o.calls
            .iter()
            .any(|c| c.ended > o.restart_at && c.status == StatusCode::TOO_MANY_REQUESTS),
        "no refusal after the restart"
    );
    assert!(
        o.calls
            .iter()
            .filter(|c| c.started > o.ready_at)
            .all(|c| c.status != StatusCode::SERVICE_UNAVAILABLE),
        "store errors after the replicas were ready again"
    );
    drop(o.redis);
    o.fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_with_on_error_local_keeps_serving_under_the_threshold() {
    let setup = Setup::new("local", REPLICAS as u32, "reject");
    // Long enough for the conservative hand-over window and then some local sends.
    let o = outage(setup, WINDOW * 2).await;

    // While Redis was down the fleet kept serving, never with a store error.
    let during = o.during();
    assert!(
        during.iter().all(|c| c.status == StatusCode::OK
            || (c.status == StatusCode::TOO_MANY_REQUESTS
                && c.code.as_deref() == Some("rate_limit_exceeded"))),
        "local mode answers 200 or cliqgate's 429: {:?}",
        during
            .iter()
            .filter(|c| c.status != StatusCode::OK)
            .find(|c| c.status != StatusCode::TOO_MANY_REQUESTS)
    );
    assert!(
        during.iter().any(|c| c.status == StatusCode::OK),
        "nothing was served while Redis was down"
    );
    // Going local is pessimistic: what the fleet sent just before is unknown, so nothing goes
    // for one window after the outage began.
    let early = o.arrivals_between(o.killed_at + IN_FLIGHT, o.killed_at + WINDOW - MARGIN / 3);
    assert!(
        early.is_empty(),
        "{} calls sent in the first window of the outage",
        early.len()
    );
    assert_outage_common(&o).await;

    // Back on Redis: with the load stopped, a fresh user's calls through each replica in turn are
    // all recorded in one shared send log (once every replica has left its recovery window).
    let mut attempt = 0;
    wait_for(
        "every replica to decide in Redis again",
        WINDOW * 2 + HEALTH_DEADLINE,
        || {
            attempt += 1;
            let user = format!("fresh{attempt}");
            let (redis, fleet) = (&o.redis, &o.fleet);
            async move {
                let before = user_keys(redis).await;
                let client = Client::new();
                for replica in 0..REPLICAS {
                    let r = client
                        .post(&fleet.chat_url(replica, "C1"), &user, "{}")
                        .await;
                    if r.status != StatusCode::OK {
                        return false;
                    }
                }
                let after = user_keys(redis).await;
                let new: Vec<_> = after.difference(&before).collect();
                let [key] = new[..] else {
                    return false;
                };
                redis.command(&["ZCARD", key]).await == REPLICAS.to_string()
            }
        },
    )
    .await;
    assert_eq!(o.stub.violations(), 0);
    o.fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_replica_alone_uses_only_its_share() {
    let redis_replicas = 2;
    let mut redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(LIMIT, PER).await;
    let setup = Setup::new("local", redis_replicas, "reject");
    let fleet = Fleet::start(1, &setup.yaml(&stub.url(), &redis.url())).await;
    let load = Load::start(fleet.chat_urls());
    let started = Instant::now();
    wait_for(
        "calls flowing before the outage",
        HEALTH_DEADLINE,
        || async { load.saw(StatusCode::OK, started) },
    )
    .await;

    redis.kill().await;
    let killed_at = Instant::now();
    wait_for(
        "the replica to report not-ready",
        HEALTH_DEADLINE,
        || async { fleet.all_readyz(StatusCode::SERVICE_UNAVAILABLE).await },
    )
    .await;
    // The conservative first window, then two windows deciding alone.
    let until = killed_at + WINDOW * 3;
    tokio::time::sleep_until(until).await;
    let calls = load.finish().await;
    assert!(
        fleet.all_readyz(StatusCode::SERVICE_UNAVAILABLE).await,
        "still down"
    );

    let share = (LIMIT / redis_replicas) as usize;
    let during: Vec<_> = calls.iter().filter(|c| c.started >= killed_at).collect();
    assert!(
        during
            .iter()
            .all(|c| c.status == StatusCode::OK || c.status == StatusCode::TOO_MANY_REQUESTS),
        "local mode answers 200 or 429"
    );
    for u in 0..LOAD_USERS {
        let user = format!("user{u}");
        let down: Vec<Instant> = stub
            .times_for(CHAT, &user)
            .into_iter()
            .filter(|&t| t >= killed_at + IN_FLIGHT)
            .collect();
        assert!(
            down.iter().all(|&t| t >= killed_at + WINDOW - MARGIN / 3),
            "{user}: sent during the conservative first window"
        );
        let most = max_in_any_window(&down, PER);
        assert!(
            most <= share,
            "{user}: {most} calls in one window while alone, its share is {share}"
        );
        assert!(
            down.len() >= share,
            "{user}: only {} calls while alone: its share was not used",
            down.len()
        );
        let served = during
            .iter()
            .filter(|c| c.user == user && c.status == StatusCode::OK)
            .count();
        assert!(served >= share, "{user}: {served} served while alone");
    }
    assert_eq!(stub.violations(), 0);
    fleet.shutdown().await;
}

/// Going local keeps the locks this replica knows: Zoho's lock runs on whoever decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_learned_before_an_outage_holds_while_deciding_locally() {
    let mut redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(100, PER).await;
    let setup = Setup {
        lock: PROXY_LOCK,
        ..Setup::new("local", 1, "reject")
    };
    let fleet = Fleet::start(1, &setup.yaml(&stub.url(), &redis.url())).await;
    let client = Client::new();
    let url = fleet.chat_url(0, "C1");

    throttle_everything(&stub);
    let throttled = client.post(&url, "alice", "{}").await;
    stub.set_fixed_response(None);
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    wait_for(
        "the lock to reach Redis",
        Duration::from_secs(2),
        || async { user_keys(&redis).await.iter().any(|k| k.ends_with(":lock")) },
    )
    .await;

    redis.kill().await;
    wait_for(
        "the replica to report not-ready",
        HEALTH_DEADLINE,
        || async { fleet.all_readyz(StatusCode::SERVICE_UNAVAILABLE).await },
    )
    .await;
    // Past the conservative first window: bob is served locally again, alice is still locked.
    let bob_url = url.clone();
    wait_for(
        "bob to be served locally",
        WINDOW * 2 + HEALTH_DEADLINE,
        || {
            let (client, url) = (client.clone(), bob_url.clone());
            async move { client.post(&url, "bob", "{}").await.status == StatusCode::OK }
        },
    )
    .await;
    let refused = client.post(&url, "alice", "{}").await;
    assert_eq!(
        (refused.status, code_of(&refused).as_deref()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded")),
        "the lock learned before the outage was forgotten: {}",
        refused.text()
    );
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        1,
        "a locked call reached Zoho"
    );
    fleet.shutdown().await;
}

/// Coming back writes a lock learned while deciding locally to Redis: it exists nowhere else, and
/// without it even the replica that learned it would send again once Redis decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_learned_during_an_outage_is_shared_when_redis_is_back() {
    // No epoch set: Redis restarts empty in this test anyway, and nothing is sent before the kill.
    let mut redis = RedisServer::start().await;
    let stub = stub(100, PER).await;
    let setup = Setup {
        lock: PROXY_LOCK,
        ..Setup::new("local", 1, "reject")
    };
    let fleet = Fleet::start(1, &setup.yaml(&stub.url(), &redis.url())).await;
    let client = Client::new();
    let url = fleet.chat_url(0, "C1");

    redis.kill().await;
    wait_for(
        "the replica to report not-ready",
        HEALTH_DEADLINE,
        || async {
            // A call makes the replica notice at once (else its probe does, within a second).
            client.post(&url, "bob", "{}").await;
            fleet.all_readyz(StatusCode::SERVICE_UNAVAILABLE).await
        },
    )
    .await;
    // Past the conservative first window, alice's call goes out locally and is throttled.
    throttle_everything(&stub);
    wait_for(
        "alice's call to reach Zoho",
        WINDOW * 2 + HEALTH_DEADLINE,
        || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client.post(&url, "alice", "{}").await.body == ThrottleShape::Http429Plain.body()
            }
        },
    )
    .await;
    stub.set_fixed_response(None);
    let arrivals = stub.count_for(CHAT, "alice");

    redis.restart().await;
    wait_for("the replica to be ready again", HEALTH_DEADLINE, || async {
        fleet.all_readyz(StatusCode::OK).await
    })
    .await;
    // Redis now holds the lock for every replica, and this one still honours it once the
    // conservative window after the restart is over.
    wait_for(
        "the lock to reach Redis",
        Duration::from_secs(2),
        || async { user_keys(&redis).await.iter().any(|k| k.ends_with(":lock")) },
    )
    .await;
    let bob_url = url.clone();
    wait_for(
        "bob to be served through Redis",
        WINDOW * 2 + HEALTH_DEADLINE,
        || {
            let (client, url) = (client.clone(), bob_url.clone());
            async move { client.post(&url, "bob", "{}").await.status == StatusCode::OK }
        },
    )
    .await;
    let refused = client.post(&url, "alice", "{}").await;
    assert_eq!(
        (refused.status, code_of(&refused).as_deref()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded")),
        "the lock learned during the outage was forgotten: {}",
        refused.text()
    );
    assert_eq!(
        stub.count_for(CHAT, "alice"),
        arrivals,
        "a locked call reached Zoho"
    );
    fleet.shutdown().await;
}

/// A stopping proxy waits for its own lingering work only: after the Redis client reconnected
/// on a worker thread (whose connection task then lives on that worker), a shutdown with nothing
/// in flight still ends at once, not at `timeouts.shutdown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_a_redis_reconnect_does_not_wait_for_the_redis_connection() {
    const SHUTDOWN: Duration = Duration::from_secs(8);
    let redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(LIMIT, PER).await;
    let yaml = format!(
        "{}timeouts:\n  shutdown: \"{}s\"\n",
        Setup::new("reject", 1, "reject").yaml(&stub.url(), &redis.url()),
        SHUTDOWN.as_secs()
    );
    let running = start_proxy(&yaml).await;
    let client = Client::new();
    let url = format!("{}{}", base_url(&running), "/api/v3/chats/C1/message");
    let first = client.post(&url, "alice", "{}").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    // Cut cliqgate's Redis connections: the next calls reconnect from a worker thread.
    redis.command(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    // Calls meet the cut connection (503 under `on_error: reject`) until the client has
    // reconnected; each call is another user's, so no quota runs out meanwhile.
    let mut n = 0;
    wait_for(
        "a call served again after the reconnect",
        Duration::from_secs(10),
        || {
            n += 1;
            let (client, url, user) = (&client, &url, format!("user{n}"));
            async move { client.post(url, &user, "{}").await.status == StatusCode::OK }
        },
    )
    .await;

    let stopping = Instant::now();
    running.shutdown().await;
    let took = stopping.elapsed();
    assert!(
        took < SHUTDOWN / 2,
        "shutdown took {took:?} with nothing in flight (timeouts.shutdown {SHUTDOWN:?})"
    );
}

/// A restart of the fleet that changes how users are keyed (token to header mode) finds the
/// sends in Redis under keys its users no longer map to: every key is held for a window (the
/// epoch moves), instead of each user getting a second quota. The same scheme again holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_that_changes_the_identity_holds_every_key_for_a_window() {
    let redis = RedisServer::start().await;
    old_epoch(&redis).await;
    let stub = stub(LIMIT, BURST_PER).await;
    let setup = Setup {
        per: BURST_PER,
        ..Setup::new("reject", 1, "reject")
    };
    let token_mode = setup.yaml(&stub.url(), &redis.url());
    let header_mode = token_mode.replacen(
        "routes:",
        "identity:\n  mode: header\n  header: \"X-Cliq-User\"\nroutes:",
        1,
    );
    let post = |running: &cliqgate::app::Running, user: &'static str| {
        let url = format!("{}/api/v3/chats/C1/message", base_url(running));
        let mut req = request(Method::POST, &url, Some(user), "{}");
        req.headers_mut()
            .insert("x-cliq-user", http::HeaderValue::from_static(user));
        async move { Client::new().send(req).await.status }
    };

    let first = start_proxy(&token_mode).await;
    for _ in 0..LIMIT {
        assert_eq!(post(&first, "alice").await, StatusCode::OK);
    }
    first.shutdown().await;

    let second = start_proxy(&header_mode).await;
    assert_eq!(
        post(&second, "alice").await,
        StatusCode::TOO_MANY_REQUESTS,
        "held: alice's calls in the window are under her old key"
    );
    assert_eq!(
        post(&second, "bob").await,
        StatusCode::TOO_MANY_REQUESTS,
        "every key is held"
    );
    second.shutdown().await;
    assert_eq!(stub.violations(), 0, "Zoho saw alice's quota crossed");
    assert_eq!(
        redis
            .command(&["GET", "cliqgate:identity_scheme"])
            .await
            .len(),
        16,
        "the scheme is recorded as a short hash"
    );

    // The same scheme again: nothing more to hold (the epoch stays where it is).
    let epoch = redis.command(&["GET", "cliqgate:epoch"]).await;
    let third = start_proxy(&header_mode).await;
    assert_eq!(redis.command(&["GET", "cliqgate:epoch"]).await, epoch);
    third.shutdown().await;
}
