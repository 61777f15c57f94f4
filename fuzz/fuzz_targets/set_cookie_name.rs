//! Upstream `Set-Cookie` lines: the name a browser would send back is
//! found without panicking, and a nameless cookie whose value starts with
//! our name and `=` (a browser sends it back as our cookie) is always caught.
#![no_main]
use gimlet::cookie::{set_cookie_name, CookieSpec, SameSite, SecureMode};
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
    let name = set_cookie_name(data);
    let _ = spec.is_ours(name);
    // Prefixing our name as a nameless cookie is always caught.
    let mut line = b"=gimlet=".to_vec();
    line.extend_from_slice(data);
    assert!(spec.is_ours(set_cookie_name(&line)), "{line:?}");
});
