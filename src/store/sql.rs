//! `store.kind: sql`: sessions in PostgreSQL.
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
//! - a write is one `SELECT gimlet_write_v1($1)`: a PL/pgSQL function that
//!   applies the whole batch in the statement's transaction, with the
//!   session's row locked, and raises (rolling all of it back) on a refusal.
//!
//! sqlx, not tokio-postgres: one crate for PostgreSQL and (next) MySQL and
//! MariaDB, with a pool, TLS (`sslmode=` in the URL) and a statement cache,
//! so a cached statement is one round trip.

use super::{
    Check, Inspected, Read, Refusal, SessionStore, StoreError, StoreKey, UserSession, UserWrite,
    WriteBatch, Written,
};
use crate::model::{ChannelSet, SessionId, CHANNELS};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::OnceCell;

/// `store:` fields of `kind: sql`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlOptions {
    /// `postgres://` (or `postgresql://`) URL, with its password.
    pub url: String,
    /// `store.sql.cleanup_interval`: how often expired rows are deleted.
    pub cleanup_interval: Duration,
    /// `store.sql.create_schema`: create the tables and functions when the
    /// first connection is made (otherwise `gimlet migrate`).
    pub create_schema: bool,
    /// `store.sql.pool`: connections per gateway process.
    pub pool: u32,
}

/// The SQLSTATE the write function raises for a refusal: the message is the
/// refusal's label, the detail its value (a key, a count, the forward).
const REFUSED: &str = "GM001";

/// Rows deleted per cleanup statement.
pub const CLEANUP_BATCH: i32 = 1_000;

/// The schema, idempotent: the tables when missing, the functions replaced
/// (so a newer gateway brings its own; their names carry a version, so a
/// gateway of an older version keeps calling its own during a rolling
/// upgrade). One transaction under an advisory lock: gateways starting
/// together do not replace a function at the same time.
pub const SCHEMA: &str = r#####"
BEGIN;
SELECT pg_advisory_xact_lock(7262013);

