//! The file as written: serde structs with `deny_unknown_fields`, every
//! string kept raw until `${VAR}` expansion.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

pub(super) type Str = String;

/// `read:` / `write:` as written: `all`, `none`, or a list of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum KeySel {
    Word(String),
    List(Vec<String>),
}

impl schemars::JsonSchema for KeySel {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "KeySelection".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`all`, `none`, or a list of keys",
            "anyOf": [
                { "type": "string", "enum": ["all", "none"] },
                { "type": "array", "items": { "type": "string" } }
            ]
        })
    }
}

impl<'de> Deserialize<'de> for KeySel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeySel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all`, `none`, or a list of keys")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeySel, E> {
                Ok(KeySel::Word(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<KeySel, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = seq.next_element::<String>()? {
                    keys.push(k);
                }
                Ok(KeySel::List(keys))
            }
        }
        d.deserialize_any(V)
    }
}

/// A key policy as written under `session.keys` / `undeclared_keys`.
#[derive(schemars::JsonSchema, Deserialize, Clone, Copy, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) clientside: Option<bool>,
    pub(super) permanent: Option<bool>,
    pub(super) secure: Option<bool>,
}

/// `undeclared_keys`: `reject` or a policy.
#[derive(Clone, Copy, Debug)]
pub(super) enum Undeclared {
    Reject,
    Policy(RawPolicy),
}

impl schemars::JsonSchema for Undeclared {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UndeclaredKeys".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let policy = g.subschema_for::<RawPolicy>();
        schemars::json_schema!({
            "description": "`reject`, or the policy undeclared keys get",
            "anyOf": [ { "type": "string", "enum": ["reject"] }, policy ]
        })
    }
}

impl<'de> Deserialize<'de> for Undeclared {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Undeclared;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`reject` or {clientside, permanent, secure}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Undeclared, E> {
                if v == "reject" {
                    Ok(Undeclared::Reject)
                } else {
                    Err(E::custom(format!(
                        "expected `reject` or a mapping {{clientside, permanent, secure}}, found `{v}`"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Undeclared, A::Error> {
                RawPolicy::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(Undeclared::Policy)
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// The file as written.

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<Vec<RawListener>>,
    pub(super) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<Str>,
    #[serde(default)]
    pub(super) log: RawLog,
    pub(super) session: RawSession,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) paths: RawPaths,
    #[serde(default)]
    pub(super) tracing: RawTracing,
    pub(super) routes: Vec<RawRoute>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    /// Export request spans over OTLP/HTTP (protobuf) to a collector.
    pub(super) otlp: Option<RawOtlp>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOtlp {
    /// The collector's base URL (`http://collector:4318`); `/v1/traces` is
    /// appended unless the URL has a path.
    pub(super) endpoint: Str,
    /// The share of requests traced, 0 to 1 (default 1).
    pub(super) sample_ratio: Option<f64>,
    /// `service.name` of the spans (default `gimlet`).
    pub(super) service_name: Option<Str>,
    /// Headers sent with every export (`${ENV}` / `file:` like secrets).
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Str>,
    /// How long one export may take (default 10s).
    pub(super) timeout: Option<Str>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPaths {
    pub(super) escaped_separators: Option<Str>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) addr: Str,
    pub(super) tls: Option<RawTls>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: Str,
    pub(super) key: Str,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSql {
    /// How often expired sessions are deleted (default `1m`).
    pub(super) cleanup_interval: Option<Str>,
    /// Create the tables and functions at the first connection when
    /// missing (default true; otherwise `gimlet migrate -c FILE`).
    pub(super) create_schema: Option<bool>,
    /// Connections per gateway process (default 16).
    pub(super) pool: Option<u32>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSentinel {
    /// The monitored master's name (`sentinel monitor NAME ...`).
    pub(super) master: Str,
    /// Sentinel URLs, `redis://host:26379` (userinfo: the sentinels' auth).
    pub(super) nodes: Vec<Str>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedisTls {
    /// PEM file of the CA that signed the server's certificate (default:
    /// the system's roots).
    pub(super) ca: Option<Str>,
    /// PEM client certificate (with `key`) for servers that ask for one
    /// (`tls-auth-clients`).
    pub(super) cert: Option<Str>,
    pub(super) key: Option<Str>,
    /// Accept any server certificate. Testing only: anyone on the path can
    /// read and change every session.
    pub(super) insecure_skip_verify: Option<bool>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) addr: Str,
    /// Turns on the session admin API (`${ENV}` / `file:` like secrets).
    pub(super) token: Option<Str>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<Str>,
    pub(super) level: Option<Str>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSession {
    pub(super) secrets: Vec<Str>,
    #[serde(default = "yes")]
    pub(super) encrypt: bool,
    #[serde(default)]
    pub(super) cookie: RawCookie,
    pub(super) lifetime: Option<Str>,
    pub(super) idle_timeout: Option<Str>,
    pub(super) touch_interval: Option<Str>,
    pub(super) undeclared_keys: Option<Undeclared>,
    #[serde(default)]
    pub(super) keys: BTreeMap<String, RawPolicy>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) dev_insecure: bool,
    #[serde(default)]
    pub(super) revocation: bool,
    pub(super) regenerate_grace: Option<Str>,
    pub(super) user_key: Option<String>,
    pub(super) max_per_user: Option<usize>,
    #[serde(default)]
    pub(super) track: Vec<Track>,
}

/// What `session.track` may record per session in its user's index.
#[derive(schemars::JsonSchema, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub(super) enum Track {
    Ip,
    UserAgent,
}

