//! A dataset kept fresh on two service instances: tool configurations per agent, re-read from a
//! (simulated) database every half second. The database changes, goes down for a few seconds
//! (the last good data is served, the refresher backs off) and comes back. Runs on the embedded
//! default: a `MokaStore` stands in for the shared L2, an in-memory bus for pub/sub.
//!
//! Run: `cargo run -p tierstack --example refreshing_dataset`

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tierstack::TieredCache;
use tierstack::core::testkit::MemoryBus;
use tierstack::dataset::{Dataset, DatasetEvent};
use tierstack::moka::MokaStore;

const EVERY: Duration = Duration::from_millis(500);

/// The database table `agent_tools`: agent id -> its tool configuration.
#[derive(Clone, Default)]
struct Database {
    rows: Arc<Mutex<HashMap<String, String>>>,
    down: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
}

impl Database {
    fn update(&self, agent: &str, tools: &str) {
        let mut rows = self
            .rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rows.insert(agent.into(), tools.into());
    }

    /// `SELECT agent_id, tools FROM agent_tools`.
    fn select_all(&self) -> Result<HashMap<String, String>, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("connection refused"));
        }
        let rows = self
            .rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(rows.clone())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let database = Database::default();
    for agent in 1..=100 {
        database.update(&format!("agent:{agent}"), "search, calendar");
    }
    let l2 = Arc::new(MokaStore::new(64 << 20));
    let bus = MemoryBus::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let cache: TieredCache<String> = TieredCache::builder("agent-tools")
            .l2(l2.clone())
            .backplane(Arc::new(bus.backplane()))
            .build()?;
        let db = database.clone();
        let tools = Dataset::builder(cache, move || std::future::ready(db.select_all()))
            .refresh_every(EVERY)
            // Retries after 50 ms, doubling up to 700 ms (under the lease's 750 ms, so that the
            // refresher keeps it through the outage).
            .backoff(Duration::from_millis(50), Duration::from_millis(700))
            .start()
            .await?;
        instances.push(tools);
    }
    let [first, second] = <[_; 2]>::try_from(instances).map_err(|_| "two instances")?;
    let (first, second) = (Arc::new(first), Arc::new(second));
    println!(
        "started: {} entries; the first instance is the {:?}, the second the {:?}; {} query",
        first.state().entries,
        first.state().role,
        second.state().role,
        database.queries.load(Ordering::SeqCst)
    );
    // What each instance does, as it happens.
    for (name, dataset) in [("first", &first), ("second", &second)] {
        let (mut events, reader) = (dataset.events(), Arc::clone(&second));
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                match event {
                    DatasetEvent::RefreshFailed {
                        consecutive_failures,
                        retry_in,
                        ..
                    } => println!(
                        "  {name}: refresh failed ({consecutive_failures} in a row), next in \
                         {retry_in:.2?}; agent:7 still reads {:?}",
                        reader.get("agent:7").await.ok().flatten()
                    ),
                    DatasetEvent::Refreshed(report) if report.changed > 0 => println!(
                        "  {name}: refreshed {} entries, {} changed, in {:.2?}",
                        report.entries, report.changed, report.took
                    ),
                    _ => {}
                }
            }
        });
    }

    database.update("agent:7", "search, calendar, browser");
    tokio::time::sleep(EVERY * 2).await;
    println!(
        "agent:7 changed in the database; the second instance reads {:?}",
        second.get("agent:7").await?
    );

    println!(
        "the database goes down for 3 s (after three failures in a row, the refresher \
              lets the lease go for the other to try):"
    );
    database.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("the database is back");
    database.down.store(false, Ordering::SeqCst);
    database.update("agent:8", "calendar");
    tokio::time::sleep(EVERY * 2).await;
    let state = second.state();
    println!(
        "second instance: generation {}, {} entries, agent:8 = {:?}, {} failures in a row",
        state.generation,
        state.entries,
        second.get("agent:8").await?,
        state.consecutive_failures
    );
    println!(
        "{} queries in all for two instances",
        database.queries.load(Ordering::SeqCst)
    );
    first.shutdown().await;
    second.shutdown().await;
    Ok(())
}
