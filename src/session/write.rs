//! The response side: directives in, cookie lines and one store batch out.
//!
//! [`Session::apply`] validates every directive first and then computes the
//! whole result — new cookie contents and the store [`WriteBatch`] — without
//! side effects. The proxy performs the batch, and only when it succeeds sends
//! the cookies: so a response's directives apply entirely or not at all.

use super::Session;
use crate::codec::{self, Codec};
use crate::cookie::{CookieSpec, MAX_SET_COOKIE};
use crate::directives::Directives;
use crate::model::{
    channel_order, random_tag, Channel, DirectiveError, DirectiveErrorKind, KeySet, Meta, Payload,
    Policy, SessionId, Settings, CHANNELS, FLAG_SPILL, FLAG_STORE,
};
use crate::store::{ChannelWrite, LimitCheck, StoreKey, WriteBatch};
use std::collections::BTreeMap;

/// What `apply` needs besides the session.
pub struct WriteContext<'a> {
    pub settings: &'a Settings,
    pub codec: &'a Codec,
    pub spec: &'a CookieSpec,
    pub encrypt: bool,
    /// The route's `write:` allow-list.
    pub write: &'a KeySet,
    pub https: bool,
    pub now: u64,
}

/// How one of our cookies changes in the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieChange {
    Set(String),
    Clear(String),
}

/// Everything a response does to the session.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `Set-Cookie` values to add to the response.
    pub set_cookies: Vec<String>,
    /// The store write to perform before the response is sent.
    pub batch: Option<WriteBatch>,
    pub created: bool,
    pub regenerated: bool,
    pub destroyed: bool,
    /// Count of applied directives: set, delete, incr, regenerate, destroy.
    pub applied: [u32; 5],
    /// The session after the response (for the access log).
    pub meta: Option<Meta>,
}

impl Outcome {
    pub fn directives_applied(&self) -> u32 {
        self.applied.iter().sum()
    }
}

fn err(kind: DirectiveErrorKind, detail: String) -> DirectiveError {
    DirectiveError::new(kind, detail)
}

/// Working state while applying one response.
struct Work {
    vals: [BTreeMap<String, String>; 4],
    flags: [u8; 4],
    /// A cookie of the channel exists in the browser (request or new).
    present: [bool; 4],
    /// The channel's cookie content changed.
    dirty: [bool; 4],
    ops: [ChannelWrite; 4],
    /// Server-side values known from the store read, kept in sync with ops.
    stored: [Option<BTreeMap<String, String>>; 4],
    /// Keys this response wrote (normalization leaves them alone).
    written: std::collections::HashSet<String>,
    /// The store read failed (`on_error: degrade`): no store writes at all.
    degraded: bool,
}

impl Work {
    /// Might the store hash of `ch` hold `key`?
    fn store_may_hold(&self, ch: usize, key: &str) -> bool {
        !self.degraded
            && self.flags[ch] & FLAG_STORE != 0
            && self.stored[ch].as_ref().is_none_or(|m| m.contains_key(key))
    }

    fn store_delete(&mut self, ch: usize, key: &str) {
        let w = &mut self.ops[ch];
        w.set.retain(|(k, _)| k != key);
        w.incr.retain(|(k, _)| k != key);
        if !w.delete.iter().any(|k| k == key) {
            w.delete.push(key.to_string());
        }
        if let Some(m) = &mut self.stored[ch] {
            m.remove(key);
        }
    }

    fn store_set(&mut self, ch: usize, key: &str, value: String) {
        let w = &mut self.ops[ch];
        w.incr.retain(|(k, _)| k != key);
        match w.set.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value.clone(),
            None => w.set.push((key.to_string(), value.clone())),
        }
        if let Some(m) = &mut self.stored[ch] {
            m.insert(key.to_string(), value);
        }
    }

    fn cookie_remove(&mut self, ch: usize, key: &str) -> Option<String> {
        let v = self.vals[ch].remove(key);
        if v.is_some() {
            self.dirty[ch] = true;
        }
        v
    }

    fn cookie_set(&mut self, ch: usize, key: &str, value: String) {
        self.vals[ch].insert(key.to_string(), value);
        self.dirty[ch] = true;
    }

    /// Remove `key` from every other place it may be. A clientside write
    /// leaves store copies alone (cookies are read first, so they are
    /// shadowed), so that it never costs a store round trip; a Delete
    /// removes those too.
    fn remove_elsewhere(&mut self, key: &str, home: Channel, clientside: bool) {
        for ch in CHANNELS {
            let i = ch.index();
            if !(clientside && ch == home) {
                self.cookie_remove(i, key);
            }
            if !clientside && ch != home && self.store_may_hold(i, key) {
                self.store_delete(i, key);
            }
        }
    }

    /// Current value of `key` outside the store's unread data.
    fn known_value(&self, key: &str, home: Channel) -> Option<String> {
        let order = channel_order(home);
        order
            .iter()
            .find_map(|ch| self.vals[ch.index()].get(key))
            .or_else(|| {
                order
                    .iter()
                    .find_map(|ch| self.stored[ch.index()].as_ref().and_then(|m| m.get(key)))
            })
            .cloned()
    }
}

