//! `store.kind: memory`: sessions in a process-local map (tests, demos).
//! Lost on restart; expired records are dropped on access and by a sweep.

use super::{
    join_index, Check, Inspected, Read, Record, Refusal, SessionStore, StoreError, StoreKey,
    UserSession, UserWrite, WriteBatch, Written,
};
use crate::model::{ChannelSet, SessionId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Default)]
struct Maps {
    /// Live records with their expiry (ms).
    records: HashMap<SessionId, (Record, u64)>,
    /// Ended ids (`session.revocation`) until their absolute expiry (ms).
    ended: HashMap<SessionId, u64>,
    /// Regenerated ids within the grace: until (ms), the new cookies.
    moved: HashMap<SessionId, (u64, String)>,
    /// Users' indexes: user hash -> id -> entry.
    users: HashMap<String, BTreeMap<String, UserSession>>,
}

impl Maps {
    fn is_ended(&self, id: &SessionId, now: u64) -> bool {
        self.ended.get(id).is_some_and(|until| *until > now)
    }

    fn moved(&self, id: &SessionId, now: u64) -> Option<&String> {
        self.moved
            .get(id)
            .filter(|(until, _)| *until > now)
            .map(|(_, h)| h)
    }
}

/// Shrink a map that holds far less than it has room for.
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 2 * map.len() + 64 {
        map.shrink_to_fit();
    }
}

#[derive(Default)]
pub struct MemoryStore {
    // A std mutex is right here: it is never held across an await, and every
    // critical section is a few map operations.
    maps: Mutex<Maps>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Drop expired records and ended marks; returns how many records.
    pub fn sweep(&self, now: u64) -> usize {
        let mut m = self.maps.lock().unwrap();
        let before = m.records.len();
        m.records.retain(|_, (_, exp)| *exp > now);
        m.ended.retain(|_, until| *until > now);
        m.moved.retain(|_, (until, _)| *until > now);
        for index in m.users.values_mut() {
            index.retain(|_, e| e.expires > now);
        }
        m.users.retain(|_, index| !index.is_empty());
        // Give the memory back: a map keeps its largest capacity otherwise
        // (200k expired sessions held ~200 MB after the sweep).
        shrink(&mut m.records);
        shrink(&mut m.ended);
        shrink(&mut m.moved);
        shrink(&mut m.users);
        before - m.records.len()
    }

    /// Capacity of the records map (tests).
    pub fn capacity(&self) -> usize {
        self.maps.lock().unwrap().records.capacity()
    }

