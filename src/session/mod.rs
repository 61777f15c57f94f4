//! The per-request [`Session`]: loaded from cookies and the store
//! ([`read`]), forwarded to the upstream, and updated from the upstream's
//! directives ([`write`]).
//!
//! Nothing here knows about pingora: the proxy hands in header values and gets
//! back header values, so every rule of SPEC sections 1-5 is testable without a
//! server. The shared words (ids, channels, policies) live in
//! [`crate::model`].

mod read;
mod write;

pub use read::{Forward, RequestInfo, StoreRead, UpstreamHeader};
pub use write::{CookieChange, Outcome, WriteContext};

use crate::model::{channel_order, Channel, Flags, Meta, Payload, Rejection, Settings};
use std::collections::BTreeMap;

/// The per-request session: what the cookies said, what the store returned.
#[derive(Debug, Default)]
pub struct Session {
    /// `None`: no session (no valid cookie, or it expired).
    pub meta: Option<Meta>,
    /// Valid cookies received, by channel.
    pub cookies: [Option<Payload>; 4],
    /// Channels whose request cookie must be cleared (rejected or from
    /// another session).
    pub clear: [bool; 4],
    /// Some cookie was sealed under an older secret or format: re-issue.
    pub reissue: bool,
    /// Server-side values loaded from the store, by channel (`None` = not read).
    pub stored: [Option<BTreeMap<String, String>>; 4],
    /// The store read failed and `on_error: degrade` applies.
    pub degraded: bool,
    /// Rejections seen while reading cookies (for metrics).
    pub rejections: Vec<Rejection>,
    /// The session expired (absolute or idle) on this request.
    pub expired: bool,
    /// `session.revocation`: the session that went idle on this request
    /// (its absolute lifetime not over): its id is remembered as ended, so a
    /// copy of the cookie touched elsewhere cannot keep it alive.
    pub idle_ended: Option<Meta>,
    /// The revocation check said the cookie's session has ended.
    pub revoked: bool,
    /// The revocation check failed under `on_error: degrade`: no session is
    /// forwarded, and no directive can be applied (nobody knows whether the
    /// session is live).
    pub unchecked: bool,
    /// The cookie named a regenerated id, and this is the new session
    /// (`session.regenerate_grace`).
    pub followed: bool,
    /// The browser's binding cookie (`session.regenerate_grace`).
    pub binding: Option<String>,
}

impl Session {
    /// The effective value of `key`: its policy channel's cookie first, then
    /// any other cookie, then the store (policy channel first).
    pub fn get(&self, key: &str, settings: &Settings) -> Option<&str> {
        let home = settings.policies.for_read(key).channel();
        let order = channel_order(home);
        for ch in order {
            if let Some(v) = self.cookies[ch.index()]
                .as_ref()
                .and_then(|p| p.values.get(key))
            {
                return Some(v);
            }
        }
        for ch in order {
            if let Some(v) = self.stored[ch.index()].as_ref().and_then(|m| m.get(key)) {
                return Some(v);
            }
        }
        None
    }

    /// All keys with a value, sorted, each with its effective value.
    pub fn entries<'a>(&'a self, settings: &Settings) -> BTreeMap<&'a str, &'a str> {
        let mut out = BTreeMap::new();
        for map in self
            .cookies
            .iter()
            .flatten()
            .map(|p| &p.values)
            .chain(self.stored.iter().flatten())
        {
            for k in map.keys() {
                if !out.contains_key(k.as_str()) {
                    if let Some(v) = self.get(k, settings) {
                        out.insert(k.as_str(), v);
                    }
                }
            }
        }
        out
    }

    /// Store flags of a channel as the request cookie said.
    pub fn flags(&self, ch: Channel) -> Flags {
        self.cookies[ch.index()]
            .as_ref()
            .map_or(Flags::NONE, |p| p.flags)
    }

    /// Might the store hold data of this session that the request's cookies
    /// do not vouch for? A cookie that says so, or (over plain HTTP, when
    /// secure keys exist) a secure channel whose cookie was not sent.
    pub fn may_have_store_data(&self, settings: &Settings, https: bool) -> bool {
        settings.has_store
            && (self
                .cookies
                .iter()
                .flatten()
                .any(|p| p.flags.contains(Flags::STORE))
                || (!https && settings.policies.any_secure()))
    }
}

/// A store's refusal as the directive error the client and the log see:
/// the one place store words become directive words.
impl From<crate::store::Refusal> for crate::model::DirectiveError {
    fn from(r: crate::store::Refusal) -> Self {
        use crate::model::{DirectiveError, DirectiveErrorKind};
        use crate::store::Refusal;
        match r {
            Refusal::NotInteger { key } => DirectiveError::not_integer(&key),
            Refusal::Overflow { key } => DirectiveError::overflow(&key),
            Refusal::TooManyKeys { keys, max } => DirectiveError::new(
                DirectiveErrorKind::TooManyKeys,
                format!("the session would hold {keys} keys, more than limits.keys ({max})"),
            ),
            Refusal::SessionTooLarge { bytes, max } => DirectiveError::new(
                DirectiveErrorKind::SessionTooLarge,
                format!(
                    "the session would hold {bytes} bytes, more than limits.session_bytes ({max})"
                ),
            ),
            // Moved is followed by the gateway; a second move in one
            // request (two logins racing) is reported as ended.
            Refusal::Ended | Refusal::Moved(_) => DirectiveError::new(
                DirectiveErrorKind::SessionEnded,
                "the session ended (logged out or regenerated) while this request was in flight",
            ),
        }
    }
}

/// Settings for the session core's unit tests: a store, undeclared keys
/// server-side, a one-hour lifetime.
#[cfg(test)]
fn test_settings(
    declared: std::collections::HashMap<String, crate::model::Policy>,
    idle_timeout: Option<u64>,
) -> Settings {
    use crate::model::{KeyPolicies, Limits, Policy};
    Settings {
        policies: KeyPolicies {
            declared: declared.into_iter().collect(),
            undeclared: Some(Policy::SERVER),
            fallback: Policy::SERVER,
        },
        limits: Limits::default(),
        lifetime: 3_600_000,
        idle_timeout,
        touch_interval: 1000,
        has_store: true,
        dev_insecure: false,
        revocation: false,
        regenerate_grace: 0,
        users: None,
    }
}
