//! Cookie names, the `Cookie` request header and `Set-Cookie` lines.

use crate::model::{Channel, CHANNELS};
use std::time::{Duration, UNIX_EPOCH};

/// A `Set-Cookie` value (name=value; attributes) never exceeds this.
pub const MAX_SET_COOKIE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecureMode {
    /// `Secure` when the request is HTTPS.
    Auto,
    Always,
    Never,
}

/// How our cookies are named and what attributes they carry.
#[derive(Clone, Debug)]
pub struct CookieSpec {
    names: [String; 4],
    /// Every spelling an upstream or a client could use for one of our
    /// cookies, lower-cased and without a `__Secure-` / `__Host-` prefix:
    /// `<name>`, `<name>-t`, `<name>-s`, `<name>-st`, and the browser
    /// binding `<name>-b`.
    bare: [String; 5],
    /// The browser binding cookie over HTTPS (`__Host-<name>-b`) and plain
    /// HTTP (`<name>-b`): see [`CookieSpec::binding_line`].
    binding: [String; 2],
    pub host_prefix: bool,
    pub path: String,
    pub domain: Option<String>,
    pub same_site: SameSite,
    pub secure: SecureMode,
    pub dev_insecure: bool,
}

impl CookieSpec {
    pub fn new(
        base: &str,
        path: String,
        domain: Option<String>,
        same_site: SameSite,
        secure: SecureMode,
        dev_insecure: bool,
    ) -> CookieSpec {
        let names = if dev_insecure {
            [
                base.to_string(),
                format!("{base}-t"),
                format!("{base}-s"),
                format!("{base}-st"),
            ]
        } else {
            [
                base.to_string(),
                format!("{base}-t"),
                format!("__Secure-{base}"),
                format!("__Secure-{base}-t"),
            ]
        };
        let b = base.to_ascii_lowercase();
        CookieSpec {
            names,
            bare: [
                b.clone(),
                format!("{b}-t"),
                format!("{b}-s"),
                format!("{b}-st"),
                format!("{b}-b"),
            ],
            binding: [
                if dev_insecure {
                    format!("{base}-b")
                } else {
                    format!("__Host-{base}-b")
                },
                format!("{base}-b"),
            ],
            host_prefix: false,
            path,
            domain,
            same_site,
            secure,
            dev_insecure,
        }
    }

    /// `session.cookie.host_prefix`: every channel named `__Host-<name>…`
    /// (secure channels `-s` / `-st`), which no sibling subdomain can set.
    pub fn with_host_prefix(mut self, on: bool) -> CookieSpec {
        if on {
            let b = &self.names[0];
            self.names = [
                format!("__Host-{b}"),
                format!("__Host-{b}-t"),
                format!("__Host-{b}-s"),
                format!("__Host-{b}-st"),
            ];
        }
        self.host_prefix = on;
        self
    }

    pub fn name(&self, ch: Channel) -> &str {
        &self.names[ch.index()]
    }

    /// The channel whose cookie has exactly this name (request cookies:
    /// browsers send names as they were set).
    pub fn channel_exact(&self, name: &[u8]) -> Option<Channel> {
        CHANNELS
            .into_iter()
            .find(|ch| self.names[ch.index()].as_bytes() == name)
    }

    /// Is this one of our cookie names in any spelling: any case, with or
    /// without a `__Secure-` / `__Host-` prefix, any channel suffix? Used
    /// to keep the upstream from setting our cookies and to keep our
    /// cookies from reaching the upstream.
    pub fn is_ours(&self, name: &[u8]) -> bool {
        let mut n = name.trim_ascii();
        for prefix in [&b"__secure-"[..], b"__host-"] {
            if n.len() >= prefix.len() && n[..prefix.len()].eq_ignore_ascii_case(prefix) {
                n = &n[prefix.len()..];
                break;
            }
        }
        self.bare
            .iter()
            .any(|b| b.as_bytes().eq_ignore_ascii_case(n))
    }

    /// The browser binding cookie's name for a request: on HTTPS only the
    /// `__Host-` one counts (neither a sibling subdomain nor a plain-HTTP
    /// attacker can set it).
    pub fn binding_name(&self, https: bool) -> &str {
        &self.binding[if https { 0 } else { 1 }]
    }

    /// Set the browser binding: a random value only this browser holds
    /// (`HttpOnly`, host-only, `Path=/`), which a regenerate grace is bound
    /// to, so that whoever planted a pre-login cookie cannot continue the
    /// login (session fixation).
    pub fn binding_line(&self, value: &str, lifetime_ms: u64, now_ms: u64, https: bool) -> String {
        let max_age = lifetime_ms.div_ceil(1000);
        let mut s = format!(
            "{}={value}; Max-Age={max_age}; Expires={}; Path=/; HttpOnly",
            self.binding_name(https),
            http_date(now_ms / 1000 + max_age)
        );
        if https && !self.dev_insecure {
            s.push_str("; Secure");
        }
        s.push_str("; SameSite=Lax");
        s
    }

