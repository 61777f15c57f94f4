//! `store.kind: sql`: sessions in PostgreSQL, MySQL or MariaDB.
//!
//! One row per key (`gimlet_data`: id, channel, name, value) and one row per
//! session (`gimlet_sessions`: its absolute expiry and the running totals
//! of its keys and bytes), so a write touches only the keys it names and
//! checks the session limits without reading the rest of the session.
//! The session's expiry lives in its session row, not in each key's: a
//! write that moves the expiry (every idle-timeout touch) then changes one
//! row, not every key of the session. Reads ignore a session past its
//! expiry; a background task deletes expired sessions, their keys, old
//! ended marks and old user-index entries in bounded batches.
//!
//! Round trips, as for Redis:
//! - a read is one `SELECT` (data of the asked channels plus the ended and
//!   regenerate marks), none when nothing is asked;
//! - a write is one statement: `SELECT gimlet_write_v1($1)` (a PL/pgSQL
//!   function; a refusal raises, rolling all of it back) or
//!   `CALL gimlet_write_v1(?)` (a MySQL procedure in its own transaction;
//!   a refusal rolls back and answers a row saying why). Both take the
//!   batch as JSON, lock the session's row first and apply the batch with
//!   the semantics of `Record::apply_batch`.
//!
//! The schemas are `postgres.sql` and `mysql.sql` beside this file
//! (`gimlet migrate --print postgres|mysql`).
//!
//! sqlx, not tokio-postgres + mysql_async: one crate for both, with a pool,
//! TLS (`sslmode=` / `ssl-mode=` in the URL) and a statement cache, so a
//! cached statement is one round trip.

use super::{
    Check, Inspected, Read, Refusal, SessionStore, StoreError, StoreKey, UserSession, UserWrite,
    WriteBatch, Written,
};
use crate::model::{ChannelSet, SessionId, CHANNELS};
use serde_json::{json, Value};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool};
use sqlx::postgres::{PgConnectOptions, PgPool};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::OnceCell;

/// `store:` fields of `kind: sql`.
#[derive(Clone, PartialEq, Eq)]
pub struct SqlOptions {
    /// `postgres://`, `postgresql://`, `mysql://` or `mariadb://` URL, with
    /// its password.
    pub url: String,
    /// `store.sql.cleanup_interval`: how often expired rows are deleted.
    pub cleanup_interval: Duration,
    /// `store.sql.create_schema`: create the tables and functions when the
    /// first connection is made (otherwise `gimlet migrate`).
    pub create_schema: bool,
    /// `store.sql.pool`: connections per gateway process.
    pub pool: u32,
}

/// Without the URL: it holds the password.
impl std::fmt::Debug for SqlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlOptions")
            .field("url", &"<redacted>")
            .field("cleanup_interval", &self.cleanup_interval)
            .field("create_schema", &self.create_schema)
            .field("pool", &self.pool)
            .finish()
    }
}

/// The SQLSTATE the write function raises for a refusal: the message is the
/// refusal's label, the detail its value (a key, a count, the forward).
const REFUSED: &str = "GM001";

/// Rows deleted per cleanup statement.
pub const CLEANUP_BATCH: i32 = 1_000;

/// The PostgreSQL schema, idempotent: the tables when missing, the
/// functions replaced (so a newer gateway brings its own; their names carry
/// a version, so a gateway of an older version keeps calling its own during
/// a rolling upgrade). One transaction under an advisory lock: gateways
/// starting together do not replace a function at the same time.
pub const POSTGRES_SCHEMA: &str = include_str!("postgres.sql");

/// The MySQL / MariaDB schema: statements separated by lines holding only
/// `//`; see [`mysql_statements`].
pub const MYSQL_SCHEMA: &str = include_str!("mysql.sql");

/// The statements of [`MYSQL_SCHEMA`], each with the routine it creates
/// (none: a table, created when missing by the statement itself).
pub fn mysql_statements() -> Vec<(Option<&'static str>, &'static str)> {
    MYSQL_SCHEMA
        .split("\n//\n")
        .map(str::trim)
        .filter(|s| {
            s.lines()
                .any(|l| !l.starts_with("--") && !l.trim().is_empty())
        })
        .map(|s| {
            // The statement starts after its leading comment lines.
            let start = s
                .lines()
                .take_while(|l| l.starts_with("--") || l.trim().is_empty())
                .map(|l| l.len() + 1)
                .sum::<usize>();
            let body = &s[start.min(s.len())..];
            let name = ["CREATE PROCEDURE ", "CREATE FUNCTION "]
                .iter()
                .find_map(|p| body.strip_prefix(p))
                .and_then(|r| r.split(['(', ' ']).next());
            (name, body)
        })
        .collect()
}

