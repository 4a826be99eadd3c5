use std::sync::LazyLock;
use tierstack::TieredCache;
use tierstack_macros::cached;

static CACHE: LazyLock<TieredCache<String>> =
    LazyLock::new(|| TieredCache::builder("ui").build().unwrap());

#[cached(cache = CACHE, key = "user:{id}")]
async fn profile(id: u64) -> std::io::Result<String> {
    Ok(id.to_string())
}

fn main() {}
