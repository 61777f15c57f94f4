//! `store.kind: embedded` (the default): a redb file on local disk that
//! survives restarts. One node.
//!
//! Layout (seven tables):
//! - `data`:    id(16) | channel(1) | key  ->  value
//! - `session`: id(16)                     ->  expire_at (ms, u64)
//! - `expiry`:  expire_at(8, BE) | id(16)  ->  ()       (sweep index)
//! - `ended`:   id(16)                     ->  until (ms, u64)  (revocation)
//! - `ended_expiry`: until(8, BE) | id(16) ->  ()       (sweep index)
//! - `moved`:   id(16)                     ->  until(8, BE) | new cookies
//!   (regenerate grace; few and short-lived, swept by a scan)
//! - `users`:   user hash | 0 | id(16)     ->  entry (JSON; `session.user_key`)
//!
//! redb calls block, so they never run on the proxy's runtime: reads go to
//! the blocking pool, and every write goes to one writer thread that commits
//! whatever batches are waiting in a single transaction (group commit: one
//! fsync for many requests). The writer is also what makes per-key writes and
//! Incr atomic: batches apply one after another against the current data.
//!
//! A bounded in-process cache of whole records sits in front of the file, so
//! a hot session's read never leaves the proxy's thread. It is coherent
//! because there is one writer: after each commit the writer replaces the
//! records it wrote and bumps a generation; a reader that missed only fills
//! the cache if no commit touched that shard while it read the file. An
//! ended id is never in the cache (the writer drops every id it ends), so a
//! cache hit also answers the revocation check; a session without store data
//! is cached as an empty record once checked.

use super::{
    join_index, Check, Inspected, Read, Record, SessionStore, StoreError, StoreKey, UserSession,
    UserWrite, WriteBatch, Written,
};
use crate::model::{ChannelSet, SessionId, CHANNELS};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
const SESSION: TableDefinition<&[u8], u64> = TableDefinition::new("session");
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");
const ENDED: TableDefinition<&[u8], u64> = TableDefinition::new("ended");
const ENDED_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("ended_expiry");
const MOVED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("moved");
const USERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("users");

/// Batches committed in one transaction at most.
const GROUP: usize = 256;
/// How long a checked session without store data stays cached (its entry
/// is replaced by any write to it, so this only bounds the memory it holds).
const NEGATIVE_TTL_MS: u64 = 60_000;
/// How often expired sessions are looked for (then deleted in batches of
/// [`SWEEP_BATCH`] until none are left).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

type Reply = oneshot::Sender<Result<Written, StoreError>>;

enum Msg {
    /// A batch, and the deadline past which the writer withdraws it
    /// instead of applying it.
    Write(Box<WriteBatch>, std::time::Instant, Reply),
    /// End these sessions (admin API, Destroy of a user, eviction).
    End(Vec<(StoreKey, u64)>, Option<String>, Reply),
    Sweep(oneshot::Sender<Result<usize, StoreError>>),
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    tx: mpsc::Sender<Msg>,
    path: PathBuf,
    cache: Arc<Cache>,
}

const SHARDS: usize = 16;

/// Whole records by id, with their expiry (ms), in 16 locked shards.
pub struct Cache {
    shards: [Mutex<Shard>; SHARDS],
    per_shard: usize,
}

#[derive(Default)]
struct Shard {
    map: HashMap<SessionId, (Arc<Record>, u64)>,
    /// Bumped by the writer after every commit that touched this shard.
    generation: u64,
}

impl Cache {
    fn new(capacity: usize) -> Cache {
        Cache {
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, id: &SessionId) -> &Mutex<Shard> {
        &self.shards[id.0[0] as usize % SHARDS]
    }

    /// A live cached record, or the shard generation to fill in with.
    fn get(&self, id: &SessionId, now: u64) -> Result<Arc<Record>, u64> {
        let mut s = self.shard(id).lock().unwrap();
        match s.map.get(id) {
            Some((rec, exp)) if *exp > now => Ok(rec.clone()),
            Some(_) => {
                s.map.remove(id);
                Err(s.generation)
            }
            None => Err(s.generation),
        }
    }

    /// Fill after a miss, unless a commit touched the shard meanwhile.
    fn fill(&self, id: SessionId, rec: Arc<Record>, expires: u64, generation: u64) {
        let mut s = self.shard(&id).lock().unwrap();
        if s.generation == generation {
            self.insert(&mut s, id, rec, expires);
        }
    }

    fn insert(&self, s: &mut Shard, id: SessionId, rec: Arc<Record>, expires: u64) {
        if self.per_shard == 0 {
            return;
        }
        if s.map.len() >= self.per_shard && !s.map.contains_key(&id) {
            // Evict an arbitrary entry: cheap, and good enough for a cache
            // whose misses cost one file read.
            if let Some(victim) = s.map.keys().next().copied() {
                s.map.remove(&victim);
            }
        }
        s.map.insert(id, (rec, expires));
    }

    /// After a commit: the writer's view of each touched session.
    fn committed(&self, updates: CacheUpdates) {
        for (id, u) in updates {
            let mut s = self.shard(&id).lock().unwrap();
            s.generation += 1;
            match u {
                Some((rec, exp)) if !rec.is_empty() => self.insert(&mut s, id, rec, exp),
                _ => {
                    s.map.remove(&id);
                }
            }
        }
    }
}

/// What `store.kind: embedded` says (the config layer builds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// The redb file (created with its directories).
    pub path: std::path::PathBuf,
    /// Sessions kept in memory in front of the file (0: none).
    pub cache: usize,
}

