//! Restart safety for the embedded store (`store: {kind: memory, state_file: PATH}`).
//!
//! A restarted process must not forget the calls of the last window, or the first burst after a
//! deploy trips a Zoho lock. The store's keys are written to a small JSON file periodically and
//! once more on graceful shutdown, and read back at start.
//!
//! The two processes share no monotonic clock (each store's clock starts at its process start),
//! so the file holds every time *relative to the moment it was written* and the wall clock bridges
//! the gap: on read, the wall time elapsed since writing is subtracted. Every rounding errs on the
//! safe side: sends look more recent, TATs and locks end later.
//!
//! ```json
//! { "version": 1, "written_at_unix_ms": 1700000000000, "identity": "<16 hex>",
//!   "keys": [ { "route": "chats.post_message", "user": "<32 hex>", "sends_ms_ago": [812, 40],
//!               "tat_ms_from_now": null, "locked_for_ms": 0 } ] }
//! ```
//! `sends_ms_ago` is oldest first; a negative value is a reservation still ahead. A file that is
//! missing, unreadable, corrupt or stale is ignored (the caller logs a warning) and the proxy
//! starts empty: never a panic, never a refusal to start. Without a state file, a restart forgets
//! every send and every learned lock. `identity` names how users were keyed: a restart that finds
//! another one holds every key for a window, as a reload that changes it does.
//!
//! In resolve mode the identity answers go beside it, in `<name>.identity.json` ([`answers_path`]):
//! each token's owner, both as hashes, with the time the answer has left. A restart then does not
//! ask about every live token again (lookups share a small budget of the identity endpoint's
//! quota). Answers about another endpoint or field (`scope`) are not taken back.
//!
//! ```json
//! { "version": 1, "written_at_unix_ms": 1700000000000, "scope": "<16 hex>",
//!   "answers": [ { "token": "<32 hex>", "user": "<32 hex>", "left_ms": 2999000 } ] }
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::config::{Config, IdentityConfig, StoreConfig, STATE_FILE_INTERVAL};
use crate::limit::{
    Key, KeySnapshot, Limiter, MemoryStore, Nanos, RouteId, RouteNames, Store, UserKey,
};
use crate::resolve::{Answers, KeptAnswer};

/// The file format version this build writes and reads.
pub const VERSION: u32 = 1;

const NS_PER_MS: i128 = 1_000_000;

/// Times further off than this are not a real limiter state: the file is treated as corrupt
/// rather than locking a user out for months.
const MAX_PLAUSIBLE_MS: i64 = 7 * 24 * 60 * 60 * 1000;

