//! Session stores: the trait every backend implements, and the write batch
//! the session core hands them.
//!
//! The contract (SPEC section 6):
//! - a read is one round trip for every channel the request needs;
//! - a write is one atomic round trip carrying only the touched fields:
//!   sets, deletes and increments per channel, plus a Destroy of the old
//!   session or a Regenerate move, plus the TTL;
//! - a write is all or nothing: an Incr on a non-integer, or a write past the
//!   session limits, rejects the whole batch ([`StoreError::Rejected`]).

pub mod embedded;
pub mod memory;
pub mod redis;
pub mod sql;

use crate::model::{ChannelSet, DirectiveErrorKind, SessionId, CHANNELS};
use std::collections::BTreeMap;
use std::future::Future;

/// Identifies a session's data: the id, and the hash tag that keeps every key
/// of the session (across Regenerate) in one Redis Cluster slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreKey {
    pub id: SessionId,
    pub tag: u32,
}

impl From<crate::model::Meta> for StoreKey {
    fn from(m: crate::model::Meta) -> StoreKey {
        StoreKey {
            id: m.id,
            tag: m.tag,
        }
    }
}

/// Server-side values per channel; `None` for channels not read.
pub type Loaded = [Option<BTreeMap<String, String>>; 4];

/// How long past its session's expiry an ended id is remembered: a margin
/// for the clocks of the gateways and the store, so a mark never expires
/// before every copy of the cookie has.
pub const ENDED_MARGIN_MS: u64 = 60_000;

/// Until when to remember an id ended whose session expires at `expires`.
pub fn ended_until(expires: u64) -> u64 {
    expires.saturating_add(ENDED_MARGIN_MS)
}

/// A user's name as the stores key it (`session.user_key`): a SHA-256
/// prefix, so a name of any length or bytes is a fixed, safe key part.
pub fn user_hash(name: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(name.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One session in its user's index (`session.user_key`): never values.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserSession {
    /// 32 hex digits.
    pub id: String,
    pub tag: u32,
    /// ms since the epoch.
    pub created: u64,
    /// When a write last touched the session (login, regenerate, touch).
    pub seen: u64,
    /// Absolute expiry.
    pub expires: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

impl UserSession {
    pub fn key(&self) -> Option<StoreKey> {
        Some(StoreKey {
            id: SessionId::from_hex(&self.id)?,
            tag: self.tag,
        })
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }

    pub fn decode(s: &str) -> Option<UserSession> {
        serde_json::from_str(s).ok()
    }
}

/// A batch's change to a user's index ([`user_hash`]ed name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserWrite {
    /// Add (or refresh) the session, dropping `replaces` (a Regenerate's
    /// old id); with `max`, the oldest sessions beyond it leave the index
    /// and are returned as [`Written::evicted`] for the gateway to end.
    Join {
        user: String,
        entry: UserSession,
        replaces: Option<SessionId>,
        max: Option<usize>,
    },
    /// The session no longer belongs to this user (Destroy, another user).
    Leave { user: String, id: SessionId },
}

/// What a successful write reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Sessions `session.max_per_user` pushed out of their user's index.
    pub evicted: Vec<UserSession>,
}

/// What `GET /sessions/{id}` shows: metadata and key names, never values.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Inspected {
    pub id: String,
    pub tag: u32,
    /// The store data's expiry (ms), if it holds any.
    pub data_expires: Option<u64>,
    /// Key names per channel (`p`, `t`, `sp`, `st`) with server-side data.
    pub keys: BTreeMap<&'static str, Vec<String>>,
    /// Remembered as ended (`session.revocation`).
    pub ended: bool,
}

