//! The servers of a test process: started when none is named, stopped when it is done with
//! them, and stopped when it dies, however it dies.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use tierstack_test_support::Launch;
use tierstack_test_support::redis::{RedisServer, redis_url};

/// Set in the child process of `a_server_dies_with_the_process_that_started_it`.
const CHILD: &str = "TIERSTACK_LIFECYCLE_CHILD";

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Waits up to 10 s for nothing to listen on `port`.
fn gone(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while listening(port) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20)); // poll loop
    }
    true
}

#[test]
fn a_server_answers_restarts_and_is_gone_with_its_folder_when_dropped() {
    let mut server = RedisServer::start(&Launch::for_tests(), &[]).unwrap();
    let port = server.port();
    assert!(server.cli(&["PING"]).contains("PONG"));
    server.cli(&["SET", "k", "v"]);
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.cli(&["GET", "k"]).trim(), "", "restarted empty");
    let folder = std::env::temp_dir().join(format!(
        "tierstack-test-{}-redis-{port}",
        std::process::id()
    ));
    assert!(folder.is_dir(), "{}", folder.display());
    drop(server);
    assert!(gone(port));
    assert!(!folder.exists(), "the scratch folder is removed");
}

#[test]
fn a_server_dies_with_the_process_that_started_it() {
    if std::env::var_os(CHILD).is_some() {
        // The child: a server of its own (none is named), then death without unwinding.
        let url = redis_url();
        println!("URL {url}");
        std::process::abort();
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_server_dies_with_the_process_that_started_it",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env_remove("REDIS_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let url = stdout
        .lines()
        .find_map(|line| line.strip_prefix("URL "))
        .unwrap_or_else(|| panic!("the child started no server: {stdout}"));
    let port: u16 = url
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    assert!(!output.status.success(), "the child aborted");
    assert!(gone(port), "the server on {port} outlived its process");
}

#[test]
fn a_missing_program_is_an_error_that_says_how_to_install_it() {
    let error =
        tierstack_test_support::process::require("tierstack-no-such-server", "apt-get install it")
            .unwrap_err();
    assert!(
        error.contains("tierstack-no-such-server") && error.contains("apt-get install it"),
        "{error}"
    );
    assert!(tierstack_test_support::process::require("sh", "").is_ok());
}

#[cfg(target_os = "linux")]
#[test]
fn test_ports_are_free_distinct_and_outside_the_ephemeral_range() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|e| panic!("cannot read the ephemeral port range: {e}"));
    let bounds: Vec<u16> = range
        .split_whitespace()
        .map(|word| word.parse().unwrap())
        .collect();
    let ephemeral = bounds[0]..=bounds[1];
    let mut earlier = Vec::new();
    for with_bus in [false, true] {
        let ports = tierstack_test_support::process::free_ports(6, with_bus).unwrap();
        assert!(
            ports.iter().all(|port| !earlier.contains(port)),
            "handed out again: {ports:?} after {earlier:?}"
        );
        earlier.extend(ports.iter().copied());
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 6, "{ports:?}");
        for port in ports {
            assert!(!ephemeral.contains(&port), "{port} is ephemeral");
            assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
            if with_bus {
                let bus = port + 10_000;
                assert!(!ephemeral.contains(&bus), "bus {bus} is ephemeral");
                assert!(std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok());
            }
        }
    }
}
