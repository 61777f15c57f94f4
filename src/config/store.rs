//! `store:`: the backend and its options.

use super::defaults;
use super::errors::Errors;
use super::raw::*;
use super::session::read_secret;
use super::source::resolve;
use super::{StoreConfig, StoreKind};
use crate::model::OnError;
use crate::store::embedded::EmbeddedOptions;
use crate::store::redis::{RedisOptions, RedisTls, SentinelOptions};
use crate::store::sql::SqlOptions;
use std::path::Path;

pub(super) fn build_store(raw: &RawStore, base: &Path, e: &mut Errors) -> StoreConfig {
    let kind_name = e.choice(
        "store.kind",
        &raw.kind,
        &["embedded", "memory", "redis", "sql", "none"],
    );
    let only = |e: &mut Errors, field: &str, set: bool, kinds: &str| {
        if set {
            e.add(
                format!("store.{field}"),
                format!("only used with kind: {kinds}"),
            );
        }
    };
    if kind_name != "embedded" {
        only(e, "path", raw.path.is_some(), "embedded");
        only(e, "cache", raw.cache.is_some(), "embedded");
    }
    if kind_name != "redis" && kind_name != "sql" {
        only(e, "url", raw.url.is_some(), "redis or sql");
    }
    if kind_name != "sql" {
        only(e, "sql", raw.sql.is_some(), "sql");
    }
    if kind_name != "redis" {
        only(e, "cluster", raw.cluster.is_some(), "redis");
        only(e, "prefix", raw.prefix.is_some(), "redis");
        only(e, "username", raw.username.is_some(), "redis");
        only(e, "password", raw.password.is_some(), "redis");
        only(e, "tls", raw.tls.is_some(), "redis");
        only(e, "sentinel", raw.sentinel.is_some(), "redis");
    }
    let kind = match kind_name {
        "none" => StoreKind::None,
        "memory" => StoreKind::Memory,
        "embedded" => {
            let p = e.opt_text("store.path", &raw.path);
            StoreKind::Embedded(EmbeddedOptions {
                path: resolve(base, p.as_deref().unwrap_or(defaults::EMBEDDED_PATH)),
                cache: raw.cache.unwrap_or(defaults::EMBEDDED_CACHE),
            })
        }
        "sql" => build_sql(raw, base, e),
        _ => {
            let url = e.opt_text("store.url", &raw.url);
            let cluster: Vec<String> = raw
                .cluster
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, u)| e.text(&format!("store.cluster[{i}]"), u))
                .collect();
            let sentinel = raw.sentinel.as_ref().map(|s| SentinelOptions {
                master: e.text("store.sentinel.master", &s.master),
                nodes: s
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, u)| e.text(&format!("store.sentinel.nodes[{i}]"), u))
                    .collect(),
            });
            match (&url, cluster.is_empty(), &sentinel) {
                (None, true, None) => e.add(
                    "store",
                    "kind: redis needs `url` (standalone), `cluster` (node URLs) or `sentinel`",
                ),
                (Some(_), false, _) => {
                    e.add("store.cluster", "give either `url` or `cluster`, not both")
                }
                (Some(_), _, Some(_)) | (_, false, Some(_)) => e.add(
                    "store.sentinel",
                    "give `sentinel` without `url` or `cluster` (the sentinels name the master)",
                ),
                _ => {}
            }
            if let Some(s) = &sentinel {
                if s.master.trim().is_empty() {
                    e.add("store.sentinel.master", "must name the monitored master");
                }
                if s.nodes.is_empty() {
                    e.add("store.sentinel.nodes", "must list at least one sentinel");
                }
            }
            let all: Vec<(String, String)> = url
                .iter()
                .map(|u| ("store.url".to_string(), u.clone()))
                .chain(
                    cluster
                        .iter()
                        .enumerate()
                        .map(|(i, u)| (format!("store.cluster[{i}]"), u.clone())),
                )
                .chain(sentinel.iter().flat_map(|s| {
                    s.nodes
                        .iter()
                        .enumerate()
                        .map(|(i, u)| (format!("store.sentinel.nodes[{i}]"), u.clone()))
                }))
                .collect();
            for (field, u) in all {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    e.add(field, "expected a redis:// or rediss:// URL");
                } else if redis::Client::open(u.as_str()).is_err() {
                    e.add(field, "invalid Redis URL");
                }
            }
            let prefix = e
                .opt_text("store.prefix", &raw.prefix)
                .unwrap_or_else(|| defaults::REDIS_PREFIX.into());
            if prefix.contains(['{', '}']) {
                e.add(
                    "store.prefix",
                    "must not contain `{` or `}` (the gateway adds its own hash tags)",
                );
            }
            let username = raw
                .username
                .as_ref()
                .and_then(|u| read_secret(e, "store.username", u, base));
            let password = raw
                .password
                .as_ref()
                .and_then(|p| read_secret(e, "store.password", p, base));
            if username.is_some() && password.is_none() {
                e.add(
                    "store.username",
                    "needs store.password (an ACL user logs in with both)",
                );
            }
            let tls = raw.tls.as_ref().map(|t| redis_tls(t, base, e));
            let plain = url
                .iter()
                .chain(cluster.iter())
                .any(|u| u.starts_with("redis://"));
            if tls.is_some() && plain {
                e.add(
                    "store.tls",
                    "needs rediss:// URLs (a redis:// URL would connect without TLS)",
                );
            }
            StoreKind::Redis(Box::new(RedisOptions {
                url,
                cluster,
                prefix,
                username,
                password,
                tls,
                sentinel,
            }))
        }
    };
    let timeout = e.duration("store.timeout", &raw.timeout, defaults::STORE_TIMEOUT);
    if timeout.is_zero() {
        e.add("store.timeout", "must be longer than 0");
    }
    let on_error: OnError = e.pick("store.on_error", &raw.on_error);
    StoreConfig {
        kind,
        timeout,
        on_error,
    }
}

