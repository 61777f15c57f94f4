//! Collecting config errors (field path, line, message), and keeping values
//! that could be secrets out of them.

use super::lines::LineIndex;
use super::raw::KeySel;
use super::source::{expand_env, Env};
use crate::model::{valid_key, KeySet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A config error: the field path, its line (when known) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(l) = self.line {
            write!(f, " (line {l})")?;
        }
        Ok(())
    }
}

/// All errors of one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.file.display())?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------
// Loading.

pub(super) struct Errors<'a> {
    pub(super) index: &'a LineIndex,
    pub(super) env: Env<'a>,
    pub(super) list: Vec<ConfigError>,
}

impl Errors<'_> {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        // One cause, one error: a field already wrong (an unset `${VAR}`)
        // is not reported again by the checks that read its value.
        let shown = scrub_path(&path);
        if !path.is_empty() && self.list.iter().any(|e| e.path == shown) {
            return;
        }
        let line = self.index.line(&path);
        self.list.push(ConfigError {
            path: scrub_path(&path),
            line,
            message: scrub(&message.into()),
        });
    }
}

pub(super) fn serde_error(e: &serde_yaml::Error, index: &LineIndex, file: &str) -> ConfigError {
    let text = e.to_string();
    let line = e.location().map(|l| l.line());
    // YAML forbids tabs in indentation; say that, not "cannot start any token".
    if let Some(l) = line {
        let src = file.lines().nth(l.saturating_sub(1)).unwrap_or("");
        let indent: &str = &src[..src.len() - src.trim_start().len()];
        if indent.contains('\t') {
            return ConfigError {
                path: String::new(),
                line,
                message: "a tab in the indentation (YAML indents with spaces)".into(),
            };
        }
    }
    // serde_yaml prints "path: message at line L column C".
    let body = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let (path, message) = match body.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), body.to_string()),
    };
    // serde quotes the offending value (`invalid type: string "..."`): a
    // secret written where a list belongs must not reach a terminal or a
    // log. Name the field and the kind of value, never the value.
    let message = scrub(&redact_quoted(&message));
    if let Some(field) = quoted_after(&message, "missing field `") {
        // serde names a sibling or child of the mapping that lacks the
        // field: name the mapping itself, and where it starts.
        let parent = owner_of(&path, &field);
        return ConfigError {
            line: if parent.is_empty() {
                None
            } else {
                index.line(&parent).or(line)
            },
            path: scrub_path(&parent),
            message: format!("missing field {field}"),
        };
    }
    if let Some(field) = quoted_after(&message, "unknown field `") {
        let expected: Vec<String> = message
            .split_once("expected ")
            .map(|(_, list)| {
                list.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let base = path
            .rsplit_once('.')
            .filter(|(_, last)| last.starts_with(field.as_str()))
            .map_or(path.as_str(), |(p, _)| p);
        let base = if base == field || base.starts_with(&format!("{field}[")) {
            ""
        } else {
            base
        };
        let at = if base.is_empty() {
            field.clone()
        } else {
            format!("{base}.{field}")
        };
        let message = match closest(&field, &expected) {
            Some(s) => format!("unknown field, did you mean {s}?"),
            None if expected.is_empty() => "unknown field".to_string(),
            None => format!("unknown field (known: {})", expected.join(", ")),
        };
        return ConfigError {
            line: index.line(&at).or(line),
            path: scrub_path(&at),
            message,
        };
    }
    // Custom errors carry the container's path; name the field on that line.
    let path = match line.and_then(|l| index.field_on_line(&path, l)) {
        Some(p) if p.len() > path.len() => p.to_string(),
        _ => path,
    };
    ConfigError {
        path: scrub_path(&path),
        line,
        message,
    }
}

/// The text between `prefix` and the next backtick.
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(f, _)| f.to_string())
}

