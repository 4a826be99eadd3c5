//! Bulk writes: `set_many` and `delete_many`, each key written by `set` and `delete` as a call
//! of its own, many at once.
//!
//! Up to [`BULK_WRITE_CONCURRENCY`] writes are in flight, so that their Redis commands share
//! round trips (a multiplexed connection pipelines them), while every key keeps the single-key
//! path's guarantees: its freshness check, its lock, its recovery when L2 fails. Two keys of one
//! freshness stripe are never written at once: they share a generation (a write of either would
//! read as a change of the other, which then leaves L1 unfilled) and a lock (a delete of either
//! would wait for the other's round trip).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tierstack_core::store::validate_ttl;
use tierstack_core::{Codec, Result};

use super::Inner;
use crate::options::EntryOptions;

/// How many of one bulk call's writes are in flight at once: enough to fill a round trip,
/// few enough that a call of a million keys holds only this many writes' futures.
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
        let entries: Vec<(K, V)> = entries.into_iter().collect();
        for (key, _) in &entries {
            self.check_key(key.as_ref())?;
        }
        let writes = last_of_each_key(entries, |(key, _)| key.as_ref())
            .into_iter()
            .map(|(key, value)| (key.as_ref().to_owned(), value))
            .collect();
        // Each value is encoded by its own write, just before it is sent: its envelope's times
        // count from then, as the L2's TTL does.
        let outcomes = self
            .spread_over_stripes(
                writes,
                |(key, _)| key,
                |(key, value)| async move { self.set(&key, value, options, &[]).await },
            )
            .await;
        outcomes.into_iter().collect()
    }

    pub(super) async fn delete_many<K: AsRef<str>>(
        self: &Arc<Self>,
        keys: &[K],
        options: &EntryOptions,
    ) -> Result<u64> {
        for key in keys {
            self.check_key(key.as_ref())?;
        }
        let keys = last_of_each_key(keys.iter().map(AsRef::as_ref).collect(), |key| *key)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let outcomes = self
            .spread_over_stripes(keys, String::as_str, |key| async move {
                self.delete(&key, options).await
            })
            .await;
        let mut removed = 0;
        for outcome in outcomes {
            removed += u64::from(outcome?);
        }
        Ok(removed)
    }

    /// Runs `call` on every item, up to [`BULK_WRITE_CONCURRENCY`] at once and never two items
    /// whose keys share a freshness stripe at once; the outcomes in the items' order. A slow
    /// call holds back only the items of its stripe.
    async fn spread_over_stripes<T, R, Fut>(
        &self,
        items: Vec<T>,
        key_of: impl Fn(&T) -> &str,
        call: impl Fn(T) -> Fut,
    ) -> Vec<R>
    where
        Fut: Future<Output = R>,
    {
        let count = items.len();
        // Per stripe, its items in order; `ready` holds the stripes with items and none in
        // flight, in the order of their first item.
        let mut queues: HashMap<usize, VecDeque<(usize, T)>> = HashMap::new();
        let mut ready = VecDeque::new();
        for (index, item) in items.into_iter().enumerate() {
            let stripe = self.freshness.stripe(key_of(&item));
            let queue = queues.entry(stripe).or_insert_with(|| {
                ready.push_back(stripe);
                VecDeque::new()
            });
            queue.push_back((index, item));
        }
        let mut outcomes: Vec<Option<R>> = (0..count).map(|_| None).collect();
        let mut running = FuturesUnordered::new();
        loop {
            while running.len() < BULK_WRITE_CONCURRENCY
                && let Some(stripe) = ready.pop_front()
                && let Some((index, item)) = queues.get_mut(&stripe).and_then(VecDeque::pop_front)
            {
                let called = call(item);
                running.push(async move { (stripe, index, called.await) });
            }
            let Some((stripe, index, outcome)) = running.next().await else {
                break;
            };
            outcomes[index] = Some(outcome);
            if queues.get(&stripe).is_some_and(|queue| !queue.is_empty()) {
                ready.push_back(stripe);
            }
        }
        debug_assert!(outcomes.iter().all(Option::is_some), "every item ran once");
        outcomes.into_iter().flatten().collect()
    }
}

/// `items` with only the last of those that share a key, in their order: of two writes of one
/// key in one call, the later wins, as if they ran one after the other.
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
