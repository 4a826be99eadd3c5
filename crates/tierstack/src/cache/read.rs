//! The read path: L1, then L2 (filling L1 with the L2 entry's remaining time), decoding, and
//! what becomes of an entry that does not decode.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::envelope::Envelope;
use tierstack_core::key::fingerprint;
use tierstack_core::{Codec, Result};
use tokio::time::Instant;

use super::Inner;
use crate::freshness::Snapshot;
use crate::stats::L2Op;

/// What an L2 read found.
pub(super) enum L2Read<V> {
    /// A value, or a negative entry (`None`), with its remaining time to live.
    Hit(Option<V>, Duration),
    Miss,
}

/// Why an L2 entry did not decode, for the log: never the payload, which serde's messages may
/// quote.
#[derive(Debug, Clone, Copy)]
enum Undecodable {
    /// Not an envelope of this cache: garbage, truncated, another version, codec or size.
    Envelope,
    /// An envelope whose payload is not a value of this cache's type (a deploy changed it).
    Payload,
}

impl Undecodable {
    fn describe(self) -> &'static str {
        match self {
            Self::Envelope => "not a tierstack envelope of this codec and size",
            Self::Payload => "the payload does not decode as this cache's value type",
        }
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn get(&self, key: &str) -> Result<Option<V>> {
        self.check_key(key)?;
        if let Some(hit) = self.l1_get(key) {
            return Ok(hit);
        }
        // A miss, or an L2 failure (counted and logged) read as one.
        if let Ok(Some(hit)) = self.l2_lookup(key, self.deadline()).await {
            return Ok(hit);
        }
        self.recorder.miss();
        Ok(None)
    }

    pub(super) async fn exists(&self, key: &str) -> Result<bool> {
        self.check_key(key)?;
        if let Some(hit) = self.l1_get(key) {
            return Ok(hit.is_some());
        }
        // Like `get`: an L2 that fails reads as a miss.
        Ok(matches!(
            self.l2_lookup(key, self.deadline()).await,
            Ok(Some(Some(_)))
        ))
    }

