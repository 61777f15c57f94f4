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
    channel_order, random_tag, Channel, DirectiveError, DirectiveErrorKind, Flags, KeySet, Meta,
    Payload, PerChannel, Policy, SessionId, Settings, CHANNELS,
};
use crate::store::{
    ended_until, user_hash, ChannelWrite, LimitCheck, StoreKey, UserSession, UserWrite, WriteBatch,
};
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
    /// `session.track`: the client's address and `User-Agent` (`None`
    /// when not tracked).
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The tag a session created by this response gets (a `sticky` route
    /// chose the upstream by it); `None`: a random one.
    pub tag: Option<u32>,
}

/// How one of our cookies changes in the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieChange {
    Set(String),
    Clear(String),
}

/// How many directives of each kind a response applied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub set: u32,
    pub delete: u32,
    pub incr: u32,
    pub regenerate: u32,
    pub destroy: u32,
}

impl Applied {
    /// `(label of gimlet_directives_total, count)` for each kind.
    pub fn by_label(&self) -> [(&'static str, u32); 5] {
        let l = crate::model::DIRECTIVE_LABELS;
        [
            (l[0], self.set),
            (l[1], self.delete),
            (l[2], self.incr),
            (l[3], self.regenerate),
            (l[4], self.destroy),
        ]
    }

    pub fn total(&self) -> u32 {
        self.set + self.delete + self.incr + self.regenerate + self.destroy
    }
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
    pub applied: Applied,
    /// The session after the response (for the access log).
    pub meta: Option<Meta>,
    /// `X-Session-Destroy: user`: end every session of this user (its
    /// hashed name) once the write succeeded.
    pub end_user: Option<String>,
}

impl Outcome {
    pub fn directives_applied(&self) -> u32 {
        self.applied.total()
    }

    /// Does the response set (not only clear) one of our cookies?
    pub fn sets_a_cookie(&self) -> bool {
        self.set_cookies.iter().any(|l| !l.contains("=; Max-Age=0"))
    }
}

fn err(kind: DirectiveErrorKind, detail: String) -> DirectiveError {
    DirectiveError::new(kind, detail)
}

/// Working state while applying one response: per channel, what the
/// browser's cookie will hold and what the store is told to do.
struct Work {
    vals: PerChannel<BTreeMap<String, String>>,
    flags: PerChannel<Flags>,
    /// A cookie of the channel exists in the browser (request or new).
    present: PerChannel<bool>,
    /// The channel's cookie content changed.
    dirty: PerChannel<bool>,
    /// Request cookies to clear (rejected, of another session, destroyed).
    clear: PerChannel<bool>,
    ops: PerChannel<ChannelWrite>,
    /// Server-side values known from the store read, kept in sync with ops.
    stored: PerChannel<Option<BTreeMap<String, String>>>,
    /// Keys this response wrote (normalization leaves them alone).
    written: std::collections::HashSet<String>,
    /// The store read failed (`on_error: degrade`): no store writes at all.
    degraded: bool,
    /// A store is configured and answered.
    store_ok: bool,
    /// The session after this response (`None`: no session).
    meta: Option<Meta>,
    /// Destroy: delete this session's data first.
    destroy: Option<StoreKey>,
    /// Regenerate: move the data from this id.
    rename_from: Option<SessionId>,
    /// `session.revocation`: ids to remember as ended, until their expiry.
    end: Vec<(SessionId, u64)>,
    revocation: bool,
    /// The cookies sealed for the response (name, value): after a
    /// Regenerate, what a request still carrying the old id continues with.
    sealed: Vec<(Channel, String)>,
    /// `X-Session-Destroy: user`.
    destroy_user: bool,
    out: Outcome,
}

impl Work {
    fn new(session: &Session, settings: &Settings) -> Work {
        let mut w = Work {
            vals: Default::default(),
            flags: Default::default(),
            present: Default::default(),
            dirty: Default::default(),
            clear: PerChannel(session.clear),
            ops: Default::default(),
            stored: PerChannel(session.stored.clone()),
            written: Default::default(),
            degraded: session.degraded,
            store_ok: settings.has_store && !session.degraded,
            meta: session.meta,
            destroy: None,
            rename_from: None,
            end: Vec::new(),
            revocation: settings.revocation,
            sealed: Vec::new(),
            destroy_user: false,
            out: Outcome::default(),
        };
        // A session that went idle on this request: its data goes and its
        // id is remembered as ended (a new session keeps its tag, so both
        // are one store batch in one slot).
        if let Some(m) = session.idle_ended.filter(|_| w.store_ok) {
            w.destroy = Some(StoreKey::from(m));
            w.end.push((m.id, ended_until(m.expires)));
        }
        for ch in CHANNELS {
            if let Some(p) = &session.cookies[ch.index()] {
                w.vals[ch] = p.values.clone();
                w.flags[ch] = p.flags;
                w.present[ch] = true;
            }
        }
        w
    }

