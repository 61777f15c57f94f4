//! The words every layer shares, and nothing else: session ids, channels,
//! key policies and limits, what a cookie carries, and the error kinds.
//! This is the bottom layer (SPEC sections 1, 2 and 4): it imports no other
//! module of the crate, and every other module may import it.

use std::collections::BTreeMap;
use std::fmt;

/// Current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A session id: 128 random bits from the OS CSPRNG, shown as 32 lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn random() -> SessionId {
        SessionId(random_bytes())
    }

    /// The 32 lowercase hex digits [`SessionId::hex`] writes.
    pub fn from_hex(s: &str) -> Option<SessionId> {
        if s.len() != 32
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(SessionId(id))
    }

    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(32);
        self.push_hex(&mut s);
        s
    }

    /// Append the 32 lower-case hex digits (store keys are built this way,
    /// several per request: no `format!`).
    pub fn push_hex(&self, out: &mut String) {
        let mut buf = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            buf[2 * i] = HEX_DIGITS[(b >> 4) as usize];
            buf[2 * i + 1] = HEX_DIGITS[(b & 15) as usize];
        }
        out.push_str(std::str::from_utf8(&buf).expect("hex digits are ASCII"));
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Append `n` as 8 lower-case hex digits (`{n:08x}`).
pub fn push_hex8(out: &mut String, n: u32) {
    let mut buf = [0u8; 8];
    for (i, d) in buf.iter_mut().enumerate() {
        *d = HEX_DIGITS[(n >> ((7 - i) * 4)) as usize & 15];
    }
    out.push_str(std::str::from_utf8(&buf).expect("hex digits are ASCII"));
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.hex())
    }
}

/// Random 32-bit hash tag chosen when a session is created and kept across
/// Regenerate, so that every store key of a session (old id and new id) lands
/// in one Redis Cluster slot and a Regenerate can move data in one transaction.
pub fn random_tag() -> u32 {
    u32::from_le_bytes(random_bytes())
}

/// `N` bytes from the OS CSPRNG. A machine without one cannot run a
/// session gateway at all, so failing is a panic.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random number generator failed");
    b
}

/// How every error message states the key syntax.
pub const KEY_SYNTAX: &str = "keys match [A-Za-z0-9_.-]{1,64}";

/// Where a key lives. Every cookie and every store hash belongs to one channel.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Channel {
    /// `<name>`: permanent keys (and the id).
    Perm = 0,
    /// `<name>-t`: transient keys, gone when the browser closes.
    Trans = 1,
    /// `__Secure-<name>`: secure permanent keys.
    SecurePerm = 2,
    /// `__Secure-<name>-t`: secure transient keys.
    SecureTrans = 3,
}

pub const CHANNELS: [Channel; 4] = [
    Channel::Perm,
    Channel::Trans,
    Channel::SecurePerm,
    Channel::SecureTrans,
];

/// A set of channels (which store hashes a request reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelSet(u8);

impl ChannelSet {
    pub const NONE: ChannelSet = ChannelSet(0);
    pub const ALL: ChannelSet = ChannelSet(0b1111);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, ch: Channel) -> bool {
        self.0 & ch.bit() != 0
    }

    pub fn insert(&mut self, ch: Channel) {
        self.0 |= ch.bit();
    }
}

/// One value per channel, indexed by [`Channel`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerChannel<T>(pub [T; 4]);

