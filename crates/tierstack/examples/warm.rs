//! Warming a cache before a service takes traffic: 20,000 user profiles, loaded 200 at a time
//! with 4 queries at most in flight (the database never sees more), with a progress bar. A few
//! keys are cached already (not queried), a few have no row, and one batch fails.
//!
//! Run: `cargo run -p tierstack --example warm`

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tierstack::TieredCache;
use tierstack::warm::Warmer;

const USERS: u64 = 20_000;

/// `SELECT id, profile FROM users WHERE id = ANY($1)`: 5 ms a query; users 13,000 to 13,199
/// make it fail; every hundredth user has no row.
async fn select_profiles(
    ids: Vec<String>,
    queries: &AtomicUsize,
) -> Result<HashMap<String, String>, std::io::Error> {
    queries.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(5)).await;
    if ids.iter().any(|id| id == "user:13000") {
        return Err(std::io::Error::other(
            "canceling statement due to statement timeout",
        ));
    }
    Ok(ids
        .into_iter()
        .filter(|id| !id.ends_with("00"))
        .map(|id| {
            let profile = format!("profile of {id}");
            (id, profile)
        })
        .collect())
}

#[tokio::main]
async fn main() -> Result<(), tierstack::CacheError> {
    let cache: TieredCache<String> = TieredCache::builder("profiles")
        .default_ttl(Duration::from_secs(3600))
        .build()?;
    for id in 0..500 {
        cache
            .set(&format!("user:{id}"), "cached earlier".into())
            .await?;
    }
    let bar = ProgressBar::new(USERS);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} keys, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let queries = AtomicUsize::new(0);
    let report = Warmer::new(&cache)
        .batch_size(200)
        .concurrency(4)
        .on_progress(|progress| {
            bar.set_position(progress.done);
            bar.set_message(format!(
                "{} loaded, {} cached, {} failed",
                progress.loaded, progress.cached, progress.failed
            ));
        })
        .run((0..USERS).map(|id| format!("user:{id}")), |ids| {
            select_profiles(ids, &queries)
        })
        .await;
    bar.finish();
    println!(
        "warmed in {:.2?} with {} queries: {} loaded, {} cached already, {} without a row, {} \
         failed (first: {:?}; retry e.g. {:?})",
        report.took,
        queries.load(Ordering::Relaxed),
        report.progress.loaded,
        report.progress.cached,
        report.progress.absent,
        report.progress.failed,
        report.first_error.map(|error| error.to_string()),
        report.failed_keys.first(),
    );
    Ok(())
}
