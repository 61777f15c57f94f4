//! Untrusted config text: validation never panics; errors always say what.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) =
            gimlet::config::Config::parse(text, std::path::Path::new("/nonexistent/fuzz.yaml"))
        {
            assert!(!e.errors.is_empty());
            for err in &e.errors {
                assert!(!err.message.is_empty());
            }
        }
    }
});