impl EmbeddedStore {
    /// Open (or create) the file and start the writer thread. `cache` bounds
    /// the number of sessions kept in memory (0: no cache).
    pub fn open(path: &Path, cache: usize) -> Result<EmbeddedStore, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
        }
        let db =
            Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // Create the tables up front so readers never see them missing.
        let init = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(DATA)?;
            txn.open_table(SESSION)?;
            txn.open_table(EXPIRY)?;
            txn.open_table(ENDED)?;
            txn.open_table(ENDED_EXPIRY)?;
            txn.open_table(MOVED)?;
            txn.open_table(USERS)?;
            txn.commit()?;
            Ok(())
        };
        init().map_err(|e| format!("cannot initialise {}: {e}", path.display()))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let wdb = db.clone();
        let cache = Arc::new(Cache::new(cache));
        let wcache = cache.clone();
        std::thread::Builder::new()
            .name("gimlet-store-writer".into())
            .spawn(move || writer(wdb, rx, wcache))
            .map_err(|e| format!("cannot start the store writer: {e}"))?;
        Ok(EmbeddedStore {
            db,
            tx,
            path: path.to_path_buf(),
            cache,
        })
    }

    /// A write the writer withdraws if it cannot start it by `deadline`.
    pub async fn write_by(
        &self,
        batch: &WriteBatch,
        deadline: std::time::Instant,
    ) -> Result<Written, StoreError> {
        self.send(|tx| Msg::Write(Box::new(batch.clone()), deadline, tx))
            .await
    }

    /// Hand the writer a message and wait for its answer.
    async fn send(&self, msg: impl FnOnce(Reply) -> Msg) -> Result<Written, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(msg(tx))
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Delete expired sessions now (the writer also does it periodically).
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Sweep(tx))
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }

    /// Number of live sessions (tests and `gimlet check`).
    pub fn session_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let t = txn.open_table(SESSION).map_err(unavailable)?;
        t.len().map_err(unavailable)
    }
}

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {}", e.into()))
}

/// The byte layouts of the tables' keys and values (see the module doc),
/// written and read here only. The decoders take what the file holds and
/// answer `None` for anything malformed rather than panic: a damaged or
/// foreign file is a missing record, never a crashed writer (fuzzed by
/// `fuzz/fuzz_targets/embedded_record.rs`).
pub mod record {
    use crate::model::SessionId;

    /// `data` keys of one session's channel start with this.
    pub fn prefix(id: &SessionId, ch: u8) -> [u8; 17] {
        let mut p = [0u8; 17];
        p[..16].copy_from_slice(&id.0);
        p[16] = ch;
        p
    }

    /// A `data` key: id | channel | key name.
    pub fn data_key(id: &SessionId, ch: u8, name: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(17 + name.len());
        k.extend_from_slice(&prefix(id, ch));
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// A `data` key's parts: id, channel, key name.
    pub fn parse_data_key(k: &[u8]) -> Option<(SessionId, u8, &[u8])> {
        let (id, rest) = split_id(k)?;
        let (&ch, name) = rest.split_first()?;
        Some((id, ch, name))
    }

    /// An `expiry` / `ended_expiry` key: at (8, BE) | id, so a range scan
    /// from the start yields the earliest first.
    pub fn expiry_key(at: u64, id: &SessionId) -> [u8; 24] {
        let mut k = [0u8; 24];
        k[..8].copy_from_slice(&at.to_be_bytes());
        k[8..].copy_from_slice(&id.0);
        k
    }

    pub fn parse_expiry_key(k: &[u8]) -> Option<(u64, SessionId)> {
        let (at, rest) = split_u64(k)?;
        let (id, rest) = split_id(rest)?;
        rest.is_empty().then_some((at, id))
    }

    /// A `moved` value: until (8, BE) | the new cookies.
    pub fn moved_value(until: u64, cookies: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + cookies.len());
        v.extend_from_slice(&until.to_be_bytes());
        v.extend_from_slice(cookies.as_bytes());
        v
    }

    pub fn parse_moved(v: &[u8]) -> Option<(u64, &str)> {
        let (until, rest) = split_u64(v)?;
        Some((until, std::str::from_utf8(rest).ok()?))
    }

