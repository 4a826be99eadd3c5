//! `cargo xtask release <major|minor|patch|X.Y.Z> [--dry-run]` makes a release commit and its
//! tag; `cargo xtask release --check-tag vX.Y.Z` checks, on the commit a tag points at, that the
//! tag names that commit's release.
//!
//! A release refuses, changing nothing, on: an invalid version, a version not above the current
//! one, a publishable crate without a non-empty "Unreleased" changelog section, or a tree with
//! modified or untracked files. Then: `cargo xtask ci`; bump the workspace version and every
//! internal dependency's version together; move each changelog's "Unreleased" entries under the
//! new version and today's date; `cargo publish --workspace --dry-run` (cargo packages and builds
//! every publishable crate in dependency order); commit; tag `vX.Y.Z`. `--dry-run` checks and
//! prints every step, and changes nothing.
//!
//! Pushing the tag runs `.github/workflows/release.yml`: `--check-tag`, then
//! `cargo publish --workspace`.

use std::cmp::Ordering;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cmd::{cargo, root, run};

/// A `MAJOR.MINOR.PATCH` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version {
    major: u64,
    minor: u64,
    patch: u64,
}

impl Version {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let numbers: Option<Vec<u64>> = parts
            .iter()
            .map(|p| {
                (!p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && !(p.len() > 1 && p.starts_with('0')))
                .then(|| p.parse().ok())
                .flatten()
            })
            .collect();
        match numbers.as_deref() {
            Some(&[major, minor, patch]) => Ok(Self {
                major,
                minor,
                patch,
            }),
            _ => Err(format!(
                "invalid version {text:?}: expected MAJOR.MINOR.PATCH, such as 1.4.0"
            )),
        }
    }

    /// The version a release request names: a bump of `current`, or an explicit version.
    pub(crate) fn requested(current: Self, request: &str) -> Result<Self, String> {
        let next = match request {
            "major" => Self {
                major: current.major + 1,
                minor: 0,
                patch: 0,
            },
            "minor" => Self {
                major: current.major,
                minor: current.minor + 1,
                patch: 0,
            },
            "patch" => Self {
                patch: current.patch + 1,
                ..current
            },
            explicit => Self::parse(explicit)?,
        };
        if next.cmp(&current) != Ordering::Greater {
            return Err(format!(
                "version {next} is not above the current version {current}"
            ));
        }
        Ok(next)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The workspace version in `[workspace.package]`.
pub(crate) fn workspace_version(manifest: &str) -> Result<Version, String> {
    Version::parse(workspace_package_value(manifest, "version")?)
}

/// The string value of `key` in `[workspace.package]` (`version`, `rust-version`).
pub(crate) fn workspace_package_value<'a>(manifest: &'a str, key: &str) -> Result<&'a str, String> {
    let section = section(manifest, "[workspace.package]")
        .ok_or("the workspace Cargo.toml has no [workspace.package] section")?;
    section
        .lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix(key)?.trim().strip_prefix('=')?;
            Some(value.trim().trim_matches('"'))
        })
        .ok_or_else(|| format!("[workspace.package] has no {key}"))
}

fn section<'a>(manifest: &'a str, header: &str) -> Option<&'a str> {
    let start = manifest.find(header)? + header.len();
    let rest = &manifest[start..];
    let end = rest.find("\n[").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

/// Sets the workspace version and the `version` of every internal (path) dependency in
/// `[workspace.dependencies]` to `next`.
pub(crate) fn bump_manifest(
    manifest: &str,
    current: Version,
    next: Version,
) -> Result<String, String> {
    let mut out = String::with_capacity(manifest.len());
    let mut in_package = false;
    let mut bumped_package = false;
    for line in manifest.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            in_package = trimmed.starts_with("[workspace.package]");
        }
        if in_package && trimmed.starts_with("version") {
            out.push_str(&line.replacen(&format!("\"{current}\""), &format!("\"{next}\""), 1));
            bumped_package = true;
        } else if trimmed.contains("path = ")
            && trimmed.contains(&format!("version = \"{current}\""))
        {
            out.push_str(&line.replacen(
                &format!("version = \"{current}\""),
                &format!("version = \"{next}\""),
                1,
            ));
        } else {
            out.push_str(line);
        }
    }
    if bumped_package {
        Ok(out)
    } else {
        Err("could not find the version line of [workspace.package]".into())
    }
}

