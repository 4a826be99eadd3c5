//! `cargo xtask ci tidy`: what a reader sees holds no working notes, and no test orders its
//! tasks by sleeping.
//!
//! **Notes.** Public docs (`README.md`, `docs/**/*.md`, `crates/*/README.md`), changelogs
//! (`crates/*/CHANGELOG.md`) and rustdoc (`///` and `//!` lines under `crates/*/src`) say what is
//! true now; history lives in commit messages. A line is flagged (case-insensitively) for:
//! - a narrative of a measurement: "measured on", "this session", "last run", "runs ago";
//! - a date (`2026-12-04`, `2026-12`), except in a changelog's version heading
//!   (`## [1.2.0] - 2026-12-04`);
//! - a commit hash: outside `inline code`, a word of 7 to 40 hexadecimal digits with at least
//!   one digit and one letter;
//! - an internal document number a user cannot resolve: "seed" or "issue" followed by a number
//!   (`seed 001`, `issue #15`);
//! - in a changelog, an instruction count (the word "instructions").
//!
//! **Sleeps.** In test code (`crates/*/tests`, and `#[cfg(test)]` items under `crates/*/src`), a
//! call of `sleep(` is flagged unless
//! - its innermost enclosing block is the body of a `while` or a `loop`: a poll, which the loop
//!   bounds (a `for` body is not a poll: a test that runs once per store sleeps in one); or
//! - a comment on its line, or in the comment lines directly above it, starts with
//!   `// paused clock` (in a file that runs tests with `start_paused`: on Tokio's paused clock
//!   time moves only once every task waits, so the sleep is an exact step), or with
//!   `// real time` (the sleep stands for real time passing on a server or socket, a TTL or a
//!   timeout running out, and the outcome does not depend on which task gets where first).
//!
//! Anything else orders tasks by a guess of how long they take: use `Notify`, a barrier or the
//! paused clock.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cmd::root;

/// One flagged line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) path: PathBuf,
    pub(crate) line: usize,
    pub(crate) rule: &'static str,
    pub(crate) text: String,
}

/// Runs every check over the workspace at `root()`.
pub(crate) fn check() -> Result<(), String> {
    let root = root();
    let violations = check_workspace(&root)?;
    if violations.is_empty() {
        eprintln!("tidy: no working notes in docs, no sleeps ordering tests");
        return Ok(());
    }
    for v in &violations {
        let path = v.path.strip_prefix(&root).unwrap_or(&v.path);
        eprintln!(
            "{}:{}: {}: {}",
            path.display(),
            v.line,
            v.rule,
            v.text.trim()
        );
    }
    Err(format!(
        "tidy: {} violation(s); rules in xtask/src/tidy.rs",
        violations.len()
    ))
}

/// Every violation under `root`, in path order.
pub(crate) fn check_workspace(root: &Path) -> Result<Vec<Violation>, String> {
    let mut violations = Vec::new();
    let crates = sorted_entries(&root.join("crates"))?;
    let mut docs = vec![root.join("README.md")];
    docs.extend(files_under(&root.join("docs"), "md")?);
    docs.extend(crates.iter().map(|c| c.join("README.md")));
    for path in docs.into_iter().filter(|p| p.is_file()) {
        let text = read(&path)?;
        violations.extend(note_lines(&path, &text, Kind::Doc));
    }
    for krate in &crates {
        let changelog = krate.join("CHANGELOG.md");
        if changelog.is_file() {
            let text = read(&changelog)?;
            violations.extend(note_lines(&changelog, &text, Kind::Changelog));
        }
        for path in files_under(&krate.join("src"), "rs")? {
            let text = read(&path)?;
            violations.extend(note_lines(&path, &text, Kind::Rustdoc));
            violations.extend(sleeps(&path, &text, false));
        }
        for path in files_under(&krate.join("tests"), "rs")? {
            let text = read(&path)?;
            violations.extend(sleeps(&path, &text, true));
        }
    }
    Ok(violations)
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

/// Files ending in `.{ext}` anywhere under `dir` (none if `dir` does not exist).
fn files_under(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, String> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            files.extend(files_under(&path, ext)?);
        } else if path.extension().is_some_and(|e| e == ext) {
            files.push(path);
        }
    }
    Ok(files)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Doc,
    Changelog,
    /// A Rust file: only its `///` and `//!` lines are read.
    Rustdoc,
}

const NARRATIVE: [&str; 4] = ["measured on", "this session", "last run", "runs ago"];