/// A join to one user's index (id -> entry), the reference semantics
/// every backend follows: drop `replaces`, upsert, prune expired entries,
/// then with `max` pick the oldest (by creation, then id) other entries
/// beyond it. They stay in the index until the gateway has ended them
/// (`end` with the user drops them): a failure in between must not leave
/// live sessions that no "log out everywhere" can find.
pub fn join_index(
    index: &mut BTreeMap<String, UserSession>,
    entry: &UserSession,
    replaces: Option<&SessionId>,
    max: Option<usize>,
    now: u64,
    ended: &dyn Fn(&UserSession) -> bool,
) -> Vec<UserSession> {
    if let Some(r) = replaces {
        index.remove(&r.hex());
    }
    index.insert(entry.id.clone(), entry.clone());
    // Expired and ended sessions leave (and do not count toward `max`).
    index.retain(|_, e| e.id == entry.id || (e.expires > now && !ended(e)));
    let mut evicted = Vec::new();
    if let Some(max) = max {
        let mut others: Vec<&UserSession> = index.values().filter(|e| e.id != entry.id).collect();
        others.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        let over = index.len().saturating_sub(max);
        evicted.extend(others.into_iter().take(over).cloned());
    }
    evicted
}

/// What a read asks besides the data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Has the id ended? (`session.revocation`)
    pub ended: bool,
    /// Was it regenerated within the grace? (`session.regenerate_grace`)
    pub moved: bool,
}

/// What one read round trip returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub channels: Loaded,
    /// The id is remembered as ended (`session.revocation`; only asked when
    /// the read says so, `false` otherwise).
    pub ended: bool,
    /// The id was regenerated within `session.regenerate_grace`: the new
    /// session's cookies, as a `Cookie` header value (only asked when the
    /// read says so).
    pub moved: Option<String>,
}

/// Field operations on one channel's data, applied in this order: clear,
/// delete, set, incr.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelWrite {
    /// Drop whatever the channel held before (a new channel cookie for an
    /// existing session must not resurrect stale transient data).
    pub clear: bool,
    pub delete: Vec<String>,
    pub set: Vec<(String, String)>,
    pub incr: Vec<(String, i64)>,
}

impl ChannelWrite {
    pub fn is_empty(&self) -> bool {
        !self.clear && self.delete.is_empty() && self.set.is_empty() && self.incr.is_empty()
    }

    /// Does this write add data (and so need the session limits checked)?
    pub fn adds(&self) -> bool {
        !self.set.is_empty() || !self.incr.is_empty()
    }
}

/// Session limits the store checks atomically against its own data plus the
/// clientside data the gateway reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitCheck {
    pub max_keys: usize,
    pub max_bytes: usize,
    pub client_keys: usize,
    pub client_bytes: usize,
}

/// One response's store write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteBatch {
    /// The session written (after Regenerate: the new id).
    pub key: StoreKey,
    /// Delete every channel of this session first (Destroy).
    pub destroy: Option<StoreKey>,
    /// Move every channel from this id (same tag) to `key.id` (Regenerate).
    pub rename_from: Option<SessionId>,
    pub channels: [ChannelWrite; 4],
    /// When the session's data must expire (ms since the epoch): applied to
    /// every channel of `key` that holds data. Never past the lifetime.
    pub expire_at: u64,
    /// Check the session limits after applying.
    pub limits: Option<LimitCheck>,
    /// `session.revocation`: ids (of `key.tag`) to remember as ended, each
    /// until its session's absolute expiry (ms): a Destroy's or
    /// Regenerate's old id, or an idle-expired one.
    pub end: Vec<(SessionId, u64)>,
    /// `session.revocation`: refuse the batch ([`Refusal::Ended`]) when the
    /// session it continues ([`WriteBatch::source`]) has ended meanwhile, so
    /// a request that raced a logout cannot bring the session back.
    pub check_ended: bool,
    /// `session.regenerate_grace`: refuse the batch ([`Refusal::Moved`])
    /// when the session it continues was regenerated within the grace, so
    /// the gateway can apply the response to the new session instead.
    pub check_moved: bool,
    /// Regenerate with a grace: the new session's cookies (a `Cookie`
    /// header value) to hand to requests still carrying the old id, and
    /// until when (ms).
    pub forward: Option<(String, u64)>,
    /// `session.user_key`: the users' indexes this response changes.
    pub users: Vec<UserWrite>,
}