/// Which server the URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Mysql,
}

impl Dialect {
    pub fn schema(self) -> &'static str {
        match self {
            Dialect::Postgres => POSTGRES_SCHEMA,
            Dialect::Mysql => MYSQL_SCHEMA,
        }
    }
}

/// Parsed `store.url`.
#[derive(Clone)]
pub enum Connect {
    Postgres(PgConnectOptions),
    Mysql(MySqlConnectOptions),
}

/// Parse a `store.url`; the error never repeats the URL (it holds the
/// password).
pub fn connect_options(url: &str) -> Result<Connect, String> {
    let scheme = url.split("://").next().unwrap_or("");
    let hide = |e: sqlx::Error| e.to_string().replace(url, "<url>");
    match scheme {
        "postgres" | "postgresql" => PgConnectOptions::from_str(url)
            .map(|o| Connect::Postgres(o.application_name("gimlet")))
            .map_err(|e| format!("invalid PostgreSQL URL: {}", hide(e))),
        "mysql" | "mariadb" => {
            let u = format!("mysql{}", &url[scheme.len()..]);
            MySqlConnectOptions::from_str(&u)
                .map(|o| Connect::Mysql(o.charset("utf8mb4")))
                .map_err(|e| format!("invalid MySQL URL: {}", hide(e).replace(&u, "<url>")))
        }
        _ => Err("expected a postgres://, postgresql://, mysql:// or mariadb:// URL".into()),
    }
}

/// A read: the asked channels' keys of a live session, then one row of
/// marks (`ch` -1: ended, forward).
const PG_LOAD: &str = "\
SELECT d.ch::int8, d.name, d.value FROM gimlet_sessions s JOIN gimlet_data d ON d.id = s.id \
 WHERE s.id = $1 AND s.expires > gimlet_now() AND d.ch = ANY($2) \
UNION ALL \
SELECT -1::int8, CASE WHEN m.ended_until > gimlet_now() THEN '1' END, \
       CASE WHEN m.forward_until > gimlet_now() THEN convert_to(m.forward, 'UTF8') END \
 FROM gimlet_marks m WHERE m.id = $1 AND $3";

/// The same on MySQL (no arrays: the channels as a bit mask; positional
/// parameters: the id twice).
const MY_LOAD: &str = "\
SELECT CAST(d.ch AS SIGNED), d.name, d.value FROM gimlet_sessions s JOIN gimlet_data d ON d.id = s.id \
 WHERE s.id = ? AND s.expires > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) AND ((1 << d.ch) & ?) <> 0 \
UNION ALL \
SELECT -1, CASE WHEN m.ended_until > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) THEN '1' END, \
       CASE WHEN m.forward_until > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) THEN m.forward END \
 FROM gimlet_marks m WHERE m.id = ? AND ?";

const PG_USERS: &str = "\
SELECT g.entry FROM gimlet_users g WHERE g.uh = $1 AND g.expires > gimlet_now() \
 AND NOT EXISTS (SELECT 1 FROM gimlet_marks m WHERE m.id = g.id AND m.ended_until > gimlet_now()) \
 ORDER BY g.id COLLATE \"C\"";
const MY_USERS: &str = "\
SELECT g.entry FROM gimlet_users g WHERE g.uh = ? AND g.expires > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) \
 AND NOT EXISTS (SELECT 1 FROM gimlet_marks m WHERE m.id = g.id AND m.ended_until > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)) \
 ORDER BY g.id";

const PG_INSPECT: &str = "\
SELECT s.tag, s.expires, d.ch::int8, d.name FROM gimlet_sessions s JOIN gimlet_data d ON d.id = s.id \
 WHERE s.id = $1 AND s.expires > gimlet_now() ORDER BY d.ch, d.name COLLATE \"C\"";
const MY_INSPECT: &str = "\
SELECT s.tag, s.expires, CAST(d.ch AS SIGNED), d.name FROM gimlet_sessions s JOIN gimlet_data d ON d.id = s.id \
 WHERE s.id = ? AND s.expires > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) ORDER BY d.ch, d.name";
const PG_ENDED: &str =
    "SELECT EXISTS (SELECT 1 FROM gimlet_marks WHERE id = $1 AND ended_until > gimlet_now())";
const MY_ENDED: &str =
    "SELECT EXISTS (SELECT 1 FROM gimlet_marks WHERE id = ? AND ended_until > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED))";

