//! The request side: cookies in, store read plan, headers to the upstream.

use super::Session;
use crate::codec::Codec;
use crate::cookie::{self, CookieSpec};
use crate::model::{
    Channel, ChannelSet, Flags, KeySet, LocalAnswer, Meta, OnError, OnMissing, Payload, Rejection,
    Settings, CHANNELS,
};
use crate::store::{Check, Read, StoreError, StoreKey};
use percent_encoding::{AsciiSet, CONTROLS};
use std::borrow::Cow;

/// One request's store read: the session, the channels to read, and what
/// to ask besides (ended: `session.revocation`; moved:
/// `session.regenerate_grace`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreRead {
    pub key: StoreKey,
    pub mask: ChannelSet,
    pub check: Check,
}

/// Cookies of one name looked at per request; more are ignored.
const MAX_COOKIES_PER_NAME: usize = 4;

/// What the proxy knows about the request.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo {
    pub https: bool,
    pub now: u64,
}

/// Headers for the upstream, computed from the session.
#[derive(Debug, Default)]
pub struct Forward {
    /// `X-Session` value: urlencoded readable keys, sorted.
    pub x_session: Option<String>,
    /// The route's `headers:` map entries whose key is set.
    pub mapped: Vec<(String, String)>,
}

/// One header for the upstream: name and value, static where they can be.
pub type UpstreamHeader = (Cow<'static, str>, Cow<'static, str>);

/// `%`, control bytes and (via `utf8_percent_encode`) every byte >= 0x80.
const HEADER_VALUE: &AsciiSet = &CONTROLS.add(b'%');

