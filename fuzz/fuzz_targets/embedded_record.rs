//! The embedded store's on-disk layouts: whatever bytes the file holds, the
//! decoders answer without panicking, and what the encoders write decodes
//! back to what was written.
#![no_main]
use gimlet::model::SessionId;
use gimlet::store::embedded::record;
use gimlet::store::UserSession;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Bytes as the file might hold them.
    let _ = record::parse_data_key(data);
    let _ = record::parse_expiry_key(data);
    let _ = record::parse_moved(data);
    let _ = record::parse_user_key(data);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(e) = UserSession::decode(s) {
            assert_eq!(UserSession::decode(&e.encode()), Some(e));
        }
    }

    // Round trips, the fields cut from the input.
    let Some((head, rest)) = data.split_first_chunk::<25>() else {
        return;
    };
    let id = SessionId(head[..16].try_into().unwrap());
    let at = u64::from_be_bytes(head[16..24].try_into().unwrap());
    let ch = head[24];
    let text = String::from_utf8_lossy(rest);
    let k = record::data_key(&id, ch, &text);
    assert_eq!(record::parse_data_key(&k), Some((id, ch, text.as_bytes())));
    assert!(k.starts_with(&record::prefix(&id, ch)));
    let e = record::expiry_key(at, &id);
    assert_eq!(record::parse_expiry_key(&e), Some((at, id)));
    let m = record::moved_value(at, &text);
    assert_eq!(record::parse_moved(&m), Some((at, &*text)));
    // A user hash never holds a 0 byte.
    let user: String = text.chars().filter(|&c| c != '\0').collect();
    let u = record::user_key(&user, &id);
    assert_eq!(record::parse_user_key(&u), Some((user.as_str(), id)));
    let (lo, hi) = record::user_range(&user);
    assert!(lo <= u && u < hi);
    let entry = UserSession {
        id: id.hex(),
        tag: at as u32,
        created: at,
        seen: at / 2,
        expires: at.wrapping_add(1),
        ip: (ch & 1 == 1).then(|| text.to_string()),
        user_agent: (ch & 2 == 2).then(|| text.to_string()),
    };
    assert_eq!(UserSession::decode(&entry.encode()), Some(entry));
});
