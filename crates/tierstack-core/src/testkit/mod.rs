//! Test support shared by every tierstack crate (feature `testkit`).
//!
//! - [`MemoryStore`]: an in-memory [`Store`](crate::Store) on an injectable clock.
//! - [`MemoryBus`] and [`MemoryBackplane`]: an in-process backplane between caches.
//! - [`FaultyStore`]: wraps any store and fails or delays its calls, by probability or on command.
//! - [`conformance`]: the one suite of `Store` behaviour that every backend runs, through
//!   [`store_conformance_tests!`](crate::store_conformance_tests).
//! - [`backplane_conformance`]: the one suite of `Backplane` behaviour that every backplane
//!   runs, through [`backplane_conformance_tests!`](crate::backplane_conformance_tests).
//! - [`fuzz`]: the envelope decoder's fuzz body and seeds (`cargo xtask fuzz`).

pub mod backplane_conformance;
pub mod conformance;
mod faulty;
pub mod fuzz;
mod memory;

pub use faulty::{FaultyStore, InjectedFault};
pub use memory::{MemoryBackplane, MemoryBus, MemoryStore};
