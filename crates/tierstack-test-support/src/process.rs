//! A server process in a group of its own, with its log, stopped by group.

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::Launch;

/// A running server: the leader of its process group. Dropped, it stops the group (unless
/// [kept](Self::keep)).
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    dir: PathBuf,
    scratch: bool,
    leader: Option<Child>,
    watchdog: Option<Watchdog>,
}

/// A shell, in a process group of its own and deaf to the terminal's signals, that waits on its
/// standard input: told `release`, it exits; if the pipe closes without a word (this process
/// exited, however: a panic, Ctrl-C, SIGKILL), it kills the server's group and removes its
/// scratch folder. Servers of a test process never outlive it.
#[derive(Debug)]
struct Watchdog {
    shell: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    fn start(group: u32, scratch: Option<&Path>) -> Result<Self, String> {
        let script = r#"trap '' INT QUIT TERM HUP
read word
[ "$word" = release ] && exit 0
kill -KILL "-$0" 2>/dev/null
[ -z "$1" ] || rm -rf -- "$1""#;
        let mut shell = Command::new("sh")
            .args(["-c", script])
            .arg(group.to_string())
            .arg(scratch.map(Path::as_os_str).unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the watchdog shell: {e}"))?;
        let stdin = shell.stdin.take();
        Ok(Self { shell, stdin })
    }

    /// Lets the shell go without it touching the server (which its owner stops itself).
    fn release(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"release\n");
        }
        let _ = self.shell.wait();
    }
}

