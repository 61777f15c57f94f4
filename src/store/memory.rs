//! `store.kind: memory`: sessions in a process-local map (tests, demos).
//! Lost on restart; expired records are dropped on access and by a sweep.

use super::{Loaded, Record, SessionStore, StoreError, StoreKey, WriteBatch};
use crate::model::{ChannelSet, SessionId};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryStore {
    // A std mutex is right here: it is never held across an await, and every
    // critical section is a few map operations.
    map: Mutex<HashMap<SessionId, (Record, u64)>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Drop expired records; returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        let mut map = self.map.lock().unwrap();
        let before = map.len();
        map.retain(|_, (_, exp)| *exp > now);
        before - map.len()
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionStore for MemoryStore {
    async fn load(&self, key: &StoreKey, mask: ChannelSet) -> Result<Loaded, StoreError> {
        let now = crate::model::now_ms();
        let map = self.map.lock().unwrap();
        let rec = match map.get(&key.id) {
            Some((r, exp)) if *exp > now => r.loaded(mask),
            _ => Record::default().loaded(mask),
        };
        Ok(rec)
    }

    async fn write(&self, b: &WriteBatch) -> Result<(), StoreError> {
        let now = crate::model::now_ms();
        let mut map = self.map.lock().unwrap();
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
        if b.destroy_only() {
            return Ok(());
        }
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
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