    /// A `users` key: user hash | 0 | id. The hash is hex, so it holds no 0.
    pub fn user_key(user: &str, id: &SessionId) -> Vec<u8> {
        let mut k = Vec::with_capacity(user.len() + 17);
        k.extend_from_slice(user.as_bytes());
        k.push(0);
        k.extend_from_slice(&id.0);
        k
    }

    /// The keys `[lo, hi)` of one user's index.
    pub fn user_range(user: &str) -> (Vec<u8>, Vec<u8>) {
        let mut lo = user.as_bytes().to_vec();
        lo.push(0);
        let mut hi = user.as_bytes().to_vec();
        hi.push(1);
        (lo, hi)
    }

    pub fn parse_user_key(k: &[u8]) -> Option<(&str, SessionId)> {
        let cut = k.len().checked_sub(17)?;
        let (user, rest) = k.split_at(cut);
        let (&0, id) = rest.split_first()? else {
            return None;
        };
        let user = std::str::from_utf8(user)
            .ok()
            .filter(|u| !u.contains('\0'))?;
        Some((user, split_id(id)?.0))
    }

    fn split_u64(b: &[u8]) -> Option<(u64, &[u8])> {
        let (head, rest) = b.split_first_chunk::<8>()?;
        Some((u64::from_be_bytes(*head), rest))
    }

    fn split_id(b: &[u8]) -> Option<(SessionId, &[u8])> {
        let (head, rest) = b.split_first_chunk::<16>()?;
        Some((SessionId(*head), rest))
    }
}
use record::{expiry_key, parse_expiry_key, parse_moved, prefix, user_key};

/// Read a session's channels in `mask`, and its expiry (0: no live record).
fn read_record(
    data: &impl ReadableTable<&'static [u8], &'static [u8]>,
    session: &impl ReadableTable<&'static [u8], u64>,
    id: &SessionId,
    mask: ChannelSet,
    now: u64,
) -> Result<(Record, u64), redb::Error> {
    let mut rec = Record::default();
    let expires = session.get(&id.0[..])?.map_or(0, |e| e.value());
    if expires <= now {
        return Ok((rec, 0));
    }
    for ch in CHANNELS {
        if !mask.contains(ch) {
            continue;
        }
        let lo = prefix(id, ch as u8);
        let hi = prefix(id, ch as u8 + 1);
        for item in data.range::<&[u8]>(&lo[..]..&hi[..])? {
            let (k, v) = item?;
            let Some((_, _, name)) = record::parse_data_key(k.value()) else {
                continue;
            };
            let key = String::from_utf8_lossy(name).into_owned();
            let val = String::from_utf8_lossy(v.value()).into_owned();
            rec.channels[ch.index()].insert(key, val);
        }
    }
    Ok((rec, expires))
}

/// Remember `id` as ended until `until`, keeping the sweep index in step.
fn mark_ended(
    ended: &mut redb::Table<&'static [u8], u64>,
    index: &mut redb::Table<&'static [u8], ()>,
    id: &SessionId,
    until: u64,
) -> Result<(), redb::Error> {
    if let Some(old) = ended.insert(&id.0[..], until)?.map(|g| g.value()) {
        index.remove(&expiry_key(old, id)[..])?;
    }
    index.insert(&expiry_key(until, id)[..], ())?;
    Ok(())
}

fn is_ended(
    ended: &impl ReadableTable<&'static [u8], u64>,
    id: &SessionId,
    now: u64,
) -> Result<bool, redb::Error> {
    Ok(ended.get(&id.0[..])?.is_some_and(|g| g.value() > now))
}

/// The new cookies of an id regenerated within the grace.
fn moved(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: &SessionId,
    now: u64,
) -> Result<Option<String>, redb::Error> {
    let Some(v) = table.get(&id.0[..])? else {
        return Ok(None);
    };
    Ok(parse_moved(v.value())
        .filter(|(until, _)| *until > now)
        .map(|(_, cookies)| cookies.to_string()))
}

fn delete_session(
    data: &mut redb::Table<&'static [u8], &'static [u8]>,
    session: &mut redb::Table<&'static [u8], u64>,
    expiry: &mut redb::Table<&'static [u8], ()>,
    id: &SessionId,
) -> Result<(), redb::Error> {
    let lo = prefix(id, 0);
    let hi = prefix(id, 4);
    data.retain_in::<&[u8], _>(&lo[..]..&hi[..], |_, _| false)?;
    if let Some(old) = session.remove(&id.0[..])?.map(|g| g.value()) {
        expiry.remove(&expiry_key(old, id)[..])?;
    }
    Ok(())
}

type CacheUpdates = Vec<(SessionId, Option<(Arc<Record>, u64)>)>;

