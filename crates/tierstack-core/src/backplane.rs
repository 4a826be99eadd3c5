//! The backplane carries invalidations between the instances that share an L2, so that each
//! evicts its L1 when another writes.
//!
//! Delivery is at most once (Redis pub/sub drops messages while a subscriber is disconnected).
//! That is why a [`Subscription`] also yields [`BackplaneEvent::Lost`] when the subscription is
//! lost (the subscriber serves nothing from its L1 as fresh and keeps nothing new in it, since
//! nobody would tell it of changes) and [`BackplaneEvent::Resync`] whenever messages may have been missed (the
//! subscription is back, or the local queue overflowed): the subscriber clears its L1 again.

use std::collections::hash_map::RandomState;
use std::fmt::Debug;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::clock::Timestamp;
use crate::error::{CacheError, Result};

/// What to evict from every other instance's L1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Invalidation {
    /// These keys of the namespace.
    Keys(Vec<String>),
    /// Every key of the namespace that starts with `prefix`, deleted at `at`: a receiver
    /// drops what it knows of those keys, and the writes under the prefix it keeps for a
    /// replay that were made by then (a later one is newer than the delete, however late the
    /// message arrives).
    Prefix {
        /// The prefix.
        prefix: String,
        /// When the delete began.
        at: Timestamp,
    },
    /// Every entry of the namespace that carries this tag (see [`tag`](crate::tag)): with
    /// `remove`, gone; else stale (a fail-safe fallback).
    Tag {
        /// The tag.
        tag: String,
        /// Whether its entries are removed rather than expired.
        remove: bool,
    },
    /// Every key of the namespace.
    All,
}

/// An invalidation of one namespace, as received from the backplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidationMessage {
    /// The cache namespace it applies to.
    pub namespace: String,
    /// What to evict.
    pub invalidation: Invalidation,
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackplaneEvent {
    /// Another instance changed these entries.
    Invalidate(Arc<InvalidationMessage>),
    /// Messages may have been lost: clear everything local. If the subscription was
    /// [`Lost`](Self::Lost), it is back.
    Resync,
    /// The subscription is lost: messages are missed until the next [`Resync`](Self::Resync).
    /// Trust nothing local, and keep nothing new locally until then (it could go stale without
    /// anyone saying so).
    Lost,
}

/// Publishes invalidations to, and receives them from, the other instances.
#[async_trait]
pub trait Backplane: Send + Sync + Debug + 'static {
    /// Tells every other instance to evict `invalidation` from `namespace`. The publishing
    /// backplane does not receive its own message.
    async fn publish(&self, namespace: &str, invalidation: &Invalidation) -> Result<()>;

    /// A new subscription to the invalidations published by other instances.
    fn subscribe(&self) -> Subscription;

    /// Whether the L2 store this backplane was built with publishes the invalidation of each of
    /// its own key writes (`set`, `set_many`, `delete`, `delete_many`, `expire`) in the write's
    /// round trip, ordered after the write. A composer then publishes only prefix and
    /// namespace-wide invalidations itself, and the write of a key costs one round trip instead
    /// of two.
    ///
    /// Because the store publishes, any decorator around it (a migration, fault injection, a
    /// user's own) keeps every write announced. The default, `false`: the composer publishes
    /// after each write.
    fn publishes_store_writes(&self) -> bool {
        false
    }
}

/// A stream of [`BackplaneEvent`]s.
#[derive(Debug)]
pub struct Subscription {
    receiver: broadcast::Receiver<BackplaneEvent>,
}