impl<T> PerChannel<T> {
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<T> std::ops::Index<Channel> for PerChannel<T> {
    type Output = T;
    fn index(&self, ch: Channel) -> &T {
        &self.0[ch.index()]
    }
}

impl<T> std::ops::IndexMut<Channel> for PerChannel<T> {
    fn index_mut(&mut self, ch: Channel) -> &mut T {
        &mut self.0[ch.index()]
    }
}

impl Channel {
    pub fn of(p: Policy) -> Channel {
        match (p.secure, p.permanent) {
            (false, true) => Channel::Perm,
            (false, false) => Channel::Trans,
            (true, true) => Channel::SecurePerm,
            (true, false) => Channel::SecureTrans,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn secure(self) -> bool {
        matches!(self, Channel::SecurePerm | Channel::SecureTrans)
    }

    pub fn permanent(self) -> bool {
        matches!(self, Channel::Perm | Channel::SecurePerm)
    }

    /// Suffix of the store key of this channel's hash.
    pub fn store_suffix(self) -> &'static str {
        match self {
            Channel::Perm => "p",
            Channel::Trans => "t",
            Channel::SecurePerm => "sp",
            Channel::SecureTrans => "st",
        }
    }

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Placement and visibility of one key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Policy {
    /// Kept inside the cookie (no store I/O) rather than in the store.
    pub clientside: bool,
    /// Lives as long as the session; otherwise dies with the browser session.
    pub permanent: bool,
    /// Readable and writable on HTTPS only, kept in `__Secure-` cookies.
    pub secure: bool,
}

impl Policy {
    pub const SERVER: Policy = Policy {
        clientside: false,
        permanent: true,
        secure: false,
    };
    pub const CLIENT: Policy = Policy {
        clientside: true,
        permanent: true,
        secure: false,
    };

    pub fn channel(self) -> Channel {
        Channel::of(self)
    }
}

/// Key policies from `session.keys` and `session.undeclared_keys`.
#[derive(Clone, Debug)]
pub struct KeyPolicies {
    /// Fx-hashed: looked up several times per key on every request, and
    /// its keys come from the config, never from a client.
    pub declared: rustc_hash::FxHashMap<String, Policy>,
    /// Policy of keys not in `declared`; `None` means `undeclared_keys: reject`.
    pub undeclared: Option<Policy>,
    /// Placement of undeclared values found in existing data under `reject`.
    pub fallback: Policy,
}

impl KeyPolicies {
    /// The policy governing writes of `key`; `None` when undeclared keys are
    /// rejected.
    pub fn for_write(&self, key: &str) -> Option<Policy> {
        self.declared.get(key).copied().or(self.undeclared)
    }

    /// The policy used to place and show a value that already exists.
    pub fn for_read(&self, key: &str) -> Policy {
        self.for_write(key).unwrap_or(self.fallback)
    }

    /// Could any key live in a secure channel? (Over plain HTTP the secure
    /// cookies are not sent, so their store data cannot be ruled out.)
    pub fn any_secure(&self) -> bool {
        self.declared.values().any(|p| p.secure)
            || self.undeclared.is_some_and(|p| p.secure)
            || self.fallback.secure
    }
}

/// `^[A-Za-z0-9_.-]{1,64}$`
pub fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 64
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Which keys a route may read or write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySet {
    All,
    None,
    Only(Vec<String>),
}

impl KeySet {
    pub fn contains(&self, key: &str) -> bool {
        match self {
            KeySet::All => true,
            KeySet::None => false,
            KeySet::Only(keys) => keys.iter().any(|k| k == key),
        }
    }

    pub fn is_none(&self) -> bool {
        match self {
            KeySet::None => true,
            KeySet::Only(keys) => keys.is_empty(),
            KeySet::All => false,
        }
    }
}

/// Session limits (`session.limits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub value_bytes: usize,
    pub keys: usize,
    pub session_bytes: usize,
    pub forward_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            value_bytes: 65536,
            keys: 256,
            session_bytes: 1_048_576,
            forward_bytes: 16384,
        }
    }
}

/// What a sealed cookie holds. One per channel cookie; every cookie of a
/// session carries the same id and times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    pub meta: Meta,
    pub flags: Flags,
    /// Clientside values of this channel, sorted by key.
    pub values: BTreeMap<String, String>,
}

/// What a channel's cookie says about the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(u8);

