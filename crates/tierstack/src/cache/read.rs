//! The read path: L1, then L2 (filling L1 with the L2 entry's remaining time), decoding, and
//! what becomes of an entry that does not decode.

use std::time::Duration;

use bytes::Bytes;

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
    /// A value, or a negative entry (`None`), with its remaining time to live (zero when the
    /// read did not ask for it) and the bytes it was read from.
    Hit {
        value: Option<V>,
        ttl: Duration,
        bytes: Bytes,
    },
    /// No live entry. `seen` holds what lies under the key instead, if anything: a tombstone,
    /// or undecodable bytes that are still there. A loaded value may replace exactly those.
    Miss { seen: Option<Bytes> },
}

/// An L2 entry's bytes, read as this cache reads them.
enum Decoded<V> {
    /// A value, or a negative entry (`None`).
    Live(Option<V>),
    /// A delete's marker: no entry.
    Tombstone,
    Undecodable(Undecodable),
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
        if self.l2.is_some() {
            // Like `get`: an L2 that fails (counted and logged) reads as a miss of L2, and L1
            // answers.
            match self.read_l2(key, self.deadline(), true).await {
                Ok(L2Read::Hit { ttl, .. }) => return Ok(Some(ttl)),
                Ok(L2Read::Miss { .. }) => return Ok(None),
                Err(_) => {}
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
        match self.read_l2(key, deadline, self.l1.is_some()).await? {
            L2Read::Hit { value, ttl, .. } => {
                self.recorder.l2_hit();
                self.fill_l1(key, value.clone(), ttl, || {
                    self.freshness.is_current(snapshot)
                });
                Ok(Some(value))
            }
            L2Read::Miss { .. } => Ok(None),
        }
    }

    /// Reads and decodes `key` from L2, with the entry's remaining time to live if `with_ttl`
    /// (to fill L1 with). A tombstone reads as a miss; so does an entry that does not decode,
    /// which is discarded.
    pub(super) async fn read_l2(
        &self,
        key: &str,
        deadline: Instant,
        with_ttl: bool,
    ) -> Result<L2Read<V>> {
        let Some(l2) = &self.l2 else {
            return Ok(L2Read::Miss { seen: None });
        };
        let store_key = self.namespace.store_key(key);
        let found = if with_ttl {
            self.l2_call(L2Op::Get, deadline, l2.get_with_ttl(&store_key))
                .await?
                .map(|entry| (entry.value, entry.ttl))
        } else {
            self.l2_call(L2Op::Get, deadline, l2.get(&store_key))
                .await?
                .map(|value| (value, Duration::ZERO))
        };
        Ok(match found {
            Some((bytes, ttl)) => self.classify(key, bytes, ttl, deadline).await,
            None => L2Read::Miss { seen: None },
        })
    }

    /// What the bytes read under `key` are to this cache. Undecodable bytes are discarded: the
    /// read goes on as a miss.
    pub(super) async fn classify(
        &self,
        key: &str,
        bytes: Bytes,
        ttl: Duration,
        deadline: Instant,
    ) -> L2Read<V> {
        match self.decode_entry(&bytes) {
            Decoded::Live(value) => L2Read::Hit { value, ttl, bytes },
            Decoded::Tombstone => L2Read::Miss { seen: Some(bytes) },
            Decoded::Undecodable(reason) => {
                let removed = self
                    .discard_undecodable(key, &bytes, reason, deadline)
                    .await;
                L2Read::Miss {
                    seen: (!removed).then_some(bytes),
                }
            }
        }
    }

    /// Decodes an L2 entry.
    fn decode_entry(&self, bytes: &[u8]) -> Decoded<V> {
        let Ok(envelope) = Envelope::parse::<C>(bytes, self.settings.max_value_len) else {
            return Decoded::Undecodable(Undecodable::Envelope);
        };
        if envelope.tombstone {
            return Decoded::Tombstone;
        }
        if envelope.negative {
            return Decoded::Live(None);
        }
        match self.codec.decode::<V>(envelope.payload) {
            Ok(value) => Decoded::Live(Some(value)),
            Err(_) => Decoded::Undecodable(Undecodable::Payload),
        }
    }

    /// Counts and logs (the key's fingerprint and the kind of problem, never the bytes) an L2
    /// entry that did not decode, and removes it unless the key was written meanwhile (the
    /// removal compares the bytes). Returns whether it removed them.
    async fn discard_undecodable(
        &self,
        key: &str,
        bytes: &[u8],
        reason: Undecodable,
        deadline: Instant,
    ) -> bool {
        self.recorder.corrupt_entry();
        tracing::warn!(
            cache = %self.namespace,
            key = %fingerprint(key),
            reason = reason.describe(),
            "undecodable L2 entry read as a miss and deleted"
        );
        let Some(l2) = &self.l2 else { return false };
        let store_key = self.namespace.store_key(key);
        self.l2_call(
            L2Op::Delete,
            deadline,
            l2.compare_and_set(&store_key, bytes, None),
        )
        .await
        .unwrap_or(false)
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
        if self.deaf.load(std::sync::atomic::Ordering::SeqCst) {
            // No invalidation would reach the copy: serve from L2 until the backplane is back.
            return;
        }
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