/// Apply one batch inside the writer's transaction. The outer `Result` is a
/// storage failure (aborts the group); the inner one a rejection of this
/// batch alone (nothing of it was written). `updates` collects what the
/// cache must learn once the transaction commits.
fn apply(
    txn: &redb::WriteTransaction,
    b: &WriteBatch,
    now: u64,
    updates: &mut CacheUpdates,
) -> Result<Result<Written, StoreError>, redb::Error> {
    let mut data = txn.open_table(DATA)?;
    let mut session = txn.open_table(SESSION)?;
    let mut expiry = txn.open_table(EXPIRY)?;

    let src = b.source();
    if b.check_moved {
        if let Some(h) = moved(&txn.open_table(MOVED)?, &b.carried(), now)? {
            return Ok(Err(StoreError::Rejected(super::Refusal::Moved(h))));
        }
    }
    if b.check_ended && !b.destroy_only() && is_ended(&txn.open_table(ENDED)?, &src, now)? {
        return Ok(Err(StoreError::Rejected(super::Refusal::Ended)));
    }
    let before = if b.destroy.is_some_and(|d| d.id == src) {
        Record::default()
    } else {
        let (rec, live_until) = read_record(&data, &session, &src, ChannelSet::ALL, now)?;
        if live_until == 0 && session.get(&src.0[..])?.is_some() {
            // Expired and not swept yet: its rows must not come back under
            // the expiry this write sets (the rows below are written as a
            // difference against `before`).
            delete_session(&mut data, &mut session, &mut expiry, &src)?;
        }
        rec
    };
    let mut after = before.clone();
    if !b.destroy_only() {
        if let Err(e) = after.apply_batch(b) {
            return Ok(Err(StoreError::Rejected(e)));
        }
    }
    // Only now that the batch applies: a refused batch writes nothing.
    if !b.end.is_empty() {
        let mut ended = txn.open_table(ENDED)?;
        let mut index = txn.open_table(ENDED_EXPIRY)?;
        for (id, until) in &b.end {
            mark_ended(&mut ended, &mut index, id, *until)?;
            updates.push((*id, None));
        }
    }
    if let (Some(from), Some((h, until))) = (b.rename_from, &b.forward) {
        let v = record::moved_value(*until, h);
        txn.open_table(MOVED)?.insert(&from.0[..], &v[..])?;
    }
    let written = apply_users(txn, &b.users, now)?;
    if let Some(d) = b.destroy {
        delete_session(&mut data, &mut session, &mut expiry, &d.id)?;
        updates.push((d.id, None));
    }
    if b.destroy_only() {
        return Ok(Ok(written));
    }
    if let Some(from) = b.rename_from {
        updates.push((from, None));
    }
    // Write only what changed (a Regenerate rewrites under the new id).
    let base = if b.rename_from.is_some() {
        delete_session(&mut data, &mut session, &mut expiry, &src)?;
        Record::default()
    } else {
        before
    };
    let id = &b.key.id;
    for ch in CHANNELS {
        let i = ch.index();
        for k in base.channels[i].keys() {
            if !after.channels[i].contains_key(k) {
                data.remove(&record::data_key(id, ch as u8, k)[..])?;
            }
        }
        for (k, v) in &after.channels[i] {
            if base.channels[i].get(k) != Some(v) {
                data.insert(&record::data_key(id, ch as u8, k)[..], v.as_bytes())?;
            }
        }
    }
    if let Some(old) = session.remove(&id.0[..])?.map(|g| g.value()) {
        expiry.remove(&expiry_key(old, id)[..])?;
    }
    if !after.is_empty() {
        session.insert(&id.0[..], b.expire_at)?;
        expiry.insert(&expiry_key(b.expire_at, id)[..], ())?;
    }
    updates.push((*id, Some((Arc::new(after), b.expire_at))));
    Ok(Ok(written))
}

/// One user's index, as an id -> entry map.
fn user_index(
    users: &impl ReadableTable<&'static [u8], &'static [u8]>,
    user: &str,
) -> Result<BTreeMap<String, UserSession>, redb::Error> {
    let (lo, hi) = record::user_range(user);
    let mut out = BTreeMap::new();
    for item in users.range::<&[u8]>(&lo[..]..&hi[..])? {
        let (_, v) = item?;
        if let Some(e) = std::str::from_utf8(v.value())
            .ok()
            .and_then(UserSession::decode)
        {
            out.insert(e.id.clone(), e);
        }
    }
    Ok(out)
}