impl Session {
    /// Compute everything `d` does to this session. Validation happens first;
    /// on error nothing is returned to apply.
    pub fn apply(&self, d: &Directives, cx: &WriteContext) -> Result<Outcome, DirectiveError> {
        let s = cx.settings;
        let touch_due = self.meta.is_some_and(|m| {
            s.idle_timeout.is_some() && cx.now.saturating_sub(m.touched) >= s.touch_interval
        });
        if d.is_empty() && !self.reissue && !touch_due && !self.clear.iter().any(|c| *c) {
            // The common read-only request: nothing to write, no Set-Cookie.
            return Ok(Outcome {
                meta: self.meta,
                ..Default::default()
            });
        }
        self.validate(d, cx)?;

        let mut w = Work {
            vals: Default::default(),
            flags: [0; 4],
            present: [false; 4],
            dirty: [false; 4],
            ops: Default::default(),
            stored: self.stored.clone(),
            written: Default::default(),
            degraded: self.degraded,
        };
        for ch in CHANNELS {
            if let Some(p) = &self.cookies[ch.index()] {
                w.vals[ch.index()] = p.values.clone();
                w.flags[ch.index()] = p.flags;
                w.present[ch.index()] = true;
            }
        }
        let mut clear = self.clear;
        let mut meta = self.meta;
        let mut out = Outcome::default();
        let mut batch_destroy = None;
        let mut rename_from = None;
        // Destroy and Regenerate act on every channel of the id in the
        // store, whichever cookies arrived: over plain HTTP the secure
        // cookies are not sent, and a channel's cookie may be gone (a
        // closed browser) while its data is not. (Under `degrade` with
        // possible store data, `validate` has refused them already.)
        let store_ok = s.has_store && !self.degraded;

        // Destroy: forget everything; a later Set starts a new session.
        if d.destroy {
            out.applied[4] += 1;
            if let Some(m) = meta.take() {
                if store_ok {
                    batch_destroy = Some(StoreKey::from(m));
                }
                for ch in CHANNELS {
                    let i = ch.index();
                    if w.present[i] {
                        clear[i] = true;
                    }
                }
                w.vals = Default::default();
                w.flags = [0; 4];
                w.present = [false; 4];
                w.stored = Default::default();
                out.destroyed = true;
            }
        }

        // Regenerate: same data and times under a new id.
        if d.regenerate {
            out.applied[3] += 1;
            if let Some(m) = &mut meta {
                if store_ok {
                    rename_from = Some(m.id);
                    // Store data of a channel whose cookie the browser no
                    // longer holds (a closed browser's transient keys) is
                    // stale: it must not follow the session to its new id.
                    // Over plain HTTP the secure cookies are not sent and a
                    // new one cannot be set, so secure data cannot follow
                    // either: the old id's is dropped with the rest.
                    for ch in CHANNELS {
                        if !w.present[ch.index()] {
                            w.ops[ch.index()].clear = true;
                        }
                    }
                }
                m.id = SessionId::random();
                out.regenerated = true;
                w.dirty = w.present;
            }
        }

        for key in &d.delete {
            out.applied[1] += 1;
            for ch in CHANNELS {
                w.cookie_remove(ch.index(), key);
                if w.store_may_hold(ch.index(), key) {
                    w.store_delete(ch.index(), key);
                }
            }
            w.written.insert(key.clone());
        }

        for (key, value) in &d.set {
            out.applied[0] += 1;
            let p = s.policies.for_write(key).expect("validated");
            let home = p.channel();
            w.remove_elsewhere(key, home, p.clientside);
            if p.clientside {
                w.cookie_set(home.index(), key, value.clone());
            } else {
                w.store_set(home.index(), key, value.clone());
            }
            w.written.insert(key.clone());
        }

        for (key, n) in &d.incr {
            out.applied[2] += 1;
            let p = s.policies.for_write(key).expect("validated");
            let home = p.channel();
            let hi = home.index();
            let spilled = p.clientside
                && w.flags[hi] & FLAG_SPILL != 0
                && !w.vals[hi].contains_key(key)
                && w.stored[hi].is_none();
            if p.clientside && !spilled {
                // The browser holds the only copy: add here.
                let next = add(w.known_value(key, home), key, *n)?;
                w.remove_elsewhere(key, home, true);
                w.cookie_set(hi, key, next.to_string());
            } else if let Some(v) = w.ops[hi]
                .set
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .or_else(|| {
                    CHANNELS
                        .iter()
                        .find_map(|c| w.vals[c.index()].get(key).cloned())
                })
            {
                // Set earlier in this response, or still in a cookie from
                // before a policy change: the value is known here.
                let next = add(Some(v), key, *n)?;
                w.remove_elsewhere(key, home, false);
                w.store_set(hi, key, next.to_string());
            } else {
                // Server-side: the store adds atomically, so concurrent Incrs
                // (across gateways) never lose a count.
                let e = &mut w.ops[hi];
                match e.incr.iter_mut().find(|(k, _)| k == key) {
                    Some(x) => {
                        x.1 =
                            x.1.checked_add(*n)
                                .ok_or_else(|| DirectiveError::overflow(key))?
                    }
                    None => e.incr.push((key.clone(), *n)),
                }
                if let Some(m) = &mut w.stored[hi] {
                    // The result is only known to the store now.
                    m.remove(key);
                }
            }
            w.written.insert(key.clone());
        }

        let wrote = !d.set.is_empty() || !d.incr.is_empty();
        if meta.is_none() {
            if !wrote {
                // Nothing to keep: Deletes on no session, or a bare Destroy.
                return self.finish(cx, out, None, clear, w, batch_destroy, None, false, None);
            }
            let m = Meta {
                id: SessionId::random(),
                // After Destroy, keep the tag: the store then deletes the
                // old data and writes the new in one slot, atomically.
                tag: batch_destroy.map_or_else(random_tag, |d| d.tag),
                created: cx.now,
                expires: cx.now.saturating_add(s.lifetime),
                touched: cx.now,
            };
            meta = Some(m);
            out.created = true;
        }

        let changed = w.dirty.iter().any(|d| *d) || w.ops.iter().any(|o| !o.is_empty());
        if changed {
            self.normalize(&mut w, cx);
        }
        self.spill(&mut w, cx)?;
        let limits = self.check_limits(&w, cx, wrote && store_ok, out.destroyed)?;

        // A channel that gains store data records it in its cookie; a cookie
        // that did not exist yet for an existing session must not pick up
        // stale data an earlier cookie of that channel left behind.
        for ch in CHANNELS {
            let i = ch.index();
            if w.ops[i].adds() && w.flags[i] & FLAG_STORE == 0 {
                w.flags[i] |= FLAG_STORE;
                w.dirty[i] = true;
                if !w.present[i] && !out.created && rename_from.is_none() {
                    w.ops[i].clear = true;
                }
            }
        }
        let m = meta.as_mut().expect("set above");
        let touch = !out.created
            && s.idle_timeout.is_some()
            && cx.now.saturating_sub(m.touched) >= s.touch_interval;
        if touch || out.created {
            m.touched = cx.now;
        }
        let meta = *m;
        self.finish(
            cx,
            out,
            Some(meta),
            clear,
            w,
            batch_destroy,
            rename_from,
            touch,
            limits,
        )
    }