#[derive(Clone)]
enum Pool {
    Postgres(PgPool),
    Mysql(MySqlPool),
}

/// A connection taken from the pool for one statement.
enum Conn {
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
    Mysql(sqlx::pool::PoolConnection<sqlx::MySql>),
}

/// A pooled connection idle longer than this is pinged before use: a server
/// restarted meanwhile left it dead, and a write found dead after it was
/// sent has an unknown outcome. Busier connections go without the round
/// trip (a dead one there costs one failed request, and the pool).
const PING_IDLE: Duration = Duration::from_secs(5);

/// [`PING_IDLE`]: ping a connection idle too long before it is used.
fn ping_if_idle<DB: sqlx::Database>(
    c: &mut DB::Connection,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, sqlx::Error>> + Send + '_>> {
    Box::pin(async move {
        if meta.idle_for > PING_IDLE {
            sqlx::Connection::ping(c).await?;
        }
        Ok(true)
    })
}

/// How long a statement may run on the server: past the gateway's own
/// deadline, so a statement the gateway gave up on (a lock held by someone
/// else) frees its connection.
fn statement_limit(timeout: Duration) -> Duration {
    (timeout * 4).max(Duration::from_secs(5))
}

pub struct SqlStore {
    opts: SqlOptions,
    connect: Connect,
    timeout: Duration,
    /// The pool and its generation. Replaced after a connection error: a
    /// server that restarted left every pooled connection dead, and a pool
    /// that tested each before use would pay a round trip per request.
    pool: std::sync::RwLock<Option<(u64, Pool)>>,
    generation: std::sync::atomic::AtomicU64,
    /// The schema was made (`create_schema`), once per process.
    schema: OnceCell<()>,
}

/// Did the connection fail (rather than the statement)? Then the pool goes.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08 (connection exception) and 57P (PostgreSQL shut down).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::PoolTimedOut => StoreError::Timeout,
        sqlx::Error::Database(d)
            if matches!(d.code().as_deref(), Some("40001") | Some("40P01")) =>
        {
            StoreError::Unavailable(format!("{DEADLOCK}: {}", d.message()))
        }
        sqlx::Error::Database(d) => StoreError::Unavailable(format!("sql: {}", d.message())),
        e => StoreError::Unavailable(format!("sql: {e}")),
    }
}

impl SqlStore {
    /// Validate the URL now; connect on first use (inside a runtime).
    pub fn new(opts: SqlOptions, timeout: Duration) -> Result<SqlStore, String> {
        let connect = connect_options(&opts.url).map_err(|e| format!("store.url: {e}"))?;
        Ok(SqlStore {
            opts,
            connect,
            timeout,
            pool: std::sync::RwLock::new(None),
            generation: Default::default(),
            schema: OnceCell::new(),
        })
    }

    pub fn dialect(&self) -> Dialect {
        match self.connect {
            Connect::Postgres(_) => Dialect::Postgres,
            Connect::Mysql(_) => Dialect::Mysql,
        }
    }

    pub fn cleanup_interval(&self) -> Duration {
        self.opts.cleanup_interval
    }

    /// Pool settings both drivers share: lazy, bounded by `store.timeout`
    /// to get a connection, idle connections pinged before use.
    fn pool_options<DB: sqlx::Database>(&self) -> sqlx::pool::PoolOptions<DB> {
        sqlx::pool::PoolOptions::new()
            .max_connections(self.opts.pool)
            .min_connections(0)
            .acquire_timeout(self.timeout)
            .idle_timeout(Duration::from_secs(300))
            .test_before_acquire(false)
            .before_acquire(ping_if_idle::<DB>)
    }

    fn new_pool(&self) -> Pool {
        let limit = statement_limit(self.timeout);
        match &self.connect {
            Connect::Postgres(o) => {
                let ms = limit.as_millis().to_string();
                Pool::Postgres(self.pool_options().connect_lazy_with(o.clone().options([
                    ("statement_timeout", ms.as_str()),
                    ("lock_timeout", ms.as_str()),
                ])))
            }
            Connect::Mysql(o) => {
                let secs = limit.as_secs().max(1) as i64;
                Pool::Mysql(
                    self.pool_options()
                        .after_connect(move |c, _| {
                            Box::pin(async move {
                                // The clock in ms is UNIX_TIMESTAMP(NOW(3)):
                                // in UTC, no hour repeats.
                                sqlx::query("SET time_zone = '+00:00'")
                                    .execute(&mut *c)
                                    .await?;
                                sqlx::query("SET SESSION innodb_lock_wait_timeout = ?")
                                    .bind(secs)
                                    .execute(&mut *c)
                                    .await?;
                                // MariaDB only (MySQL has no such variable).
                                let _ = sqlx::query("SET SESSION max_statement_time = ?")
                                    .bind(secs)
                                    .execute(&mut *c)
                                    .await;
                                Ok(())
                            })
                        })
                        .connect_lazy_with(o.clone()),
                )
            }
        }
    }

