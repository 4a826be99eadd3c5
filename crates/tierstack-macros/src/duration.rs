//! `ttl = "5m"`: a duration written with its unit.

use syn::LitStr;

/// The milliseconds of `text`: a whole number followed by `ms`, `s`, `m`, `h` or `d`, above
/// zero.
pub(crate) fn millis(text: &LitStr) -> syn::Result<u64> {
    let value = text.value();
    let digits = value
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &value.trim()[digits.len()..];
    let per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 0,
    };
    let millis = digits
        .parse::<u64>()
        .ok()
        .and_then(|count| count.checked_mul(per_unit))
        .filter(|millis| *millis > 0);
    millis.ok_or_else(|| {
        syn::Error::new(
            text.span(),
            "a ttl is a whole number above zero and a unit: \"500ms\", \"30s\", \"5m\", \"2h\" or \"1d\"",
        )
    })
}

#[cfg(test)]
mod tests {
    use proc_macro2::Span;

    use super::*;

    fn parse(text: &str) -> Option<u64> {
        millis(&LitStr::new(text, Span::call_site())).ok()
    }

    #[test]
    fn units() {
        assert_eq!(parse("500ms"), Some(500));
        assert_eq!(parse("30s"), Some(30_000));
        assert_eq!(parse("5m"), Some(300_000));
        assert_eq!(parse("2h"), Some(7_200_000));
        assert_eq!(parse("1d"), Some(86_400_000));
        for bad in [
            "",
            "5",
            "0s",
            "5 minutes",
            "1.5h",
            "-1s",
            "99999999999999999999d",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
