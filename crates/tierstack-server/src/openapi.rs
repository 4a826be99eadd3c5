//! The `OpenAPI` 3.1 document of the routes, served at `/openapi.json`. `ROUTES` is the list the
//! router is checked against (`tests/openapi.rs` calls every route the document names).

use serde_json::{Value, json};

/// Every route: method, path, summary, and whether the admin credential is needed.
pub(crate) const ROUTES: &[(&str, &str, &str, bool)] = &[
    (
        "put",
        "/v1/cache/{key}",
        "Store the body's bytes under key (one TTL: ttl or x-ttl in seconds, or ttl_ms; If-None-Match: * creates only; other preconditions answer 400)",
        false,
    ),
    (
        "get",
        "/v1/cache/{key}",
        "The bytes under key, with x-ttl-ms",
        false,
    ),
    ("delete", "/v1/cache/{key}", "Delete key", false),
    (
        "get",
        "/v1/cache/{key}/exists",
        "Whether key holds a value (HEAD too)",
        false,
    ),
    (
        "post",
        "/v1/cache/{key}/touch",
        "Give key a new TTL from now",
        false,
    ),
    (
        "delete",
        "/v1/cache",
        "Delete the tenant's keys under prefix (409 prefix_delete_running while another of the tenant's runs)",
        false,
    ),
    ("post", "/v1/bulk/get", "Read many keys", false),
    ("post", "/v1/bulk/set", "Write many keys", false),
    (
        "post",
        "/v1/cache/{key}/cas",
        "Replace or remove key only if it holds the given bytes",
        false,
    ),
    (
        "post",
        "/v1/admin/tenants/{tenant}/keys",
        "Create an API key for tenant (shown once)",
        true,
    ),
    (
        "delete",
        "/v1/admin/keys/{id}",
        "Revoke a created API key",
        true,
    ),
    (
        "delete",
        "/v1/admin/tenants/{tenant}/cache",
        "Delete every entry of tenant",
        true,
    ),
    (
        "get",
        "/v1/admin/tenants/{tenant}/usage",
        "This instance's counts for tenant, and its usage against its quota",
        true,
    ),
    (
        "get",
        "/v1/admin/tenants/{tenant}/entries/{key}",
        "An entry's size, TTL and tier, without its value",
        true,
    ),
    ("get", "/metrics", "Prometheus metrics", true),
    ("get", "/healthz", "The process is up", false),
    ("get", "/readyz", "The backend answers", false),
    ("get", "/openapi.json", "This document", false),
];

fn parameters(method: &str, path: &str) -> Vec<Value> {
    let mut found: Vec<Value> = path
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    if path == "/v1/cache" {
        found.push(json!({"name": "prefix", "in": "query", "required": true, "schema": {"type": "string"}}));
    }
    // The TTL of a write: one of these (two answer 400 invalid_ttl).
    if (method, path) == ("post", "/v1/cache/{key}/touch")
        || (method, path) == ("put", "/v1/cache/{key}")
    {
        found.push(json!({"name": "ttl", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1}}));
        found.push(json!({"name": "ttl_ms", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1}}));
        found.push(json!({"name": "x-ttl", "in": "header", "required": false, "schema": {"type": "integer", "minimum": 1}}));
    }
    if (method, path) == ("put", "/v1/cache/{key}") {
        found.push(json!({"name": "If-None-Match", "in": "header", "required": false, "schema": {"type": "string", "enum": ["*"]}}));
    }
    found
}

/// The document.
pub(crate) fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, admin) in ROUTES {
        let open = matches!(*path, "/healthz" | "/readyz" | "/openapi.json");
        let mut operation = json!({
            "summary": summary,
            "parameters": parameters(method, path),
            "responses": {
                "default": {"description": "an error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if !open {
            operation["security"] = json!([{ "bearer": [] }]);
            operation["x-admin"] = json!(admin);
        }
        let entry = paths.entry((*path).to_owned()).or_insert_with(|| json!({}));
        entry[*method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "tierstack-server", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "object", "properties": {
                        "code": {"type": "string"}, "message": {"type": "string"}
                    }}}
                }
            }
        }
    })
}