impl ServerProcess {
    /// Starts `command` as `name`: in a new process group, in a fresh folder of its own under
    /// `launch.root` (its working directory), its output in `server.log` there.
    pub fn spawn(launch: &Launch, name: &str, command: &mut Command) -> Result<Self, String> {
        let dir = if launch.scratch {
            // The test process's id keeps runs of several test binaries apart.
            launch
                .root
                .join(format!("tierstack-test-{}-{name}", std::process::id()))
        } else {
            launch.root.join(name)
        };
        // A fresh folder (a cluster node must not find an old run's nodes.conf), made by this
        // call: `create_dir` fails rather than follow whatever another user put there.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&launch.root)
            .and_then(|()| fs::create_dir(&dir))
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = fs::File::create(dir.join("server.log"))
            .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let leader = command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", describe(command)))?;
        let group = leader.id();
        let mut server = Self {
            name: name.to_owned(),
            dir,
            scratch: launch.scratch,
            leader: Some(leader),
            watchdog: None,
        };
        if !launch.detached {
            let scratch = launch.scratch.then_some(server.dir.as_path());
            server.watchdog = Some(Watchdog::start(group, scratch)?);
        }
        Ok(server)
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its folder (working directory and `server.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The id of its process group (and of its leader).
    pub fn group(&self) -> Option<u32> {
        self.leader.as_ref().map(Child::id)
    }

    /// Its name and process group while it runs, to record (see [`stop_group`]).
    pub fn record(&self) -> Option<(String, u32)> {
        Some((self.name.clone(), self.group()?))
    }

    /// Polls `ready` until it holds, for up to `limit`. Fails early if the server exits, and
    /// on failure tells the end of its log.
    pub fn wait_ready(
        &mut self,
        limit: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(leader) = self.leader.as_mut()
                && let Ok(Some(status)) = leader.try_wait()
            {
                // Reaped: its id may be reused from now on, so nothing signals it any more.
                self.leader = None;
                if let Some(watchdog) = self.watchdog.take() {
                    watchdog.release();
                }
                return Err(self.failure(&format!("{} exited ({status})", self.name)));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("{} not ready within {limit:?}", self.name)));
            }
            sleep(Duration::from_millis(50)); // poll loop
        }
    }

    /// `what`, with the last lines of the server's log.
    fn failure(&self, what: &str) -> String {
        let log = match fs::read_to_string(self.dir.join("server.log")) {
            Ok(log) => log,
            Err(error) => return format!("{what}; its log cannot be read: {error}"),
        };
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("{what}; the end of its log:\n{tail}")
    }

    /// Stops the group at once (SIGKILL: no goodbye to clients, as a crash or a pulled cable).
    pub fn kill(&mut self) {
        self.end(|_, mut leader| {
            signal_group(leader.id(), "-KILL");
            let _ = leader.wait();
        });
    }

    /// Stops the group: TERM, then KILL if it lingers past 10 s.
    pub fn stop(&mut self) {
        self.end(|name, mut leader| stop_group(name, leader.id(), Some(&mut leader)));
    }

    /// Releases the watchdog first (the group is stopped here, by `stop`, while its leader is
    /// unreaped and its id cannot be reused), then removes a scratch folder.
    fn end(&mut self, stop: impl FnOnce(&str, Child)) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.release();
        }
        if let Some(leader) = self.leader.take() {
            stop(&self.name, leader);
            if self.scratch {
                let _ = fs::remove_dir_all(&self.dir);
            }
        }
    }

    /// Leaves the server running past this value: until this process exits if it is watched,
    /// for good if it was started detached. Answers its name and group, to stop it later with
    /// [`stop_group`].
    pub fn keep(mut self) -> Option<(String, u32)> {
        let group = self.group()?;
        self.leader = None;
        // Its pipe stays open until this process exits; then it stops the server.
        std::mem::forget(self.watchdog.take());
        Some((std::mem::take(&mut self.name), group))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `signal` (as `kill` names it: `-TERM`, `-KILL`, `-0`) to process group `group`;
/// whether it was delivered.
fn signal_group(group: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([signal, "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether process group `group` still has a live process.
pub fn group_alive(group: u32) -> bool {
    signal_group(group, "-0")
}

/// Stops process group `group` (named `name` in messages): TERM, then KILL if it lingers past
/// 10 s. `leader` is reaped if this process spawned it (an exited, unreaped child is a zombie
/// that still looks alive).
pub fn stop_group(name: &str, group: u32, mut leader: Option<&mut Child>) {
    if !signal_group(group, "-TERM") {
        return; // already gone
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(child) = leader.as_deref_mut() {
            let _ = child.try_wait();
        }
        if !group_alive(group) {
            return;
        }
        sleep(Duration::from_millis(50)); // poll loop
    }
    let _ = writeln!(
        std::io::stderr(),
        "{name} (group {group}) ignored TERM; killing it"
    );
    signal_group(group, "-KILL");
    if let Some(child) = leader {
        let _ = child.wait();
    }
}

/// A port free on 127.0.0.1, outside the kernel's ephemeral range (see [`free_ports`]).
pub fn free_port() -> Result<u16, String> {
    Ok(free_ports(1, false)?[0])
}

/// `count` distinct ports free on 127.0.0.1 (for cluster nodes, `with_bus`: each with port +
/// 10000, its cluster bus, free too). All are held until all are found, so that none is picked
/// twice or is another's bus port.
///
/// They lie outside the kernel's ephemeral range (`ip_local_port_range`): a server the tests
/// restart binds its port again, and while it is down the kernel could hand an ephemeral port
/// to an outgoing connection, or to a client reconnecting to that very port, which then
/// connects to itself (TCP's simultaneous open). Either holds the port and the restart fails.
/// Where the range leaves no room, ports come from the kernel as before.
pub fn free_ports(count: usize, with_bus: bool) -> Result<Vec<u16>, String> {
    let bus = if with_bus { CLUSTER_BUS_OFFSET } else { 0 };
    let ephemeral = ephemeral_range();
    let outside = |port: u32| !ephemeral.contains(&port) && u16::try_from(port).is_ok();
    let candidates: Vec<u16> = (FIRST_TEST_PORT..=u32::from(u16::MAX) - bus)
        .filter(|&port| outside(port) && (bus == 0 || outside(port + bus)))
        .filter_map(|port| u16::try_from(port).ok())
        .collect();
    // Ports handed out before in this process are not handed out again: a server of another
    // test may be down for a restart, its port free for a moment.
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut draw = Draw::seeded();
    let mut attempts = 0;
    while ports.len() < count {
        attempts += 1;
        if attempts > 1_000 {
            return Err("not enough free loopback ports".into());
        }
        let listener = if candidates.len() < 1_000 {
            TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?
        } else {
            match TcpListener::bind(("127.0.0.1", candidates[draw.below(candidates.len())])) {
                Ok(listener) => listener,
                Err(_) => continue,
            }
        };
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        if handed_out.contains(&port) {
            continue;
        }
        if !with_bus {
            held.push(listener);
            ports.push(port);
            continue;
        }
        let bus_port = u32::from(port) + bus;
        if let Ok(bus_port) = u16::try_from(bus_port)
            && !handed_out.contains(&bus_port)
            && let Ok(bus) = TcpListener::bind(("127.0.0.1", bus_port))
        {
            held.extend([listener, bus]);
            ports.push(port);
        }
    }
    for &port in &ports {
        handed_out.insert(port);
        if with_bus {
            handed_out.extend(u16::try_from(u32::from(port) + bus).ok());
        }
    }
    Ok(ports)
}

/// The ports [`free_ports`] handed out in this process.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Where test ports start: clear of the well-known and most registered services' ports.
const FIRST_TEST_PORT: u32 = 10_000;
/// A Redis Cluster node's bus port is its port plus this.
const CLUSTER_BUS_OFFSET: u32 = 10_000;

/// The kernel's ephemeral port range (Linux's default when it cannot be read).
fn ephemeral_range() -> std::ops::RangeInclusive<u32> {
    let read = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let bounds: Option<Vec<u32>> = read.map(|text| {
        text.split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect()
    });
    match bounds.as_deref() {
        Some(&[low, high]) if low <= high => low..=high,
        _ => 32_768..=60_999,
    }
}

/// A small random sequence (xorshift) seeded by the process and the time, so that test
/// processes started together draw different ports.
struct Draw(u64);

impl Draw {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        Self((u64::from(std::process::id()) << 32 | u64::from(nanos)) | 1)
    }

    /// A number below `n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % u64::try_from(n).unwrap_or(u64::MAX)).unwrap_or(0)
    }
}

/// Fails, saying how to install it, unless `program` is on `PATH`.
pub fn require(program: &str, install: &str) -> Result<(), String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()));
    if found {
        Ok(())
    } else {
        Err(format!(
            "`{program}` is not installed, and the tests need it: {install}"
        ))
    }
}

/// `command` as a shell would show it.
pub fn describe(command: &Command) -> String {
    let mut out = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}
