//! `store.kind: redis`: standalone Redis (`url`) or Redis Cluster (`cluster`).
//!
//! Data model: one hash per session channel,
//! `<prefix>{<tag>}:<id>:<channel>` (channel `p`, `t`, `sp`, `st`). The
//! `{tag}` is a random 32-bit hash tag chosen when the session is created and
//! kept across Regenerate, so every key a request touches — the old id's and
//! the new id's — lives in one Cluster slot, and one script can move them.
//! With `session.revocation`, an ended id is a string key
//! `<prefix>{<tag>}:<id>:x` expiring with the session's absolute expiry; a
//! read checks it with `EXISTS` in the same pipeline.
//!
//! The p hash also holds the session's running totals in a field `#` (not a
//! valid key name; reads drop it): the expiry every hash of the session
//! carries, and each channel's key count and bytes. The write script keeps
//! them, so it checks the session limits without listing the session: a
//! write costs the keys it touches (a one-key Set on an existing session is
//! an `HMGET` and an `HSET`, whether the session holds 1 key or 200).
//! Sessions written before the totals existed are counted once, at their
//! next write.
//!
//! I/O budget: a read is one round trip (pipelined `HGETALL`, one per channel
//! the request needs). A write is one `EVALSHA` of [`WRITE_SCRIPT`]: it checks
//! every Incr and the session limits first and only then applies the deletes,
//! sets, increments, Regenerate move and TTL — all or nothing, atomically.
//! (`MULTI`/`EXEC` cannot do this: a failing `HINCRBY` inside a transaction
//! does not undo the commands around it.) A Destroy alone is one `DEL`.
//!
//! Connections are made lazily inside the proxy's runtime, reconnect on
//! their own, and every call is bounded by `store.timeout` by the caller.

use super::{
    Check, Inspected, Read, Refusal, SessionStore, StoreError, StoreKey, UserSession, UserWrite,
    WriteBatch, Written,
};
use crate::model::{Channel, ChannelSet, SessionId, CHANNELS};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::OnceCell;

/// What `store.kind: redis` says (the config layer builds it).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URL (standalone).
    pub url: Option<String>,
    /// Node URLs (Redis Cluster).
    pub cluster: Vec<String>,
    pub prefix: String,
    /// ACL user and password (`store.username` / `store.password`); they
    /// override what a URL says.
    pub username: Option<String>,
    pub password: Option<String>,
    /// `store.tls` (`rediss://` URLs only).
    pub tls: Option<RedisTls>,
    /// `store.sentinel`: find the master through Redis Sentinel.
    pub sentinel: Option<SentinelOptions>,
}

/// `store.sentinel`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SentinelOptions {
    /// The monitored master's name (`sentinel monitor NAME ...`).
    pub master: String,
    /// The sentinels' URLs (`redis://host:26379`; userinfo there is the
    /// sentinels' own auth).
    pub nodes: Vec<String>,
}

/// `store.tls`, its PEM files read.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    /// The CA to verify the server with, instead of the system's roots.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key (PEM).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    pub insecure_skip_verify: bool,
}

/// Never the password, a URL's userinfo or a key.
impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &self.url.as_ref().map(|u| without_userinfo(u)))
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| without_userinfo(u))
                    .collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field(
                "sentinel",
                &self.sentinel.as_ref().map(|t| {
                    (
                        &t.master,
                        t.nodes
                            .iter()
                            .map(|u| without_userinfo(u))
                            .collect::<Vec<_>>(),
                    )
                }),
            )
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "tls",
                &self
                    .tls
                    .as_ref()
                    .map(|t| (t.ca.is_some(), t.client.is_some(), t.insecure_skip_verify)),
            )
            .finish()
    }
}

fn without_userinfo(u: &str) -> String {
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}<redacted>{}", &u[..s + 3], &u[at..]),
        _ => u.to_string(),
    }
}

impl RedisOptions {
    /// One node's connection info: the URL with `username`/`password`
    /// applied (`insecure_skip_verify`: the `#insecure` TLS mode).
    fn connection_info(&self, url: &str) -> redis::RedisResult<redis::ConnectionInfo> {
        use redis::IntoConnectionInfo;
        let insecure = self.tls.as_ref().is_some_and(|t| t.insecure_skip_verify);
        let info = if insecure && !url.contains('#') {
            format!("{url}#insecure").into_connection_info()?
        } else {
            url.into_connection_info()?
        };
        let mut settings = info.redis_settings().clone();
        if let Some(u) = &self.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &self.password {
            settings = settings.set_password(p);
        }
        Ok(info.set_redis_settings(settings))
    }

    /// The PEM files of `store.tls`, as redis-rs takes them.
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        let t = self.tls.as_ref()?;
        Some(redis::TlsCertificates {
            client_tls: t.client.as_ref().map(|(c, k)| redis::ClientTlsConfig {
                client_cert: c.clone(),
                client_key: k.clone(),
            }),
            root_cert: t.ca.clone(),
        })
    }

    /// A client for one standalone server.
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        let info = self.connection_info(url)?;
        match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(info, certs),
            None => redis::Client::open(info),
        }
    }

    /// A client that asks the sentinels for the master, with the master's
    /// user, password and TLS as for `url`.
    fn sentinel_client(&self) -> redis::RedisResult<redis::sentinel::SentinelClient> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        use redis::IntoConnectionInfo;
        let s = self.sentinel.as_ref().expect("sentinel options");
        let nodes = s
            .nodes
            .iter()
            .map(|u| u.as_str().into_connection_info())
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let mut b = SentinelClientBuilder::new(
            nodes.iter().map(|n| n.addr().clone()),
            &s.master,
            SentinelServerType::Master,
        )?;
        if let Some(n) = nodes
            .iter()
            .find(|n| n.redis_settings().password().is_some())
        {
            let r = n.redis_settings();
            if let Some(u) = r.username() {
                b = b.set_client_to_sentinel_username(u);
            }
            b = b.set_client_to_sentinel_password(r.password().unwrap_or_default());
        }
        if let Some(u) = &self.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = &self.password {
            b = b.set_client_to_redis_password(p);
        }
        // TLS to the master with `store.tls`, or when the sentinels
        // themselves are reached over TLS (never the password in the clear
        // to the master then).
        let tls_nodes = nodes
            .iter()
            .any(|n| matches!(n.addr(), redis::ConnectionAddr::TcpTls { .. }));
        if self.tls.is_some() || tls_nodes {
            let insecure = self.tls.as_ref().is_some_and(|t| t.insecure_skip_verify);
            b = b.set_client_to_redis_tls_mode(if insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            });
        }
        if let Some(certs) = self.certificates() {
            if tls_nodes {
                b = b.set_client_to_sentinel_certificates(certs.clone());
            }
            b = b.set_client_to_redis_certificates(certs);
        }
        b.build()
    }

    /// A client for the Cluster.
    fn cluster_builder(&self) -> redis::RedisResult<redis::cluster::ClusterClientBuilder> {
        let nodes = self
            .cluster
            .iter()
            .map(|u| self.connection_info(u))
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let mut b = redis::cluster::ClusterClient::builder(nodes);
        if let Some(u) = &self.username {
            b = b.username(u);
        }
        if let Some(p) = &self.password {
            b = b.password(p);
        }
        if let Some(t) = &self.tls {
            if t.insecure_skip_verify {
                b = b.tls(redis::TlsMode::Insecure);
            }
        }
        if let Some(certs) = self.certificates() {
            b = b.certs(certs);
        }
        Ok(b)
    }
}