fn apply_users(
    txn: &redb::WriteTransaction,
    writes: &[UserWrite],
    now: u64,
) -> Result<Written, redb::Error> {
    let mut written = Written::default();
    if writes.is_empty() {
        return Ok(written);
    }
    let mut users = txn.open_table(USERS)?;
    for u in writes {
        match u {
            UserWrite::Leave { user, id } => {
                users.remove(&user_key(user, id)[..])?;
            }
            UserWrite::Join {
                user,
                entry,
                replaces,
                max,
            } => {
                let before = user_index(&users, user)?;
                let mut index = before.clone();
                let ended = txn.open_table(ENDED)?;
                let is_ended = |e: &UserSession| {
                    e.key()
                        .is_some_and(|k| is_ended(&ended, &k.id, now).unwrap_or(false))
                };
                written.evicted.extend(join_index(
                    &mut index,
                    entry,
                    replaces.as_ref(),
                    *max,
                    now,
                    &is_ended,
                ));
                for id in before.keys().filter(|id| !index.contains_key(*id)) {
                    if let Some(id) = SessionId::from_hex(id) {
                        users.remove(&user_key(user, &id)[..])?;
                    }
                }
                if let Some(id) = SessionId::from_hex(&entry.id) {
                    users.insert(&user_key(user, &id)[..], entry.encode().as_bytes())?;
                }
            }
        }
    }
    Ok(written)
}

/// End sessions inside the writer's transaction.
fn end(
    txn: &redb::WriteTransaction,
    sessions: &[(StoreKey, u64)],
    user: Option<&str>,
    updates: &mut CacheUpdates,
) -> Result<(), redb::Error> {
    let mut data = txn.open_table(DATA)?;
    let mut session = txn.open_table(SESSION)?;
    let mut expiry = txn.open_table(EXPIRY)?;
    let mut ended = txn.open_table(ENDED)?;
    let mut index = txn.open_table(ENDED_EXPIRY)?;
    let mut moved = txn.open_table(MOVED)?;
    let mut users = txn.open_table(USERS)?;
    for (key, until) in sessions {
        let id = &key.id;
        delete_session(&mut data, &mut session, &mut expiry, id)?;
        moved.remove(&id.0[..])?;
        mark_ended(&mut ended, &mut index, id, *until)?;
        if let Some(u) = user {
            users.remove(&user_key(u, id)[..])?;
        }
        updates.push((*id, None));
    }
    Ok(())
}

/// Users' index entries looked at per sweep, from where the last stopped.
const USERS_PER_SWEEP: usize = 2_000;

/// Drop expired entries of users' indexes, a bounded slice per sweep
/// (`cursor`: the key to resume from; empty: the start).
fn sweep_users(
    txn: &redb::WriteTransaction,
    now: u64,
    cursor: &mut Vec<u8>,
) -> Result<(), redb::Error> {
    let mut users = txn.open_table(USERS)?;
    let mut gone = Vec::new();
    let mut next = None;
    for (n, item) in users.range::<&[u8]>(&cursor[..]..)?.enumerate() {
        let (k, v) = item?;
        if n == USERS_PER_SWEEP {
            next = Some(k.value().to_vec());
            break;
        }
        let expired = std::str::from_utf8(v.value())
            .ok()
            .and_then(UserSession::decode)
            .is_none_or(|e| e.expires <= now);
        if expired {
            gone.push(k.value().to_vec());
        }
    }
    for k in &gone {
        users.remove(&k[..])?;
    }
    *cursor = next.unwrap_or_default();
    Ok(())
}

/// Expired sessions (and ended marks past their sessions) deleted per
/// sweep transaction: small, so a write queued behind a sweep waits for one
/// short commit, never for a long purge.
const SWEEP_BATCH: usize = 500;

/// One bounded sweep: at most `limit` expired sessions and `limit` old ended
/// marks. Returns the sessions deleted and whether more are due.
fn sweep(
    txn: &redb::WriteTransaction,
    now: u64,
    limit: usize,
) -> Result<(usize, bool), redb::Error> {
    let mut data = txn.open_table(DATA)?;
    let mut session = txn.open_table(SESSION)?;
    let mut expiry = txn.open_table(EXPIRY)?;
    let hi = expiry_key(now, &SessionId([0xff; 16]));
    let mut ids = Vec::new();
    let mut stray = Vec::new();
    let mut more = false;
    for item in expiry.range::<&[u8]>(..&hi[..])? {
        let (k, _) = item?;
        if ids.len() + stray.len() == limit {
            more = true;
            break;
        }
        match parse_expiry_key(k.value()) {
            Some((_, id)) => ids.push(id),
            // Not ours: drop the stray index entry, nothing else.
            None => stray.push(k.value().to_vec()),
        }
    }
    for id in &ids {
        delete_session(&mut data, &mut session, &mut expiry, id)?;
    }
    for k in &stray {
        expiry.remove(&k[..])?;
    }
    // Ended marks past their session's expiry: the cookie is dead anyway.
    let mut ended = txn.open_table(ENDED)?;
    let mut index = txn.open_table(ENDED_EXPIRY)?;
    let mut gone = Vec::new();
    for item in index.range::<&[u8]>(..&hi[..])? {
        if gone.len() == limit {
            more = true;
            break;
        }
        gone.push(item?.0.value().to_vec());
    }
    for k in &gone {
        index.remove(&k[..])?;
        if let Some((_, id)) = parse_expiry_key(k) {
            ended.remove(&id.0[..])?;
        }
    }
    // Forwards live seconds and are few.
    txn.open_table(MOVED)?
        .retain(|_, v| parse_moved(v).is_some_and(|(until, _)| until > now))?;
    Ok((ids.len(), more))
}

