//! One store conformance suite (issue 11): every backend — memory,
//! embedded, Redis, Redis Cluster, PostgreSQL, MariaDB — runs the same table of operations and
//! expected results through the `SessionStore` interface the session engine
//! uses. A new backend is correct when it passes this file.

mod common;
use common::*;
use gimlet::model::{now_ms, ChannelSet, SessionId};
use gimlet::store::embedded::EmbeddedStore;
use gimlet::store::memory::MemoryStore;
use gimlet::store::redis::{RedisOptions, RedisStore};
use gimlet::store::sql::{SqlOptions, SqlStore};
use gimlet::store::{Check, LimitCheck, Refusal, Store, StoreError, StoreKey, WriteBatch};
use std::time::Duration;

/// One operation on one channel (0 = p, 1 = t, 2 = sp, 3 = st).
#[derive(Clone, Copy, Debug)]
enum Op {
    Set(usize, &'static str, &'static str),
    Del(usize, &'static str),
    Incr(usize, &'static str, i64),
    Clear(usize),
}
use Op::*;

struct Case {
    name: &'static str,
    /// Written first, without limits (must succeed).
    before: &'static [Op],
    /// Then this batch, with `limits` (max keys, max bytes, client keys,
    /// client bytes).
    write: &'static [Op],
    limits: Option<(usize, usize, usize, usize)>,
    /// `Ok`, or the refusal's label (nothing of the batch applied).
    expect: Result<(), &'static str>,
    /// Everything the session holds afterwards: (channel, key, value).
    after: &'static [(usize, &'static str, &'static str)],
}

const NO_LIMITS: Option<(usize, usize, usize, usize)> = None;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "set in every channel",
            before: &[],
            write: &[
                Set(0, "a", "1"),
                Set(1, "b", "2"),
                Set(2, "c", "3"),
                Set(3, "d", ""),
            ],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "a", "1"), (1, "b", "2"), (2, "c", "3"), (3, "d", "")],
        },
        Case {
            name: "set replaces, other keys stay",
            before: &[Set(0, "a", "1"), Set(0, "b", "2")],
            write: &[Set(0, "a", "one")],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "a", "one"), (0, "b", "2")],
        },
        Case {
            name: "delete, and delete of an absent key",
            before: &[Set(0, "a", "1"), Set(0, "b", "2")],
            write: &[Del(0, "a"), Del(0, "zz"), Del(1, "a")],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "b", "2")],
        },
        Case {
            name: "delete then set in one batch",
            before: &[Set(0, "a", "1")],
            write: &[Del(0, "a"), Set(0, "a", "2")],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "a", "2")],
        },
        Case {
            name: "incr of an absent key starts at 0",
            before: &[],
            write: &[Incr(0, "n", -3)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "n", "-3")],
        },
        Case {
            name: "incr of a stored integer",
            before: &[Set(0, "n", "5")],
            write: &[Incr(0, "n", 3), Incr(0, "n", 2)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "n", "10")],
        },
        Case {
            name: "incr after a set in the same batch",
            before: &[Set(0, "n", "100")],
            write: &[Set(0, "n", "5"), Incr(0, "n", 1)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "n", "6")],
        },
        Case {
            name: "incr after a delete in the same batch",
            before: &[Set(0, "n", "100")],
            write: &[Del(0, "n"), Incr(0, "n", 1)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "n", "1")],
        },
        Case {
            name: "incr past 2^53 is exact",
            before: &[Set(0, "n", "9007199254740993")],
            write: &[Incr(0, "n", 1)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "n", "9007199254740994")],
        },
        Case {
            name: "incr down to i64::MIN",
            before: &[Set(0, "n", "-9223372036854775807")],
            write: &[Incr(0, "n", -1)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "n", "-9223372036854775808")],
        },
        Case {
            name: "incr overflow refuses the whole batch",
            before: &[Set(0, "n", "9223372036854775807")],
            write: &[Set(0, "side", "effect"), Incr(0, "n", 1)],
            limits: NO_LIMITS,
            expect: Err("overflow"),
            after: &[(0, "n", "9223372036854775807")],
        },
        Case {
            name: "incr of a non-integer refuses the whole batch",
            before: &[Set(0, "w", "hi"), Set(1, "x", "1")],
            write: &[Del(1, "x"), Set(0, "side", "effect"), Incr(0, "w", 1)],
            limits: NO_LIMITS,
            expect: Err("not_integer"),
            after: &[(0, "w", "hi"), (1, "x", "1")],
        },
        Case {
            name: "incr of a decimal is not an integer",
            before: &[Set(0, "w", "1.5")],
            write: &[Incr(0, "w", 1)],
            limits: NO_LIMITS,
            expect: Err("not_integer"),
            after: &[(0, "w", "1.5")],
        },
        Case {
            name: "clear drops what the channel held, then sets",
            before: &[Set(1, "old", "1"), Set(0, "keep", "1")],
            write: &[Clear(1), Set(1, "new", "2")],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "keep", "1"), (1, "new", "2")],
        },
        Case {
            name: "incr after a clear starts at 0",
            before: &[Set(1, "n", "7")],
            write: &[Clear(1), Incr(1, "n", 1)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(1, "n", "1")],
        },
        Case {
            name: "a value moved to another channel (policy change)",
            before: &[Set(0, "cart", "x")],
            write: &[Del(0, "cart"), Set(1, "cart", "x")],
            limits: Some((2, 1000, 0, 0)),
            expect: Ok(()),
            after: &[(1, "cart", "x")],
        },
        Case {
            name: "limits: exactly max keys across channels and the client",
            before: &[Set(0, "a", "1"), Set(1, "b", "1")],
            write: &[Set(2, "c", "1")],
            limits: Some((4, 1000, 1, 10)),
            expect: Ok(()),
            after: &[(0, "a", "1"), (1, "b", "1"), (2, "c", "1")],
        },
        Case {
            name: "limits: one key past max refuses",
            before: &[Set(0, "a", "1"), Set(1, "b", "1")],
            write: &[Set(2, "c", "1"), Set(0, "d", "1")],
            limits: Some((4, 1000, 1, 10)),
            expect: Err("too_many_keys"),
            after: &[(0, "a", "1"), (1, "b", "1")],
        },
        Case {
            name: "limits: a replaced key is not counted twice",
            before: &[Set(0, "a", "1"), Set(0, "b", "1")],
            write: &[Set(0, "a", "2"), Incr(0, "b", 1)],
            limits: Some((2, 1000, 0, 0)),
            expect: Ok(()),
            after: &[(0, "a", "2"), (0, "b", "2")],
        },
        Case {
            name: "limits: a delete makes room in the same batch",
            before: &[Set(0, "a", "1"), Set(0, "b", "1")],
            write: &[Del(0, "a"), Set(0, "c", "1")],
            limits: Some((2, 1000, 0, 0)),
            expect: Ok(()),
            after: &[(0, "b", "1"), (0, "c", "1")],
        },
        Case {
            name: "limits: a clear makes room in the same batch",
            before: &[Set(1, "a", "1"), Set(1, "b", "1")],
            write: &[Clear(1), Set(1, "c", "1"), Set(0, "d", "1")],
            limits: Some((2, 1000, 0, 0)),
            expect: Ok(()),
            after: &[(0, "d", "1"), (1, "c", "1")],
        },
        Case {
            // "ab" + "12345" = 7, "c" + "xy" = 3, client 5: 15 bytes.
            name: "limits: exactly max bytes (keys and values, and the client's)",
            before: &[Set(0, "ab", "12345")],
            write: &[Set(1, "c", "xy")],
            limits: Some((10, 15, 1, 5)),
            expect: Ok(()),
            after: &[(0, "ab", "12345"), (1, "c", "xy")],
        },
        Case {
            name: "limits: one byte past max refuses",
            before: &[Set(0, "ab", "12345")],
            write: &[Set(1, "c", "xyz")],
            limits: Some((10, 15, 1, 5)),
            expect: Err("session_too_large"),
            after: &[(0, "ab", "12345")],
        },
        Case {
            name: "limits: an incr that grows a value counts its new size",
            before: &[Set(0, "n", "9")],
            write: &[Incr(0, "n", 1)],
            limits: Some((10, 2, 0, 0)),
            expect: Err("session_too_large"),
            after: &[(0, "n", "9")],
        },
        Case {
            name: "limits: a limit check alone writes nothing",
            before: &[Set(0, "a", "1"), Set(0, "b", "1")],
            write: &[],
            limits: Some((3, 1000, 2, 2)),
            expect: Err("too_many_keys"),
            after: &[(0, "a", "1"), (0, "b", "1")],
        },
        Case {
            name: "values with quotes, backslashes, unicode and newlines round-trip",
            before: &[],
            write: &[
                Set(0, "q", "it's \"quoted\" \\ back\\slash"),
                Set(0, "u", "caf\u{e9} \u{1f600} \u{0}x"),
                Set(1, "nl", "a\nb\r\n"),
                Set(1, "sql", "'; DROP TABLE gimlet_data; --"),
                Set(2, "json", "{\"a\":[1,null]}"),
            ],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[
                (0, "q", "it's \"quoted\" \\ back\\slash"),
                (0, "u", "caf\u{e9} \u{1f600} \u{0}x"),
                (1, "nl", "a\nb\r\n"),
                (1, "sql", "'; DROP TABLE gimlet_data; --"),
                (2, "json", "{\"a\":[1,null]}"),
            ],
        },
        Case {
            name: "keys differ by case",
            before: &[Set(0, "a", "lower")],
            write: &[Set(0, "A", "upper"), Del(0, "a")],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "A", "upper")],
        },
        Case {
            name: "limits: bytes are UTF-8 bytes, not characters",
            before: &[],
            write: &[Set(0, "k", "\u{e9}\u{e9}")],
            limits: Some((10, 4, 0, 0)),
            expect: Err("session_too_large"),
            after: &[],
        },
        Case {
            name: "incr of an integer with leading zeros",
            before: &[Set(0, "n", "-0007")],
            write: &[Incr(0, "n", 10)],
            limits: NO_LIMITS,
            expect: Ok(()),
            after: &[(0, "n", "3")],
        },
        Case {
            name: "incr of a number past 64 bits is not an integer",
            before: &[
                Set(0, "n", "99999999999999999999"),
                Set(0, "z", "00000000000000000000001"),
            ],
            write: &[Incr(0, "z", 1), Incr(0, "n", 1)],
            limits: NO_LIMITS,
            expect: Err("not_integer"),
            after: &[
                (0, "n", "99999999999999999999"),
                (0, "z", "00000000000000000000001"),
            ],
        },
        Case {
            name: "incr of an integer with a trailing newline is not an integer",
            before: &[Set(0, "n", "5\n")],
            write: &[Incr(0, "n", 1)],
            limits: NO_LIMITS,
            expect: Err("not_integer"),
            after: &[(0, "n", "5\n")],
        },
        Case {
            name: "incr of +5 or an empty value is not an integer",
            before: &[Set(0, "p", "+5"), Set(0, "e", "")],
            write: &[Incr(0, "e", 1)],
            limits: NO_LIMITS,
            expect: Err("not_integer"),
            after: &[(0, "e", ""), (0, "p", "+5")],
        },
        Case {
            name: "everything deleted: an empty session",
            before: &[Set(0, "a", "1"), Set(1, "b", "1")],
            write: &[Del(0, "a"), Del(1, "b")],
            limits: Some((10, 1000, 0, 0)),
            expect: Ok(()),
            after: &[],
        },
    ]
}

