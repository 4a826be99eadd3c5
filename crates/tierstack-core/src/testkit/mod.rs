//! Test support shared by every tierstack crate (feature `testkit`).
//!
//! - [`MemoryStore`]: an in-memory [`Store`](crate::Store) on an injectable clock.
//! - [`MemoryBus`] and [`MemoryBackplane`]: an in-process backplane between caches.
//! - [`FaultyStore`]: wraps any store and fails or delays its calls, by probability or on command.
//! - [`conformance`]: the one suite of `Store` behaviour that every backend runs, through
//!   [`store_conformance_tests!`](crate::store_conformance_tests).

pub mod conformance;
mod faulty;
mod memory;

pub use faulty::{FaultyStore, InjectedFault};
pub use memory::{MemoryBackplane, MemoryBus, MemoryStore};
