//! Untrusted `Cookie` headers: splitting and stripping never panic, and the
//! stripped header never carries one of our cookies.
#![no_main]
use gimlet::cookie::{pairs, strip_ours, CookieSpec, SameSite, SecureMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let spec = CookieSpec::new(
        "gimlet",
        "/".into(),
        None,
        SameSite::Lax,
        SecureMode::Auto,
        false,
    );
    for (name, _) in pairs(data) {
        let _ = std::str::from_utf8(name);
    }
    if let Some(out) = strip_ours(&spec, [data].into_iter()) {
        for (name, _) in pairs(&out) {
            assert!(!spec.is_ours(name), "{name:?} survived");
        }
    }
});
