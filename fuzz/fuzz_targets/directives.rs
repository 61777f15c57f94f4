//! Untrusted upstream response headers: parsing never panics, and whatever
//! it accepts holds only valid keys.
#![no_main]
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 6] = [
    "X-Session-Set",
    "X-Session-Delete",
    "X-Session-Incr",
    "X-Session-Regenerate",
    "X-Session-Destroy",
    "X-Session-Other",
];

fuzz_target!(|data: &[u8]| {
    // Each line: first byte picks the header name, the rest is the value.
    let lines: Vec<(&str, &[u8])> = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| (NAMES[l[0] as usize % NAMES.len()], &l[1..]))
        .collect();
    if let Ok(d) = gimlet::directives::parse(lines.into_iter(), 256) {
        let keys = d
            .delete
            .iter()
            .chain(d.set.iter().map(|(k, _)| k))
            .chain(d.incr.iter().map(|(k, _)| k));
        for k in keys {
            assert!(gimlet::model::valid_key(k), "{k:?}");
        }
    }
});
