use std::sync::LazyLock;
use tierstack::TieredCache;
use tierstack_macros::cached;

static CACHE: LazyLock<TieredCache<String>> =
    LazyLock::new(|| TieredCache::builder("ui").build().unwrap());

#[cached(cache = CACHE, key = "price:{amount:.2}")]
async fn price(amount: f64) -> String {
    amount.to_string()
}

fn main() {}
