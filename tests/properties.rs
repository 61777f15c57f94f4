//! Property tests (issue 15): the cookie codec, the directive parser and the
//! stores, over random inputs.

use gimlet::codec::Codec;
use gimlet::directives::{self, Directives};
use gimlet::model::{ChannelSet, Flags, Meta, Payload, SessionId};
use gimlet::store::{
    embedded::EmbeddedStore, memory::MemoryStore, ChannelWrite, Check, LimitCheck, Store, StoreKey,
    WriteBatch,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

const SECRET: &str = "property-test-secret-0123456789abcdef";

fn key() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,11}"
}

fn payload() -> impl Strategy<Value = Payload> {
    (
        any::<[u8; 16]>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        0u8..4,
        proptest::collection::btree_map(key(), "\\PC{0,40}", 0..6),
    )
        .prop_map(
            |(id, tag, created, expires, touched, flags, values)| Payload {
                meta: Meta {
                    id: SessionId(id),
                    tag,
                    created,
                    expires,
                    touched,
                },
                flags: Flags::from_bits(flags).unwrap_or(Flags::NONE),
                values,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Seal then open gives the payload back, in both formats; any change
    /// of one byte of the sealed bytes is rejected.
    #[test]
    fn sealed_cookies_round_trip_and_reject_every_byte_change(
        p in payload(),
        encrypt in any::<bool>(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        use base64::Engine;
        let codec = Codec::new(&[SECRET], encrypt);
        let sealed = codec.seal("gimlet", &p);
        let opened = codec.open("gimlet", &sealed).unwrap();
        prop_assert_eq!(&opened.payload, &p);
        prop_assert!(codec.open("gimlet-t", &sealed).is_err(), "moved to another name");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut raw = b64.decode(&sealed).unwrap();
        let i = at.index(raw.len());
        raw[i] ^= flip;
        prop_assert!(codec.open("gimlet", &b64.encode(&raw)).is_err(), "byte {} changed", i);
    }

    /// The parser never panics on any header values, and what it accepts
    /// serializes back to directives it parses to the same set.
    #[test]
    fn directives_never_panic_and_round_trip(
        names in proptest::collection::vec(
            prop::sample::select(vec![
                "X-Session-Set", "X-Session-Delete", "X-Session-Incr",
                "X-Session-Destroy", "X-Session-Regenerate", "x_session.set",
            ]),
            0..5,
        ),
        values in proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..60),
                // Mostly well-formed: pairs, lists, numbers, the flags.
                "([a-z][a-z0-9_]{0,5}=[-0-9a-z%+]{0,6}&?){1,4}".prop_map(String::into_bytes),
                "[a-z]{1,4}(,[a-z]{1,4}){0,3}".prop_map(String::into_bytes),
                "[a-z]{1,3}=-?[0-9]{1,20}".prop_map(String::into_bytes),
                prop::sample::select(vec!["1", "user"]).prop_map(|s| s.as_bytes().to_vec()),
            ],
            0..5,
        ),
    ) {
        let headers: Vec<(&str, &[u8])> =
            names.iter().zip(&values).map(|(n, v)| (*n, v.as_slice())).collect();
        if let Ok(d) = directives::parse(headers.into_iter(), 256) {
            let lines = serialize(&d);
            let again = directives::parse(
                lines.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
                256,
            )
            .unwrap();
            prop_assert_eq!(again, d);
        }
    }
}

/// Directives as an upstream would send them.
fn serialize(d: &Directives) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let form = |pairs: Vec<(String, String)>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(&k, &v);
        }
        s.finish()
    };
    if d.destroy {
        let v = if d.destroy_user { "user" } else { "1" };
        out.push(("X-Session-Destroy".into(), v.into()));
    }
    if d.regenerate {
        out.push(("X-Session-Regenerate".into(), "1".into()));
    }
    if !d.delete.is_empty() {
        out.push(("X-Session-Delete".into(), d.delete.join(",")));
    }
    if !d.set.is_empty() {
        out.push(("X-Session-Set".into(), form(d.set.clone())));
    }
    if !d.incr.is_empty() {
        let pairs = d
            .incr
            .iter()
            .map(|(k, n)| (k.clone(), n.to_string()))
            .collect();
        out.push(("X-Session-Incr".into(), form(pairs)));
    }
    out
}

