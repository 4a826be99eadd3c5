//! Test servers on free loopback ports: Redis standalone, a 3-master Redis Cluster, and the
//! Firestore emulator, started by `tierstack-test-support` as the tests start their own.
//!
//! `services up` leaves them running and records their process groups in
//! `target/services/state` for `services down`; `ci` and `bench` hold a [`Services`] whose
//! `Drop` stops what it started.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;

use tierstack_test_support::Launch;
use tierstack_test_support::firestore::{self, FirestoreEmulator};
use tierstack_test_support::process::{group_alive, stop_group};
use tierstack_test_support::redis::{RedisCluster, RedisServer};

use crate::cmd::target_dir;

/// A kind of test server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Redis,
    RedisCluster,
    Firestore,
}

impl Which {
    fn parse(name: &str) -> Result<Vec<Self>, String> {
        match name {
            "all" => Ok(vec![Self::Redis, Self::RedisCluster, Self::Firestore]),
            "redis" => Ok(vec![Self::Redis]),
            "redis-cluster" => Ok(vec![Self::RedisCluster]),
            "firestore" => Ok(vec![Self::Firestore]),
            other => Err(format!(
                "unknown service {other:?}: expected all, redis, redis-cluster or firestore"
            )),
        }
    }
}

/// Servers started by this process; dropped, it stops them (unless [kept](Self::keep)).
pub(crate) struct Services {
    redis: Option<RedisServer>,
    cluster: Option<RedisCluster>,
    firestore: Option<FirestoreEmulator>,
    env: Vec<(String, String)>,
}

impl Services {
    /// Starts each server in `which`, stopped when this value drops (or, by a watchdog, when
    /// this process exits). On failure, stops what was already started.
    pub(crate) fn start(which: &[Which]) -> Result<Self, String> {
        Self::launch(which, false)
    }

    fn launch(which: &[Which], detached: bool) -> Result<Self, String> {
        prune_stopped();
        let launch = Launch {
            root: services_dir(),
            detached,
            // Kept: the logs tell what happened to a run.
            scratch: false,
        };
        let mut services = Self {
            redis: None,
            cluster: None,
            firestore: None,
            env: Vec::new(),
        };
        for service in which {
            match service {
                Which::Redis => {
                    let redis = RedisServer::start(&launch, &[])?;
                    services.env.push(("REDIS_URL".into(), redis.url()));
                    services.redis = Some(redis);
                }
                Which::RedisCluster => {
                    let cluster = RedisCluster::start(&launch)?;
                    let urls = cluster.urls().join(",");
                    services
                        .env
                        .push(("TIERSTACK_REDIS_CLUSTER_URLS".into(), urls));
                    services.cluster = Some(cluster);
                }
                Which::Firestore => {
                    let emulator = FirestoreEmulator::start(&launch)?;
                    let project = firestore::unique_project();
                    emulator.warm_up(&project)?;
                    services
                        .env
                        .push(("FIRESTORE_EMULATOR_HOST".into(), emulator.host()));
                    services.env.push(("FIRESTORE_PROJECT_ID".into(), project));
                    services.firestore = Some(emulator);
                }
            }
        }
        Ok(services)
    }

    /// Passes the servers' addresses to `command`'s environment.
    pub(crate) fn apply_env(&self, command: &mut Command) {
        for (key, value) in &self.env {
            command.env(key, value);
        }
    }

    /// Every server's name and process group, to stop them later.
    fn record(&self) -> Vec<(String, u32)> {
        let mut groups = Vec::new();
        groups.extend(self.redis.iter().flat_map(RedisServer::record));
        groups.extend(self.cluster.iter().flat_map(RedisCluster::record));
        groups.extend(self.firestore.iter().flat_map(FirestoreEmulator::record));
        groups
    }

    /// Leaves every server running.
    fn keep(self) {
        self.redis.map(RedisServer::keep);
        self.cluster.map(RedisCluster::keep);
        self.firestore.map(FirestoreEmulator::keep);
    }
}

/// Removes the folders (and logs) of servers no longer running: each folder under
/// `target/services` is named for its server's port (`redis-6390`), and one whose port nothing
/// listens on is a stopped server's. A server still running (`services up`, or another `ci`)
/// keeps its folder.
fn prune_stopped() {
    let Ok(entries) = fs::read_dir(services_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let port = name
            .to_str()
            .and_then(|name| name.rsplit_once('-'))
            .and_then(|(_, port)| port.parse::<u16>().ok());
        let stopped = port.is_some_and(|port| TcpStream::connect(("127.0.0.1", port)).is_err());
        if entry.path().is_dir() && stopped {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn services_dir() -> PathBuf {
    target_dir().join("services")
}

fn state_file() -> PathBuf {
    services_dir().join("state")
}

fn env_file() -> PathBuf {
    target_dir().join("services.env")
}

/// `cargo xtask services up WHICH`: starts the servers and leaves them running.
pub(crate) fn up_command(which: &str) -> Result<(), String> {
    let which = Which::parse(which)?;
    let services = Services::launch(&which, true)?;
    let env_lines: Vec<String> = services
        .env
        .iter()
        .map(|(key, value)| format!("export {key}={value}"))
        .collect();
    let mut state = fs::read_to_string(state_file()).unwrap_or_default();
    for (name, group) in services.record() {
        let _ = writeln!(state, "{name} {group}");
    }
    // Recorded first: if this fails, dropping `services` stops them.
    fs::write(state_file(), state).map_err(|e| format!("cannot record the servers: {e}"))?;
    services.keep();
    let mut env = fs::read_to_string(env_file()).unwrap_or_default();
    for line in env_lines {
        println!("{line}");
        let _ = writeln!(env, "{line}");
    }
    fs::write(env_file(), env).map_err(|e| format!("cannot write target/services.env: {e}"))?;
    eprintln!(
        "written to {}; stop with `cargo xtask services down`",
        env_file().display()
    );
    Ok(())
}

/// `cargo xtask services down`: stops every server `services up` started.
pub(crate) fn down() {
    let state = fs::read_to_string(state_file()).unwrap_or_default();
    for line in state.lines() {
        if let Some((name, group)) = line.split_once(' ')
            && let Ok(group) = group.trim().parse()
        {
            stop_group(name, group, None);
            eprintln!("stopped {name}");
        }
    }
    let _ = fs::remove_file(state_file());
    let _ = fs::remove_file(env_file());
}

/// `cargo xtask services status`: lists the recorded servers and whether they still run.
pub(crate) fn status() {
    let state = fs::read_to_string(state_file()).unwrap_or_default();
    if state.trim().is_empty() {
        println!("no servers started by `cargo xtask services up`");
    }
    for line in state.lines() {
        if let Some((name, group)) = line.split_once(' ') {
            let alive = group.trim().parse().is_ok_and(group_alive);
            println!("{name}: {}", if alive { "running" } else { "stopped" });
        }
    }
    if let Ok(env) = fs::read_to_string(env_file()) {
        print!("{env}");
    }
}
