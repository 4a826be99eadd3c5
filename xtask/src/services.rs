//! Test servers on free loopback ports: Redis standalone, a 3-master Redis Cluster, and the
//! Firestore emulator.
//!
//! Each server runs in its own process group, so that stopping it also stops its children (the
//! Firestore emulator's Java process outlives the `gcloud` wrapper otherwise). `services up`
//! records the groups in `target/services/state` for `services down`; `ci` and `bench` hold a
//! [`Services`] whose `Drop` stops what it started.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cmd::{describe, on_path, target_dir};

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

/// Servers started by this process; dropped, it stops them.
pub(crate) struct Services {
    groups: Vec<(String, u32)>,
    /// The group leaders this process spawned; reaped when stopped (an exited, unreaped child
    /// is a zombie that still looks alive to `kill -0`).
    children: Vec<std::process::Child>,
    env: Vec<(String, String)>,
    keep: bool,
}

impl Services {
    /// Starts each server in `which`. On failure, stops what was already started.
    pub(crate) fn start(which: &[Which]) -> Result<Self, String> {
        let mut services = Self {
            groups: Vec::new(),
            children: Vec::new(),
            env: Vec::new(),
            keep: false,
        };
        for service in which {
            match service {
                Which::Redis => services.start_redis()?,
                Which::RedisCluster => services.start_redis_cluster()?,
                Which::Firestore => services.start_firestore()?,
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

    fn spawn(&mut self, name: &str, command: &mut Command) -> Result<(), String> {
        let dir = services_dir().join(name);
        // A fresh folder: a cluster node must not find an old run's nodes.conf.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = fs::File::create(dir.join("server.log"))
            .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", describe(command)))?;
        self.groups.push((name.to_owned(), child.id()));
        self.children.push(child);
        Ok(())
    }

    fn start_redis(&mut self) -> Result<(), String> {
        require("redis-server", "apt-get install redis-server")?;
        let port = free_port(false)?;
        self.spawn("redis", redis_command(port).args(["--appendonly", "no"]))?;
        wait_for_redis(port, "PING", "+PONG")?;
        self.env
            .push(("REDIS_URL".into(), format!("redis://127.0.0.1:{port}/")));
        Ok(())
    }

    fn start_redis_cluster(&mut self) -> Result<(), String> {
        require("redis-server", "apt-get install redis-server")?;
        require("redis-cli", "apt-get install redis-tools")?;
        let mut ports = Vec::new();
        for _ in 0..3 {
            // A cluster node also listens on its port + 10000 (the cluster bus).
            let port = free_port(true)?;
            let name = format!("redis-cluster-{port}");
            let mut command = redis_command(port);
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--appendonly",
                "no",
            ]);
            self.spawn(&name, &mut command)?;
            ports.push(port);
        }
        for port in &ports {
            wait_for_redis(*port, "PING", "+PONG")?;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &ports {
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
        for port in &ports {
            wait_for_redis(*port, "CLUSTER INFO", "cluster_state:ok")?;
        }
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect();
        self.env
            .push(("TIERSTACK_REDIS_CLUSTER_URLS".into(), urls.join(",")));
        Ok(())
    }

    fn start_firestore(&mut self) -> Result<(), String> {
        require(
            "gcloud",
            "install the Google Cloud CLI with its Firestore emulator \
             (Debian: apt-get install google-cloud-cli google-cloud-cli-firestore-emulator; \
             or gcloud components install cloud-firestore-emulator) and Java 11+",
        )?;
        let port = free_port(false)?;
        let mut command = Command::new("gcloud");
        command
            .args(["emulators", "firestore", "start"])
            .arg(format!("--host-port=127.0.0.1:{port}"))
            .env("CLOUDSDK_CORE_DISABLE_PROMPTS", "1");
        self.spawn("firestore", &mut command)?;
        wait_for_http_ok(port, Duration::from_secs(90))?;
        self.env.push((
            "FIRESTORE_EMULATOR_HOST".into(),
            format!("127.0.0.1:{port}"),
        ));
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let project = format!("tierstack-test-{}", nanos % 1_000_000_000);
        warm_up_firestore(port, &project, Duration::from_secs(90))?;
        self.env.push(("FIRESTORE_PROJECT_ID".into(), project));
        Ok(())
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if !self.keep {
            let mut children = std::mem::take(&mut self.children);
            for (name, group) in self.groups.drain(..).rev() {
                let leader = children.iter_mut().find(|c| c.id() == group);
                stop_group(&name, group, leader);
            }
        }
    }
}

fn redis_command(port: u16) -> Command {
    let mut command = Command::new("redis-server");
    command.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--protected-mode",
        "yes",
    ]);
    command
}

fn require(program: &str, install: &str) -> Result<(), String> {
    if on_path(program) {
        Ok(())
    } else {
        Err(format!(
            "`{program}` is not installed, and the tests need it: {install}"
        ))
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

/// A port free on 127.0.0.1 (and, for cluster nodes, with port + 10000 free too).
fn free_port(with_bus: bool) -> Result<u16, String> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        if !with_bus {
            return Ok(port);
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free loopback port found".into())
}

/// Sends one inline command until the reply contains `expect`, for up to 15 s.
fn wait_for_redis(port: u16, command: &str, expect: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            if stream
                .write_all(format!("{command}\r\n").as_bytes())
                .is_ok()
            {
                let mut reply = [0u8; 4096];
                if let Ok(n) = stream.read(&mut reply)
                    && String::from_utf8_lossy(&reply[..n]).contains(expect)
                {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "redis on port {port} did not answer `{command}` with {expect:?} within 15 s"
            ));
        }
        sleep(Duration::from_millis(100));
    }
}

/// Sends one HTTP/1.1 request to 127.0.0.1:`port`; whether the reply's status is 200. Only
/// the first read is looked at: the status line is all we need, and the emulator may keep the
/// connection open.
fn answers_200(port: u16, request: &str, read_timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let mut reply = [0u8; 512];
    stream.set_read_timeout(Some(read_timeout)).is_ok()
        && stream.write_all(request.as_bytes()).is_ok()
        && stream
            .read(&mut reply)
            .is_ok_and(|read| reply[..read].starts_with(b"HTTP/1.1 200"))
}

/// Polls `GET /` until the emulator answers 200.
fn wait_for_http_ok(port: u16, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let request = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    while !answers_200(port, &request, Duration::from_secs(2)) {
        if Instant::now() > deadline {
            return Err(format!(
                "the Firestore emulator on port {port} did not come up within {limit:?} \
                 (see target/services/firestore/server.log)"
            ));
        }
        sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// Writes a document through the emulator's REST API until three writes in a row are answered
/// within a second. A fresh emulator answers `GET /` long before its first writes: the first
/// ones set the database up and warm the JVM, and tests sent then saw 15 s stalls.
fn warm_up_firestore(port: u16, project: &str, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let path =
        format!("/v1/projects/{project}/databases/(default)/documents/tierstack_warmup/warmup");
    let body = r#"{"fields":{"ready":{"booleanValue":true}}}"#;
    // `Bearer owner` is the emulator's admin credential: no security rules apply.
    let request = format!(
        "PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Authorization: Bearer owner\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut quick_answers = 0;
    while quick_answers < 3 {
        let started = Instant::now();
        if !answers_200(port, &request, Duration::from_secs(30)) {
            quick_answers = 0;
            sleep(Duration::from_millis(250));
        } else if started.elapsed() < Duration::from_secs(1) {
            quick_answers += 1;
        } else {
            quick_answers = 0;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the Firestore emulator on port {port} did not answer writes promptly within \
                 {limit:?} (see target/services/firestore/server.log)"
            ));
        }
    }
    Ok(())
}

/// Stops a process group: TERM, then KILL if it lingers. `leader` is reaped if this process
/// spawned it.
fn stop_group(name: &str, group: u32, mut leader: Option<&mut std::process::Child>) {
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !signal("-TERM") {
        return; // already gone
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(child) = leader.as_deref_mut() {
            let _ = child.try_wait();
        }
        if !signal("-0") {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    eprintln!("xtask: {name} (group {group}) ignored TERM; killing it");
    signal("-KILL");
    if let Some(child) = leader {
        let _ = child.wait();
    }
}

/// `cargo xtask services up WHICH`: starts the servers and leaves them running.
pub(crate) fn up_command(which: &str) -> Result<(), String> {
    let which = Which::parse(which)?;
    let mut services = Services::start(&which)?;
    let mut state = fs::read_to_string(state_file()).unwrap_or_default();
    for (name, group) in &services.groups {
        let _ = writeln!(state, "{name} {group}");
    }
    fs::write(state_file(), state).map_err(|e| format!("cannot record the servers: {e}"))?;
    let mut env = fs::read_to_string(env_file()).unwrap_or_default();
    for (key, value) in &services.env {
        let _ = writeln!(env, "export {key}={value}");
        println!("export {key}={value}");
    }
    fs::write(env_file(), env).map_err(|e| format!("cannot write target/services.env: {e}"))?;
    eprintln!(
        "written to {}; stop with `cargo xtask services down`",
        env_file().display()
    );
    services.keep = true;
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
            let alive = Command::new("kill")
                .args(["-0", "--", &format!("-{}", group.trim())])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            println!("{name}: {}", if alive { "running" } else { "stopped" });
        }
    }
    if let Ok(env) = fs::read_to_string(env_file()) {
        print!("{env}");
    }
}