-- One row per session: its absolute expiry (ms since the epoch) and the
-- running totals of its server-side keys and bytes (key + value, every
-- channel), so a write checks the session limits without reading the rest.
CREATE TABLE IF NOT EXISTS gimlet_sessions (
  id      text    PRIMARY KEY,
  tag     bigint  NOT NULL,
  expires bigint  NOT NULL,
  keys    integer NOT NULL,
  bytes   bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS gimlet_sessions_expires ON gimlet_sessions (expires);

-- One row per key: channel 0 = p, 1 = t, 2 = sp, 3 = st.
CREATE TABLE IF NOT EXISTS gimlet_data (
  id    text     NOT NULL,
  ch    smallint NOT NULL,
  name  text     NOT NULL,
  value text     NOT NULL,
  PRIMARY KEY (id, ch, name)
);

-- Ended ids (session.revocation) and regenerated ids' forwards
-- (session.regenerate_grace), each until its own expiry.
CREATE TABLE IF NOT EXISTS gimlet_marks (
  id            text PRIMARY KEY,
  ended_until   bigint,
  forward       text,
  forward_until bigint
);
CREATE INDEX IF NOT EXISTS gimlet_marks_until
  ON gimlet_marks ((greatest(coalesce(ended_until, 0), coalesce(forward_until, 0))));

-- Users' indexes (session.user_key): the user's hash, one row per session.
CREATE TABLE IF NOT EXISTS gimlet_users (
  uh      text   NOT NULL,
  id      text   NOT NULL,
  created bigint NOT NULL,
  expires bigint NOT NULL,
  entry   text   NOT NULL,
  PRIMARY KEY (uh, id)
);
CREATE INDEX IF NOT EXISTS gimlet_users_expires ON gimlet_users (expires);

-- The store's clock, in ms: expiry is judged by one clock for every gateway.
CREATE OR REPLACE FUNCTION gimlet_now() RETURNS bigint
  LANGUAGE sql STABLE AS $$ SELECT (extract(epoch FROM now()) * 1000)::bigint $$;

-- One response's write (the JSON of SqlStore::batch_json), all or nothing.
-- Returns the user-index entries session.max_per_user evicted.
CREATE OR REPLACE FUNCTION gimlet_write_v1(b jsonb) RETURNS text[]
LANGUAGE plpgsql AS $fn$
DECLARE
  t       bigint  := gimlet_now();
  sid     text    := b->>'id';
  src     text    := b->>'rename';
  nkeys   bigint  := 0;
  nbytes  bigint  := 0;
  s       record;
  o       record;
  c       int;
  w       jsonb;
  kv      jsonb;
  vk      text;
  vv      text;
  vold    text;
  cur     numeric;
  dk      bigint;
  db      bigint;
  u       jsonb;
  n       bigint;
  evicted text[]  := '{}';
BEGIN
  -- 1. Refusals on the marks, before anything changes.
  IF (b->>'cm')::boolean THEN
    SELECT m.forward INTO vv FROM gimlet_marks m
      WHERE m.id = b->>'carried' AND m.forward_until > t;
    IF vv IS NOT NULL THEN
      RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'session_moved', DETAIL = vv;
    END IF;
  END IF;
  IF (b->>'ce')::boolean AND EXISTS (SELECT 1 FROM gimlet_marks m
      WHERE m.id = coalesce(src, sid) AND m.ended_until > t) THEN
    RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'session_ended';
  END IF;

  -- 2. Destroy.
  IF b->>'destroy' IS NOT NULL THEN
    DELETE FROM gimlet_sessions WHERE id = b->>'destroy';
    DELETE FROM gimlet_data WHERE id = b->>'destroy';
  END IF;

  IF NOT (b->>'donly')::boolean THEN
    -- 3. The session's row, locked: every writer of this session (and the
    -- cleanup) takes it first, so the totals and its keys change together.
    LOOP
      SELECT * INTO s FROM gimlet_sessions WHERE id = sid FOR UPDATE;
      EXIT WHEN FOUND;
      INSERT INTO gimlet_sessions (id, tag, expires, keys, bytes)
        VALUES (sid, (b->>'tag')::bigint, 0, 0, 0) ON CONFLICT (id) DO NOTHING;
    END LOOP;
    IF s.expires > t THEN
      nkeys := s.keys;
      nbytes := s.bytes;
    ELSIF s.keys > 0 THEN
      -- Expired, not yet cleaned up: it is gone, whatever comes next.
      DELETE FROM gimlet_data WHERE id = sid;
    END IF;

    -- 4. Regenerate: the old id's keys move (replacing this id's in the
    -- channels the old one holds), its row goes.
    IF src IS NOT NULL THEN
      SELECT * INTO o FROM gimlet_sessions WHERE id = src FOR UPDATE;
      IF FOUND THEN
        DELETE FROM gimlet_sessions WHERE id = src;
        IF o.expires > t AND o.keys > 0 THEN
          DELETE FROM gimlet_data WHERE id = sid
            AND ch IN (SELECT DISTINCT d.ch FROM gimlet_data d WHERE d.id = src);
          UPDATE gimlet_data SET id = sid WHERE id = src;
          SELECT count(*), coalesce(sum(octet_length(name) + octet_length(value)), 0)
            INTO nkeys, nbytes FROM gimlet_data WHERE id = sid;
        ELSE
          DELETE FROM gimlet_data WHERE id = src;
        END IF;
      END IF;
    END IF;

    -- 5. Each channel: clear, delete, set, incr, in that order; the
    -- totals follow every key changed.
    FOR c IN 0..3 LOOP
      w := b->'ch'->c;
      CONTINUE WHEN w IS NULL OR jsonb_typeof(w) <> 'object';
      IF (w->>'clear')::boolean THEN
        WITH d AS (DELETE FROM gimlet_data WHERE id = sid AND ch = c
                   RETURNING octet_length(name) + octet_length(value) AS len)
          SELECT count(*), coalesce(sum(len), 0) INTO dk, db FROM d;
        nkeys := nkeys - dk;
        nbytes := nbytes - db;
      END IF;
      IF jsonb_array_length(w->'del') > 0 THEN
        WITH d AS (DELETE FROM gimlet_data WHERE id = sid AND ch = c
                     AND name IN (SELECT jsonb_array_elements_text(w->'del'))
                   RETURNING octet_length(name) + octet_length(value) AS len)
          SELECT count(*), coalesce(sum(len), 0) INTO dk, db FROM d;
        nkeys := nkeys - dk;
        nbytes := nbytes - db;
      END IF;
      FOR kv IN SELECT jsonb_array_elements(w->'set') LOOP
        vk := kv->>0;
        vv := kv->>1;
        SELECT d.value INTO vold FROM gimlet_data d WHERE d.id = sid AND d.ch = c AND d.name = vk;
        IF FOUND THEN
          nkeys := nkeys - 1;
          nbytes := nbytes - octet_length(vk) - octet_length(vold);
          UPDATE gimlet_data SET value = vv WHERE id = sid AND ch = c AND name = vk;
        ELSE
          INSERT INTO gimlet_data (id, ch, name, value) VALUES (sid, c, vk, vv);
        END IF;
        nkeys := nkeys + 1;
        nbytes := nbytes + octet_length(vk) + octet_length(vv);
      END LOOP;
      FOR kv IN SELECT jsonb_array_elements(w->'incr') LOOP
        vk := kv->>0;
        SELECT d.value INTO vold FROM gimlet_data d WHERE d.id = sid AND d.ch = c AND d.name = vk;
        IF NOT FOUND THEN
          cur := 0;
        ELSIF vold !~ '^-?[0-9]+$' THEN
          RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'not_integer', DETAIL = vk;
        ELSE
          cur := vold::numeric;
          IF cur < -9223372036854775808 OR cur > 9223372036854775807 THEN
            RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'not_integer', DETAIL = vk;
          END IF;
        END IF;
        cur := cur + (kv->>1)::numeric;
        IF cur < -9223372036854775808 OR cur > 9223372036854775807 THEN
          RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'overflow', DETAIL = vk;
        END IF;
        vv := cur::bigint::text;
        IF FOUND THEN
          nbytes := nbytes - octet_length(vold) + octet_length(vv);
          UPDATE gimlet_data SET value = vv WHERE id = sid AND ch = c AND name = vk;
        ELSE
          INSERT INTO gimlet_data (id, ch, name, value) VALUES (sid, c, vk, vv);
          nkeys := nkeys + 1;
          nbytes := nbytes + octet_length(vk) + octet_length(vv);
        END IF;
      END LOOP;
    END LOOP;

    -- 6. The session limits, over the totals plus the clientside data.
    IF jsonb_typeof(b->'lim') = 'array' THEN
      n := nkeys + (b->'lim'->>2)::bigint;
      IF n > (b->'lim'->>0)::bigint THEN
        RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'too_many_keys', DETAIL = n::text;
      END IF;
      n := nbytes + (b->'lim'->>3)::bigint;
      IF n > (b->'lim'->>1)::bigint THEN
        RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = 'session_too_large', DETAIL = n::text;
      END IF;
    END IF;

    -- 7. The session's row: its expiry and totals, or gone with its last key.
    IF nkeys > 0 THEN
      UPDATE gimlet_sessions
        SET expires = (b->>'exp')::bigint, keys = nkeys, bytes = nbytes, tag = (b->>'tag')::bigint
        WHERE id = sid;
    ELSE
      DELETE FROM gimlet_sessions WHERE id = sid;
    END IF;
  END IF;

  -- 8. Ended ids, and a Regenerate's forward.
  FOR kv IN SELECT jsonb_array_elements(b->'end') LOOP
    INSERT INTO gimlet_marks (id, ended_until) VALUES (kv->>0, (kv->>1)::bigint)
      ON CONFLICT (id) DO UPDATE SET ended_until = EXCLUDED.ended_until;
  END LOOP;
  IF src IS NOT NULL AND jsonb_typeof(b->'fwd') = 'array' THEN
    INSERT INTO gimlet_marks (id, forward, forward_until)
      VALUES (src, b->'fwd'->>0, (b->'fwd'->>1)::bigint)
      ON CONFLICT (id) DO UPDATE SET forward = EXCLUDED.forward,
                                     forward_until = EXCLUDED.forward_until;
  END IF;

  -- 9. Users' indexes, one user at a time (an advisory lock per user), with
  -- the semantics of store::join_index.
  FOR u IN SELECT jsonb_array_elements(b->'users') LOOP
    PERFORM pg_advisory_xact_lock(hashtextextended('gimlet_users:' || (u->>'user'), 0));
    IF u->>'op' = 'leave' THEN
      DELETE FROM gimlet_users WHERE uh = u->>'user' AND id = u->>'id';
      CONTINUE;
    END IF;
    IF u->>'replaces' IS NOT NULL THEN
      DELETE FROM gimlet_users WHERE uh = u->>'user' AND id = u->>'replaces';
    END IF;
    INSERT INTO gimlet_users (uh, id, created, expires, entry)
      VALUES (u->>'user', u->>'id', (u->>'created')::bigint, (u->>'expires')::bigint, u->>'entry')
      ON CONFLICT (uh, id) DO UPDATE SET created = EXCLUDED.created,
        expires = EXCLUDED.expires, entry = EXCLUDED.entry;
    DELETE FROM gimlet_users g WHERE g.uh = u->>'user' AND g.id <> u->>'id'
      AND (g.expires <= t OR EXISTS (SELECT 1 FROM gimlet_marks m
                                     WHERE m.id = g.id AND m.ended_until > t));
    IF u->>'max' IS NOT NULL THEN
      SELECT count(*) INTO n FROM gimlet_users WHERE uh = u->>'user';
      IF n > (u->>'max')::bigint THEN
        -- Left in the index until the gateway has ended them.
        evicted := evicted || ARRAY(
          SELECT g.entry FROM gimlet_users g WHERE g.uh = u->>'user' AND g.id <> u->>'id'
            ORDER BY g.created, g.id COLLATE "C" LIMIT n - (u->>'max')::bigint);
      END IF;
    END IF;
  END LOOP;
  RETURN evicted;
