//! Untrusted cookie values: opening never panics, and anything that opens
//! re-seals to something that opens to the same payload.
#![no_main]
use gimlet::codec::{decode_payload, Codec};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static CODECS: LazyLock<[Codec; 2]> = LazyLock::new(|| {
    let s = "fuzz-secret-0123456789abcdefghijklmnop";
    [Codec::new(&[s], true), Codec::new(&[s], false)]
});

fuzz_target!(|data: &[u8]| {
    let _ = decode_payload(data);
    if let Ok(text) = std::str::from_utf8(data) {
        for c in CODECS.iter() {
            if let Ok(o) = c.open("gimlet", text) {
                let again = c
                    .open("gimlet", &c.seal("gimlet", &o.payload))
                    .expect("re-sealed cookie opens");
                assert_eq!(again.payload, o.payload);
            }
        }
    }
    // A sealed payload that the fuzzer shaped: must round-trip too.
    if let Some(p) = decode_payload(data) {
        let c = &CODECS[0];
        assert_eq!(c.open("gimlet", &c.seal("gimlet", &p)).unwrap().payload, p);
    }
});
