use std::sync::LazyLock;
use tierstack::TieredCache;
use tierstack_macros::cached;

static CACHE: LazyLock<TieredCache<String>> =
    LazyLock::new(|| TieredCache::builder("ui").build().unwrap());

// ("ab", "c") and ("a", "bc") would share the key "abc".
#[cached(cache = CACHE, key = "{first}{second}")]
async fn joined(first: String, second: String) -> String {
    first + &second
}

fn main() {}