    /// Destroy: forget everything; a later Set starts a new session. It acts
    /// on every channel of the id in the store, whichever cookies arrived
    /// (over plain HTTP the secure cookies are not sent; a closed browser's
    /// transient cookie is gone while its data is not).
    fn destroy(&mut self) {
        self.out.applied.destroy += 1;
        let Some(m) = self.meta.take() else { return };
        if self.store_ok {
            self.destroy = Some(StoreKey::from(m));
            if self.revocation {
                self.end.push((m.id, ended_until(m.expires)));
            }
        }
        for ch in CHANNELS {
            if self.present[ch] {
                self.clear[ch] = true;
            }
        }
        self.vals = Default::default();
        self.flags = Default::default();
        self.present = Default::default();
        self.stored = Default::default();
        self.out.destroyed = true;
    }

    /// Regenerate: same data and times under a new id.
    fn regenerate(&mut self) {
        self.out.applied.regenerate += 1;
        let Some(m) = &mut self.meta else { return };
        if self.store_ok {
            self.rename_from = Some(m.id);
            if self.revocation {
                self.end.push((m.id, ended_until(m.expires)));
            }
            // Store data of a channel whose cookie the browser no longer
            // holds (a closed browser's transient keys) is stale: it must not
            // follow the session to its new id. Over plain HTTP the secure
            // cookies are not sent and a new one cannot be set, so secure
            // data cannot follow either: the old id's is dropped with the
            // rest.
            for ch in CHANNELS {
                if !self.present[ch] {
                    self.ops[ch].clear = true;
                }
            }
        }
        m.id = SessionId::random();
        self.out.regenerated = true;
        self.dirty = self.present.clone();
    }

    fn delete(&mut self, key: &str) {
        self.out.applied.delete += 1;
        for ch in CHANNELS {
            self.cookie_remove(ch, key);
            if self.store_may_hold(ch, key) {
                self.store_delete(ch, key);
            }
        }
        self.written.insert(key.to_string());
    }

    fn set(&mut self, p: Policy, key: &str, value: &str) {
        self.out.applied.set += 1;
        let home = p.channel();
        self.remove_elsewhere(key, home, p.clientside);
        if p.clientside {
            self.cookie_set(home, key, value.to_string());
        } else {
            self.store_set(home, key, value.to_string());
        }
        self.written.insert(key.to_string());
    }