impl Session {
    /// Read our cookies from every `Cookie` header. Secure-channel cookies are
    /// ignored over plain HTTP (browsers do not send them; a forged one must
    /// not reveal secure keys).
    pub fn from_cookies<'a>(
        codec: &Codec,
        spec: &CookieSpec,
        settings: &Settings,
        headers: impl Iterator<Item = &'a [u8]>,
        req: RequestInfo,
    ) -> Session {
        let mut s = Session::default();
        let mut rejected = [false; 4];
        // Every valid cookie of each channel: a browser holding two of one
        // name (one planted at a longer path or by a sibling domain) sends
        // both, and the real one must not be lost to the planted one.
        let mut valid: [Vec<(Payload, bool)>; 4] = Default::default();
        let mut seen = [0usize; 4];
        let mut bindings = 0;
        for h in headers {
            for (name, value) in cookie::pairs(h) {
                if name == spec.binding_name(req.https).as_bytes() {
                    // Two of them: one was planted; trust neither.
                    bindings += 1;
                    s.binding = std::str::from_utf8(value)
                        .ok()
                        .filter(|v| bindings == 1 && valid_binding(v.as_bytes()))
                        .map(str::to_string);
                    continue;
                }
                let Some(ch) = spec.channel_exact(name) else {
                    continue;
                };
                let i = ch.index();
                // Bound the work an attacker can ask for.
                if (ch.secure() && !req.https) || seen[i] >= MAX_COOKIES_PER_NAME {
                    continue;
                }
                seen[i] += 1;
                let opened = std::str::from_utf8(value)
                    .map_err(|_| Rejection::Malformed)
                    .and_then(|v| codec.open(spec.name(ch), v));
                match opened {
                    Ok(o) => valid[i].push((o.payload, o.stale)),
                    Err(r) => {
                        s.rejections.push(r);
                        rejected[i] = true;
                    }
                }
            }
        }
        // One request, one session. The first valid cookie names it; on
        // HTTPS the secure channels are asked first, because a plain cookie
        // can be planted over plain HTTP while a `__Secure-` one cannot.
        // Each channel then uses its cookie of that session; a channel whose
        // cookies all belong to another session (a stale leftover or a
        // planted one) is dropped and cleared.
        const HTTPS_ORDER: [Channel; 4] = [
            Channel::SecurePerm,
            Channel::SecureTrans,
            Channel::Perm,
            Channel::Trans,
        ];
        let order = if req.https { HTTPS_ORDER } else { CHANNELS };
        let primary = order
            .iter()
            .find_map(|ch| valid[ch.index()].first())
            .map(|(p, _)| (p.meta.id, p.meta.tag));
        for ch in CHANNELS {
            let i = ch.index();
            let mine = std::mem::take(&mut valid[i])
                .into_iter()
                .find(|(p, _)| Some((p.meta.id, p.meta.tag)) == primary);
            match mine {
                Some((p, stale)) => {
                    s.reissue |= stale;
                    s.cookies[i] = Some(p);
                }
                // Only cookies of another session, or only rejected ones.
                None => s.clear[i] = seen[i] > 0 && (rejected[i] || primary.is_some()),
            }
        }
        let mut meta: Option<Meta> = None;
        for ch in CHANNELS {
            let Some(p) = &s.cookies[ch.index()] else {
                continue;
            };
            match &mut meta {
                None => meta = Some(p.meta),
                Some(m) => m.touched = m.touched.max(p.meta.touched),
            }
        }
        if let Some(m) = meta {
            let idle_over = settings
                .idle_timeout
                .is_some_and(|idle| req.now >= m.touched.saturating_add(idle));
            if req.now >= m.expires || idle_over {
                if settings.revocation && req.now < m.expires {
                    s.idle_ended = Some(m);
                }
                for ch in CHANNELS {
                    if s.cookies[ch.index()].take().is_some() {
                        s.clear[ch.index()] = true;
                        s.rejections.push(Rejection::Expired);
                    }
                }
                s.expired = true;
                s.reissue = false;
                meta = None;
            }
        }
        s.meta = meta;
        s
    }

    /// Store channels to read for a route that reads `read` and also needs
    /// `extra` keys (`require:` gate). None when the route reads no key that
    /// could live in the store, or the cookie says the store holds nothing.
    pub fn load_plan(&self, settings: &Settings, read: &KeySet, extra: &[String]) -> ChannelSet {
        if self.meta.is_none() || !settings.has_store {
            return ChannelSet::NONE;
        }
        let mut set = ChannelSet::NONE;
        for ch in CHANNELS {
            let flags = self.flags(ch);
            if !flags.contains(Flags::STORE) {
                continue;
            }
            // A key could sit in this channel's store hash if its policy puts
            // it there, or if it was spilled there from this channel's cookie.
            let could_hold = |k: &str| {
                let p = settings.policies.for_read(k);
                p.channel() == ch && (!p.clientside || flags.contains(Flags::SPILL))
            };
            let needed = match read {
                KeySet::All => true,
                KeySet::None => false,
                KeySet::Only(keys) => keys.iter().any(|k| could_hold(k)),
            } || extra.iter().any(|k| could_hold(k))
                // Who owns the session is needed to keep its user's index.
                || settings.users.as_ref().is_some_and(|u| could_hold(&u.key));
            if needed {
                set.insert(ch);
            }
        }
        set
    }

    /// The store read this request needs, or `None`: SPEC section 6's "at
    /// most one round trip to read, none when nothing to read" — except that
    /// with `session.revocation` every session is checked (in the same
    /// round trip as its read).
    pub fn load_request(
        &self,
        settings: &Settings,
        read: &KeySet,
        require: &[String],
    ) -> Option<StoreRead> {
        let meta = self.meta?;
        let mask = self.load_plan(settings, read, require);
        let check = Check {
            ended: settings.revocation,
            // Only asked on a read that happens anyway: the forward costs
            // no round trip of its own.
            moved: settings.regenerate_grace > 0,
        };
        (!mask.is_empty() || check.ended).then_some(StoreRead {
            key: StoreKey::from(meta),
            mask,
            check,
        })
    }

    /// Take in the store read's result. `Err` when it failed and
    /// `on_error: fail` says to answer 503; under `degrade` the session goes
    /// on with its clientside keys only — or, when the read was also the
    /// revocation check, as no session at all. An ended session is no
    /// session; its cookies are left alone (a parallel request's clearing
    /// line could land after the new login's cookie and delete it).
    pub fn absorb(
        &mut self,
        result: Result<Read, StoreError>,
        asked: &StoreRead,
        on_error: OnError,
    ) -> Result<(), StoreError> {
        match result {
            Ok(read) if read.ended => {
                self.forget();
                self.revoked = true;
                Ok(())
            }
            Ok(read) => {
                self.stored = read.channels;
                Ok(())
            }
            Err(e) if on_error == OnError::Fail => Err(e),
            Err(_) => {
                self.degraded = true;
                if asked.check.ended {
                    self.forget();
                    self.unchecked = true;
                }
                Ok(())
            }
        }
    }

    /// The session a request still carrying a regenerated id continues
    /// within `session.regenerate_grace`: read from the new session's
    /// cookies (`moved`, as the store kept them, sealed under the secret),
    /// and re-issued to the browser.
    ///
    /// Only for the browser that logged in: the forward is bound to its
    /// binding cookie ([`CookieSpec::binding_line`]), a random value
    /// whoever planted the pre-login cookie (session fixation) does not
    /// have; to the old id and the forward's end; and a login over HTTPS is
    /// never continued over plain HTTP. `None` otherwise.
    pub fn follow(
        &self,
        codec: &Codec,
        spec: &CookieSpec,
        settings: &Settings,
        moved: &str,
        req: RequestInfo,
    ) -> Option<Session> {
        use subtle::ConstantTimeEq;
        let binding = self.binding.as_deref()?;
        let old = self.meta?.id;
        let plain = codec.open_private(FORWARD, moved)?;
        let f = Forwarded::parse(std::str::from_utf8(&plain).ok()?)?;
        let bound = bool::from(f.binding.as_bytes().ct_eq(binding.as_bytes()));
        if !bound || f.old != old.hex() || f.until <= req.now || (f.https && !req.https) {
            return None;
        }
        let mut s = Session::from_cookies(
            codec,
            spec,
            settings,
            std::iter::once(f.cookies.as_bytes()),
            req,
        );
        s.meta?;
        s.binding = Some(binding.to_string());
        s.reissue = true;
        s.followed = true;
        Some(s)
    }

    /// Treat the request as carrying no session (without clearing cookies).
    fn forget(&mut self) {
        self.meta = None;
        self.cookies = Default::default();
        self.stored = Default::default();
        self.reissue = false;
    }

    /// The `require:` gate: `None` when every required key is set (and
    /// visible); otherwise the route's `on_missing` answer, which also clears
    /// rejected cookies. `path_and_query` fills a redirect's `{path}`.
    pub fn gate(
        &self,
        settings: &Settings,
        require: &[String],
        on_missing: &OnMissing,
        spec: &CookieSpec,
        https: bool,
        path_and_query: &str,
    ) -> Option<LocalAnswer> {
        if require.is_empty() || self.has_all(settings, require, https) {
            return None;
        }
        let mut answer = match on_missing {
            OnMissing::Redirect(target) => {
                let enc = percent_encoding::utf8_percent_encode(
                    path_and_query,
                    percent_encoding::NON_ALPHANUMERIC,
                );
                let mut a = LocalAnswer::text(302, "login required\n");
                a.headers
                    .push(("location", target.replace("{path}", &enc.to_string())));
                a
            }
            OnMissing::Status(code) => LocalAnswer::text(*code, "session required\n"),
        };
        for ch in CHANNELS {
            if self.clear[ch.index()] {
                answer
                    .headers
                    .push(("set-cookie", spec.clear_line(ch, https)));
            }
        }
        Some(answer)
    }

    /// The headers the gateway adds to the upstream request (after the
    /// spoofable ones were stripped), all built here: the scheme, the client
    /// address, the session's identity, `X-Session` and the mapped headers.
    pub fn upstream_headers(
        &self,
        forward: Forward,
        https: bool,
        client_ip: Option<std::net::IpAddr>,
        prior_xff: &[String],
    ) -> Vec<UpstreamHeader> {
        // Static names and values where they fit: this runs on every
        // request, and each `String` here was an allocation.
        let mut h: Vec<UpstreamHeader> = Vec::with_capacity(8 + forward.mapped.len());
        let proto = if https { "https" } else { "http" };
        h.push(("x-forwarded-proto".into(), proto.into()));
        let mut xff = prior_xff.join(", ");
        if let Some(ip) = client_ip {
            if !xff.is_empty() {
                xff.push_str(", ");
            }
            crate::headers::push_ip(&mut xff, ip);
        }
        if !xff.is_empty() {
            h.push(("x-forwarded-for".into(), xff.into()));
        }
        if let Some(m) = self.meta {
            let mut n = itoa::Buffer::new();
            h.push(("x-session-id".into(), m.id.hex().into()));
            h.push((
                "x-session-created".into(),
                n.format(m.created / 1000).to_string().into(),
            ));
            h.push((
                "x-session-expires".into(),
                n.format(m.expires / 1000).to_string().into(),
            ));
        }
        if https {
            h.push(("x-session-secure".into(), "1".into()));
        }
        if self.degraded {
            h.push(("x-session-degraded".into(), "1".into()));
        }
        if let Some(x) = forward.x_session {
            h.push(("x-session".into(), x.into()));
        }
        for (name, value) in forward.mapped {
            h.push((name.into(), value.into()));
        }
        h
    }

    /// The `X-Session` value and mapped headers for a route. `Err(size)` when
    /// the readable keys would exceed `limits.forward_bytes`.
    pub fn forward(
        &self,
        settings: &Settings,
        read: &KeySet,
        headers: &[(String, String)],
        https: bool,
    ) -> Result<Forward, usize> {
        let mut out = Forward::default();
        if self.meta.is_none() {
            return Ok(out);
        }
        let visible = |k: &str| https || !settings.policies.for_read(k).secure;
        if !read.is_none() {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            let mut any = false;
            for (k, v) in self.entries(settings) {
                if read.contains(k) && visible(k) {
                    ser.append_pair(k, v);
                    any = true;
                }
            }
            if any {
                let s = ser.finish();
                if s.len() > settings.limits.forward_bytes {
                    return Err(s.len());
                }
                out.x_session = Some(s);
            }
        }
        for (header, key) in headers {
            if !visible(key) {
                continue;
            }
            if let Some(v) = self.get(key, settings) {
                out.mapped.push((header.clone(), encode_header_value(v)));
            }
        }
        Ok(out)
    }

    /// Are all `keys` set (an empty string counts as set) and visible?
    pub fn has_all(&self, settings: &Settings, keys: &[String], https: bool) -> bool {
        keys.iter().all(|k| {
            (https || !settings.policies.for_read(k).secure) && self.get(k, settings).is_some()
        })
    }
}