fn key() -> StoreKey {
    StoreKey {
        id: SessionId::random(),
        tag: gimlet::model::random_tag(),
    }
}

fn batch(k: StoreKey, ops: &[Op], expire_at: u64) -> WriteBatch {
    let mut b = WriteBatch::new(k, expire_at);
    for op in ops {
        match *op {
            Set(c, k, v) => b.channels[c].set.push((k.into(), v.into())),
            Del(c, k) => b.channels[c].delete.push(k.into()),
            Incr(c, k, n) => b.channels[c].incr.push((k.into(), n)),
            Clear(c) => b.channels[c].clear = true,
        }
    }
    b
}

fn all() -> ChannelSet {
    ChannelSet::ALL
}

fn in_an_hour() -> u64 {
    now_ms() + 3_600_000
}

/// What the store holds for `k`: (channel, key, value), sorted.
async fn contents(s: &Store, k: &StoreKey) -> Vec<(usize, String, String)> {
    let r = s.load(k, all(), Check::default()).await.expect("load");
    let mut out = Vec::new();
    for (c, m) in r.channels.iter().enumerate() {
        for (key, v) in m.clone().unwrap_or_default() {
            out.push((c, key, v));
        }
    }
    out.sort();
    out
}

/// Is `k` remembered as ended?
async fn ended(s: &Store, k: &StoreKey) -> bool {
    let check = Check {
        ended: true,
        moved: false,
    };
    s.load(k, all(), check).await.expect("load").ended
}