pub(super) fn yes() -> bool {
    true
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCookie {
    pub(super) name: Option<Str>,
    pub(super) path: Option<Str>,
    pub(super) domain: Option<Str>,
    pub(super) same_site: Option<Str>,
    pub(super) secure: Option<Str>,
    #[serde(default)]
    pub(super) host_prefix: bool,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) value_bytes: Option<usize>,
    pub(super) keys: Option<usize>,
    pub(super) session_bytes: Option<usize>,
    pub(super) forward_bytes: Option<usize>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) kind: Option<Str>,
    pub(super) path: Option<Str>,
    pub(super) url: Option<Str>,
    pub(super) cluster: Option<Vec<Str>>,
    pub(super) prefix: Option<Str>,
    /// Redis ACL user (`${ENV}` / `file:` like secrets).
    pub(super) username: Option<Str>,
    /// Redis password (`requirepass`, or the ACL user's; `${ENV}` /
    /// `file:` like secrets).
    pub(super) password: Option<Str>,
    /// TLS to Redis (`rediss://` URLs): a private CA, a client certificate.
    pub(super) tls: Option<RawRedisTls>,
    /// Find the master through Redis Sentinel (instead of `url`).
    pub(super) sentinel: Option<RawSentinel>,
    /// `kind: sql` options.
    pub(super) sql: Option<RawSql>,
    pub(super) cache: Option<usize>,
    pub(super) timeout: Option<Str>,
    pub(super) on_error: Option<Str>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) threads: Option<usize>,
    pub(super) grace_period: Option<Str>,
    /// How long a client has to send a whole request header.
    pub(super) header_timeout: Option<Str>,
    /// How long a connection may stay silent between requests.
    pub(super) keepalive_timeout: Option<Str>,
    /// Client connections served at once; past it, `503`.
    pub(super) max_connections: Option<usize>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Str,
    #[serde(rename = "match", default)]
    pub(super) matches: RawMatch,
    pub(super) upstreams: Vec<Str>,
    #[serde(default)]
    pub(super) session: RawRouteSession,
    pub(super) on_directive_error: Option<Str>,
    pub(super) connect_timeout: Option<Str>,
    pub(super) read_timeout: Option<Str>,
    /// Add a `Server-Timing` header saying what the gateway did (README,
    /// "Server-Timing"); off by default, it shows key names and timings.
    #[serde(default)]
    pub(super) server_timing: bool,
    /// TLS to the upstreams (implied by `https://` upstreams): a private
    /// CA, a client certificate, the name to verify.
    pub(super) upstream_tls: Option<RawUpstreamTls>,
    /// Offer HTTP/2 to the upstreams (ALPN over TLS; prior knowledge over
    /// plain TCP).
    pub(super) upstream_h2: Option<bool>,
    /// How a request picks an upstream: round_robin (default), least_conn,
    /// or sticky (one session, one upstream).
    pub(super) selection: Option<Str>,
    /// Active health checks and passive ejection of the upstreams.
    pub(super) health_check: Option<RawHealthCheck>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    /// Probe each upstream with a TCP connect.
    pub(super) tcp: Option<bool>,
    /// Probe each upstream with `GET path` (over TLS for https://
    /// upstreams), expecting `expect`.
    pub(super) path: Option<Str>,
    /// The probe's expected status (default 200).
    pub(super) expect: Option<u16>,
    /// The probe's Host header (default: the upstream's host:port).
    pub(super) host: Option<Str>,
    /// How often each upstream is probed (default 5s).
    pub(super) interval: Option<Str>,
    /// One probe's time limit (default 1s).
    pub(super) timeout: Option<Str>,
    /// How long an upstream that failed a connection is skipped (default 10s).
    pub(super) eject_for: Option<Str>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    /// PEM file of the CA(s) that sign the upstreams' certificates
    /// (default: the system's roots).
    pub(super) ca: Option<Str>,
    /// PEM client certificate (chain) and key, for upstreams that ask.
    pub(super) cert: Option<Str>,
    pub(super) key: Option<Str>,
    /// The name sent in SNI and verified (default: each upstream's host).
    pub(super) sni: Option<Str>,
    /// Verify the upstream's certificate and name (default true).
    pub(super) verify: Option<bool>,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    pub(super) host: Option<Str>,
    pub(super) path_prefix: Option<Str>,
    #[serde(default)]
    pub(super) ignore_case: bool,
}

#[derive(schemars::JsonSchema, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteSession {
    pub(super) read: Option<KeySel>,
    pub(super) write: Option<KeySel>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Str>,
    #[serde(default)]
    pub(super) require: Vec<Str>,
    pub(super) on_missing: Option<RawOnMissing>,
}

#[derive(schemars::JsonSchema, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOnMissing {
    pub(super) redirect: Option<Str>,
    pub(super) status: Option<u16>,
}