impl WriteBatch {
    pub fn new(key: StoreKey, expire_at: u64) -> WriteBatch {
        WriteBatch {
            key,
            destroy: None,
            rename_from: None,
            channels: Default::default(),
            expire_at,
            limits: None,
            end: Vec::new(),
            check_ended: false,
            check_moved: false,
            forward: None,
            users: Vec::new(),
        }
    }

    /// The id whose data this batch continues: the Regenerate source, else
    /// `key` (a new session's random id is never ended).
    pub fn source(&self) -> SessionId {
        self.rename_from.unwrap_or(self.key.id)
    }

    /// The id whose regenerate forward [`WriteBatch::check_moved`] asks
    /// about: the session the request carried (a Destroy + Set writes a new
    /// id, but a logout racing a login must follow the login).
    pub fn carried(&self) -> SessionId {
        self.rename_from
            .or(self.destroy.map(|d| d.id))
            .unwrap_or(self.key.id)
    }

    /// Does the batch only destroy (nothing written under `key`)?
    pub fn destroy_only(&self) -> bool {
        self.destroy == Some(self.key) && self.channels.iter().all(|c| c.is_empty())
    }
}

/// Why a store refused a batch as a whole (nothing of it was written). The
/// session core turns it into the directive error the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotInteger {
        key: String,
    },
    Overflow {
        key: String,
    },
    TooManyKeys {
        keys: usize,
        max: usize,
    },
    SessionTooLarge {
        bytes: usize,
        max: usize,
    },
    /// [`WriteBatch::check_ended`]: the session ended meanwhile.
    Ended,
    /// [`WriteBatch::check_moved`]: the session was regenerated meanwhile;
    /// the new session's cookies.
    Moved(String),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NotInteger { .. } => "not_integer",
            Refusal::Overflow { .. } => "overflow",
            Refusal::TooManyKeys { .. } => "too_many_keys",
            Refusal::SessionTooLarge { .. } => "session_too_large",
            Refusal::Ended => "session_ended",
            Refusal::Moved(_) => "session_moved",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the store refused the write ({})", self.label())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The batch was refused as a whole (Incr on a non-integer, limits).
    #[error("{0}")]
    Rejected(Refusal),
    /// The store did not answer in time.
    #[error("store timed out")]
    Timeout,
    /// The store failed (connection refused, I/O error ...).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A write was sent and no answer came in time (or the connection
    /// dropped after it was sent): it may or may not have been applied. The
    /// Redis write is one atomic script, so it is all of the batch or none.
    #[error("store write outcome unknown: {0}")]
    Unknown(String),
    /// The store cannot answer this question the way it was asked (an
    /// operator's mistake, not an outage).
    #[error("{0}")]
    Unsupported(String),
}

impl StoreError {
    /// Metric label for `gimlet_store_operations_total{result}`.
    pub fn result_label(&self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Unknown(_) => "unknown",
            _ => "error",
        }
    }
}

/// What every backend implements. Methods are `async` (via `impl Future`) so
/// the proxy awaits them without boxing.
pub trait SessionStore: Send + Sync {
    /// Read the channels in `mask` ([`crate::model::Channel::bit`]) in one
    /// round trip, with [`Check::ended`] whether the id has ended, and with
    /// [`Check::moved`] whether it was regenerated within the grace.
    fn load(
        &self,
        key: &StoreKey,
        mask: ChannelSet,
        check: Check,
    ) -> impl Future<Output = Result<Read, StoreError>> + Send;
    /// Apply a batch atomically in one round trip (Redis Cluster: a second
    /// one for a user's index, which lives in another slot).
    fn write(&self, batch: &WriteBatch)
        -> impl Future<Output = Result<Written, StoreError>> + Send;
    /// The live sessions in a user's index ([`user_hash`]), ended ones left
    /// out.
    fn user_sessions(
        &self,
        user: &str,
    ) -> impl Future<Output = Result<Vec<UserSession>, StoreError>> + Send;
    /// End sessions: delete their data and, each until its expiry (ms),
    /// remember their ids as ended; drop them from `user`'s index.
    fn end(
        &self,
        sessions: &[(StoreKey, u64)],
        user: Option<&str>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A session's metadata and key names (`tag`: where Redis keeps it;
    /// without it, Redis looks the id up with `SCAN`).
    fn inspect(
        &self,
        id: &SessionId,
        tag: Option<u32>,
    ) -> impl Future<Output = Result<Option<Inspected>, StoreError>> + Send;
    /// Is the store reachable? (`/readyz`, `gimlet check --connect`)
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The configured store.
pub enum Store {
    Memory(memory::MemoryStore),
    Embedded(embedded::EmbeddedStore),
    Redis(Box<redis::RedisStore>),
    Sql(Box<sql::SqlStore>),
}

impl Store {
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Embedded(_) => "embedded",
            Store::Redis(_) => "redis",
            Store::Sql(_) => "sql",
        }
    }