fn note_lines(path: &Path, text: &str, kind: Kind) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if kind == Kind::Rustdoc && !(trimmed.starts_with("///") || trimmed.starts_with("//!")) {
            continue;
        }
        let version_heading = kind == Kind::Changelog && trimmed.starts_with("## [");
        if let Some(rule) = note_rule(line, kind == Kind::Changelog, version_heading) {
            violations.push(Violation {
                path: path.to_owned(),
                line: index + 1,
                rule,
                text: line.to_owned(),
            });
        }
    }
    violations
}

/// The rule `line` breaks, if any.
fn note_rule(line: &str, changelog: bool, version_heading: bool) -> Option<&'static str> {
    let lower = line.to_lowercase();
    if NARRATIVE.iter().any(|phrase| lower.contains(phrase)) {
        return Some("a narrative of when or where a figure was measured");
    }
    if !version_heading && has_date(&lower) {
        return Some("a date (history belongs in commit messages)");
    }
    if words(&outside_inline_code(&lower)).any(is_commit_hash) {
        return Some("a commit hash (history belongs in commit messages)");
    }
    if ["seed", "issue"]
        .iter()
        .any(|word| followed_by_number(&lower, word))
    {
        return Some("an internal document number (name the use case or the behaviour)");
    }
    if changelog && lower.contains("instructions") {
        return Some("an instruction count in a changelog");
    }
    None
}

/// A `20YY-MM` date.
fn has_date(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.windows(7).enumerate().any(|(i, w)| {
        let before_ok = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        before_ok
            && w.starts_with(b"20")
            && w[2..4].iter().all(u8::is_ascii_digit)
            && w[4] == b'-'
            && w[5..7].iter().all(u8::is_ascii_digit)
    })
}

/// `text` without its `inline code` spans.
fn outside_inline_code(text: &str) -> String {
    text.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
}

fn is_commit_hash(word: &str) -> bool {
    (7..=40).contains(&word.len())
        && word.bytes().all(|b| b.is_ascii_hexdigit())
        && word.bytes().any(|b| b.is_ascii_digit())
        && word.bytes().any(|b| b.is_ascii_alphabetic())
}

/// `word` as a whole word, then spaces or `#`, then a digit.
fn followed_by_number(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before_ok = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        let rest = text[i + word.len()..].trim_start_matches([' ', '#']);
        before_ok
            && rest.len() < text.len() - i - word.len()
            && rest.starts_with(|c: char| c.is_ascii_digit())
    })
}

/// The `sleep(` calls of the test code in `text` that neither poll nor carry a reason. With
/// `all_test`, the whole file is test code; otherwise only `#[cfg(test)]` items are.
fn sleeps(path: &Path, text: &str, all_test: bool) -> Vec<Violation> {
    let raw: Vec<&str> = text.lines().collect();
    let paused_file = text.contains("start_paused");
    let mut violations = Vec::new();
    for (line, in_loop) in sleep_calls(text, all_test) {
        if in_loop {
            continue;
        }
        let reason = reason_above(&raw, line);
        let excused = match reason {
            Some(Reason::PausedClock) => paused_file,
            Some(Reason::RealTime) => true,
            None => false,
        };
        if !excused {
            violations.push(Violation {
                path: path.to_owned(),
                line,
                rule: if reason == Some(Reason::PausedClock) {
                    "`// paused clock` in a file with no `start_paused` test"
                } else {
                    "a sleep that orders a test (use Notify, a barrier or the paused clock)"
                },
                text: raw.get(line - 1).copied().unwrap_or_default().to_owned(),
            });
        }
    }
    violations
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    PausedClock,
    RealTime,
}

/// The reason given by a comment on line `line` (1-based) or in the comment lines directly
/// above it.
fn reason_above(raw: &[&str], line: usize) -> Option<Reason> {
    let own = raw
        .get(line - 1)
        .and_then(|l| l.find("//").map(|i| &l[i..]));
    let above = raw[..line - 1]
        .iter()
        .rev()
        .take_while(|l| l.trim_start().starts_with("//"))
        .map(|l| l.trim_start());
    own.into_iter().chain(above).find_map(|comment| {
        let comment = comment.trim_start_matches('/').trim_start();
        if comment.starts_with("paused clock") {
            Some(Reason::PausedClock)
        } else if comment.starts_with("real time") {
            Some(Reason::RealTime)
        } else {
            None
        }
    })
}

