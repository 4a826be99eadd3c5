use tierstack::TieredCache;
use tierstack_macros::cached;

struct Service {
    cache: TieredCache<String>,
}

impl Service {
    #[cached(cache = self.cache, key = "user:{id}")]
    async fn profile(&mut self, id: u64) -> Result<String, std::io::Error> {
        Ok(id.to_string())
    }
}

fn main() {}