    fn incr(&mut self, p: Policy, key: &str, n: i64) -> Result<(), DirectiveError> {
        self.out.applied.incr += 1;
        let home = p.channel();
        let spilled = p.clientside
            && self.flags[home].contains(Flags::SPILL)
            && !self.vals[home].contains_key(key)
            && self.stored[home].is_none();
        if p.clientside && !spilled {
            // The browser holds the only copy: add here.
            let next = add(self.known_value(key, home), key, n)?;
            self.remove_elsewhere(key, home, true);
            self.cookie_set(home, key, next.to_string());
        } else if let Some(v) = self.ops[home]
            .set
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                CHANNELS
                    .iter()
                    .find_map(|c| self.vals[*c].get(key).cloned())
            })
        {
            // Set earlier in this response, or still in a cookie from before
            // a policy change: the value is known here.
            let next = add(Some(v), key, n)?;
            self.remove_elsewhere(key, home, false);
            self.store_set(home, key, next.to_string());
        } else {
            // Server-side: the store adds atomically, so concurrent Incrs
            // (across gateways) never lose a count.
            let e = &mut self.ops[home];
            match e.incr.iter_mut().find(|(k, _)| k == key) {
                Some(x) => {
                    x.1 =
                        x.1.checked_add(n)
                            .ok_or_else(|| DirectiveError::overflow(key))?
                }
                None => e.incr.push((key.to_string(), n)),
            }
            if let Some(m) = &mut self.stored[home] {
                // The result is only known to the store now.
                m.remove(key);
            }
        }
        self.written.insert(key.to_string());
        Ok(())
    }

    /// A session that has none yet starts now (a Set or Incr on no
    /// session, or after Destroy). `false`: there is nothing to keep.
    fn begin(&mut self, wrote: bool, cx: &WriteContext) -> bool {
        if self.meta.is_some() {
            return true;
        }
        if !wrote {
            return false;
        }
        self.meta = Some(Meta {
            id: SessionId::random(),
            // After Destroy, keep the tag: the store then deletes the old
            // data and writes the new in one slot, atomically.
            tag: self
                .destroy
                .map(|d| d.tag)
                .or(cx.tag)
                .unwrap_or_else(random_tag),
            created: cx.now,
            expires: cx.now.saturating_add(cx.settings.lifetime),
            touched: cx.now,
        });
        self.out.created = true;
        true
    }

    /// A channel that gains store data records it in its cookie; a cookie
    /// that did not exist yet for an existing session must not pick up stale
    /// data an earlier cookie of that channel left behind.
    fn mark_store_data(&mut self) {
        for ch in CHANNELS {
            if self.ops[ch].adds() && !self.flags[ch].contains(Flags::STORE) {
                self.flags[ch] |= Flags::STORE;
                self.dirty[ch] = true;
                if !self.present[ch] && !self.out.created && self.rename_from.is_none() {
                    self.ops[ch].clear = true;
                }
            }
        }
    }

    /// With an idle timeout, refresh the last touch when it is older than
    /// `touch_interval` (a new session is touched at creation).
    fn touch(&mut self, cx: &WriteContext) -> bool {
        let s = cx.settings;
        let m = self.meta.as_mut().expect("begun");
        let touch = !self.out.created
            && s.idle_timeout.is_some()
            && cx.now.saturating_sub(m.touched) >= s.touch_interval;
        if touch || self.out.created {
            m.touched = cx.now;
        }
        touch
    }

    /// Might the store hash of `ch` hold `key`?
    fn store_may_hold(&self, ch: Channel, key: &str) -> bool {
        !self.degraded
            && self.flags[ch].contains(Flags::STORE)
            && self.stored[ch].as_ref().is_none_or(|m| m.contains_key(key))
    }

    fn store_delete(&mut self, ch: Channel, key: &str) {
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

    fn store_set(&mut self, ch: Channel, key: &str, value: String) {
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

    fn cookie_remove(&mut self, ch: Channel, key: &str) -> Option<String> {
        let v = self.vals[ch].remove(key);
        if v.is_some() {
            self.dirty[ch] = true;
        }
        v
    }

    fn cookie_set(&mut self, ch: Channel, key: &str, value: String) {
        self.vals[ch].insert(key.to_string(), value);
        self.dirty[ch] = true;
    }

    /// Remove `key` from every other place it may be. A clientside write
    /// leaves store copies alone (cookies are read first, so they are
    /// shadowed), so that it never costs a store write; a Delete removes
    /// those too.
    fn remove_elsewhere(&mut self, key: &str, home: Channel, clientside: bool) {
        for ch in CHANNELS {
            if !(clientside && ch == home) {
                self.cookie_remove(ch, key);
            }
            if !clientside && ch != home && self.store_may_hold(ch, key) {
                self.store_delete(ch, key);
            }
        }
    }

    /// The value of `key` after this response, as far as it is known.
    fn value(&self, key: &str) -> Option<String> {
        CHANNELS
            .iter()
            .find_map(|ch| self.vals[*ch].get(key))
            .or_else(|| {
                CHANNELS.iter().find_map(|ch| {
                    self.ops[*ch]
                        .set
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v)
                        .or_else(|| self.stored[*ch].as_ref().and_then(|m| m.get(key)))
                })
            })
            .cloned()
    }

    /// Current value of `key` outside the store's unread data.
    fn known_value(&self, key: &str, home: Channel) -> Option<String> {
        let order = channel_order(home);
        order
            .iter()
            .find_map(|ch| self.vals[*ch].get(key))
            .or_else(|| {
                order
                    .iter()
                    .find_map(|ch| self.stored[*ch].as_ref().and_then(|m| m.get(key)))
            })
            .cloned()
    }
}