    fn secure_attr(&self, ch: Channel, https: bool) -> bool {
        if self.dev_insecure {
            return false;
        }
        ch.secure()
            || match self.secure {
                SecureMode::Always => true,
                SecureMode::Never => false,
                SecureMode::Auto => https,
            }
    }

    /// `name=value; attributes` for setting a cookie. `expires_ms` is the
    /// absolute end for permanent cookies (`Max-Age` and `Expires`), `None`
    /// for browser-session cookies.
    pub fn set_line(
        &self,
        ch: Channel,
        value: &str,
        expires_ms: Option<u64>,
        now_ms: u64,
        https: bool,
    ) -> String {
        let mut s = String::with_capacity(self.attrs_len() + value.len() + 96);
        s.push_str(self.name(ch));
        s.push('=');
        s.push_str(value);
        if let Some(exp) = expires_ms {
            let max_age = exp.saturating_sub(now_ms).div_ceil(1000);
            s.push_str("; Max-Age=");
            s.push_str(&max_age.to_string());
            s.push_str("; Expires=");
            s.push_str(&http_date(now_ms / 1000 + max_age));
        }
        self.push_attrs(&mut s, ch, https);
        s
    }

    /// A line that deletes the cookie.
    pub fn clear_line(&self, ch: Channel, https: bool) -> String {
        let mut s = String::with_capacity(self.attrs_len() + 64);
        s.push_str(self.name(ch));
        s.push_str("=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
        self.push_attrs(&mut s, ch, https);
        s
    }

    /// Bytes a `Set-Cookie` line takes besides the value (upper bound, for
    /// deciding whether clientside values fit).
    pub fn overhead(&self, ch: Channel) -> usize {
        // name + "=" + "; Max-Age=" (up to 11 digits) + "; Expires=" + 29-byte date
        self.name(ch).len() + 1 + 10 + 11 + 10 + 29 + self.attrs_len()
    }

    fn attrs_len(&self) -> usize {
        // "; Path=" + path + "; Domain=" + domain + "; HttpOnly; Secure; SameSite=Strict"
        7 + self.path.len() + self.domain.as_ref().map_or(0, |d| 9 + d.len()) + 36
    }

    fn push_attrs(&self, s: &mut String, ch: Channel, https: bool) {
        s.push_str("; Path=");
        s.push_str(&self.path);
        if let Some(d) = &self.domain {
            s.push_str("; Domain=");
            s.push_str(d);
        }
        s.push_str("; HttpOnly");
        if self.secure_attr(ch, https) {
            s.push_str("; Secure");
        }
        s.push_str(match self.same_site {
            SameSite::Lax => "; SameSite=Lax",
            SameSite::Strict => "; SameSite=Strict",
            SameSite::None => "; SameSite=None",
        });
    }
}

fn http_date(unix_secs: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(unix_secs))
}