END
$fn$;

-- End sessions (log out everywhere, max_per_user): keys and forwards go,
-- each id is remembered as ended until its expiry, the user's index drops it.
CREATE OR REPLACE FUNCTION gimlet_end_v1(ids text[], untils bigint[], who text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  DELETE FROM gimlet_sessions WHERE id = ANY(ids);
  DELETE FROM gimlet_data WHERE id = ANY(ids);
  INSERT INTO gimlet_marks (id, ended_until)
    SELECT DISTINCT ON (e.id) e.id, e.until FROM unnest(ids, untils) AS e(id, until)
    ON CONFLICT (id) DO UPDATE SET ended_until = EXCLUDED.ended_until,
                                   forward = NULL, forward_until = NULL;
  IF who IS NOT NULL THEN
    DELETE FROM gimlet_users WHERE uh = who AND id = ANY(ids);
  END IF;
END
$fn$;

-- One bounded cleanup batch: expired sessions with their keys, marks past
-- their time, users' index entries past their session's expiry. Sessions
-- being written are skipped (their writer has them locked). Returns the
-- sessions deleted.
CREATE OR REPLACE FUNCTION gimlet_cleanup_v1(lim int) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
  t bigint := gimlet_now();
  n bigint;
BEGIN
  WITH gone AS (
    DELETE FROM gimlet_sessions WHERE id IN (
      SELECT id FROM gimlet_sessions WHERE expires <= t
        ORDER BY expires LIMIT lim FOR UPDATE SKIP LOCKED)
    RETURNING id
  ), keys AS (
    DELETE FROM gimlet_data WHERE id IN (SELECT id FROM gone)
  )
  SELECT count(*) INTO n FROM gone;
  DELETE FROM gimlet_marks WHERE id IN (
    SELECT id FROM gimlet_marks
      WHERE greatest(coalesce(ended_until, 0), coalesce(forward_until, 0)) <= t LIMIT lim);
  DELETE FROM gimlet_users WHERE (uh, id) IN (
    SELECT uh, id FROM gimlet_users WHERE expires <= t LIMIT lim);
  RETURN n;
END
$fn$;

COMMIT;
"#####;

/// A read: the asked channels' keys of a live session, then one row of
/// marks (`ch` -1: ended, forward).
const LOAD: &str = "\
SELECT d.ch, d.name, d.value FROM gimlet_sessions s JOIN gimlet_data d ON d.id = s.id \
 WHERE s.id = $1 AND s.expires > gimlet_now() AND d.ch = ANY($2) \
UNION ALL \
SELECT -1::smallint, CASE WHEN m.ended_until > gimlet_now() THEN '1' END, \
       CASE WHEN m.forward_until > gimlet_now() THEN m.forward END \
 FROM gimlet_marks m WHERE m.id = $1 AND $3";

const WRITE: &str = "SELECT gimlet_write_v1($1::jsonb)";

pub struct SqlStore {
    opts: SqlOptions,
    connect: PgConnectOptions,
    timeout: Duration,
    /// The pool and its generation. Replaced after a connection error: a
    /// server that restarted left every pooled connection dead, and a pool
    /// that tested each before use would pay a round trip per request.
    pool: std::sync::RwLock<Option<(u64, PgPool)>>,
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
        // Class 08 (connection exception) and 57P (the server shut down).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::PoolTimedOut => StoreError::Timeout,
        sqlx::Error::Database(d) => StoreError::Unavailable(format!("sql: {}", d.message())),
        e => StoreError::Unavailable(format!("sql: {e}")),
    }
}