    // The SQL arms are boxed: sqlx's futures are tens of KB, and a match
    // over variants makes one future as large as its largest arm, moved on
    // every read and write of every store kind (callgrind: +190k
    // instructions of memcpy per embedded or Redis read).
    pub async fn load(
        &self,
        key: &StoreKey,
        mask: ChannelSet,
        check: Check,
    ) -> Result<Read, StoreError> {
        match self {
            Store::Memory(s) => s.load(key, mask, check).await,
            Store::Embedded(s) => s.load(key, mask, check).await,
            Store::Redis(s) => s.load(key, mask, check).await,
            Store::Sql(s) => Box::pin(s.load(key, mask, check)).await,
        }
    }

    pub async fn write(&self, batch: &WriteBatch) -> Result<Written, StoreError> {
        match self {
            Store::Memory(s) => s.write(batch).await,
            Store::Embedded(s) => s.write(batch).await,
            Store::Redis(s) => s.write(batch).await,
            Store::Sql(s) => Box::pin(s.write(batch)).await,
        }
    }

    /// A response's write within `timeout`, never answering less than what
    /// happened: the embedded writer withdraws a batch whose deadline passed
    /// before it was applied (and one it applied is committed and
    /// acknowledged, however long the commit takes); a Redis write without
    /// an answer in time is [`StoreError::Unknown`].
    pub async fn write_within(
        &self,
        batch: &WriteBatch,
        timeout: std::time::Duration,
    ) -> Result<Written, StoreError> {
        match self {
            Store::Memory(s) => s.write(batch).await,
            Store::Embedded(s) => {
                let deadline = std::time::Instant::now() + timeout;
                // Only a stuck writer (a hung disk) gets here.
                let stuck = timeout
                    .saturating_mul(20)
                    .max(std::time::Duration::from_secs(5));
                match tokio::time::timeout(stuck, s.write_by(batch, deadline)).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Unknown(
                        "the store writer did not answer".into(),
                    )),
                }
            }
            Store::Redis(s) => match tokio::time::timeout(timeout, s.write(batch)).await {
                Ok(Err(StoreError::Timeout)) | Err(_) => {
                    Err(StoreError::Unknown("redis: no answer in time".into()))
                }
                Ok(r) => r,
            },
            // One statement in its own transaction: all of it or none.
            Store::Sql(s) => match tokio::time::timeout(timeout, Box::pin(s.write(batch))).await {
                Err(_) => Err(StoreError::Unknown("sql: no answer in time".into())),
                Ok(r) => r,
            },
        }
    }

    pub async fn user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        match self {
            Store::Memory(s) => s.user_sessions(user).await,
            Store::Embedded(s) => s.user_sessions(user).await,
            Store::Redis(s) => s.user_sessions(user).await,
            Store::Sql(s) => Box::pin(s.user_sessions(user)).await,
        }
    }

    pub async fn end(
        &self,
        sessions: &[(StoreKey, u64)],
        user: Option<&str>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.end(sessions, user).await,
            Store::Embedded(s) => s.end(sessions, user).await,
            Store::Redis(s) => s.end(sessions, user).await,
            Store::Sql(s) => Box::pin(s.end(sessions, user)).await,
        }
    }

    pub async fn inspect(
        &self,
        id: &SessionId,
        tag: Option<u32>,
    ) -> Result<Option<Inspected>, StoreError> {
        match self {
            Store::Memory(s) => s.inspect(id, tag).await,
            Store::Embedded(s) => s.inspect(id, tag).await,
            Store::Redis(s) => s.inspect(id, tag).await,
            Store::Sql(s) => Box::pin(s.inspect(id, tag)).await,
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(s) => s.ping().await,
            Store::Embedded(s) => s.ping().await,
            Store::Redis(s) => s.ping().await,
            Store::Sql(s) => Box::pin(s.ping()).await,
        }
    }
}

