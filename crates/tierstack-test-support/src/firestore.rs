//! The Firestore emulator of the Google Cloud CLI.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Launch;
use crate::process::{ServerProcess, free_port, require};

/// How to get the emulator.
pub const INSTALL: &str = "install the Google Cloud CLI with its Firestore emulator \
     (Debian: apt-get install google-cloud-cli google-cloud-cli-firestore-emulator; \
     or gcloud components install cloud-firestore-emulator) and Java 11+";

/// How long a fresh emulator may take to start and to answer writes promptly.
const START_LIMIT: Duration = Duration::from_secs(90);

/// The emulator of this test run and a project id warmed up on it: `FIRESTORE_EMULATOR_HOST`
/// and `FIRESTORE_PROJECT_ID` if both are set (`cargo xtask ci` starts one emulator for every
/// test binary and sets both), else an emulator this process starts on first use, shared by
/// its tests and stopped when it exits. Pass the host to `FirestoreConfig::emulator_host`.
///
/// # Panics
///
/// If the emulator cannot be started (the message says how to install it).
pub fn emulator() -> (String, String) {
    static OWN: OnceLock<Result<(FirestoreEmulator, String), String>> = OnceLock::new();
    if let (Ok(host), Ok(project)) = (
        std::env::var("FIRESTORE_EMULATOR_HOST"),
        std::env::var("FIRESTORE_PROJECT_ID"),
    ) {
        return (host, project);
    }
    let own = OWN.get_or_init(|| {
        let emulator = FirestoreEmulator::start(&Launch::for_tests())?;
        let project = unique_project();
        emulator.warm_up(&project)?;
        Ok((emulator, project))
    });
    match own {
        Ok((emulator, project)) => (emulator.host(), project.clone()),
        Err(error) => panic!("no Firestore emulator for the tests: {error}"),
    }
}

/// A project id no other run uses (the emulator keeps every project's data while it runs).
pub fn unique_project() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("tierstack-test-{}", nanos % 1_000_000_000)
}

/// `gcloud emulators firestore start` on a loopback port. Dropped, it stops (the whole process
/// group: the Java process too).
#[derive(Debug)]
pub struct FirestoreEmulator {
    port: u16,
    launch: Launch,
    process: Option<ServerProcess>,
}

impl FirestoreEmulator {
    /// Starts the emulator on a free port and waits until it answers.
    pub fn start(launch: &Launch) -> Result<Self, String> {
        Self::start_on(launch, free_port()?)
    }

    /// Starts the emulator on `port` and waits until it answers.
    pub fn start_on(launch: &Launch, port: u16) -> Result<Self, String> {
        require("gcloud", INSTALL)?;
        let mut emulator = Self {
            port,
            launch: launch.clone(),
            process: None,
        };
        emulator.run()?;
        Ok(emulator)
    }

    fn run(&mut self) -> Result<(), String> {
        let mut command = Command::new("gcloud");
        command
            .args(["emulators", "firestore", "start"])
            .arg(format!("--host-port=127.0.0.1:{}", self.port))
            .env("CLOUDSDK_CORE_DISABLE_PROMPTS", "1");
        let name = format!("firestore-{}", self.port);
        let mut process = ServerProcess::spawn(&self.launch, &name, &mut command)?;
        let port = self.port;
        let request =
            format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        process
            .wait_ready(START_LIMIT, || {
                answers_200(port, &request, Duration::from_secs(2))
            })
            .map_err(|error| {
                format!("the Firestore emulator did not start: {error}\n({INSTALL})")
            })?;
        self.process = Some(process);
        Ok(())
    }

    /// `127.0.0.1:PORT`, as `FIRESTORE_EMULATOR_HOST` names it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Writes a document of `project` until three writes in a row are answered within a
    /// second. A fresh emulator answers `GET /` long before its first writes: they set the
    /// database up and warm the JVM, and tests sent then saw 15 s stalls.
    pub fn warm_up(&self, project: &str) -> Result<(), String> {
        warm_up(self.port, project, START_LIMIT)
    }

    /// Stops the emulator (the whole group, at once).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts it again on the same port (empty) and waits until it answers.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.run()
    }

    /// Its name and process group while it runs (see [`ServerProcess::record`]).
    pub fn record(&self) -> Vec<(String, u32)> {
        self.process
            .iter()
            .filter_map(ServerProcess::record)
            .collect()
    }

    /// Leaves the emulator running past this value (see [`ServerProcess::keep`]).
    pub fn keep(mut self) -> Option<(String, u32)> {
        self.process.take()?.keep()
    }
}

/// Sends one HTTP/1.1 request to 127.0.0.1:`port`; whether the reply's status is 200. Only
/// the first read is looked at: the status line is all that matters, and the emulator may keep
/// the connection open.
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

fn warm_up(port: u16, project: &str, limit: Duration) -> Result<(), String> {
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
            sleep(Duration::from_millis(250)); // poll loop
        } else if started.elapsed() < Duration::from_secs(1) {
            quick_answers += 1;
        } else {
            quick_answers = 0;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the Firestore emulator on port {port} did not answer writes promptly within \
                 {limit:?}"
            ));
        }
    }
    Ok(())
}