    pub(super) async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        self.check_key(key)?;
        if let Some(l2) = &self.l2 {
            let store_key = self.namespace.store_key(key);
            // Like `get`: an L2 that fails (counted and logged) reads as a miss of L2, and L1
            // answers.
            if let Ok(ttl) = self
                .l2_call(L2Op::Other, self.deadline(), l2.ttl(&store_key))
                .await
            {
                return Ok(ttl);
            }
        }
        Ok(self.l1.as_ref().and_then(|l1| l1.ttl(key)))
    }

    /// The live L1 entry of `key`: `Some(Some(v))` a value, `Some(None)` a negative entry.
    #[expect(
        clippy::option_option,
        reason = "a negative entry is a hit with no value, unlike a miss"
    )]
    pub(super) fn l1_get(&self, key: &str) -> Option<Option<V>> {
        let entry = self.l1.as_ref()?.get(key)?;
        self.recorder.l1_hit();
        Some(entry.value)
    }

    /// Reads `key` from L2 and fills L1 on a hit: `Some(v)` a hit (`v` is `None` for a negative
    /// entry), `None` a miss. Counts the hit; a miss is counted by the caller.
    pub(super) async fn l2_lookup(
        &self,
        key: &str,
        deadline: Instant,
    ) -> Result<Option<Option<V>>> {
        let snapshot = self.freshness.snapshot(key);
        match self.read_l2(key, deadline).await? {
            L2Read::Hit(value, ttl) => {
                self.recorder.l2_hit();
                self.fill_l1(key, value.clone(), ttl, || {
                    self.freshness.is_current(snapshot)
                });
                Ok(Some(value))
            }
            L2Read::Miss => Ok(None),
        }
    }

    /// Reads and decodes `key` from L2; an entry that does not decode is discarded and reads as
    /// a miss.
    pub(super) async fn read_l2(&self, key: &str, deadline: Instant) -> Result<L2Read<V>> {
        let Some(l2) = &self.l2 else {
            return Ok(L2Read::Miss);
        };
        let store_key = self.namespace.store_key(key);
        // The remaining TTL only serves to fill L1: without one, a plain GET will do.
        let found = if self.l1.is_some() {
            self.l2_call(L2Op::Get, deadline, l2.get_with_ttl(&store_key))
                .await?
                .map(|entry| (entry.value, entry.ttl))
        } else {
            self.l2_call(L2Op::Get, deadline, l2.get(&store_key))
                .await?
                .map(|value| (value, Duration::ZERO))
        };
        let Some((bytes, ttl)) = found else {
            return Ok(L2Read::Miss);
        };
        match self.decode_entry(&bytes) {
            Ok(value) => Ok(L2Read::Hit(value, ttl)),
            Err(reason) => {
                self.discard_undecodable(key, &store_key, reason, deadline)
                    .await;
                Ok(L2Read::Miss)
            }
        }
    }

    /// Decodes an L2 entry: `Some(v)` a value, `None` a negative entry.
    fn decode_entry(&self, bytes: &[u8]) -> std::result::Result<Option<V>, Undecodable> {
        let envelope = Envelope::parse::<C>(bytes, self.settings.max_value_len)
            .map_err(|_| Undecodable::Envelope)?;
        if envelope.negative {
            return Ok(None);
        }
        self.codec
            .decode::<V>(envelope.payload)
            .map(Some)
            .map_err(|_| Undecodable::Payload)
    }

    /// Decodes a bulk read's entry, discarding it (as a single read would) if it does not
    /// decode.
    pub(super) async fn decode_or_discard(
        &self,
        key: &str,
        bytes: &[u8],
        deadline: Instant,
    ) -> Option<Option<V>> {
        match self.decode_entry(bytes) {
            Ok(value) => Some(value),
            Err(reason) => {
                let store_key = self.namespace.store_key(key);
                self.discard_undecodable(key, &store_key, reason, deadline)
                    .await;
                None
            }
        }
    }

    /// Counts, logs (the key's fingerprint and the kind of problem, never the bytes) and
    /// deletes an L2 entry that did not decode; the read goes on as a miss, and the next load
    /// replaces the entry.
    async fn discard_undecodable(
        &self,
        key: &str,
        store_key: &str,
        reason: Undecodable,
        deadline: Instant,
    ) {
        self.recorder.corrupt_entry();
        tracing::warn!(
            cache = %self.namespace,
            key = %fingerprint(key),
            reason = reason.describe(),
            "undecodable L2 entry read as a miss and deleted"
        );
        if let Some(l2) = &self.l2 {
            let _ = self
                .l2_call(L2Op::Delete, deadline, l2.delete(store_key))
                .await;
        }
    }

    /// Inserts into L1 for at most `ttl` (capped by the L1 TTL), then evicts it again unless
    /// `still_current` says that no invalidation of `key` came since the value was read.
    pub(super) fn fill_l1(
        &self,
        key: &str,
        value: Option<V>,
        ttl: Duration,
        still_current: impl Fn() -> bool,
    ) {
        let Some(l1) = &self.l1 else { return };
        let ttl = self.settings.l1_ttl.map_or(ttl, |cap| ttl.min(cap));
        let deadline = self.clock.now().saturating_add(ttl);
        l1.insert(key.to_owned(), value, deadline);
        if !still_current() {
            l1.invalidate(key);
        }
    }

    /// [`fill_l1`](Self::fill_l1) checked against a striped snapshot.
    pub(super) fn fill_l1_since(
        &self,
        key: &str,
        value: Option<V>,
        ttl: Duration,
        since: Snapshot,
    ) {
        self.fill_l1(key, value, ttl, || self.freshness.is_current(since));
    }
}