/// The `;`-separated parts of a `Cookie` header value, as
/// `header.split(|&b| b == b';')` yields them, found with `memchr`: our
/// cookie is a few hundred bytes, scanned twice on every request.
fn parts(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(header);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b';', r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Iterate over `name=value` pairs of one `Cookie` header value. Pairs without
/// `=` are skipped (browsers do not send them for our cookies).
pub fn pairs(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    parts(header).filter_map(|part| {
        let part = part.trim_ascii();
        let eq = part.iter().position(|&b| b == b'=')?;
        Some((part[..eq].trim_ascii(), part[eq + 1..].trim_ascii()))
    })
}

/// The `Cookie` header to send upstream: every `Cookie` field of the request
/// (HTTP/2 clients send several) merged into one, minus our own cookies.
/// `None` when nothing is left.
pub fn strip_ours<'a>(
    spec: &CookieSpec,
    headers: impl Iterator<Item = &'a [u8]>,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for h in headers {
        for part in parts(h) {
            let part = part.trim_ascii();
            if part.is_empty() {
                continue;
            }
            let name = part
                .iter()
                .position(|&b| b == b'=')
                .map_or(part, |eq| part[..eq].trim_ascii());
            if spec.is_ours(name) {
                continue;
            }
            if !out.is_empty() {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(part);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The name a browser sends back for the cookie a `Set-Cookie` line sets.
/// A nameless cookie (`=gimlet=A`, or `gimlet` without `=`) is stored with
/// an empty name and sent back as its value, `gimlet=A`: so its name, as
/// the app behind a browser will see it, is the value up to its first `=`.
pub fn set_cookie_name(line: &[u8]) -> &[u8] {
    let pair = line.split(|&b| b == b';').next().unwrap_or(line);
    match pair.iter().position(|&b| b == b'=') {
        Some(eq) if !pair[..eq].trim_ascii().is_empty() => pair[..eq].trim_ascii(),
        Some(eq) => {
            let value = pair[eq + 1..].trim_ascii();
            let end = value.iter().position(|&b| b == b'=').unwrap_or(value.len());
            value[..end].trim_ascii()
        }
        None => pair.trim_ascii(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_split_as_split_does() {
        for h in [
            &b""[..],
            b";",
            b";;",
            b"a",
            b"a;",
            b";a",
            b"a=1; b=2",
            b"a=1;b=2;",
            b" gimlet=AAAA ; x=1;;y",
        ] {
            let want: Vec<&[u8]> = h.split(|&b| b == b';').collect();
            assert_eq!(
                parts(h).collect::<Vec<_>>(),
                want,
                "{:?}",
                String::from_utf8_lossy(h)
            );
        }
    }

    fn spec() -> CookieSpec {
        CookieSpec::new(
            "gimlet",
            "/".into(),
            None,
            SameSite::Lax,
            SecureMode::Auto,
            false,
        )
    }

    #[test]
    fn names() {
        let s = spec();
        assert_eq!(s.name(Channel::Perm), "gimlet");
        assert_eq!(s.name(Channel::Trans), "gimlet-t");
        assert_eq!(s.name(Channel::SecurePerm), "__Secure-gimlet");
        assert_eq!(s.name(Channel::SecureTrans), "__Secure-gimlet-t");
        assert_eq!(s.channel_exact(b"gimlet"), Some(Channel::Perm));
        assert_eq!(s.channel_exact(b"GIMLET"), None);
        for ours in [
            "GIMLET",
            "gimlet-T",
            "__secure-gimlet-t",
            "__Host-gimlet",
            "__HOST-Gimlet-st",
            " gimlet-s ",
        ] {
            assert!(s.is_ours(ours.as_bytes()), "{ours}");
        }
        for other in [
            "gimlet2",
            "__Secure-__Host-gimlet",
            "xgimlet",
            "gimlet-x",
            "",
        ] {
            assert!(!s.is_ours(other.as_bytes()), "{other}");
        }
        let h = spec().with_host_prefix(true);
        assert_eq!(h.name(Channel::Perm), "__Host-gimlet");
        assert_eq!(h.name(Channel::SecureTrans), "__Host-gimlet-st");
        let d = CookieSpec::new("g", "/".into(), None, SameSite::Lax, SecureMode::Auto, true);
        assert_eq!(d.name(Channel::SecurePerm), "g-s");
        assert_eq!(d.name(Channel::SecureTrans), "g-st");
    }

    #[test]
    fn set_lines() {
        let s = spec();
        let l = s.set_line(
            Channel::Perm,
            "abc",
            Some(10_000 + 3_600_000),
            10_000,
            false,
        );
        assert_eq!(
            l,
            "gimlet=abc; Max-Age=3600; Expires=Thu, 01 Jan 1970 01:00:10 GMT; Path=/; HttpOnly; SameSite=Lax"
        );
        assert!(l.len() <= "gimlet=abc".len() + s.overhead(Channel::Perm));
        let t = s.set_line(Channel::Trans, "x", None, 0, true);
        assert_eq!(t, "gimlet-t=x; Path=/; HttpOnly; Secure; SameSite=Lax");
        let sec = s.set_line(Channel::SecurePerm, "x", None, 0, false);
        assert!(sec.contains("; Secure"));
        let c = s.clear_line(Channel::Perm, false);
        assert!(c.starts_with("gimlet=; Max-Age=0;"));
    }

    #[test]
    fn cookie_pairs_and_strip() {
        let h = b"a=1; gimlet=xyz ;b= 2; flag; GIMLET-T=q";
        let v: Vec<_> = pairs(h).collect();
        assert_eq!(v[1], (&b"gimlet"[..], &b"xyz"[..]));
        assert_eq!(v.len(), 4);
        let s = spec();
        let out = strip_ours(&s, [&h[..], &b"c=3; __Secure-gimlet=1"[..]].into_iter()).unwrap();
        assert_eq!(out, b"a=1; b= 2; flag; c=3");
        assert!(strip_ours(&s, [&b"gimlet=1"[..]].into_iter()).is_none());
    }

    #[test]
    fn set_cookie_names() {
        assert_eq!(set_cookie_name(b"gimlet=1; Path=/"), b"gimlet");
        assert_eq!(set_cookie_name(b" other = 2"), b"other");
        assert_eq!(set_cookie_name(b"novalue"), b"novalue");
        assert_eq!(set_cookie_name(b"=gimlet=A; Path=/account"), b"gimlet");
        assert_eq!(set_cookie_name(b" = GIMLET-t =A"), b"GIMLET-t");
        assert_eq!(set_cookie_name(b"=gimlet"), b"gimlet");
        assert_eq!(set_cookie_name(b"a=b=c"), b"a");
    }
}