    fn validate(&self, d: &Directives, cx: &WriteContext) -> Result<(), DirectiveError> {
        let s = cx.settings;
        if (d.destroy || d.regenerate) && cx.write.is_none() {
            let which = if d.destroy { "Destroy" } else { "Regenerate" };
            return Err(err(
                DirectiveErrorKind::NotAllowed,
                format!("X-Session-{which}: this route may not write the session (write: none)"),
            ));
        }
        // A logout (or a login's id change) is never reported done while
        // the old id's server-side data lives on.
        if (d.destroy || d.regenerate)
            && self.meta.is_some()
            && self.degraded
            && self.may_have_store_data(s, cx.https)
        {
            let which = if d.destroy { "Destroy" } else { "Regenerate" };
            return Err(err(DirectiveErrorKind::StoreUnavailable,
                format!("X-Session-{which}: the session store is unavailable and the session has server-side data"),
            ));
        }
        let keys = d
            .delete
            .iter()
            .map(|k| ("Delete", k))
            .chain(d.set.iter().map(|(k, _)| ("Set", k)))
            .chain(d.incr.iter().map(|(k, _)| ("Incr", k)));
        for (what, k) in keys {
            if !cx.write.contains(k) {
                return Err(err(
                    DirectiveErrorKind::NotAllowed,
                    format!("X-Session-{what}: this route may not write `{k}`"),
                ));
            }
            let Some(p) = s.policies.for_write(k) else {
                return Err(err(DirectiveErrorKind::Undeclared,
                    format!("X-Session-{what}: `{k}` is not declared in session.keys (undeclared_keys: reject)"),
                ));
            };
            check_policy(p, k, what, cx, self.degraded)?;
        }
        for (k, v) in &d.set {
            if v.len() > s.limits.value_bytes {
                return Err(err(DirectiveErrorKind::ValueTooLarge,
                    format!(
                        "X-Session-Set: the value of `{k}` has {} bytes, more than limits.value_bytes ({})",
                        v.len(),
                        s.limits.value_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Move values found where their current policy does not put them.
    fn normalize(&self, w: &mut Work, cx: &WriteContext) {
        let s = cx.settings;
        let store_ok = s.has_store && !self.degraded;
        for ch in CHANNELS {
            let i = ch.index();
            let misplaced: Vec<(String, String)> = w.vals[i]
                .iter()
                .filter(|(k, _)| !w.written.contains(*k))
                .filter(|(k, _)| {
                    let p = s.policies.for_read(k);
                    !(p.clientside && p.channel() == ch)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (k, v) in misplaced {
                let p = s.policies.for_read(&k);
                let home = p.channel();
                if home.secure() && !cx.https {
                    continue;
                }
                if p.clientside {
                    w.cookie_remove(i, &k);
                    if !w.vals[home.index()].contains_key(&k) {
                        w.cookie_set(home.index(), &k, v);
                    }
                } else if store_ok {
                    w.cookie_remove(i, &k);
                    w.store_set(home.index(), &k, v);
                }
            }
            if !store_ok {
                continue;
            }
            let Some(stored) = w.stored[i].clone() else {
                continue;
            };
            for (k, v) in stored {
                if w.written.contains(&k) {
                    continue;
                }
                let p = s.policies.for_read(&k);
                let home = p.channel();
                let spilled = p.clientside && home == ch && w.flags[i] & FLAG_SPILL != 0;
                if (!p.clientside && home == ch) || spilled || (home.secure() && !cx.https) {
                    continue;
                }
                w.store_delete(i, &k);
                if p.clientside {
                    if !w.vals[home.index()].contains_key(&k) {
                        w.cookie_set(home.index(), &k, v);
                    }
                } else {
                    w.store_set(home.index(), &k, v);
                }
            }
        }
    }

    /// Keep every `Set-Cookie` line within 4096 bytes: move the largest
    /// clientside values of an overflowing channel to the store, or fail
    /// without one.
    fn spill(&self, w: &mut Work, cx: &WriteContext) -> Result<(), DirectiveError> {
        for ch in CHANNELS {
            let i = ch.index();
            if !w.dirty[i] {
                continue;
            }
            let room = MAX_SET_COOKIE.saturating_sub(cx.spec.overhead(ch));
            loop {
                let probe = Payload {
                    id: SessionId([0; 16]),
                    tag: 0,
                    created: 0,
                    expires: 0,
                    touched: 0,
                    flags: w.flags[i] | FLAG_STORE | FLAG_SPILL,
                    values: std::mem::take(&mut w.vals[i]),
                };
                let len = codec::sealed_len(&probe, cx.encrypt);
                w.vals[i] = probe.values;
                if len <= room {
                    break;
                }
                if !cx.settings.has_store || self.degraded {
                    return Err(err(DirectiveErrorKind::CookieTooLarge,
                        format!(
                            "the clientside keys of cookie `{}` need {len} bytes, more than fits in a 4096-byte Set-Cookie, and there is no store to move them to",
                            cx.spec.name(ch)
                        ),
                    ));
                }
                let Some((k, _)) = w.vals[i]
                    .iter()
                    .max_by_key(|(_, v)| v.len())
                    .map(|(k, v)| (k.clone(), v.len()))
                else {
                    break;
                };
                let v = w.vals[i].remove(&k).expect("present");
                w.store_set(i, &k, v);
                w.flags[i] |= FLAG_SPILL;
            }
        }
        Ok(())
    }

    /// Check `limits.keys` / `limits.session_bytes` over what is known, and
    /// hand the store a check for what only it knows: whenever the store
    /// gains data, and whenever a write (clientside ones included) grows a
    /// session whose store data this request did not read — otherwise a
    /// route that reads nothing could grow a session past its limits.
    fn check_limits(
        &self,
        w: &Work,
        cx: &WriteContext,
        grows: bool,
        destroyed: bool,
    ) -> Result<Option<LimitCheck>, DirectiveError> {
        let l = cx.settings.limits;
        let client_keys: usize = w.vals.iter().map(|m| m.len()).sum();
        let client_bytes: usize = w
            .vals
            .iter()
            .flat_map(|m| m.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        let check = LimitCheck {
            max_keys: l.keys,
            max_bytes: l.session_bytes,
            client_keys,
            client_bytes,
        };
        // Clientside data alone, plus whatever store data was read.
        let mut known = crate::store::Record::default();
        for i in 0..4 {
            if let Some(m) = &w.stored[i] {
                known.channels[i] = m.clone();
            }
        }
        known.check(&check)?;
        let unread = (0..4).any(|i| w.flags[i] & FLAG_STORE != 0 && w.stored[i].is_none())
            || (!cx.https && !destroyed && cx.settings.policies.any_secure());
        if w.ops.iter().any(|o| o.adds()) || (grows && unread) {
            Ok(Some(check))
        } else {
            Ok(None)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        cx: &WriteContext,
        mut out: Outcome,
        meta: Option<Meta>,
        clear: [bool; 4],
        mut w: Work,
        batch_destroy: Option<StoreKey>,
        rename_from: Option<SessionId>,
        touch: bool,
        limits: Option<LimitCheck>,
    ) -> Result<Outcome, DirectiveError> {
        let s = cx.settings;
        out.meta = meta;
        if let Some(m) = meta {
            let content =
                |w: &Work, i: usize| !w.vals[i].is_empty() || w.flags[i] & FLAG_STORE != 0;
            for ch in CHANNELS {
                let i = ch.index();
                let exists = w.present[i] || content(&w, i);
                let changed = w.dirty[i] || touch || self.reissue || out.created || out.regenerated;
                // Nothing to send: no cookie for the channel, or it exists and
                // did not change.
                if !exists || (w.present[i] && !changed) {
                    if clear[i] {
                        out.set_cookies.push(cx.spec.clear_line(ch, cx.https));
                    }
                    continue;
                }
                let payload = Payload {
                    id: m.id,
                    tag: m.tag,
                    created: m.created,
                    expires: m.expires,
                    touched: m.touched,
                    flags: w.flags[i],
                    values: std::mem::take(&mut w.vals[i]),
                };
                let value = cx.codec.seal(cx.spec.name(ch), &payload);
                let expires = ch.permanent().then_some(m.expires);
                let line = cx.spec.set_line(ch, &value, expires, cx.now, cx.https);
                if line.len() > MAX_SET_COOKIE {
                    return Err(err(
                        DirectiveErrorKind::CookieTooLarge,
                        format!(
                            "the Set-Cookie line for `{}` would exceed 4096 bytes",
                            cx.spec.name(ch)
                        ),
                    ));
                }
                out.set_cookies.push(line);
            }
        } else {
            for ch in CHANNELS {
                if clear[ch.index()] {
                    out.set_cookies.push(cx.spec.clear_line(ch, cx.https));
                }
            }
        }

        let store_touch = touch && !self.degraded && w.flags.iter().any(|f| f & FLAG_STORE != 0);
        let has_ops = w.ops.iter().any(|o| !o.is_empty());
        if let Some(m) = meta.filter(|_| {
            has_ops
                || rename_from.is_some()
                || batch_destroy.is_some()
                || store_touch
                || limits.is_some()
        }) {
            let expire_at = match s.idle_timeout {
                Some(idle) => m.expires.min(m.touched.saturating_add(idle)),
                None => m.expires,
            };
            let mut b = WriteBatch::new(StoreKey::from(m), expire_at);
            b.destroy = batch_destroy;
            b.rename_from = rename_from;
            b.channels = w.ops;
            b.limits = limits;
            out.batch = Some(b);
        } else if let Some(old) = batch_destroy {
            let mut b = WriteBatch::new(old, 0);
            b.destroy = Some(old);
            out.batch = Some(b);
        }
        Ok(out)
    }
}

fn add(current: Option<String>, key: &str, n: i64) -> Result<i64, DirectiveError> {
    crate::model::incremented(current.as_deref(), key, n)
}

fn check_policy(
    p: Policy,
    k: &str,
    what: &str,
    cx: &WriteContext,
    degraded: bool,
) -> Result<(), DirectiveError> {
    if p.secure && !cx.https {
        return Err(err(
            DirectiveErrorKind::SecureOverHttp,
            format!("X-Session-{what}: `{k}` is a secure key and this request is plain HTTP"),
        ));
    }
    if !p.clientside && !cx.settings.has_store {
        return Err(err(
            DirectiveErrorKind::NoStore,
            format!("X-Session-{what}: `{k}` is a server-side key and store.kind is none"),
        ));
    }
    if !p.clientside && degraded {
        return Err(err(
            DirectiveErrorKind::StoreUnavailable,
            format!(
                "X-Session-{what}: `{k}` is a server-side key and the session store is unavailable"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cookie::{SameSite, SecureMode};
    use crate::model::{KeyPolicies, Limits};
    use crate::session::RequestInfo;
    use std::collections::HashMap;

    fn settings(idle: Option<u64>) -> Settings {
        let mut declared = HashMap::new();
        declared.insert(
            "c".to_string(),
            Policy {
                clientside: true,
                permanent: true,
                secure: false,
            },
        );
        declared.insert(
            "t".to_string(),
            Policy {
                clientside: false,
                permanent: false,
                secure: false,
            },
        );
        Settings {
            policies: KeyPolicies {
                declared,
                undeclared: Some(Policy::SERVER),
                fallback: Policy::SERVER,
            },
            limits: Limits::default(),
            lifetime: 3_600_000,
            idle_timeout: idle,
            touch_interval: 1000,
            has_store: true,
            dev_insecure: false,
        }
    }

    struct Env {
        settings: Settings,
        codec: Codec,
        spec: CookieSpec,
    }

    impl Env {
        fn new(idle: Option<u64>) -> Env {
            Env {
                settings: settings(idle),
                codec: Codec::new(&["unit-test-secret-0123456789abcdefghij"], true),
                spec: CookieSpec::new(
                    "g",
                    "/".into(),
                    None,
                    SameSite::Lax,
                    SecureMode::Auto,
                    false,
                ),
            }
        }

        fn cx(&self, now: u64) -> WriteContext<'_> {
            WriteContext {
                settings: &self.settings,
                codec: &self.codec,
                spec: &self.spec,
                encrypt: true,
                write: &KeySet::All,
                https: false,
                now,
            }
        }

        /// The session a browser holding `lines` (Set-Cookie values) sends.
        fn session(&self, lines: &[String], now: u64) -> Session {
            let header: Vec<String> = lines
                .iter()
                .map(|l| l.split(';').next().unwrap().to_string())
                .collect();
            let header = header.join("; ");
            Session::from_cookies(
                &self.codec,
                &self.spec,
                &self.settings,
                [header.as_bytes()].into_iter(),
                RequestInfo { https: false, now },
            )
        }
    }

    fn d(set: &[(&str, &str)]) -> Directives {
        Directives {
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn clientside_set_creates_a_cookie_and_no_store_write() {
        let env = Env::new(None);
        let o = Session::default()
            .apply(&d(&[("c", "1")]), &env.cx(1000))
            .unwrap();
        assert!(o.created);
        assert!(o.batch.is_none());
        assert_eq!(o.set_cookies.len(), 1);
        assert!(o.set_cookies[0].starts_with("g="));
        let s = env.session(&o.set_cookies, 2000);
        assert_eq!(s.get("c", &env.settings), Some("1"));
        // A read-only request afterwards: nothing to send.
        let o2 = s.apply(&Directives::default(), &env.cx(3000)).unwrap();
        assert!(o2.set_cookies.is_empty() && o2.batch.is_none());
    }

    #[test]
    fn first_server_side_key_marks_the_cookie() {
        let env = Env::new(None);
        let o = Session::default()
            .apply(&d(&[("user", "a")]), &env.cx(1000))
            .unwrap();
        let b = o.batch.expect("a store write");
        assert_eq!(
            b.channels[0].set,
            vec![("user".to_string(), "a".to_string())]
        );
        assert!(b.limits.is_some());
        let s = env.session(&o.set_cookies, 2000);
        assert_eq!(s.flags(Channel::Perm) & FLAG_STORE, FLAG_STORE);
        // Known store data now: a second key needs no Set-Cookie.
        let o2 = s.apply(&d(&[("role", "x")]), &env.cx(2000)).unwrap();
        assert!(o2.set_cookies.is_empty());
        assert!(o2.batch.is_some());
    }

    #[test]
    fn regenerate_drops_stale_channels_and_destroy_keeps_the_tag() {
        let env = Env::new(None);
        let o = Session::default()
            .apply(&d(&[("user", "a"), ("t", "x")]), &env.cx(1000))
            .unwrap();
        let all = env.session(&o.set_cookies, 1500);
        let tag = all.meta.unwrap().tag;
        // The browser closed: the transient cookie is gone.
        let perm_only: Vec<String> = o
            .set_cookies
            .iter()
            .filter(|l| l.starts_with("g="))
            .cloned()
            .collect();
        let s = env.session(&perm_only, 2000);
        let regen = Directives {
            regenerate: true,
            ..Default::default()
        };
        let o = s.apply(&regen, &env.cx(2000)).unwrap();
        let b = o.batch.unwrap();
        assert_eq!(b.rename_from, Some(s.meta.unwrap().id));
        assert!(
            b.channels[Channel::Trans.index()].clear,
            "stale transient data followed the new id"
        );
        assert!(!b.channels[Channel::Perm.index()].clear);
        // Destroy + Set: a new id that keeps the store's hash tag.
        let ds = Directives {
            destroy: true,
            ..d(&[("user", "b")])
        };
        let o = all.apply(&ds, &env.cx(3000)).unwrap();
        let b = o.batch.unwrap();
        assert_eq!(b.destroy.map(|k| k.tag), Some(tag));
        assert_eq!(b.key.tag, tag);
        assert_ne!(b.key.id, all.meta.unwrap().id);
        assert!(o.created && o.destroyed);
    }

    #[test]
    fn touch_only_after_the_interval() {
        let env = Env::new(Some(10_000));
        let o = Session::default()
            .apply(&d(&[("user", "a")]), &env.cx(1000))
            .unwrap();
        let s = env.session(&o.set_cookies, 1500);
        assert!(s
            .apply(&Directives::default(), &env.cx(1500))
            .unwrap()
            .set_cookies
            .is_empty());
        let o = s.apply(&Directives::default(), &env.cx(2500)).unwrap();
        assert_eq!(o.set_cookies.len(), 1, "touch re-issues the cookie");
        let b = o.batch.expect("and refreshes the store TTL");
        assert_eq!(b.expire_at, 12_500);
        assert!(b.channels.iter().all(|c| c.is_empty()));
        // Idle past the timeout: no session.
        assert!(env.session(&o.set_cookies, 12_500).meta.is_none());
    }

    #[test]
    fn errors_apply_nothing() {
        let env = Env::new(None);
        let mut dd = d(&[("c", "1")]);
        dd.incr = vec![("c".into(), 1)];
        assert!(Session::default().apply(&dd, &env.cx(1)).is_ok());
        dd.set = vec![("c".into(), "x".into())];
        assert_eq!(
            Session::default()
                .apply(&dd, &env.cx(1))
                .unwrap_err()
                .label(),
            "not_integer"
        );
        let cx = WriteContext {
            write: &KeySet::Only(vec!["c".into()]),
            ..env.cx(1)
        };
        assert_eq!(
            Session::default()
                .apply(&d(&[("user", "a")]), &cx)
                .unwrap_err()
                .label(),
            "not_allowed"
        );
    }
}
