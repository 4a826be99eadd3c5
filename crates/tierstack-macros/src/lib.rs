//! `#[cached]`: the results of an `async fn`, read through a
//! [tierstack](https://docs.rs/tierstack) `TieredCache`.
//!
//! ```
//! use std::sync::LazyLock;
//! use std::time::Duration;
//! use tierstack::{LoadError, TieredCache};
//! use tierstack_macros::cached;
//!
//! static PROFILES: LazyLock<TieredCache<String>> = LazyLock::new(|| {
//!     TieredCache::builder("profiles")
//!         .default_ttl(Duration::from_secs(600))
//!         .build()
//!         .expect("a valid configuration")
//! });
//!
//! /// The profile of a user, from the database on a miss.
//! #[cached(cache = PROFILES, key = "user:{id}")]
//! async fn profile(id: u64) -> Result<String, std::io::Error> {
//!     Ok(format!("profile of {id}")) // SELECT ... WHERE id = $1
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), LoadError<std::io::Error>> {
//! assert_eq!(profile(7).await?, "profile of 7"); // loaded
//! assert_eq!(profile(7).await?, "profile of 7"); // cached
//! invalidate_profile(7).await?; // generated beside it
//! # Ok(())
//! # }
//! ```
//!
//! See [`cached`] for the arguments and what the function becomes.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, ItemFn, Lit, LitStr, Meta, Token};

mod duration;
mod key;
mod signature;

use signature::{Answer, Checked};

/// Caches an `async fn`'s results in a `TieredCache`: a call reads the cache (L1, then L2) and
/// runs the function's body only on a miss, once however many calls for the same key wait for
/// it (single-flight); its value is then written to both tiers.
///
/// # Arguments
///
/// - `cache = EXPR` (required): the cache, any expression that derefs to a
///   `TieredCache<T, _>` whose `T` is the function's value type: a `static` `LazyLock`, a
///   function call, or `self.cache` in a method taking `&self`.
/// - `key = "..."` (required): the entry's key, a format string naming the function's
///   arguments (`"user:{id}"`, `"search:{query:?}:{page}"`). Every placeholder must name an
///   argument: the key is the whole identity of a call. A placeholder is `{x}` (`Display`),
///   `{x:?}` or `{x:#?}` (`Debug`): a spec that rounds or cuts (`{x:.2}`) would let two
///   arguments share a key. The argument's text is its identity: two values that print alike
///   share an entry, so format with a `Display` or `Debug` that tells them apart.
///
///   Keys never mix calls up. Each placeholder stands between separators (ASCII punctuation
///   or whitespace) or at an end of the key, the template's text holds no `%`, and every
///   separator in an argument's text is escaped (`%3A` for `:`, `%2D` for `-`; see
///   `tierstack::core::key::push_key_part`), so an argument is always one whole word of its
///   key: within a template, different arguments give different keys (`("a:b", "c")` and
///   `("a", "b:c")` under `"pair:{a}:{b}"`), and two templates' keys meet only when the
///   templates have the same separators in the same order and, at each word, the same text or
///   a placeholder (`"user:{id}"` never meets `"user:{id}.json"`, `"v1/{a}-{b}"` or
///   `"orders:{id}"`, but meets `"{kind}:{id}"` when `kind` is `user`). Give each function on
///   a cache a template of its own with a leading word of its own, and no template a leading
///   placeholder. Escaping makes keys longer (`%2D` for each `-`): a long `{x:?}` argument
///   can pass the cache's `max_key_len`, and is then refused as `InvalidKey`.
/// - `ttl = "5m"` (optional): the time to live of this function's entries (`ms`, `s`, `m`, `h`
///   or `d`), instead of the cache's default.
/// - `options = EXPR` (optional, not with `ttl`): the call's `EntryOptions` (fail-safe, a hard
///   timeout, skips...), evaluated on each call.
/// - `invalidate = NAME` (optional): the name of the generated invalidation function
///   (default `invalidate_` followed by the function's name).
///
/// # What it generates
///
/// The function keeps its name, arguments and visibility; it returns
/// `Result<T, tierstack::LoadError<E>>` for a body that returns `Result<T, E>` (the body's
/// error is not cached, and reaches every call that waited for it, shared, as
/// `LoadError::Loader(Arc<E>)`), and `Result<T, tierstack::LoadError<Infallible>>` for a body
/// that returns a plain `T` (a cache error, an invalid key say, is still an error). The body
/// runs in the calling task, so it may borrow the arguments and `self`.
///
/// Beside it, `async fn invalidate_NAME(...) -> Result<bool, tierstack::CacheError>` takes the
/// arguments the key names (and `&self` in a method) and deletes that call's entry from both
/// tiers and every instance; `true` if a tier held it.
///
/// Functions with type or const parameters, non-async functions, and methods taking `self` by
/// value or `&mut self` are refused at compile time, as are keys that name no argument or an
/// unknown one.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    match expand(args.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// The macro's arguments.
struct Args {
    cache: Expr,
    key: LitStr,
    ttl: Option<LitStr>,
    options: Option<Expr>,
    invalidate: Option<Ident>,
}

impl Args {
    fn parse(tokens: TokenStream2) -> syn::Result<Self> {
        let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens)?;
        let (mut cache, mut key, mut ttl, mut options, mut invalidate) =
            (None, None, None, None, None);
        for meta in metas {
            let Meta::NameValue(pair) = meta else {
                return Err(syn::Error::new(
                    meta.span(),
                    "expected `name = value` (cache, key, ttl, options or invalidate)",
                ));
            };
            let name = pair
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            let value = pair.value;
            match name.as_str() {
                "cache" => set_once(&mut cache, value, "cache")?,
                "options" => set_once(&mut options, value, "options")?,
                "key" => set_once(&mut key, string(value, "key")?, "key")?,
                "ttl" => set_once(&mut ttl, string(value, "ttl")?, "ttl")?,
                "invalidate" => {
                    let ident = match &value {
                        Expr::Path(path) => path.path.get_ident().cloned(),
                        _ => None,
                    };
                    let ident = ident.ok_or_else(|| {
                        syn::Error::new(value.span(), "`invalidate` takes a function name")
                    })?;
                    set_once(&mut invalidate, ident, "invalidate")?;
                }
                _ => {
                    return Err(syn::Error::new(
                        pair.path.span(),
                        "unknown argument: expected cache, key, ttl, options or invalidate",
                    ));
                }
            }
        }
        let missing = |name: &str| {
            syn::Error::new(Span::call_site(), format!("#[cached] needs `{name} = ...`"))
        };
        let args = Self {
            cache: cache.ok_or_else(|| missing("cache"))?,
            key: key.ok_or_else(|| missing("key"))?,
            ttl,
            options,
            invalidate,
        };
        if let (Some(ttl), Some(_)) = (&args.ttl, &args.options) {
            return Err(syn::Error::new(
                ttl.span(),
                "give either `ttl` or `options` (set the TTL in the options with `with_ttl`)",
            ));
        }
        Ok(args)
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &str) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(
            Span::call_site(),
            format!("`{name}` is given twice"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

fn string(value: Expr, name: &str) -> syn::Result<LitStr> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => Ok(text),
        other => Err(syn::Error::new(
            other.span(),
            format!("`{name}` takes a string literal"),
        )),
    }
}

/// The call's options: from `ttl` over the cache's defaults, or the `options` expression.
fn call_options(ttl: Option<&LitStr>, options: Option<&Expr>) -> syn::Result<Option<TokenStream2>> {
    Ok(match (ttl, options) {
        (Some(ttl), _) => {
            let millis = duration::millis(ttl)?;
            Some(quote! {
                __tierstack_cache
                    .default_options()
                    .with_ttl(::std::time::Duration::from_millis(#millis))
            })
        }
        (None, Some(options)) => Some(quote! { #options }),
        (None, None) => None,
    })
}

/// The expression that builds a call's key from its template: the literal text as written,
/// each argument formatted and then escaped for every separator, so that it is one whole word
/// of the key and two calls with different arguments never share a key.
fn key_builder(template: &key::Template) -> TokenStream2 {
    let reserved = key::separators();
    let pushes = template.segments.iter().map(|segment| match segment {
        key::Segment::Literal(text) => quote! { __tierstack_key.push_str(#text); },
        key::Segment::Argument { name, spec } => {
            let argument = format_ident!("{}", name);
            let format = format!("{{:{spec}}}");
            quote! {
                ::tierstack::core::key::push_key_part(
                    &mut __tierstack_key,
                    &::std::format!(#format, #argument),
                    #reserved,
                );
            }
        }
    });
    quote! {{
        let mut __tierstack_key = ::std::string::String::new();
        #(#pushes)*
        __tierstack_key
    }}
}

fn expand(args: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    let args = Args::parse(args)?;
    let function: ItemFn = syn::parse2(item)?;
    let signature = &function.sig;
    let Checked { receiver, params } = signature::check(signature)?;
    let names: Vec<String> = params.iter().map(|(name, _)| name.to_string()).collect();
    let template = key::parse(&args.key, &names)?;
    let used = &template.used;
    let answer = signature::answer(&signature.output)?;

    let Args {
        cache,
        key: _,
        ttl,
        options,
        invalidate,
    } = &args;
    let (attributes, visibility, block) = (&function.attrs, &function.vis, &function.block);
    let (name, inputs, generics) = (&signature.ident, &signature.inputs, &signature.generics);
    let where_clause = &generics.where_clause;
    let options = call_options(ttl.as_ref(), options.as_ref())?;
    let (output, loader) = match &answer {
        Answer::Fallible { value, error } => (
            quote! { ::core::result::Result<#value, ::tierstack::LoadError<#error>> },
            quote! { move || async move #block },
        ),
        Answer::Plain(value) => (
            quote! { ::core::result::Result<#value, ::tierstack::LoadError<::core::convert::Infallible>> },
            quote! {
                move || async move {
                    ::core::result::Result::<#value, ::core::convert::Infallible>::Ok(
                        async move #block.await,
                    )
                }
            },
        ),
    };
    let call = if let Some(options) = options {
        quote! {
            __tierstack_cache
                .get_or_load_inline(&__tierstack_key, &(#options), #loader)
                .await
        }
    } else {
        quote! { __tierstack_cache.get_or_load(&__tierstack_key, #loader).await }
    };
    let invalidate = invalidate
        .clone()
        .unwrap_or_else(|| format_ident!("invalidate_{}", name));
    let key_params = params
        .iter()
        .filter(|(param, _)| used.contains(&param.to_string()))
        .map(|(param, ty)| quote! { #param: #ty });
    let receiver = receiver.map(|this| quote! { #this, });
    let build_key = key_builder(&template);
    let invalidate_doc = format!(
        "Deletes the entry `{name}` cached for these arguments, from both tiers and every \
         instance; `true` if a tier held it. Generated by `#[cached]`."
    );
    Ok(quote! {
        #(#attributes)*
        #visibility async fn #name #generics (#inputs) -> #output #where_clause {
            let __tierstack_key = #build_key;
            let __tierstack_cache = &#cache;
            #call
        }

        #[doc = #invalidate_doc]
        #visibility async fn #invalidate #generics (#receiver #(#key_params),*)
            -> ::core::result::Result<bool, ::tierstack::CacheError> #where_clause
        {
            let __tierstack_key = #build_key;
            (&#cache).delete(&__tierstack_key).await
        }
    })
}
