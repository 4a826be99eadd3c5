//! Codecs turn values into the bytes that an L2 stores, and back.
//!
//! [`BincodeCodec`] (bincode 2 in serde mode) is the default: compact and fast. bincode's upstream
//! has ceased development (3.0.0 is a tombstone), so the codec sits behind this trait and every
//! stored value carries its codec id in the [envelope](crate::envelope): a later move to another
//! format reads old entries as misses instead of misreading them. [`JsonCodec`] is the second codec,
//! for values that need `deserialize_any` (`serde_json::Value`, untagged enums) or that other
//! languages read.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{CacheError, Result};

/// Encodes values to bytes and decodes them back.
pub trait Codec: Send + Sync + Debug + 'static {
    /// The id written into every envelope; decoding checks it. Ids 0–127 are tierstack's own.
    const ID: u8;

    /// Appends the encoding of `value` to `out`.
    fn encode_into<T: Serialize + ?Sized>(&self, value: &T, out: &mut Vec<u8>) -> Result<()>;

    /// Decodes a value from exactly `bytes` (trailing bytes are an error).
    ///
    /// Implementations must bound their allocations: `bytes` may come from anyone with write
    /// access to the L2.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T>;
}

/// The default decode limit of [`BincodeCodec`]: 64 MiB of allocations per value.
pub const DEFAULT_DECODE_LIMIT: usize = 64 * 1024 * 1024;

/// bincode 2 in serde mode (little-endian, varint), decoding with an allocation limit of `LIMIT`
/// bytes so that a corrupt length prefix cannot make the process allocate without bound.
///
/// bincode cannot decode types that need `deserialize_any` (`serde_json::Value`, untagged enums)
/// and silently misreads `#[serde(flatten)]`, `skip_serializing_if` and internally tagged enums:
/// use [`JsonCodec`] for those.
///
/// [`BincodeCodec`] is this codec with the [default limit](DEFAULT_DECODE_LIMIT).
#[derive(Debug, Clone, Copy, Default)]
pub struct BoundedBincodeCodec<const LIMIT: usize>;

/// bincode 2 with the [default decode limit](DEFAULT_DECODE_LIMIT): the default codec.
pub type BincodeCodec = BoundedBincodeCodec<DEFAULT_DECODE_LIMIT>;

impl<const LIMIT: usize> Codec for BoundedBincodeCodec<LIMIT> {
    const ID: u8 = 1;

    fn encode_into<T: Serialize + ?Sized>(&self, value: &T, out: &mut Vec<u8>) -> Result<()> {
        bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
            .map(|_| ())
            .map_err(CacheError::serialization)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        let config = bincode::config::standard().with_limit::<LIMIT>();
        let (value, read) = bincode::serde::decode_from_slice::<T, _>(bytes, config)
            .map_err(CacheError::serialization)?;
        if read != bytes.len() {
            return Err(CacheError::serialization(format!(
                "{} trailing bytes after the value",
                bytes.len() - read
            )));
        }
        Ok(value)
    }
}

/// JSON via `serde_json` (recursion limited to 128 levels by `serde_json` itself).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    const ID: u8 = 2;

    fn encode_into<T: Serialize + ?Sized>(&self, value: &T, out: &mut Vec<u8>) -> Result<()> {
        serde_json::to_writer(out, value).map_err(CacheError::serialization)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(CacheError::serialization)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Profile {
        id: u64,
        name: String,
        tags: Vec<String>,
    }

    fn sample() -> Profile {
        Profile {
            id: 7,
            name: "ünïcode".into(),
            tags: vec!["a".into(), String::new()],
        }
    }

    fn round_trip<C: Codec>(codec: &C) {
        let mut bytes = Vec::new();
        codec
            .encode_into(&sample(), &mut bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        let back: Profile = codec.decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, sample());
    }

    #[test]
    fn both_codecs_round_trip() {
        round_trip(&BincodeCodec::default());
        round_trip(&BoundedBincodeCodec::<1024>);
        round_trip(&JsonCodec);
    }

    #[test]
    fn bincode_refuses_a_hostile_length_prefix_without_allocating() {
        // Varint tag 253 followed by a u64 length of 2^40: without a limit bincode would try to
        // allocate a terabyte and abort the process.
        let mut hostile = vec![253u8];
        hostile.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let result: Result<Vec<u8>> = BincodeCodec::default().decode(&hostile);
        assert!(matches!(result, Err(CacheError::Serialization(_))));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let codec = BincodeCodec::default();
        let mut bytes = Vec::new();
        codec
            .encode_into(&5u32, &mut bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        bytes.push(0);
        assert!(codec.decode::<u32>(&bytes).is_err());
    }

    #[test]
    fn truncated_and_garbage_inputs_are_errors() {
        let codec = BincodeCodec::default();
        let mut bytes = Vec::new();
        codec
            .encode_into(&sample(), &mut bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        for cut in 0..bytes.len() {
            assert!(codec.decode::<Profile>(&bytes[..cut]).is_err());
        }
        assert!(JsonCodec.decode::<Profile>(b"{\"id\":").is_err());
    }
}