impl Flags {
    pub const NONE: Flags = Flags(0);
    /// The store may hold server-side data for this channel of the session.
    pub const STORE: Flags = Flags(1);
    /// Clientside keys of this channel overflowed the cookie and were moved
    /// to the store, so even routes that read only clientside keys must read
    /// it.
    pub const SPILL: Flags = Flags(2);

    pub fn contains(self, f: Flags) -> bool {
        self.0 & f.0 == f.0
    }

    /// The byte in a cookie.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// `None` for a byte with bits this version does not know.
    pub fn from_bits(b: u8) -> Option<Flags> {
        (b & !0b11 == 0).then_some(Flags(b))
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, o: Flags) -> Flags {
        Flags(self.0 | o.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, o: Flags) {
        self.0 |= o.0;
    }
}

/// Identity and times of a live session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub id: SessionId,
    pub tag: u32,
    pub created: u64,
    pub expires: u64,
    pub touched: u64,
}

/// Why a request cookie was not accepted (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    BadMac,
    Malformed,
    Expired,
    UnknownKey,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::BadMac,
        Rejection::Malformed,
        Rejection::Expired,
        Rejection::UnknownKey,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::BadMac => "bad_mac",
            Rejection::Malformed => "malformed",
            Rejection::Expired => "expired",
            Rejection::UnknownKey => "unknown_key",
        }
    }
}

/// Session-wide settings the core needs (a slice of the config).
#[derive(Clone, Debug)]
pub struct Settings {
    pub policies: KeyPolicies,
    pub limits: Limits,
    /// Absolute lifetime, ms.
    pub lifetime: u64,
    /// Idle timeout, ms; `None` = off.
    pub idle_timeout: Option<u64>,
    /// Touch interval, ms.
    pub touch_interval: u64,
    /// A store is configured (`store.kind` is not `none`).
    pub has_store: bool,
    /// `session.dev_insecure`: every request counts as HTTPS.
    pub dev_insecure: bool,
    /// `session.revocation`: ended ids are remembered in the store and every
    /// request with a session checks them.
    pub revocation: bool,
    /// `session.regenerate_grace`, ms (0: off): how long a request still
    /// carrying a regenerated id is served the new session.
    pub regenerate_grace: u64,
    /// `session.user_key`, `session.max_per_user`, `session.track`.
    pub users: Option<UserPolicy>,
}

/// Per-user sessions: which key names the owner, how many sessions a user
/// may have, and what the index records about each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPolicy {
    pub key: String,
    pub max_per_user: Option<usize>,
    pub track_ip: bool,
    pub track_user_agent: bool,
}

/// `home` first, then the others in a fixed order.
pub fn channel_order(home: Channel) -> [Channel; 4] {
    let mut out = [home; 4];
    let mut i = 1;
    for ch in CHANNELS {
        if ch != home {
            out[i] = ch;
            i += 1;
        }
    }
    out
}

/// `store.on_error`: what a failed store read or write does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// `503` with `Retry-After: 1`, nothing half-written.
    Fail,
    /// Forward clientside keys only; server-side writes are directive errors.
    Degrade,
}

/// A route's `on_missing`: the answer of a `require:` gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnMissing {
    Status(u16),
    /// Target with `{path}` to fill in.
    Redirect(String),
}

/// A route's `selection`: how a request picks one of the route's upstreams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    RoundRobin,
    /// The upstream with the fewest requests in flight from this gateway.
    LeastConn,
    /// Consistent hashing (Ketama) of the session's tag, which a session
    /// keeps for life (across Regenerate), so one user stays on one upstream.
    Sticky,
}

impl Selection {
    pub fn label(self) -> &'static str {
        match self {
            Selection::RoundRobin => "round_robin",
            Selection::LeastConn => "least_conn",
            Selection::Sticky => "sticky",
        }
    }
}

/// A route's `on_directive_error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDirectiveError {
    /// `502` naming the reason label instead of the upstream's response.
    Reject,
    /// Pass the upstream's response on, apply nothing.
    Ignore,
}

