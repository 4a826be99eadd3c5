//! The read path: L1, then L2 (filling L1 with the L2 entry's remaining time), decoding, and
//! what becomes of an entry that does not decode.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::clock::Timestamp;
use tierstack_core::envelope::{self, Envelope, EnvelopeError, Lifetime};
use tierstack_core::key::fingerprint;
use tierstack_core::tag::{TagStamps, TagVerdict};
use tierstack_core::{Codec, Result};
use tierstack_moka::L1Entry;
use tokio::time::Instant;

use super::Inner;
use crate::freshness::Snapshot;
use crate::options::{EntryOptions, Fetched, Skips, Source};
use crate::stats::L2Op;

/// How long an entry is fresh, and how long it stays stored (stale in between), from now; and
/// the tags it carries.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Life {
    pub(super) fresh: Duration,
    pub(super) lives: Duration,
    /// A stale value kept after the origin failed: `fresh` only delays the next attempt.
    pub(super) stale: bool,
    /// How long L1 may serve it before reading L2 again.
    pub(super) l1_cap: Option<Duration>,
    /// When the value was written, if not just now (an L2 entry's).
    pub(super) written_at: Option<Timestamp>,
    /// The eager refresh threshold (a fraction of the TTL), if any.
    pub(super) eager: Option<f64>,
    /// Whether L1 keeps it (the call did not skip L1 writes).
    pub(super) to_l1: bool,
    /// Its tags with the versions it was written under, if it carries tags.
    pub(super) tags: Option<TagStamps>,
}

impl Life {
    /// Fresh for `fresh`, then stale until `lives`.
    pub(super) fn new(fresh: Duration, lives: Duration, l1_cap: Option<Duration>) -> Self {
        Self {
            fresh,
            lives: lives.max(fresh),
            stale: false,
            l1_cap,
            written_at: None,
            eager: None,
            to_l1: true,
            tags: None,
        }
    }

    /// This life under a call's options: its L1 cap and eager refresh threshold.
    pub(super) fn under(self, options: &EntryOptions) -> Self {
        Self {
            l1_cap: options.l1_ttl(),
            eager: options.eager_refresh(),
            to_l1: !options.skips().l1_write,
            ..self
        }
    }

    /// How long from `now` a hit should start an eager refresh: once `eager` of the whole TTL
    /// (age and remaining freshness) has passed. Never for a stale value.
    pub(super) fn refresh_in(&self, now: Timestamp) -> Option<Duration> {
        let fraction = self.eager.filter(|_| !self.stale)?;
        let age = self.written_at.map_or(Duration::ZERO, |at| at.until(now));
        let ttl = age.saturating_add(self.fresh);
        Some(ttl.mul_f64(fraction).saturating_sub(age))
    }

    /// The L1 entry of `value` from `now`: the cap shortens its freshness, and a fail-safe entry
    /// stays, stale, until it leaves L2 too.
    pub(super) fn l1_entry<V>(&self, value: Option<V>, now: Timestamp) -> L1Entry<V> {
        let fresh = self.l1_cap.map_or(self.fresh, |cap| self.fresh.min(cap));
        let fresh_until = now.saturating_add(fresh);
        let expires_at = if self.lives > self.fresh {
            now.saturating_add(self.lives)
        } else {
            fresh_until
        };
        L1Entry {
            value,
            fresh_until,
            expires_at,
            stale: self.stale,
            refresh_at: self.refresh_in(now).map(|after| now.saturating_add(after)),
            tags: self.tags.clone(),
        }
    }
}

