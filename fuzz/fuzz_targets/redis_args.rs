//! The Redis write script's ARGV, built from a batch whose key names and
//! values come from apps and whose user-agent strings come from clients.
//! Read back the way `WRITE_SCRIPT` reads it (a walk driven by counts, no
//! separators), it must give exactly the batch: no count that lets one
//! field be taken for another, every number a plain decimal Lua's
//! `tonumber` reads exactly, every user-index operation one JSON object
//! that decodes to its entry, and nothing left over.
#![no_main]
use gimlet::model::SessionId;
use gimlet::store::redis::script_args;
use gimlet::store::{ChannelWrite, LimitCheck, StoreKey, UserSession, UserWrite, WriteBatch};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn id(u: &mut Unstructured) -> Result<SessionId> {
    Ok(SessionId(u.arbitrary()?))
}

fn small<T>(u: &mut Unstructured, f: impl Fn(&mut Unstructured) -> Result<T>) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=4)?;
    (0..n).map(|_| f(u)).collect()
}

fn batch(u: &mut Unstructured) -> Result<(WriteBatch, Vec<UserWrite>, Option<String>)> {
    let key = StoreKey {
        id: id(u)?,
        tag: u.arbitrary()?,
    };
    let mut b = WriteBatch::new(key, u.arbitrary()?);
    if u.arbitrary()? {
        b.destroy = Some(StoreKey {
            id: id(u)?,
            tag: key.tag,
        });
    }
    if u.arbitrary()? {
        b.rename_from = Some(id(u)?);
    }
    for c in &mut b.channels {
        *c = ChannelWrite {
            clear: u.arbitrary()?,
            delete: small(u, |u| u.arbitrary())?,
            set: small(u, |u| u.arbitrary())?,
            incr: small(u, |u| u.arbitrary())?,
        };
    }
    if u.arbitrary()? {
        b.limits = Some(LimitCheck {
            max_keys: u.arbitrary()?,
            max_bytes: u.arbitrary()?,
            client_keys: u.arbitrary()?,
            client_bytes: u.arbitrary()?,
        });
    }
    b.end = small(u, |u| Ok((id(u)?, u.arbitrary()?)))?;
    b.check_ended = u.arbitrary()?;
    b.check_moved = u.arbitrary()?;
    if u.arbitrary()? {
        b.forward = Some((u.arbitrary()?, u.arbitrary()?));
    }
    let users = small(u, |u| {
        let user: String = u.arbitrary()?;
        Ok(if u.arbitrary()? {
            UserWrite::Leave { user, id: id(u)? }
        } else {
            UserWrite::Join {
                user,
                entry: UserSession {
                    id: id(u)?.hex(),
                    tag: u.arbitrary()?,
                    created: u.arbitrary()?,
                    seen: u.arbitrary()?,
                    expires: u.arbitrary()?,
                    ip: u.arbitrary()?,
                    user_agent: u.arbitrary()?,
                },
                replaces: if u.arbitrary()? { Some(id(u)?) } else { None },
                max: u.arbitrary()?,
            }
        })
    })?;
    let prefix = if u.arbitrary()? {
        Some(u.arbitrary()?)
    } else {
        None
    };
    Ok((b, users, prefix))
}

/// ARGV as the script walks it.
struct Argv<'a> {
    a: &'a [String],
    pos: usize,
}

impl Argv<'_> {
    fn next(&mut self) -> &str {
        let v = self.a.get(self.pos).expect("the script reads past ARGV");
        self.pos += 1;
        v
    }
    /// `tonumber`: a plain decimal, exact in a double when it is a count.
    fn number(&mut self) -> i128 {
        let v = self.next();
        let digits = v.strip_prefix('-').unwrap_or(v);
        assert!(
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
            "{v:?}"
        );
        v.parse().unwrap()
    }
    fn count(&mut self) -> usize {
        let n = self.number();
        assert!((0..1 << 53).contains(&n), "count {n}");
        n as usize
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((b, users, prefix)) = batch(&mut u) else {
        return;
    };
    let a = script_args(&b, &users, prefix.as_deref());
    let mut r = Argv { a: &a, pos: 0 };
    let flags = r.next().to_string();
    assert_eq!(flags.contains('d'), b.destroy.is_some());
    assert_eq!(flags.contains('r'), b.rename_from.is_some());
    assert_eq!(flags.contains('e'), b.check_ended);
    assert_eq!(flags.contains('m'), b.check_moved);
    assert_eq!(r.number(), b.expire_at as i128);
    let limits = [r.number(), r.number(), r.number(), r.number()];
    match &b.limits {
        Some(l) => assert_eq!(
            limits,
            [l.max_keys, l.max_bytes, l.client_keys, l.client_bytes].map(|n| n as i128)
        ),
        None => assert_eq!(limits, [-1, -1, 0, 0]),
    }
    for c in &b.channels {
        assert_eq!(r.next() == "1", c.clear);
        let n = r.count();
        let del: Vec<String> = (0..n).map(|_| r.next().to_string()).collect();
        assert_eq!(del, c.delete);
        let n = r.count();
        let set: Vec<(String, String)> = (0..n)
            .map(|_| (r.next().to_string(), r.next().to_string()))
            .collect();
        assert_eq!(set, c.set);
        let n = r.count();
        let incr: Vec<(String, i128)> =
            (0..n).map(|_| (r.next().to_string(), r.number())).collect();
        let want: Vec<(String, i128)> = c
            .incr
            .iter()
            .map(|(k, n)| (k.clone(), *n as i128))
            .collect();
        assert_eq!(incr, want);
    }
    let n = r.count();
    let ends: Vec<i128> = (0..n).map(|_| r.number()).collect();
    assert_eq!(
        ends,
        b.end.iter().map(|(_, t)| *t as i128).collect::<Vec<_>>()
    );
    let (forward, until) = (r.next().to_string(), r.next().to_string());
    match &b.forward {
        Some((h, t)) if b.rename_from.is_some() => {
            assert_eq!((&forward, until), (h, t.to_string()))
        }
        _ => assert_eq!((forward.as_str(), until.as_str()), ("", "")),
    }
    r.number();
    let n = r.count();
    assert_eq!(n, users.len());
    for w in &users {
        let op: serde_json::Value = serde_json::from_str(r.next()).expect("one JSON object");
        match w {
            UserWrite::Leave { id, .. } => {
                assert_eq!(op, serde_json::json!({ "op": "leave", "id": id.hex() }))
            }
            UserWrite::Join {
                entry,
                replaces,
                max,
                ..
            } => {
                assert_eq!(op["op"], "join");
                assert_eq!(op["id"], entry.id.as_str());
                let e = UserSession::decode(op["entry"].as_str().unwrap()).unwrap();
                assert_eq!(&e, entry);
                assert_eq!(op.get("prefix").and_then(|p| p.as_str()), prefix.as_deref());
                assert_eq!(
                    op.get("replaces").and_then(|p| p.as_str()),
                    replaces.map(|r| r.hex()).as_deref()
                );
                assert_eq!(
                    op.get("max").and_then(|m| m.as_u64()),
                    max.map(|m| m as u64)
                );
            }
        }
    }
    assert_eq!(r.pos, a.len(), "arguments the script never reads");
});