/// The atomic write. See the module docs; the argument layout is built by
/// [`script_args`].
pub const WRITE_SCRIPT: &str = r##"
-- KEYS[1..4]: the session's channel hashes (KEYS[1], p, also holds the
-- totals, see step 0); KEYS[5..8]: the old id's
-- (Regenerate source or Destroy target); KEYS[9]: scratch for exact Incr;
-- KEYS[10]: the ended mark of the id the write continues; KEYS[11]: the
-- regenerate-grace forward of the id the request carried; KEYS[12..]: ended
-- marks to set.
-- ARGV[1]: flags ("d" destroy old, "r" move old to new, "e" refuse when
-- KEYS[10] exists, "m" refuse with KEYS[11]'s value when it exists);
-- ARGV[2]: PEXPIREAT ms;
-- ARGV[3..6]: max_keys, max_bytes, client_keys, client_bytes (max_keys -1: no check);
-- ARGV[7..]: per channel: clear, n, deletes..., n, (key value)..., n, (key delta)...;
-- then n, and the PXAT ms of each ended mark; then the forward to set on
-- KEYS[11] and its PXAT ms ("" "": none); then now (ms), n, and n user-index
-- operations (JSON, see USER_LUA) on the keys after the ended marks.
local destroy = string.find(ARGV[1], "d", 1, true) ~= nil
local rename = string.find(ARGV[1], "r", 1, true) ~= nil
local check_moved = string.find(ARGV[1], "m", 1, true) ~= nil
local check_ended = string.find(ARGV[1], "e", 1, true) ~= nil
if check_moved and check_ended then
  -- Both marks are strings: one MGET answers both.
  local v = redis.call("MGET", KEYS[10], KEYS[11])
  if v[2] then return { "moved", v[2] } end
  if v[1] then return { "ended" } end
elseif check_moved then
  local to = redis.call("GET", KEYS[11])
  if to then return { "moved", to } end
elseif check_ended and redis.call("EXISTS", KEYS[10]) == 1 then
  return { "ended" }
end
local at = ARGV[2]
local max_keys = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[4])
local pos = 7
local ops = {}
for c = 1, 4 do
  local op = { clear = ARGV[pos] == "1", del = {}, set = {}, incr = {}, result = {} }
  pos = pos + 1
  local n = tonumber(ARGV[pos]); pos = pos + 1
  for i = 1, n do op.del[i] = ARGV[pos]; pos = pos + 1 end
  n = tonumber(ARGV[pos]); pos = pos + 1
  for i = 1, n do op.set[i] = { ARGV[pos], ARGV[pos + 1] }; pos = pos + 2 end
  n = tonumber(ARGV[pos]); pos = pos + 1
  for i = 1, n do op.incr[i] = { ARGV[pos], ARGV[pos + 1] }; pos = pos + 2 end
  ops[c] = op
end
local ends = {}
local n_end = tonumber(ARGV[pos]); pos = pos + 1
for i = 1, n_end do ends[i] = ARGV[pos]; pos = pos + 1 end
local forward = ARGV[pos]
local forward_until = ARGV[pos + 1]
pos = pos + 2
local now = tonumber(ARGV[pos]); pos = pos + 1
local user_ops = {}
local n_users = tonumber(ARGV[pos]); pos = pos + 1
for i = 1, n_users do user_ops[i] = cjson.decode(ARGV[pos]); pos = pos + 1 end
local function src(c)
  if rename then return KEYS[4 + c] end
  return KEYS[c]
end