/// What an L2 read found.
pub(super) enum L2Read<V> {
    /// A fresh value, or a negative entry (`None`), with how long it lives (its remaining time
    /// to live is zero when the read did not ask for it) and what the L2 holds under the key
    /// (the bytes it was read from; for a write kept for a replay, what it is to replace).
    Hit {
        value: Option<V>,
        life: Life,
        seen: Option<Bytes>,
    },
    /// A fail-safe entry past its TTL: a fallback if the origin fails; `seen` (as for a hit) is
    /// what a loaded value replaces.
    Stale {
        value: Option<V>,
        expires_at: Timestamp,
        seen: Option<Bytes>,
        tags: Option<TagStamps>,
    },
    /// No live entry. `seen` holds what lies under the key instead, if anything: a tombstone,
    /// or undecodable bytes that are still there. A loaded value may replace exactly those.
    Miss { seen: Option<Bytes> },
}

/// An L2 entry's bytes, read as this cache reads them.
enum Decoded<V> {
    /// A value, or a negative entry (`None`), with its envelope's deadlines.
    Live {
        value: Option<V>,
        written_at: Timestamp,
        fresh_until: Timestamp,
        expires_at: Timestamp,
        stale: bool,
        tags: Option<TagStamps>,
    },
    /// A delete's marker: no entry.
    Tombstone,
    Undecodable(Undecodable),
}

/// Why an L2 entry did not decode, for the log: never the payload, which serde's messages may
/// quote.
#[derive(Debug, Clone)]
enum Undecodable {
    /// Not an envelope of this cache: garbage, truncated, another version, codec or size.
    Envelope,
    /// An envelope whose payload is not a value of this cache's type (a deploy changed it).
    Payload,
    /// A sealed payload that does not open here (or a plaintext one where encryption is
    /// required).
    Sealed(EnvelopeError),
}

