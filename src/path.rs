//! The request path as the gateway and the app behind it must both read it
//! (SPEC section 3).
//!
//! A gate on `/account` is worth nothing if `/%61ccount`, `//account`,
//! `/./account`, `/x/../account` or `/account;jsessionid=1` reach the app as
//! the account page while the gateway routes them elsewhere: WSGI servers
//! decode `PATH_INFO`, Tomcat drops `;` parameters and resolves `..;`, most
//! servers merge slashes. So before routing the path is normalized
//! (RFC 3986 section 6.2.2): percent-encoded unreserved bytes are decoded,
//! the remaining escapes are upper-cased, dot segments are removed (a
//! segment's `;` parameters do not hide a `..`), and runs of `/` are merged.
//! Routing judges that path with every segment's parameters removed
//! ([`route_path`]), and the upstream receives the normalized path itself.
//! What cannot be normalized without guessing how the app decodes it is
//! refused: an encoded separator (`%2F`, `%5C`), an encoded or raw control
//! byte, a raw `\`, a `%` not followed by two hex digits.

use std::borrow::Cow;

/// Why a path is refused (answered `400`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C` (and `paths.escaped_separators` is not `keep`).
    EncodedSeparator,
    /// A control byte, raw or encoded (`%00` ... `%1F`, `%7F`).
    Control,
    /// A raw `\`, which some servers read as `/`.
    Backslash,
    /// The path does not start with `/`.
    NotAbsolute,
}

