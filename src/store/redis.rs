//! `store.kind: redis` (placeholder until the Redis issue lands).

use super::{Loaded, SessionStore, StoreError, StoreKey, WriteBatch};
use crate::config::RedisConfig;
use std::time::Duration;

pub struct RedisStore {
    _cfg: RedisConfig,
}

impl RedisStore {
    pub fn new(cfg: RedisConfig, _timeout: Duration) -> Result<RedisStore, String> {
        Ok(RedisStore { _cfg: cfg })
    }
}

impl SessionStore for RedisStore {
    async fn load(&self, _key: &StoreKey, _mask: u8) -> Result<Loaded, StoreError> {
        Err(StoreError::Unavailable(
            "redis store not implemented".into(),
        ))
    }
    async fn write(&self, _batch: &WriteBatch) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(
            "redis store not implemented".into(),
        ))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable(
            "redis store not implemented".into(),
        ))
    }
}