-- 0. The session as it is, as far as this write touches it: one HMGET per
-- channel it changes, for the current value of every key it names, and on
-- the p hash also the running totals (field "#", never a session key:
-- "AT K1 B1 K2 B2 K3 B3 K4 B4", the expiry every hash of the session
-- carries and each channel's key count and bytes). So a write costs the
-- keys it touches, whatever the session's size.
local TOTALS = "#"
local own_destroyed = destroy and KEYS[5] == KEYS[1]
local old = { {}, {}, {}, {} }
local n_keys = { 0, 0, 0, 0 }
local n_bytes = { 0, 0, 0, 0 }
local existed = { false, false, false, false }
local tot = false
local was_at = nil
if not own_destroyed then
  for c = 1, 4 do
    local op = ops[c]
    local names = {}
    if not op.clear then
      for _, k in ipairs(op.del) do names[#names + 1] = k end
      for _, kv in ipairs(op.set) do names[#names + 1] = kv[1] end
      for _, kn in ipairs(op.incr) do names[#names + 1] = kn[1] end
    end
    if c == 1 then names[#names + 1] = TOTALS end
    if #names > 0 then
      local vals = redis.call("HMGET", src(c), unpack(names))
      for i = 1, #names do old[c][names[i]] = vals[i] end
    end
  end
  tot = old[1][TOTALS]
  local t = {}
  if tot then
    for x in string.gmatch(tot, "%d+") do t[#t + 1] = tonumber(x) end
  end
  -- HLEN is O(1): a p hash whose field count is not its totals' was
  -- changed by something that does not keep them (a Gimlet from before
  -- the totals, during a rolling upgrade): counted again.
  if #t == 9 and redis.call("HLEN", src(1)) == t[2] + 1 then
    was_at = t[1]
    for c = 1, 4 do
      n_keys[c] = t[2 * c]
      n_bytes[c] = t[2 * c + 1]
      existed[c] = n_keys[c] > 0
    end
    existed[1] = true
  else
    if #t ~= 9 then tot = false end
    if tot or redis.call("EXISTS", src(1), src(2), src(3), src(4)) > 0 then
      -- Written before the totals were kept: counted once, kept from now on.
      for c = 1, 4 do
        -- HKEYS and HVALS list an unchanged hash in the same order.
        local names = redis.call("HKEYS", src(c))
        local vals = redis.call("HVALS", src(c))
        for i = 1, #names do
          if not (c == 1 and names[i] == TOTALS) then
            n_keys[c] = n_keys[c] + 1
            n_bytes[c] = n_bytes[c] + string.len(names[i]) + string.len(vals[i])
          end
        end
        existed[c] = #names > 0
      end
    end
  end
end

local before_keys = { n_keys[1], n_keys[2], n_keys[3], n_keys[4] }

-- 1. Every Incr, computed exactly (64-bit, by Redis itself) before any write.
for c = 1, 4 do
  local op = ops[c]
  if #op.incr > 0 then
    local pending = {}
    for _, kv in ipairs(op.set) do pending[kv[1]] = kv[2] end
    local deleted = {}
    for _, k in ipairs(op.del) do deleted[k] = true end
    for _, kn in ipairs(op.incr) do
      local k = kn[1]
      local cur = op.result[k] or pending[k]
      if cur == nil and not op.clear and not deleted[k] then
        cur = old[c][k]
        if cur == false then cur = nil end
      end
      cur = cur or "0"
      if not string.match(cur, "^%-?%d+$") then return { "not_integer", k } end
      if string.len(cur) <= 15 and string.len(kn[2]) <= 15 then
        -- Both below 2^53: exact in Lua's doubles.
        op.result[k] = string.format("%.0f", tonumber(cur) + tonumber(kn[2]))
      else
        -- Redis' own 64-bit arithmetic, with its overflow check.
        redis.call("SET", KEYS[9], cur)
        local r = redis.pcall("INCRBY", KEYS[9], kn[2])
        local v = redis.call("GET", KEYS[9])
        redis.call("DEL", KEYS[9])
        if type(r) == "table" and r.err then
          if string.find(r.err, "overflow", 1, true) then return { "overflow", k } end
          return { "not_integer", k }
        end
        op.result[k] = v
      end
    end
  end
end

-- 2. The totals after this write (each touched key's old size out, its
-- new size in, in the order step 3 applies them), and the limits over them.
for c = 1, 4 do
  local op = ops[c]
  if op.clear then n_keys[c] = 0; n_bytes[c] = 0 end
  local final = {}
  for _, k in ipairs(op.del) do final[k] = false end
  for _, kv in ipairs(op.set) do final[kv[1]] = kv[2] end
  for k, v in pairs(op.result) do final[k] = v end
  for k, v in pairs(final) do
    local was = not op.clear and old[c][k]
    if was then
      n_keys[c] = n_keys[c] - 1
      n_bytes[c] = n_bytes[c] - string.len(k) - string.len(was)
    end
    if v then
      n_keys[c] = n_keys[c] + 1
      n_bytes[c] = n_bytes[c] + string.len(k) + string.len(v)
    end
  end
end
if max_keys >= 0 then
  local keys = tonumber(ARGV[5])
  local bytes = tonumber(ARGV[6])
  for c = 1, 4 do
    keys = keys + n_keys[c]
    bytes = bytes + n_bytes[c]
  end
  if keys > max_keys then return { "too_many_keys", tostring(keys) } end
  if bytes > max_bytes then return { "session_too_large", tostring(bytes) } end
end

-- 3. Apply. A hash's TTL is set when it is new or the session's expiry
-- moved: every hash of the session carries the expiry in the totals.
if destroy then redis.call("DEL", KEYS[5], KEYS[6], KEYS[7], KEYS[8]) end
local total = n_keys[1] + n_keys[2] + n_keys[3] + n_keys[4]
local moved_at = was_at ~= tonumber(at)
for c = 1, 4 do
  local op = ops[c]
  local k = KEYS[c]
  local here = existed[c]
  if rename and redis.call("EXISTS", KEYS[4 + c]) == 1 then
    redis.call("RENAME", KEYS[4 + c], k)
    here = true
  end
  if here and (op.clear or (c == 1 and total == 0)) then
    -- A session left with no key leaves no hash, not even its totals.
    redis.call("DEL", k)
    here = false
  end
  if here and #op.del > 0 then
    redis.call("HDEL", k, unpack(op.del))
    -- Redis drops a hash with its last field: one the HSET below makes
    -- again is new, and needs its TTL (p keeps its totals field).
    if c ~= 1 then
      local left, gone = before_keys[c], {}
      for _, d in ipairs(op.del) do
        if old[c][d] and not gone[d] then gone[d] = true; left = left - 1 end
      end
      if left <= 0 then here = false end
    end
  end
  local args = {}
  for _, kv in ipairs(op.set) do args[#args + 1] = kv[1]; args[#args + 1] = kv[2] end
  for f, v in pairs(op.result) do args[#args + 1] = f; args[#args + 1] = v end
  local holds = n_keys[c] > 0
  if c == 1 and total > 0 then
    holds = true
    local t = string.format("%.0f %d %d %d %d %d %d %d %d", tonumber(at), n_keys[1], n_bytes[1],
      n_keys[2], n_bytes[2], n_keys[3], n_bytes[3], n_keys[4], n_bytes[4])
    if not here or t ~= tot then args[#args + 1] = TOTALS; args[#args + 1] = t end
  end
  if #args > 0 then redis.call("HSET", k, unpack(args)) end
  if holds and (moved_at or not here) then redis.call("PEXPIREAT", k, at) end
end
for i = 1, #ends do redis.call("SET", KEYS[11 + i], "1", "PXAT", ends[i]) end
if forward ~= "" then redis.call("SET", KEYS[11], forward, "PXAT", forward_until) end
local reply = { "ok" }
for i = 1, #user_ops do
  for _, e in ipairs(user_op(KEYS[11 + #ends + i], user_ops[i], now)) do reply[#reply + 1] = e end
end
return reply
"##;

/// The field of the p hash that holds the session's running totals (see
/// step 0 of [`WRITE_SCRIPT`]); never a session key (`^[A-Za-z0-9_.-]+$`).
pub const TOTALS_FIELD: &str = "#";

/// The suffix of an ended id's mark.
const ENDED_SUFFIX: &str = "x";
/// The suffix of a regenerated id's forward (its new cookies).
const MOVED_SUFFIX: &str = "f";

/// One change to a user's index (a hash `<prefix>u:{<user hash>}`, field
/// id, value the JSON entry), with the reference semantics of
/// [`super::join_index`]. Returns the entries `max` evicted.
pub const USER_LUA: &str = r#"
local function user_op(ukey, op, now)
  local evicted = {}
  if op.op == "leave" then
    redis.call("HDEL", ukey, op.id)
    return evicted
  end
  if op.replaces then redis.call("HDEL", ukey, op.replaces) end
  redis.call("HSET", ukey, op.id, op.entry)
  local all = redis.call("HGETALL", ukey)
  local live = {}
  local last = 0
  for i = 1, #all, 2 do
    local e = cjson.decode(all[i + 1])
    -- Standalone only (op.prefix set): an ended session leaves too; on a
    -- Cluster its mark lives in another slot, and listing filters it.
    local ended = op.prefix and all[i] ~= op.id and redis.call("EXISTS",
      op.prefix .. "{" .. string.format("%08x", e.tag) .. "}:" .. all[i] .. ":x") == 1
    if e.expires <= now or ended then
      redis.call("HDEL", ukey, all[i])
    else
      live[#live + 1] = { all[i], e.created, all[i + 1] }
      if e.expires > last then last = e.expires end
    end
  end
  if op.max and #live > op.max then
    table.sort(live, function(a, b)
      if a[2] ~= b[2] then return a[2] < b[2] end
      return a[1] < b[1]
    end)
    local n = #live
    for i = 1, #live do
      if n <= op.max then break end
      if live[i][1] ~= op.id then
        -- Left in the index until the gateway has ended it.
        evicted[#evicted + 1] = live[i][3]
        n = n - 1
      end
    end
  end
  redis.call("PEXPIREAT", ukey, string.format("%.0f", last))
  return evicted
end
"#;

/// Redis Cluster: a user's index lives in its own slot, so its changes run
/// as this script after the session's write.
const USER_SCRIPT_MAIN: &str = r#"
return user_op(KEYS[1], cjson.decode(ARGV[1]), tonumber(ARGV[2]))
"#;

static SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{USER_LUA}{WRITE_SCRIPT}")));
static USER_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{USER_LUA}{USER_SCRIPT_MAIN}")));

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Run `$body` with `$c` bound to the concrete connection.
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            Conn::Single(mut $c) => $body,
            Conn::Cluster(mut $c) => $body,
        }
    };
}

/// Run an `EVALSHA` of [`SCRIPT`]; when the server does not have the script
/// (a restart, a failover, `SCRIPT FLUSH`), load it and run once more:
/// what `ScriptInvocation::invoke_async` does.
async fn eval_script<C: redis::aio::ConnectionLike>(
    c: &mut C,
    evalsha: &redis::Cmd,
) -> redis::RedisResult<Vec<String>> {
    match evalsha.query_async(c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            SCRIPT.load_async(c).await?;
            evalsha.query_async(c).await
        }
        r => r,
    }
}

pub struct RedisStore {
    cfg: RedisOptions,
    timeout: Duration,
    conn: OnceCell<Conn>,
    /// `store.sentinel`: the master found last (none: ask the sentinels
    /// at the next call), and the client that asks them.
    sentinel: Option<Sentinel>,
}

/// `store.sentinel`: the master found last (none: ask the sentinels at the
/// next call), and one lookup at a time, in its own task, so that a caller
/// cut off by `store.timeout` does not cut off the lookup (a sentinel that
/// drops packets costs its connect timeout on every attempt).
struct Sentinel {
    client: Arc<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    master: Arc<std::sync::RwLock<Option<ConnectionManager>>>,
    looking: Arc<AtomicBool>,
    /// Sent when a lookup ends: its error, or none.
    done: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

/// How long one lookup of the master may take, whatever the callers wait.
const SENTINEL_LOOKUP: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Validate the URLs now; connect on first use (inside a runtime).
    pub fn new(cfg: RedisOptions, timeout: Duration) -> Result<RedisStore, String> {
        if cfg.tls.as_ref().is_some_and(|t| t.insecure_skip_verify) {
            tracing::warn!(
                "store.tls.insecure_skip_verify is on: the Redis server's certificate is not \
                 checked, so anyone on the path can read and change every session"
            );
        }
        let mut sentinel = None;
        if cfg.sentinel.is_some() {
            let client = cfg
                .sentinel_client()
                .map_err(|e| format!("store: invalid Sentinel URL or TLS files: {e}"))?;
            sentinel = Some(Sentinel {
                client: Arc::new(tokio::sync::Mutex::new(client)),
                master: Arc::new(std::sync::RwLock::new(None)),
                looking: Arc::new(AtomicBool::new(false)),
                done: Arc::new(tokio::sync::watch::channel(None).0),
            });
        } else if let Some(u) = &cfg.url {
            cfg.client(u)
                .map_err(|e| format!("store: invalid Redis URL or TLS files: {e}"))?;
        } else {
            cfg.cluster_builder()
                .and_then(|b| b.build())
                .map_err(|e| format!("store: invalid Redis URL or TLS files: {e}"))?;
        }
        Ok(RedisStore {
            cfg,
            timeout,
            conn: OnceCell::new(),
            sentinel,
        })
    }

    /// Standalone and Sentinel: one server, so a user's index changes
    /// inside the session's script.
    fn single_server(&self) -> bool {
        self.cfg.cluster.is_empty()
    }

    fn manager(&self, client: redis::Client) -> Result<ConnectionManager, StoreError> {
        ConnectionManager::new_lazy_with_config(client, manager_config(self.timeout))
            .map_err(unavailable)
    }

    /// Sentinel: the current master's connection, asking the sentinels
    /// when none is known (at start, and after [`RedisStore::failed`]).
    async fn master(&self, st: &Sentinel) -> Result<Conn, StoreError> {
        if let Some(m) = st.master.read().expect("not poisoned").as_ref() {
            return Ok(Conn::Single(m.clone()));
        }
        // Subscribed before the lookup can end, so its end is seen.
        let mut done = st.done.subscribe();
        if !st.looking.swap(true, Ordering::AcqRel) {
            let (client, master, looking, tx) = (
                st.client.clone(),
                st.master.clone(),
                st.looking.clone(),
                st.done.clone(),
            );
            let timeout = self.timeout;
            let name = self
                .cfg
                .sentinel
                .as_ref()
                .map_or(String::new(), |s| s.master.clone());
            tokio::spawn(async move {
                let found = tokio::time::timeout(SENTINEL_LOOKUP, async {
                    client.lock().await.async_get_client().await
                })
                .await;
                let outcome = match found {
                    Ok(Ok(c)) => {
                        match ConnectionManager::new_lazy_with_config(c, manager_config(timeout)) {
                            Ok(m) => {
                                tracing::info!(master = %name, "redis sentinel: connecting to the current master");
                                *master.write().expect("not poisoned") = Some(m);
                                None
                            }
                            Err(e) => Some(format!("redis: {e}")),
                        }
                    }
                    Ok(Err(e)) => Some(format!("redis sentinel: no master found: {e}")),
                    Err(_) => Some(format!(
                        "redis sentinel: no master found within {SENTINEL_LOOKUP:?}"
                    )),
                };
                // Before the news: a caller that comes in between starts
                // another lookup rather than wait for one that has ended.
                looking.store(false, Ordering::Release);
                tx.send_replace(outcome);
            });
        }
        let _ = done.changed().await;
        if let Some(m) = st.master.read().expect("not poisoned").as_ref() {
            return Ok(Conn::Single(m.clone()));
        }
        let why = done.borrow().clone();
        Err(StoreError::Unavailable(
            why.unwrap_or_else(|| "redis sentinel: no master".into()),
        ))
    }

    /// Sentinel: after an error that may mean a failover (the master
    /// unreachable, or demoted to a read-only replica), forget it, so the
    /// next call asks the sentinels.
    fn failed(&self, e: &redis::RedisError) {
        let Some(st) = &self.sentinel else { return };
        let demoted = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
            || e.to_string().contains("READONLY");
        if demoted
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.is_io_error()
            || e.is_timeout()
        {
            *st.master.write().expect("not poisoned") = None;
        }
    }

    /// A failed call's error, after [`RedisStore::failed`].
    fn lost(&self, e: redis::RedisError) -> StoreError {
        self.failed(&e);
        unavailable(e)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        if let Some(s) = &self.sentinel {
            return self.master(s).await;
        }
        self.conn
            .get_or_try_init(|| async {
                if let Some(url) = &self.cfg.url {
                    let client = self.cfg.client(url).map_err(unavailable)?;
                    self.manager(client).map(Conn::Single)
                } else {
                    let client = self
                        .cfg
                        .cluster_builder()
                        .map_err(unavailable)?
                        .connection_timeout(self.timeout)
                        .response_timeout(self.timeout)
                        .retries(3)
                        .min_retry_wait(10)
                        .max_retry_wait(200)
                        .build()
                        .map_err(unavailable)?;
                    client
                        .get_async_connection()
                        .await
                        .map(Conn::Cluster)
                        .map_err(unavailable)
                }
            })
            .await
            .cloned()
    }

    /// `PREFIX{tag}:` (the cluster hash slot is the tag's): built by hand,
    /// since several keys are built per request and `format!` costs about
    /// 1,500 instructions each.
    fn slot_prefix(&self, tag: u32, extra: usize) -> String {
        let mut k = String::with_capacity(self.cfg.prefix.len() + 11 + extra);
        k.push_str(&self.cfg.prefix);
        k.push('{');
        crate::model::push_hex8(&mut k, tag);
        k.push_str("}:");
        k
    }

    /// `PREFIX{tag}:ID:suffix`.
    fn key(&self, tag: u32, id: &SessionId, suffix: &str) -> String {
        let mut k = self.slot_prefix(tag, 33 + suffix.len());
        id.push_hex(&mut k);
        k.push(':');
        k.push_str(suffix);
        k
    }

    fn channel_keys(&self, tag: u32, id: &SessionId) -> [String; 4] {
        CHANNELS.map(|ch| self.key(tag, id, ch.store_suffix()))
    }

    fn ended_key(&self, tag: u32, id: &SessionId) -> String {
        self.key(tag, id, ENDED_SUFFIX)
    }

    /// Add "remember `id` as ended until `until`" to a pipeline.
    fn mark_ended(&self, pipe: &mut redis::Pipeline, tag: u32, id: &SessionId, until: u64) {
        pipe.cmd("SET")
            .arg(self.ended_key(tag, id))
            .arg("1")
            .arg("PXAT")
            .arg(until)
            .ignore();
    }

    fn moved_key(&self, tag: u32, id: &SessionId) -> String {
        self.key(tag, id, MOVED_SUFFIX)
    }

    /// A user's index: its own hash tag, so Cluster spreads users.
    fn user_key(&self, user: &str) -> String {
        format!("{}u:{{{user}}}", self.cfg.prefix)
    }

    /// The session's one store write: [`WRITE_SCRIPT`], with `users`
    /// applied inside it.
    async fn script_write(
        &self,
        conn: &Conn,
        b: &WriteBatch,
        users: &[UserWrite],
    ) -> Result<Written, StoreError> {
        // A Regenerate keeps the tag, and a session created by Destroy + Set
        // inherits it, so the old keys and the new share one slot.
        let old = b
            .rename_from
            .or(b.destroy.map(|d| d.id))
            .unwrap_or(b.key.id);
        debug_assert!(b.destroy.is_none_or(|d| d.tag == b.key.tag));
        let mut keys = Vec::with_capacity(2 * CHANNELS.len() + 3 + b.end.len() + users.len());
        keys.extend(self.channel_keys(b.key.tag, &b.key.id));
        keys.extend(self.channel_keys(b.key.tag, &old));
        let mut incr = self.slot_prefix(b.key.tag, 4);
        incr.push_str("incr");
        keys.push(incr);
        keys.push(self.ended_key(b.key.tag, &b.source()));
        // The forward checked (of the carried id) and set (of a Regenerate's
        // old id, the same one then).
        keys.push(self.moved_key(b.key.tag, &b.carried()));
        for (id, _) in &b.end {
            keys.push(self.ended_key(b.key.tag, id));
        }
        for u in users {
            keys.push(self.user_key(user_of(u)));
        }
        // EVALSHA built here rather than through redis-rs's
        // `ScriptInvocation`, which copies every key and argument a second
        // time to build it (see [`eval_script`]).
        let mut inv = redis::cmd("EVALSHA");
        inv.arg(SCRIPT.get_hash()).arg(keys.len());
        for k in keys {
            inv.arg(k);
        }
        // Inline user operations happen on a single server only.
        for a in script_args(b, users, Some(&self.cfg.prefix)) {
            inv.arg(a);
        }
        let mut reply: Result<Vec<String>, redis::RedisError> =
            with_conn!(conn.clone(), c => eval_script(&mut c, &inv).await);
        if reply.as_ref().is_err_and(|e| retryable(e, true)) {
            // The script never left: once more on the fresh connection.
            reply = with_conn!(conn.clone(), c => eval_script(&mut c, &inv).await);
        }
        while reply.as_ref().is_err_and(loading) {
            tokio::time::sleep(LOADING_PAUSE).await;
            reply = with_conn!(conn.clone(), c => eval_script(&mut c, &inv).await);
        }
        let reply = reply.map_err(|e| {
            self.failed(&e);
            if e.is_timeout() || (e.is_connection_dropped() && !e.is_connection_refusal()) {
                // Sent, and no answer: it may have run.
                StoreError::Unknown(format!("redis: {e}"))
            } else {
                unavailable(e)
            }
        })?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Written {
                evicted: reply[1..]
                    .iter()
                    .filter_map(|e| UserSession::decode(e))
                    .collect(),
            }),
            Some("ended") => Err(StoreError::Rejected(Refusal::Ended)),
            Some("moved") if reply.len() == 2 => {
                Err(StoreError::Rejected(Refusal::Moved(reply[1].clone())))
            }
            Some("not_integer") => Err(StoreError::Rejected(Refusal::NotInteger {
                key: reply[1].clone(),
            })),
            Some("overflow") => Err(StoreError::Rejected(Refusal::Overflow {
                key: reply[1].clone(),
            })),
            Some("too_many_keys") => Err(StoreError::Rejected(Refusal::TooManyKeys {
                keys: reply[1].parse().unwrap_or(0),
                max: b.limits.map_or(0, |l| l.max_keys),
            })),
            Some("session_too_large") => Err(StoreError::Rejected(Refusal::SessionTooLarge {
                bytes: reply[1].parse().unwrap_or(0),
                max: b.limits.map_or(0, |l| l.max_bytes),
            })),
            other => Err(StoreError::Unavailable(format!(
                "redis: unexpected script reply {other:?}"
            ))),
        }
    }

    /// Redis Cluster: one user-index operation as its own script.
    async fn user_script(
        &self,
        conn: &Conn,
        u: &UserWrite,
    ) -> Result<Vec<UserSession>, StoreError> {
        let reply: Vec<String> = with_conn!(conn.clone(), c => USER_SCRIPT
            .key(self.user_key(user_of(u)))
            .arg(user_op_json(u, None))
            .arg(crate::model::now_ms())
            .invoke_async(&mut c)
            .await)
        .map_err(|e| self.lost(e))?;
        Ok(reply
            .iter()
            .filter_map(|e| UserSession::decode(e))
            .collect())
    }

    /// Find a session's hash tag by its id alone (standalone: `SCAN`).
    async fn find_tag(&self, conn: &Conn, id: &SessionId) -> Result<Option<u32>, StoreError> {
        let Conn::Single(c) = conn else {
            return Err(StoreError::Unsupported(
                "on Redis Cluster give ?tag= (GET /sessions?user=... lists it)".into(),
            ));
        };
        let mut c = c.clone();
        let pattern = format!("{}{{*}}:{}:*", self.cfg.prefix, id.hex());
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .map_err(|e| self.lost(e))?;
            for k in keys {
                let tag = k
                    .strip_prefix(&self.cfg.prefix)
                    .and_then(|r| r.strip_prefix('{'))
                    .and_then(|r| r.get(..8))
                    .and_then(|t| u32::from_str_radix(t, 16).ok());
                if tag.is_some() {
                    return Ok(tag);
                }
            }
            if next == 0 {
                return Ok(None);
            }
            cursor = next;
        }
    }

    /// Every key name a session uses (tests and tools).
    pub fn keys_of(&self, key: &StoreKey) -> [String; 4] {
        self.channel_keys(key.tag, &key.id)
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500))
}

/// Worth one more try on a fresh connection: the connection was found dead.
/// A write only when it could not be sent at all (refused): once sent, it
/// may have run, and running it twice would double an Incr.
fn retryable(e: &redis::RedisError, write: bool) -> bool {
    if write {
        e.is_connection_refusal()
    } else {
        e.is_connection_dropped()
    }
}

/// A Redis that restarts answers `LOADING` to everything until its data
/// is back in memory (an AOF of a busy day takes a while). Nothing ran, so
/// a read or a write may wait and go again; the caller's `store.timeout`
/// bounds the waiting (a `/readyz` ping does not wait: not ready is the
/// truth then).
fn loading(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
}

const LOADING_PAUSE: Duration = Duration::from_millis(10);

fn unavailable(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else {
        StoreError::Unavailable(format!("redis: {e}"))
    }
}

/// The script's ARGV for a batch (see the layout in [`WRITE_SCRIPT`]).
/// Public for `fuzz/fuzz_targets/redis_args.rs`, which reads it back the
/// way the script does.
#[doc(hidden)]
pub fn script_args(b: &WriteBatch, users: &[UserWrite], prefix: Option<&str>) -> Vec<String> {
    let mut flags = String::new();
    if b.destroy.is_some() {
        flags.push('d');
    }
    if b.rename_from.is_some() {
        flags.push('r');
    }
    if b.check_ended {
        flags.push('e');
    }
    if b.check_moved {
        flags.push('m');
    }
    let mut a = vec![flags, b.expire_at.to_string()];
    match &b.limits {
        Some(l) => a.extend([
            l.max_keys.to_string(),
            l.max_bytes.to_string(),
            l.client_keys.to_string(),
            l.client_bytes.to_string(),
        ]),
        None => a.extend(["-1", "-1", "0", "0"].map(String::from)),
    }
    for w in &b.channels {
        a.push(if w.clear { "1" } else { "0" }.to_string());
        a.push(w.delete.len().to_string());
        a.extend(w.delete.iter().cloned());
        a.push(w.set.len().to_string());
        for (k, v) in &w.set {
            a.push(k.clone());
            a.push(v.clone());
        }
        a.push(w.incr.len().to_string());
        for (k, n) in &w.incr {
            a.push(k.clone());
            a.push(n.to_string());
        }
    }
    a.push(b.end.len().to_string());
    a.extend(b.end.iter().map(|(_, until)| until.to_string()));
    match &b.forward {
        Some((h, until)) if b.rename_from.is_some() => a.extend([h.clone(), until.to_string()]),
        _ => a.extend([String::new(), String::new()]),
    }
    a.push(crate::model::now_ms().to_string());
    a.push(users.len().to_string());
    a.extend(users.iter().map(|u| user_op_json(u, prefix)));
    a
}

/// A [`UserWrite`] as [`USER_LUA`] reads it (`prefix`: standalone, where
/// the script may also look at ended marks).
fn user_op_json(u: &UserWrite, prefix: Option<&str>) -> String {
    match u {
        UserWrite::Leave { id, .. } => serde_json::json!({ "op": "leave", "id": id.hex() }),
        UserWrite::Join {
            entry,
            replaces,
            max,
            ..
        } => {
            // Absent, not null: Lua's cjson decodes null as a true value.
            let mut o =
                serde_json::json!({ "op": "join", "id": entry.id, "entry": entry.encode() });
            if let Some(p) = prefix {
                o["prefix"] = p.into();
            }
            if let Some(r) = replaces {
                o["replaces"] = r.hex().into();
            }
            if let Some(m) = max {
                o["max"] = (*m).into();
            }
            o
        }
    }
    .to_string()
}

fn user_of(u: &UserWrite) -> &str {
    match u {
        UserWrite::Leave { user, .. } | UserWrite::Join { user, .. } => user,
    }
}

fn parsing(e: redis::ParsingError) -> StoreError {
    StoreError::Unavailable(format!("redis: unexpected reply: {e}"))
}

impl SessionStore for RedisStore {
    async fn load(
        &self,
        key: &StoreKey,
        mask: ChannelSet,
        check: Check,
    ) -> Result<Read, StoreError> {
        let conn = self.conn().await?;
        let mut pipe = redis::pipe();
        if check.ended {
            pipe.exists(self.ended_key(key.tag, &key.id));
        }
        if check.moved {
            pipe.get(self.moved_key(key.tag, &key.id));
        }
        let mut read = Vec::new();
        for ch in CHANNELS {
            if mask.contains(ch) {
                pipe.hgetall(self.key(key.tag, &key.id, ch.store_suffix()));
                read.push(ch);
            }
        }
        let mut out = Read::default();
        if !check.ended && !check.moved && read.is_empty() {
            return Ok(out);
        }
        // A read is idempotent: on a connection found dead (Redis restarted
        // since the last command), once more on the fresh one.
        let mut replies: Result<Vec<redis::Value>, redis::RedisError> =
            with_conn!(conn.clone(), c => pipe.query_async(&mut c).await);
        if replies.as_ref().is_err_and(|e| retryable(e, false)) {
            replies = with_conn!(conn.clone(), c => pipe.query_async(&mut c).await);
        }
        while replies.as_ref().is_err_and(loading) {
            tokio::time::sleep(LOADING_PAUSE).await;
            replies = with_conn!(conn.clone(), c => pipe.query_async(&mut c).await);
        }
        let mut replies = replies.map_err(|e| self.lost(e))?.into_iter();
        if check.ended {
            let v = replies.next().unwrap_or(redis::Value::Nil);
            out.ended = redis::from_redis_value::<bool>(v).map_err(parsing)?;
        }
        if check.moved {
            let v = replies.next().unwrap_or(redis::Value::Nil);
            out.moved = redis::from_redis_value::<Option<String>>(v).map_err(parsing)?;
        }
        for (ch, v) in read.into_iter().zip(replies) {
            let mut m: BTreeMap<String, String> = redis::from_redis_value(v).map_err(parsing)?;
            if ch == Channel::Perm {
                m.remove(TOTALS_FIELD);
            }
            out.channels[ch.index()] = Some(m);
        }
        Ok(out)
    }

    async fn write(&self, b: &WriteBatch) -> Result<Written, StoreError> {
        let conn = self.conn().await?;
        debug_assert!(b
            .end
            .iter()
            .all(|_| b.destroy.is_none_or(|d| d.tag == b.key.tag)));
        // Standalone: the users' indexes change inside the session's script
        // (atomically); Cluster: they live in other slots, so afterwards.
        let (inline, after): (&[UserWrite], &[UserWrite]) = if self.single_server() {
            (&b.users, &[])
        } else {
            (&[], &b.users)
        };
        // Cluster: a Join before the session's write (an index that lists
        // a session too early is harmless; one that misses a live session
        // is not), a Leave after it.
        let mut evicted = Vec::new();
        for u in after.iter().filter(|u| matches!(u, UserWrite::Join { .. })) {
            evicted.extend(self.user_script(&conn, u).await?);
        }
        let mut written = if b.destroy_only() && !b.check_moved && inline.is_empty() {
            let keys = self.channel_keys(b.key.tag, &b.key.id);
            // One slot (one tag): a MULTI, so the logout and its mark land
            // together.
            let mut pipe = redis::pipe();
            pipe.atomic().del(&keys[..]).ignore();
            for (id, until) in &b.end {
                self.mark_ended(&mut pipe, b.key.tag, id, *until);
            }
            with_conn!(conn.clone(), c => pipe.query_async::<()>(&mut c).await)
                .map_err(|e| self.lost(e))?;
            Written::default()
        } else {
            self.script_write(&conn, b, inline).await?
        };
        for u in after
            .iter()
            .filter(|u| matches!(u, UserWrite::Leave { .. }))
        {
            self.user_script(&conn, u).await?;
        }
        written.evicted.extend(evicted);
        Ok(written)
    }

    async fn user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        let conn = self.conn().await?;
        let now = crate::model::now_ms();
        let all: BTreeMap<String, String> = with_conn!(conn.clone(), c => redis::cmd("HGETALL")
            .arg(self.user_key(user))
            .query_async(&mut c)
            .await)
        .map_err(|e| self.lost(e))?;
        let live: Vec<UserSession> = all
            .values()
            .filter_map(|v| UserSession::decode(v))
            .filter(|e| e.expires > now && e.key().is_some())
            .collect();
        if live.is_empty() {
            return Ok(live);
        }
        // Each mark lives in its session's slot: one pipeline on a single
        // server, one command each on a Cluster (an admin path only).
        let marks: Vec<String> = live
            .iter()
            .map(|e| {
                let k = e.key().expect("filtered");
                self.ended_key(k.tag, &k.id)
            })
            .collect();
        let ended: Vec<bool> = match conn {
            Conn::Single(mut c) => {
                let mut pipe = redis::pipe();
                for m in &marks {
                    pipe.exists(m);
                }
                pipe.query_async(&mut c).await.map_err(|e| self.lost(e))?
            }
            Conn::Cluster(mut c) => {
                let mut out = Vec::with_capacity(marks.len());
                for m in &marks {
                    out.push(
                        redis::cmd("EXISTS")
                            .arg(m)
                            .query_async(&mut c)
                            .await
                            .map_err(|e| self.lost(e))?,
                    );
                }
                out
            }
        };
        Ok(live
            .into_iter()
            .zip(ended)
            .filter(|(_, ended)| !ended)
            .map(|(e, _)| e)
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
        let conn = self.conn().await?;
        // Per session, one MULTI in its own slot: its data goes and its id
        // is remembered together. Then the user's index (another slot).
        for (key, until) in sessions {
            let mut keys = self.channel_keys(key.tag, &key.id).to_vec();
            keys.push(self.moved_key(key.tag, &key.id));
            let mut pipe = redis::pipe();
            pipe.atomic().del(keys).ignore();
            self.mark_ended(&mut pipe, key.tag, &key.id, *until);
            with_conn!(conn.clone(), c => pipe.query_async::<()>(&mut c).await)
                .map_err(|e| self.lost(e))?;
        }
        if let Some(u) = user {
            let ids: Vec<String> = sessions.iter().map(|(k, _)| k.id.hex()).collect();
            with_conn!(conn, c => redis::cmd("HDEL").arg(self.user_key(u)).arg(ids).query_async::<()>(&mut c).await)
                .map_err(|e| self.lost(e))?;
        }
        Ok(())
    }

    async fn inspect(
        &self,
        id: &SessionId,
        tag: Option<u32>,
    ) -> Result<Option<Inspected>, StoreError> {
        let conn = self.conn().await?;
        let tag = match tag {
            Some(t) => t,
            None => match self.find_tag(&conn, id).await? {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        let mut pipe = redis::pipe();
        pipe.exists(self.ended_key(tag, id));
        for k in self.channel_keys(tag, id) {
            pipe.hkeys(&k);
            pipe.cmd("PEXPIRETIME").arg(&k);
        }
        let replies: Vec<redis::Value> =
            with_conn!(conn, c => pipe.query_async(&mut c).await).map_err(|e| self.lost(e))?;
        let mut it = replies.into_iter();
        let ended: bool =
            redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil)).map_err(parsing)?;
        let mut out = Inspected {
            id: id.hex(),
            tag,
            ended,
            ..Default::default()
        };
        for ch in CHANNELS {
            let mut names: Vec<String> =
                redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil)).map_err(parsing)?;
            names.retain(|n| n != TOTALS_FIELD);
            let at: i64 =
                redis::from_redis_value(it.next().unwrap_or(redis::Value::Nil)).map_err(parsing)?;
            if !names.is_empty() {
                out.keys.insert(ch.store_suffix(), names);
                if at > 0 {
                    out.data_expires = Some(out.data_expires.unwrap_or(0).max(at as u64));
                }
            }
        }
        Ok((ended || !out.keys.is_empty()).then_some(out))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        let ping = |conn: Conn| async move {
            with_conn!(conn, c => redis::cmd("PING").query_async::<String>(&mut c).await)
        };
        let mut r = ping(conn.clone()).await;
        if r.as_ref().is_err_and(|e| retryable(e, false)) {
            r = ping(conn).await;
        }
        r.map(|_| ()).map_err(|e| self.lost(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChannelWrite;

    #[test]
    fn key_layout_shares_one_hash_tag() {
        let s = RedisStore::new(
            RedisOptions {
                url: Some("redis://127.0.0.1:1".into()),
                cluster: vec![],
                prefix: "gimlet:".into(),
                ..Default::default()
            },
            Duration::from_millis(100),
        )
        .unwrap();
        let id = SessionId([0xab; 16]);
        let keys = s.channel_keys(0x1234, &id);
        assert_eq!(
            keys[0],
            format!("gimlet:{{00001234}}:{}:p", "ab".repeat(16))
        );
        assert!(keys.iter().all(|k| k.contains("{00001234}")));
        // Built by hand now: the same layout `format!` wrote, every key.
        for tag in [0, 0x1234, u32::MAX] {
            let hex = "ab".repeat(16);
            for (k, ch) in s.channel_keys(tag, &id).iter().zip(CHANNELS) {
                assert_eq!(
                    *k,
                    format!("gimlet:{{{tag:08x}}}:{hex}:{}", ch.store_suffix())
                );
            }
            assert_eq!(
                s.ended_key(tag, &id),
                format!("gimlet:{{{tag:08x}}}:{hex}:{ENDED_SUFFIX}")
            );
            assert_eq!(
                s.moved_key(tag, &id),
                format!("gimlet:{{{tag:08x}}}:{hex}:{MOVED_SUFFIX}")
            );
        }
    }

    #[test]
    fn script_argument_layout() {
        let mut b = WriteBatch::new(
            StoreKey {
                id: SessionId([1; 16]),
                tag: 1,
            },
            99,
        );
        b.channels[1] = ChannelWrite {
            clear: true,
            delete: vec!["x".into()],
            set: vec![("a".into(), "1".into())],
            incr: vec![("n".into(), -2)],
        };
        let a = script_args(&b, &[], None);
        assert_eq!(&a[..6], &["", "99", "-1", "-1", "0", "0"]);
        assert_eq!(&a[6..10], &["0", "0", "0", "0"]);
        assert_eq!(
            &a[10..20],
            &["1", "1", "x", "1", "a", "1", "1", "n", "-2", "0"]
        );
        assert_eq!((a.len(), a[27].as_str()), (32, "0"), "no ended marks");
        assert_eq!(&a[28..30], &["", ""], "no forward");
        assert_eq!(a[31], "0", "no user-index operation");
        b.check_ended = true;
        b.end = vec![(SessionId([2; 16]), 77)];
        let leave = UserWrite::Leave {
            user: "u".into(),
            id: SessionId([3; 16]),
        };
        let a = script_args(&b, std::slice::from_ref(&leave), None);
        assert_eq!(a[0], "e");
        assert_eq!(&a[a.len() - 7..a.len() - 3], &["1", "77", "", ""]);
        assert_eq!(a[a.len() - 2], "1");
        let op: serde_json::Value = serde_json::from_str(&a[a.len() - 1]).unwrap();
        assert_eq!(
            op,
            serde_json::json!({ "op": "leave", "id": "03".repeat(16) })
        );
    }
}