#[derive(Debug, Serialize, Deserialize)]
struct FileV1 {
    version: u32,
    written_at_unix_ms: u64,
    /// How users were keyed ([`crate::identity::scheme_id`]); absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    /// How long ago every key was assumed full ([`MemoryStore::floor`]; negative: ahead), so a
    /// hold outlives a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    floor_ms_ago: Option<i64>,
    keys: Vec<SavedKey>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedKey {
    route: String,
    user: String,
    #[serde(default)]
    sends_ms_ago: Vec<i64>,
    #[serde(default)]
    tat_ms_from_now: Option<i64>,
    #[serde(default)]
    locked_for_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct AnswersV1 {
    version: u32,
    written_at_unix_ms: u64,
    scope: String,
    answers: Vec<SavedAnswer>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedAnswer {
    token: String,
    user: String,
    left_ms: u64,
}

/// Only the version, read first so a future format fails as "wrong version", not as bad JSON.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// What [`read`] put into the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Keys restored (with at least one send, TAT or lock still in force).
    pub keys: usize,
    /// Of those, keys under a lock.
    pub locked: usize,
    /// Entries of routes that are not configured any more (skipped).
    pub unknown_routes: usize,
    /// Entries whose user was not 32 hex digits (skipped).
    pub invalid: usize,
    /// Entries of which nothing is in force any more (skipped).
    pub expired: usize,
    /// Wall time since the file was written.
    pub age: Duration,
    /// The wall clock is behind the file's write time: loaded as if just written (the safe side).
    pub clock_went_back: bool,
    /// How users were keyed when the file was written, if it says.
    pub identity: Option<String>,
    /// A hold (every key assumed full) still in force was restored.
    pub held: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No file yet (first start): not worth a warning.
    #[error("no state file yet")]
    Missing,
    #[error("cannot read the state file: {0}")]
    Io(#[from] io::Error),
    #[error("the state file is corrupt: {0}")]
    Corrupt(String),
    #[error("the state file is stale (written {age:?} ago; nothing in it is in force any more)")]
    Stale { age: Duration },
}

/// Writes the store's keys to `path` atomically (a temp file in the same directory, fsync,
/// rename), with `identity`, how their users are keyed. Keys of routes `route_name` does not
/// know are left out. Returns how many keys went in.
pub fn write(
    path: &Path,
    store: &MemoryStore,
    route_name: impl Fn(RouteId) -> Option<String>,
    identity: Option<&str>,
) -> io::Result<usize> {
    write_at(path, store, route_name, identity, SystemTime::now())
}

/// [`write()`] at a given wall time (tests).
pub(crate) fn write_at(
    path: &Path,
    store: &MemoryStore,
    route_name: impl Fn(RouteId) -> Option<String>,
    identity: Option<&str>,
    wall: SystemTime,
) -> io::Result<usize> {
    // The store's now is read before the snapshot and the wall time after: ages come out no larger
    // and the write moment no earlier than they are, so the reader sees sends as more recent.
    let now = i128::from(Limiter::clock(store).now());
    let snapshot = store.snapshot();
    let written_at_unix_ms = unix_ms_ceil(wall);
    let keys: Vec<SavedKey> = snapshot
        .into_iter()
        .filter_map(|s| {
            let route = route_name(s.key.route)?;
            let sends_ms_ago = s
                .sends
                .iter()
                .map(|&t| clamp_i64((now - i128::from(t)).div_euclid(NS_PER_MS)))
                .collect();
            let tat_ms_from_now = s.tat.map(|tat| clamp_i64(ceil_ms(i128::from(tat) - now)));
            let locked_for_ms =
                u64::try_from(ceil_ms(i128::from(s.locked_until) - now)).unwrap_or(0);
            Some(SavedKey {
                route,
                user: s.key.user.hex(),
                sends_ms_ago,
                tat_ms_from_now,
                locked_for_ms,
            })
        })
        .collect();
    let count = keys.len();
    let file = FileV1 {
        version: VERSION,
        written_at_unix_ms,
        identity: identity.map(str::to_string),
        // Rounded down: the floor comes back no earlier than it was.
        floor_ms_ago: store
            .floor()
            .map(|floor| clamp_i64((now - i128::from(floor)).div_euclid(NS_PER_MS))),
        keys,
    };
    let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
    write_atomically(path, &bytes)?;
    Ok(count)
}

/// Reads `path` into the store, converting its times to the store's clock. `route_id` maps a
/// saved route name to the route it is now (`None`: not configured any more, skipped);
/// `max_window` is the longest `per + safety_margin` of any route: sends older than that
/// constrain nothing and are dropped.
pub fn read(
    path: &Path,
    store: &MemoryStore,
    route_id: impl Fn(&str) -> Option<RouteId>,
    max_window: Duration,
) -> Result<Loaded, StateError> {
    read_at(path, store, route_id, max_window, SystemTime::now())
}

/// [`read`] at a given wall time (tests).
pub(crate) fn read_at(
    path: &Path,
    store: &MemoryStore,
    route_id: impl Fn(&str) -> Option<RouteId>,
    max_window: Duration,
    wall: SystemTime,
) -> Result<Loaded, StateError> {
    let file: FileV1 = read_versioned(path)?;
    check_plausible(&file)?;

    // Wall time first, the store's clock after: elapsed comes out no larger and now no earlier
    // than they are, so restored sends land later, TATs and locks end later.
    let wall_ms = unix_ms_floor(wall);
    let clock_went_back = wall_ms < file.written_at_unix_ms;
    let elapsed_ms = i128::from(wall_ms.saturating_sub(file.written_at_unix_ms));
    let window_ms = i128::try_from(max_window.as_millis()).unwrap_or(i128::MAX);
    let age = Duration::from_millis(u64::try_from(elapsed_ms).unwrap_or(u64::MAX));

    // Stale: written longer ago than anything in it could still be in force.
    let in_force_ms = file
        .keys
        .iter()
        .flat_map(|k| {
            let ahead = k
                .sends_ms_ago
                .iter()
                .map(|&a| (-i128::from(a)).max(0) + window_ms);
            ahead
                .chain(k.tat_ms_from_now.map(i128::from))
                .chain([i128::from(k.locked_for_ms)])
        })
        .chain(file.floor_ms_ago.map(|ago| window_ms - i128::from(ago)))
        .fold(window_ms, i128::max);
    if elapsed_ms >= in_force_ms {
        return Err(StateError::Stale { age });
    }

    let now = i128::from(Limiter::clock(store).now());
    let window_ns = window_ms.saturating_mul(NS_PER_MS);
    let mut loaded = Loaded {
        age,
        clock_went_back,
        identity: file.identity.clone(),
        ..Loaded::default()
    };
    let mut restored = Vec::with_capacity(file.keys.len());
    for saved in file.keys {
        let Some(route) = route_id(&saved.route) else {
            loaded.unknown_routes += 1;
            continue;
        };
        let Some(user) = UserKey::from_hex(&saved.user) else {
            loaded.invalid += 1;
            continue;
        };
        // Relative to now, on this process's clock; sends before its origin are put at the origin
        // (later than they were: the safe side).
        let sends: Vec<Nanos> = saved
            .sends_ms_ago
            .iter()
            .map(|&ago| (i128::from(ago) + elapsed_ms).saturating_mul(NS_PER_MS))
            .filter(|&age| age < window_ns)
            .map(|age| to_nanos(now - age))
            .collect();
        let tat = saved
            .tat_ms_from_now
            .map(|ahead| (i128::from(ahead) - elapsed_ms).saturating_mul(NS_PER_MS))
            .filter(|&ahead| ahead > 0)
            .map(|ahead| to_nanos(now + ahead));
        let lock_ns = (i128::from(saved.locked_for_ms) - elapsed_ms).saturating_mul(NS_PER_MS);
        let locked_until = if lock_ns > 0 {
            to_nanos(now + lock_ns)
        } else {
            0
        };
        let idle_at = match (tat, sends.iter().max()) {
            (Some(tat), _) => tat,
            (None, Some(&newest)) => to_nanos(i128::from(newest) + window_ns),
            (None, None) => 0,
        };
        if idle_at == 0 && locked_until == 0 {
            loaded.expired += 1;
            continue;
        }
        // A GCRA key whose TAT has passed keeps nothing but its lock.
        let sends = if saved.tat_ms_from_now.is_some() {
            Vec::new()
        } else {
            sends
        };
        loaded.keys += 1;
        loaded.locked += usize::from(locked_until > 0);
        restored.push(KeySnapshot {
            key: Key { route, user },
            sends,
            tat,
            locked_until,
            idle_at,
        });
    }
    store.restore(restored);
    if let Some(ago) = file.floor_ms_ago {
        let age = (i128::from(ago) + elapsed_ms).saturating_mul(NS_PER_MS);
        if age < window_ns {
            store.raise_floor(to_nanos(now - age));
            loaded.held = true;
        }
    }
    Ok(loaded)
}

/// Where the identity answers go: beside the state file, `state.json` -> `state.identity.json`.
pub fn answers_path(state_file: &Path) -> PathBuf {
    state_file.with_extension("identity.json")
}

/// Writes resolve mode's answers about `scope` atomically. Returns how many went in.
pub fn write_answers(path: &Path, scope: &str, answers: &[KeptAnswer]) -> io::Result<usize> {
    write_answers_at(path, scope, answers, SystemTime::now())
}

/// [`write_answers`] at a given wall time (tests).
pub(crate) fn write_answers_at(
    path: &Path,
    scope: &str,
    answers: &[KeptAnswer],
    wall: SystemTime,
) -> io::Result<usize> {
    let file = AnswersV1 {
        version: VERSION,
        // The earlier the write looks, the less time the reader leaves each answer.
        written_at_unix_ms: unix_ms_floor(wall),
        scope: scope.to_string(),
        answers: answers
            .iter()
            .map(|a| SavedAnswer {
                token: a.token.hex(),
                user: a.user.hex(),
                left_ms: u64::try_from(a.left.as_millis()).unwrap_or(u64::MAX),
            })
            .collect(),
    };
    let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
    write_atomically(path, &bytes)?;
    Ok(file.answers.len())
}

/// Reads the answers about `scope` that still hold, each with the time it has left now. A
/// missing, unreadable or corrupt file, or one about another scope, gives none.
pub fn read_answers(path: &Path, scope: &str) -> Result<Vec<KeptAnswer>, StateError> {
    read_answers_at(path, scope, SystemTime::now())
}

/// [`read_answers`] at a given wall time (tests).
pub(crate) fn read_answers_at(
    path: &Path,
    scope: &str,
    wall: SystemTime,
) -> Result<Vec<KeptAnswer>, StateError> {
    let file: AnswersV1 = read_versioned(path)?;
    if file.scope != scope {
        return Ok(Vec::new());
    }
    // A clock that went back counts as no time passed: answers are about who owns a token,
    // which does not change; `ttl` still bounds them when they are taken back.
    let elapsed = unix_ms_ceil(wall).saturating_sub(file.written_at_unix_ms);
    Ok(file
        .answers
        .iter()
        .filter_map(|a| {
            let left = a.left_ms.checked_sub(elapsed).filter(|&ms| ms > 0)?;
            Some(KeptAnswer {
                token: UserKey::from_hex(&a.token)?,
                user: UserKey::from_hex(&a.user)?,
                left: Duration::from_millis(left),
            })
        })
        .collect())
}

/// A file of this build's version, parsed.
fn read_versioned<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StateError::Missing),
        Err(e) => return Err(StateError::Io(e)),
    };
    let version: VersionOnly =
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt(e.to_string()))?;
    if version.version != VERSION {
        return Err(StateError::Corrupt(format!(
            "version {} (this build reads version {VERSION})",
            version.version
        )));
    }
    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt(e.to_string()))
}

