//! What `GET /admin/limits` shows for the Redis store: the keys this replica can see cheaply.
//!
//! One bounded `SCAN` over `{prefix}{*` (at most `MAX_SCAN_CALLS` calls and the caller's key
//! budget), then one pipeline: `TIME` and, per (route, user), `ZRANGE ... WITHSCORES` of the send
//! log, `GET` of the TAT and `GET` of the lock. Statuses are computed by the same code as the
//! embedded store's, on Redis's clock. The answer is marked partial when the scan stopped early;
//! while Redis is unreachable it shows this replica's local decisions instead (also partial).
//! Not shown: the epoch guard's headroom right after Redis lost its data, and the smaller quota a
//! replica decides with while it recovers.

use std::collections::{BTreeMap, HashMap};

use redis::Value;

use super::super::memory::{key_status, GcraState, History, KeyStatus};
use super::super::window::SendLog;
use super::*;
use crate::limit::UserKey;

/// `SCAN` calls per admin request: bounds the time one request can take on a huge keyspace.
const MAX_SCAN_CALLS: usize = 64;
const SCAN_COUNT: usize = 500;
/// An arbitrary point on the status clock, far from 0 so times before it never saturate.
const STATUS_NOW: i128 = 1 << 62;

/// The admin view of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisStatus {
    pub keys: Vec<KeyStatus>,
    /// Not every key is shown (scan budget hit, or Redis unreachable).
    pub partial: bool,
    /// `redis`, or `local` while Redis is unreachable.
    pub source: &'static str,
    /// Redis keys looked at.
    pub scanned: usize,
    pub note: Option<String>,
}

#[derive(Default)]
struct Found {
    window: bool,
    gcra: bool,
    lock: bool,
}

impl RedisStore {
    /// The status of (at most about `max_keys`) Redis keys, under each route's policy (`policy`
    /// gives `None` for routes that are not configured: their keys are left out).
    pub async fn status(
        &self,
        policy: impl Fn(&Key) -> Option<Policy>,
        max_keys: usize,
    ) -> RedisStatus {
        if !matches!(self.health(), Health::Down { .. }) {
            match self.shared_status(&policy, max_keys).await {
                Ok(status) => return status,
                Err(e) => {
                    return self.local_status(
                        &policy,
                        format!(
                            "Redis did not answer ({e}); showing this replica's local decisions"
                        ),
                    );
                }
            }
        }
        self.local_status(
            &policy,
            "Redis is unavailable; showing this replica's local decisions".to_string(),
        )
    }

    fn local_status(&self, policy: &impl Fn(&Key) -> Option<Policy>, note: String) -> RedisStatus {
        let keys = self
            .fallback
            .status(|key| policy(key).and_then(|p| self.local_policy(&p)));
        RedisStatus {
            keys,
            partial: true,
            source: "local",
            scanned: 0,
            note: Some(note),
        }
    }