/// `kind: sql`: a `postgres://` URL (`${ENV}` or `file:` like secrets: it
/// holds the password) and the `store.sql` section.
fn build_sql(raw: &RawStore, base: &Path, e: &mut Errors) -> StoreKind {
    let url = match &raw.url {
        None => {
            e.add(
                "store.url",
                "kind: sql needs `url` (postgres://user:password@host/db)",
            );
            String::new()
        }
        Some(u) => read_secret(e, "store.url", u, base).unwrap_or_default(),
    };
    if !url.is_empty() {
        if let Err(m) = crate::store::sql::connect_options(&url) {
            e.add("store.url", m);
        }
    }
    let sql = raw.sql.as_ref();
    let none = None;
    let interval = e.duration(
        "store.sql.cleanup_interval",
        sql.map_or(&none, |s| &s.cleanup_interval),
        defaults::SQL_CLEANUP_INTERVAL,
    );
    if interval.is_zero() {
        e.add("store.sql.cleanup_interval", "must be longer than 0");
    }
    let pool = sql.and_then(|s| s.pool).unwrap_or(defaults::SQL_POOL);
    if pool == 0 {
        e.add("store.sql.pool", "must be at least 1");
    }
    StoreKind::Sql(Box::new(SqlOptions {
        url,
        cleanup_interval: interval,
        create_schema: sql.and_then(|s| s.create_schema).unwrap_or(true),
        pool,
    }))
}

/// `store.tls`: the PEM files are read now, so a missing or unreadable one
/// is a startup (or reload) error naming its field.
/// A PEM file named by `field`, read now: a missing or unreadable one is a
/// startup (or reload) error naming the field.
pub(super) fn read_pem(
    e: &mut Errors,
    field: &str,
    raw: &Option<Str>,
    base: &Path,
) -> Option<Vec<u8>> {
    let f = resolve(base, &e.opt_text(field, raw)?);
    match std::fs::read(&f) {
        Ok(b) if b.windows(11).any(|w| w == b"-----BEGIN ") => Some(b),
        Ok(_) => {
            e.add(field, format!("{} is not a PEM file", f.display()));
            None
        }
        Err(err) => {
            e.add(field, format!("cannot read {}: {err}", f.display()));
            None
        }
    }
}

fn redis_tls(t: &RawRedisTls, base: &Path, e: &mut Errors) -> RedisTls {
    let ca = read_pem(e, "store.tls.ca", &t.ca, base);
    let cert = read_pem(e, "store.tls.cert", &t.cert, base);
    let key = read_pem(e, "store.tls.key", &t.key, base);
    let client = match (cert, key, t.cert.is_some(), t.key.is_some()) {
        (Some(c), Some(k), _, _) => Some((c, k)),
        (_, _, true, false) => {
            e.add("store.tls.key", "is needed with store.tls.cert");
            None
        }
        (_, _, false, true) => {
            e.add("store.tls.cert", "is needed with store.tls.key");
            None
        }
        _ => None,
    };
    RedisTls {
        ca,
        client,
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    }
}