/// A response the gateway writes itself, without (or instead of) the
/// upstream's: 400, 404, 500, 502, 503 and gate answers. Plain text; the
/// body never holds a session value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAnswer {
    pub status: u16,
    pub body: String,
    /// Extra headers (`location`, `set-cookie`, `retry-after`).
    pub headers: Vec<(&'static str, String)>,
}

impl LocalAnswer {
    pub fn text(status: u16, body: impl Into<String>) -> LocalAnswer {
        LocalAnswer {
            status,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// The store failed under `on_error: fail` (SPEC section 6).
    pub fn store_unavailable() -> LocalAnswer {
        let mut a = LocalAnswer::text(503, "session store unavailable, try again\n");
        a.headers.push(("retry-after", "1".to_string()));
        a
    }
}

/// Labels of `gimlet_directives_total`, in the order of
/// `session::Outcome::applied`: set, delete, incr, regenerate, destroy.
pub const DIRECTIVE_LABELS: [&str; 5] = ["set", "delete", "incr", "regenerate", "destroy"];

/// Why a response's directives were rejected (SPEC section 4): the
/// `reason` label of `gimlet_directive_errors_total` and of the 502 body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DirectiveErrorKind {
    Malformed,
    UnknownHeader,
    BadKey,
    BadValue,
    TooManyKeys,
    NotAllowed,
    Undeclared,
    ValueTooLarge,
    SessionTooLarge,
    CookieTooLarge,
    SecureOverHttp,
    NoStore,
    StoreUnavailable,
    NotInteger,
    Overflow,
    /// `session.revocation`: the session ended (Destroy, Regenerate or
    /// revocation elsewhere) while this request was in flight.
    SessionEnded,
}

impl DirectiveErrorKind {
    /// Every kind, so metrics can create their label sets up front.
    pub const ALL: [DirectiveErrorKind; 16] = [
        DirectiveErrorKind::Malformed,
        DirectiveErrorKind::UnknownHeader,
        DirectiveErrorKind::BadKey,
        DirectiveErrorKind::BadValue,
        DirectiveErrorKind::TooManyKeys,
        DirectiveErrorKind::NotAllowed,
        DirectiveErrorKind::Undeclared,
        DirectiveErrorKind::ValueTooLarge,
        DirectiveErrorKind::SessionTooLarge,
        DirectiveErrorKind::CookieTooLarge,
        DirectiveErrorKind::SecureOverHttp,
        DirectiveErrorKind::NoStore,
        DirectiveErrorKind::StoreUnavailable,
        DirectiveErrorKind::NotInteger,
        DirectiveErrorKind::Overflow,
        DirectiveErrorKind::SessionEnded,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DirectiveErrorKind::Malformed => "malformed",
            DirectiveErrorKind::UnknownHeader => "unknown_header",
            DirectiveErrorKind::BadKey => "bad_key",
            DirectiveErrorKind::BadValue => "bad_value",
            DirectiveErrorKind::TooManyKeys => "too_many_keys",
            DirectiveErrorKind::NotAllowed => "not_allowed",
            DirectiveErrorKind::Undeclared => "undeclared",
            DirectiveErrorKind::ValueTooLarge => "value_too_large",
            DirectiveErrorKind::SessionTooLarge => "session_too_large",
            DirectiveErrorKind::CookieTooLarge => "cookie_too_large",
            DirectiveErrorKind::SecureOverHttp => "secure_over_http",
            DirectiveErrorKind::NoStore => "no_store",
            DirectiveErrorKind::StoreUnavailable => "store_unavailable",
            DirectiveErrorKind::NotInteger => "not_integer",
            DirectiveErrorKind::Overflow => "overflow",
            DirectiveErrorKind::SessionEnded => "session_ended",
        }
    }
}

/// A directive error: its kind, and the plain-text explanation for the log
/// (it may name keys, never values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectiveError {
    pub kind: DirectiveErrorKind,
    pub detail: String,
}

