//! `gimlet check --print`: the effective config, after defaults and `${}`
//! expansion, with every secret (session secrets, the admin token, a Redis
//! URL's password) redacted.

use super::{Config, StoreKind};
use crate::model::{KeySet, OnDirectiveError, OnError, OnMissing, Policy, CHANNELS};
use serde_json::{json, Value};
use std::time::Duration;

const REDACTED: &str = "<redacted>";

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn ms(v: u64) -> String {
    dur(Duration::from_millis(v))
}

fn keys(k: &KeySet) -> Value {
    match k {
        KeySet::All => "all".into(),
        KeySet::None => "none".into(),
        KeySet::Only(v) => json!(v),
    }
}

fn policy(p: &Policy) -> Value {
    json!({ "clientside": p.clientside, "permanent": p.permanent, "secure": p.secure })
}

/// A Redis URL without its password.
fn url(u: &str) -> String {
    // A password may also ride in the query (`?password=`, libpq style).
    if let Some(q) = u.find('?') {
        let (base, query) = (&u[..q], &u[q + 1..]);
        let query: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}={REDACTED}"),
                _ => p.to_string(),
            })
            .collect();
        return format!("{}?{}", url(base), query.join("&"));
    }
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &u[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') {
                format!("{user}:{REDACTED}")
            } else {
                REDACTED.to_string()
            };
            format!("{}{hidden}{}", &u[..s + 3], &u[at..])
        }
        _ => u.to_string(),
    }
}