    /// The pool (made on first use, inside a runtime), with the schema
    /// made first when `create_schema` says so.
    async fn pool(&self) -> Result<(u64, Pool), StoreError> {
        let current = self.pool.read().expect("not poisoned").clone();
        let (generation, pool) = match current {
            Some(p) => p,
            None => {
                let mut w = self.pool.write().expect("not poisoned");
                w.get_or_insert_with(|| {
                    let g = self
                        .generation
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (g, self.new_pool())
                })
                .clone()
            }
        };
        if self.opts.create_schema && self.schema.get().is_none() {
            self.schema
                .get_or_try_init(|| async { migrate_pool(&pool).await })
                .await?;
        }
        Ok((generation, pool))
    }

    /// After a connection error: a fresh pool for the next call (once per
    /// pool, however many calls saw it fail).
    fn lost(&self, generation: u64, e: &sqlx::Error) {
        if !connection_lost(e) {
            return;
        }
        let mut w = self.pool.write().expect("not poisoned");
        if w.as_ref().is_some_and(|(g, _)| *g == generation) {
            if let Some((_, old)) = w.take() {
                tokio::spawn(async move {
                    match old {
                        Pool::Postgres(p) => p.close().await,
                        Pool::Mysql(p) => p.close().await,
                    }
                });
            }
        }
    }

    /// A connection from the pool: `Err` when none could be had, so
    /// nothing was sent (a pool another call closed meanwhile: once more,
    /// on the fresh one).
    async fn acquire(&self) -> Result<(u64, Conn), StoreError> {
        for _ in 0..2 {
            let (generation, pool) = self.pool().await?;
            let got = match &pool {
                Pool::Postgres(p) => p.acquire().await.map(Conn::Postgres),
                Pool::Mysql(p) => p.acquire().await.map(Conn::Mysql),
            };
            match got {
                Ok(c) => return Ok((generation, c)),
                Err(sqlx::Error::PoolClosed) => continue,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(StoreError::Unavailable("sql: the pool was closed".into()))
    }

    /// Run `f` on a pooled connection; after a connection error, once more
    /// on a fresh pool when `retry` (reads: running them twice is
    /// harmless). The outer error: nothing was sent (no connection, no
    /// schema); the inner: the statement's.
    async fn run<T, F, Fut>(&self, retry: bool, f: F) -> Result<Result<T, sqlx::Error>, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let (generation, conn) = self.acquire().await?;
        match f(conn).await {
            Err(e) if connection_lost(&e) => {
                self.lost(generation, &e);
                if !retry {
                    return Ok(Err(e));
                }
                let (generation, conn) = self.acquire().await?;
                let r = f(conn).await;
                if let Err(e) = &r {
                    self.lost(generation, e);
                }
                Ok(r)
            }
            r => Ok(r),
        }
    }

    /// Create or update the schema (`gimlet migrate`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let (_, pool) = self.pool().await?;
        if !self.opts.create_schema {
            migrate_pool(&pool).await?;
        }
        Ok(())
    }

    /// One cleanup pass: bounded batches until one deletes less than a
    /// whole batch. Returns the expired sessions deleted.
    pub async fn cleanup(&self) -> Result<u64, StoreError> {
        let mut total = 0u64;
        loop {
            let (n, most): (i64, i64) = self
                .run(true, |conn| async move {
                    match conn {
                        Conn::Postgres(mut c) => {
                            let v: Vec<i64> = sqlx::query_scalar("SELECT gimlet_cleanup_v1($1)")
                                .bind(CLEANUP_BATCH)
                                .fetch_one(&mut *c)
                                .await?;
                            Ok((
                                v.first().copied().unwrap_or(0),
                                v.get(1).copied().unwrap_or(0),
                            ))
                        }
                        Conn::Mysql(mut c) => {
                            sqlx::query_as("CALL gimlet_cleanup_v1(?)")
                                .bind(CLEANUP_BATCH)
                                .fetch_one(&mut *c)
                                .await
                        }
                    }
                })
                .await?
                .map_err(unavailable)?;
            total += n.max(0) as u64;
            if most < CLEANUP_BATCH as i64 {
                return Ok(total);
            }
        }
    }