/// Purpose of the sealed record a Regenerate leaves for its grace.
pub(super) const FORWARD: &str = "regenerate-forward";

/// What a Regenerate leaves for its grace (sealed with
/// [`Codec::seal_private`]): the old id, until when, whether the login was
/// over HTTPS, the browser binding it is for, and the new cookies.
pub(super) struct Forwarded<'a> {
    pub old: &'a str,
    pub until: u64,
    pub https: bool,
    pub binding: &'a str,
    pub cookies: &'a str,
}

impl<'a> Forwarded<'a> {
    pub fn encode(&self) -> String {
        format!(
            "v1\n{}\n{}\n{}\n{}\n{}",
            self.old,
            self.until,
            if self.https { "s" } else { "p" },
            self.binding,
            self.cookies
        )
    }

    fn parse(s: &'a str) -> Option<Forwarded<'a>> {
        let mut it = s.splitn(6, '\n');
        if it.next()? != "v1" {
            return None;
        }
        Some(Forwarded {
            old: it.next()?,
            until: it.next()?.parse().ok()?,
            https: it.next()? == "s",
            binding: it.next()?,
            cookies: it.next()?,
        })
    }
}

/// A binding cookie's value: 32 lowercase hex digits.
fn valid_binding(v: &[u8]) -> bool {
    v.len() == 32
        && v.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// A value as a header: `%`, control bytes, bytes >= 0x80 and leading or
/// trailing spaces percent-encoded, everything else as is.
pub fn encode_header_value(v: &str) -> String {
    let body = v.trim_matches(' ');
    let lead = v.len() - v.trim_start_matches(' ').len();
    let trail = if body.is_empty() {
        0
    } else {
        v.len() - v.trim_end_matches(' ').len()
    };
    let mut s = String::with_capacity(v.len() + 8);
    for _ in 0..lead {
        s.push_str("%20");
    }
    s.extend(percent_encoding::utf8_percent_encode(body, HEADER_VALUE));
    for _ in 0..trail {
        s.push_str("%20");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cookie::{SameSite, SecureMode};
    use crate::model::{Flags, SessionId};
    use std::collections::BTreeMap;

    fn settings() -> Settings {
        super::super::test_settings(Default::default(), None)
    }

    /// A session whose plain cookie says the store holds data.
    fn session(flags: Flags) -> Session {
        let meta = Meta {
            id: SessionId([7; 16]),
            tag: 3,
            created: 1,
            expires: u64::MAX,
            touched: 1,
        };
        let mut s = Session {
            meta: Some(meta),
            ..Default::default()
        };
        s.cookies[Channel::Perm.index()] = Some(Payload {
            meta,
            flags,
            values: BTreeMap::new(),
        });
        s
    }

    #[test]
    fn load_request_reads_only_what_the_cookie_promises() {
        let st = settings();
        let s = session(Flags::STORE);
        let r = s.load_request(&st, &KeySet::All, &[]).unwrap();
        assert_eq!((r.key.id, r.key.tag), (SessionId([7; 16]), 3));
        assert!(r.mask.contains(Channel::Perm) && !r.mask.contains(Channel::Trans));
        assert!(!r.check.ended);
        assert!(s.load_request(&st, &KeySet::None, &[]).is_none());
        assert!(s
            .load_request(&st, &KeySet::None, &["user".to_string()])
            .is_some());
        assert!(session(Flags::NONE)
            .load_request(&st, &KeySet::All, &[])
            .is_none());
        assert!(Session::default()
            .load_request(&st, &KeySet::All, &[])
            .is_none());
        // Revocation: every session is checked, even one the cookie holds whole.
        let st = Settings {
            revocation: true,
            ..settings()
        };
        let r = session(Flags::NONE)
            .load_request(&st, &KeySet::None, &[])
            .unwrap();
        assert!(r.check.ended && r.mask.is_empty());
        assert!(Session::default()
            .load_request(&st, &KeySet::All, &[])
            .is_none());
    }

    #[test]
    fn absorb_follows_on_error_and_the_revocation_check() {
        let st = settings();
        let asked = |ended| StoreRead {
            key: StoreKey {
                id: SessionId([7; 16]),
                tag: 3,
            },
            mask: ChannelSet::ALL,
            check: Check {
                ended,
                moved: false,
            },
        };
        let mut s = session(Flags::STORE);
        let mut read = Read::default();
        read.channels[0] = Some(BTreeMap::from([("user".to_string(), "ann".to_string())]));
        s.absorb(Ok(read.clone()), &asked(false), OnError::Fail)
            .unwrap();
        assert_eq!(s.get("user", &st), Some("ann"));
        let mut s = session(Flags::STORE);
        assert!(s
            .absorb(Err(StoreError::Timeout), &asked(false), OnError::Fail)
            .is_err());
        assert!(!s.degraded);
        s.absorb(Err(StoreError::Timeout), &asked(false), OnError::Degrade)
            .unwrap();
        assert!(s.degraded && s.meta.is_some() && !s.unchecked);
        // A failed check under degrade: no session at all.
        let mut s = session(Flags::STORE);
        s.absorb(Err(StoreError::Timeout), &asked(true), OnError::Degrade)
            .unwrap();
        assert!(s.degraded && s.unchecked && s.meta.is_none());
        assert!(s.cookies.iter().all(Option::is_none));
        // Ended: no session, no data, nothing cleared.
        let mut s = session(Flags::STORE);
        read.ended = true;
        s.absorb(Ok(read), &asked(true), OnError::Fail).unwrap();
        assert!(s.revoked && s.meta.is_none() && s.get("user", &st).is_none());
        assert!(!s.clear.iter().any(|c| *c));
    }

    #[test]
    fn gate_answers_with_the_route_answer_and_clears_bad_cookies() {
        let st = settings();
        let spec = CookieSpec::new(
            "g",
            "/".into(),
            None,
            SameSite::Lax,
            SecureMode::Auto,
            false,
        );
        let mut s = session(Flags::NONE);
        let need = ["user".to_string()];
        let a = s
            .gate(&st, &need, &OnMissing::Status(403), &spec, false, "/x")
            .unwrap();
        assert_eq!((a.status, a.headers.len()), (403, 0));
        s.clear[Channel::Trans.index()] = true;
        let a = s
            .gate(
                &st,
                &need,
                &OnMissing::Redirect("/login?n={path}".into()),
                &spec,
                false,
                "/a b?q=1",
            )
            .unwrap();
        assert_eq!(a.status, 302);
        assert_eq!(
            a.headers[0],
            ("location", "/login?n=%2Fa%20b%3Fq%3D1".to_string())
        );
        assert!(a.headers[1].1.starts_with("g-t=; Max-Age=0"));
        s.stored[0] = Some(BTreeMap::from([("user".to_string(), String::new())]));
        assert!(s
            .gate(&st, &need, &OnMissing::Status(401), &spec, false, "/")
            .is_none());
        assert!(s
            .gate(&st, &[], &OnMissing::Status(401), &spec, false, "/")
            .is_none());
    }

    #[test]
    fn upstream_headers_are_built_in_one_place() {
        let s = session(Flags::NONE);
        let fwd = Forward {
            x_session: Some("user=ann".into()),
            mapped: vec![("X-Remote-User".into(), "ann".into())],
        };
        let ip = Some("10.0.0.9".parse().unwrap());
        let h = s.upstream_headers(fwd, true, ip, &["1.2.3.4".to_string()]);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_ref());
        assert_eq!(get("x-forwarded-proto"), Some("https"));
        assert_eq!(get("x-forwarded-for"), Some("1.2.3.4, 10.0.0.9"));
        assert_eq!(
            get("x-session-id"),
            Some("07070707070707070707070707070707")
        );
        assert_eq!(get("x-session-secure"), Some("1"));
        assert_eq!(get("x-session"), Some("user=ann"));
        assert_eq!(get("X-Remote-User"), Some("ann"));
        assert_eq!(get("x-session-degraded"), None);
        let h = Session::default().upstream_headers(Forward::default(), false, None, &[]);
        assert_eq!(
            h.len(),
            1,
            "only the scheme without a session or client: {h:?}"
        );
    }

    #[test]
    fn header_values() {
        assert_eq!(encode_header_value("alice"), "alice");
        assert_eq!(encode_header_value("a b"), "a b");
        assert_eq!(encode_header_value(" a b  "), "%20a b%20%20");
        assert_eq!(encode_header_value("   "), "%20%20%20");
        assert_eq!(encode_header_value("50%\r\nX: y"), "50%25%0D%0AX: y");
        assert_eq!(encode_header_value("é"), "%C3%A9");
        let encoded = encode_header_value(" ü%\t ");
        let decoded = percent_encoding::percent_decode_str(&encoded)
            .decode_utf8()
            .unwrap();
        assert_eq!(decoded, " ü%\t ");
    }
}
