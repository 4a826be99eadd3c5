//! `RedisStore` passes the core conformance suite against a real redis-server and a real
//! 3-master Redis Cluster.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use tierstack_core::testkit::conformance::{Harness, TimeControl};
use tierstack_redis::{RedisConfig, RedisStore};

async fn harness() -> Harness {
    Harness::new(
        Arc::new(common::standalone("conformance").await),
        TimeControl::Real,
    )
}

tierstack_core::store_conformance_tests!(harness);

mod cluster {
    use super::*;

    pub(super) async fn harness() -> Harness {
        let config = RedisConfig::cluster(&common::cluster_urls())
            .unwrap()
            .key_prefix(&common::unique_prefix("cluster"));
        let store = RedisStore::connect(&config).await.unwrap();
        Harness::new(Arc::new(store), TimeControl::Real)
    }

    tierstack_core::store_conformance_tests!(harness);
}
