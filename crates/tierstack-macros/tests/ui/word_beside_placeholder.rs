use std::sync::LazyLock;
use tierstack::TieredCache;
use tierstack_macros::cached;

static CACHE: LazyLock<TieredCache<String>> =
    LazyLock::new(|| TieredCache::builder("ui").build().unwrap());

// "user{id}" with id "7" would be the key of "u{rest}" with rest "ser7".
#[cached(cache = CACHE, key = "user{id}")]
async fn user(id: u64) -> String {
    id.to_string()
}

fn main() {}