    async fn shared_status(
        &self,
        policy: &impl Fn(&Key) -> Option<Policy>,
        max_keys: usize,
    ) -> Result<RedisStatus, StoreError> {
        let mut ids = HashMap::new();
        for i in 0.. {
            match self.options.routes.name(RouteId(i)) {
                Some(name) => ids.insert(name, RouteId(i)),
                None => break,
            };
        }
        let pattern = format!("{}{{*", glob_escape(&self.options.prefix));
        let mut found: BTreeMap<(RouteId, UserKey), Found> = BTreeMap::new();
        let (mut cursor, mut calls, mut scanned) = (0u64, 0usize, 0usize);
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, keys): (u64, Vec<String>) = self.admin_query(cmd).await?;
            calls += 1;
            scanned += keys.len();
            for key in keys {
                if let Some((route, user, kind)) = self.parse_key(&key, &ids) {
                    let entry = found.entry((route, user)).or_default();
                    match kind {
                        "w" => entry.window = true,
                        "g" => entry.gcra = true,
                        _ => entry.lock = true,
                    }
                }
            }
            cursor = next;
            if cursor == 0 || calls >= MAX_SCAN_CALLS || scanned >= max_keys {
                break;
            }
        }
        let partial = cursor != 0;

        let groups: Vec<((RouteId, UserKey), Found)> = found
            .into_iter()
            .filter(|((route, user), _)| {
                let key = Key {
                    route: *route,
                    user: *user,
                };
                policy(&key).is_some()
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for ((route, user), _) in &groups {
            let base = self.key_base(&Key {
                route: *route,
                user: *user,
            });
            pipe.cmd("ZRANGE")
                .arg(format!("{base}:w"))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
            pipe.cmd("GET").arg(format!("{base}:g"));
            pipe.cmd("GET").arg(format!("{base}:lock"));
        }
        let values: Vec<Value> = self.admin_pipe(pipe).await?;
        let mut values = values.into_iter();
        let redis_now = match values.next() {
            _ if self.options.injected_time => i128::from(self.clock.now()),
            Some(time) => redis_time(&time)?,
            None => return Err(StoreError::Unavailable("no answer to TIME".into())),
        };

        let mut keys = Vec::new();
        for ((route, user), what) in groups {
            let (sends, tat, lock) = (values.next(), values.next(), values.next());
            let key = Key { route, user };
            let Some(policy) = policy(&key) else {
                continue;
            };
            // On the status clock: `STATUS_NOW` is Redis's now.
            let at = |units: i128| to_status_clock(self.signed_nanos(units - redis_now));
            let now = to_status_clock(0);
            let sends: Vec<i128> = if what.window {
                sends.map(|v| scores(&v)).unwrap_or_default()
            } else {
                Vec::new()
            };
            let tat = if what.gcra {
                tat.and_then(|v| number(&v))
            } else {
                None
            };
            let locked_until = if what.lock {
                lock.and_then(|v| number(&v))
                    .filter(|&l| l > redis_now)
                    .map_or(0, at)
            } else {
                0
            };
            let queued_sends = sends.iter().filter(|&&s| s > redis_now).count();
            let (history, idle_at, queued) = match (policy.kind, tat) {
                (Kind::Gcra { burst, period }, Some(tat)) => {
                    let tat = at(tat);
                    let tau = u64::from(burst.saturating_sub(1)).saturating_mul(period);
                    let queued = tat
                        .saturating_sub(tau)
                        .saturating_sub(now)
                        .div_ceil(period.max(1));
                    (History::Gcra(GcraState::new(tat, tat)), tat, queued)
                }
                // A TAT left from before the route became a window route.
                (_, Some(tat)) if sends.is_empty() => {
                    let tat = at(tat);
                    (History::Gcra(GcraState::new(tat, tat)), tat, 0)
                }
                _ => {
                    let times: Vec<Nanos> = sends.iter().map(|&s| at(s)).collect();
                    let newest = times.iter().max().copied();
                    let idle_at = newest.map_or(0, |t| t.saturating_add(policy.window));
                    let log = SendLog::from_times(times, idle_at);
                    (History::Window(log), idle_at, queued_sends as u64)
                }
            };
            let status = key_status(
                key,
                &history,
                locked_until,
                idle_at,
                u32::try_from(queued).unwrap_or(u32::MAX),
                &policy,
                now,
                0,
            );
            let holds = status.calls_in_window > 0
                || status.locked_for > 0
                || status.queued > 0
                || status.next_free_in > 0;
            if holds {
                keys.push(status);
            }
        }
        Ok(RedisStatus {
            keys,
            partial,
            source: "redis",
            scanned,
            note: partial
                .then(|| format!("scan stopped after {scanned} keys; not every key is shown")),
        })
    }

    /// `{prefix}{route:userhex}:w|g|lock` -> (route, user, suffix), for configured routes only.
    fn parse_key<'k>(
        &self,
        key: &'k str,
        ids: &HashMap<String, RouteId>,
    ) -> Option<(RouteId, UserKey, &'k str)> {
        let rest = key.strip_prefix(self.options.prefix.as_str())?;
        let rest = rest.strip_prefix('{')?;
        let close = rest.rfind("}:")?;
        let (inner, suffix) = (&rest[..close], &rest[close + 2..]);
        if !matches!(suffix, "w" | "g" | "lock") {
            return None;
        }
        let (route, user) = inner.rsplit_once(':')?;
        let route = *ids.get(route)?;
        Some((route, UserKey::from_hex(user)?, suffix))
    }

    /// A signed duration in the store's units, in nanoseconds.
    fn signed_nanos(&self, units: i128) -> i128 {
        if self.options.injected_time {
            units
        } else {
            units.saturating_mul(1_000)
        }
    }

    async fn admin_query<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.admin_timeout(), cmd.query_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("{:?}", e.kind()))),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    async fn admin_pipe(&self, pipe: redis::Pipeline) -> Result<Vec<Value>, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.admin_timeout(), pipe.query_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("{:?}", e.kind()))),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Admin reads are not decisions: they may take longer, and a slow one marks nothing down.
    fn admin_timeout(&self) -> Duration {
        self.options.timeout.max(Duration::from_secs(2))
    }
}

fn to_status_clock(offset_ns: i128) -> Nanos {
    Nanos::try_from((STATUS_NOW + offset_ns).max(0)).unwrap_or(Nanos::MAX)
}

/// `TIME` -> microseconds.
fn redis_time(value: &Value) -> Result<i128, StoreError> {
    let parts: Vec<i64> = redis::from_redis_value_ref(value)
        .map_err(|e| StoreError::Unavailable(format!("unexpected TIME answer: {e}")))?;
    match parts.as_slice() {
        [secs, micros] => Ok(i128::from(*secs) * 1_000_000 + i128::from(*micros)),
        _ => Err(StoreError::Unavailable("unexpected TIME answer".into())),
    }
}

/// The scores of `ZRANGE ... WITHSCORES` (RESP2: flat member, score; RESP3: pairs), ascending.
fn scores(value: &Value) -> Vec<i128> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let raw: Vec<&Value> = if items.iter().all(|v| matches!(v, Value::Array(_))) {
        items
            .iter()
            .filter_map(|pair| match pair {
                Value::Array(pair) => pair.get(1),
                _ => None,
            })
            .collect()
    } else {
        items.iter().skip(1).step_by(2).collect()
    };
    let mut out: Vec<i128> = raw.into_iter().filter_map(number).collect();
    out.sort_unstable();
    out
}

/// A number Redis holds as a string (possibly written by Lua as a float).
fn number(value: &Value) -> Option<i128> {
    let f: f64 = redis::from_redis_value_ref(value).ok()?;
    f.is_finite().then(|| f.round() as i128)
}

/// Escapes Redis glob specials in a literal.
fn glob_escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zrange_scores_in_both_protocols() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let resp2 = Value::Array(vec![b("m1"), b("20"), b("m0"), b("1.5e+1")]);
        assert_eq!(scores(&resp2), vec![15, 20]);
        let resp3 = Value::Array(vec![
            Value::Array(vec![b("m1"), Value::Double(7.0)]),
            Value::Array(vec![b("m2"), Value::Double(9.0)]),
        ]);
        assert_eq!(scores(&resp3), vec![7, 9]);
        assert_eq!(scores(&Value::Nil), Vec::<i128>::new());
    }

    #[test]
    fn glob_specials_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(glob_escape("cliqgate:"), "cliqgate:");
    }
}
