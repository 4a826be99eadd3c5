//! Store keys built in a buffer that each thread reuses.
//!
//! Every L2 read needs its `namespace:key` store key only until the store answers. Allocating
//! and freeing a `String` for it cost as much as the rest of an in-memory read's bookkeeping, so
//! reads borrow a spare buffer from the current thread instead, and hand it back when done (to
//! whichever thread they finish on: a task may move between threads at an `.await`).

use std::cell::Cell;
use std::ops::Deref;

use tierstack_core::key::Namespace;

/// Buffers that grew beyond this are freed rather than kept, so that one huge key does not pin
/// its memory to a thread for good.
const MAX_KEPT_CAPACITY: usize = 1024;

thread_local! {
    static SPARE: Cell<Option<String>> = const { Cell::new(None) };
}

/// The store key `namespace:key`, in a buffer borrowed from the current thread.
pub(crate) struct BufferedKey(String);

impl BufferedKey {
    pub(crate) fn new(namespace: &Namespace, key: &str) -> Self {
        // A fresh `String` when there is no spare: the thread's first read, a spare lent to a
        // read still running on this thread, or (`try_with` failing) the thread being torn
        // down. None of these is an error; the read only costs one allocation more.
        let mut buffer = SPARE
            .try_with(Cell::take)
            .ok()
            .flatten()
            .unwrap_or_default();
        buffer.clear();
        buffer.reserve(namespace.as_str().len() + 1 + key.len());
        buffer.push_str(namespace.as_str());
        buffer.push(':');
        buffer.push_str(key);
        Self(buffer)
    }
}

impl Deref for BufferedKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for BufferedKey {
    fn drop(&mut self) {
        if self.0.capacity() <= MAX_KEPT_CAPACITY {
            let buffer = std::mem::take(&mut self.0);
            // A spare already there (a nested read returned first) is simply freed.
            let _ = SPARE.try_with(|spare| spare.set(Some(buffer)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace() -> Namespace {
        Namespace::new("ns").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn keys_are_namespaced_whatever_the_buffer_held_before() {
        let ns = namespace();
        let long = "k".repeat(300);
        assert_eq!(&*BufferedKey::new(&ns, &long), format!("ns:{long}"));
        // The next key reuses the longer buffer and must not keep any of its old content.
        assert_eq!(&*BufferedKey::new(&ns, "a"), "ns:a");
        let unicode = "ключ🔑";
        assert_eq!(&*BufferedKey::new(&ns, unicode), format!("ns:{unicode}"));
    }

    #[test]
    fn keys_alive_at_once_are_independent() {
        let ns = namespace();
        let first = BufferedKey::new(&ns, "first");
        let second = BufferedKey::new(&ns, "second");
        assert_eq!(&*first, "ns:first");
        assert_eq!(&*second, "ns:second");
        drop(first);
        let third = BufferedKey::new(&ns, "third");
        assert_eq!(&*second, "ns:second");
        assert_eq!(&*third, "ns:third");
    }

    #[test]
    fn huge_buffers_are_not_kept() {
        let ns = namespace();
        drop(BufferedKey::new(&ns, &"k".repeat(MAX_KEPT_CAPACITY * 4)));
        let next = BufferedKey::new(&ns, "a");
        assert!(next.0.capacity() <= MAX_KEPT_CAPACITY);
    }
}