fn label(r: &Result<gimlet::store::Written, StoreError>) -> Result<(), String> {
    match r {
        Ok(_) => Ok(()),
        Err(StoreError::Rejected(refusal)) => Err(refusal.label().to_string()),
        Err(e) => panic!("not a refusal: {e}"),
    }
}

async fn run_table(name: &str, s: &Store) {
    for c in cases() {
        let k = key();
        if !c.before.is_empty() {
            s.write(&batch(k, c.before, in_an_hour()))
                .await
                .unwrap_or_else(|e| panic!("{name}: {}: before: {e}", c.name));
        }
        let mut b = batch(k, c.write, in_an_hour());
        b.limits = c.limits.map(
            |(max_keys, max_bytes, client_keys, client_bytes)| LimitCheck {
                max_keys,
                max_bytes,
                client_keys,
                client_bytes,
            },
        );
        let got = s.write(&b).await;
        assert_eq!(
            label(&got),
            c.expect.map_err(String::from),
            "{name}: {}",
            c.name
        );
        let want: Vec<(usize, String, String)> = {
            let mut w: Vec<_> = c
                .after
                .iter()
                .map(|(ch, k, v)| (*ch, k.to_string(), v.to_string()))
                .collect();
            w.sort();
            w
        };
        assert_eq!(contents(s, &k).await, want, "{name}: {}", c.name);
    }
}