impl Subscription {
    /// The next event; `None` once the backplane has shut down.
    ///
    /// If this subscriber fell so far behind that queued events were dropped, it receives
    /// [`BackplaneEvent::Resync`] instead of them, so the queue stays bounded and nothing stale
    /// survives.
    pub async fn recv(&mut self) -> Option<BackplaneEvent> {
        match self.receiver.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(BackplaneEvent::Resync),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// How many events a slow subscriber may have queued before it is resynced instead.
pub const SUBSCRIPTION_QUEUE: usize = 4096;

/// The largest backplane message accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024 * 1024;

/// The fan-out half that every backplane implementation shares: it filters out the instance's own
/// messages, decodes bounded wire messages and hands events to every [`Subscription`].
#[derive(Debug, Clone)]
pub struct BackplaneHub {
    origin: u64,
    sender: broadcast::Sender<BackplaneEvent>,
}

impl Default for BackplaneHub {
    fn default() -> Self {
        Self::new()
    }
}

impl BackplaneHub {
    /// A hub with a fresh random origin id.
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(SUBSCRIPTION_QUEUE);
        Self {
            origin: random_origin(),
            sender,
        }
    }

    /// This instance's origin id, written into every message it publishes.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// A new subscription.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            receiver: self.sender.subscribe(),
        }
    }

    /// Encodes a message of this instance for the wire: a 9-byte header (the format version and
    /// this instance's origin id) and a JSON body (namespace and invalidation).
    pub fn encode(&self, namespace: &str, invalidation: &Invalidation) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + 64 + namespace.len());
        bytes.push(WIRE_VERSION);
        bytes.extend_from_slice(&self.origin.to_le_bytes());
        let body = WireBodyRef {
            namespace,
            invalidation,
        };
        serde_json::to_writer(&mut bytes, &body).map_err(CacheError::serialization)?;
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(CacheError::ValueTooLarge {
                size: bytes.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        Ok(bytes)
    }

    /// Decodes a message from the wire and delivers it unless this instance published it.
    /// Undecodable messages are refused with an error (callers count and log them) and
    /// dropped; one whose namespace reads but whose invalidation does not (a kind of a newer
    /// version) is delivered as [`Invalidation::All`] of that namespace, and still answered
    /// with an error.
    ///
    /// The origin sits in the fixed header, so an instance drops its own messages (it receives
    /// every one it publishes) without decoding their body.
    pub fn deliver_wire(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(CacheError::ValueTooLarge {
                size: bytes.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let Some((header, body)) = bytes.split_at_checked(HEADER_LEN) else {
            return Err(CacheError::serialization(
                "backplane message shorter than its header",
            ));
        };
        let (version, origin) = header.split_at(1);
        if version[0] != WIRE_VERSION {
            return Err(CacheError::serialization(format!(
                "unknown backplane message version {}",
                version[0]
            )));
        }
        let origin = u64::from_le_bytes(origin.try_into().map_err(CacheError::serialization)?);
        if origin == self.origin {
            return Ok(());
        }
        let body = match serde_json::from_slice::<WireBody>(body) {
            Ok(body) => body,
            Err(error) => {
                // An invalidation this version cannot read (a kind of a newer version, during
                // a rolling upgrade) may have changed any key of its namespace: all of it
                // goes, and the caller still hears of the message as undecodable.
                let unread = serde_json::from_slice::<UnreadInvalidation>(body)
                    .map_err(|_| CacheError::serialization(error))?;
                self.deliver(InvalidationMessage {
                    namespace: unread.namespace,
                    invalidation: Invalidation::All,
                });
                return Err(CacheError::serialization(
                    "a backplane invalidation of a kind this version does not know: its whole \
                     namespace was invalidated",
                ));
            }
        };
        self.deliver(InvalidationMessage {
            namespace: body.namespace,
            invalidation: body.invalidation,
        });
        Ok(())
    }

    /// Delivers a decoded message to every subscriber.
    pub fn deliver(&self, message: InvalidationMessage) {
        // No subscriber is not an error: nobody has anything to evict.
        let _ = self
            .sender
            .send(BackplaneEvent::Invalidate(Arc::new(message)));
    }

    /// Tells every subscriber that messages may have been lost (and that the subscription, if
    /// it was lost, is back).
    pub fn resync(&self) {
        let _ = self.sender.send(BackplaneEvent::Resync);
    }

    /// Tells every subscriber that the subscription is lost until the next
    /// [`resync`](Self::resync).
    pub fn lost(&self) {
        let _ = self.sender.send(BackplaneEvent::Lost);
    }
}

/// Version 2 moved the origin into a fixed header (version 1 was all JSON).
const WIRE_VERSION: u8 = 2;
/// The version byte and the origin id, little-endian.
const HEADER_LEN: usize = 9;

#[derive(Serialize)]
struct WireBodyRef<'a> {
    namespace: &'a str,
    invalidation: &'a Invalidation,
}

#[derive(Deserialize)]
struct WireBody {
    namespace: String,
    invalidation: Invalidation,
}

/// A body whose invalidation did not decode, read for its namespace alone.
#[derive(Deserialize)]
struct UnreadInvalidation {
    namespace: String,
    /// Required: a body without an invalidation stays an error.
    #[serde(rename = "invalidation")]
    _invalidation: serde::de::IgnoredAny,
}

fn random_origin() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn own_messages_are_skipped_and_others_delivered() {
        let a = BackplaneHub::new();
        let b = BackplaneHub::new();
        assert_ne!(a.origin(), b.origin());
        let mut sub_a = a.subscribe();
        let wire = b
            .encode("users", &Invalidation::Keys(vec!["1".into()]))
            .unwrap_or_else(|e| panic!("{e}"));
        a.deliver_wire(
            &a.encode("users", &Invalidation::All)
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        a.deliver_wire(&wire).unwrap_or_else(|e| panic!("{e}"));
        let event = sub_a.recv().await;
        let expected = BackplaneEvent::Invalidate(Arc::new(InvalidationMessage {
            namespace: "users".into(),
            invalidation: Invalidation::Keys(vec!["1".into()]),
        }));
        assert_eq!(event, Some(expected));
    }

    #[test]
    fn garbage_on_the_wire_is_an_error() {
        let hub = BackplaneHub::new();
        let other = BackplaneHub::new().origin().to_le_bytes();
        let with_header = |version: u8, body: &[u8]| {
            let mut bytes = vec![version];
            bytes.extend_from_slice(&other);
            bytes.extend_from_slice(body);
            bytes
        };
        assert!(hub.deliver_wire(b"\xff\x00garbage").is_err());
        assert!(hub.deliver_wire(b"").is_err(), "empty");
        assert!(
            hub.deliver_wire(&[WIRE_VERSION, 1, 2]).is_err(),
            "truncated header"
        );
        assert!(
            hub.deliver_wire(&with_header(
                9,
                br#"{"namespace":"n","invalidation":"All"}"#
            ))
            .is_err(),
            "unknown version"
        );
        assert!(
            hub.deliver_wire(br#"{"version":1,"origin":1,"namespace":"n","invalidation":"All"}"#)
                .is_err(),
            "the old all-JSON format"
        );
        assert!(
            hub.deliver_wire(&with_header(WIRE_VERSION, b"{not json"))
                .is_err(),
            "a bad body"
        );
        assert!(hub.deliver_wire(&vec![b' '; MAX_MESSAGE_LEN + 1]).is_err());
    }

    #[tokio::test]
    async fn an_invalidation_of_an_unknown_kind_invalidates_its_whole_namespace() {
        let hub = BackplaneHub::new();
        let mut sub = hub.subscribe();
        let mut wire = vec![WIRE_VERSION];
        wire.extend_from_slice(&BackplaneHub::new().origin().to_le_bytes());
        wire.extend_from_slice(br#"{"namespace":"users","invalidation":{"Newer":{"x":1}}}"#);
        let error = hub.deliver_wire(&wire).unwrap_err();
        assert!(error.to_string().contains("whole namespace"), "{error}");
        let expected = BackplaneEvent::Invalidate(Arc::new(InvalidationMessage {
            namespace: "users".into(),
            invalidation: Invalidation::All,
        }));
        assert_eq!(sub.recv().await, Some(expected));
        // Without a namespace to scope it to, or without an invalidation, nothing is
        // delivered.
        for body in [
            &br#"{"invalidation":{"Newer":{}}}"#[..],
            br#"{"namespace":"users"}"#,
        ] {
            let mut wire = vec![WIRE_VERSION];
            wire.extend_from_slice(&BackplaneHub::new().origin().to_le_bytes());
            wire.extend_from_slice(body);
            assert!(hub.deliver_wire(&wire).is_err());
        }
        hub.resync();
        assert_eq!(
            sub.recv().await,
            Some(BackplaneEvent::Resync),
            "nothing delivered"
        );
    }

    #[test]
    fn a_prefix_invalidation_carries_its_time_on_the_wire() {
        let a = BackplaneHub::new();
        let b = BackplaneHub::new();
        let invalidation = Invalidation::Prefix {
            prefix: "user:".into(),
            at: Timestamp::from_millis(1_700_000_000_123),
        };
        let wire = a
            .encode("users", &invalidation)
            .unwrap_or_else(|e| panic!("{e}"));
        let body = std::str::from_utf8(&wire[HEADER_LEN..]).unwrap_or_else(|e| panic!("{e}"));
        assert!(body.contains("1700000000123"), "{body}");
        let mut sub = b.subscribe();
        b.deliver_wire(&wire).unwrap_or_else(|e| panic!("{e}"));
        let Ok(BackplaneEvent::Invalidate(message)) = sub.receiver.try_recv() else {
            panic!("nothing delivered");
        };
        assert_eq!(message.invalidation, invalidation);
    }

    #[tokio::test]
    async fn own_messages_are_dropped_without_decoding_their_body() {
        let hub = BackplaneHub::new();
        let mut sub = hub.subscribe();
        let mut own = vec![WIRE_VERSION];
        own.extend_from_slice(&hub.origin().to_le_bytes());
        own.extend_from_slice(b"{not json: never read");
        assert!(hub.deliver_wire(&own).is_ok());
        hub.resync();
        assert_eq!(
            sub.recv().await,
            Some(BackplaneEvent::Resync),
            "nothing was delivered before the resync"
        );
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_a_resync() {
        let hub = BackplaneHub::new();
        let mut sub = hub.subscribe();
        for i in 0..=SUBSCRIPTION_QUEUE {
            hub.deliver(InvalidationMessage {
                namespace: "n".into(),
                invalidation: Invalidation::Keys(vec![i.to_string()]),
            });
        }
        assert_eq!(sub.recv().await, Some(BackplaneEvent::Resync));
    }
}