impl Config {
    /// The effective config as YAML.
    pub fn effective(&self) -> String {
        let s = &self.session;
        let st = &s.settings;
        let c = &s.cookie;
        let names: Vec<&str> = CHANNELS.iter().map(|ch| c.name(*ch)).collect();
        let mut declared: Vec<(&String, &Policy)> = st.policies.declared.iter().collect();
        declared.sort_by(|a, b| a.0.cmp(b.0));
        let store = match &self.store.kind {
            StoreKind::None => json!({ "kind": "none" }),
            StoreKind::Memory => json!({ "kind": "memory" }),
            StoreKind::Embedded(o) => {
                json!({ "kind": "embedded", "path": o.path, "cache": o.cache })
            }
            StoreKind::Redis(o) => json!({
                "kind": "redis",
                "url": o.url.as_deref().map(url),
                "cluster": o.cluster.iter().map(|u| url(u)).collect::<Vec<_>>(),
                "prefix": o.prefix,
                "sentinel": o.sentinel.as_ref().map(|t| json!({
                    "master": t.master,
                    "nodes": t.nodes.iter().map(|u| url(u)).collect::<Vec<_>>(),
                })),
                "username": o.username,
                "password": o.password.as_ref().map(|_| REDACTED),
                "tls": o.tls.as_ref().map(|t| json!({
                    "ca": if t.ca.is_some() { "given" } else { "system roots" },
                    "client_certificate": t.client.is_some(),
                    "insecure_skip_verify": t.insecure_skip_verify,
                })),
            }),
            StoreKind::Sql(o) => json!({
                "kind": "sql",
                "url": url(&o.url),
                "sql": {
                    "cleanup_interval": dur(o.cleanup_interval),
                    "create_schema": o.create_schema,
                    "pool": o.pool,
                },
            }),
        };
        let mut store = store;
        store["timeout"] = dur(self.store.timeout).into();
        store["on_error"] = match self.store.on_error {
            OnError::Fail => "fail",
            OnError::Degrade => "degrade",
        }
        .into();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "match": { "host": r.host, "path_prefix": r.path_prefix, "ignore_case": r.ignore_case },
                    "upstreams": r.upstreams.iter().map(|u| if r.tls.is_some() { format!("https://{u}") } else { u.clone() }).collect::<Vec<_>>(),
                    "upstream_tls": r.tls.as_ref().map(|t| json!({
                        "ca": if t.ca.is_some() { "given" } else { "system roots" },
                        "client_certificate": t.client.is_some(),
                        "sni": t.sni,
                        "verify": t.verify,
                    })),
                    "upstream_h2": r.h2,
                    "selection": r.selection.label(),
                    "health_check": {
                        "probe": match &r.health.probe {
                            None => json!(null),
                            Some(crate::config::Probe::Tcp) => json!({ "tcp": true }),
                            Some(crate::config::Probe::Http { path, expect, host }) => json!({ "path": path, "expect": expect, "host": host }),
                        },
                        "interval": dur(r.health.interval),
                        "timeout": dur(r.health.timeout),
                        "eject_for": dur(r.health.eject_for),
                    },
                    "session": {
                        "read": keys(&r.read),
                        "write": keys(&r.write),
                        "headers": r.headers.iter().map(|(h, k)| (h.clone(), json!(k))).collect::<serde_json::Map<_, _>>(),
                        "require": r.require,
                        "on_missing": match &r.on_missing {
                            OnMissing::Status(code) => json!({ "status": code }),
                            OnMissing::Redirect(to) => json!({ "redirect": to }),
                        },
                    },
                    "on_directive_error": match r.on_directive_error {
                        OnDirectiveError::Reject => "reject",
                        OnDirectiveError::Ignore => "ignore",
                    },
                    "connect_timeout": dur(r.connect_timeout),
                    "read_timeout": dur(r.read_timeout),
                    "server_timing": r.server_timing,
                })
            })
            .collect();
        let users = st.users.as_ref();
        let mut track = Vec::new();
        if users.is_some_and(|u| u.track_ip) {
            track.push("ip");
        }
        if users.is_some_and(|u| u.track_user_agent) {
            track.push("user_agent");
        }
        let v = json!({
            "listen": self.listen.iter().map(|l| json!({
                "addr": l.addr.to_string(),
                "tls": l.tls.as_ref().map(|t| json!({ "cert": t.cert, "key": t.key })),
            })).collect::<Vec<_>>(),
            "admin": self.admin.map(|a| json!({
                "addr": a.to_string(),
                "token": self.admin_token.as_ref().map(|_| REDACTED),
            })),
            "trusted_proxies": self.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "log": { "format": format!("{:?}", self.log.format).to_lowercase(), "level": self.log.level },
            "session": {
                "secrets": vec![REDACTED; s.secrets.len()],
                "encrypt": s.encrypt,
                "cookie": {
                    "names": names,
                    "path": c.path,
                    "domain": c.domain,
                    "same_site": format!("{:?}", c.same_site).to_lowercase(),
                    "secure": format!("{:?}", c.secure).to_lowercase(),
                    "host_prefix": c.host_prefix,
                },
                "lifetime": ms(st.lifetime),
                "idle_timeout": st.idle_timeout.map(ms),
                "touch_interval": ms(st.touch_interval),
                "undeclared_keys": st.policies.undeclared.as_ref().map_or(json!("reject"), policy),
                "keys": declared.into_iter().map(|(k, p)| (k.clone(), policy(p))).collect::<serde_json::Map<_, _>>(),
                "limits": {
                    "value_bytes": st.limits.value_bytes,
                    "keys": st.limits.keys,
                    "session_bytes": st.limits.session_bytes,
                    "forward_bytes": st.limits.forward_bytes,
                },
                "dev_insecure": st.dev_insecure,
                "revocation": st.revocation,
                "regenerate_grace": ms(st.regenerate_grace),
                "user_key": users.map(|u| u.key.clone()),
                "max_per_user": users.and_then(|u| u.max_per_user),
                "track": track,
            },
            "store": store,
            "server": {
                "threads": self.server.threads,
                "grace_period": dur(self.server.grace_period),
                "header_timeout": dur(self.server.header_timeout),
                "keepalive_timeout": dur(self.server.keepalive_timeout),
                "max_connections": self.server.max_connections,
            },
            "paths": { "escaped_separators": if self.paths.keep_escaped_separators { "keep" } else { "reject" } },
            "tracing": { "otlp": self.tracing.as_ref().map(|o| json!({
                "endpoint": url(&o.endpoint),
                "sample_ratio": o.sample_ratio,
                "service_name": o.service_name,
                "headers": o.headers.iter().map(|(h, _)| (h.clone(), json!(REDACTED))).collect::<serde_json::Map<_, _>>(),
                "timeout": dur(o.timeout),
            })) },
            "routes": routes,
        });
        serde_yaml::to_string(&v).expect("plain data serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_are_redacted() {
        assert_eq!(url("redis://:pw@h:6379/0"), "redis://:<redacted>@h:6379/0");
        assert_eq!(url("rediss://u:pw@h"), "rediss://u:<redacted>@h");
        assert_eq!(url("redis://tok@h"), "redis://<redacted>@h");
        assert_eq!(url("redis://h:1"), "redis://h:1");
        assert_eq!(
            url("postgres://u:pw@h/db?sslmode=require&password=pw2"),
            "postgres://u:<redacted>@h/db?sslmode=require&password=<redacted>"
        );
    }
}