    /// The batch as the write function reads it. PostgreSQL: values in
    /// base64 (its JSON and text types cannot hold U+0000; the column is
    /// bytea).
    fn batch_json(b: &WriteBatch, dialect: Dialect) -> Value {
        use base64::Engine;
        let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
        let ch: Vec<Value> = b
            .channels
            .iter()
            .map(|w| {
                if w.is_empty() {
                    Value::Null
                } else {
                    let set: Vec<(&str, String)> = match dialect {
                        Dialect::Postgres => {
                            w.set.iter().map(|(k, v)| (k.as_str(), b64(v))).collect()
                        }
                        Dialect::Mysql => {
                            w.set.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
                        }
                    };
                    json!({
                        "clear": u8::from(w.clear),
                        "del": w.delete,
                        "set": set,
                        "incr": w.incr,
                    })
                }
            })
            .collect();
        let users: Vec<Value> = b
            .users
            .iter()
            .map(|u| match u {
                UserWrite::Leave { user, id } => {
                    json!({"op": "leave", "user": user, "id": id.hex()})
                }
                UserWrite::Join {
                    user,
                    entry,
                    replaces,
                    max,
                } => json!({
                    "op": "join",
                    "user": user,
                    "id": entry.id,
                    "created": entry.created,
                    "expires": entry.expires,
                    "entry": entry.encode(),
                    "replaces": replaces.map(|r| r.hex()),
                    "max": max,
                }),
            })
            .collect();
        // The ids and users the write locks, sorted: every writer takes
        // them in the same order.
        let mut locks: Vec<String> = std::iter::once(b.key.id)
            .chain(b.rename_from)
            .chain(b.destroy.map(|d| d.id))
            .chain(b.end.iter().map(|(id, _)| *id))
            .map(|id| id.hex())
            .collect();
        locks.sort();
        locks.dedup();
        let mut ulocks: Vec<&str> = b
            .users
            .iter()
            .map(|u| match u {
                UserWrite::Leave { user, .. } | UserWrite::Join { user, .. } => user.as_str(),
            })
            .collect();
        ulocks.sort();
        ulocks.dedup();
        json!({
            "locks": locks,
            "ulocks": ulocks,
            "id": b.key.id.hex(),
            "tag": b.key.tag,
            "exp": b.expire_at.min(i64::MAX as u64),
            "destroy": b.destroy.map(|d| d.id.hex()),
            "rename": b.rename_from.map(|r| r.hex()),
            "carried": b.carried().hex(),
            // Flags as 0/1: MySQL's JSON_VALUE answers true as "true",
            // MariaDB's as 1; PostgreSQL casts either.
            "donly": u8::from(b.destroy_only()),
            "ce": u8::from(b.check_ended && !b.destroy_only()),
            "cm": u8::from(b.check_moved),
            "ch": ch,
            "lim": b.limits.map(|l| json!([l.max_keys, l.max_bytes, l.client_keys, l.client_bytes])),
            "end": b.end.iter().map(|(id, until)| json!([id.hex(), until.min(&(i64::MAX as u64))])).collect::<Vec<_>>(),
            "fwd": b.forward.as_ref().map(|(c, until)| json!([c, until.min(&(i64::MAX as u64))])),
            "users": users,
        })
    }
}

async fn migrate_pool(pool: &Pool) -> Result<(), StoreError> {
    // On a connection of its own, closed after a failure: a schema batch
    // that failed half way may leave it inside an aborted transaction.
    let r = match pool {
        Pool::Postgres(p) => match p.acquire().await {
            Ok(mut c) => {
                let r = sqlx::raw_sql(POSTGRES_SCHEMA)
                    .execute(&mut *c)
                    .await
                    .map(|_| ());
                if r.is_err() {
                    drop(c.detach());
                }
                r
            }
            Err(e) => Err(e),
        },
        Pool::Mysql(p) => match p.acquire().await {
            Ok(mut c) => {
                let r = migrate_mysql(&mut c).await;
                if r.is_err() {
                    drop(c.detach());
                }
                r
            }
            Err(e) => Err(e),
        },
    };
    r.map_err(|e| match unavailable(e) {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{m} (creating the schema)")),
        other => other,
    })
}

