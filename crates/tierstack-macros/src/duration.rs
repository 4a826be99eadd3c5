//! `ttl = "5m"`: a duration written with its unit.

use syn::LitStr;

/// The longest TTL a cache takes (`tierstack_core::store::MAX_TTL`, ten years of 365 days):
/// a longer one is refused here rather than by every call.
const MAX_TTL_MILLIS: u64 = 10 * 365 * 86_400_000;

/// The milliseconds of `text`: a whole number followed by `ms`, `s`, `m`, `h` or `d`, above
/// zero and at most ten years.
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
    match millis {
        Some(millis) if millis > MAX_TTL_MILLIS => Err(syn::Error::new(
            text.span(),
            "a ttl is at most ten years (3650d)",
        )),
        Some(millis) => Ok(millis),
        None => Err(syn::Error::new(
            text.span(),
            "a ttl is a whole number above zero and a unit: \"500ms\", \"30s\", \"5m\", \"2h\" or \"1d\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use proc_macro2::Span;

    use super::*;

    fn parse(text: &str) -> Option<u64> {
        millis(&LitStr::new(text, Span::call_site())).ok()
    }

    #[test]
    fn the_longest_ttl_is_the_caches() {
        assert_eq!(
            u128::from(MAX_TTL_MILLIS),
            tierstack::core::store::MAX_TTL.as_millis()
        );
    }

    #[test]
    fn units() {
        assert_eq!(parse("500ms"), Some(500));
        assert_eq!(parse("30s"), Some(30_000));
        assert_eq!(parse("5m"), Some(300_000));
        assert_eq!(parse("2h"), Some(7_200_000));
        assert_eq!(parse("1d"), Some(86_400_000));
        assert_eq!(parse("3650d"), Some(MAX_TTL_MILLIS));
        for bad in [
            "",
            "5",
            "0s",
            "5 minutes",
            "1.5h",
            "-1s",
            "99999999999999999999d",
            "3651d",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