/// One sweep batch in its own transaction.
fn sweep_once(
    db: &Database,
    now: u64,
    users_cursor: &mut Vec<u8>,
) -> Result<(usize, bool), redb::Error> {
    let txn = db.begin_write()?;
    let r = sweep(&txn, now, SWEEP_BATCH)?;
    sweep_users(&txn, now, users_cursor)?;
    txn.commit()?;
    Ok(r)
}

fn writer(db: Arc<Database>, rx: mpsc::Receiver<Msg>, cache: Arc<Cache>) {
    let mut last_sweep = std::time::Instant::now();
    let mut users_cursor = Vec::new();
    // More expired sessions are waiting than one batch took: sweep again
    // as soon as no write is waiting.
    let mut backlog = false;
    loop {
        let wait = if backlog {
            Duration::ZERO
        } else {
            SWEEP_EVERY.saturating_sub(last_sweep.elapsed())
        };
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut msgs: Vec<Msg> = first.into_iter().collect();
        while msgs.len() < GROUP {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        let now = crate::model::now_ms();
        if !msgs.is_empty() {
            group(&db, msgs, now, &cache, &mut users_cursor);
        }
        if backlog || last_sweep.elapsed() >= SWEEP_EVERY {
            match sweep_once(&db, now, &mut users_cursor) {
                Ok((swept, more)) => {
                    backlog = more;
                    if swept > 0 {
                        tracing::debug!(swept, more, "embedded store: expired sessions deleted");
                    }
                }
                Err(e) => {
                    backlog = false;
                    tracing::warn!(error = %e, "embedded store: sweep failed");
                }
            }
            if !backlog {
                last_sweep = std::time::Instant::now();
            }
        }
    }
}

/// Commit a group of messages in one transaction and answer each.
fn group(db: &Database, msgs: Vec<Msg>, now: u64, cache: &Cache, users_cursor: &mut Vec<u8>) {
    let mut results: Vec<Result<Written, StoreError>> = Vec::with_capacity(msgs.len());
    let mut updates = CacheUpdates::new();
    let run = |results: &mut Vec<Result<Written, StoreError>>,
               updates: &mut CacheUpdates|
     -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        for m in &msgs {
            match m {
                // Past its deadline before it was applied: withdrawn, so
                // the 503 its request gets is true.
                Msg::Write(_, deadline, _) if std::time::Instant::now() > *deadline => {
                    results.push(Err(StoreError::Timeout))
                }
                Msg::Write(b, _, _) => results.push(apply(&txn, b, now, updates)?),
                Msg::End(sessions, user, _) => {
                    end(&txn, sessions, user.as_deref(), updates)?;
                    results.push(Ok(Written::default()));
                }
                Msg::Sweep(_) => results.push(Ok(Written::default())),
            }
        }
        txn.commit()?;
        Ok(())
    };
    let outcome = run(&mut results, &mut updates);
    if outcome.is_ok() {
        // Before any reply: a request that saw its write acknowledged
        // reads the new data.
        cache.committed(updates);
    }
    for (i, m) in msgs.into_iter().enumerate() {
        let r = match &outcome {
            Ok(()) => results.get(i).cloned().unwrap_or(Ok(Written::default())),
            Err(e) => Err(StoreError::Unavailable(format!("embedded store: {e}"))),
        };
        match m {
            Msg::Write(_, _, reply) | Msg::End(_, _, reply) => {
                let _ = reply.send(r);
            }
            // An explicit sweep (tests, tools): every batch, now.
            Msg::Sweep(reply) => {
                let mut total = 0;
                let swept = loop {
                    match sweep_once(db, now, users_cursor) {
                        Ok((n, true)) => total += n,
                        Ok((n, false)) => break Ok(total + n),
                        Err(e) => break Err(unavailable(e)),
                    }
                };
                let _ = reply.send(swept);
            }
        }
    }
}