impl Undecodable {
    fn describe(&self) -> &'static str {
        match self {
            Self::Envelope => "not a tierstack envelope of this codec and size",
            Self::Payload => "the payload does not decode as this cache's value type",
            Self::Sealed(EnvelopeError::UnknownKey { .. }) => {
                "encrypted with a key this cache's key ring does not hold"
            }
            Self::Sealed(EnvelopeError::EncryptionNotConfigured) => {
                "encrypted, and this cache has no key ring"
            }
            Self::Sealed(EnvelopeError::Unauthentic) => {
                "the encrypted payload does not authenticate under this key"
            }
            Self::Sealed(EnvelopeError::PlaintextRefused) => {
                "a plaintext entry where encryption is required"
            }
            Self::Sealed(EnvelopeError::TooLarge { .. }) => {
                "the payload decompresses to more than max_value_len"
            }
            Self::Sealed(_) => "the compressed payload is corrupt",
        }
    }
}

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn get(&self, key: &str) -> Result<Option<V>> {
        self.get_with(key, Skips::default(), false).await
    }

    /// A plain read; an L2 failure (counted and logged) reads as a miss unless
    /// `l2_errors_returned`.
    pub(super) async fn get_with(
        &self,
        key: &str,
        skips: Skips,
        l2_errors_returned: bool,
    ) -> Result<Option<V>> {
        self.check_key(key)?;
        if !skips.l1_read
            && let Some(hit) = self.l1_get(key)
        {
            return Ok(hit);
        }
        if !skips.l2_read {
            match self
                .l2_lookup(key, self.deadline(), !skips.l1_write, false)
                .await
            {
                Ok(Some((hit, _))) => return Ok(hit),
                Err(error) if l2_errors_returned => return Err(error),
                Ok(None) | Err(_) => {}
            }
        }
        self.recorder.miss(key);
        Ok(None)
    }

    /// [`get_with`](Self::get_with), with where the value came from and its remaining TTL.
    pub(super) async fn get_fetched(
        &self,
        key: &str,
        skips: Skips,
        l2_errors_returned: bool,
    ) -> Result<Option<Fetched<V>>> {
        self.check_key(key)?;
        if !skips.l1_read
            && let Some(entry) = self.l1_entry(key)
        {
            let now = self.clock.now();
            if entry.is_fresh_at(now) && self.trusted_fresh(&entry) {
                self.recorder.l1_hit(key);
                let ttl = now.until(entry.fresh_until);
                return Ok(entry
                    .value
                    .map(|value| Fetched::new_fresh(value, Source::L1, Some(ttl))));
            }
        }
        if !skips.l2_read {
            match self
                .l2_lookup(key, self.deadline(), !skips.l1_write, true)
                .await
            {
                Ok(Some((hit, ttl))) => {
                    return Ok(hit.map(|value| Fetched::new_fresh(value, Source::L2, Some(ttl))));
                }
                Err(error) if l2_errors_returned => return Err(error),
                Ok(None) | Err(_) => {}
            }
        }
        self.recorder.miss(key);
        Ok(None)
    }

    pub(super) async fn exists(&self, key: &str) -> Result<bool> {
        self.check_key(key)?;
        if let Some(hit) = self.l1_get(key) {
            return Ok(hit.is_some());
        }
        // Like `get`: an L2 that fails reads as a miss.
        Ok(matches!(
            self.l2_lookup(key, self.deadline(), true, false).await,
            Ok(Some((Some(_), _)))
        ))
    }

    pub(super) async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        self.check_key(key)?;
        if self.l2.is_some() {
            // Like `get`: an L2 that fails (counted and logged) reads as a miss of L2, and L1
            // answers.
            match self.read_l2(key, self.deadline(), true).await {
                Ok(L2Read::Hit { life, .. }) if !life.stale => return Ok(Some(life.fresh)),
                Ok(L2Read::Hit { .. } | L2Read::Miss { .. } | L2Read::Stale { .. }) => {
                    return Ok(None);
                }
                Err(_) => {}
            }
        }
        let now = self.clock.now();
        Ok(self
            .l1_entry(key)
            .filter(|entry| entry.is_fresh_at(now) && self.trusted_fresh(entry))
            .map(|entry| now.until(entry.fresh_until)))
    }

    /// The live L1 entry of `key`: `Some(Some(v))` a value, `Some(None)` a negative entry.
    #[expect(
        clippy::option_option,
        reason = "a negative entry is a hit with no value, unlike a miss"
    )]
    pub(super) fn l1_get(&self, key: &str) -> Option<Option<V>> {
        self.l1_fresh(key).map(|(value, _)| value)
    }

    /// [`l1_get`](Self::l1_get), and whether the value is a stale one that fail-safe re-armed.
    pub(super) fn l1_fresh(&self, key: &str) -> Option<(Option<V>, bool)> {
        let entry = self.l1_entry(key)?;
        // Plain entries are fresh for as long as L1 keeps them; only fail-safe ones need the
        // clock.
        if entry.fresh_until != entry.expires_at && !entry.is_fresh_at(self.clock.now()) {
            return None;
        }
        if !self.trusted_fresh(&entry) {
            return None;
        }
        self.recorder.l1_hit(key);
        Some((entry.value, entry.stale))
    }

    /// Whether a plain read may answer `entry` (already known fresh): not a stale value that
    /// fail-safe re-armed (those answer read-through calls only, see `serving`), and not while
    /// deaf.
    pub(super) fn trusted_fresh(&self, entry: &L1Entry<V>) -> bool {
        !entry.stale && !self.is_deaf()
    }

    /// Whether a read-through call may answer `entry` without loading, at `now`: fresh, and
    /// trusted (a deaf instance trusts only the stale values that fail-safe re-armed, which say
    /// they are stale).
    pub(super) fn serving(&self, entry: &L1Entry<V>, now: Timestamp) -> bool {
        entry.is_fresh_at(now) && (entry.stale || !self.is_deaf())
    }

    /// Whether the backplane's subscription is lost (see the listener).
    pub(super) fn is_deaf(&self) -> bool {
        self.deaf.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The envelope of `value` (or of a negative entry) under `key`, written now for `life`.
    pub(super) fn encode_with_life(
        &self,
        key: &str,
        value: Option<&V>,
        life: &Life,
    ) -> Result<Bytes> {
        self.encode_since(key, value, life, None)
    }

    /// [`encode_with_life`](Self::encode_with_life) of a loaded value: its write time is
    /// `since`, when its loader started (see `Caching::since`); it lives from now.
    pub(super) fn encode_loaded(
        &self,
        key: &str,
        value: Option<&V>,
        life: &Life,
        since: Timestamp,
    ) -> Result<Bytes> {
        self.encode_since(key, value, life, Some(since))
    }

    fn encode_since(
        &self,
        key: &str,
        value: Option<&V>,
        life: &Life,
        since: Option<Timestamp>,
    ) -> Result<Bytes> {
        let now = self.clock.now();
        let lifetime = Lifetime {
            written_at: since.map_or(now, |since| since.min(now)),
            fresh_until: now.saturating_add(life.fresh),
            expires_at: now.saturating_add(life.lives),
            stale: life.stale,
        };
        self.encode_entry(key, value, lifetime, life.tags.as_ref())
    }

    /// Whether a value read from the L2 bytes `seen` may be written back sealed (as fail-safe
    /// re-arms a stale value): only if this cache's sealing vouches for them
    /// ([`Sealing::vouches_for`](tierstack_core::envelope::Sealing::vouches_for)).
    pub(super) fn may_reseal(&self, seen: &[u8]) -> bool {
        Envelope::parse::<C>(seen, usize::MAX)
            .is_ok_and(|envelope| self.settings.sealing.vouches_for(&envelope))
    }

    /// The envelope of `value` under `key`, sealed as this cache seals its payloads.
    pub(super) fn encode_entry(
        &self,
        key: &str,
        value: Option<&V>,
        lifetime: Lifetime,
        tags: Option<&TagStamps>,
    ) -> Result<Bytes> {
        let sealing = &self.settings.sealing;
        // Encryption authenticates the store key; the plain path needs none.
        let store_key = if sealing.is_plain() {
            String::new()
        } else {
            self.namespace.store_key(key)
        };
        envelope::encode_sealed(
            &self.codec,
            value,
            lifetime,
            tags,
            sealing,
            &store_key,
            self.settings.max_value_len,
        )
    }

    /// The L1 entry of `key`, fresh or stale, without counting a hit, as its tags leave it:
    /// stale if one was expired since it was written (when it has a fail-safe life to be stale
    /// in), none if one was removed, and none while a tag's record is not known here (the read
    /// goes on to L2, which learns it).
    pub(super) fn l1_entry(&self, key: &str) -> Option<L1Entry<V>> {
        let entry = self.l1.as_ref()?.get(key)?;
        let Some(tags) = &entry.tags else {
            return Some(entry);
        };
        match self.tags.verdict_now(tags)? {
            TagVerdict::Current => Some(entry),
            // A stale value that fail-safe re-armed keeps its throttle.
            TagVerdict::Expired if entry.stale => Some(entry),
            TagVerdict::Expired if entry.expires_at > entry.fresh_until => {
                let now = self.clock.now();
                Some(L1Entry {
                    fresh_until: entry.fresh_until.min(now),
                    refresh_at: None,
                    ..entry
                })
            }
            TagVerdict::Expired | TagVerdict::Removed => None,
        }
    }

    /// Reads `key` from L2 and fills L1 on a hit: `Some(v)` a hit (`v` is `None` for a negative
    /// entry), `None` a miss. Counts the hit; a miss is counted by the caller.
    /// A plain read of L2: `Some((value, fresh for))` for a fresh entry (`None` as the value
    /// of a negative one), filling L1 with it if `to_l1`. The time it is fresh for counts an
    /// `expire` that moved the entry's deadline only where L1 is filled or `with_ttl` asks.
    pub(super) async fn l2_lookup(
        &self,
        key: &str,
        deadline: Instant,
        to_l1: bool,
        with_ttl: bool,
    ) -> Result<Option<(Option<V>, Duration)>> {
        let to_l1 = to_l1 && self.l1.is_some();
        // Taken before the read, for the fill only: a read that fills no L1 hashes no key.
        let snapshot = to_l1.then(|| self.freshness.snapshot(key));
        match self.read_l2(key, deadline, to_l1 || with_ttl).await? {
            L2Read::Hit { value, life, .. } if !life.stale => {
                self.recorder.l2_hit(key);
                if let Some(snapshot) = snapshot {
                    self.fill_l1_since(key, value.clone(), &life, snapshot);
                }
                Ok(Some((value, life.fresh)))
            }
            // A plain read serves fresh values only; a stale one is a loader's fallback.
            L2Read::Hit { .. } | L2Read::Miss { .. } | L2Read::Stale { .. } => Ok(None),
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
        // Looked at before the L2 call too: a replay that finishes during the call removes the
        // kept write, and the old value the call read must not then pass for current.
        let kept_before = self.kept_write(key);
        let store_key = self.namespace.store_key(key);
        let found = if with_ttl {
            self.l2_call(L2Op::Get, deadline, l2.get_with_ttl(&store_key))
                .await
                .map(|found| found.map(|entry| (entry.value, entry.ttl)))
        } else {
            self.l2_call(L2Op::Get, deadline, l2.get(&store_key))
                .await
                .map(|found| found.map(|value| (value, Duration::ZERO)))
        };
        if let Some(kept) = self.kept_write(key).or(kept_before) {
            let (found, l2_failed) = match found {
                Ok(found) => (found, false),
                Err(_) => (None, true),
            };
            return self
                .read_with_kept(key, kept, found, l2_failed, deadline)
                .await;
        }
        match found? {
            Some((bytes, ttl)) => self.classify(key, bytes, ttl, deadline).await,
            None => Ok(L2Read::Miss { seen: None }),
        }
    }

    /// What the bytes read under `key` are to this cache. Undecodable bytes are discarded: the
    /// read goes on as a miss.
    ///
    /// # Errors
    ///
    /// A tagged entry whose tags' records could not be read: whether it is current is not
    /// known, as when the L2 fails (a miss would sign a session's user out, or let a
    /// conditional write replace a live value).
    pub(super) async fn classify(
        &self,
        key: &str,
        bytes: Bytes,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<L2Read<V>> {
        match self.decode_entry(key, &bytes) {
            Decoded::Live {
                value,
                written_at,
                fresh_until,
                expires_at,
                stale,
                tags,
            } => {
                // A tag invalidated since: removed, or stale if it was expired and the entry
                // has a fail-safe life to be stale in.
                let verdict = match &tags {
                    None => TagVerdict::Current,
                    Some(stamps) => self.tag_verdict(stamps, deadline).await?,
                };
                let fail_safe = fresh_until != expires_at || stale;
                match verdict {
                    TagVerdict::Current => {}
                    TagVerdict::Expired if fail_safe && self.clock.now() < expires_at => {
                        return Ok(L2Read::Stale {
                            value,
                            expires_at,
                            seen: Some(bytes),
                            tags,
                        });
                    }
                    TagVerdict::Expired | TagVerdict::Removed => {
                        return Ok(L2Read::Miss { seen: Some(bytes) });
                    }
                }
                // A plain entry is fresh for as long as the store keeps it (a store's `expire`
                // need not rewrite the envelope); a fail-safe one until its own field says. The
                // store's own time to live counts where the read asked for it (`touch` may have
                // changed it), else the envelope's; the clock is read only when needed.
                let (fresh, lives, is_fresh) = if fail_safe || ttl.is_zero() {
                    let now = self.clock.now();
                    let lives = if ttl.is_zero() {
                        now.until(expires_at)
                    } else {
                        ttl
                    };
                    if fail_safe {
                        (now.until(fresh_until).min(lives), lives, now < fresh_until)
                    } else {
                        (lives, lives, true)
                    }
                } else {
                    (ttl, ttl, true)
                };
                let life = Life {
                    fresh,
                    lives,
                    stale,
                    l1_cap: None,
                    written_at: Some(written_at),
                    eager: None,
                    to_l1: true,
                    tags: tags.clone(),
                }
                .under(&self.settings.defaults);
                Ok(if is_fresh {
                    L2Read::Hit {
                        value,
                        life,
                        seen: Some(bytes),
                    }
                } else {
                    L2Read::Stale {
                        value,
                        expires_at,
                        seen: Some(bytes),
                        tags,
                    }
                })
            }
            Decoded::Tombstone => Ok(L2Read::Miss { seen: Some(bytes) }),
            Decoded::Undecodable(reason) => {
                let removed = self
                    .discard_undecodable(key, &bytes, reason, deadline)
                    .await;
                Ok(L2Read::Miss {
                    seen: (!removed).then_some(bytes),
                })
            }
        }
    }

    /// Decodes the L2 entry of `key`.
    fn decode_entry(&self, key: &str, bytes: &[u8]) -> Decoded<V> {
        let max = self.settings.max_value_len;
        let Ok(envelope) = Envelope::parse::<C>(bytes, max) else {
            return Decoded::Undecodable(Undecodable::Envelope);
        };
        if envelope.tombstone {
            return Decoded::Tombstone;
        }
        let sealing = &self.settings.sealing;
        let payload = if envelope.is_sealed() || !sealing.is_plain() {
            match sealing.open(&envelope, &self.namespace.store_key(key), max) {
                Ok(payload) => payload,
                Err(err) => return Decoded::Undecodable(Undecodable::Sealed(err)),
            }
        } else {
            Cow::Borrowed(envelope.payload)
        };
        let value = if envelope.negative {
            None
        } else {
            match self.codec.decode::<V>(&payload) {
                Ok(value) => Some(value),
                Err(_) => return Decoded::Undecodable(Undecodable::Payload),
            }
        };
        Decoded::Live {
            value,
            written_at: envelope.written_at,
            fresh_until: envelope.fresh_until,
            expires_at: envelope.expires_at,
            stale: envelope.stale,
            tags: envelope.tags(),
        }
    }

    /// Counts and logs (the key's fingerprint and the kind of problem, never the bytes) an L2
    /// entry that did not decode, and removes it unless the key was written meanwhile (the
    /// removal compares the bytes). Entries of a key this instance's ring lacks are removed
    /// too: an entry that stayed would let anyone who can write to the L2 make every read of a
    /// key a miss for good (key rotation adds a key everywhere before it encrypts with it, so
    /// sound entries are not lost this way). Returns whether it removed them.
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

    /// Inserts into L1 for `life` (its freshness capped by the L1 TTL), then evicts it again
    /// unless `still_current` says that no invalidation of `key` came since the value was read.
    pub(super) fn fill_l1(
        &self,
        key: &str,
        value: Option<V>,
        life: &Life,
        still_current: impl Fn() -> bool,
    ) {
        let Some(l1) = self.l1.as_ref().filter(|_| life.to_l1) else {
            return;
        };
        if self.is_deaf() && !life.stale {
            // No invalidation would reach the copy: serve from L2 until the backplane is back,
            // and drop the older copy this value replaces (it stays as a last resort otherwise).
            // A stale copy answers only as fail-safe's last resort, deaf or not: it is kept.
            l1.invalidate(key);
            return;
        }
        l1.insert(key.to_owned(), life.l1_entry(value, self.clock.now()));
        if !still_current() {
            l1.invalidate(key);
        }
        self.report_l1_size(l1);
    }

    /// [`fill_l1`](Self::fill_l1) checked against a striped snapshot.
    pub(super) fn fill_l1_since(&self, key: &str, value: Option<V>, life: &Life, since: Snapshot) {
        self.fill_l1(key, value, life, || self.freshness.is_current(since));
    }
}