/// One random store operation on one of a few sessions.
#[derive(Clone, Debug)]
enum Op {
    Set(u8, usize, String, String),
    Delete(u8, usize, String),
    Incr(u8, usize, String, i64),
    Destroy(u8),
    Regenerate(u8, u8),
    Limited(u8, usize, String, String, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let k = prop::sample::select(vec!["a", "b", "n", "s"]).prop_map(str::to_string);
    let s = 0u8..3;
    let ch = 0usize..4;
    prop_oneof![
        (s.clone(), ch.clone(), k.clone(), "[a-z0-9]{0,4}")
            .prop_map(|(s, c, k, v)| Op::Set(s, c, k, v)),
        (s.clone(), ch.clone(), k.clone()).prop_map(|(s, c, k)| Op::Delete(s, c, k)),
        (
            s.clone(),
            ch.clone(),
            k.clone(),
            prop_oneof![Just(i64::MAX), Just(i64::MIN), -5i64..5]
        )
            .prop_map(|(s, c, k, n)| Op::Incr(s, c, k, n)),
        s.clone().prop_map(Op::Destroy),
        (s.clone(), 3u8..6).prop_map(|(s, t)| Op::Regenerate(s, t)),
        (s, ch, k, "[a-z]{0,3}", 1usize..4).prop_map(|(s, c, k, v, m)| Op::Limited(s, c, k, v, m)),
    ]
}

fn batch(op: &Op, now: u64) -> WriteBatch {
    let key = |s: u8| StoreKey {
        id: SessionId([s; 16]),
        tag: 1,
    };
    let at = now + 60_000;
    let mut b;
    match op {
        Op::Set(s, c, k, v) => {
            b = WriteBatch::new(key(*s), at);
            b.channels[*c].set = vec![(k.clone(), v.clone())];
        }
        Op::Delete(s, c, k) => {
            b = WriteBatch::new(key(*s), at);
            b.channels[*c].delete = vec![k.clone()];
        }
        Op::Incr(s, c, k, n) => {
            b = WriteBatch::new(key(*s), at);
            b.channels[*c].incr = vec![(k.clone(), *n)];
        }
        Op::Destroy(s) => {
            b = WriteBatch::new(key(*s), 0);
            b.destroy = Some(key(*s));
        }
        Op::Regenerate(s, t) => {
            b = WriteBatch::new(key(*t), at);
            b.rename_from = Some(key(*s).id);
            b.channels[0] = ChannelWrite::default();
        }
        Op::Limited(s, c, k, v, max) => {
            b = WriteBatch::new(key(*s), at);
            b.channels[*c].set = vec![(k.clone(), v.clone())];
            b.limits = Some(LimitCheck {
                max_keys: *max,
                max_bytes: 1 << 20,
                client_keys: 0,
                client_bytes: 0,
            });
        }
    }
    b
}

async fn snapshot(store: &Store) -> Vec<Vec<Option<BTreeMap<String, String>>>> {
    let mut out = Vec::new();
    for s in 0u8..6 {
        let k = StoreKey {
            id: SessionId([s; 16]),
            tag: 1,
        };
        let r = store
            .load(&k, ChannelSet::ALL, Check::default())
            .await
            .unwrap();
        out.push(r.channels.to_vec());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// The embedded store answers every random sequence of writes exactly as
    /// the memory store (the model) does: the same refusals, the same data.
    #[test]
    fn the_embedded_store_follows_the_memory_model(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let model = Store::Memory(MemoryStore::new());
            let real = Store::Embedded(EmbeddedStore::open(&dir.path().join("p.redb"), 4).unwrap());
            let now = gimlet::model::now_ms();
            for op in &ops {
                let b = batch(op, now);
                let (m, r) = (model.write(&b).await, real.write(&b).await);
                prop_assert_eq!(m.map(|_| ()), r.map(|_| ()), "{:?}", op);
            }
            prop_assert_eq!(snapshot(&model).await, snapshot(&real).await);
            Ok(())
        })?;
    }
}
