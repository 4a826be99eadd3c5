//! `session_load`: loading sessions through `TieredSessionStore` over Redis, with its L1 and
//! without, against a raw Redis `GET` and a JSON decode of the same record (tower-sessions'
//! own Redis store builds on fred, a second Redis client this workspace does not carry).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use redis::aio::ConnectionManager;
use tierstack_redis::RedisStore;
use tierstack_sessions::{TieredSessionStore, cache_builder};
use tower_sessions_core::SessionStore;
use tower_sessions_core::session::{Id, Record};

use crate::harness::{Record as Result, Sizes, Workload, interleave, records, run_round, shuffled};
use crate::redis_scenarios::{config, fail, raw_connection, run_prefix};

/// Sessions in the working set.
const SESSIONS: usize = 1_000;
const TASKS: usize = 64;

struct StoreLoad {
    store: TieredSessionStore,
    ids: Arc<Vec<Id>>,
}

impl Workload for StoreLoad {
    async fn op(&self, i: usize) {
        black_box(
            self.store
                .load(&self.ids[i % self.ids.len()])
                .await
                .ok()
                .flatten(),
        );
    }
}

struct RawLoad {
    conn: ConnectionManager,
    keys: Arc<Vec<String>>,
}

impl Workload for RawLoad {
    async fn op(&self, i: usize) {
        let mut conn = self.conn.clone();
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.keys[i % self.keys.len()])
            .query_async(&mut conn)
            .await
            .ok()
            .flatten();
        if let Some(bytes) = bytes {
            black_box(serde_json::from_slice::<Record>(&bytes).ok());
        }
    }
}

fn session() -> Record {
    let mut data = HashMap::new();
    data.insert("user".to_owned(), serde_json::json!("ada@example.com"));
    data.insert("visits".to_owned(), serde_json::json!(12));
    data.insert("roles".to_owned(), serde_json::json!(["reader", "writer"]));
    Record {
        id: Id::default(),
        data,
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(2),
    }
}

/// A store over Redis: with an L1, and the backplane that keeps it fresh; without, the store
/// alone (no L1 to invalidate).
async fn store(prefix: &str, with_l1: bool) -> TieredSessionStore {
    let builder = if with_l1 {
        let (redis, backplane) = RedisStore::connect_with_backplane(&config(prefix))
            .await
            .unwrap_or_else(|e| fail(e));
        cache_builder("sessions")
            .l2(Arc::new(redis))
            .backplane(Arc::new(backplane))
    } else {
        let redis = RedisStore::connect(&config(prefix))
            .await
            .unwrap_or_else(|e| fail(e));
        cache_builder("sessions").l2(Arc::new(redis)).without_l1()
    };
    TieredSessionStore::new(builder.build().unwrap_or_else(|e| fail(e)))
}

pub(crate) async fn session_load(sizes: &Sizes) -> Vec<Result> {
    let (with_l1, without_l1) = (
        store("bench-sessions:", true).await,
        store("bench-sessions:", false).await,
    );
    let mut raw = raw_connection().await;
    let mut ids = Vec::with_capacity(SESSIONS);
    let mut raw_keys = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let mut record = session();
        with_l1
            .create(&mut record)
            .await
            .unwrap_or_else(|e| fail(e));
        let raw_key = format!("{}bench-sessions-raw:{}", run_prefix(), record.id);
        let bytes = serde_json::to_vec(&record).unwrap_or_else(|e| fail(e));
        let _: () = redis::cmd("SET")
            .arg(&raw_key)
            .arg(bytes)
            .query_async(&mut raw)
            .await
            .unwrap_or_else(|e| fail(e));
        ids.push(record.id);
        raw_keys.push(raw_key);
    }
    let ids = Arc::new(ids);
    let systems = (
        Arc::new(StoreLoad {
            store: with_l1,
            ids: Arc::clone(&ids),
        }),
        Arc::new(StoreLoad {
            store: without_l1,
            ids,
        }),
        Arc::new(RawLoad {
            conn: raw,
            keys: Arc::new(raw_keys),
        }),
    );
    let order = shuffled(SESSIONS);
    let ops = sizes.redis_ops / TASKS;
    let rounds = interleave(3, sizes.rounds, |system| {
        let (systems, order) = (systems.clone(), Arc::clone(&order));
        async move {
            match system {
                0 => run_round(&systems.0, &order, TASKS, ops).await,
                1 => run_round(&systems.1, &order, TASKS, ops).await,
                _ => run_round(&systems.2, &order, TASKS, ops).await,
            }
        }
    })
    .await;
    records(
        "session_load/64task",
        &[
            "tierstack-sessions (L1)",
            "tierstack-sessions (no L1)",
            "redis GET + JSON decode",
        ],
        2,
        &rounds,
    )
}