const UNRELEASED: &str = "## [Unreleased]";

/// Moves the entries under "Unreleased" to a new section for `version` dated `date`, leaving an
/// empty "Unreleased" above it. Refuses a changelog without a non-empty "Unreleased" section.
pub(crate) fn release_changelog(
    text: &str,
    version: Version,
    date: &str,
) -> Result<String, String> {
    let start = text
        .find(UNRELEASED)
        .ok_or("no \"## [Unreleased]\" section")?;
    let body_start = start + UNRELEASED.len();
    let body_end = text[body_start..]
        .find("\n## ")
        .map_or(text.len(), |i| body_start + i + 1);
    if text[body_start..body_end].trim().is_empty() {
        return Err("the \"## [Unreleased]\" section is empty".into());
    }
    Ok(format!(
        "{}{UNRELEASED}\n\n## [{version}] - {date}{}",
        &text[..start],
        &text[body_start..]
    ))
}

/// Today's date in UTC as `YYYY-MM-DD`.
pub(crate) fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    civil_date(i64::try_from(days).unwrap_or(0))
}

/// The proleptic Gregorian date of a day number since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// A publishable crate of the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Crate {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
}

/// The publishable crates under `root/crates`.
pub(crate) fn publishable_crates(root: &Path) -> Result<Vec<Crate>, String> {
    let mut crates = Vec::new();
    let dir = root.join("crates");
    let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let Ok(manifest) = fs::read_to_string(path.join("Cargo.toml")) else {
            continue;
        };
        if manifest.contains("publish = false") {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crates.push(Crate { name, dir: path });
    }
    Ok(crates)
}

/// Files git reports as modified or untracked.
fn dirty_files(root: &Path) -> Result<Vec<String>, String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["status", "--porcelain", "--untracked-files=all"])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "git status failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The edits a release makes: every file's new text, computed and checked before anything is
/// written.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) current: Version,
    pub(crate) next: Version,
    pub(crate) edits: Vec<(PathBuf, String)>,
}

/// Checks everything a release needs and computes its edits; changes nothing.
pub(crate) fn plan(root: &Path, request: &str, date: &str) -> Result<Plan, String> {
    let manifest_path = root.join("Cargo.toml");
    let manifest = fs::read_to_string(&manifest_path)
        .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    let current = workspace_version(&manifest)?;
    let next = Version::requested(current, request)?;
    let dirty = dirty_files(root)?;
    if !dirty.is_empty() {
        return Err(format!(
            "the tree has modified or untracked files; commit or remove them first:\n  {}",
            dirty.join("\n  ")
        ));
    }
    let crates = publishable_crates(root)?;
    let mut edits = vec![(manifest_path, bump_manifest(&manifest, current, next)?)];
    for krate in &crates {
        let path = krate.dir.join("CHANGELOG.md");
        let text =
            fs::read_to_string(&path).map_err(|_| format!("{} has no CHANGELOG.md", krate.name))?;
        let released = release_changelog(&text, next, date)
            .map_err(|e| format!("{}/CHANGELOG.md: {e}", krate.name))?;
        edits.push((path, released));
    }
    Ok(Plan {
        current,
        next,
        edits,
    })
}

/// Checks that `tag` (`vX.Y.Z`) names the release at `root`: the workspace version, with a
/// changelog section for it in every publishable crate.
pub(crate) fn check_tag(root: &Path, tag: &str) -> Result<Version, String> {
    let version = tag
        .strip_prefix('v')
        .ok_or_else(|| format!("tag {tag:?} does not start with v"))
        .and_then(Version::parse)?;
    let manifest_path = root.join("Cargo.toml");
    let manifest = fs::read_to_string(&manifest_path)
        .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    let current = workspace_version(&manifest)?;
    if current != version {
        return Err(format!(
            "tag {tag} names {version}, but the workspace version is {current}"
        ));
    }
    let heading = format!("## [{version}]");
    for krate in publishable_crates(root)? {
        let text = fs::read_to_string(krate.dir.join("CHANGELOG.md"))
            .map_err(|_| format!("{} has no CHANGELOG.md", krate.name))?;
        if !text.lines().any(|line| line.starts_with(&heading)) {
            return Err(format!(
                "{}/CHANGELOG.md has no \"{heading}\" section",
                krate.name
            ));
        }
    }
    Ok(version)
}