/// A session's data in a backend that keeps whole records in process (memory,
/// embedded): the reference semantics of a [`WriteBatch`], shared so both
/// backends agree exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub channels: [BTreeMap<String, String>; 4],
}

impl Record {
    pub fn is_empty(&self) -> bool {
        self.channels.iter().all(|c| c.is_empty())
    }

    /// Apply one channel's writes; errors leave `self` partly changed, so
    /// callers apply to a copy and keep it only on success.
    pub fn apply(&mut self, ch: usize, w: &ChannelWrite) -> Result<(), Refusal> {
        let map = &mut self.channels[ch];
        if w.clear {
            map.clear();
        }
        for k in &w.delete {
            map.remove(k);
        }
        for (k, v) in &w.set {
            map.insert(k.clone(), v.clone());
        }
        for (k, n) in &w.incr {
            let next =
                crate::model::incremented(map.get(k).map(String::as_str), k, *n).map_err(|e| {
                    match e.kind {
                        DirectiveErrorKind::NotInteger => Refusal::NotInteger { key: k.clone() },
                        _ => Refusal::Overflow { key: k.clone() },
                    }
                })?;
            map.insert(k.clone(), next.to_string());
        }
        Ok(())
    }

    /// Check the limits over this record plus the clientside data.
    pub fn check(&self, l: &LimitCheck) -> Result<(), Refusal> {
        let keys: usize = self.channels.iter().map(|c| c.len()).sum::<usize>() + l.client_keys;
        let bytes: usize = self
            .channels
            .iter()
            .flat_map(|c| c.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + l.client_bytes;
        if keys > l.max_keys {
            return Err(Refusal::TooManyKeys {
                keys,
                max: l.max_keys,
            });
        }
        if bytes > l.max_bytes {
            return Err(Refusal::SessionTooLarge {
                bytes,
                max: l.max_bytes,
            });
        }
        Ok(())
    }

    /// Apply a whole batch to `self` (the record of `batch.key`, after any
    /// rename/destroy has been resolved by the caller).
    pub fn apply_batch(&mut self, batch: &WriteBatch) -> Result<(), Refusal> {
        for ch in CHANNELS {
            self.apply(ch.index(), &batch.channels[ch.index()])?;
        }
        if let Some(l) = &batch.limits {
            self.check(l)?;
        }
        Ok(())
    }

    /// Key names per channel that holds any (for `GET /sessions/{id}`).
    pub fn key_names(&self) -> BTreeMap<&'static str, Vec<String>> {
        CHANNELS
            .iter()
            .filter(|ch| !self.channels[ch.index()].is_empty())
            .map(|ch| {
                (
                    ch.store_suffix(),
                    self.channels[ch.index()].keys().cloned().collect(),
                )
            })
            .collect()
    }

