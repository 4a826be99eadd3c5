//! The key's format string: every placeholder must name one of the function's arguments.

use syn::LitStr;

/// The names of the arguments `key` refers to, each once, in order; an error naming the
/// first placeholder that is positional or names no argument of `params`.
pub(crate) fn placeholders(key: &LitStr, params: &[String]) -> syn::Result<Vec<String>> {
    let text = key.value();
    let fail = |message: String| Err(syn::Error::new(key.span(), message));
    let mut used: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
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
                let name = inside.split(':').next().unwrap_or_default().trim();
                if name.is_empty() || name.chars().all(|c| c.is_ascii_digit()) {
                    return fail(format!(
                        "name the argument in `{{{inside}}}`: a key's placeholders name the \
                         function's arguments, as in \"user:{{id}}\""
                    ));
                }
                if !params.iter().any(|param| param == name) {
                    return fail(format!(
                        "the key names `{name}`, which is not an argument of the function"
                    ));
                }
                if !used.iter().any(|seen| seen == name) {
                    used.push(name.to_owned());
                }
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
            }
            '}' => return fail("an unmatched `}` in the key (write `}}`)".into()),
            _ => {}
        }
    }
    if used.is_empty() && !params.is_empty() {
        return fail(
            "the key names none of the arguments: every call would share one entry".into(),
        );
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use proc_macro2::Span;

    use super::*;

    fn check(key: &str, params: &[&str]) -> Result<Vec<String>, String> {
        let params: Vec<String> = params.iter().map(ToString::to_string).collect();
        placeholders(&LitStr::new(key, Span::call_site()), &params).map_err(|e| e.to_string())
    }

    #[test]
    fn placeholders_name_arguments() {
        assert_eq!(
            check("user:{id}:{page:?}:{id}", &["id", "page", "unused"]),
            Ok(vec!["id".to_owned(), "page".to_owned()])
        );
        assert_eq!(
            check("{{literal}}:{id}", &["id"]),
            Ok(vec!["id".to_owned()])
        );
        assert_eq!(check("constant", &[]), Ok(vec![]));
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        assert!(check("user:{}", &["id"]).is_err_and(|e| e.contains("name the argument")));
        assert!(check("user:{0}", &["id"]).is_err_and(|e| e.contains("name the argument")));
        assert!(check("user:{name}", &["id"]).is_err_and(|e| e.contains("`name`")));
        assert!(check("user:{id", &["id"]).is_err_and(|e| e.contains("unclosed")));
        assert!(check("user:id}", &["id"]).is_err_and(|e| e.contains("unmatched")));
        assert!(check("user", &["id"]).is_err_and(|e| e.contains("none of the arguments")));
    }
}
