//! What `#[cached]` accepts of a function's signature, and what its body answers.

use syn::spanned::Spanned;
use syn::{
    FnArg, GenericArgument, GenericParam, Ident, Pat, PathArguments, Receiver, ReturnType,
    Signature, Type,
};

/// A signature `#[cached]` accepts: its `&self`, if a method, and its named arguments.
pub(crate) struct Checked<'a> {
    pub(crate) receiver: Option<&'a Receiver>,
    pub(crate) params: Vec<(Ident, &'a Type)>,
}

/// Refuses what `#[cached]` does not support: a non-async function, type or const
/// parameters, `self` by value or `&mut self`.
pub(crate) fn check(signature: &Signature) -> syn::Result<Checked<'_>> {
    if signature.asyncness.is_none() {
        return Err(syn::Error::new(
            signature.fn_token.span(),
            "#[cached] goes on an `async fn`",
        ));
    }
    if let Some(param) = signature
        .generics
        .params
        .iter()
        .find(|param| !matches!(param, GenericParam::Lifetime(_)))
    {
        return Err(syn::Error::new(
            param.span(),
            "#[cached] does not take type or const parameters: its cache holds one value type",
        ));
    }
    let mut receiver = None;
    let mut params = Vec::new();
    for input in &signature.inputs {
        match input {
            FnArg::Receiver(this) => {
                if this.reference.is_none() || this.mutability.is_some() {
                    return Err(syn::Error::new(
                        this.span(),
                        "#[cached] methods take `&self`: concurrent calls share one load",
                    ));
                }
                receiver = Some(this);
            }
            FnArg::Typed(typed) => {
                if let Pat::Ident(pattern) = typed.pat.as_ref() {
                    params.push((pattern.ident.clone(), typed.ty.as_ref()));
                }
            }
        }
    }
    Ok(Checked { receiver, params })
}

/// What the function's body answers: `Result<T, E>`, or a plain `T`.
pub(crate) enum Answer {
    Fallible { value: Box<Type>, error: Box<Type> },
    Plain(Box<Type>),
}

pub(crate) fn answer(output: &ReturnType) -> syn::Result<Answer> {
    let ty = match output {
        ReturnType::Type(_, ty) => ty.as_ref(),
        ReturnType::Default => {
            return Err(syn::Error::new(
                output.span(),
                "#[cached] caches what a function returns: this one returns nothing",
            ));
        }
    };
    if let Type::Path(path) = ty
        && let Some(last) = path.path.segments.last().filter(|s| s.ident == "Result")
    {
        let PathArguments::AngleBracketed(generics) = &last.arguments else {
            return Err(result_needs_error(ty));
        };
        let types: Vec<&Type> = generics
            .args
            .iter()
            .filter_map(|arg| match arg {
                GenericArgument::Type(ty) => Some(ty),
                _ => None,
            })
            .collect();
        return match types.as_slice() {
            [value, error] => Ok(Answer::Fallible {
                value: Box::new((*value).clone()),
                error: Box::new((*error).clone()),
            }),
            _ => Err(result_needs_error(ty)),
        };
    }
    Ok(Answer::Plain(Box::new(ty.clone())))
}

fn result_needs_error(ty: &Type) -> syn::Error {
    syn::Error::new(
        ty.span(),
        "write the error type out (`Result<T, E>`): #[cached] returns `Result<T, LoadError<E>>`",
    )
}
