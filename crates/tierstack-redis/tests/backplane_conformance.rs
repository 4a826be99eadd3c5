//! `RedisBackplane` passes the core backplane conformance suite on a real redis-server (listening
//! on its publishing RESP3 connection, and on a dedicated pub/sub connection) and on a real
//! 3-master Redis Cluster.
//!
//! Each member of a harness connects as an ACL user of its own, on the harness's own channel (its
//! key prefix), so that the cases can share the servers: a member's lost subscription is its
//! user's subscribed connections killed while the user may not subscribe, and a restored one is
//! the right to subscribe given back (the backplane resubscribes by itself).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tierstack_core::Backplane;
use tierstack_core::testkit::backplane_conformance::{BackplaneHarness, SubscriptionOutage};
use tierstack_redis::{RedisBackplane, RedisConfig};

/// An ACL user on every node of one deployment, whose subscriptions can be lost on command.
/// Dropped, it is deleted (which also closes its connections).
#[derive(Debug)]
struct AclUser {
    name: String,
    nodes: Vec<String>,
}

const PASSWORD: &str = "conformance";
/// The longest an admin command (an ACL change, a kill) may take.
const ADMIN_LIMIT: Duration = Duration::from_secs(10);

impl AclUser {
    async fn create(nodes: &[String]) -> Self {
        let user = Self {
            name: format!("bpconf-{:016x}", random_id()),
            nodes: nodes.to_vec(),
        };
        let password = format!(">{PASSWORD}");
        user.on_every_node(&[
            "ACL", "SETUSER", &user.name, "on", &password, "~*", "&*", "+@all",
        ])
        .await;
        user
    }

    /// The deployment's config for this user.
    fn config(&self, config: RedisConfig) -> RedisConfig {
        config.credentials(Some(&self.name), PASSWORD)
    }

    /// Runs an admin command on every node (as the default user), within a bound.
    async fn on_every_node(&self, args: &[&str]) {
        for node in &self.nodes {
            let run = async {
                let client = redis::Client::open(node.as_str())?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                let mut command = redis::cmd(args[0]);
                for arg in &args[1..] {
                    command.arg(*arg);
                }
                command.query_async::<redis::Value>(&mut connection).await
            };
            tokio::time::timeout(ADMIN_LIMIT, run)
                .await
                .unwrap_or_else(|_| panic!("{args:?} on {node}: no answer within {ADMIN_LIMIT:?}"))
                .unwrap_or_else(|e| panic!("{args:?} on {node}: {e}"));
        }
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        for node in &self.nodes {
            // Best effort: a user left behind on a test server harms nothing.
            let deleted = redis::Client::open(node.as_str())
                .and_then(|client| client.get_connection_with_timeout(ADMIN_LIMIT))
                .and_then(|mut connection| {
                    connection.set_read_timeout(Some(ADMIN_LIMIT))?;
                    redis::cmd("ACL")
                        .arg("DELUSER")
                        .arg(&self.name)
                        .query::<redis::Value>(&mut connection)
                });
            if let Err(error) = deleted {
                eprintln!("cannot delete ACL user {} on {node}: {error}", self.name);
            }
        }
    }
}

/// The users of a harness's members, in the members' order.
#[derive(Debug)]
struct Users(Vec<AclUser>);

#[async_trait]
impl SubscriptionOutage for Users {
    async fn lose(&self, member: usize) {
        let user = &self.0[member];
        user.on_every_node(&["ACL", "SETUSER", &user.name, "-subscribe"])
            .await;
        user.on_every_node(&["CLIENT", "KILL", "USER", &user.name, "TYPE", "pubsub"])
            .await;
    }

    async fn restore(&self, member: usize) {
        let user = &self.0[member];
        user.on_every_node(&["ACL", "SETUSER", &user.name, "+subscribe"])
            .await;
    }
}

/// An id no other harness holds: `RandomState` draws fresh keys for each call.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    hasher.finish()
}

/// Three backplanes of `config` on a channel of their own, each as a user of its own.
async fn harness(nodes: &[String], config: RedisConfig) -> BackplaneHarness {
    let config = config.key_prefix(&common::unique_prefix("bpconf"));
    let mut members: Vec<Arc<dyn Backplane>> = Vec::new();
    let mut users = Vec::new();
    for _ in 0..3 {
        let user = AclUser::create(nodes).await;
        let backplane = RedisBackplane::connect(&user.config(config.clone()))
            .await
            .unwrap();
        members.push(Arc::new(backplane));
        users.push(user);
    }
    BackplaneHarness::new(members, Users(users))
}

mod resp3 {
    use super::*;

    pub(super) async fn harness() -> BackplaneHarness {
        let url = common::redis_url();
        let config = RedisConfig::from_url(&url).unwrap().resp3_backplane(true);
        super::harness(&[url], config).await
    }

    tierstack_core::backplane_conformance_tests!(harness);
}

mod dedicated {
    use super::*;

    pub(super) async fn harness() -> BackplaneHarness {
        let url = common::redis_url();
        let config = RedisConfig::from_url(&url).unwrap().resp3_backplane(false);
        super::harness(&[url], config).await
    }

    tierstack_core::backplane_conformance_tests!(harness);
}

mod cluster {
    use super::*;

    pub(super) async fn harness() -> BackplaneHarness {
        let urls = common::cluster_urls();
        let config = RedisConfig::cluster(&urls).unwrap();
        super::harness(&urls, config).await
    }

    tierstack_core::backplane_conformance_tests!(harness);
}
