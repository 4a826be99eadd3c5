//! Domain events invalidating what was derived from an entity, on every instance. Two service
//! instances share an L2 and a backplane (the embedded default: a `MokaStore` and an in-memory
//! bus).
//!
//! - Tags: each entry carries the entities it was derived from, whatever its key. "User 7
//!   updated" invalidates the tag `user:7`: the user's profile goes, and so does the dashboard
//!   derived from user 7 *and* organisation 2; "organisation 2 renamed" invalidates `org:2`.
//! - Prefixes: where an entity's entries share a key prefix, a prefix delete reaches them too:
//!   "agent 3 reconfigured" drops everything under `agent:3:`.
//!
//! Run: `cargo run -p tierstack --example domain_events`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::core::testkit::MemoryBus;
use tierstack::moka::MokaStore;
use tierstack::{CacheEvent, Loaded, TieredCache};

/// What the rest of the system announces (from a message queue, an outbox table, a webhook).
#[derive(Debug)]
enum DomainEvent {
    UserUpdated { user: u64 },
    OrganisationRenamed { organisation: u64 },
    AgentReconfigured { agent: u64 },
}

/// Applies an event to the cache: the entries derived from the entity, by tag or by prefix.
/// Any one instance applies it; the backplane takes it to the others.
async fn apply(
    cache: &TieredCache<String>,
    event: &DomainEvent,
) -> Result<(), tierstack::CacheError> {
    match event {
        DomainEvent::UserUpdated { user } => cache.invalidate_tag(&format!("user:{user}")).await,
        DomainEvent::OrganisationRenamed { organisation } => {
            cache.invalidate_tag(&format!("org:{organisation}")).await
        }
        DomainEvent::AgentReconfigured { agent } => cache
            .delete_prefix(&format!("agent:{agent}:"))
            .await
            .map(|_| ()),
    }
}

/// The entities an entry is derived from: its tags.
fn derived_from(key: &str) -> Vec<String> {
    match key {
        "dashboard:7" => vec!["user:7".into(), "org:2".into()],
        "org:2:members" => vec!["org:2".into()],
        "org:3:members" => vec!["org:3".into()],
        user if user.starts_with("user:") => vec![user.into()],
        _ => Vec::new(),
    }
}

/// The origin: counts its queries, and answers with the version of the data it is at.
#[derive(Default)]
struct Database {
    queries: AtomicUsize,
    version: AtomicUsize,
}

impl Database {
    fn query(&self, what: &str) -> String {
        self.queries.fetch_add(1, Ordering::SeqCst);
        format!("{what} (v{})", self.version.load(Ordering::SeqCst))
    }
}

async fn read(
    cache: &TieredCache<String>,
    database: &Arc<Database>,
    key: &str,
) -> Result<String, tierstack::LoadError<std::io::Error>> {
    let (database, what) = (Arc::clone(database), key.to_owned());
    let options = cache.default_options();
    let fetched = cache
        .get_or_load_with(key, &options, move || async move {
            let tags = derived_from(&what);
            Ok(Loaded::new(database.query(&what)).with_tags(tags))
        })
        .await?;
    Ok(fetched.value)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let l2 = Arc::new(MokaStore::new(64 << 20));
    let bus = MemoryBus::new();
    let instance = || {
        TieredCache::<String>::builder("app")
            .l2(l2.clone())
            .backplane(Arc::new(bus.backplane()))
            .default_ttl(Duration::from_secs(600))
            .build()
    };
    let (first, second) = (instance()?, instance()?);
    let database = Arc::new(Database::default());
    let keys = [
        "user:7",
        "user:8",
        "dashboard:7",
        "org:2:members",
        "org:3:members",
        "agent:3:config",
        "agent:3:tools",
        "agent:4:config",
    ];
    for key in keys {
        read(&first, &database, key).await?;
    }
    // Loaded values reach the L2 in the background; the second instance reads them there.
    first.wait_for_background_fills().await;
    for key in keys {
        read(&second, &database, key).await?;
    }
    println!(
        "{} entries cached on both instances with {} queries",
        keys.len(),
        database.queries.load(Ordering::SeqCst)
    );

    database.version.fetch_add(1, Ordering::SeqCst);
    let mut heard = second.events();
    for event in [
        DomainEvent::UserUpdated { user: 7 },
        DomainEvent::OrganisationRenamed { organisation: 2 },
        DomainEvent::AgentReconfigured { agent: 3 },
    ] {
        apply(&first, &event).await?;
        println!("applied {event:?} on the first instance");
    }
    // The three invalidations (two tags, a prefix) reach the second instance.
    let mut received = 0;
    while received < 3 {
        if let CacheEvent::InvalidationReceived = heard.recv().await? {
            received += 1;
        }
    }
    let before = database.queries.load(Ordering::SeqCst);
    for key in keys {
        println!(
            "  the second instance reads {key:<16} {}",
            read(&second, &database, key).await?
        );
    }
    println!(
        "{} queries to reload what the events touched; user:8, org:3 and agent:4 stayed cached",
        database.queries.load(Ordering::SeqCst) - before
    );
    Ok(())
}
