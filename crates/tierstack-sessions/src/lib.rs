//! Server-side sessions for axum and tower: a
//! [`tower_sessions_core::SessionStore`] on a [tierstack](https://docs.rs/tierstack)
//! `TieredCache`, so that sessions live in Redis or Firestore (and survive the instance that
//! created them) with an in-process L1 in front.
//!
//! ```
//! use tierstack_sessions::{TieredSessionStore, cache_builder};
//!
//! # fn main() -> Result<(), tierstack::CacheError> {
//! // The embedded default here; give the builder `.l2(...)` and `.backplane(...)` (a
//! // `RedisStore` and its `RedisBackplane`, say) so that every instance shares the sessions
//! // and sees a logout at once.
//! let store = TieredSessionStore::new(cache_builder("sessions").build()?);
//! // tower_sessions::SessionManagerLayer::new(store) in the app's router.
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! What the store does:
//! - **create** writes a new session only where its id holds none ([`TieredCache::set_if_absent`]),
//!   and draws another id on the (astronomically rare) collision: it never overwrites another
//!   session.
//! - **save** writes the whole record, living until the session's own expiry date, only over
//!   a live record ([`TieredCache::set_if_present`]): a request that ran beside a logout (or an
//!   id cycled at login) cannot bring the ended session back when it saves after it. A sliding
//!   session (`Expiry::OnInactivity`) is saved, and so extended, as tower-sessions asks.
//! - **load** answers only a record whose expiry date is in the future, even from a backend
//!   that keeps expired records (Firestore deletes them up to a day late). An L2 that fails
//!   (or times out) while L1 has no copy is an error, never a missing session: it reaches the
//!   handler through `Session::get` and friends (a handler that answers it with `?` gives a
//!   500), the cookie stays, and the user stays signed in
//!   ([`EntryOptions::with_l2_errors_returned`]).
//! - **delete** (a logout, an id cycled at login against session fixation) removes the record
//!   from both tiers, and the backplane makes every other instance drop its copy.
//! - **Log out everywhere**: with [`TieredSessionStore::with_user_field`] each session carries
//!   its user as a tag, and [`TieredSessionStore::end_user_sessions`] ends all of a user's
//!   sessions with one tag invalidation, on every instance, scanning nothing.
//! - **Without a backplane** (an L2 such as Firestore, which has none), another instance's L1
//!   would keep a logged-out session: the store then reads and writes sessions in L2 only and
//!   leaves L1 out ([`TieredCache::l1_kept_coherent`]). Every load is then an L2 read.
//! - [`ExpiredDeletion::delete_expired`](tower_sessions_core::ExpiredDeletion) sweeps what the
//!   backend keeps past its expiry ([`TieredCache::sweep_expired`]).
//!
//! Concurrent requests of one session each save the whole record: the last save wins, as with
//! every tower-sessions store. What a save returned for is then what every later load on every
//! instance reads (until a later save or the session's end); an update of a request that ran
//! beside another may be overwritten by it. A save that finds the session ended keeps nothing
//! and succeeds, as tower-sessions' Redis store does: the next request gets a new session.
//!
//! Records are encoded as JSON: a session's data holds `serde_json::Value`s, which bincode
//! cannot decode.

use std::time::Duration;

use async_trait::async_trait;
use tierstack::{CacheError, EntryOptions, JsonCodec, TieredCache, TieredCacheBuilder};
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, ExpiredDeletion, SessionStore};

/// How many ids `create` draws before it gives up: a collision of two random 128-bit ids is
/// never expected, so more than one means something else is wrong.
const CREATE_ATTEMPTS: usize = 8;

/// A builder for the cache a [`TieredSessionStore`] keeps sessions in: a `TieredCache` of
/// session records, encoded as JSON, under `namespace`.
///
/// Tags' records are kept for four years from their last renewal, so that a session tagged
/// by user ([`TieredSessionStore::with_user_field`]), kept at most a year, never outlives its
/// user's record: a record in use is renewed when read with less than half its time left.
pub fn cache_builder(namespace: &str) -> TieredCacheBuilder<Record, JsonCodec> {
    TieredCache::<Record>::builder(namespace)
        .codec(JsonCodec)
        .tag_record_ttl(TAG_RECORD_TTL)
}

/// How long [`cache_builder`]'s tag records live.
const TAG_RECORD_TTL: Duration = Duration::from_hours(24 * 366 * 4);
/// The longest a session tagged by user is kept.
const TAGGED_SESSION_TTL: Duration = Duration::from_hours(24 * 366);

/// A [`SessionStore`] on a [`TieredCache`]; see the [crate docs](crate). Cloning is cheap.
#[derive(Debug, Clone)]
pub struct TieredSessionStore {
    cache: TieredCache<Record, JsonCodec>,
    /// Whether sessions may be kept in L1: only where other instances' logouts reach it.
    use_l1: bool,
    /// The field of a session's data that names its user, if sessions are tagged by user.
    user_field: Option<String>,
}

/// The tag of `user`'s sessions.
fn user_tag(user: &str) -> String {
    format!("user:{user}")
}

impl TieredSessionStore {
    /// A store that keeps sessions in `cache` (see [`cache_builder`]). If the cache has an L2
    /// without a backplane, sessions bypass its L1 (see the [crate docs](crate)).
    pub fn new(cache: TieredCache<Record, JsonCodec>) -> Self {
        let use_l1 = cache.l1_kept_coherent();
        if !use_l1 {
            tracing::info!(
                namespace = cache.namespace(),
                "sessions bypass L1: the cache's L2 has no backplane to tell this instance \
                 of other instances' logouts"
            );
        }
        Self {
            cache,
            use_l1,
            user_field: None,
        }
    }