/// Regenerate, Destroy, ended ids, forwards, expiry, end() and inspect().
async fn run_lifecycle(name: &str, s: &Store) {
    // Regenerate: the data moves to the new id (same tag), nothing stays.
    let old = key();
    s.write(&batch(
        old,
        &[Set(0, "user", "alice"), Set(1, "t", "1")],
        in_an_hour(),
    ))
    .await
    .unwrap();
    let new = StoreKey {
        id: SessionId::random(),
        tag: old.tag,
    };
    let mut b = batch(new, &[Set(0, "after", "1")], in_an_hour());
    b.rename_from = Some(old.id);
    b.forward = Some(("gimlet=new-cookie".into(), now_ms() + 60_000));
    b.end = vec![(old.id, in_an_hour())];
    s.write(&b)
        .await
        .unwrap_or_else(|e| panic!("{name}: regenerate: {e}"));
    assert_eq!(
        contents(s, &old).await,
        vec![],
        "{name}: regenerate left data"
    );
    assert_eq!(
        contents(s, &new).await,
        vec![
            (0, "after".into(), "1".into()),
            (0, "user".into(), "alice".into()),
            (1, "t".into(), "1".into())
        ],
        "{name}: regenerate"
    );
    // The old id: ended, and forwarded to the new cookies.
    let r = s
        .load(
            &old,
            all(),
            Check {
                ended: true,
                moved: true,
            },
        )
        .await
        .unwrap();
    assert!(r.ended, "{name}: the regenerated id is not ended");
    assert_eq!(
        r.moved.as_deref(),
        Some("gimlet=new-cookie"),
        "{name}: forward"
    );
    let r = s
        .load(
            &new,
            all(),
            Check {
                ended: true,
                moved: true,
            },
        )
        .await
        .unwrap();
    assert!(!r.ended && r.moved.is_none(), "{name}: the new id");
    // A write continuing the old id is refused: ended, or moved.
    let mut late = batch(old, &[Set(0, "late", "1")], in_an_hour());
    late.check_ended = true;
    assert_eq!(
        label(&s.write(&late).await),
        Err("session_ended".into()),
        "{name}"
    );
    let mut late = batch(old, &[Set(0, "late", "1")], in_an_hour());
    late.check_moved = true;
    match s.write(&late).await {
        Err(StoreError::Rejected(Refusal::Moved(c))) => {
            assert_eq!(c, "gimlet=new-cookie", "{name}")
        }
        other => panic!("{name}: a write to a moved id: {other:?}"),
    }
    assert_eq!(
        contents(s, &old).await,
        vec![],
        "{name}: a refused write landed"
    );

    // Destroy + Set: the old session's data goes, a new one (same tag) starts.
    let fresh = StoreKey {
        id: SessionId::random(),
        tag: new.tag,
    };
    let mut b = batch(fresh, &[Set(0, "user", "bob")], in_an_hour());
    b.destroy = Some(new);
    s.write(&b).await.unwrap();
    assert_eq!(contents(s, &new).await, vec![], "{name}: destroy");
    assert_eq!(
        contents(s, &fresh).await,
        vec![(0, "user".into(), "bob".into())]
    );
    // Destroy alone.
    let mut b = WriteBatch::new(fresh, 0);
    b.destroy = Some(fresh);
    b.end = vec![(fresh.id, in_an_hour())];
    s.write(&b).await.unwrap();
    assert_eq!(contents(s, &fresh).await, vec![], "{name}: destroy alone");
    assert!(ended(s, &fresh).await);

    // end(): data gone, id ended.
    let k = key();
    s.write(&batch(
        k,
        &[Set(0, "a", "1"), Set(3, "b", "2")],
        in_an_hour(),
    ))
    .await
    .unwrap();
    let seen = s
        .inspect(&k.id, Some(k.tag))
        .await
        .unwrap()
        .expect("inspect");
    assert_eq!(
        seen.keys.values().flatten().count(),
        2,
        "{name}: inspect {:?}",
        seen.keys
    );
    s.end(&[(k, in_an_hour())], None).await.unwrap();
    assert_eq!(contents(s, &k).await, vec![], "{name}: end");
    assert!(ended(s, &k).await);

    // Expiry: data written to expire in a second is gone after it.
    let k = key();
    s.write(&batch(
        k,
        &[Set(0, "a", "1"), Set(1, "b", "1")],
        now_ms() + 1_000,
    ))
    .await
    .unwrap();
    assert_eq!(contents(s, &k).await.len(), 2, "{name}");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(contents(s, &k).await, vec![], "{name}: expired data read");
    // ... and a later write with a later expiry does not bring it back.
    s.write(&batch(k, &[Set(0, "c", "1")], in_an_hour()))
        .await
        .unwrap();
    assert_eq!(
        contents(s, &k).await,
        vec![(0, "c".into(), "1".into())],
        "{name}"
    );
}