    pub fn len(&self) -> usize {
        self.maps.lock().unwrap().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionStore for MemoryStore {
    async fn load(
        &self,
        key: &StoreKey,
        mask: ChannelSet,
        check: Check,
    ) -> Result<Read, StoreError> {
        let now = crate::model::now_ms();
        let m = self.maps.lock().unwrap();
        let channels = match m.records.get(&key.id) {
            Some((r, exp)) if *exp > now => r.loaded(mask),
            _ => Record::default().loaded(mask),
        };
        Ok(Read {
            channels,
            ended: check.ended && m.is_ended(&key.id, now),
            moved: check
                .moved
                .then(|| m.moved(&key.id, now).cloned())
                .flatten(),
        })
    }

    async fn write(&self, b: &WriteBatch) -> Result<Written, StoreError> {
        let now = crate::model::now_ms();
        let mut guard = self.maps.lock().unwrap();
        let m = &mut *guard;
        if b.check_moved {
            if let Some(h) = m.moved(&b.carried(), now) {
                return Err(StoreError::Rejected(Refusal::Moved(h.clone())));
            }
        }
        if b.check_ended && !b.destroy_only() && m.is_ended(&b.source(), now) {
            return Err(StoreError::Rejected(Refusal::Ended));
        }
        let map = &mut m.records;
        let live = |e: Option<(Record, u64)>| e.filter(|(_, exp)| *exp > now).map(|(r, _)| r);
        // Work on copies; commit only when the whole batch applies.
        let mut removed = Vec::new();
        if let Some(old) = b.destroy {
            removed.push((old.id, map.remove(&old.id)));
        }
        let mut rec = match b.rename_from {
            Some(from) => {
                let r = map.remove(&from);
                removed.push((from, r.clone()));
                live(r).unwrap_or_default()
            }
            None => live(map.get(&b.key.id).cloned()).unwrap_or_default(),
        };
        if !b.destroy_only() {
            if let Err(e) = rec.apply_batch(b) {
                for (id, r) in removed.into_iter().rev() {
                    if let Some(r) = r {
                        map.insert(id, r);
                    }
                }
                return Err(StoreError::Rejected(e));
            }
            if rec.is_empty() {
                map.remove(&b.key.id);
            } else {
                map.insert(b.key.id, (rec, b.expire_at));
            }
        }
        for (id, until) in &b.end {
            m.ended.insert(*id, *until);
        }
        if let (Some(from), Some((h, until))) = (b.rename_from, &b.forward) {
            m.moved.insert(from, (*until, h.clone()));
        }
        let mut written = Written::default();
        for u in &b.users {
            match u {
                UserWrite::Leave { user, id } => {
                    if let Some(index) = m.users.get_mut(user) {
                        index.remove(&id.hex());
                    }
                }
                UserWrite::Join {
                    user,
                    entry,
                    replaces,
                    max,
                } => {
                    let Maps { users, ended, .. } = &mut *m;
                    let index = users.entry(user.clone()).or_default();
                    let is_ended = |e: &UserSession| {
                        e.key()
                            .is_some_and(|k| ended.get(&k.id).is_some_and(|u| *u > now))
                    };
                    written.evicted.extend(join_index(
                        index,
                        entry,
                        replaces.as_ref(),
                        *max,
                        now,
                        &is_ended,
                    ));
                }
            }
        }
        Ok(written)
    }

    async fn user_sessions(&self, user: &str) -> Result<Vec<UserSession>, StoreError> {
        let now = crate::model::now_ms();
        let m = self.maps.lock().unwrap();
        Ok(m.users.get(user).map_or_else(Vec::new, |index| {
            index
                .values()
                .filter(|e| e.expires > now)
                .filter(|e| e.key().is_some_and(|k| !m.is_ended(&k.id, now)))
                .cloned()
                .collect()
        }))
    }

    async fn end(
        &self,
        sessions: &[(StoreKey, u64)],
        user: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut m = self.maps.lock().unwrap();
        for (key, until) in sessions {
            m.records.remove(&key.id);
            m.moved.remove(&key.id);
            m.ended.insert(key.id, *until);
            if let Some(index) = user.and_then(|u| m.users.get_mut(u)) {
                index.remove(&key.id.hex());
            }
        }
        Ok(())
    }

    async fn inspect(
        &self,
        id: &SessionId,
        _tag: Option<u32>,
    ) -> Result<Option<Inspected>, StoreError> {
        let now = crate::model::now_ms();
        let m = self.maps.lock().unwrap();
        let ended = m.is_ended(id, now);
        let Some((rec, exp)) = m.records.get(id).filter(|(_, exp)| *exp > now) else {
            return Ok(ended.then(|| Inspected {
                id: id.hex(),
                ended,
                ..Default::default()
            }));
        };
        Ok(Some(Inspected {
            id: id.hex(),
            tag: 0,
            data_expires: Some(*exp),
            keys: rec.key_names(),
            ended,
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChannelWrite;

    #[tokio::test]
    async fn a_sweep_gives_the_memory_back() {
        let s = MemoryStore::new();
        let now = crate::model::now_ms();
        for i in 0..20_000u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_le_bytes());
            let mut b = WriteBatch::new(
                StoreKey {
                    id: SessionId(id),
                    tag: 1,
                },
                now + 20,
            );
            b.channels[0] = ChannelWrite {
                set: vec![("k".into(), "v".into())],
                ..Default::default()
            };
            s.write(&b).await.unwrap();
        }
        assert!(s.capacity() >= 20_000);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert_eq!(s.sweep(crate::model::now_ms()), 20_000);
        assert!(
            s.capacity() < 1_000,
            "capacity {} after the sweep",
            s.capacity()
        );
    }
}