    /// The channels in `mask`, as loaded data.
    pub fn loaded(&self, mask: ChannelSet) -> Loaded {
        let mut out: Loaded = Default::default();
        for ch in CHANNELS {
            if mask.contains(ch) {
                out[ch.index()] = Some(self.channels[ch.index()].clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDED: Check = Check {
        ended: true,
        moved: false,
    };

    /// `session.revocation` semantics every in-process backend shares (Redis
    /// runs the same table in `tests/redis.rs`).
    async fn ended_marks(store: &Store) {
        let now = crate::model::now_ms();
        let key = |b: u8| StoreKey {
            id: SessionId([b; 16]),
            tag: 9,
        };
        let set = |k: StoreKey| {
            let mut b = WriteBatch::new(k, now + 60_000);
            b.channels[0].set = vec![("a".into(), "1".into())];
            b.check_ended = true;
            b
        };
        let ended = |k: StoreKey| async move {
            store.load(&k, ChannelSet::ALL, ENDED).await.unwrap().ended
        };
        // Destroy remembers the id; a read that does not ask says nothing.
        store.write(&set(key(1))).await.unwrap();
        assert!(!ended(key(1)).await);
        let mut d = WriteBatch::new(key(1), 0);
        d.destroy = Some(key(1));
        d.end = vec![(key(1).id, now + 60_000)];
        store.write(&d).await.unwrap();
        assert!(ended(key(1)).await);
        assert!(
            !store
                .load(&key(1), ChannelSet::ALL, Check::default())
                .await
                .unwrap()
                .ended
        );
        // A write continuing an ended session is refused, and writes nothing.
        assert_eq!(
            store.write(&set(key(1))).await,
            Err(StoreError::Rejected(Refusal::Ended))
        );
        let r = store.load(&key(1), ChannelSet::ALL, ENDED).await.unwrap();
        assert!(r.channels[0].as_ref().unwrap().is_empty());
        // Regenerate: the old id ends, the new one lives with the data.
        store.write(&set(key(2))).await.unwrap();
        let mut g = set(key(3));
        g.channels[0].set.clear();
        g.rename_from = Some(key(2).id);
        g.end = vec![(key(2).id, now + 60_000)];
        store.write(&g).await.unwrap();
        assert!(ended(key(2)).await && !ended(key(3)).await);
        let r = store.load(&key(3), ChannelSet::ALL, ENDED).await.unwrap();
        assert_eq!(r.channels[0].as_ref().unwrap()["a"], "1");
        // Regenerating an ended session is refused too.
        let mut again = set(key(4));
        again.rename_from = Some(key(2).id);
        assert_eq!(
            store.write(&again).await,
            Err(StoreError::Rejected(Refusal::Ended))
        );
        // A cookie-only session (no data) ends the same way, and a mark
        // past its session's expiry is forgotten.
        assert!(!ended(key(5)).await);
        let mut d = WriteBatch::new(key(5), 0);
        d.destroy = Some(key(5));
        d.end = vec![
            (key(5).id, now + 60_000),
            (key(6).id, now.saturating_sub(1)),
        ];
        store.write(&d).await.unwrap();
        assert!(ended(key(5)).await && !ended(key(6)).await);
    }

    /// The user index every backend keeps (`session.user_key`).
    async fn user_index(store: &Store) {
        let now = crate::model::now_ms();
        let entry = |b: u8, created: u64, expires: u64| UserSession {
            id: SessionId([b; 16]).hex(),
            tag: 7,
            created,
            seen: created,
            expires,
            ip: None,
            user_agent: None,
        };
        let join = |e: UserSession, replaces: Option<SessionId>, max: Option<usize>| {
            let mut b = WriteBatch::new(e.key().unwrap(), now + 60_000);
            b.users = vec![UserWrite::Join {
                user: user_hash("alice"),
                entry: e,
                replaces,
                max,
            }];
            b
        };
        let alice = user_hash("alice");
        let listed = || async {
            let mut ids: Vec<String> = store
                .user_sessions(&alice)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.id)
                .collect();
            ids.sort();
            ids
        };
        // Joins, with an expired entry that the next join prunes.
        store
            .write(&join(entry(1, now - 5, now + 60_000), None, None))
            .await
            .unwrap();
        store
            .write(&join(entry(2, now - 4, now + 60_000), None, None))
            .await
            .unwrap();
        store
            .write(&join(entry(9, now - 9, now + 1), None, None))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(
            listed().await,
            vec![SessionId([1; 16]).hex(), SessionId([2; 16]).hex()]
        );
        // A Regenerate moves an entry; max evicts the oldest others.
        store
            .write(&join(
                entry(3, now - 5, now + 60_000),
                Some(SessionId([1; 16])),
                None,
            ))
            .await
            .unwrap();
        let w = store
            .write(&join(entry(4, now, now + 60_000), None, Some(2)))
            .await
            .unwrap();
        let evicted: Vec<String> = w.evicted.iter().map(|e| e.id.clone()).collect();
        assert_eq!(evicted, vec![SessionId([3; 16]).hex()]);
        // Listed until ended: a failure in between loses nothing.
        assert_eq!(listed().await.len(), 3);
        let keys: Vec<_> = w
            .evicted
            .iter()
            .map(|e| (e.key().unwrap(), now + 60_000))
            .collect();
        store.end(&keys, Some(&alice)).await.unwrap();
        assert_eq!(
            listed().await,
            vec![SessionId([2; 16]).hex(), SessionId([4; 16]).hex()]
        );
        // Leave; an ended session is not listed; ending through the user
        // drops it from the index.
        let mut leave = WriteBatch::new(entry(2, 0, 0).key().unwrap(), now + 60_000);
        leave.users = vec![UserWrite::Leave {
            user: alice.clone(),
            id: SessionId([2; 16]),
        }];
        store.write(&leave).await.unwrap();
        assert_eq!(listed().await, vec![SessionId([4; 16]).hex()]);
        let four = entry(4, 0, 0).key().unwrap();
        store.end(&[(four, now + 60_000)], None).await.unwrap();
        assert!(listed().await.is_empty());
        let r = store.load(&four, ChannelSet::ALL, ENDED).await.unwrap();
        assert!(r.ended);
        assert!(store
            .user_sessions(&user_hash("bob"))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn user_index_on_memory_and_embedded() {
        user_index(&Store::Memory(memory::MemoryStore::new())).await;
        let dir = tempfile::tempdir().unwrap();
        let e = embedded::EmbeddedStore::open(&dir.path().join("u.redb"), 16).unwrap();
        user_index(&Store::Embedded(e)).await;
    }

    #[tokio::test]
    async fn ended_marks_on_memory_and_embedded() {
        ended_marks(&Store::Memory(memory::MemoryStore::new())).await;
        let dir = tempfile::tempdir().unwrap();
        for cache in [0, 16] {
            let path = dir.path().join(format!("e{cache}.redb"));
            let e = embedded::EmbeddedStore::open(&path, cache).unwrap();
            ended_marks(&Store::Embedded(e)).await;
        }
    }

    #[test]
    fn record_apply_order_and_errors() {
        let mut r = Record::default();
        let w = ChannelWrite {
            clear: false,
            delete: vec!["x".into()],
            set: vec![("a".into(), "5".into()), ("s".into(), "text".into())],
            incr: vec![("a".into(), 2), ("n".into(), -3)],
        };
        r.channels[0].insert("x".into(), "gone".into());
        r.apply(0, &w).unwrap();
        assert_eq!(r.channels[0].get("a").unwrap(), "7");
        assert_eq!(r.channels[0].get("n").unwrap(), "-3");
        assert!(!r.channels[0].contains_key("x"));
        let bad = ChannelWrite {
            incr: vec![("s".into(), 1)],
            ..Default::default()
        };
        assert_eq!(r.clone().apply(0, &bad).unwrap_err().label(), "not_integer");
        let big = ChannelWrite {
            incr: vec![("a".into(), i64::MAX)],
            ..Default::default()
        };
        assert_eq!(r.clone().apply(0, &big).unwrap_err().label(), "overflow");
        let l = LimitCheck {
            max_keys: 3,
            max_bytes: 1000,
            client_keys: 1,
            client_bytes: 0,
        };
        assert_eq!(r.check(&l).unwrap_err().label(), "too_many_keys");
    }
}
