//! Parsing the upstream's `X-Session-*` response headers (SPEC section 4).
//!
//! The parser is strict: anything it cannot read exactly is an error, and an
//! error rejects every directive of the response. Error texts name the header
//! and the key, never a value.

use crate::model::{parse_i64, valid_key, DirectiveError, DirectiveErrorKind};

/// Every directive of one response, in the order received per name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives {
    pub destroy: bool,
    /// `X-Session-Destroy: user`: also end every other session of this
    /// session's user (`session.user_key`).
    pub destroy_user: bool,
    pub regenerate: bool,
    pub delete: Vec<String>,
    pub set: Vec<(String, String)>,
    pub incr: Vec<(String, i64)>,
}

impl Directives {
    pub fn is_empty(&self) -> bool {
        !self.destroy
            && !self.regenerate
            && self.delete.is_empty()
            && self.set.is_empty()
            && self.incr.is_empty()
    }
}

/// Is this (already folded, see [`crate::headers`]) name in our namespace?
pub fn is_session_header(folded: &str) -> bool {
    folded.starts_with("x-session")
}

/// Parse every `X-Session*` header. `headers` yields (name, value) for each
/// header line whose normalized name starts with `x-session`. `max_pairs`
/// bounds the number of key operations in one response.
pub fn parse<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    max_pairs: usize,
) -> Result<Directives, DirectiveError> {
    let mut d = Directives::default();
    let mut pairs = 0usize;
    for (name, value) in headers {
        let norm = crate::headers::folded(name);
        match norm.as_str() {
            "x-session-set" => {
                for (k, v) in form_pairs(value, "X-Session-Set")? {
                    pairs += 1;
                    d.set.push((k, v));
                }
            }
            "x-session-incr" => {
                for (k, v) in form_pairs(value, "X-Session-Incr")? {
                    pairs += 1;
                    let n = parse_i64(&v).ok_or_else(|| {
                        DirectiveError::new(
                            DirectiveErrorKind::Malformed,
                            format!("X-Session-Incr: the amount for `{k}` is not a 64-bit integer"),
                        )
                    })?;
                    d.incr.push((k, n));
                }
            }
            "x-session-delete" => {
                let text = std::str::from_utf8(value).map_err(|_| {
                    DirectiveError::new(
                        DirectiveErrorKind::Malformed,
                        "X-Session-Delete: not valid UTF-8",
                    )
                })?;
                for item in text.split(',') {
                    let key = item.trim_matches(|c| c == ' ' || c == '\t');
                    if !valid_key(key) {
                        return Err(bad_key("X-Session-Delete", key));
                    }
                    pairs += 1;
                    d.delete.push(key.to_string());
                }
            }
            "x-session-destroy" if value == b"user" => {
                d.destroy = true;
                d.destroy_user = true;
            }
            "x-session-regenerate" | "x-session-destroy" => {
                if value != b"1" {
                    let accepted = if norm == "x-session-destroy" {
                        "1 or user"
                    } else {
                        "1"
                    };
                    return Err(DirectiveError::new(
                        DirectiveErrorKind::BadValue,
                        format!(
                            "{}: the accepted values are {accepted}",
                            display_name(&norm)
                        ),
                    ));
                }
                if norm == "x-session-destroy" {
                    d.destroy = true;
                } else {
                    d.regenerate = true;
                }
            }
            _ => {
                return Err(DirectiveError::new(
                    DirectiveErrorKind::UnknownHeader,
                    format!("unknown session header `{name}` in the upstream response"),
                ))
            }
        }
        if pairs > max_pairs {
            return Err(DirectiveError::new(
                DirectiveErrorKind::TooManyKeys,
                format!("the response carries more than {max_pairs} key operations"),
            ));
        }
    }
    Ok(d)
}

fn display_name(norm: &str) -> &'static str {
    match norm {
        "x-session-regenerate" => "X-Session-Regenerate",
        _ => "X-Session-Destroy",
    }
}

fn bad_key(header: &str, key: &str) -> DirectiveError {
    // The key text came from the upstream; show it only when it is short and
    // printable, so the error cannot smuggle a value or control bytes.
    let shown = if key.len() <= 64 && key.bytes().all(|b| b.is_ascii_graphic()) {
        format!("`{key}`")
    } else {
        format!("of {} bytes", key.len())
    };
    DirectiveError::new(
        DirectiveErrorKind::BadKey,
        format!(
            "{header}: invalid key {shown} ({})",
            crate::model::KEY_SYNTAX
        ),
    )
}

/// Strict `application/x-www-form-urlencoded` reading: `&`-separated pairs,
/// every pair has `=`, `+` is a space, `%XX` must be valid hex, the result
/// must be UTF-8 and the key valid. Empty segments (`a=1&&b=2`) are skipped,
/// as the WHATWG parser does.
fn form_pairs(value: &[u8], header: &str) -> Result<Vec<(String, String)>, DirectiveError> {
    let mut out = Vec::new();
    for seg in value.split(|&b| b == b'&') {
        if seg.is_empty() {
            continue;
        }
        let eq = seg.iter().position(|&b| b == b'=').ok_or_else(|| {
            DirectiveError::new(
                DirectiveErrorKind::Malformed,
                format!("{header}: a pair has no `=`"),
            )
        })?;
        let key = decode(&seg[..eq], header)?;
        if !valid_key(&key) {
            return Err(bad_key(header, &key));
        }
        let val = decode(&seg[eq + 1..], header)?;
        out.push((key, val));
    }
    if out.is_empty() {
        return Err(DirectiveError::new(
            DirectiveErrorKind::Malformed,
            format!("{header}: empty"),
        ));
    }
    Ok(out)
}

