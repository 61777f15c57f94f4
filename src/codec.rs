//! Sealing and opening cookie values.
//!
//! Wire format of a cookie value (base64url without padding):
//!
//! ```text
//! AEAD (encrypt: true):   fmt=1 | kid(4) | nonce(12) | AES-256-GCM(payload) | tag(16)
//! MAC  (encrypt: false):  fmt=2 | kid(4) | payload | HMAC-SHA256(32)
//! ```
//!
//! The AAD (or the MAC input) covers a domain string, the cookie name, the
//! format byte and the key id, so a value cannot be moved to another cookie
//! name or replayed under another format. `kid` is derived from the secret
//! (HKDF), so reordering `session.secrets` does not orphan cookies; the first
//! secret seals, every secret opens, and a cookie opened with an older one is
//! re-issued. MAC comparison is constant-time (`hmac`'s `verify_slice`, and
//! GCM's tag check).
//!
//! The payload (see [`Payload`]) is a compact binary record: id, hash tag,
//! created / expires / touched times, store flags, and the clientside values.

use crate::model::{valid_key, Flags, Meta, Payload, Rejection, SessionId};
use aes_gcm::aead::{Aead, KeyInit, Payload as AeadPayload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;

type HmacSha256 = Hmac<Sha256>;

const FMT_AEAD: u8 = 1;
const FMT_MAC: u8 = 2;
const KID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const MAC_LEN: usize = 32;
const DOMAIN: &[u8] = b"gimlet-cookie-v1\0";
/// Fixed part of a payload: id, tag, three times, flags.
const FIXED_LEN: usize = 16 + 4 + 8 * 3 + 1;
/// A cookie value longer than this is rejected before any decoding.
pub const MAX_VALUE_LEN: usize = 8192;

/// One secret's derived keys.
struct Key {
    id: [u8; KID_LEN],
    aead: Aes256Gcm,
    mac: HmacSha256,
}

impl Key {
    fn derive(secret: &[u8]) -> Key {
        let hk = Hkdf::<Sha256>::new(Some(b"gimlet session cookie"), secret);
        let mut enc = [0u8; 32];
        let mut mac = [0u8; 32];
        let mut id = [0u8; KID_LEN];
        hk.expand(b"aes-256-gcm key", &mut enc)
            .expect("32 bytes is a valid HKDF length");
        hk.expand(b"hmac-sha256 key", &mut mac)
            .expect("32 bytes is a valid HKDF length");
        hk.expand(b"key id", &mut id)
            .expect("4 bytes is a valid HKDF length");
        Key {
            id,
            aead: Aes256Gcm::new_from_slice(&enc).expect("32-byte AES key"),
            mac: <HmacSha256 as Mac>::new_from_slice(&mac).expect("HMAC takes any key length"),
        }
    }
}

/// The key ring: seals with the first secret, opens with any.
pub struct Codec {
    keys: Vec<Key>,
    encrypt: bool,
}

/// A successfully opened cookie.
#[derive(Debug)]
pub struct Opened {
    pub payload: Payload,
    /// Sealed with an older secret or the other format: re-issue it.
    pub stale: bool,
}

impl Codec {
    /// `secrets[0]` seals; all of them open. Panics on an empty list (the
    /// config layer guarantees at least one secret).
    pub fn new<S: AsRef<[u8]>>(secrets: &[S], encrypt: bool) -> Codec {
        assert!(!secrets.is_empty(), "at least one secret");
        Codec {
            keys: secrets.iter().map(|s| Key::derive(s.as_ref())).collect(),
            encrypt,
        }
    }

    /// Seal `payload` for the cookie called `name`.
    pub fn seal(&self, name: &str, payload: &Payload) -> String {
        let key = &self.keys[0];
        let plain = encode_payload(payload);
        let mut out = Vec::with_capacity(1 + KID_LEN + NONCE_LEN + plain.len() + MAC_LEN);
        if self.encrypt {
            let nonce: [u8; NONCE_LEN] = crate::model::random_bytes();
            let aad = aad(name, FMT_AEAD, &key.id);
            let ct = key
                .aead
                .encrypt(
                    Nonce::from_slice(&nonce),
                    AeadPayload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .expect("AES-GCM encryption of a bounded payload cannot fail");
            out.push(FMT_AEAD);
            out.extend_from_slice(&key.id);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&ct);
        } else {
            out.push(FMT_MAC);
            out.extend_from_slice(&key.id);
            out.extend_from_slice(&plain);
            let mut mac = key.mac.clone();
            mac.update(&aad(name, FMT_MAC, &key.id));
            mac.update(&plain);
            out.extend_from_slice(&mac.finalize().into_bytes());
        }
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Open a cookie value received under `name`. Expiry is the caller's
    /// business (it needs the settings); this checks integrity and syntax.
    pub fn open(&self, name: &str, value: &str) -> Result<Opened, Rejection> {
        if value.len() > MAX_VALUE_LEN {
            return Err(Rejection::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(value.as_bytes())
            .map_err(|_| Rejection::Malformed)?;
        if raw.len() < 1 + KID_LEN {
            return Err(Rejection::Malformed);
        }
        let fmt = raw[0];
        let kid = &raw[1..1 + KID_LEN];
        let body = &raw[1 + KID_LEN..];
        let (index, key) = self
            .keys
            .iter()
            .enumerate()
            .find(|(_, k)| k.id == kid)
            .ok_or(Rejection::UnknownKey)?;
        let plain = match fmt {
            FMT_AEAD => {
                if body.len() < NONCE_LEN + TAG_LEN {
                    return Err(Rejection::Malformed);
                }
                let (nonce, ct) = body.split_at(NONCE_LEN);
                key.aead
                    .decrypt(
                        Nonce::from_slice(nonce),
                        AeadPayload {
                            msg: ct,
                            aad: &aad(name, FMT_AEAD, &key.id),
                        },
                    )
                    .map_err(|_| Rejection::BadMac)?
            }
            FMT_MAC => {
                if body.len() < MAC_LEN {
                    return Err(Rejection::Malformed);
                }
                let (plain, tag) = body.split_at(body.len() - MAC_LEN);
                let mut mac = key.mac.clone();
                mac.update(&aad(name, FMT_MAC, &key.id));
                mac.update(plain);
                mac.verify_slice(tag).map_err(|_| Rejection::BadMac)?;
                plain.to_vec()
            }
            _ => return Err(Rejection::Malformed),
        };
        let payload = decode_payload(&plain).ok_or(Rejection::Malformed)?;
        let configured = if self.encrypt { FMT_AEAD } else { FMT_MAC };
        Ok(Opened {
            payload,
            stale: index != 0 || fmt != configured,
        })
    }
}

/// Domain of [`Codec::seal_private`] records (never a cookie).
const PRIVATE_DOMAIN: &[u8] = b"gimlet-private-v1\0";
/// A private record longer than this is rejected before any decoding.
const MAX_PRIVATE_LEN: usize = 65536;

impl Codec {
    /// Encrypt `plain` for `purpose` with AES-GCM, whatever
    /// `session.encrypt` says: for what the gateway keeps in the store that
    /// whoever can read the store must not be able to use (a regenerate
    /// grace's new cookies).
    pub fn seal_private(&self, purpose: &str, plain: &[u8]) -> String {
        let key = &self.keys[0];
        let nonce: [u8; NONCE_LEN] = crate::model::random_bytes();
        let aad = private_aad(purpose, &key.id);
        let ct = key
            .aead
            .encrypt(
                Nonce::from_slice(&nonce),
                AeadPayload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of a bounded record cannot fail");
        let mut out = Vec::with_capacity(KID_LEN + NONCE_LEN + ct.len());
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Open a [`Codec::seal_private`] record; `None` if it is not one of
    /// ours for `purpose`.
    pub fn open_private(&self, purpose: &str, value: &str) -> Option<Vec<u8>> {
        if value.len() > MAX_PRIVATE_LEN {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(value.as_bytes()).ok()?;
        if raw.len() < KID_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (kid, rest) = raw.split_at(KID_LEN);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.id == kid)?;
        key.aead
            .decrypt(
                Nonce::from_slice(nonce),
                AeadPayload {
                    msg: ct,
                    aad: &private_aad(purpose, &key.id),
                },
            )
            .ok()
    }
}

fn private_aad(purpose: &str, kid: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(PRIVATE_DOMAIN.len() + purpose.len() + KID_LEN);
    a.extend_from_slice(PRIVATE_DOMAIN);
    a.extend_from_slice(purpose.as_bytes());
    a.push(0);
    a.extend_from_slice(kid);
    a
}

fn aad(name: &str, fmt: u8, kid: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(DOMAIN.len() + name.len() + 2 + KID_LEN);
    a.extend_from_slice(DOMAIN);
    a.extend_from_slice(name.as_bytes());
    a.push(0);
    a.push(fmt);
    a.extend_from_slice(kid);
    a
}

/// Serialized size of a payload, without sealing it.
pub fn payload_len(p: &Payload) -> usize {
    FIXED_LEN
        + varint_len(p.values.len() as u64)
        + p.values
            .iter()
            .map(|(k, v)| 1 + k.len() + varint_len(v.len() as u64) + v.len())
            .sum::<usize>()
}

/// Length of the cookie value that [`Codec::seal`] would produce.
pub fn sealed_len(p: &Payload, encrypt: bool) -> usize {
    let overhead = if encrypt {
        NONCE_LEN + TAG_LEN
    } else {
        MAC_LEN
    };
    let raw = 1 + KID_LEN + overhead + payload_len(p);
    raw.div_ceil(3) * 4 - (3 - raw % 3) % 3
}

fn encode_payload(p: &Payload) -> Vec<u8> {
    let mut b = Vec::with_capacity(payload_len(p));
    let m = &p.meta;
    b.extend_from_slice(&m.id.0);
    b.extend_from_slice(&m.tag.to_le_bytes());
    b.extend_from_slice(&m.created.to_le_bytes());
    b.extend_from_slice(&m.expires.to_le_bytes());
    b.extend_from_slice(&m.touched.to_le_bytes());
    b.push(p.flags.bits());
    put_varint(&mut b, p.values.len() as u64);
    for (k, v) in &p.values {
        debug_assert!(valid_key(k));
        b.push(k.len() as u8);
        b.extend_from_slice(k.as_bytes());
        put_varint(&mut b, v.len() as u64);
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// Strict decoder: every byte must be accounted for, keys must be valid and
/// strictly increasing, values UTF-8. Anything else is `None` (malformed).
pub fn decode_payload(b: &[u8]) -> Option<Payload> {
    if b.len() < FIXED_LEN {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let mut id = [0u8; 16];
    id.copy_from_slice(&b[..16]);
    let tag = u32::from_le_bytes(b[16..20].try_into().unwrap());
    let created = u64_at(20);
    let expires = u64_at(28);
    let touched = u64_at(36);
    let flags = b[44];
    let mut rest = &b[FIXED_LEN..];
    let count = get_varint(&mut rest)?;
    // Each entry takes at least 3 bytes: a cheap bound before allocating.
    if count > rest.len() as u64 / 3 {
        return None;
    }
    let mut values = BTreeMap::new();
    let mut last: Option<String> = None;
    for _ in 0..count {
        let (&klen, r) = rest.split_first()?;
        rest = r;
        let klen = klen as usize;
        if rest.len() < klen {
            return None;
        }
        let key = std::str::from_utf8(&rest[..klen]).ok()?;
        if !valid_key(key) || last.as_deref().is_some_and(|l| l >= key) {
            return None;
        }
        rest = &rest[klen..];
        let vlen = get_varint(&mut rest)?;
        if vlen > rest.len() as u64 {
            return None;
        }
        let (v, r) = rest.split_at(vlen as usize);
        rest = r;
        let value = std::str::from_utf8(v).ok()?.to_owned();
        last = Some(key.to_owned());
        values.insert(key.to_owned(), value);
    }
    if !rest.is_empty() {
        return None;
    }
    Some(Payload {
        meta: Meta {
            id: SessionId(id),
            tag,
            created,
            expires,
            touched,
        },
        flags: Flags::from_bits(flags)?,
        values,
    })
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            // Reject non-minimal encodings so one payload has one spelling.
            if i > 0 && byte == 0 {
                return None;
            }
            return Some(v);
        }
    }
    None
}

/// 32 random bytes, base64url: 43 characters.
pub fn keygen() -> String {
    use base64::Engine;
    let b: [u8; 32] = crate::model::random_bytes();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: &str = "an-old-secret-that-is-long-enough-000";
    const S2: &str = "the-current-secret-that-is-long-enough";

    fn payload(n: usize) -> Payload {
        let mut values = BTreeMap::new();
        for i in 0..n {
            values.insert(format!("k{i:02}"), format!("value é {i}"));
        }
        Payload {
            meta: Meta {
                id: SessionId::random(),
                tag: 7,
                created: 1_700_000_000_000,
                expires: 1_700_600_000_000,
                touched: 1_700_000_001_000,
            },
            flags: Flags::STORE,
            values,
        }
    }

    #[test]
    fn private_records_are_encrypted_and_bound_to_their_purpose() {
        for encrypt in [true, false] {
            let c = Codec::new(&["private-record-secret-0123456789abcdef"], encrypt);
            let v = c.seal_private("forward", b"gimlet=abc");
            assert!(!v.contains("gimlet"), "not in the clear");
            assert_eq!(c.open_private("forward", &v).unwrap(), b"gimlet=abc");
            assert!(c.open_private("other", &v).is_none());
            let other = Codec::new(&["another-secret-0123456789abcdefghijk"], true);
            assert!(other.open_private("forward", &v).is_none());
            let mut bad = v.clone().into_bytes();
            let last = bad.len() - 2;
            bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
            assert!(c
                .open_private("forward", std::str::from_utf8(&bad).unwrap())
                .is_none());
            // Never opens as a cookie, nor a cookie as a record.
            assert!(c.open("forward", &v).is_err());
        }
    }

    #[test]
    fn round_trip_both_formats() {
        for encrypt in [true, false] {
            let c = Codec::new(&[S2], encrypt);
            for n in [0, 1, 5, 20] {
                let p = payload(n);
                let v = c.seal("gimlet", &p);
                assert_eq!(v.len(), sealed_len(&p, encrypt), "sealed_len n={n}");
                let o = c.open("gimlet", &v).unwrap();
                assert_eq!(o.payload, p);
                assert!(!o.stale);
            }
        }
    }

    #[test]
    fn encrypted_values_are_not_visible() {
        let c = Codec::new(&[S2], true);
        let mut p = payload(0);
        p.values.insert("user".into(), "alice-secret-name".into());
        let v = c.seal("gimlet", &p);
        let raw = URL_SAFE_NO_PAD.decode(v).unwrap();
        assert!(!raw.windows(5).any(|w| w == b"alice"));
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        for encrypt in [true, false] {
            let c = Codec::new(&[S2], encrypt);
            let v = c.seal("gimlet", &payload(2));
            let raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
            for i in 0..raw.len() {
                let mut bad = raw.clone();
                bad[i] ^= 0x01;
                let r = c.open("gimlet", &URL_SAFE_NO_PAD.encode(&bad));
                assert!(r.is_err(), "flip at {i} accepted (encrypt={encrypt})");
            }
        }
    }

    #[test]
    fn truncated_garbage_and_renamed_are_rejected() {
        let c = Codec::new(&[S2], true);
        let v = c.seal("gimlet", &payload(1));
        for cut in 1..8 {
            assert!(c.open("gimlet", &v[..v.len() - cut]).is_err(), "cut {cut}");
        }
        assert_eq!(c.open("gimlet", "").unwrap_err(), Rejection::Malformed);
        assert_eq!(c.open("gimlet", "!!!").unwrap_err(), Rejection::Malformed);
        assert_eq!(
            c.open("gimlet", &"A".repeat(9000)).unwrap_err(),
            Rejection::Malformed
        );
        // A value moved to another cookie name fails authentication.
        assert_eq!(c.open("gimlet-t", &v).unwrap_err(), Rejection::BadMac);
        let m = Codec::new(&[S2], false);
        let v = m.seal("gimlet", &payload(1));
        assert_eq!(m.open("gimlet-t", &v).unwrap_err(), Rejection::BadMac);
    }

    #[test]
    fn other_secret_is_unknown_key_and_rotation_works() {
        let old = Codec::new(&[S1], true);
        let v = old.seal("gimlet", &payload(3));
        let other = Codec::new(&[S2], true);
        assert_eq!(other.open("gimlet", &v).unwrap_err(), Rejection::UnknownKey);
        // Rotated: the new secret first, the old one still verifies.
        let rotated = Codec::new(&[S2, S1], true);
        let o = rotated.open("gimlet", &v).unwrap();
        assert!(o.stale);
        let fresh = rotated.seal("gimlet", &o.payload);
        let o2 = rotated.open("gimlet", &fresh).unwrap();
        assert!(!o2.stale);
        // Order of secrets does not matter for opening.
        assert!(Codec::new(&[S1, S2], true).open("gimlet", &fresh).is_ok());
    }

    #[test]
    fn format_switch_is_stale_not_rejected() {
        let signed = Codec::new(&[S2], false);
        let v = signed.seal("gimlet", &payload(1));
        let o = Codec::new(&[S2], true).open("gimlet", &v).unwrap();
        assert!(o.stale);
    }

    #[test]
    fn strict_payload_decoding() {
        let p = payload(2);
        let good = encode_payload(&p);
        assert!(decode_payload(&good).is_some());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_payload(&trailing).is_none());
        assert!(decode_payload(&good[..good.len() - 1]).is_none());
        let mut flags = good.clone();
        flags[44] = 0x80;
        assert!(decode_payload(&flags).is_none());
        // Huge count with no data behind it.
        let mut count = good[..FIXED_LEN].to_vec();
        put_varint(&mut count, u64::MAX >> 1);
        assert!(decode_payload(&count).is_none());
        // Bad key.
        let mut bad = Payload { ..p.clone() };
        bad.values.clear();
        let mut b = encode_payload(&bad);
        b.pop();
        b.push(1);
        b.push(1);
        b.push(b' ');
        b.push(0);
        assert!(decode_payload(&b).is_none());
    }
}