/// A block of code: whether it is a loop's body and whether it is test code.
#[derive(Debug, Clone, Copy)]
struct Block {
    is_loop: bool,
    test: bool,
}

/// Each `sleep(` call in test code: its line (1-based) and whether its innermost block is a
/// loop's body. Comments, strings and character literals are skipped.
fn sleep_calls(text: &str, all_test: bool) -> Vec<(usize, bool)> {
    let code = blank_comments_and_literals(text);
    let chars: Vec<char> = code.chars().collect();
    let mut stack = vec![Block {
        is_loop: false,
        test: all_test,
    }];
    let mut header = String::new();
    let mut cfg_test_pending = false;
    let mut line = 1;
    let mut calls = Vec::new();
    for (i, &c) in chars.iter().enumerate() {
        let top = *stack.last().unwrap_or(&Block {
            is_loop: false,
            test: all_test,
        });
        match c {
            '\n' => {
                line += 1;
                header.push(' ');
            }
            '{' => {
                stack.push(Block {
                    is_loop: is_loop_header(&header),
                    test: top.test || cfg_test_pending,
                });
                cfg_test_pending = false;
                header.clear();
            }
            '}' => {
                if stack.len() > 1 {
                    stack.pop();
                }
                header.clear();
            }
            ';' => {
                cfg_test_pending = false;
                header.clear();
            }
            _ => header.push(c),
        }
        if header.ends_with("#[cfg(test)]") {
            cfg_test_pending = true;
        }
        let starts_call = chars[i..].starts_with(&['s', 'l', 'e', 'e', 'p', '('])
            && (i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_'));
        if starts_call && top.test {
            calls.push((line, top.is_loop));
        }
    }
    calls
}

/// Whether the text before a `{` opens the body of a `while` or a `loop` (`'label:` allowed).
fn is_loop_header(header: &str) -> bool {
    let mut words = header.split_whitespace();
    let mut first = words.next().unwrap_or_default();
    if first.starts_with('\'') && first.ends_with(':') {
        first = words.next().unwrap_or_default();
    }
    matches!(first, "while" | "loop")
}

/// `text` with its comments, string literals and character literals replaced by spaces (line
/// breaks kept), so that braces and names in them are not read as code.
fn blank_comments_and_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if let Some(len) = skipped_len(&chars, i) {
            let end = (i + len).min(chars.len());
            out.extend(
                chars[i..end]
                    .iter()
                    .map(|&c| if c == '\n' { c } else { ' ' }),
            );
            i = end;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The length of the comment or literal that starts at `chars[i]`, if one does.
fn skipped_len(chars: &[char], i: usize) -> Option<usize> {
    let is_ident =
        |back: usize| i >= back && (chars[i - back].is_alphanumeric() || chars[i - back] == '_');
    let rest = &chars[i..];
    match rest {
        ['/', '/', ..] => Some(rest.iter().position(|&c| c == '\n').unwrap_or(rest.len())),
        ['/', '*', ..] => Some(block_comment_len(rest)),
        // r"…", r#"…"#, br"…" (and not the end of an identifier such as `bar`).
        ['r', '"' | '#', ..] if !is_ident(1) || (chars[i - 1] == 'b' && !is_ident(2)) => {
            raw_string_len(rest)
        }
        ['"', ..] => Some(quoted_len(rest, '"')),
        // '{', '\n', '\'': a lifetime (`'a`) has no closing quote.
        ['\'', '\\', ..] | ['\'', _, '\'', ..] => Some(quoted_len(rest, '\'')),
        _ => None,
    }
}

/// A block comment, nested ones included.
fn block_comment_len(rest: &[char]) -> usize {
    let mut depth = 0;
    let mut i = 0;
    while i < rest.len() {
        match rest[i..] {
            ['/', '*', ..] => {
                depth += 1;
                i += 2;
            }
            ['*', '/', ..] => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    rest.len()
}

/// A raw string starting with `r`; `None` for a raw identifier (`r#type`).
fn raw_string_len(rest: &[char]) -> Option<usize> {
    let hashes = rest[1..].iter().take_while(|&&c| c == '#').count();
    if rest.get(1 + hashes) != Some(&'"') {
        return None;
    }
    let body = 2 + hashes;
    let close = (body..rest.len()).find(|&j| {
        rest[j] == '"'
            && rest[j + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == '#')
                .count()
                == hashes
    });
    Some(close.map_or(rest.len(), |j| j + 1 + hashes))
}

/// A string or character literal opened by `quote`, escapes included.
fn quoted_len(rest: &[char], quote: char) -> usize {
    let mut i = 1;
    while i < rest.len() {
        match rest[i] {
            '\\' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    rest.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flagged_sleeps(text: &str, all_test: bool) -> Vec<usize> {
        sleeps(Path::new("t.rs"), text, all_test)
            .into_iter()
            .map(|v| v.line)
            .collect()
    }

    #[test]
    fn a_sleep_that_orders_is_flagged_and_a_poll_is_not() {
        let text = r"
async fn t() {
    tokio::spawn(async { work().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    while !done() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    'outer: loop {
        std::thread::sleep(ms);
    }
    for store in stores() {
        sleep(ms).await;
    }
    while !done() {
        if slow() {
            sleep(ms).await;
        }
    }
}
";
        assert_eq!(flagged_sleeps(text, true), [4, 13, 17]);
    }

    #[test]
    fn a_sleep_may_give_its_reason() {
        let text = "
#[tokio::test(start_paused = true)]
async fn t() {
    // paused clock: the loader takes 50 ms
    sleep(ms).await;
    sleep(ms).await; // paused clock
    // real time: the lease's TTL runs out on the server
    // (500 ms, extended once).
    sleep(ms).await;
    // Any other comment.
    sleep(ms).await;
}
";
        assert_eq!(flagged_sleeps(text, true), [11]);
        let unpaused = text.replace("start_paused = true", "flavor = \"multi_thread\"");
        let flagged = sleeps(Path::new("t.rs"), &unpaused, true);
        assert_eq!(
            flagged.iter().map(|v| v.line).collect::<Vec<_>>(),
            [5, 6, 11]
        );
        assert!(flagged[0].rule.contains("start_paused"), "{flagged:?}");
    }

    #[test]
    fn only_test_code_is_read_and_literals_are_not_code() {
        let text = r##"
fn backoff() { std::thread::sleep(ms); }
const S: &str = "sleep(1) { while";
const R: &str = r#"{ sleep( }"#;
const C: char = '{';
fn f<'a>(x: &'a str) {}
#[cfg(test)]
use super::*;
fn not_test() { sleep(ms); }
/* a { block comment */
#[cfg(test)]
mod tests {
    fn helper() { let _ = "}"; sleep(ms); }
    #[test]
    fn t() { loop { sleep(ms); } }
}
fn after() { sleep(ms); }
"##;
        assert_eq!(flagged_sleeps(text, false), [13]);
        assert_eq!(flagged_sleeps(text, true), [2, 9, 13, 17]);
    }

    fn rule(line: &str) -> Option<&'static str> {
        note_rule(line, false, false)
    }

    #[test]
    fn working_notes_are_flagged() {
        for line in [
            "Measured on a 2-vCPU VM.",
            "as in this session's run",
            "the last run took 3 s",
            "two runs ago it was faster",
            "`cargo xtask bench` at 3ef2921 on a VM",
            "on 2026-12-04, with redis 7",
            "figures of 2026-12",
            "the environment decides (seed 001)",
            "seed 3's response chain",
            "see issue #15",
            "Issue 15 asked for it",
        ] {
            assert!(rule(line).is_some(), "{line}");
        }
        for line in [
            "A measured round of every system.",
            "a random seed of the sampler",
            "issues the request once",
            "a 0xdeadbeef magic number; hash deadbeef",
            "a fingerprint (`key=af63dc4c8601ec8c`)",
            "redis 7.0.15, 2 vCPU, 24 GiB",
            "read from L2 with 1,000 keys",
            "at most 1024 in-flight requests",
        ] {
            assert_eq!(rule(line), None, "{line}");
        }
        assert!(note_rule("- 12% fewer instructions", true, false).is_some());
        assert!(rule("- 12% fewer instructions").is_none());
        assert!(note_rule("## [0.2.0] - 2026-12-04", true, true).is_none());
    }

    #[test]
    fn only_rustdoc_lines_of_rust_files_are_read() {
        let text = "//! Sessions (seed 002).\n// seed 002, a plain comment\n/// Measured on a VM.\nlet seed_1 = 1;\n";
        let lines: Vec<usize> = note_lines(Path::new("lib.rs"), text, Kind::Rustdoc)
            .into_iter()
            .map(|v| v.line)
            .collect();
        assert_eq!(lines, [1, 3]);
    }
}