fn decode(s: &[u8], header: &str) -> Result<String, DirectiveError> {
    let malformed = || {
        DirectiveError::new(
            DirectiveErrorKind::Malformed,
            format!("{header}: bad percent-encoding"),
        )
    };
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or_else(malformed)?;
                let hi = (hex[0] as char).to_digit(16).ok_or_else(malformed)?;
                let lo = (hex[1] as char).to_digit(16).ok_or_else(malformed)?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| {
        DirectiveError::new(
            DirectiveErrorKind::Malformed,
            format!("{header}: not valid UTF-8"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(h: &[(&str, &str)]) -> Result<Directives, DirectiveError> {
        parse(h.iter().map(|(n, v)| (*n, v.as_bytes())), 256)
    }

    #[test]
    fn set_delete_incr() {
        let d = p(&[
            ("X-Session-Set", "a=1&b=hello+world&c=%E2%82%AC%26x"),
            ("x-session-set", "a=2"),
            ("X-Session-Delete", "x, y ,z"),
            ("X-Session-Incr", "n=5&n=-2&m=0"),
        ])
        .unwrap();
        assert_eq!(
            d.set,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "hello world".into()),
                ("c".into(), "€&x".into()),
                ("a".into(), "2".into())
            ]
        );
        assert_eq!(d.delete, vec!["x", "y", "z"]);
        assert_eq!(
            d.incr,
            vec![("n".into(), 5), ("n".into(), -2), ("m".into(), 0)]
        );
        assert!(!d.destroy && !d.regenerate);
    }

    #[test]
    fn empty_value_and_empty_segments() {
        let d = p(&[("X-Session-Set", "a=&&b=x&")]).unwrap();
        assert_eq!(
            d.set,
            vec![("a".into(), "".into()), ("b".into(), "x".into())]
        );
    }

    #[test]
    fn regenerate_destroy() {
        let d = p(&[("X-Session-Destroy", "1"), ("X_SESSION_REGENERATE", "1")]).unwrap();
        assert!(d.destroy && d.regenerate && !d.destroy_user);
        let d = p(&[("x-session-destroy", "user")]).unwrap();
        assert!(d.destroy && d.destroy_user);
        assert_eq!(
            p(&[("X-Session-Destroy", "User")]).unwrap_err().label(),
            "bad_value"
        );
        assert_eq!(
            p(&[("X-Session-Regenerate", "user")]).unwrap_err().label(),
            "bad_value"
        );
        assert_eq!(
            p(&[("X-Session-Destroy", "yes")]).unwrap_err().label(),
            "bad_value"
        );
        assert_eq!(
            p(&[("X-Session-Regenerate", "0")]).unwrap_err().label(),
            "bad_value"
        );
    }

    #[test]
    fn errors() {
        let cases: &[(&str, &str, &str)] = &[
            ("X-Session-Set", "novalue", "malformed"),
            ("X-Session-Set", "", "malformed"),
            ("X-Session-Set", "a=%zz", "malformed"),
            ("X-Session-Set", "a=%e2%82", "malformed"),
            ("X-Session-Set", "a=%4", "malformed"),
            ("X-Session-Set", "bad key=1", "bad_key"),
            ("X-Session-Set", "=1", "bad_key"),
            ("X-Session-Incr", "n=1.5", "malformed"),
            ("X-Session-Incr", "n=+1", "malformed"),
            ("X-Session-Incr", "n=", "malformed"),
            ("X-Session-Incr", "n=99999999999999999999", "malformed"),
            ("X-Session-Delete", "a,,b", "bad_key"),
            ("X-Session-Delete", "", "bad_key"),
            ("X-Session-Frobnicate", "1", "unknown_header"),
            ("X-Session", "a=1", "unknown_header"),
        ];
        for (n, v, reason) in cases {
            let e = p(&[(n, v)]).unwrap_err();
            assert_eq!(e.label(), *reason, "{n}: {v}");
        }
        assert!(p(&[("X-Session-Incr", "n=-9223372036854775808")]).is_ok());
    }

    #[test]
    fn directive_names_fold_every_separator() {
        for name in [
            "X-Session-Set",
            "x_session_set",
            "X.Session.Set",
            "x~SESSION|set",
        ] {
            let d = p(&[(name, "a=1")]).unwrap();
            assert_eq!(d.set, vec![("a".to_string(), "1".to_string())], "{name}");
        }
    }

    #[test]
    fn pair_bound() {
        let many: String = (0..300).map(|i| format!("k{i}=1&")).collect();
        let e = parse([("X-Session-Set", many.as_bytes())].into_iter(), 256).unwrap_err();
        assert_eq!(e.label(), "too_many_keys");
    }

    #[test]
    fn errors_do_not_echo_values() {
        let e = p(&[("X-Session-Set", "k=secret-value&bad key=topsecret")]).unwrap_err();
        assert!(!e.detail.contains("secret"));
        let e = p(&[("X-Session-Incr", "n=topsecret")]).unwrap_err();
        assert!(!e.detail.contains("topsecret"));
    }
}
