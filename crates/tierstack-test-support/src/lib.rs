//! The servers tierstack's tests run against, started on free loopback ports and stopped again.
//!
//! Every server runs in a process group of its own (the Firestore emulator's Java process
//! outlives its `gcloud` wrapper otherwise), so stopping the group stops all of it. A server
//! started for tests is also watched: when the process that started it exits, however it exits,
//! a small watchdog stops the group. Only `cargo xtask services up` starts servers detached, to
//! outlive it until `cargo xtask services down`.
//!
//! A test asks for the server of its run ([`redis::redis_url`], [`redis::cluster_urls`],
//! [`firestore::emulator`]): the one named by the environment (`cargo xtask ci` starts them
//! once for every test binary), or else one this process starts for itself.

pub mod firestore;
pub mod process;
pub mod redis;

/// Where a server keeps its files and its log, and whether it outlives this process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// A folder of its own is made under it for each server.
    pub root: std::path::PathBuf,
    /// Left running when this process exits (`cargo xtask services up`); otherwise a watchdog
    /// stops it then.
    pub detached: bool,
    /// The server's folder (its log included) is removed when it stops.
    pub scratch: bool,
}

impl Launch {
    /// Servers of a test process: in folders of the system's temporary folder, stopped and
    /// removed when the process exits.
    pub fn for_tests() -> Self {
        Self {
            root: std::env::temp_dir(),
            detached: false,
            scratch: true,
        }
    }
}