impl Session {
    /// Compute everything `d` does to this session: validate, then Destroy,
    /// Regenerate, Deletes, Sets, Incrs (SPEC section 4's order), then move
    /// misplaced values, spill, check the limits, and seal the cookies and
    /// plan the one store batch. On error nothing is returned to apply.
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
        let mut w = Work::new(self, s);
        w.destroy_user = d.destroy_user;
        if d.destroy {
            w.destroy();
        }
        if d.regenerate {
            w.regenerate();
        }
        for key in &d.delete {
            w.delete(key);
        }
        for (key, value) in &d.set {
            w.set(s.policies.for_write(key).expect("validated"), key, value);
        }
        for (key, n) in &d.incr {
            w.incr(s.policies.for_write(key).expect("validated"), key, *n)?;
        }
        let wrote = !d.set.is_empty() || !d.incr.is_empty();
        if !w.begin(wrote, cx) {
            // Nothing to keep: Deletes on no session, or a bare Destroy.
            return self.seal(cx, w, false, None);
        }
        let changed = w.dirty.iter().any(|d| *d) || w.ops.iter().any(|o| !o.is_empty());
        if changed {
            self.normalize(&mut w, cx);
        }
        self.spill(&mut w, cx)?;
        let grows = wrote && w.store_ok;
        let limits = self.check_limits(&w, cx, grows)?;
        w.mark_store_data();
        let touch = w.touch(cx);
        self.seal(cx, w, touch, limits)
    }

    fn validate(&self, d: &Directives, cx: &WriteContext) -> Result<(), DirectiveError> {
        let s = cx.settings;
        if self.unchecked && !d.is_empty() {
            return Err(err(DirectiveErrorKind::StoreUnavailable,
                "the session store is unavailable, so session.revocation cannot tell whether this session is live".to_string(),
            ));
        }
        if let Some(k) = s
            .users
            .as_ref()
            .and_then(|u| d.incr.iter().find(|(k, _)| *k == u.key))
            .map(|(k, _)| k)
        {
            // The index must know who the session belongs to when the
            // write is planned; an Incr's result is known to the store only.
            return Err(err(
                DirectiveErrorKind::NotAllowed,
                format!("X-Session-Incr: `{k}` is session.user_key"),
            ));
        }
        if d.destroy_user && s.users.is_none() {
            return Err(err(
                DirectiveErrorKind::BadValue,
                "X-Session-Destroy: user needs session.user_key".to_string(),
            ));
        }
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
        let store_ok = w.store_ok;
        for ch in CHANNELS {
            let misplaced: Vec<(String, String)> = w.vals[ch]
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
                    w.cookie_remove(ch, &k);
                    if !w.vals[home].contains_key(&k) {
                        w.cookie_set(home, &k, v);
                    }
                } else if store_ok {
                    w.cookie_remove(ch, &k);
                    w.store_set(home, &k, v);
                }
            }
            if !store_ok {
                continue;
            }
            let Some(stored) = w.stored[ch].clone() else {
                continue;
            };
            for (k, v) in stored {
                if w.written.contains(&k) {
                    continue;
                }
                let p = s.policies.for_read(&k);
                let home = p.channel();
                let spilled = p.clientside && home == ch && w.flags[ch].contains(Flags::SPILL);
                if (!p.clientside && home == ch) || spilled || (home.secure() && !cx.https) {
                    continue;
                }
                w.store_delete(ch, &k);
                if p.clientside {
                    if !w.vals[home].contains_key(&k) {
                        w.cookie_set(home, &k, v);
                    }
                } else {
                    w.store_set(home, &k, v);
                }
            }
        }
    }

    /// Keep every `Set-Cookie` line within 4096 bytes: move the largest
    /// clientside values of an overflowing channel to the store, or fail
    /// without one.
    fn spill(&self, w: &mut Work, cx: &WriteContext) -> Result<(), DirectiveError> {
        for ch in CHANNELS {
            if !w.dirty[ch] {
                continue;
            }
            let room = MAX_SET_COOKIE.saturating_sub(cx.spec.overhead(ch));
            loop {
                // The sealed length depends on the values and fixed-size
                // fields only.
                let probe = Payload {
                    meta: w.meta.expect("begun"),
                    flags: w.flags[ch] | Flags::STORE | Flags::SPILL,
                    values: std::mem::take(&mut w.vals[ch]),
                };
                let len = codec::sealed_len(&probe, cx.encrypt);
                w.vals[ch] = probe.values;
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
                let Some(k) = w.vals[ch]
                    .iter()
                    .max_by_key(|(_, v)| v.len())
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                let v = w.vals[ch].remove(&k).expect("present");
                w.store_set(ch, &k, v);
                w.flags[ch] |= Flags::SPILL;
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
        for ch in CHANNELS {
            if let Some(m) = &w.stored[ch] {
                known.channels[ch.index()] = m.clone();
            }
        }
        known.check(&check).map_err(DirectiveError::from)?;
        let unread = CHANNELS
            .iter()
            .any(|ch| w.flags[*ch].contains(Flags::STORE) && w.stored[*ch].is_none())
            || (!cx.https && !w.out.destroyed && cx.settings.policies.any_secure());
        if w.ops.iter().any(|o| o.adds()) || (grows && unread) {
            Ok(Some(check))
        } else {
            Ok(None)
        }
    }

    /// The response's cookies (sealed, or cleared) and its one store batch.
    fn seal(
        &self,
        cx: &WriteContext,
        mut w: Work,
        touch: bool,
        limits: Option<LimitCheck>,
    ) -> Result<Outcome, DirectiveError> {
        let (users, force) = self.user_writes(cx, &w);
        let mut out = std::mem::take(&mut w.out);
        out.meta = w.meta;
        if w.destroy_user {
            // The user the request's session belonged to, whatever the
            // response set after (a "log out everywhere, stay logged in
            // here" sets the same user again on the new session).
            out.end_user = cx.settings.users.as_ref().and_then(|p| {
                self.meta?;
                self.get(&p.key, cx.settings).map(user_hash)
            });
        }
        for ch in CHANNELS {
            match w.meta {
                Some(m) => {
                    let exists = w.present[ch]
                        || !w.vals[ch].is_empty()
                        || w.flags[ch].contains(Flags::STORE);
                    let changed =
                        w.dirty[ch] || touch || self.reissue || out.created || out.regenerated;
                    // Nothing to send: no cookie for the channel, or it
                    // exists and did not change.
                    if !exists || (w.present[ch] && !changed) {
                        if w.clear[ch] {
                            out.set_cookies.push(cx.spec.clear_line(ch, cx.https));
                        }
                        continue;
                    }
                    out.set_cookies.push(self.cookie_line(cx, &mut w, ch, m)?);
                }
                None if w.clear[ch] => out.set_cookies.push(cx.spec.clear_line(ch, cx.https)),
                None => {}
            }
        }
        // A browser that gets a session cookie over HTTPS and has no
        // binding gets one (what a regenerate grace is bound to). Over
        // plain HTTP anyone on the path, or on a sibling domain, could plant
        // one, so there is no grace there.
        if cx.https
            && cx.settings.regenerate_grace > 0
            && self.binding.is_none()
            && out.sets_a_cookie()
        {
            let value = crate::model::SessionId::random().hex();
            out.set_cookies.push(cx.spec.binding_line(
                &value,
                cx.settings.lifetime,
                cx.now,
                cx.https,
            ));
        }
        out.batch = self.plan_batch(cx, w, touch, force, limits);
        if let Some(b) = &mut out.batch {
            b.users = users;
        }
        Ok(out)
    }

    /// `session.user_key`: how this response changes its users' indexes,
    /// and whether that alone needs a store write (a login, a logout, a
    /// Regenerate; a plain refresh of "last seen" rides on a write that
    /// happens anyway).
    fn user_writes(&self, cx: &WriteContext, w: &Work) -> (Vec<UserWrite>, bool) {
        let Some(p) = &cx.settings.users else {
            return (Vec::new(), false);
        };
        let before = self
            .meta
            .and_then(|m| self.get(&p.key, cx.settings).map(|u| (m, u.to_string())));
        let after = w.meta.and_then(|m| w.value(&p.key).map(|u| (m, u)));
        let entry = |m: &Meta| UserSession {
            id: m.id.hex(),
            tag: m.tag,
            created: m.created,
            seen: cx.now,
            expires: m.expires,
            ip: cx.ip.filter(|_| p.track_ip).map(str::to_string),
            user_agent: cx
                .user_agent
                .filter(|_| p.track_user_agent)
                .map(|ua| ua.chars().take(256).collect()),
        };
        let mut out = Vec::new();
        match (&before, &after) {
            (Some((bm, bu)), Some((am, au))) if bu == au => {
                let moved = bm.id != am.id;
                out.push(UserWrite::Join {
                    user: user_hash(au),
                    entry: entry(am),
                    replaces: moved.then_some(bm.id),
                    max: None,
                });
                (out, moved)
            }
            _ => {
                if let Some((bm, bu)) = &before {
                    out.push(UserWrite::Leave {
                        user: user_hash(bu),
                        id: bm.id,
                    });
                }
                if let Some((am, au)) = &after {
                    out.push(UserWrite::Join {
                        user: user_hash(au),
                        entry: entry(am),
                        replaces: None,
                        max: p.max_per_user,
                    });
                }
                let changed = !out.is_empty();
                (out, changed)
            }
        }
    }

    /// One channel's `Set-Cookie` line.
    fn cookie_line(
        &self,
        cx: &WriteContext,
        w: &mut Work,
        ch: Channel,
        m: Meta,
    ) -> Result<String, DirectiveError> {
        let payload = Payload {
            meta: m,
            flags: w.flags[ch],
            values: std::mem::take(&mut w.vals[ch]),
        };
        let value = cx.codec.seal(cx.spec.name(ch), &payload);
        let expires = ch.permanent().then_some(m.expires);
        let line = cx.spec.set_line(ch, &value, expires, cx.now, cx.https);
        if w.rename_from.is_some() && cx.settings.regenerate_grace > 0 {
            w.sealed.push((ch, value.clone()));
        }
        if line.len() > MAX_SET_COOKIE {
            return Err(err(
                DirectiveErrorKind::CookieTooLarge,
                format!(
                    "the Set-Cookie line for `{}` would exceed 4096 bytes",
                    cx.spec.name(ch)
                ),
            ));
        }
        Ok(line)
    }

    /// The store batch: field operations, a Destroy or Regenerate, a touch,
    /// or only a limit check; `None` when the store has nothing to do.
    fn plan_batch(
        &self,
        cx: &WriteContext,
        w: Work,
        touch: bool,
        force: bool,
        limits: Option<LimitCheck>,
    ) -> Option<WriteBatch> {
        let store_touch =
            touch && !self.degraded && w.flags.iter().any(|f| f.contains(Flags::STORE));
        let has_ops = w.ops.iter().any(|o| !o.is_empty());
        let needed = has_ops
            || w.rename_from.is_some()
            || w.destroy.is_some()
            || store_touch
            || force
            || limits.is_some();
        let check_ended = cx.settings.revocation;
        let grace = cx.settings.regenerate_grace;
        // A write to the session the request carried first asks whether a
        // parallel request regenerated it (the gateway then applies the
        // response to the new session instead).
        let check_moved = grace > 0 && self.meta.is_some();
        match w.meta {
            Some(m) if needed => {
                let expire_at = match cx.settings.idle_timeout {
                    Some(idle) => m.expires.min(m.touched.saturating_add(idle)),
                    None => m.expires,
                };
                let mut b = WriteBatch::new(StoreKey::from(m), expire_at);
                b.destroy = w.destroy;
                b.rename_from = w.rename_from;
                b.channels = w.ops.0;
                b.limits = limits;
                b.end = w.end;
                b.check_ended = check_ended;
                b.check_moved = check_moved;
                // The forward is bound to the browser's binding cookie: a
                // login from a browser without one leaves none.
                if let (true, Some(binding)) = (
                    b.rename_from.is_some() && grace > 0 && cx.https && !w.sealed.is_empty(),
                    self.binding.as_deref(),
                ) {
                    let header: Vec<String> = w
                        .sealed
                        .iter()
                        .map(|(ch, v)| format!("{}={v}", cx.spec.name(*ch)))
                        .collect();
                    // Sealed: whoever reads the store must not get cookies.
                    let until = cx.now.saturating_add(grace);
                    let plain = super::read::Forwarded {
                        old: &self.meta.expect("regenerated").id.hex(),
                        until,
                        https: cx.https,
                        binding,
                        cookies: &header.join("; "),
                    }
                    .encode();
                    let forward = cx
                        .codec
                        .seal_private(super::read::FORWARD, plain.as_bytes());
                    b.forward = Some((forward, until));
                }
                Some(b)
            }
            _ => w.destroy.map(|old| {
                let mut b = WriteBatch::new(old, 0);
                b.destroy = Some(old);
                b.end = w.end;
                b.check_moved = check_moved;
                b
            }),
        }
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
        super::super::test_settings(declared, idle)
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
                ip: None,
                user_agent: None,
                tag: None,
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
    fn revocation_remembers_every_ended_id_in_the_same_batch() {
        let mut env = Env::new(Some(10_000));
        env.settings.revocation = true;
        let start = Session::default()
            .apply(&d(&[("c", "1")]), &env.cx(1000))
            .unwrap();
        let meta = start.meta.unwrap();
        let s = env.session(&start.set_cookies, 2000);
        // Destroy of a cookie-only session: a batch that only ends it.
        let o = s
            .apply(
                &Directives {
                    destroy: true,
                    ..Default::default()
                },
                &env.cx(2000),
            )
            .unwrap();
        let b = o.batch.expect("the end is a store write");
        assert!(b.destroy_only());
        assert_eq!(b.end, vec![(meta.id, ended_until(meta.expires))]);
        // Regenerate: the old id ends with the session's absolute expiry,
        // and the write refuses to continue a session ended meanwhile.
        let o = s
            .apply(
                &Directives {
                    regenerate: true,
                    ..Default::default()
                },
                &env.cx(2000),
            )
            .unwrap();
        let b = o.batch.unwrap();
        assert_eq!(b.rename_from, Some(meta.id));
        assert_eq!(b.end, vec![(meta.id, ended_until(meta.expires))]);
        assert!(b.check_ended && b.key.id != meta.id && b.key.tag == meta.tag);
        // Destroy + Set: the new session keeps the tag, the old id ends.
        let mut both = d(&[("c", "2")]);
        both.destroy = true;
        let b = s.apply(&both, &env.cx(2000)).unwrap().batch.unwrap();
        assert_eq!(
            (b.destroy.map(|k| k.id), b.key.tag),
            (Some(meta.id), meta.tag)
        );
        assert_eq!(b.end, vec![(meta.id, ended_until(meta.expires))]);
        // Gone idle: the cookie is cleared and the id ended, even on a
        // request that writes nothing.
        let idle = env.session(&start.set_cookies, 20_000);
        assert_eq!(idle.idle_ended.map(|m| m.id), Some(meta.id));
        let o = idle.apply(&Directives::default(), &env.cx(20_000)).unwrap();
        assert!(o.set_cookies[0].contains("Max-Age=0"));
        let b = o.batch.unwrap();
        assert!(b.destroy_only() && b.end == vec![(meta.id, ended_until(meta.expires))]);
        // Past the absolute lifetime there is nothing to remember.
        let late = env.session(&start.set_cookies, meta.expires + 1);
        assert!(late.expired && late.idle_ended.is_none());
        // Without revocation nothing of this happens.
        env.settings.revocation = false;
        let s = env.session(&start.set_cookies, 2000);
        let o = s
            .apply(
                &Directives {
                    destroy: true,
                    ..Default::default()
                },
                &env.cx(2000),
            )
            .unwrap();
        assert!(o.batch.is_some_and(|b| b.end.is_empty() && !b.check_ended));
        assert!(env.session(&start.set_cookies, 20_000).idle_ended.is_none());
    }

    #[test]
    fn an_unchecked_session_takes_no_directive() {
        let env = Env::new(None);
        let s = Session {
            unchecked: true,
            degraded: true,
            ..Default::default()
        };
        let e = s.apply(&d(&[("c", "1")]), &env.cx(1000)).unwrap_err();
        assert_eq!(e.kind, DirectiveErrorKind::StoreUnavailable);
        let o = s.apply(&Directives::default(), &env.cx(1000)).unwrap();
        assert!(o.set_cookies.is_empty() && o.batch.is_none());
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
        assert!(s.flags(Channel::Perm).contains(Flags::STORE));
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
