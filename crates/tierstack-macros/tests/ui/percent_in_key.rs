use std::sync::LazyLock;
use tierstack::TieredCache;
use tierstack_macros::cached;

static CACHE: LazyLock<TieredCache<String>> =
    LazyLock::new(|| TieredCache::builder("ui").build().unwrap());

#[cached(cache = CACHE, key = "{a}%3A{b}")]
async fn pair(a: u64, b: u64) -> String {
    format!("{a} {b}")
}

fn main() {}
