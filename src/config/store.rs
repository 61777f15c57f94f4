//! `store:`: the backend and its options.

use super::defaults;
use super::errors::Errors;
use super::raw::*;
use super::source::resolve;
use super::{StoreConfig, StoreKind};
use crate::model::OnError;
use crate::store::embedded::EmbeddedOptions;
use crate::store::redis::RedisOptions;
use std::path::Path;

pub(super) fn build_store(raw: &RawStore, base: &Path, e: &mut Errors) -> StoreConfig {
    let kind_name = e.choice(
        "store.kind",
        &raw.kind,
        &["embedded", "memory", "redis", "none"],
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
    if kind_name != "redis" {
        only(e, "url", raw.url.is_some(), "redis");
        only(e, "cluster", raw.cluster.is_some(), "redis");
        only(e, "prefix", raw.prefix.is_some(), "redis");
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
        _ => {
            let url = e.opt_text("store.url", &raw.url);
            let cluster: Vec<String> = raw
                .cluster
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, u)| e.text(&format!("store.cluster[{i}]"), u))
                .collect();
            match (&url, cluster.is_empty()) {
                (None, true) => e.add(
                    "store",
                    "kind: redis needs `url` (standalone) or `cluster` (node URLs)",
                ),
                (Some(_), false) => {
                    e.add("store.cluster", "give either `url` or `cluster`, not both")
                }
                _ => {}
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
            StoreKind::Redis(RedisOptions {
                url,
                cluster,
                prefix,
            })
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
