//! The GitHub workflows, read closely enough to test what they run: whether a workflow runs on
//! tags, and each job's text and `run:` commands. Only the shapes `.github/workflows/*.yml` use
//! are read: jobs at two spaces under `jobs:`, and `run: command` or `run: |` with an indented
//! block of commands.

use std::fs;
use std::path::Path;

/// One job of a workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    pub(crate) name: String,
    /// Every line of the job, its setup steps included.
    pub(crate) text: String,
    /// Its `run:` commands, one per line.
    pub(crate) runs: Vec<String>,
}

/// A workflow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Workflow {
    pub(crate) on_tags: bool,
    pub(crate) jobs: Vec<Job>,
}

pub(crate) fn read(path: &Path) -> Result<Workflow, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(parse(&text))
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines of top-level section `key` (`on`, `jobs`), without its header.
fn section<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let header = format!("{key}:");
    text.lines()
        .skip_while(|line| line.trim_end() != header)
        .skip(1)
        .take_while(|line| line.trim().is_empty() || indent(line) > 0)
        .collect()
}

pub(crate) fn parse(text: &str) -> Workflow {
    let on_tags = section(text, "on")
        .iter()
        .any(|line| line.trim_start().starts_with("tags:"));
    let mut jobs: Vec<Job> = Vec::new();
    for line in section(text, "jobs") {
        let is_job_header = indent(line) == 2 && line.trim_end().ends_with(':');
        if is_job_header {
            jobs.push(Job {
                name: line.trim().trim_end_matches(':').to_owned(),
                text: String::new(),
                runs: Vec::new(),
            });
        } else if let Some(job) = jobs.last_mut() {
            job.text.push_str(line);
            job.text.push('\n');
        }
    }
    for job in &mut jobs {
        job.runs = runs(&job.text);
    }
    Workflow { on_tags, jobs }
}

/// The commands of every `run:` key in a job's text.
fn runs(job: &str) -> Vec<String> {
    let lines: Vec<&str> = job.lines().collect();
    let mut commands = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let key = line.trim_start().trim_start_matches("- ");
        let Some(value) = key.strip_prefix("run:") else {
            continue;
        };
        let value = value.trim();
        if value == "|" || value == ">" {
            commands.extend(
                lines[i + 1..]
                    .iter()
                    .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
                    .map(|l| l.trim())
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
        } else {
            commands.push(value.to_owned());
        }
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::root;
    use crate::release::tests::TempWorkspace;
    use crate::services::Which;

    fn workflow(name: &str) -> Workflow {
        read(&root().join(".github/workflows").join(name)).unwrap()
    }

    #[test]
    fn jobs_and_their_commands_are_read() {
        let text = "name: x\n\non:\n  push:\n    tags: [\"v*\"]\n\njobs:\n  one:\n    steps:\n      - uses: a@v1\n      - run: cargo xtask ci fmt\n  two:\n    steps:\n      - name: Servers\n        run: |\n          sudo apt-get update\n\n          sudo apt-get install -y redis-server\n      - run: echo done\n";
        let wf = parse(text);
        assert!(wf.on_tags);
        let names: Vec<&str> = wf.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["one", "two"]);
        assert_eq!(wf.jobs[0].runs, ["cargo xtask ci fmt"]);
        assert_eq!(
            wf.jobs[1].runs,
            [
                "sudo apt-get update",
                "sudo apt-get install -y redis-server",
                "echo done"
            ]
        );
        assert!(wf.jobs[1].text.contains("name: Servers"));
        assert!(!parse("on:\n  push:\n    branches: [main]\n").on_tags);
    }

    /// A tag is pushed on the commit `cargo xtask release` made, whose changelogs have nothing
    /// unreleased: every `cargo xtask release` command of the tag's workflow must pass there,
    /// with the tag it runs for, and the workflow must publish.
    #[test]
    fn the_tag_workflow_checks_and_publishes_the_release_commit_it_names() {
        let wf = workflow("release.yml");
        assert!(wf.on_tags, "release.yml runs on tags");
        let ws = TempWorkspace::new("workflow");
        let tag = ws.release_commit("minor");
        let commands: Vec<&String> = wf.jobs.iter().flat_map(|job| &job.runs).collect();
        let checks: Vec<&String> = commands
            .iter()
            .copied()
            .filter(|c| c.starts_with("cargo xtask release"))
            .collect();
        assert!(
            !checks.is_empty(),
            "the tag's workflow checks that the tag names its commit's release: {commands:?}"
        );
        for command in checks {
            let expanded = command
                .replace("${{ github.ref_name }}", &tag)
                .replace("$GITHUB_REF_NAME", &tag);
            let args: Vec<&str> = expanded
                .split_whitespace()
                .skip(3)
                .map(|arg| arg.trim_matches('"'))
                .collect();
            if let Err(err) = crate::release::run_release_in(&ws.root, &args) {
                panic!("`{command}` fails on the release commit of {tag}: {err}");
            }
        }
        assert!(
            commands
                .iter()
                .any(|c| c.starts_with("cargo publish") && !c.contains("--dry-run")),
            "the tag's workflow publishes: {commands:?}"
        );
    }

    /// What a job needs installed for the servers `cargo xtask` starts.
    fn install_markers(server: Which) -> &'static [&'static str] {
        match server {
            Which::Redis => &["redis-server"],
            Which::RedisCluster => &["redis-server", "redis-tools"],
            Which::Firestore => &["cloud-firestore-emulator", "openjdk"],
        }
    }

    /// The servers a `cargo xtask` command starts.
    fn servers_started(command: &str) -> Vec<Which> {
        let bench: Vec<Which> = crate::bench::PHASES.iter().map(|p| p.1).collect();
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["cargo", "xtask", "ci"] => [crate::ci::TEST_SERVICES, &bench].concat(),
            ["cargo", "xtask", "ci", "test", ..] => crate::ci::TEST_SERVICES.to_vec(),
            ["cargo", "xtask", "ci", "bench-check", ..] | ["cargo", "xtask", "bench", ..] => bench,
            _ => Vec::new(),
        }
    }

    #[test]
    fn every_job_installs_the_servers_it_starts() {
        for name in ["ci.yml", "release.yml"] {
            for job in workflow(name).jobs {
                for command in &job.runs {
                    for server in servers_started(command) {
                        for marker in install_markers(server) {
                            assert!(
                                job.text.contains(marker),
                                "{name}: job {} runs `{command}`, which starts {server:?}, \
                                 but does not install {marker}",
                                job.name
                            );
                        }
                    }
                }
            }
        }
    }
}