/// Which mapping a required field belongs to: the nearest ancestor of the
/// path serde reported whose section has that field.
fn owner_of(path: &str, field: &str) -> String {
    const REQUIRED: [(&str, &str); 8] = [
        ("", "session"),
        ("", "routes"),
        ("session", "secrets"),
        ("routes[]", "name"),
        ("routes[]", "upstreams"),
        ("listen[]", "addr"),
        ("admin", "addr"),
        ("tracing.otlp", "endpoint"),
    ];
    let kind = |p: &str| -> String {
        // routes[3].match -> routes[].match
        let mut out = String::new();
        let mut skip = false;
        for c in p.chars() {
            match c {
                '[' => {
                    skip = true;
                    out.push_str("[]");
                }
                ']' => skip = false,
                _ if skip => {}
                _ => out.push(c),
            }
        }
        out
    };
    let mut p = path.to_string();
    loop {
        if REQUIRED.iter().any(|(k, f)| *k == kind(&p) && *f == field) {
            return p;
        }
        if p.is_empty() {
            return p;
        }
        // Drop the last component (`.x` or `[i]`).
        let cut = p.rfind(['.', '[']).unwrap_or(0);
        p.truncate(cut);
    }
}

/// The known name closest to a misspelled one, if it is close enough to be
/// what was meant.
fn closest(field: &str, known: &[String]) -> Option<String> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(field, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

/// A value this long could be a secret (the shortest allowed is 32
/// characters): errors name it by its length, never show it.
const SHOWN_MAX: usize = 31;

/// Every `` `quoted` `` value of more than [`SHOWN_MAX`] characters becomes
/// `a value of N characters`. Messages quote what was written in backticks
/// (``invalid duration `…` ``, serde's ``unknown field `…` ``), so a secret
/// pasted into the wrong field is named, never echoed.
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('`') {
        let Some(len) = rest[open + 1..].find('`') else {
            break;
        };
        let token = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..open]);
        let n = token.chars().count();
        if n > SHOWN_MAX {
            out.push_str(&format!("a value of {n} characters"));
        } else {
            out.push('`');
            out.push_str(token);
            out.push('`');
        }
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A field path whose parts are keys the user wrote (`session.<key>`):
/// overlong parts are named by their length, like values.
fn scrub_path(path: &str) -> String {
    path.split('.')
        .map(|part| {
            // `routes[3]`: judge the key, keep the index.
            let (key, index) = part.split_at(part.find('[').unwrap_or(part.len()));
            let n = key.chars().count();
            if n > SHOWN_MAX {
                format!("<{n}-character key>{index}")
            } else {
                part.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `invalid type: string "s3cr3t", expected a sequence` ->
/// `invalid type: a string, expected a sequence`; every other quoted value
/// becomes `"…"`.
fn redact_quoted(message: &str) -> String {
    let (Some(start), Some(end)) = (message.find('"'), message.rfind('"')) else {
        return message.to_string();
    };
    if end <= start {
        return message.to_string();
    }
    let before = &message[..start];
    let after = &message[end + 1..];
    match before.strip_suffix("string ") {
        Some(head) => format!("{head}a string{after}"),
        None => format!("{before}\"…\"{after}"),
    }
}

impl Errors<'_> {
    /// A string field after `${VAR}` expansion.
    pub(super) fn text(&mut self, path: &str, raw: &str) -> String {
        match expand_env(raw, self.env) {
            Ok(v) => v,
            Err(m) => {
                self.add(path, m);
                String::new()
            }
        }
    }

    pub(super) fn opt_text(&mut self, path: &str, raw: &Option<String>) -> Option<String> {
        raw.as_ref().map(|r| self.text(path, r))
    }

    pub(super) fn duration(
        &mut self,
        path: &str,
        raw: &Option<String>,
        default: Duration,
    ) -> Duration {
        let Some(r) = raw else { return default };
        let s = self.text(path, r);
        match humantime::parse_duration(s.trim()) {
            Ok(d) => d,
            Err(err) => {
                self.add(
                    path,
                    format!(
                        "invalid duration `{s}`: {err} (write e.g. 250ms, 90s, 2h, 7d, 1h 30m)"
                    ),
                );
                default
            }
        }
    }

    pub(super) fn addr(&mut self, path: &str, raw: &str) -> Option<SocketAddr> {
        let s = self.text(path, raw);
        match s.trim().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.add(
                    path,
                    format!(
                        "invalid address `{s}` (write ip:port, e.g. 0.0.0.0:8080 or [::1]:8080)"
                    ),
                );
                None
            }
        }
    }

    pub(super) fn key_set(&mut self, path: &str, raw: &Option<KeySel>) -> KeySet {
        match raw {
            None => KeySet::All,
            Some(KeySel::Word(w)) => match self.text(path, w).as_str() {
                "all" => KeySet::All,
                "none" => KeySet::None,
                other => {
                    self.add(
                        path,
                        format!("expected `all`, `none`, or a list of keys, found `{other}`"),
                    );
                    KeySet::All
                }
            },
            Some(KeySel::List(keys)) => KeySet::Only(
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| self.key(&format!("{path}[{i}]"), k))
                    .collect(),
            ),
        }
    }

    pub(super) fn key(&mut self, path: &str, raw: &str) -> String {
        let k = self.text(path, raw);
        if !valid_key(&k) {
            self.add(
                path,
                format!("invalid key `{k}` ({})", crate::model::KEY_SYNTAX),
            );
        }
        k
    }

    /// One of `choices` (the first is the default).
    /// An enum field: one lookup in the enum's word table.
    pub(super) fn pick<T: Choice>(&mut self, path: &str, raw: &Option<String>) -> T {
        let words: Vec<&str> = T::WORDS.iter().map(|(w, _)| *w).collect();
        let w = self.choice(path, raw, &words);
        T::WORDS
            .iter()
            .find(|(word, _)| *word == w)
            .map_or(T::WORDS[0].1, |(_, v)| *v)
    }

    pub(super) fn choice<'c>(
        &mut self,
        path: &str,
        raw: &Option<String>,
        choices: &[&'c str],
    ) -> &'c str {
        let Some(r) = raw else { return choices[0] };
        let v = self.text(path, r);
        match choices.iter().find(|c| c.eq_ignore_ascii_case(v.trim())) {
            Some(c) => c,
            None => {
                self.add(
                    path,
                    format!("expected one of {}, found `{v}`", choices.join(", ")),
                );
                choices[0]
            }
        }
    }
}

