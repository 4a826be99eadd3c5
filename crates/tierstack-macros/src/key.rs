//! The key's template: literal text and placeholders, each naming one of the function's
//! arguments (`"user:{id}"`, `"search:{query:?}:{page}"`).

use syn::LitStr;

/// Whether `c` separates a key's words: ASCII punctuation and whitespace. Arguments are
/// escaped for every one of them, and a placeholder stands between them (or at an end of the
/// key), so an argument is always one whole word of its key.
pub(crate) fn is_separator(c: char) -> bool {
    c.is_ascii_punctuation() || c.is_ascii_whitespace()
}

/// Every separator, as the set `push_key_part` escapes in an argument's text.
pub(crate) fn separators() -> String {
    (0..=127u8)
        .map(char::from)
        .filter(|&c| is_separator(c))
        .collect()
}

/// The format specs a placeholder may have: each keeps every distinction between values
/// (`{x:.2}` would round two prices into one key; `{s:.3}` cut two names into one).
const SPECS: [&str; 3] = ["", "?", "#?"];

/// One piece of a key's template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Text kept as written (`{{` and `}}` read as braces).
    Literal(String),
    /// An argument, formatted with `spec` (what follows the `:` in `{page:?}`, or nothing)
    /// and escaped so that it cannot pass for the template's separators.
    Argument { name: String, spec: String },
}

/// A key's template, read.
#[derive(Debug)]
pub(crate) struct Template {
    pub(crate) segments: Vec<Segment>,
    /// The arguments it names, each once, in order.
    pub(crate) used: Vec<String>,
}

/// Reads `key`; an error names the first placeholder that is positional, names no argument
/// of `params`, or does not stand between separators (two placeholders side by side, or a
/// word character next to one).
pub(crate) fn parse(key: &LitStr, params: &[String]) -> syn::Result<Template> {
    let text = key.value();
    let fail = |message: String| Err(syn::Error::new(key.span(), message));
    let mut segments: Vec<Segment> = Vec::new();
    let mut literal = String::new();
    let mut used: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '{' => {
                let mut inside = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => inside.push(c),
                        None => return fail("an unclosed `{` in the key".into()),
                    }
                }
                let (name, spec) = match inside.split_once(':') {
                    Some((name, spec)) => (name.trim(), spec.to_owned()),
                    None => (inside.trim(), String::new()),
                };
                if name.is_empty() || name.chars().all(|c| c.is_ascii_digit()) {
                    return fail(format!(
                        "name the argument in `{{{inside}}}`: a key's placeholders name the \
                         function's arguments, as in \"user:{{id}}\""
                    ));
                }
                if !SPECS.contains(&spec.as_str()) {
                    return fail(format!(
                        "`{{{inside}}}`: a placeholder is `{{{name}}}`, `{{{name}:?}}` or \
                         `{{{name}:#?}}`; a format spec that rounds, cuts or pads lets \
                         different arguments share a key"
                    ));
                }
                if !params.iter().any(|param| param == name) {
                    return fail(format!(
                        "the key names `{name}`, which is not an argument of the function"
                    ));
                }
                let after_argument =
                    literal.is_empty() && matches!(segments.last(), Some(Segment::Argument { .. }));
                if after_argument || literal.chars().last().is_some_and(|c| !is_separator(c)) {
                    return fail(format!(
                        "put a separator (ASCII punctuation such as `:` or `/`) right before \
                         `{{{inside}}}`, as in \"user:{{id}}\" or \"{{a}}:{{b}}\": an argument \
                         must be a whole word of the key, or different calls could share one"
                    ));
                }
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(Segment::Argument {
                    name: name.to_owned(),
                    spec,
                });
                if !used.iter().any(|seen| seen == name) {
                    used.push(name.to_owned());
                }
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '}' => return fail("an unmatched `}` in the key (write `}}`)".into()),
            '%' => {
                return fail(
                    "a `%` in the key's text could read as an argument's escape (`%3A`): \
                     leave it out of the template"
                        .into(),
                );
            }
            other => {
                if literal.is_empty()
                    && !is_separator(other)
                    && let Some(Segment::Argument { name, .. }) = segments.last()
                {
                    return fail(format!(
                        "put a separator (ASCII punctuation such as `:` or `.`) right after \
                         `{{{name}}}`, before `{other}`: an argument must be a whole word of \
                         the key, or different calls could share one"
                    ));
                }
                literal.push(other);
            }
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    if used.is_empty() && !params.is_empty() {
        return fail(
            "the key names none of the arguments: every call would share one entry".into(),
        );
    }
    Ok(Template { segments, used })
}

#[cfg(test)]
mod tests {
    use proc_macro2::Span;

    use super::*;

    fn check(key: &str, params: &[&str]) -> Result<Template, String> {
        let params: Vec<String> = params.iter().map(ToString::to_string).collect();
        parse(&LitStr::new(key, Span::call_site()), &params).map_err(|e| e.to_string())
    }

    fn argument(name: &str, spec: &str) -> Segment {
        Segment::Argument {
            name: name.into(),
            spec: spec.into(),
        }
    }

    #[test]
    fn placeholders_name_arguments() {
        let template = check("user:{id}:{page:?}:{id}", &["id", "page", "unused"]).unwrap();
        assert_eq!(template.used, ["id", "page"]);
        assert_eq!(
            template.segments,
            [
                Segment::Literal("user:".into()),
                argument("id", ""),
                Segment::Literal(":".into()),
                argument("page", "?"),
                Segment::Literal(":".into()),
                argument("id", ""),
            ]
        );
        let paths = check("v1/{a}-{b}.json", &["a", "b"]).unwrap();
        assert_eq!(paths.used, ["a", "b"]);
        assert!(check("{a:#?}|{b}", &["a", "b"]).is_ok());
        assert!(check("report {year} {month}", &["year", "month"]).is_ok());
        let braces = check("{{literal}}/{id}", &["id"]).unwrap();
        assert_eq!(
            braces.segments,
            [Segment::Literal("{literal}/".into()), argument("id", "")]
        );
        assert!(check("constant", &[]).unwrap().used.is_empty());
    }

    #[test]
    fn separators_are_ascii_punctuation_and_whitespace() {
        let all = separators();
        for c in [':', '/', '-', '.', '_', '%', '{', ' ', '\t'] {
            assert!(all.contains(c), "{c:?}");
        }
        for c in ['a', 'Z', '0', '\u{e9}', '\u{2013}'] {
            assert!(!all.contains(c), "{c:?}");
        }
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        let error = |key, params| check(key, params).err().unwrap_or_default();
        assert!(error("user:{}", &["id"]).contains("name the argument"));
        assert!(error("user:{0}", &["id"]).contains("name the argument"));
        assert!(error("user:{name}", &["id"]).contains("`name`"));
        assert!(error("user:{id", &["id"]).contains("unclosed"));
        assert!(error("user:id}", &["id"]).contains("unmatched"));
        assert!(error("user", &["id"]).contains("none of the arguments"));
        assert!(error("{a}{b}", &["a", "b"]).contains("separator"));
        assert!(error("user{id}", &["id"]).contains("right before `{id}`"));
        assert!(error("user:{id}x", &["id"]).contains("right after `{id}`"));
        assert!(error("{a}:{b}json", &["a", "b"]).contains("right after `{b}`"));
        assert!(error("user:{id:.2}", &["id"]).contains("format spec"));
        assert!(error("user:{id:>5}", &["id"]).contains("format spec"));
        assert!(error("{a}%2{b}", &["a", "b"]).contains("`%`"));
        assert!(error("100%:{a}", &["a"]).contains("`%`"));
    }
}