/// MySQL: under a named lock (gateways starting together), the tables
/// when missing and each routine when missing.
async fn migrate_mysql(c: &mut sqlx::MySqlConnection) -> Result<(), sqlx::Error> {
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('gimlet_schema', 30)")
        .fetch_one(&mut *c)
        .await?;
    if locked != Some(1) {
        return Err(sqlx::Error::Protocol(
            "another gateway held the schema lock for 30 s".into(),
        ));
    }
    let mut result = Ok(());
    for (routine, stmt) in mysql_statements() {
        if let Some(name) = routine {
            let have: i64 = match sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.ROUTINES \
                 WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME = ?",
            )
            .bind(name)
            .fetch_one(&mut *c)
            .await
            {
                Ok(n) => n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if have > 0 {
                continue;
            }
        }
        // CREATE PROCEDURE cannot be prepared: the text protocol.
        if let Err(e) = sqlx::raw_sql(stmt).execute(&mut *c).await {
            result = Err(e);
            break;
        }
    }
    let _ = sqlx::query("SELECT RELEASE_LOCK('gimlet_schema')")
        .execute(&mut *c)
        .await;
    result
}

/// A refusal as the session core knows it, from its label and detail.
fn refusal(b: &WriteBatch, label: &str, detail: String) -> Option<Refusal> {
    let count = || detail.parse::<usize>().unwrap_or(0);
    let limits = b.limits.unwrap_or(super::LimitCheck {
        max_keys: 0,
        max_bytes: 0,
        client_keys: 0,
        client_bytes: 0,
    });
    Some(match label {
        "session_moved" => Refusal::Moved(detail),
        "session_ended" => Refusal::Ended,
        "not_integer" => Refusal::NotInteger { key: detail },
        "overflow" => Refusal::Overflow { key: detail },
        "too_many_keys" => Refusal::TooManyKeys {
            keys: count(),
            max: limits.max_keys,
        },
        "session_too_large" => Refusal::SessionTooLarge {
            bytes: count(),
            max: limits.max_bytes,
        },
        _ => return None,
    })
}

/// PostgreSQL: the refusal the write function raised.
fn pg_refusal(b: &WriteBatch, e: &sqlx::Error) -> Option<Refusal> {
    let sqlx::Error::Database(d) = e else {
        return None;
    };
    if d.code().as_deref() != Some(REFUSED) {
        return None;
    }
    let detail = d
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|p| p.detail())
        .unwrap_or("")
        .to_string();
    refusal(b, d.message(), detail)
}

/// A value read back: written from a `String`, so UTF-8 unless someone
/// else wrote the row.
fn utf8(v: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(v)
        .map_err(|_| StoreError::Unavailable("sql: a stored value is not UTF-8".into()))
}

/// The start of a deadlock victim's error (SQLSTATE 40001 or 40P01): see
/// [`unavailable`].
const DEADLOCK: &str = "sql: deadlock";

/// What a write statement answered.
enum Outcome {
    Evicted(Vec<String>),
    Refused(Refusal),
}

impl SqlStore {
    /// One try of a write (see `write`).
    async fn write_once(&self, b: &WriteBatch, arg: &str) -> Result<Written, StoreError> {
        let sent = self
            .run(false, |conn| {
                let arg = &arg;
                async move {
                    match conn {
                        Conn::Postgres(mut p) => {
                            match sqlx::query_scalar::<_, Vec<String>>(
                                "SELECT gimlet_write_v1($1::jsonb)",
                            )
                            .bind(arg)
                            .fetch_one(&mut *p)
                            .await
                            {
                                Ok(v) => {
                                    let mut v = v.into_iter();
                                    let status = v.next().unwrap_or_default();
                                    if status == "ok" {
                                        return Ok(Outcome::Evicted(v.collect()));
                                    }
                                    refusal(b, &status, v.next().unwrap_or_default())
                                        .map(Outcome::Refused)
                                        .ok_or_else(|| {
                                            sqlx::Error::Protocol(format!(
                                                "unexpected answer {status}"
                                            ))
                                        })
                                }
                                Err(e) => match pg_refusal(b, &e) {
                                    Some(r) => Ok(Outcome::Refused(r)),
                                    None => Err(e),
                                },
                            }
                        }
                        Conn::Mysql(mut p) => {
                            let (status, detail): (String, Option<String>) =
                                sqlx::query_as("CALL gimlet_write_v1(?)")
                                    .bind(arg)
                                    .fetch_one(&mut *p)
                                    .await?;
                            let detail = detail.unwrap_or_default();
                            if status == "ok" {
                                let v: Vec<String> =
                                    serde_json::from_str(&detail).map_err(|e| {
                                        sqlx::Error::Protocol(format!("evicted entries: {e}"))
                                    })?;
                                return Ok(Outcome::Evicted(v));
                            }
                            refusal(b, &status, detail)
                                .map(Outcome::Refused)
                                .ok_or_else(|| {
                                    sqlx::Error::Protocol(format!("unexpected answer {status}"))
                                })
                        }
                    }
                }
            })
            .await?;
        match sent {
            Ok(Outcome::Evicted(evicted)) => Ok(Written {
                evicted: evicted
                    .iter()
                    .filter_map(|e| UserSession::decode(e))
                    .collect(),
            }),
            Ok(Outcome::Refused(r)) => Err(StoreError::Rejected(r)),
            // The server refused the statement: rolled back, nothing of it
            // applied (a deadlock, a timeout, a constraint).
            Err(e) if matches!(e, sqlx::Error::Database(_)) && !connection_lost(&e) => {
                Err(unavailable(e))
            }
            // Sent, and then the connection went or the answer made no
            // sense: applied or not.
            Err(e) => Err(StoreError::Unknown(format!("sql: {e}"))),
        }
    }
}

