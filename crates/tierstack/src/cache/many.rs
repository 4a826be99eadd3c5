//! Bulk writes: `set_many` and `delete_many`, each key written as `set` and `delete` write it,
//! many at once.
//!
//! The keys' writes run concurrently, so that their L2 commands share round trips (a
//! multiplexed Redis connection pipelines them) and their invalidations share the publisher's
//! batches, while every key keeps the single-key path's guarantees: its lock, its freshness
//! check, its recovery when L2 fails.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::store::validate_ttl;
use tierstack_core::{Codec, Result};

use super::Inner;
use crate::options::EntryOptions;

/// How many of one bulk call's writes are in flight at once: enough to fill a round trip,
/// few enough that a call of a million keys does not hold a million futures.
const BULK_WRITE_CONCURRENCY: usize = 64;

impl<V, C> Inner<V, C>
where
    V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static,
    C: Codec,
{
    pub(super) async fn set_many<K: AsRef<str>>(
        self: &Arc<Self>,
        entries: impl IntoIterator<Item = (K, V)>,
        options: &EntryOptions,
    ) -> Result<()> {
        validate_ttl(options.ttl())?;
        options.validate()?;
        let entries = last_of_each_key(entries.into_iter().collect(), |(key, _)| key.as_ref());
        // Every key checked and every value encoded before anything is written: bad input
        // refuses the whole call and writes nothing.
        let mut writes = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            let key = key.as_ref();
            self.check_key(key)?;
            let life = Self::life(options, options.ttl());
            let bytes = self.encode_with_life(key, Some(value), &life)?;
            writes.push((key.to_owned(), value.clone(), bytes, life));
        }
        // Owned keys: a closure taking borrowed ones would make the call's future lose `Send`
        // (a higher-ranked lifetime the compiler cannot prove it for).
        let outcomes: Vec<Result<()>> = stream::iter(writes)
            .map(|(key, value, bytes, life)| async move {
                self.write_encoded(&key, value, bytes, life, options).await
            })
            .buffered(BULK_WRITE_CONCURRENCY)
            .collect()
            .await;
        outcomes.into_iter().collect()
    }

    pub(super) async fn delete_many<K: AsRef<str>>(
        self: &Arc<Self>,
        keys: &[K],
        options: &EntryOptions,
    ) -> Result<u64> {
        let keys = last_of_each_key(keys.iter().map(AsRef::as_ref).collect(), |key| *key);
        for key in &keys {
            self.check_key(key)?;
        }
        let keys: Vec<String> = keys.into_iter().map(str::to_owned).collect();
        let outcomes: Vec<Result<bool>> = stream::iter(keys)
            .map(|key| async move { self.delete(&key, options).await })
            .buffered(BULK_WRITE_CONCURRENCY)
            .collect()
            .await;
        let mut removed = 0;
        for outcome in outcomes {
            removed += u64::from(outcome?);
        }
        Ok(removed)
    }
}

/// `items` with only the last of those that share a key, in their order: of two writes of one
/// key in one call, the later wins, as if they ran one after the other (run at once, either
/// could land last).
fn last_of_each_key<T>(items: Vec<T>, key_of: impl Fn(&T) -> &str) -> Vec<T> {
    let mut seen = HashSet::with_capacity(items.len());
    let later: Vec<bool> = items
        .iter()
        .rev()
        .map(|item| !seen.insert(key_of(item)))
        .collect();
    items
        .into_iter()
        .zip(later.into_iter().rev())
        .filter_map(|(item, has_later)| (!has_later).then_some(item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::last_of_each_key;

    #[test]
    fn the_last_write_of_a_key_is_kept_in_order() {
        let items = vec![("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)];
        assert_eq!(
            last_of_each_key(items, |(key, _)| key),
            vec![("a", 3), ("c", 4), ("b", 5)]
        );
        assert_eq!(
            last_of_each_key(Vec::<&str>::new(), |key| *key),
            Vec::<&str>::new()
        );
    }
}
