//! The core contracts of [tierstack](https://docs.rs/tierstack): what every cache tier and every
//! integration agrees on.
//!
//! - [`Store`]: the object-safe byte-level tier that every L2 implements (`Arc<dyn Store>`), with
//!   single and bulk operations, expiry, prefix deletion and sweeps.
//! - [`Backplane`]: carries invalidations between instances, with resync events when messages may
//!   have been lost.
//! - [`Codec`]: values to bytes; [`BincodeCodec`] (default) and [`JsonCodec`].
//! - [`envelope`]: the versioned wrapper of every L2 value (codec id, expiry, length), parsed
//!   defensively so that corrupt or hostile bytes are a miss, never a panic.
//! - [`CacheError`]: one `#[non_exhaustive]` error with source chains and
//!   [`is_transient`](CacheError::is_transient).
//! - [`key`]: namespaces and escaping, so that no user key can spell another namespace's key.
//! - [`clock`]: an injectable clock, so expiry tests never sleep.
//! - [`tag`]: the versions of tags that entries carry, compared without scans or clocks.
//!
//! This crate holds no runtime and no network client; backends depend on it alone.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tierstack_core::clock::{Clock, SystemClock};
//! use tierstack_core::envelope::{self, Envelope};
//! use tierstack_core::{BincodeCodec, Codec};
//!
//! let codec = BincodeCodec::default();
//! let now = SystemClock.now();
//! let bytes = envelope::encode(&codec, Some(&vec![1u32, 2, 3]), now,
//!     now.saturating_add(Duration::from_secs(60)), 1 << 20)?;
//!
//! let parsed = Envelope::parse::<BincodeCodec>(&bytes, 1 << 20)?;
//! let value: Vec<u32> = codec.decode(parsed.payload)?;
//! assert_eq!(value, [1, 2, 3]);
//! # Ok::<(), tierstack_core::CacheError>(())
//! ```
//!
//! # Features
//!
// Page links, not paths: the module exists only with the feature, and the docs must build
// without it too.
//! - `testkit`: [`testkit::MemoryStore`](testkit/struct.MemoryStore.html),
//!   [`testkit::MemoryBus`](testkit/struct.MemoryBus.html),
//!   [`testkit::FaultyStore`](testkit/struct.FaultyStore.html) and the
//!   [`testkit::conformance`](testkit/conformance/index.html) suite with
//!   [`store_conformance_tests!`](macro.store_conformance_tests.html), and the
//!   [`testkit::backplane_conformance`](testkit/backplane_conformance/index.html) suite with
//!   [`backplane_conformance_tests!`](macro.backplane_conformance_tests.html).

pub mod backplane;
pub mod clock;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod key;
pub mod store;
pub mod tag;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backplane::{Backplane, BackplaneEvent, Invalidation, InvalidationMessage, Subscription};
pub use clock::{Clock, SharedClock, Timestamp};
pub use codec::{BincodeCodec, BoundedBincodeCodec, Codec, JsonCodec};
pub use error::{BoxError, CacheError, KeyProblem, Result};
pub use store::{Store, StoreWrite, StoredEntry};