/// Writes racing each other on one session, run concurrently: a store
/// serializes them so each sees what the others did.
async fn run_races(name: &str, s: std::sync::Arc<Store>) {
    // Eight Regenerates of one session (a login submitted eight times):
    // one wins; the others are told where the session went; the data
    // moved once, to the winner.
    let old = key();
    s.write(&batch(old, &[Set(0, "user", "alice")], in_an_hour()))
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = s.clone();
        set.spawn(async move {
            let new = StoreKey {
                id: SessionId::random(),
                tag: old.tag,
            };
            let mut b = batch(new, &[Set(0, "n", "1")], in_an_hour());
            b.rename_from = Some(old.id);
            b.forward = Some((format!("gimlet=cookie-{i}"), now_ms() + 60_000));
            b.end = vec![(old.id, in_an_hour())];
            b.check_moved = true;
            b.check_ended = true;
            (i, new, s.write(&b).await)
        });
    }
    let mut won = Vec::new();
    let mut told = Vec::new();
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, new, r) = r.unwrap();
        ids.push((i, new));
        match r {
            Ok(_) => won.push(i),
            Err(StoreError::Rejected(Refusal::Moved(c))) => told.push(c),
            other => panic!("{name}: a racing regenerate: {other:?}"),
        }
    }
    assert_eq!(won.len(), 1, "{name}: regenerates that won: {won:?}");
    let winner = format!("gimlet=cookie-{}", won[0]);
    assert!(told.iter().all(|c| *c == winner), "{name}: {told:?}");
    for (i, new) in ids {
        let want = if i == won[0] {
            vec![
                (0, "n".to_string(), "1".to_string()),
                (0, "user".to_string(), "alice".to_string()),
            ]
        } else {
            vec![]
        };
        assert_eq!(contents(&s, &new).await, want, "{name}: regenerate {i}");
    }
    assert_eq!(contents(&s, &old).await, vec![], "{name}: the old id");

    // Writes racing a logout: each lands before it (and is deleted with
    // the session) or is refused after it; nothing is left afterwards.
    let k = key();
    s.write(&batch(k, &[Set(0, "user", "bob")], in_an_hour()))
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = s.clone();
        set.spawn(async move {
            if i == 4 {
                let mut d = WriteBatch::new(k, 0);
                d.destroy = Some(k);
                d.end = vec![(k.id, in_an_hour())];
                return s.write(&d).await.map(|_| ());
            }
            let key = format!("k{i}");
            let mut b = WriteBatch::new(k, in_an_hour());
            b.channels[0].set = vec![(key, "1".into())];
            b.check_ended = true;
            s.write(&b).await.map(|_| ())
        });
    }
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(()) | Err(StoreError::Rejected(Refusal::Ended)) => {}
            other => panic!("{name}: a write racing a logout: {other:?}"),
        }
    }
    assert_eq!(
        contents(&s, &k).await,
        vec![],
        "{name}: a write outlived the logout"
    );
    assert!(ended(&s, &k).await, "{name}");

    // Writers of different sessions, and sessions joining one user's
    // index, all at once: none waits for or fails because of another
    // (no table-wide locks, no deadlocks).
    let mut set = tokio::task::JoinSet::new();
    let alice = gimlet::store::user_hash("alice");
    for i in 0..8u8 {
        let (s, alice) = (s.clone(), alice.clone());
        set.spawn(async move {
            let k = key();
            for j in 0..25 {
                let mut b = batch(k, &[Set(0, "n", "1"), Incr(0, "c", 1)], in_an_hour());
                b.channels[1].set = vec![(format!("t{j}"), "x".into())];
                if j == 0 {
                    b.users = vec![gimlet::store::UserWrite::Join {
                        user: alice.clone(),
                        entry: gimlet::store::UserSession {
                            id: k.id.hex(),
                            tag: k.tag,
                            created: now_ms() + u64::from(i),
                            seen: now_ms(),
                            expires: in_an_hour(),
                            ip: None,
                            user_agent: None,
                        },
                        replaces: None,
                        max: Some(20),
                    }];
                }
                s.write(&b)
                    .await
                    .map_err(|e| format!("session {i}, write {j}: {e}"))?;
            }
            Ok::<_, String>(k)
        });
    }
    let mut keys = Vec::new();
    while let Some(r) = set.join_next().await {
        keys.push(r.unwrap().unwrap_or_else(|e| panic!("{name}: {e}")));
    }
    for k in &keys {
        let got = contents(&s, k).await;
        assert_eq!(got.len(), 27, "{name}: {got:?}");
        assert!(
            got.contains(&(0, "c".into(), "25".into())),
            "{name}: {got:?}"
        );
    }
    assert_eq!(s.user_sessions(&alice).await.unwrap().len(), 8, "{name}");
}

