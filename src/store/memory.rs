//! `store.kind: memory`: sessions in a process-local map (tests, demos).
//! Lost on restart; expired records are dropped on access and by a sweep.

use super::{Check, Read, Record, Refusal, SessionStore, StoreError, StoreKey, WriteBatch};
use crate::model::{ChannelSet, SessionId};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
struct Maps {
    /// Live records with their expiry (ms).
    records: HashMap<SessionId, (Record, u64)>,
    /// Ended ids (`session.revocation`) until their absolute expiry (ms).
    ended: HashMap<SessionId, u64>,
    /// Regenerated ids within the grace: until (ms), the new cookies.
    moved: HashMap<SessionId, (u64, String)>,
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
        before - m.records.len()
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

    async fn write(&self, b: &WriteBatch) -> Result<(), StoreError> {
        let now = crate::model::now_ms();
        let mut guard = self.maps.lock().unwrap();
        let m = &mut *guard;
        if b.check_moved {
            if let Some(h) = m.moved(&b.source(), now) {
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
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
