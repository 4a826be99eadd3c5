//! Domain events invalidating what was derived from an entity, on every instance: "user 7
//! updated" drops the user's profile and everything cached under `user:7:`, "organisation 2
//! renamed" drops every member listing of the organisation. Two service instances share an L2
//! and a backplane (the embedded default: a `MokaStore` and an in-memory bus).
//!
//! Keys are laid out so that an entity's derived entries share a prefix. An entry derived from
//! two entities (`user:7:permissions:org:2`) is reached only through the prefix of one of them:
//! tags (an entry carrying every entity it was derived from, whatever its key) are still to
//! come.
//!
//! Run: `cargo run -p tierstack --example domain_events`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tierstack::core::testkit::MemoryBus;
use tierstack::moka::MokaStore;
use tierstack::{CacheEvent, TieredCache};

/// What the rest of the system announces (from a message queue, an outbox table, a webhook).
#[derive(Debug)]
enum DomainEvent {
    UserUpdated { user: u64 },
    OrganisationRenamed { organisation: u64 },
}

/// Applies an event to the cache: the entries derived from the entity, by key and by prefix.
/// Any one instance applies it; the backplane takes it to the others.
async fn apply(
    cache: &TieredCache<String>,
    event: &DomainEvent,
) -> Result<(), tierstack::CacheError> {
    match event {
        DomainEvent::UserUpdated { user } => {
            cache.delete(&format!("user:{user}")).await?;
            cache.delete_prefix(&format!("user:{user}:")).await?;
        }
        DomainEvent::OrganisationRenamed { organisation } => {
            cache.delete_prefix(&format!("org:{organisation}:")).await?;
        }
    }
    Ok(())
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
    cache
        .get_or_load(key, || async move { Ok(database.query(&what)) })
        .await
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
        "user:7:settings",
        "user:7:permissions:org:2",
        "user:8",
        "org:2:members",
        "org:2:members:admins",
        "org:3:members",
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
    ] {
        apply(&first, &event).await?;
        println!("applied {event:?} on the first instance");
    }
    // The three invalidations (a key, two prefixes) reach the second instance.
    let mut received = 0;
    while received < 3 {
        if let CacheEvent::InvalidationReceived = heard.recv().await? {
            received += 1;
        }
    }
    let before = database.queries.load(Ordering::SeqCst);
    for key in keys {
        println!(
            "  the second instance reads {key:<26} {}",
            read(&second, &database, key).await?
        );
    }
    println!(
        "{} queries to reload what the events touched; user:8 and org:3 stayed cached",
        database.queries.load(Ordering::SeqCst) - before
    );
    Ok(())
}
