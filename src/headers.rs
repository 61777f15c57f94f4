//! Header names as the apps behind us read them (SPEC section 3).
//!
//! PHP (every SAPI), CGI, WSGI and Rack do not see `X-Remote-User`: they see
//! `HTTP_X_REMOTE_USER`, which `X_Remote_User`, `X.Remote.User` and
//! `x remote user` all become as well. So every check of a request header
//! name against a name the gateway owns compares *folded* names: ASCII
//! letters lower-cased, digits kept, and every other byte read as `-`. This
//! module is the one place that fold is written; the proxy, the directive
//! parser and config validation all call it.

/// One byte of a folded name.
#[inline]
pub fn fold_byte(b: u8) -> u8 {
    if b.is_ascii_alphanumeric() {
        b.to_ascii_lowercase()
    } else {
        b'-'
    }
}

/// The folded form of a name (for names compared many times: build once).
pub fn folded(name: &str) -> String {
    name.bytes().map(|b| fold_byte(b) as char).collect()
}

/// Does a raw header name, folded, start with `x-session`? No allocation:
/// this runs on every header of every request and response.
#[inline]
pub fn in_session_namespace(name: &[u8]) -> bool {
    starts_with_folded(name, b"x-session")
}

/// Does a raw name, folded, start with the already folded `prefix`?
#[inline]
pub fn starts_with_folded(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len() && name.iter().zip(prefix).all(|(a, b)| fold_byte(*a) == *b)
}

/// Is a raw header name, folded, equal to an already folded one?
#[inline]
pub fn same_name(name: &[u8], folded: &str) -> bool {
    name.len() == folded.len()
        && name
            .iter()
            .zip(folded.bytes())
            .all(|(a, b)| fold_byte(*a) == b)
}

/// Append an address as `X-Forwarded-For` writes it. IPv4 by hand: the
/// `Display` impl costs about 2,600 instructions, on every request.
pub fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            out.reserve(15);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if o >= 100 {
                    out.push((b'0' + o / 100) as char);
                }
                if o >= 10 {
                    out.push((b'0' + o / 10 % 10) as char);
                }
                out.push((b'0' + o % 10) as char);
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Headers that frameworks derive the scheme, host, port, prefix or client
/// address from (Rack, Django, Rails, Spring, Express `trust proxy`, PHP apps
/// reading `$_SERVER`). From a client outside `trusted_proxies` they are
/// removed in every spelling; from a trusted proxy they pass. Folded. The
/// first eight are SPEC section 3's list; the rest are the same kind of
/// header under the names other proxies use.
pub const FORWARDING: [&str; 17] = [
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-real-ip",
    "x-forwarded-protocol",
    "x-forwarded-server",
    "x-forwarded-prefix",
    "x-forwarded-uri",
    "x-host",
    "x-original-host",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
];

/// Headers some frameworks route on instead of the request line (Zend
/// Framework, Symfony before CVE-2018-14773, IIS rewrite setups): a gate on
/// `/account` means nothing if `GET /login` with `X-Original-URL: /account`
/// is served as the account page. Removed from every client, trusted or not:
/// the gateway routes on the request line, so the app must too. Folded.
pub const PATH_OVERRIDES: [&str; 3] = ["x-original-url", "x-rewrite-url", "x-original-uri"];

/// Is this raw name one of [`FORWARDING`], in any spelling?
pub fn is_forwarding(name: &[u8]) -> bool {
    FORWARDING.iter().any(|f| same_name(name, f))
}

/// Is this raw name one of [`PATH_OVERRIDES`], in any spelling?
pub fn is_path_override(name: &[u8]) -> bool {
    PATH_OVERRIDES.iter().any(|f| same_name(name, f))
}

/// Headers the gateway always writes itself: every spelling the client
/// sent is removed (a `X_Forwarded_Proto: https` next to ours would win in
/// `$_SERVER`), then ours is added. Folded.
pub const OURS: [&str; 2] = ["x-forwarded-proto", "x-forwarded-for"];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `tchar` of RFC 9110 that is not a letter or digit.
    pub const SEPARATORS: &[u8] = b"!#$%&'*+-.^_`|~";

    #[test]
    fn every_separator_folds_to_dash() {
        for &sep in SEPARATORS {
            let s = sep as char;
            let name = format!("X{s}Session{s}Set");
            assert!(in_session_namespace(name.as_bytes()), "{name}");
            let user = format!("x{s}REMOTE{s}user");
            assert!(same_name(user.as_bytes(), "x-remote-user"), "{user}");
            assert!(is_forwarding(format!("X{s}Forwarded{s}Host").as_bytes()));
            assert!(is_path_override(format!("x{s}original{s}URL").as_bytes()));
        }
        // Space, as PHP also reads it.
        assert!(in_session_namespace(b"x session"));
        assert_eq!(folded("X.Remote_User"), "x-remote-user");
    }

    #[test]
    fn addresses_print_as_display_does() {
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = a.parse().unwrap();
            let mut out = String::from("x, ");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x, {ip}"));
        }
    }

    #[test]
    fn near_misses_are_not_ours() {
        for n in ["x-sessio", "x-ession", "accept", "xsession", "x--session"] {
            assert!(!in_session_namespace(n.as_bytes()), "{n}");
        }
        assert!(!same_name(b"X-Remote-Users", "x-remote-user"));
        assert!(!same_name(b"X-Remote-Use", "x-remote-user"));
        assert!(!is_forwarding(b"x-forwarded-hostname"));
    }
}
