//! Redis: a standalone server (plain or TLS), a three-primary cluster, and the servers of a
//! test run.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::Launch;
use crate::process::{ServerProcess, free_port, free_ports, require};

/// How to get `redis-server` and `redis-cli`.
pub const INSTALL: &str = "apt-get install redis-server (redis-cli comes with it)";

/// The standalone server of this test run: `REDIS_URL` if set (`cargo xtask ci` starts one for
/// every test binary), else a server this process starts on first use, shared by its tests and
/// stopped when it exits.
///
/// # Panics
///
/// If the server cannot be started (the message says how to install it).
pub fn redis_url() -> String {
    static OWN: OnceLock<Result<RedisServer, String>> = OnceLock::new();
    if let Ok(url) = std::env::var("REDIS_URL") {
        return url;
    }
    match OWN.get_or_init(|| RedisServer::start(&Launch::for_tests(), &[])) {
        Ok(server) => server.url(),
        Err(error) => panic!("no Redis for the tests: {error}"),
    }
}

/// The cluster of this test run: `TIERSTACK_REDIS_CLUSTER_URLS` (comma-separated) if set, else
/// a cluster this process starts on first use, as [`redis_url`] does.
///
/// # Panics
///
/// If the cluster cannot be started (the message says how to install Redis).
pub fn cluster_urls() -> Vec<String> {
    static OWN: OnceLock<Result<RedisCluster, String>> = OnceLock::new();
    if let Ok(urls) = std::env::var("TIERSTACK_REDIS_CLUSTER_URLS") {
        return urls.split(',').map(str::to_owned).collect();
    }
    match OWN.get_or_init(|| RedisCluster::start(&Launch::for_tests())) {
        Ok(cluster) => cluster.urls(),
        Err(error) => panic!("no Redis Cluster for the tests: {error}"),
    }
}

/// A `redis-server` on a free loopback port, that keeps nothing on disk. Dropped, it stops.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    launch: Launch,
    extra: Vec<String>,
    tls_dir: Option<std::path::PathBuf>,
    process: Option<ServerProcess>,
}

impl RedisServer {
    /// Starts a server with the `extra` arguments (`--requirepass`, `--maxmemory`, ...) and
    /// waits until it answers `PING`.
    pub fn start(launch: &Launch, extra: &[&str]) -> Result<Self, String> {
        Self::launch(launch, extra, None)
    }

    /// Starts a server that speaks TLS only, with the certificate files of `dir`
    /// (`server.crt`, `server.key`, `ca.crt`; clients are not asked for certificates), and
    /// waits until it accepts connections.
    pub fn start_tls(launch: &Launch, dir: &Path) -> Result<Self, String> {
        Self::launch(launch, &[], Some(dir.to_owned()))
    }

