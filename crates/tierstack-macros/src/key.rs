//! The key's template: literal text and placeholders, each naming one of the function's
//! arguments (`"user:{id}"`, `"search:{query:?}:{page}"`).

use syn::LitStr;

/// The separators every template's arguments are escaped for.
const ALWAYS_RESERVED: &str = ":/";

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

impl Template {
    /// The characters an argument's text is escaped for (beside `%`): the first character of
    /// each literal between two arguments, so that an argument never holds the start of the
    /// separator after it and a key reads back into its arguments one way only; and `:` and
    /// `/` always, so that an argument cannot pass for more of another template that starts
    /// alike (`"user:{id}"` with `7:x` against `"user:{id}:{tab}"` with `7` and `x`).
    pub(crate) fn reserved(&self) -> String {
        let mut reserved = String::from(ALWAYS_RESERVED);
        for (index, segment) in self.segments.iter().enumerate() {
            let between = index > 0 && index + 1 < self.segments.len();
            if let (true, Segment::Literal(text)) = (between, segment)
                && let Some(first) = text.chars().next()
                && !reserved.contains(first)
            {
                reserved.push(first);
            }
        }
        reserved
    }
}

/// Reads `key`; an error names the first placeholder that is positional or names no
/// argument of `params`, or two placeholders with nothing between them.
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
                if literal.is_empty() && matches!(segments.last(), Some(Segment::Argument { .. })) {
                    return fail(format!(
                        "put a separator before `{{{inside}}}` (as in \"{{a}}:{{b}}\"): two \
                         placeholders side by side let different calls share a key"
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
            other => literal.push(other),
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
        assert_eq!(template.reserved(), ":/");
        let paths = check("v1/{a}-{b}.json", &["a", "b"]).unwrap();
        assert_eq!(paths.reserved(), ":/-");
        assert_eq!(check("user:{id}", &["id"]).unwrap().reserved(), ":/");
        assert_eq!(check("{a:#?}|{b}", &["a", "b"]).unwrap().reserved(), ":/|");
        let braces = check("{{literal}}/{id}", &["id"]).unwrap();
        assert_eq!(
            braces.segments,
            [Segment::Literal("{literal}/".into()), argument("id", "")]
        );
        assert!(check("constant", &[]).unwrap().used.is_empty());
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
        assert!(error("user:{id:.2}", &["id"]).contains("format spec"));
        assert!(error("user:{id:>5}", &["id"]).contains("format spec"));
        assert!(error("{a}%2{b}", &["a", "b"]).contains("`%`"));
        assert!(error("100%:{a}", &["a"]).contains("`%`"));
    }
}