impl SessionStore for EmbeddedStore {
    async fn load(
        &self,
        key: &StoreKey,
        mask: ChannelSet,
        check: Check,
    ) -> Result<Read, StoreError> {
        let now = crate::model::now_ms();
        let generation = match self.cache.get(&key.id, now) {
            // Ended and regenerated ids are never cached.
            Ok(rec) => {
                return Ok(Read {
                    channels: rec.loaded(mask),
                    ..Default::default()
                })
            }
            Err(generation) => generation,
        };
        let db = self.db.clone();
        let id = key.id;
        // redb blocks: read on the blocking pool, never on the proxy thread.
        type Found = (Record, u64, bool, Option<String>);
        let (rec, expires, ended, moved) =
            tokio::task::spawn_blocking(move || -> Result<Found, redb::Error> {
                let txn = db.begin_read()?;
                let data = txn.open_table(DATA)?;
                let session = txn.open_table(SESSION)?;
                let ended = is_ended(&txn.open_table(ENDED)?, &id, now)?;
                let moved = moved(&txn.open_table(MOVED)?, &id, now)?;
                let (rec, expires) = read_record(&data, &session, &id, ChannelSet::ALL, now)?;
                Ok((rec, expires, ended, moved))
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))?
            .map_err(unavailable)?;
        let channels = rec.loaded(mask);
        let live = !ended && moved.is_none();
        if live && expires > now {
            self.cache.fill(id, Arc::new(rec), expires, generation);
        } else if live && check.ended {
            // Checked and live without store data (a cookie-only session):
            // remember it, so its next request does not read the file.
            let for_a_while = now.saturating_add(NEGATIVE_TTL_MS);
            self.cache.fill(id, Arc::new(rec), for_a_while, generation);
        }
        Ok(Read {
            channels,
            ended: check.ended && ended,
            moved: moved.filter(|_| check.moved),
        })
    }

    async fn write(&self, batch: &WriteBatch) -> Result<Written, StoreError> {
        let forever = std::time::Instant::now() + Duration::from_secs(3600);
        self.write_by(batch, forever).await
    }

    async fn user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        let db = self.db.clone();
        let user = user.to_string();
        let now = crate::model::now_ms();
        tokio::task::spawn_blocking(move || -> Result<Vec<UserSession>, redb::Error> {
            let txn = db.begin_read()?;
            let ended = txn.open_table(ENDED)?;
            let mut out = Vec::new();
            for e in user_index(&txn.open_table(USERS)?, &user)?.into_values() {
                let Some(k) = e.key() else { continue };
                if e.expires > now && !is_ended(&ended, &k.id, now)? {
                    out.push(e);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))?
        .map_err(unavailable)
    }

    async fn end(
        &self,
        sessions: &[(StoreKey, u64)],
        user: Option<&str>,
    ) -> Result<(), StoreError> {
        let (sessions, user) = (sessions.to_vec(), user.map(str::to_string));
        self.send(|tx| Msg::End(sessions, user, tx))
            .await
            .map(|_| ())
    }

    async fn inspect(
        &self,
        id: &SessionId,
        tag: Option<u32>,
    ) -> Result<Option<Inspected>, StoreError> {
        let db = self.db.clone();
        let id = *id;
        let now = crate::model::now_ms();
        tokio::task::spawn_blocking(move || -> Result<Option<Inspected>, redb::Error> {
            let txn = db.begin_read()?;
            let ended = is_ended(&txn.open_table(ENDED)?, &id, now)?;
            let (rec, expires) = read_record(
                &txn.open_table(DATA)?,
                &txn.open_table(SESSION)?,
                &id,
                ChannelSet::ALL,
                now,
            )?;
            if expires <= now && !ended {
                return Ok(None);
            }
            Ok(Some(Inspected {
                id: id.hex(),
                tag: tag.unwrap_or(0),
                data_expires: (expires > now).then_some(expires),
                keys: rec.key_names(),
                ended,
            }))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))?
        .map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_read()?;
            txn.open_table(SESSION)?;
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store: {e}")))?
        .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChannelWrite;

    fn key(b: u8) -> StoreKey {
        StoreKey {
            id: SessionId([b; 16]),
            tag: 1,
        }
    }

    #[test]
    fn record_layouts_round_trip_and_refuse_what_is_not_theirs() {
        let id = SessionId([7; 16]);
        let k = record::data_key(&id, 2, "cart");
        assert_eq!(record::parse_data_key(&k), Some((id, 2, &b"cart"[..])));
        assert_eq!(record::parse_data_key(&k[..16]), None);
        let e = expiry_key(u64::MAX - 1, &id);
        assert_eq!(parse_expiry_key(&e), Some((u64::MAX - 1, id)));
        assert_eq!(parse_expiry_key(&e[..23]), None);
        assert_eq!(parse_expiry_key(&[&e[..], b"x"].concat()), None);
        let m = record::moved_value(5, "gimlet=abc");
        assert_eq!(parse_moved(&m), Some((5, "gimlet=abc")));
        assert_eq!(parse_moved(&m[..7]), None);
        assert_eq!(parse_moved(&[&m[..8], b"\xff"].concat()), None);
        let u = user_key("ab12", &id);
        assert_eq!(record::parse_user_key(&u), Some(("ab12", id)));
        assert_eq!(record::parse_user_key(&u[1..]), Some(("b12", id)));
        assert_eq!(record::parse_user_key(&u[..u.len() - 1]), None);
        let (lo, hi) = record::user_range("ab12");
        assert!(lo.as_slice() <= u.as_slice() && u.as_slice() < hi.as_slice());
    }

    fn set(k: StoreKey, pairs: &[(&str, &str)]) -> WriteBatch {
        let mut b = WriteBatch::new(k, crate::model::now_ms() + 60_000);
        b.channels[0] = ChannelWrite {
            set: pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Default::default()
        };
        b
    }

    async fn get(s: &EmbeddedStore, k: StoreKey) -> BTreeMapOf {
        s.load(&k, ChannelSet::ALL, Check::default())
            .await
            .unwrap()
            .channels[0]
            .clone()
            .unwrap()
    }

    type BTreeMapOf = std::collections::BTreeMap<String, String>;

    #[tokio::test]
    async fn cache_stays_coherent_with_writes() {
        let dir = tempfile::tempdir().unwrap();
        for cache in [0, 4] {
            let s = EmbeddedStore::open(&dir.path().join(format!("c{cache}.redb")), cache).unwrap();
            let (a, b) = (key(1), key(2));
            s.write(&set(a, &[("x", "1")])).await.unwrap();
            assert_eq!(get(&s, a).await["x"], "1");
            s.write(&set(a, &[("x", "2")])).await.unwrap();
            assert_eq!(
                get(&s, a).await["x"],
                "2",
                "stale after a write (cache {cache})"
            );
            // Regenerate: the old id reads empty, the new one has the data.
            let mut r = set(b, &[("y", "3")]);
            r.rename_from = Some(a.id);
            s.write(&r).await.unwrap();
            assert!(get(&s, a).await.is_empty());
            assert_eq!(get(&s, b).await["x"], "2");
            // Destroy.
            let mut d = WriteBatch::new(b, 0);
            d.destroy = Some(b);
            s.write(&d).await.unwrap();
            assert!(get(&s, b).await.is_empty());
            // A rejected batch changes nothing.
            s.write(&set(a, &[("w", "word")])).await.unwrap();
            let mut bad = WriteBatch::new(a, crate::model::now_ms() + 60_000);
            bad.channels[0].set = vec![("z".into(), "1".into())];
            bad.channels[0].incr = vec![("w".into(), 1)];
            assert!(matches!(s.write(&bad).await, Err(StoreError::Rejected(_))));
            assert!(!get(&s, a).await.contains_key("z"));
        }
    }

    #[tokio::test]
    async fn expired_records_are_absent_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("e.redb"), 16).unwrap();
        let mut b = set(key(3), &[("x", "1")]);
        b.expire_at = crate::model::now_ms() + 50;
        s.write(&b).await.unwrap();
        assert_eq!(get(&s, key(3)).await["x"], "1");
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        assert!(get(&s, key(3)).await.is_empty());
        assert_eq!(s.session_count().unwrap(), 1);
        assert_eq!(s.sweep().await.unwrap(), 1);
        assert_eq!(s.session_count().unwrap(), 0);
    }