    fn launch(
        launch: &Launch,
        extra: &[&str],
        tls_dir: Option<std::path::PathBuf>,
    ) -> Result<Self, String> {
        require("redis-server", INSTALL)?;
        let mut server = Self {
            port: 0,
            launch: launch.clone(),
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            tls_dir,
            process: None,
        };
        // A port found free can be taken before the server binds it: try another.
        let mut attempts = 0;
        loop {
            server.port = free_port()?;
            match server.run() {
                Ok(()) => return Ok(server),
                Err(error) if attempts == 2 => return Err(error),
                Err(_) => attempts += 1,
            }
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        match &self.tls_dir {
            None => command.args(["--port", &port]),
            Some(dir) => {
                let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
                command
                    .args(["--port", "0", "--tls-port", &port])
                    .args(["--tls-cert-file", &file("server.crt")])
                    .args(["--tls-key-file", &file("server.key")])
                    .args(["--tls-ca-cert-file", &file("ca.crt")])
                    .args(["--tls-auth-clients", "no"])
            }
        };
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra);
        let name = format!("redis-{}", self.port);
        let mut process = ServerProcess::spawn(&self.launch, &name, &mut command)?;
        let (port, tls) = (self.port, self.tls_dir.is_some());
        // Up, and this server (not another that took the port): its pid is the group's leader.
        let pid = process
            .group()
            .ok_or_else(|| format!("{name} has no process to check"))?;
        let limit = Duration::from_secs(15);
        process.wait_ready(limit, || {
            if tls {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            } else {
                // `+PONG`, or `-NOAUTH` from a server with `--requirepass`: either way, up.
                reply(port, "PING").is_some()
            }
        })?;
        if !tls && !self.extra.iter().any(|arg| arg == "--requirepass") {
            let ours = reply(port, "INFO server")
                .is_some_and(|info| info.contains(&format!("process_id:{pid}\r\n")));
            if !ours {
                return Err(format!("another server answers on port {port}"));
            }
        }
        self.process = Some(process);
        Ok(())
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls_dir.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Kills the server and starts it again on the same port, empty.
    ///
    /// # Panics
    ///
    /// If it does not come back.
    pub fn restart(&mut self) {
        self.kill();
        self.run()
            .unwrap_or_else(|error| panic!("Redis did not restart: {error}"));
    }

    /// Runs a command on the server through `redis-cli`; its output.
    ///
    /// # Panics
    ///
    /// If `redis-cli` cannot be run.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): {INSTALL}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Its name and process group while it runs (see [`ServerProcess::record`]).
    pub fn record(&self) -> Vec<(String, u32)> {
        self.process
            .iter()
            .filter_map(ServerProcess::record)
            .collect()
    }

    /// Leaves the server running past this value (see [`ServerProcess::keep`]).
    pub fn keep(mut self) -> Option<(String, u32)> {
        self.process.take()?.keep()
    }
}

/// A Redis Cluster of three primaries (no replicas) on free loopback ports. Dropped, it stops.
#[derive(Debug)]
pub struct RedisCluster {
    ports: Vec<u16>,
    nodes: Vec<ServerProcess>,
}

impl RedisCluster {
    /// Starts three nodes, joins them into a cluster, and waits until every node says the
    /// cluster is ok.
    pub fn start(launch: &Launch) -> Result<Self, String> {
        require("redis-server", INSTALL)?;
        require("redis-cli", INSTALL)?;
        let mut cluster = Self {
            ports: free_ports(3, true)?,
            nodes: Vec::new(),
        };
        for &port in &cluster.ports {
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "5000"]);
            let name = format!("redis-cluster-{port}");
            let mut node = ServerProcess::spawn(launch, &name, &mut command)?;
            node.wait_ready(Duration::from_secs(15), || {
                reply(port, "PING").is_some_and(|pong| pong.contains("PONG"))
            })?;
            cluster.nodes.push(node);
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = create
            .output()
            .map_err(|e| format!("cannot run redis-cli: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&output.stdout)
            ));
        }
        for port in &cluster.ports {
            wait_for_reply(*port, "CLUSTER INFO", "cluster_state:ok")?;
        }
        Ok(cluster)
    }

    /// `redis://127.0.0.1:PORT/` of each node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}/"))
            .collect()
    }

    /// The nodes' names and process groups (see [`ServerProcess::record`]).
    pub fn record(&self) -> Vec<(String, u32)> {
        self.nodes
            .iter()
            .filter_map(ServerProcess::record)
            .collect()
    }

    /// Leaves the nodes running past this value (see [`ServerProcess::keep`]).
    pub fn keep(mut self) -> Vec<(String, u32)> {
        self.nodes
            .drain(..)
            .filter_map(ServerProcess::keep)
            .collect()
    }
}

/// The reply to one inline command sent to 127.0.0.1:`port` (its first read), unless there is
/// none or the server is still loading.
fn reply(port: u16, command: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut reply = [0u8; 8192];
    let read = stream.read(&mut reply).ok()?;
    let reply = String::from_utf8_lossy(&reply[..read]).into_owned();
    (read > 0 && !reply.starts_with("-LOADING")).then_some(reply)
}

/// Sends one inline command to 127.0.0.1:`port` until the reply contains `expect`, for up to
/// 15 s.
pub fn wait_for_reply(port: u16, command: &str, expect: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !reply(port, command).is_some_and(|reply| reply.contains(expect)) {
        if Instant::now() > deadline {
            return Err(format!(
                "redis on port {port} did not answer `{command}` with {expect:?} within 15 s"
            ));
        }
        sleep(Duration::from_millis(50)); // poll loop
    }
    Ok(())
}