impl SessionStore for SqlStore {
    async fn load(
        &self,
        key: &StoreKey,
        mask: ChannelSet,
        check: Check,
    ) -> Result<Read, StoreError> {
        let chans: Vec<i16> = CHANNELS
            .iter()
            .filter(|ch| mask.contains(**ch))
            .map(|ch| ch.index() as i16)
            .collect();
        let mut out = Read::default();
        if chans.is_empty() && !check.ended && !check.moved {
            return Ok(out);
        }
        let bits: i64 = chans.iter().map(|c| 1i64 << c).sum();
        let id = key.id.hex();
        let marks = check.ended || check.moved;
        let rows: Vec<(i64, Option<String>, Option<Vec<u8>>)> = self
            .run(true, |conn| {
                let (id, chans) = (&id, &chans);
                async move {
                    match conn {
                        Conn::Postgres(mut p) => {
                            sqlx::query_as(PG_LOAD)
                                .bind(id)
                                .bind(chans)
                                .bind(marks)
                                .fetch_all(&mut *p)
                                .await
                        }
                        Conn::Mysql(mut p) => {
                            sqlx::query_as(MY_LOAD)
                                .bind(id)
                                .bind(bits)
                                .bind(id)
                                .bind(marks)
                                .fetch_all(&mut *p)
                                .await
                        }
                    }
                }
            })
            .await?
            .map_err(unavailable)?;
        for &c in &chans {
            out.channels[c as usize] = Some(BTreeMap::new());
        }
        for (ch, name, value) in rows {
            match ch {
                -1 => {
                    out.ended = check.ended && name.is_some();
                    out.moved = value.filter(|_| check.moved).map(utf8).transpose()?;
                }
                0..=3 => {
                    if let (Some(m), Some(n), Some(v)) =
                        (out.channels[ch as usize].as_mut(), name, value)
                    {
                        m.insert(n, utf8(v)?);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    async fn write(&self, b: &WriteBatch) -> Result<Written, StoreError> {
        let arg = Self::batch_json(b, self.dialect()).to_string();
        // A deadlock victim was rolled back whole: run it again (twice at
        // most; the lock order makes deadlocks rare).
        let mut tries = 0;
        loop {
            tries += 1;
            let r = self.write_once(b, &arg).await;
            match &r {
                Err(StoreError::Unavailable(m)) if tries < 3 && m.starts_with(DEADLOCK) => continue,
                _ => return r,
            }
        }
    }

    async fn user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        let rows: Vec<String> = self
            .run(true, |conn| async move {
                match conn {
                    Conn::Postgres(mut p) => {
                        sqlx::query_scalar(PG_USERS)
                            .bind(user)
                            .fetch_all(&mut *p)
                            .await
                    }
                    Conn::Mysql(mut p) => {
                        sqlx::query_scalar(MY_USERS)
                            .bind(user)
                            .fetch_all(&mut *p)
                            .await
                    }
                }
            })
            .await?
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .filter_map(|e| UserSession::decode(e))
            .filter(|e| e.key().is_some())
            .collect())
    }

    async fn end(
        &self,
        sessions: &[(StoreKey, u64)],
        user: Option<&str>,
    ) -> Result<(), StoreError> {
        if sessions.is_empty() {
            return Ok(());
        }
        // Sorted (the write's lock order); an id listed twice keeps its
        // last expiry, as the other stores do.
        let mut sorted: BTreeMap<String, i64> = BTreeMap::new();
        for (k, u) in sessions {
            sorted.insert(k.id.hex(), (*u).min(i64::MAX as u64) as i64);
        }
        let (ids, untils): (Vec<String>, Vec<i64>) = sorted.into_iter().unzip();
        let pairs = Value::Array(
            ids.iter()
                .zip(&untils)
                .map(|(id, u)| json!([id, u]))
                .collect(),
        )
        .to_string();
        // Idempotent: ending twice ends the same sessions.
        self.run(true, |conn| {
            let (ids, untils, pairs) = (&ids, &untils, &pairs);
            async move {
                match conn {
                    Conn::Postgres(mut p) => sqlx::query("SELECT gimlet_end_v1($1, $2, $3)")
                        .bind(ids)
                        .bind(untils)
                        .bind(user)
                        .execute(&mut *p)
                        .await
                        .map(|_| ()),
                    Conn::Mysql(mut p) => sqlx::query("CALL gimlet_end_v1(?, ?)")
                        .bind(pairs)
                        .bind(user)
                        .execute(&mut *p)
                        .await
                        .map(|_| ()),
                }
            }
        })
        .await?
        .map_err(unavailable)?;
        Ok(())
    }

    async fn inspect(
        &self,
        id: &SessionId,
        _tag: Option<u32>,
    ) -> Result<Option<Inspected>, StoreError> {
        let hex = id.hex();
        type Keys = Vec<(i64, i64, i64, String)>;
        let (rows, ended): (Keys, bool) = self
            .run(true, |conn| {
                let hex = &hex;
                async move {
                    match conn {
                        Conn::Postgres(mut p) => {
                            let rows = sqlx::query_as(PG_INSPECT)
                                .bind(hex)
                                .fetch_all(&mut *p)
                                .await?;
                            let ended = sqlx::query_scalar(PG_ENDED)
                                .bind(hex)
                                .fetch_one(&mut *p)
                                .await?;
                            Ok((rows, ended))
                        }
                        Conn::Mysql(mut p) => {
                            let rows = sqlx::query_as(MY_INSPECT)
                                .bind(hex)
                                .fetch_all(&mut *p)
                                .await?;
                            let ended: i64 = sqlx::query_scalar(MY_ENDED)
                                .bind(hex)
                                .fetch_one(&mut *p)
                                .await?;
                            Ok((rows, ended != 0))
                        }
                    }
                }
            })
            .await?
            .map_err(unavailable)?;
        let mut out = Inspected {
            id: id.hex(),
            ended,
            ..Default::default()
        };
        for (tag, expires, ch, name) in rows {
            out.tag = tag as u32;
            out.data_expires = Some(expires.max(0) as u64);
            if let Some(c) = usize::try_from(ch).ok().and_then(|c| CHANNELS.get(c)) {
                out.keys.entry(c.store_suffix()).or_default().push(name);
            }
        }
        Ok((ended || !out.keys.is_empty()).then_some(out))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(true, |conn| async move {
            match conn {
                Conn::Postgres(mut p) => sqlx::query("SELECT 1").execute(&mut *p).await.map(|_| ()),
                Conn::Mysql(mut p) => sqlx::query("SELECT 1").execute(&mut *p).await.map(|_| ()),
            }
        })
        .await?
        .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mysql_schema_splits_into_its_statements() {
        let all = mysql_statements();
        let routines: Vec<&str> = all.iter().filter_map(|(r, _)| *r).collect();
        assert_eq!(
            routines,
            ["gimlet_write_v1", "gimlet_end_v1", "gimlet_cleanup_v1"]
        );
        let tables = all
            .iter()
            .filter(|(_, s)| s.starts_with("CREATE TABLE IF NOT EXISTS"))
            .count();
        assert_eq!(tables, 5);
        assert_eq!(all.len(), 8);
        // No statement holds the separator, none starts with a comment.
        assert!(all
            .iter()
            .all(|(_, s)| !s.contains("\n//\n") && s.starts_with("CREATE")));
    }

    #[test]
    fn urls_are_checked_without_repeating_the_password() {
        for url in [
            "postgres://u:hunter2@h/db",
            "postgresql://u:hunter2@h:5433/db?sslmode=require",
            "mysql://u:hunter2@h:3306/db",
            "mariadb://u:hunter2@h/db",
        ] {
            assert!(connect_options(url).is_ok(), "{url}");
        }
        for url in [
            "redis://:hunter2@h",
            "postgres://u:hunter2@h:99999/db",
            "mysql://u:hunter2@h:x/db",
        ] {
            let e = connect_options(url).err().unwrap_or_default();
            assert!(!e.is_empty() && !e.contains("hunter2"), "{url}: {e}");
        }
    }
}