const USAGE: &str =
    "usage: cargo xtask release <major|minor|patch|X.Y.Z> [--dry-run] | --check-tag vX.Y.Z";

/// `cargo xtask release ...`
pub(crate) fn run_release(args: &[&str]) -> Result<(), String> {
    run_release_in(&root(), args)
}

/// `cargo xtask release ...` on the workspace at `root`.
pub(crate) fn run_release_in(root: &Path, args: &[&str]) -> Result<(), String> {
    let (request, dry_run) = match args {
        ["--check-tag", tag] => {
            let version = check_tag(root, tag)?;
            eprintln!("{tag} names this commit's release {version}");
            return Ok(());
        }
        [request] if !request.starts_with('-') => (*request, false),
        [request, "--dry-run"] | ["--dry-run", request] => (*request, true),
        _ => return Err(USAGE.into()),
    };
    let plan = plan(root, request, &today())?;
    let step = |text: String| eprintln!("{}{text}", if dry_run { "[dry run] " } else { "" });
    step(format!("release {} -> {}", plan.current, plan.next));
    step("run `cargo xtask ci`".into());
    if !dry_run {
        crate::ci::run(None)?;
    }
    for (path, _) in &plan.edits {
        step(format!(
            "update {}",
            path.strip_prefix(root).unwrap_or(path).display()
        ));
    }
    if !dry_run {
        for (path, text) in &plan.edits {
            fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    // cargo packages every publishable crate in dependency order and builds each against the
    // packages before it.
    step("cargo publish --workspace --dry-run".into());
    let tag = format!("v{}", plan.next);
    step(format!("git commit -am \"release {tag}\" && git tag {tag}"));
    if dry_run {
        return Ok(());
    }
    run(cargo()
        .current_dir(root)
        .args(["publish", "--workspace", "--dry-run", "--allow-dirty"]))?;
    run(Command::new("git").arg("-C").arg(root).args([
        "commit",
        "-am",
        &format!("release {tag}"),
    ]))?;
    run(Command::new("git").arg("-C").arg(root).args(["tag", &tag]))?;
    eprintln!(
        "released {tag}: push the commit, then the tag; the tag's workflow publishes every crate"
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MANIFEST: &str = r#"[workspace]
members = ["crates/*"]

[workspace.package]
version = "0.3.1"
edition = "2024"

[workspace.dependencies]
alpha = { path = "crates/alpha", version = "0.3.1" }
serde = { version = "0.3.1" }
"#;

    const CHANGELOG: &str = "# Changelog\n\n## [Unreleased]\n\n### Added\n\n- A thing.\n\n## [0.3.1] - 2026-01-01\n\n- Old.\n";

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    #[test]
    fn versions_parse_strictly() {
        assert_eq!(
            v("1.20.3"),
            Version {
                major: 1,
                minor: 20,
                patch: 3
            }
        );
        for bad in [
            "", "1", "1.2", "1.2.3.4", "a.b.c", "1.2.x", "01.2.3", "-1.2.3", "1..3",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_bump_or_name_a_higher_version() {
        let current = v("0.3.1");
        assert_eq!(Version::requested(current, "patch").unwrap(), v("0.3.2"));
        assert_eq!(Version::requested(current, "minor").unwrap(), v("0.4.0"));
        assert_eq!(Version::requested(current, "major").unwrap(), v("1.0.0"));
        assert_eq!(Version::requested(current, "0.10.0").unwrap(), v("0.10.0"));
        for refused in ["0.3.1", "0.3.0", "0.2.9"] {
            let err = Version::requested(current, refused).unwrap_err();
            assert!(err.contains("not above"), "{err}");
        }
        assert!(
            Version::requested(current, "banana")
                .unwrap_err()
                .contains("invalid version")
        );
    }

    #[test]
    fn the_manifest_bump_moves_the_package_and_internal_dependencies_only() {
        let bumped = bump_manifest(MANIFEST, v("0.3.1"), v("0.4.0")).unwrap();
        assert!(bumped.contains("[workspace.package]\nversion = \"0.4.0\""));
        assert!(bumped.contains(r#"alpha = { path = "crates/alpha", version = "0.4.0" }"#));
        assert!(
            bumped.contains(r#"serde = { version = "0.3.1" }"#),
            "external dependency untouched"
        );
        assert_eq!(workspace_version(&bumped).unwrap(), v("0.4.0"));
    }

    #[test]
    fn changelogs_move_unreleased_under_the_version() {
        let released = release_changelog(CHANGELOG, v("0.4.0"), "2026-11-21").unwrap();
        assert!(released.contains("## [Unreleased]\n\n## [0.4.0] - 2026-11-21\n\n### Added\n\n- A thing.\n\n## [0.3.1]"), "{released}");
        assert!(
            release_changelog("# Changelog\n", v("1.0.0"), "d")
                .unwrap_err()
                .contains("no")
        );
        let empty = "# Changelog\n\n## [Unreleased]\n\n## [0.3.1] - x\n";
        assert!(
            release_changelog(empty, v("1.0.0"), "d")
                .unwrap_err()
                .contains("empty")
        );
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_413), "2025-11-21");
        assert_eq!(civil_date(11_016), "2000-02-29");
    }

    /// A throwaway git workspace with two publishable crates and one private one.
    pub(crate) struct TempWorkspace {
        pub(crate) root: PathBuf,
    }

    impl TempWorkspace {
        pub(crate) fn new(name: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("tierstack-release-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for (path, text) in [
                ("Cargo.toml", MANIFEST.replace("alpha", "tierstack-alpha")),
                ("crates/tierstack-alpha/Cargo.toml", "[package]\nname = \"tierstack-alpha\"\n\n[dependencies]\nserde.workspace = true\n".into()),
                ("crates/tierstack-alpha/CHANGELOG.md", CHANGELOG.into()),
                ("crates/tierstack-beta/Cargo.toml", "[package]\nname = \"tierstack-beta\"\n\n[dependencies]\ntierstack-alpha.workspace = true\n".into()),
                ("crates/tierstack-beta/CHANGELOG.md", CHANGELOG.into()),
                ("crates/bench/Cargo.toml", "[package]\nname = \"bench\"\npublish = false\n".into()),
            ] {
                let path = root.join(path);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(path, text).unwrap();
            }
            let ws = Self { root };
            ws.git(&["init", "-q"]);
            ws.git(&["add", "-A"]);
            ws.git(&["commit", "-qm", "init"]);
            ws
        }

        pub(crate) fn git(&self, args: &[&str]) {
            let ok = Command::new("git")
                .arg("-C")
                .arg(&self.root)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "git {args:?}");
        }

        /// Makes the release commit of `request` as `cargo xtask release` does (without its
        /// checks and packaging) and tags it; returns the tag.
        pub(crate) fn release_commit(&self, request: &str) -> String {
            let plan = plan(&self.root, request, "2026-11-21").unwrap();
            for (path, text) in &plan.edits {
                fs::write(path, text).unwrap();
            }
            let tag = format!("v{}", plan.next);
            self.git(&["commit", "-qam", &format!("release {tag}")]);
            self.git(&["tag", &tag]);
            tag
        }

        fn snapshot(&self) -> Vec<(String, String)> {
            [
                "Cargo.toml",
                "crates/tierstack-alpha/CHANGELOG.md",
                "crates/tierstack-beta/CHANGELOG.md",
            ]
            .iter()
            .map(|p| {
                (
                    (*p).to_owned(),
                    fs::read_to_string(self.root.join(p)).unwrap(),
                )
            })
            .collect()
        }
    }

    impl Drop for TempWorkspace {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn a_clean_workspace_plans_every_edit() {
        let ws = TempWorkspace::new("plan");
        let before = ws.snapshot();
        let plan = plan(&ws.root, "minor", "2026-11-21").unwrap();
        assert_eq!(plan.next, v("0.4.0"));
        assert_eq!(
            plan.edits.len(),
            3,
            "the manifest and two changelogs; the private crate has none"
        );
        assert_eq!(ws.snapshot(), before, "planning changes nothing");
        for (path, text) in &plan.edits {
            fs::write(path, text).unwrap();
        }
        let after = ws.snapshot();
        assert!(after[0].1.contains("version = \"0.4.0\""));
        assert!(after[1].1.contains("## [0.4.0] - 2026-11-21"));
    }

    #[test]
    fn a_tag_names_the_release_of_its_commit() {
        let ws = TempWorkspace::new("tag");
        let tag = ws.release_commit("minor");
        assert_eq!(tag, "v0.4.0");
        assert_eq!(check_tag(&ws.root, &tag).unwrap(), v("0.4.0"));
        assert!(run_release_in(&ws.root, &["--check-tag", &tag]).is_ok());
        for (wrong, expected) in [
            ("v0.4.1", "workspace version is 0.4.0"),
            ("v0.3.1", "workspace version is 0.4.0"),
            ("0.4.0", "does not start with v"),
            ("v0.4", "invalid version"),
        ] {
            let err = check_tag(&ws.root, wrong).unwrap_err();
            assert!(err.contains(expected), "{wrong}: {err}");
        }
        let changelog = ws.root.join("crates/tierstack-beta/CHANGELOG.md");
        let text = fs::read_to_string(&changelog).unwrap();
        fs::write(&changelog, text.replace("## [0.4.0]", "## [0.3.9]")).unwrap();
        let err = check_tag(&ws.root, &tag).unwrap_err();
        assert!(
            err.contains("tierstack-beta/CHANGELOG.md") && err.contains("## [0.4.0]"),
            "{err}"
        );
    }

    #[test]
    fn a_release_commit_has_nothing_left_to_release() {
        let ws = TempWorkspace::new("released");
        ws.release_commit("patch");
        let err = run_release_in(&ws.root, &["patch", "--dry-run"]).unwrap_err();
        assert!(err.contains("Unreleased") && err.contains("empty"), "{err}");
    }

    #[test]
    fn bad_requests_are_refused_and_nothing_changes() {
        let ws = TempWorkspace::new("refuse");
        let before = ws.snapshot();
        for (request, expected) in [
            ("1.2", "invalid version"),
            ("0.3.1", "not above"),
            ("0.1.0", "not above"),
        ] {
            let err = plan(&ws.root, request, "2026-11-21").unwrap_err();
            assert!(err.contains(expected), "{request}: {err}");
        }
        // A crate without an Unreleased entry.
        fs::write(
            ws.root.join("crates/tierstack-beta/CHANGELOG.md"),
            "# Changelog\n\n## [0.3.1] - x\n",
        )
        .unwrap();
        let git_commit = Command::new("git")
            .arg("-C")
            .arg(&ws.root)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-qam",
                "drop unreleased",
            ])
            .status()
            .unwrap();
        assert!(git_commit.success());
        let err = plan(&ws.root, "patch", "d").unwrap_err();
        assert!(
            err.contains("tierstack-beta/CHANGELOG.md") && err.contains("Unreleased"),
            "{err}"
        );
        assert_eq!(ws.snapshot()[0], before[0], "the manifest is unchanged");
    }

    #[test]
    fn a_dirty_tree_is_refused() {
        let ws = TempWorkspace::new("dirty");
        fs::write(ws.root.join("stray.txt"), "untracked").unwrap();
        let err = plan(&ws.root, "patch", "d").unwrap_err();
        assert!(
            err.contains("untracked") && err.contains("stray.txt"),
            "{err}"
        );
        fs::remove_file(ws.root.join("stray.txt")).unwrap();
        let changelog = ws.root.join("crates/tierstack-alpha/CHANGELOG.md");
        fs::write(&changelog, format!("{CHANGELOG}\nlocal edit\n")).unwrap();
        let err = plan(&ws.root, "patch", "d").unwrap_err();
        assert!(err.contains("tierstack-alpha/CHANGELOG.md"), "{err}");
        assert!(
            fs::read_to_string(ws.root.join("Cargo.toml"))
                .unwrap()
                .contains("version = \"0.3.1\"")
        );
    }
}