/// Parse a `store.url`; the error never repeats the URL (it holds the
/// password).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(
            if url.starts_with("mysql://") || url.starts_with("mariadb://") {
                "MySQL and MariaDB are not supported yet: expected a postgres:// URL".into()
            } else {
                "expected a postgres:// or postgresql:// URL".into()
            },
        );
    }
    PgConnectOptions::from_str(url).map_err(|e| {
        // sqlx's message names the part that is wrong, not the value.
        let e = e.to_string();
        format!("invalid PostgreSQL URL: {}", e.replace(url, "<url>"))
    })
}

impl SqlStore {
    /// Validate the URL now; connect on first use (inside a runtime).
    pub fn new(opts: SqlOptions, timeout: Duration) -> Result<SqlStore, String> {
        let connect = connect_options(&opts.url).map_err(|e| format!("store.url: {e}"))?;
        Ok(SqlStore {
            opts,
            connect: connect.application_name("gimlet"),
            timeout,
            pool: std::sync::RwLock::new(None),
            generation: Default::default(),
            schema: OnceCell::new(),
        })
    }

    pub fn cleanup_interval(&self) -> Duration {
        self.opts.cleanup_interval
    }

    /// The pool (made on first use, inside a runtime), with the schema
    /// made first when `create_schema` says so.
    async fn pool(&self) -> Result<(u64, PgPool), StoreError> {
        let current = self.pool.read().expect("not poisoned").clone();
        let (generation, pool) = match current {
            Some(p) => p,
            None => {
                let mut w = self.pool.write().expect("not poisoned");
                w.get_or_insert_with(|| {
                    let g = self
                        .generation
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let pool = PgPoolOptions::new()
                        .max_connections(self.opts.pool)
                        .min_connections(0)
                        .acquire_timeout(self.timeout)
                        .idle_timeout(Duration::from_secs(300))
                        .test_before_acquire(false)
                        .connect_lazy_with(self.connect.clone());
                    (g, pool)
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
                tokio::spawn(async move { old.close().await });
            }
        }
    }

    /// Run `f` on the pool; after a connection error, once more on a fresh
    /// pool when `retry` (reads: running them twice is harmless). The outer
    /// error: no pool (the schema could not be made); the inner: the
    /// statement's.
    async fn run<T, F, Fut>(&self, retry: bool, f: F) -> Result<Result<T, sqlx::Error>, StoreError>
    where
        F: Fn(PgPool) -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let (generation, pool) = self.pool().await?;
        match f(pool).await {
            Err(e) if connection_lost(&e) => {
                self.lost(generation, &e);
                if !retry {
                    return Ok(Err(e));
                }
                let (generation, pool) = self.pool().await?;
                let r = f(pool).await;
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
            let n: i64 = self
                .run(true, |pool| async move {
                    sqlx::query_scalar("SELECT gimlet_cleanup_v1($1)")
                        .bind(CLEANUP_BATCH)
                        .fetch_one(&pool)
                        .await
                })
                .await?
                .map_err(unavailable)?;
            total += n.max(0) as u64;
            if n < CLEANUP_BATCH as i64 {
                return Ok(total);
            }
        }
    }

    /// The batch as the write function reads it.
    fn batch_json(b: &WriteBatch) -> Value {
        let ch: Vec<Value> = b
            .channels
            .iter()
            .map(|w| {
                if w.is_empty() {
                    Value::Null
                } else {
                    json!({
                        "clear": w.clear,
                        "del": w.delete,
                        "set": w.set,
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
        json!({
            "id": b.key.id.hex(),
            "tag": b.key.tag,
            "exp": b.expire_at,
            "destroy": b.destroy.map(|d| d.id.hex()),
            "rename": b.rename_from.map(|r| r.hex()),
            "carried": b.carried().hex(),
            "donly": b.destroy_only(),
            "ce": b.check_ended && !b.destroy_only(),
            "cm": b.check_moved,
            "ch": ch,
            "lim": b.limits.map(|l| json!([l.max_keys, l.max_bytes, l.client_keys, l.client_bytes])),
            "end": b.end.iter().map(|(id, until)| json!([id.hex(), until])).collect::<Vec<_>>(),
            "fwd": b.forward.as_ref().map(|(c, until)| json!([c, until])),
            "users": users,
        })
    }
}

async fn migrate_pool(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::raw_sql(SCHEMA)
        .execute(pool)
        .await
        .map(|_| ())
        .map_err(|e| match unavailable(e) {
            StoreError::Unavailable(m) => {
                StoreError::Unavailable(format!("{m} (creating the schema)"))
            }
            other => other,
        })
}

/// A refusal the write function raised, as the session core knows it.
fn refusal(b: &WriteBatch, e: &sqlx::Error) -> Option<Refusal> {
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
    let count = || detail.parse::<usize>().unwrap_or(0);
    let limits = b.limits.unwrap_or(super::LimitCheck {
        max_keys: 0,
        max_bytes: 0,
        client_keys: 0,
        client_bytes: 0,
    });
    Some(match d.message() {
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
        let id = key.id.hex();
        let marks = check.ended || check.moved;
        let rows = self
            .run(true, |pool| {
                let (id, chans) = (&id, &chans);
                async move {
                    sqlx::query(LOAD)
                        .bind(id)
                        .bind(chans)
                        .bind(marks)
                        .fetch_all(&pool)
                        .await
                }
            })
            .await?
            .map_err(unavailable)?;
        for &c in &chans {
            out.channels[c as usize] = Some(BTreeMap::new());
        }
        for row in rows {
            let ch: i16 = row.try_get(0).map_err(unavailable)?;
            let name: Option<String> = row.try_get(1).map_err(unavailable)?;
            let value: Option<String> = row.try_get(2).map_err(unavailable)?;
            match ch {
                -1 => {
                    out.ended = check.ended && name.is_some();
                    out.moved = value.filter(|_| check.moved);
                }
                0..=3 => {
                    if let (Some(m), Some(n), Some(v)) =
                        (out.channels[ch as usize].as_mut(), name, value)
                    {
                        m.insert(n, v);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    async fn write(&self, b: &WriteBatch) -> Result<Written, StoreError> {
        let arg = Self::batch_json(b).to_string();
        let sent = self
            .run(false, |pool| {
                let arg = &arg;
                async move {
                    sqlx::query_scalar::<_, Vec<String>>(WRITE)
                        .bind(arg)
                        .fetch_one(&pool)
                        .await
                }
            })
            .await?;
        match sent {
            Ok(evicted) => Ok(Written {
                evicted: evicted
                    .iter()
                    .filter_map(|e| UserSession::decode(e))
                    .collect(),
            }),
            Err(e) => {
                if let Some(r) = refusal(b, &e) {
                    return Err(StoreError::Rejected(r));
                }
                Err(match e {
                    // Sent, and the connection went: applied or not.
                    e if connection_lost(&e) => StoreError::Unknown(format!("sql: {e}")),
                    e => unavailable(e),
                })
            }
        }
    }

    async fn user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        let rows: Vec<String> = self
            .run(true, |pool| async move {
                sqlx::query_scalar(
                    "SELECT g.entry FROM gimlet_users g WHERE g.uh = $1 AND g.expires > gimlet_now() \
                     AND NOT EXISTS (SELECT 1 FROM gimlet_marks m WHERE m.id = g.id \
                                     AND m.ended_until > gimlet_now()) \
                     ORDER BY g.created, g.id",
                )
                .bind(user)
                .fetch_all(&pool)
                .await
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
        let ids: Vec<String> = sessions.iter().map(|(k, _)| k.id.hex()).collect();
        let untils: Vec<i64> = sessions
            .iter()
            .map(|(_, u)| (*u).min(i64::MAX as u64) as i64)
            .collect();
        // Idempotent: ending twice ends the same sessions.
        self.run(true, |pool| {
            let (ids, untils) = (&ids, &untils);
            async move {
                sqlx::query("SELECT gimlet_end_v1($1, $2, $3)")
                    .bind(ids)
                    .bind(untils)
                    .bind(user)
                    .execute(&pool)
                    .await
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
        let (rows, ended) = self
            .run(true, |pool| {
                let hex = &hex;
                async move {
                    let rows = sqlx::query(
                        "SELECT s.tag, s.expires, d.ch, d.name FROM gimlet_sessions s \
                         JOIN gimlet_data d ON d.id = s.id \
                         WHERE s.id = $1 AND s.expires > gimlet_now() ORDER BY d.ch, d.name",
                    )
                    .bind(hex)
                    .fetch_all(&pool)
                    .await?;
                    let ended: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM gimlet_marks \
                         WHERE id = $1 AND ended_until > gimlet_now())",
                    )
                    .bind(hex)
                    .fetch_one(&pool)
                    .await?;
                    Ok((rows, ended))
                }
            })
            .await?
            .map_err(unavailable)?;
        let mut out = Inspected {
            id: id.hex(),
            ended,
            ..Default::default()
        };
        for row in rows {
            let tag: i64 = row.try_get(0).map_err(unavailable)?;
            let expires: i64 = row.try_get(1).map_err(unavailable)?;
            let ch: i16 = row.try_get(2).map_err(unavailable)?;
            let name: String = row.try_get(3).map_err(unavailable)?;
            out.tag = tag as u32;
            out.data_expires = Some(expires.max(0) as u64);
            if let Some(c) = CHANNELS.get(ch as usize) {
                out.keys.entry(c.store_suffix()).or_default().push(name);
            }
        }
        Ok((ended || !out.keys.is_empty()).then_some(out))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(true, |pool| async move {
            sqlx::query("SELECT 1").execute(&pool).await.map(|_| ())
        })
        .await?
        .map_err(unavailable)
    }
}
