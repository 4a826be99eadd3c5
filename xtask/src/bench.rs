//! `cargo xtask bench [--quick]`: builds the benchmark binary in release mode and runs it
//! against a Redis it starts and stops.

use crate::cmd::{cargo, run, target_dir};
use crate::services::{Services, Which};

pub(crate) fn run_bench(args: &[&str]) -> Result<(), String> {
    let quick = match args {
        [] => false,
        ["--quick"] => true,
        other => {
            return Err(format!(
                "unknown bench arguments {other:?}: expected [--quick]"
            ));
        }
    };
    let out = target_dir().join("bench").join("results.json");
    let mut command = cargo();
    command.args(["run", "--release", "--quiet", "-p", "tierstack-bench", "--"]);
    if quick {
        command.arg("--quick");
    }
    command.arg("--out").arg(&out);
    // The Redis scenarios run against a server of their own, stopped afterwards.
    let services = Services::start(&[Which::Redis])?;
    services.apply_env(&mut command);
    let result = run(&mut command);
    drop(services);
    result
}
