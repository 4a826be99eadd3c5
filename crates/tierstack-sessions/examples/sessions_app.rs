//! A small axum app with server-side sessions in a tierstack cache: `POST /login?user=NAME`
//! starts a signed-in session (with a new id, against session fixation), `GET /counter`
//! counts the session's visits, `POST /logout` ends it on every instance, and
//! `POST /logout-everywhere` ends every session of its user (each browser they signed in from).
//!
//! Run on the embedded default, or with the sessions in Redis or Firestore (then start two
//! instances on two ports: a session started on one is served by the other, and a logout on
//! one is seen by both):
//!
//! ```text
//! cargo run -p tierstack-sessions --example sessions_app -- 127.0.0.1:3000
//! CACHE_BACKEND=redis REDIS_URL=redis://127.0.0.1:6379 cargo run -p tierstack-sessions --example sessions_app
//! CACHE_BACKEND=firestore FIRESTORE_PROJECT_ID=... cargo run -p tierstack-sessions --example sessions_app
//! ```

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use tierstack::StoreConfig;
use tierstack_sessions::{TieredSessionStore, cache_builder};
use tower_sessions::{Expiry, Session, SessionManagerLayer};

/// The app's routes over `store`; sessions end after `idle` without a request.
pub(crate) fn router(store: TieredSessionStore, idle: time::Duration) -> Router {
    // Each session is tagged with the user `login` stores, so that all of a user's sessions
    // can be ended at once.
    let store = store.with_user_field("user");
    let sessions = SessionManagerLayer::new(store.clone())
        .with_secure(false)
        .with_expiry(Expiry::OnInactivity(idle));
    Router::new()
        .route("/login", post(login))
        .route("/counter", get(counter))
        .route("/logout", post(logout))
        .route("/logout-everywhere", post(logout_everywhere))
        .layer(sessions)
        .with_state(store)
}

async fn login(session: Session, Query(query): Query<HashMap<String, String>>) -> String {
    let user = query
        .get("user")
        .cloned()
        .unwrap_or_else(|| "anonymous".into());
    // A new id at sign-in: an id planted before it (session fixation) is worth nothing after.
    if session.cycle_id().await.is_err() || session.insert("user", &user).await.is_err() {
        return "the session store failed".into();
    }
    format!("signed in as {user}")
}

async fn counter(session: Session) -> String {
    let user: Option<String> = session.get("user").await.ok().flatten();
    let visits: u64 = session.get("visits").await.ok().flatten().unwrap_or(0) + 1;
    if session.insert("visits", visits).await.is_err() {
        return "the session store failed".into();
    }
    format!("{}: {visits}", user.as_deref().unwrap_or("anonymous"))
}

async fn logout(session: Session) -> &'static str {
    match session.flush().await {
        Ok(()) => "signed out",
        Err(_) => "the session store failed",
    }
}

/// Ends every session of the signed-in user, on every instance (a password change would).
async fn logout_everywhere(State(store): State<TieredSessionStore>, session: Session) -> String {
    let Some(user) = session.get::<String>("user").await.ok().flatten() else {
        return "not signed in".into();
    };
    match store.end_user_sessions(&user).await {
        Ok(()) => format!("signed {user} out everywhere"),
        Err(_) => "the session store failed".into(),
    }
}

#[allow(dead_code, reason = "the tests use `router` alone")]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into());
    // CACHE_BACKEND=memory (the default) | redis | firestore, and each backend's settings.
    let backend = StoreConfig::from_env()?.connect().await?;
    let cache = backend.apply(cache_builder("sessions")).build()?;
    let app = router(TieredSessionStore::new(cache), time::Duration::hours(1));
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