impl DirectiveError {
    pub fn new(kind: DirectiveErrorKind, detail: impl Into<String>) -> DirectiveError {
        DirectiveError {
            kind,
            detail: detail.into(),
        }
    }

    /// The metric label.
    pub fn label(&self) -> &'static str {
        self.kind.label()
    }
}

impl DirectiveError {
    pub fn not_integer(key: &str) -> DirectiveError {
        DirectiveError::new(
            DirectiveErrorKind::NotInteger,
            format!("X-Session-Incr: the stored value of `{key}` is not an integer"),
        )
    }

    pub fn overflow(key: &str) -> DirectiveError {
        DirectiveError::new(
            DirectiveErrorKind::Overflow,
            format!("X-Session-Incr: `{key}` would pass the 64-bit range"),
        )
    }
}

/// SPEC section 4's Incr: `current` (absent counts from 0) plus `n`, in 64
/// bits; the same rule for the gateway (clientside keys) and the in-process
/// stores (the Redis script mirrors it).
pub fn incremented(current: Option<&str>, key: &str, n: i64) -> Result<i64, DirectiveError> {
    let cur = match current {
        None => 0,
        Some(v) => parse_i64(v).ok_or_else(|| DirectiveError::not_integer(key))?,
    };
    cur.checked_add(n)
        .ok_or_else(|| DirectiveError::overflow(key))
}

impl fmt::Display for DirectiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// `^-?[0-9]+$`, within i64.
pub fn parse_i64(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// When and how long one step of a request took.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub start: std::time::Instant,
    pub took: std::time::Duration,
}

impl Step {
    /// A step from `start` until now.
    pub fn since(start: std::time::Instant) -> Step {
        Step {
            start,
            took: start.elapsed(),
        }
    }
}

/// The steps of one request (for `Server-Timing` and trace spans).
#[derive(Clone, Copy, Debug, Default)]
pub struct Steps {
    /// The store read (or reads, on a followed login).
    pub read: Option<Step>,
    /// From picking the upstream to its response header.
    pub upstream: Option<Step>,
    /// The store write and anything that followed it (ending other
    /// sessions).
    pub write: Option<Step>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_and_distinct() {
        let a = SessionId::random();
        let b = SessionId::random();
        assert_eq!(a.hex().len(), 32);
        assert!(a
            .hex()
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn hand_written_hex_matches_format() {
        for n in [0u32, 1, 0x1234, 0xdead_beef, u32::MAX, 0x0f0f_0f0f] {
            let mut s = String::from("p{");
            push_hex8(&mut s, n);
            assert_eq!(s, format!("p{{{n:08x}"));
        }
        for bytes in [[0u8; 16], [0xff; 16], [0xa5; 16], *b"0123456789abcdef"] {
            let id = SessionId(bytes);
            let want: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(id.hex(), want);
        }
    }

    #[test]
    fn key_syntax() {
        assert!(valid_key("user"));
        assert!(valid_key("a.b-c_D9"));
        assert!(valid_key(&"k".repeat(64)));
        assert!(!valid_key(&"k".repeat(65)));
        assert!(!valid_key(""));
        assert!(!valid_key("a b"));
        assert!(!valid_key("a=b"));
        assert!(!valid_key("é"));
    }

    #[test]
    fn channels_follow_policy() {
        let p = |clientside, permanent, secure| Policy {
            clientside,
            permanent,
            secure,
        };
        assert_eq!(p(true, true, false).channel(), Channel::Perm);
        assert_eq!(p(false, false, false).channel(), Channel::Trans);
        assert_eq!(p(true, true, true).channel(), Channel::SecurePerm);
        assert_eq!(p(false, false, true).channel(), Channel::SecureTrans);
        assert_eq!(channel_order(Channel::SecureTrans)[0], Channel::SecureTrans);
    }
}
