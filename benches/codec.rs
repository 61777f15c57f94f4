//! Micro-benchmarks of the session core's parsers and codec (run by
//! `bench/run`, or `cargo bench --bench codec`).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gimlet::codec::Codec;
use gimlet::model::{Flags, Meta, Payload, SessionId};
use std::collections::BTreeMap;

fn payload(n: usize) -> Payload {
    let mut values = BTreeMap::new();
    for i in 0..n {
        values.insert(
            format!("key{i:02}"),
            format!("value-{i}-{}", "x".repeat(20)),
        );
    }
    Payload {
        meta: Meta {
            id: SessionId::random(),
            tag: 42,
            created: 1_800_000_000_000,
            expires: 1_800_600_000_000,
            touched: 1_800_000_000_000,
        },
        flags: Flags::STORE,
        values,
    }
}

fn codec(c: &mut Criterion) {
    let secret = "bench-secret-0123456789abcdefghijklmnopq";
    for encrypt in [true, false] {
        let mode = if encrypt { "aes-gcm" } else { "hmac" };
        let codec = Codec::new(&[secret], encrypt);
        let mut g = c.benchmark_group(format!("cookie/{mode}"));
        for n in [0usize, 5, 20] {
            let p = payload(n);
            let sealed = codec.seal("gimlet", &p);
            g.bench_with_input(BenchmarkId::new("encode", n), &p, |b, p| {
                b.iter(|| codec.seal(black_box("gimlet"), black_box(p)))
            });
            g.bench_with_input(BenchmarkId::new("decode", n), &sealed, |b, v| {
                b.iter(|| codec.open(black_box("gimlet"), black_box(v)).unwrap())
            });
        }
        g.finish();
    }
}

fn directives(c: &mut Criterion) {
    let mut g = c.benchmark_group("directives");
    type Headers<'a> = Vec<(&'a str, &'a [u8])>;
    let cases: [(&str, Headers); 3] = [
        ("set-1", vec![("x-session-set", b"user=alice".as_slice())]),
        (
            "mixed-4",
            vec![
                ("x-session-set", b"user=alice+smith&role=admin&cart=%5B1%2C2%5D".as_slice()),
                ("x-session-delete", b"flash, tmp".as_slice()),
                ("x-session-incr", b"visits=1".as_slice()),
                ("x-session-regenerate", b"1".as_slice()),
            ],
        ),
        (
            "set-20",
            vec![(
                "x-session-set",
                b"k01=v&k02=v&k03=v&k04=v&k05=v&k06=v&k07=v&k08=v&k09=v&k10=v&k11=v&k12=v&k13=v&k14=v&k15=v&k16=v&k17=v&k18=v&k19=v&k20=v".as_slice(),
            )],
        ),
    ];
    for (name, headers) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| gimlet::directives::parse(black_box(headers.iter().copied()), 256).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, codec, directives);
criterion_main!(benches);