/// An enum the file writes as one of a few words (case-insensitive); the
/// first is the default.
pub(super) trait Choice: Copy + 'static {
    const WORDS: &'static [(&'static str, Self)];
}

impl Choice for super::LogFormat {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("text", super::LogFormat::Text),
        ("json", super::LogFormat::Json),
    ];
}

impl Choice for crate::cookie::SameSite {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("lax", crate::cookie::SameSite::Lax),
        ("strict", crate::cookie::SameSite::Strict),
        ("none", crate::cookie::SameSite::None),
    ];
}

impl Choice for crate::cookie::SecureMode {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("auto", crate::cookie::SecureMode::Auto),
        ("always", crate::cookie::SecureMode::Always),
        ("never", crate::cookie::SecureMode::Never),
    ];
}

impl Choice for crate::model::OnError {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("fail", crate::model::OnError::Fail),
        ("degrade", crate::model::OnError::Degrade),
    ];
}

impl Choice for crate::model::Selection {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("round_robin", crate::model::Selection::RoundRobin),
        ("least_conn", crate::model::Selection::LeastConn),
        ("sticky", crate::model::Selection::Sticky),
    ];
}

impl Choice for crate::model::OnDirectiveError {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("reject", crate::model::OnDirectiveError::Reject),
        ("ignore", crate::model::OnDirectiveError::Ignore),
    ];
}
