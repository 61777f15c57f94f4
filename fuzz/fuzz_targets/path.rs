//! Request paths from anyone: the normalizer never panics, is idempotent,
//! and what it lets through holds no `//`, `/./` or `/../` (nor ends in a dot
//! segment), no raw `\\` or control byte, and no escape it should have
//! decoded or refused. The route path (parameters dropped) keeps those
//! properties.
#![no_main]
use gimlet::path::{normalize, route_path};
use libfuzzer_sys::fuzz_target;

fn check(p: &str, keep: bool) {
    assert!(p.starts_with('/'), "{p:?}");
    for bad in ["//", "/./", "/../"] {
        assert!(!p.contains(bad), "{p:?} holds {bad}");
    }
    assert!(!p.ends_with("/.") && !p.ends_with("/.."), "{p:?}");
    assert!(
        p.bytes().all(|b| b > 0x20 && b < 0x7f && b != b'\\'),
        "{p:?}"
    );
    let lower = p.to_ascii_lowercase();
    assert!(!lower.contains("%2e"), "{p:?} kept an encoded dot");
    if !keep {
        assert!(!lower.contains("%2f") && !lower.contains("%5c"), "{p:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let (keep, raw) = match data.split_first() {
        Some((k, rest)) => (k & 1 == 1, rest),
        None => return,
    };
    let Ok(once) = normalize(raw, keep) else {
        return;
    };
    check(&once, keep);
    let twice = normalize(once.as_bytes(), keep).expect("a normalized path normalizes");
    assert_eq!(twice, once, "not idempotent");
    let route = route_path(&once);
    check(&route, keep);
    assert!(!route.contains(';'), "{route:?}");
    assert_eq!(route_path(&route), route);
});