async fn conform(name: &str, s: Store) {
    s.ping()
        .await
        .unwrap_or_else(|e| panic!("{name}: ping: {e}"));
    run_table(name, &s).await;
    run_lifecycle(name, &s).await;
    run_races(name, std::sync::Arc::new(s)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_conforms() {
    conform("memory", Store::Memory(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("s.redb"), 100).unwrap();
    conform("embedded", Store::Embedded(s)).await;
    // And without the in-memory cache in front of the file.
    let s = EmbeddedStore::open(&dir.path().join("nocache.redb"), 0).unwrap();
    conform("embedded, no cache", Store::Embedded(s)).await;
}

fn redis_store(o: RedisOptions) -> Store {
    Store::Redis(Box::new(
        RedisStore::new(
            RedisOptions {
                prefix: "gimlet:".into(),
                ..o
            },
            Duration::from_secs(2),
        )
        .unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_conforms() {
    let r = RedisServer::start();
    let s = redis_store(RedisOptions {
        url: Some(r.url()),
        ..Default::default()
    });
    conform("redis", s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_conforms() {
    let c = Cluster::start();
    let s = redis_store(RedisOptions {
        cluster: c.nodes.iter().map(|n| n.url()).collect(),
        ..Default::default()
    });
    conform("redis cluster", s).await;
}

fn sql_store(url: String) -> Store {
    let s = SqlStore::new(
        SqlOptions {
            url,
            cleanup_interval: Duration::from_secs(60),
            create_schema: true,
            pool: 4,
        },
        Duration::from_secs(2),
    )
    .unwrap();
    Store::Sql(Box::new(s))
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_conforms() {
    let pg = PgServer::start();
    conform("postgres", sql_store(pg.url())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_conforms() {
    let m = MariaServer::start();
    conform("mariadb", sql_store(m.url())).await;
}