    #[tokio::test]
    async fn expired_user_index_entries_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("u.redb"), 0).unwrap();
        let now = crate::model::now_ms();
        let mut b = WriteBatch::new(key(5), now + 60_000);
        b.users = vec![UserWrite::Join {
            user: "u".into(),
            entry: UserSession {
                id: key(5).id.hex(),
                tag: 1,
                created: now,
                seen: now,
                expires: now + 30,
                ip: None,
                user_agent: None,
            },
            replaces: None,
            max: None,
        }];
        s.write(&b).await.unwrap();
        let count = || {
            let txn = s.db.begin_read().unwrap();
            txn.open_table(USERS).unwrap().len().unwrap()
        };
        assert_eq!(count(), 1);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        s.sweep().await.unwrap();
        assert_eq!(count(), 0, "an expired entry outlived the sweep");
    }

    #[tokio::test]
    async fn a_sweep_transaction_deletes_a_small_batch() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("s.redb"), 0).unwrap();
        let now = crate::model::now_ms();
        let writes: Vec<_> = (0..1_200u32)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_le_bytes());
                let mut b = set(
                    StoreKey {
                        id: SessionId(id),
                        tag: 1,
                    },
                    &[("x", "1")],
                );
                b.expire_at = now + 20;
                b
            })
            .collect();
        let acks: Vec<_> = writes.iter().map(|b| s.write(b)).collect();
        for a in acks {
            a.await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
        // One transaction takes at most SWEEP_BATCH, and says more are due.
        let later = crate::model::now_ms();
        let txn = s.db.begin_write().unwrap();
        let (n, more) = sweep(&txn, later, SWEEP_BATCH).unwrap();
        txn.commit().unwrap();
        assert_eq!((n, more), (SWEEP_BATCH, true));
        // The explicit sweep finishes the rest, batch by batch.
        assert_eq!(s.sweep().await.unwrap(), 1_200 - SWEEP_BATCH);
        assert_eq!(s.session_count().unwrap(), 0);
    }
}
