use std::sync::LazyLock;
use tierstack::TieredCache;
use tierstack_macros::cached;

static CACHE: LazyLock<TieredCache<String>> =
    LazyLock::new(|| TieredCache::builder("ui").build().unwrap());

#[cached(cache = CACHE, key = "user:{id}")]
fn profile(id: u64) -> Result<String, std::io::Error> {
    Ok(id.to_string())
}

fn main() {}
