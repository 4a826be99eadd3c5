//! `cargo xtask bench [--quick]`: builds the benchmark binary in release mode and runs it.

use crate::cmd::{cargo, run, target_dir};

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
    run(&mut command)
}