    /// Tags every session with its user, read from the field `field` of its data (a string or
    /// a number, as the app stored it at login: `session.insert("user_id", id)`), so that
    /// [`end_user_sessions`](Self::end_user_sessions) ends them all at once, on every instance.
    /// A session without the field (not signed in yet) carries no tag. The id is taken as the
    /// data's JSON spells it: `42` and `"42"` are the same user, `42.0` another. A tagged
    /// session is kept at most a year (a cache built otherwise than by [`cache_builder`] must
    /// allow as long with its `tag_record_ttl`, and better four times as long), and a user id
    /// whose tag is not allowed (over 123 bytes, or with control characters) fails its write.
    #[must_use]
    pub fn with_user_field(mut self, field: impl Into<String>) -> Self {
        self.user_field = Some(field.into());
        self
    }

    /// Ends every session of `user` on every instance (log out everywhere): each reads as
    /// missing from then on, without scanning anything, and a request of one of them that
    /// saves afterwards brings nothing back. Sessions created afterwards are not touched. Needs
    /// [`with_user_field`](Self::with_user_field) on the stores that write the sessions. With a
    /// backplane the other instances see it at once; without one (an L2 such as Firestore),
    /// within 30 seconds (how long an instance trusts what it read of a tag).
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidTag`] for a user id whose tag is not allowed (over 123 bytes, or
    /// with control characters); the L2's error if the tag could not be invalidated (then
    /// nothing changed).
    pub async fn end_user_sessions(&self, user: &str) -> Result<(), CacheError> {
        self.cache.invalidate_tag(&user_tag(user)).await
    }

    /// The tags of `record`: its user's, if sessions are tagged by user and it names one.
    fn tags(&self, record: &Record) -> Vec<String> {
        let Some(field) = &self.user_field else {
            return Vec::new();
        };
        match record.data.get(field) {
            Some(serde_json::Value::String(user)) => vec![user_tag(user)],
            Some(serde_json::Value::Number(user)) => vec![user_tag(&user.to_string())],
            _ => Vec::new(),
        }
    }

    /// The options of a session's reads and writes: living `ttl`, and past L1 when other
    /// instances' writes would not reach it.
    ///
    /// A read returns an L2 failure as an error: read as a miss, it would log the user out.
    fn options(&self, ttl: Duration) -> EntryOptions {
        let options = self
            .cache
            .default_options()
            .with_ttl(ttl)
            .with_l2_errors_returned(true);
        if self.use_l1 {
            return options;
        }
        let mut skips = options.skips();
        skips.l1_read = true;
        skips.l1_write = true;
        options.with_skips(skips)
    }

    /// The options of a session's writes, living `ttl`. A tagged one may not outlive its tags'
    /// records: it is kept at most [`TAGGED_SESSION_TTL`], without the defaults' fail-safe or
    /// jitter (which would lengthen its life; a session is never loaded, so neither serves).
    fn write_options(&self, ttl: Duration, tags: &[String]) -> EntryOptions {
        if tags.is_empty() {
            return self.options(ttl);
        }
        self.options(ttl.min(TAGGED_SESSION_TTL))
            .without_fail_safe()
            .with_jitter(0.0)
    }

    /// The cache the sessions live in.
    pub fn cache(&self) -> &TieredCache<Record, JsonCodec> {
        &self.cache
    }
}

/// How long a record has left to live, if any.
fn remaining(record: &Record) -> Option<Duration> {
    let left = record.expiry_date - OffsetDateTime::now_utc();
    Duration::try_from(left)
        .ok()
        .filter(|left| *left >= Duration::from_millis(1))
        .map(|left| left.min(tierstack::core::store::MAX_TTL))
}

fn backend(error: &CacheError) -> session_store::Error {
    session_store::Error::Backend(error.to_string())
}

#[async_trait]
impl SessionStore for TieredSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let Some(ttl) = remaining(record) else {
            // Expired already: nothing to keep.
            return Ok(());
        };
        let tags = self.tags(record);
        let options = self.write_options(ttl, &tags);
        for _ in 0..CREATE_ATTEMPTS {
            let key = record.id.to_string();
            let created = self
                .cache
                .set_if_absent_with_tags(&key, record.clone(), &tags, &options)
                .await
                .map_err(|e| backend(&e))?;
            if created {
                return Ok(());
            }
            record.id = Id::default();
        }
        Err(session_store::Error::Backend(format!(
            "no free session id after {CREATE_ATTEMPTS} attempts"
        )))
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let key = record.id.to_string();
        let Some(ttl) = remaining(record) else {
            self.cache.delete(&key).await.map_err(|e| backend(&e))?;
            return Ok(());
        };
        let tags = self.tags(record);
        let saved = self
            .cache
            .set_if_present_with_tags(&key, record.clone(), &tags, &self.write_options(ttl, &tags))
            .await
            .map_err(|e| backend(&e))?;
        if !saved {
            // Ended (a logout, a cycled id, its expiry) while this request ran.
            tracing::debug!("session ended before its save: not saved");
        }
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        // The TTL is not read: only the skips matter to a read.
        let options = self.options(Duration::from_secs(1));
        let record = self
            .cache
            .get_with(&id.to_string(), &options)
            .await
            .map_err(|e| backend(&e))?;
        Ok(record.filter(|record| record.id == *id && remaining(record).is_some()))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.cache
            .delete(&id.to_string())
            .await
            .map(|_| ())
            .map_err(|e| backend(&e))
    }
}

#[async_trait]
impl ExpiredDeletion for TieredSessionStore {
    async fn delete_expired(&self) -> session_store::Result<()> {
        self.cache
            .sweep_expired()
            .await
            .map(|_| ())
            .map_err(|e| backend(&e))
    }
}

/// The README's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