impl PathError {
    /// For logs and the 400 body; never quotes the path.
    pub fn label(self) -> &'static str {
        match self {
            PathError::BadEscape => "bad_escape",
            PathError::EncodedSeparator => "encoded_separator",
            PathError::Control => "control_byte",
            PathError::Backslash => "backslash",
            PathError::NotAbsolute => "not_absolute",
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(out: &mut String, b: u8) {
    out.push('%');
    out.push(HEX[(b >> 4) as usize] as char);
    out.push(HEX[(b & 15) as usize] as char);
}

/// Bytes that may stand in a path as they are and need no decision.
fn plain(b: u8) -> bool {
    unreserved(b)
        || matches!(
            b,
            b'/' | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// Is `p` already normal? (The common case: no allocation.)
fn is_normal(p: &[u8]) -> bool {
    if p.first() != Some(&b'/') || !p.iter().all(|&b| plain(b)) {
        return false;
    }
    let rest = &p[1..];
    let count = rest.split(|&b| b == b'/').count();
    rest.split(|&b| b == b'/')
        .enumerate()
        .all(|(i, seg)| (!seg.is_empty() || i + 1 == count) && seg != b"." && seg != b"..")
}

/// Normalize a request path (without the query). `keep_escaped_separators`
/// passes `%2F` / `%5C` on undecoded instead of refusing them.
pub fn normalize(raw: &[u8], keep_escaped_separators: bool) -> Result<Cow<'_, str>, PathError> {
    if is_normal(raw) {
        // Only ASCII bytes passed `plain`.
        return Ok(Cow::Borrowed(std::str::from_utf8(raw).expect("ASCII")));
    }
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: decode what is unreserved, keep (upper-cased) what is not,
    // refuse what cannot be judged. The result holds no raw `%` but escapes.
    let mut dec = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = h << 4 | l;
                if unreserved(v) {
                    dec.push(v as char);
                } else if v == b'/' || v == b'\\' {
                    if !keep_escaped_separators {
                        return Err(PathError::EncodedSeparator);
                    }
                    push_escape(&mut dec, v);
                } else if v < 0x20 || v == 0x7f {
                    return Err(PathError::Control);
                } else {
                    push_escape(&mut dec, v);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if b < 0x20 || b == 0x7f => return Err(PathError::Control),
            // Raw space and bytes >= 0x80 (lenient clients): as escapes.
            _ if b == b' ' || b >= 0x80 || b == b'"' || b == b'<' || b == b'>' => {
                push_escape(&mut dec, b)
            }
            _ => dec.push(b as char),
        }
        i += 1;
    }
    // Pass 2: dot segments and empty segments (RFC 3986 5.2.4, plus merging
    // `//`). A segment is judged by its name before any `;` parameters, as
    // Tomcat resolves `/..;x/`.
    let segs: Vec<&str> = dec[1..].split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segs.len());
    let mut trailing = false;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let name = seg.split(';').next().unwrap_or("");
        match name {
            "." => trailing = last,
            ".." => {
                out.pop();
                trailing = last;
            }
            _ if seg.is_empty() => trailing = last,
            _ => {
                out.push(seg);
                trailing = false;
            }
        }
    }
    let mut s = String::with_capacity(dec.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || trailing {
        s.push('/');
    }
    Ok(Cow::Owned(s))
}

/// The normalized path as routing judges it: every segment's `;`
/// parameters removed (`/account;jsessionid=1` is `/account`), and the empty
/// segments that leaves merged.
pub fn route_path(normalized: &str) -> Cow<'_, str> {
    if !normalized.contains(';') {
        return Cow::Borrowed(normalized);
    }
    let segs: Vec<&str> = normalized[1..].split('/').collect();
    let mut s = String::with_capacity(normalized.len());
    let mut trailing = false;
    for (i, seg) in segs.iter().enumerate() {
        let name = seg.split(';').next().unwrap_or("");
        if name.is_empty() {
            trailing = i + 1 == segs.len();
            continue;
        }
        s.push('/');
        s.push_str(name);
        trailing = false;
    }
    if s.is_empty() || trailing {
        s.push('/');
    }
    Cow::Owned(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p.as_bytes(), false).map(|c| c.into_owned())
    }

    #[test]
    fn dot_segments_slashes_and_escapes() {
        for (raw, want) in [
            ("/", "/"),
            ("/account", "/account"),
            ("/account/", "/account/"),
            ("/%61ccount", "/account"),
            ("/%41CCOUNT", "/ACCOUNT"),
            ("//account", "/account"),
            ("///account//x", "/account/x"),
            ("/./account", "/account"),
            ("/x/../account", "/account"),
            ("/../account", "/account"),
            ("/a/b/../../account", "/account"),
            ("/%2e/account", "/account"),
            ("/%2E%2e/account", "/account"),
            ("/.%2e/account", "/account"),
            ("/x/..;/account", "/account"),
            ("/x/..;a=b/account", "/account"),
            ("/account/.", "/account/"),
            ("/account/..", "/"),
            ("/account/x/..", "/account/"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/a%3bb", "/a%3Bb"),
            ("/account;jsessionid=1", "/account;jsessionid=1"),
            ("/a b", "/a%20b"),
            ("/..", "/"),
            ("/.", "/"),
            ("/...", "/..."),
            ("/a/.b", "/a/.b"),
        ] {
            assert_eq!(n(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refused() {
        for (raw, e) in [
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a%00", PathError::Control),
            ("/a%0d%0a", PathError::Control),
            ("/a%7F", PathError::Control),
            ("/a\\b", PathError::Backslash),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("a", PathError::NotAbsolute),
            ("/a\u{1}", PathError::Control),
        ] {
            assert_eq!(n(raw), Err(e), "{raw}");
        }
        assert_eq!(
            normalize(b"/a%2fb/%5c", true).unwrap(),
            "/a%2Fb/%5C",
            "keep passes separators undecoded"
        );
    }

    #[test]
    fn route_paths_drop_parameters() {
        for (raw, want) in [
            ("/account;jsessionid=1", "/account"),
            ("/account;x/y;z", "/account/y"),
            ("/;x/account", "/account"),
            ("/account;x/", "/account/"),
            ("/;", "/"),
            ("/plain", "/plain"),
        ] {
            assert_eq!(route_path(&n(raw).unwrap()), want, "{raw}");
        }
    }

    #[test]
    fn idempotent() {
        for raw in ["/a//b/./c/../d;x/..;y/e%2e/%7e", "/%C3%a9//", "/a b/\u{e9}"] {
            let once = n(raw).unwrap();
            assert_eq!(n(&once).unwrap(), once, "{raw}");
        }
    }

    /// The fuzz target's property (fuzz/fuzz_targets/path.rs), checked
    /// exhaustively over every path of up to 6 bytes (a `/` and 5 more) from the bytes that
    /// matter: idempotent, and no `//`, `/./`, `/../` or trailing dot segment.
    #[test]
    fn exhaustive_short_paths() {
        const ALPHABET: &[u8] = b"/.%2eE;aF5c\\";
        let mut checked = 0;
        let mut stack: Vec<Vec<u8>> = vec![b"/".to_vec()];
        while let Some(p) = stack.pop() {
            for keep in [false, true] {
                if let Ok(once) = normalize(&p, keep) {
                    for bad in ["//", "/./", "/../"] {
                        assert!(!once.contains(bad), "{p:?} -> {once}");
                    }
                    assert!(
                        !once.ends_with("/.") && !once.ends_with("/.."),
                        "{p:?} -> {once}"
                    );
                    assert!(
                        !once.to_ascii_lowercase().contains("%2e"),
                        "{p:?} -> {once}"
                    );
                    assert_eq!(normalize(once.as_bytes(), keep).unwrap(), once, "{p:?}");
                    let r = route_path(&once);
                    assert!(!r.contains("//") && !r.contains(';'), "{p:?} -> {r}");
                    checked += 1;
                }
            }
            if p.len() < 6 {
                for &b in ALPHABET {
                    let mut q = p.clone();
                    q.push(b);
                    stack.push(q);
                }
            }
        }
        assert!(checked > 100_000, "{checked}");
    }

    #[test]
    fn already_normal_is_borrowed() {
        assert!(matches!(
            normalize(b"/api/v1/items", false),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(normalize(b"/", false), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize(b"/a/", false), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize(b"/a//", false), Ok(Cow::Owned(_))));
    }
}