fn check_plausible(file: &FileV1) -> Result<(), StateError> {
    let too_far = file.floor_ms_ago.is_some_and(|a| a < -MAX_PLAUSIBLE_MS)
        || file.keys.iter().any(|k| {
            k.sends_ms_ago.iter().any(|&a| a < -MAX_PLAUSIBLE_MS)
                || k.tat_ms_from_now.is_some_and(|t| t > MAX_PLAUSIBLE_MS)
                || k.locked_for_ms > MAX_PLAUSIBLE_MS as u64
        });
    if too_far {
        return Err(StateError::Corrupt(format!(
            "a time more than {} days ahead",
            MAX_PLAUSIBLE_MS / 86_400_000
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "state_file has no file name")
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // The rename itself survives a crash once the directory is synced (best effort).
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn ceil_ms(ns: i128) -> i128 {
    -(-ns).div_euclid(NS_PER_MS)
}

fn clamp_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// A time on the store's clock; before its origin becomes the origin (later: the safe side).
fn to_nanos(t: i128) -> Nanos {
    Nanos::try_from(t.max(0)).unwrap_or(Nanos::MAX)
}

fn unix_ms_floor(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms_ceil(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    if since.subsec_nanos() % 1_000_000 == 0 {
        ms
    } else {
        ms.saturating_add(1)
    }
}

// ---- Running: read at start, written periodically and on graceful shutdown ----

struct Inner {
    path: PathBuf,
    store: Arc<Store>,
    names: Arc<RouteNames>,
    /// One write at a time, each snapshotting inside the lock: an older snapshot can never be
    /// renamed over a newer one.
    writing: Mutex<()>,
    /// How users are keyed and the identity answers, under the config current at a write
    /// ([`StateKeeper::follow`]); until then, the start config's scheme and no answers.
    current: OnceLock<CurrentSource>,
    start_scheme: String,
    /// The scope and [`Answers::found`] last written: unchanged, the file still holds.
    answers_written: Mutex<Option<(String, (usize, u64))>>,
}

/// Gives how users are keyed and the identity answers under the config current at a write.
type CurrentSource = Box<dyn Fn() -> (String, Option<Answers>) + Send + Sync>;

impl Inner {
    fn write_blocking(&self) -> io::Result<usize> {
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let (scheme, answers) = match self.current.get() {
            Some(current) => current(),
            None => (self.start_scheme.clone(), None),
        };
        if let Some(answers) = answers {
            self.write_answers(&answers);
        }
        match self.store.as_ref() {
            Store::Memory(memory) => {
                write(&self.path, memory, |id| self.names.name(id), Some(&scheme))
            }
            Store::Redis(_) => Ok(0),
        }
    }

    /// Writes the identity answers if any were found since the last write (the file's times are
    /// relative to its writing, so an unchanged file still holds). A failure is logged here: the
    /// limiter state is written either way.
    fn write_answers(&self, answers: &Answers) {
        let now = (answers.scope(), answers.found());
        let mut written = self
            .answers_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if written.as_ref() == Some(&now) {
            return;
        }
        let path = answers_path(&self.path);
        match write_answers(&path, &now.0, &answers.kept()) {
            Ok(_) => *written = Some(now),
            Err(e) => tracing::warn!(file = %path.display(), error = %e,
                "cannot write the identity answers file"),
        }
    }
}

/// The state file of a running proxy: read at start, then rewritten every
/// [`STATE_FILE_INTERVAL`] and once more by [`StateKeeper::finish`].
pub struct StateKeeper {
    inner: Arc<Inner>,
    writer: JoinHandle<()>,
}

/// At start: loads `config.state_file` into the memory store (logging what was loaded, or why
/// nothing was) and starts the periodic writer. `None` without a state file or with Redis.
pub fn resume(config: &Config, store: &Arc<Store>, names: &Arc<RouteNames>) -> Option<StateKeeper> {
    let path = config.state_file.clone()?;
    let memory = match (store.as_ref(), &config.store) {
        (Store::Memory(memory), StoreConfig::Memory) => memory,
        _ => {
            tracing::warn!(file = %path.display(), "state_file is only used with the memory store; ignored");
            return None;
        }
    };
    let mut known: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    if matches!(config.identity, IdentityConfig::Resolve(_)) {
        known.push(crate::resolve::IDENTITY_ROUTE_NAME);
    }
    let identity_window =
        Duration::from_nanos(crate::resolve::identity_policy(config.safety_margin).window);
    let max_window = config
        .routes
        .iter()
        .map(|r| r.per + config.safety_margin)
        .fold(identity_window, Duration::max);
    let route_id = |name: &str| known.contains(&name).then(|| names.id(name));
    let scheme = crate::identity::scheme_id(&config.identity);
    match read(&path, memory, route_id, max_window) {
        Ok(loaded) => {
            // A file without `identity` comes from a version that did not record it: taken as
            // unchanged (README: do not change the identity in the deploy that upgrades).
            if loaded
                .identity
                .as_ref()
                .is_some_and(|saved| *saved != scheme)
            {
                // The saved sends are under keys users no longer map to: as on a reload that
                // changes the identity, every key is held until a window after the last slot the
                // previous process may still send at (it may be draining beside this one).
                memory.hold_every_key(crate::app::longest_queue_wait(config));
                tracing::warn!(file = %path.display(),
                    "identity changed across the restart: users' calls count under new keys; \
                     every key is held for a window, as if its quota had just been used");
            }
            if loaded.clock_went_back {
                tracing::warn!(file = %path.display(),
                    "the wall clock is behind the state file's write time; loading it as if just written");
            }
            tracing::info!(file = %path.display(), keys = loaded.keys, locked = loaded.locked,
                age_ms = loaded.age.as_millis() as u64, unknown_routes = loaded.unknown_routes,
                invalid = loaded.invalid, expired = loaded.expired, "limiter state loaded");
        }
        Err(StateError::Missing) => {
            tracing::info!(file = %path.display(), "no state file yet; starting with empty limiter state");
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e,
                "state file ignored; starting with empty limiter state");
        }
    }
    let inner = Arc::new(Inner {
        path,
        store: store.clone(),
        names: names.clone(),
        writing: Mutex::new(()),
        current: OnceLock::new(),
        start_scheme: scheme,
        answers_written: Mutex::new(None),
    });
    let writer = tokio::spawn(write_every(inner.clone(), STATE_FILE_INTERVAL));
    Some(StateKeeper { inner, writer })
}

async fn write_every(inner: Arc<Inner>, period: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        write_logged(&inner, false).await;
    }
}

async fn write_logged(inner: &Arc<Inner>, last: bool) {
    let job = inner.clone();
    let result = tokio::task::spawn_blocking(move || job.write_blocking()).await;
    let file = inner.path.display();
    match result {
        Ok(Ok(keys)) if last => tracing::info!(file = %file, keys, "limiter state saved"),
        Ok(Ok(keys)) => tracing::debug!(file = %file, keys, "limiter state saved"),
        Ok(Err(e)) => tracing::warn!(file = %file, error = %e, "cannot write the state file"),
        Err(e) => tracing::warn!(file = %file, error = %e, "state file writer failed"),
    }
}

/// At start, in resolve mode with a state file: the identity answers kept beside it (each for
/// what it has left), or a fresh set if there are none. `None` in other modes or without one.
pub async fn restore_answers(config: &Config) -> Option<Answers> {
    let (IdentityConfig::Resolve(resolve), Some(state_file), StoreConfig::Memory) =
        (&config.identity, &config.state_file, &config.store)
    else {
        return None;
    };
    let answers = Answers::new(resolve);
    let path = answers_path(state_file);
    match read_answers(&path, &answers.scope()) {
        Ok(kept) => {
            tracing::info!(file = %path.display(), answers = kept.len(), "identity answers loaded");
            answers.restore(kept).await;
        }
        Err(StateError::Missing) => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e,
                "identity answers file ignored; live tokens are asked about again");
        }
    }
    Some(answers)
}

impl StateKeeper {
    /// From now on, each write records how users are keyed and keeps the identity answers
    /// (resolve mode), as `current` gives them for the config current then.
    pub fn follow(&self, current: impl Fn() -> (String, Option<Answers>) + Send + Sync + 'static) {
        let _ = self.inner.current.set(Box::new(current));
    }

    /// Writes the state file now (besides the periodic writes).
    pub async fn save(&self) {
        write_logged(&self.inner, false).await;
    }

    /// On graceful shutdown, once the servers have stopped: stops the periodic writer and writes
    /// the final state.
    pub async fn finish(self) {
        self.writer.abort();
        write_logged(&self.inner, true).await;
    }
}

impl Drop for StateKeeper {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::config::Algorithm;
    use crate::limit::{Acquire, ManualClock, Policy, RefusalReason};

    const SEC: Nanos = 1_000_000_000;
    const MS: Nanos = 1_000_000;

    fn wall(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn policy(limit: u32, algorithm: Algorithm) -> Policy {
        Policy::new(
            NonZeroU32::new(limit).expect("non-zero"),
            Duration::from_secs(10),
            Duration::from_secs(60),
            algorithm,
        )
    }

    fn key(route: u32, n: u8) -> Key {
        Key {
            route: RouteId(route),
            user: UserKey([n; 16]),
        }
    }

    fn store_at(now: Nanos) -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::new());
        clock.set(now);
        (clock.clone(), MemoryStore::new(clock, 100))
    }

    fn names(id: RouteId) -> Option<String> {
        ["chats", "channels"]
            .get(id.0 as usize)
            .map(|s| s.to_string())
    }

    fn ids(name: &str) -> Option<RouteId> {
        match name {
            "chats" => Some(RouteId(0)),
            "channels" => Some(RouteId(1)),
            _ => None,
        }
    }

    fn sends_of(store: &MemoryStore, k: Key) -> Vec<Nanos> {
        store
            .snapshot()
            .into_iter()
            .find(|s| s.key == k)
            .map(|s| s.sends)
            .unwrap_or_default()
    }

    #[test]
    fn round_trip_keeps_sends_gcra_and_locks_with_elapsed_time_subtracted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let window = policy(3, Algorithm::Window);
        let gcra = policy(
            4,
            Algorithm::Gcra {
                burst: NonZeroU32::new(2).expect("2"),
            },
        );
        let (clock, old) = store_at(100 * SEC);
        for _ in 0..3 {
            assert!(matches!(
                old.acquire_now(&window, key(0, 1), None),
                Acquire::Now { .. }
            ));
        }
        old.acquire_now(&gcra, key(1, 2), None);
        old.lock_now(key(0, 3), 100 * SEC + 30 * SEC);
        clock.set(102 * SEC);
        let written = write_at(&path, &old, names, None, wall(1_000_000)).expect("written");
        assert_eq!(written, 3);

        // A new process: its clock started recently; 500 ms of wall time went by.
        let (_clock, new) = store_at(50 * SEC);
        let loaded =
            read_at(&path, &new, ids, Duration::from_secs(10), wall(1_000_500)).expect("loaded");
        assert_eq!((loaded.keys, loaded.locked), (3, 1));
        assert_eq!(loaded.age, Duration::from_millis(500));
        // Sent 2.5 s ago in all: at 47.5 s on the new clock.
        assert_eq!(sends_of(&new, key(0, 1)), vec![47_500 * MS; 3]);
        let refused = new.acquire_now(&window, key(0, 1), None);
        assert!(
            matches!(refused, Acquire::Refused(r) if r.retry_at == 57_500 * MS),
            "{refused:?}"
        );
        let locked = new.acquire_now(&window, key(0, 3), None);
        assert!(
            matches!(locked, Acquire::Refused(r) if r.reason == RefusalReason::Locked
                && r.retry_at == 50 * SEC + 27_500 * MS),
            "{locked:?}"
        );
        // GCRA: period 10 s / 3 = 3.334 s; TAT was 103.334 s at write (1.334 s ahead), now 0.834 s.
        let tat = new
            .snapshot()
            .into_iter()
            .find(|s| s.key == key(1, 2))
            .and_then(|s| s.tat)
            .expect("tat");
        assert_eq!(tat, 50 * SEC + 834 * MS);
    }

    #[test]
    fn times_round_to_the_safe_side() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let window = policy(1, Algorithm::Window);
        let (clock, old) = store_at(10 * SEC);
        old.acquire_now(&window, key(0, 1), None);
        old.lock_now(key(0, 2), 10 * SEC + 1_500 * MS + 1);
        // 1.9999 ms after the send.
        clock.set(10 * SEC + 1_999_900);
        write_at(
            &path,
            &old,
            names,
            None,
            wall(5_000) + Duration::from_micros(300),
        )
        .expect("written");
        let text = fs::read_to_string(&path).expect("read");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            json["written_at_unix_ms"], 5_001,
            "write moment rounded later"
        );
        let keys = json["keys"].as_array().expect("keys");
        let k1 = keys
            .iter()
            .find(|k| k["user"] == UserKey([1; 16]).hex())
            .expect("k1");
        assert_eq!(k1["sends_ms_ago"][0], 1, "ages rounded down");
        let k2 = keys
            .iter()
            .find(|k| k["user"] == UserKey([2; 16]).hex())
            .expect("k2");
        assert_eq!(k2["locked_for_ms"], 1_499, "locks rounded up");
    }

    #[test]
    fn sends_before_the_new_clock_origin_are_put_at_the_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let window = policy(2, Algorithm::Window);
        let (clock, old) = store_at(100 * SEC);
        old.acquire_now(&window, key(0, 1), None);
        clock.set(103 * SEC);
        old.acquire_now(&window, key(0, 1), None);
        write_at(&path, &old, names, None, wall(1_000_000)).expect("written");
        let (_clock, new) = store_at(SEC);
        read_at(&path, &new, ids, Duration::from_secs(10), wall(1_000_000)).expect("loaded");
        assert_eq!(sends_of(&new, key(0, 1)), vec![0, SEC]);
        assert!(matches!(
            new.acquire_now(&window, key(0, 1), None),
            Acquire::Refused(r) if r.retry_at == 10 * SEC
        ));
    }

    #[test]
    fn stale_file_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let window = policy(1, Algorithm::Window);
        let (_clock, old) = store_at(100 * SEC);
        old.acquire_now(&window, key(0, 1), None);
        old.lock_now(key(0, 2), 100 * SEC + 20 * SEC);
        write_at(&path, &old, names, None, wall(1_000_000)).expect("written");
        let (_clock, new) = store_at(SEC);
        // Within the lock: loaded (the send has left its window, the lock has not ended).
        let loaded =
            read_at(&path, &new, ids, Duration::from_secs(10), wall(1_015_000)).expect("loaded");
        assert_eq!((loaded.keys, loaded.expired), (1, 1));
        // After window and lock.
        let (_clock, new) = store_at(SEC);
        let stale = read_at(&path, &new, ids, Duration::from_secs(10), wall(1_020_000));
        assert!(matches!(stale, Err(StateError::Stale { .. })), "{stale:?}");
        assert_eq!(new.keys(), 0);
    }

    #[test]
    fn corrupt_files_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let cases: [&[u8]; 7] = [
            b"",
            b"{not json",
            br#"{"version": 1, "written_at_unix_ms": 1000, "floor_ms_ago": -99999999999, "keys": []}"#,
            b"\xff\xfe\x00garbage",
            br#"{"version": 2, "written_at_unix_ms": 1, "keys": []}"#,
            br#"{"version": 1, "written_at_unix_ms": 1, "keys": [{"route": 5}]}"#,
            br#"{"version": 1, "written_at_unix_ms": 1000, "keys": [{"route": "chats",
                "user": "01010101010101010101010101010101", "locked_for_ms": 99999999999999}]}"#,
        ];
        for bytes in cases {
            fs::write(&path, bytes).expect("write");
            let (_clock, store) = store_at(SEC);
            let result = read_at(&path, &store, ids, Duration::from_secs(10), wall(1_000));
            assert!(
                matches!(result, Err(StateError::Corrupt(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(bytes)
            );
            assert_eq!(store.keys(), 0);
        }
        let (_clock, store) = store_at(SEC);
        let missing = read_at(
            &dir.path().join("nope.json"),
            &store,
            ids,
            Duration::from_secs(10),
            wall(1_000),
        );
        assert!(matches!(missing, Err(StateError::Missing)), "{missing:?}");
    }

    #[test]
    fn unknown_routes_and_bad_users_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let text = r#"{"version": 1, "written_at_unix_ms": 1000, "keys": [
            {"route": "chats", "user": "01010101010101010101010101010101", "sends_ms_ago": [5]},
            {"route": "removed.route", "user": "02020202020202020202020202020202", "sends_ms_ago": [5]},
            {"route": "chats", "user": "nothex", "sends_ms_ago": [5]}
        ]}"#;
        fs::write(&path, text).expect("write");
        let (_clock, store) = store_at(SEC);
        let loaded =
            read_at(&path, &store, ids, Duration::from_secs(10), wall(1_000)).expect("loaded");
        assert_eq!(
            (loaded.keys, loaded.unknown_routes, loaded.invalid),
            (1, 1, 1)
        );
        assert_eq!(sends_of(&store, key(0, 1)), vec![SEC - 5 * MS]);
    }

    #[test]
    fn a_clock_that_went_back_loads_as_if_just_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let window = policy(1, Algorithm::Window);
        let (_clock, old) = store_at(100 * SEC);
        old.acquire_now(&window, key(0, 1), None);
        write_at(&path, &old, names, None, wall(1_000_000)).expect("written");
        let (_clock, new) = store_at(20 * SEC);
        let loaded =
            read_at(&path, &new, ids, Duration::from_secs(10), wall(990_000)).expect("loaded");
        assert!(loaded.clock_went_back);
        assert_eq!(sends_of(&new, key(0, 1)), vec![20 * SEC]);
    }

    #[test]
    fn reservations_are_saved_as_sends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let window = policy(1, Algorithm::Window);
        let queue = Some(crate::limit::QueueRule {
            max_wait: 60 * SEC,
            max_per_user: 10,
        });
        let (_clock, old) = store_at(100 * SEC);
        old.acquire_now(&window, key(0, 1), queue);
        let reserved = old.acquire_now(&window, key(0, 1), queue);
        assert!(
            matches!(reserved, Acquire::Reserved { reservation, .. } if reservation.slot == 110 * SEC)
        );
        write_at(&path, &old, names, None, wall(1_000_000)).expect("written");
        let (_clock, new) = store_at(50 * SEC);
        read_at(&path, &new, ids, Duration::from_secs(10), wall(1_000_000)).expect("loaded");
        assert_eq!(sends_of(&new, key(0, 1)), vec![50 * SEC, 60 * SEC]);
        let next = new.acquire_now(&window, key(0, 1), None);
        assert!(
            matches!(next, Acquire::Refused(r) if r.retry_at == 70 * SEC),
            "{next:?}"
        );
    }

    fn answer(n: u8, left_ms: u64) -> KeptAnswer {
        KeptAnswer {
            token: UserKey([n; 16]),
            user: UserKey([n + 100; 16]),
            left: Duration::from_millis(left_ms),
        }
    }

    #[test]
    fn identity_answers_round_trip_with_the_elapsed_time_taken_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = answers_path(&dir.path().join("state.json"));
        assert_eq!(path, dir.path().join("state.identity.json"));
        let kept = [answer(1, 60_000), answer(2, 5_000), answer(3, 20_000)];
        let written = write_answers_at(&path, "scope-a", &kept, wall(1_000_000)).expect("write");
        assert_eq!(written, 3);
        // 10 s later: the second answer has run out, the others have 10 s less.
        let read = read_answers_at(&path, "scope-a", wall(1_010_000)).expect("read");
        assert_eq!(read, [answer(1, 50_000), answer(3, 10_000)]);
        // A clock that went back takes nothing off.
        let read = read_answers_at(&path, "scope-a", wall(900_000)).expect("read");
        assert_eq!(read, kept);
    }

    #[test]
    fn identity_answers_about_another_scope_or_unreadable_are_not_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.identity.json");
        assert!(matches!(
            read_answers_at(&path, "s", wall(0)),
            Err(StateError::Missing)
        ));
        write_answers_at(&path, "scope-a", &[answer(1, 60_000)], wall(1_000)).expect("write");
        assert_eq!(
            read_answers_at(&path, "scope-b", wall(1_000)).expect("read"),
            []
        );
        for corrupt in [
            "",
            "{",
            "[]",
            r#"{"version":2,"written_at_unix_ms":0,"scope":"s","answers":[]}"#,
        ] {
            fs::write(&path, corrupt).expect("write");
            assert!(
                matches!(
                    read_answers_at(&path, "s", wall(0)),
                    Err(StateError::Corrupt(_))
                ),
                "{corrupt:?}"
            );
        }
        // Entries that are not hashes are skipped, the rest taken.
        let text = r#"{"version":1,"written_at_unix_ms":0,"scope":"s","answers":[
            {"token":"bob-1","user":"00000000000000000000000000000000","left_ms":9000},
            {"token":"01010101010101010101010101010101","user":"65656565656565656565656565656565","left_ms":9000}]}"#;
        fs::write(&path, text).expect("write");
        assert_eq!(
            read_answers_at(&path, "s", wall(0)).expect("read"),
            [answer(1, 9_000)]
        );
    }

    /// The periodic write rewrites the answers file only when new answers were found: its times
    /// are relative to its writing, so an unchanged file still holds.
    #[tokio::test]
    async fn the_answers_file_is_rewritten_only_when_answers_were_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let (_, memory) = store_at(SEC);
        let config = crate::config::ResolveConfig {
            url: http::Uri::from_static("https://cliq.zoho.com/api/v2/me"),
            user_field: "/data/zuid".into(),
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
            cache_size: 100,
            on_unreachable: crate::config::OnIdentityError::Reject,
            lookup_reserve: None,
        };
        let answers = Answers::new(&config);
        let inner = Inner {
            path: path.clone(),
            store: Arc::new(Store::Memory(memory)),
            names: RouteNames::new(Vec::new()),
            writing: Mutex::new(()),
            current: OnceLock::new(),
            start_scheme: "scheme".into(),
            answers_written: Mutex::new(None),
        };
        let source = answers.clone();
        let _ = inner
            .current
            .set(Box::new(move || ("scheme".into(), Some(source.clone()))));
        let kept = |n: u8| KeptAnswer {
            token: UserKey([n; 16]),
            user: UserKey([n + 100; 16]),
            left: Duration::from_secs(300),
        };
        let file = answers_path(&path);
        let read = || read_answers(&file, &answers.scope()).expect("the answers file");

        answers.restore(vec![kept(1)]).await;
        inner.write_blocking().expect("write");
        assert_eq!(read().len(), 1);
        // Nothing new: the file is left as it is (a marker shows it was not rewritten).
        fs::write(&file, "not rewritten").expect("marker");
        inner.write_blocking().expect("write");
        assert_eq!(fs::read_to_string(&file).expect("read"), "not rewritten");
        // A new answer: rewritten, with both.
        answers.restore(vec![kept(2)]).await;
        inner.write_blocking().expect("write");
        let mut tokens: Vec<u8> = read().iter().map(|a| a.token.0[0]).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, [1, 2]);
    }

    #[test]
    fn a_hold_and_the_identity_are_kept_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let (_, old) = store_at(100 * SEC);
        old.raise_floor(99 * SEC);
        write_at(&path, &old, names, Some("scheme-a"), wall(1_000_000)).expect("written");
        // 500 ms later, on a new clock.
        let (_, new) = store_at(50 * SEC);
        let loaded =
            read_at(&path, &new, ids, Duration::from_secs(10), wall(1_000_500)).expect("loaded");
        assert_eq!(loaded.identity.as_deref(), Some("scheme-a"));
        assert!(loaded.held);
        // 1 s before the write, plus 500 ms: 1.5 s before now (never earlier).
        assert_eq!(new.floor(), Some(50 * SEC - 1_500 * MS));
        // A hold a window old is over: not restored.
        let (_, later) = store_at(50 * SEC);
        let loaded =
            read_at(&path, &later, ids, Duration::from_secs(10), wall(1_009_000)).expect("loaded");
        assert!(!loaded.held);
        assert_eq!(later.floor(), None);
    }

    #[test]
    fn write_replaces_the_file_atomically_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let (_clock, store) = store_at(SEC);
        fs::write(&path, "old").expect("write");
        write_at(&path, &store, names, None, wall(1_000)).expect("written");
        let entries: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("state.json")]);
        let json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(json["version"], 1);
        assert_eq!(json["keys"], serde_json::json!([]));
    }
}
