//! `session:`: secrets, the cookie, key policies, lifetimes and limits.

use super::defaults;
use super::errors::Errors;
use super::raw::*;
use super::source::resolve;
use super::{SessionConfig, StoreConfig, StoreKind};
use crate::cookie::{CookieSpec, SameSite, SecureMode};
use crate::model::{valid_key, KeyPolicies, Limits, Policy, Settings};
use std::path::Path;
use std::time::Duration;

pub(super) fn build_session(
    raw: &RawSession,
    store: &StoreConfig,
    base: &Path,
    e: &mut Errors,
) -> SessionConfig {
    let mut secrets = Vec::new();
    if raw.secrets.is_empty() {
        e.add(
            "session.secrets",
            "at least one secret is needed (generate one with `gimlet keygen`)",
        );
    }
    for (i, s) in raw.secrets.iter().enumerate() {
        let field = format!("session.secrets[{i}]");
        let Some(value) = read_secret(e, &field, s, base) else {
            continue;
        };
        // The length is fine to report; the secret never is.
        let n = value.chars().count();
        if n < 32 {
            e.add(
                field,
                format!("secret has {n} characters, at least 32 are needed (generate one with `gimlet keygen`)"),
            );
            continue;
        }
        secrets.push(value);
    }

    let c = &raw.cookie;
    let name = e
        .opt_text("session.cookie.name", &c.name)
        .unwrap_or_else(|| defaults::COOKIE_NAME.into());
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || name.starts_with("__")
    {
        e.add(
            "session.cookie.name",
            format!("`{name}` is not a valid cookie name (letters, digits, `-`, `_`, `.`; no `__` prefix)"),
        );
    }
    let path = e
        .opt_text("session.cookie.path", &c.path)
        .unwrap_or_else(|| defaults::PATH.into());
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b == b';' || b.is_ascii_control() || b == b' ')
    {
        e.add(
            "session.cookie.path",
            "must start with `/` and hold no `;`, spaces or control bytes",
        );
    }
    let domain = e.opt_text("session.cookie.domain", &c.domain);
    if let Some(d) = &domain {
        if d.is_empty()
            || d.bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b == b'.' || b == b'-'))
        {
            e.add(
                "session.cookie.domain",
                format!("`{d}` is not a valid domain"),
            );
        }
    }
    let same_site: SameSite = e.pick("session.cookie.same_site", &c.same_site);
    let secure: SecureMode = e.pick("session.cookie.secure", &c.secure);
    if c.host_prefix {
        // Browsers accept a `__Host-` cookie only with Secure, Path=/ and
        // no Domain; anything else would silently never be stored.
        if secure != SecureMode::Always || raw.dev_insecure {
            e.add(
                "session.cookie.host_prefix",
                "host_prefix: true needs secure: always (and no dev_insecure): browsers drop __Host- cookies without Secure",
            );
        }
        if path != "/" {
            e.add(
                "session.cookie.host_prefix",
                "host_prefix: true needs path: /",
            );
        }
        if domain.is_some() {
            e.add(
                "session.cookie.host_prefix",
                "host_prefix: true cannot be combined with domain:",
            );
        }
    }
    if same_site == SameSite::None && secure != SecureMode::Always && !raw.dev_insecure {
        e.add(
            "session.cookie.same_site",
            "same_site: none needs secure: always (browsers drop SameSite=None cookies without Secure)",
        );
    }

    let has_store = store.kind != StoreKind::None;
    let default_policy = Policy {
        clientside: !has_store,
        permanent: true,
        secure: false,
    };
    let fill = |p: &RawPolicy, d: Policy| Policy {
        clientside: p.clientside.unwrap_or(d.clientside),
        permanent: p.permanent.unwrap_or(d.permanent),
        secure: p.secure.unwrap_or(d.secure),
    };
    let undeclared = match &raw.undeclared_keys {
        None => Some(default_policy),
        Some(Undeclared::Reject) => None,
        Some(Undeclared::Policy(p)) => Some(fill(p, default_policy)),
    };
    if let Some(p) = undeclared {
        if !p.clientside && !has_store {
            e.add(
                "session.undeclared_keys.clientside",
                "server-side keys need a store (store.kind is none)",
            );
        }
        if p.secure && secure == SecureMode::Never {
            e.add(
                "session.undeclared_keys.secure",
                "secure keys cannot work with cookie.secure: never",
            );
        }
    }
    let mut declared = rustc_hash::FxHashMap::default();
    for (k, p) in &raw.keys {
        let field = format!("session.keys.{k}");
        if !valid_key(k) {
            e.add(
                field.clone(),
                format!("invalid key `{k}` ({})", crate::model::KEY_SYNTAX),
            );
        }
        // Fields a declaration leaves out: server-side, permanent, not secure.
        let p = fill(p, Policy::SERVER);
        if !p.clientside && !has_store {
            e.add(
                field.clone(),
                "a server-side key needs a store (store.kind is none); add `clientside: true`",
            );
        }
        if p.secure && secure == SecureMode::Never {
            e.add(
                "session.cookie.secure",
                format!("secure: never contradicts the secure key `{k}`"),
            );
        }
        declared.insert(k.clone(), p);
    }

    let lifetime = e.duration("session.lifetime", &raw.lifetime, defaults::LIFETIME);
    if lifetime.is_zero() {
        e.add("session.lifetime", "must be longer than 0");
    }
    let idle = raw
        .idle_timeout
        .as_ref()
        .map(|_| e.duration("session.idle_timeout", &raw.idle_timeout, Duration::ZERO))
        .filter(|d| !d.is_zero());
    let touch = e.duration(
        "session.touch_interval",
        &raw.touch_interval,
        defaults::TOUCH_INTERVAL,
    );
    if let Some(idle) = idle {
        if touch >= idle {
            e.add(
                "session.touch_interval",
                "must be shorter than session.idle_timeout, or sessions expire before they are touched",
            );
        }
    }

    let grace = e.duration(
        "session.regenerate_grace",
        &raw.regenerate_grace,
        defaults::REGENERATE_GRACE,
    );
    if grace > Duration::from_secs(300) {
        e.add(
            "session.regenerate_grace",
            "must be at most 5m: it is how long a copy of the pre-login cookie keeps working",
        );
    }

    let users = match &raw.user_key {
        Some(k) => {
            if !crate::model::valid_key(k) {
                e.add("session.user_key", "is not a valid key name");
            }
            if !raw.revocation {
                e.add(
                    "session.user_key",
                    "needs session.revocation: true (ending a user's sessions must reach the ones whose keys live in the cookie)",
                );
            }
            if raw.keys.get(k).is_some_and(|p| p.secure == Some(true)) {
                e.add(
                    "session.user_key",
                    "must not be a secure key: whose a session is must be known on plain HTTP requests too",
                );
            }
            if raw.max_per_user == Some(0) {
                e.add("session.max_per_user", "must be at least 1");
            }
            Some(crate::model::UserPolicy {
                key: k.clone(),
                max_per_user: raw.max_per_user,
                track_ip: raw.track.contains(&super::raw::Track::Ip),
                track_user_agent: raw.track.contains(&super::raw::Track::UserAgent),
            })
        }
        None => {
            if raw.max_per_user.is_some() {
                e.add("session.max_per_user", "needs session.user_key");
            }
            if !raw.track.is_empty() {
                e.add("session.track", "needs session.user_key");
            }
            None
        }
    };

    let l = &raw.limits;
    let d = Limits::default();
    let limits = Limits {
        value_bytes: l.value_bytes.unwrap_or(d.value_bytes),
        keys: l.keys.unwrap_or(d.keys),
        session_bytes: l.session_bytes.unwrap_or(d.session_bytes),
        forward_bytes: l.forward_bytes.unwrap_or(d.forward_bytes),
    };
    for (name, v) in [
        ("value_bytes", limits.value_bytes),
        ("keys", limits.keys),
        ("session_bytes", limits.session_bytes),
        ("forward_bytes", limits.forward_bytes),
    ] {
        if v == 0 {
            e.add(format!("session.limits.{name}"), "must be at least 1");
        }
    }
    if raw.revocation && !has_store {
        e.add(
            "session.revocation",
            "revocation needs a store (store.kind is none)",
        );
    }

    let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
    SessionConfig {
        secrets,
        encrypt: raw.encrypt,
        cookie: CookieSpec::new(&name, path, domain, same_site, secure, raw.dev_insecure)
            .with_host_prefix(c.host_prefix),
        settings: Settings {
            policies: KeyPolicies {
                declared,
                undeclared,
                fallback: default_policy,
            },
            limits,
            lifetime: ms(lifetime),
            idle_timeout: idle.map(ms),
            touch_interval: ms(touch),
            has_store,
            dev_insecure: raw.dev_insecure,
            revocation: raw.revocation,
            // Without a store there is nowhere to keep the forward.
            regenerate_grace: if has_store { ms(grace) } else { 0 },
            users,
        },
    }
}

/// A secret as written: `${VAR}` expanded, `file:PATH` read (one trailing
/// newline dropped). `None` after recording why not; the value is never
/// part of an error.
pub(super) fn read_secret(e: &mut Errors, field: &str, raw: &str, base: &Path) -> Option<String> {
    let s = e.text(field, raw);
    match s.strip_prefix("file:") {
        Some(path) => match std::fs::read_to_string(resolve(base, path.trim())) {
            Ok(v) => {
                let v = v.strip_suffix('\n').unwrap_or(&v);
                Some(v.strip_suffix('\r').unwrap_or(v).to_string())
            }
            Err(err) => {
                e.add(
                    field.to_string(),
                    format!("cannot read secret file {}: {err}", path.trim()),
                );
                None
            }
        },
        None => Some(s),
    }
}
