//! `tierstack-server`: the cache service. Configured from the environment (see the library's
//! docs); without any API key configured it makes a development key and prints it once.

use std::process::ExitCode;

use tierstack_server::{KeyHash, Server, ServerConfig, TenantName};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_target(false).init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tierstack-server: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ServerConfig::from_env()?;
    if config.keys.is_empty() {
        // A development key: printed here once, on stdout (never logged), kept nowhere.
        let key = tierstack_server::generate_key("dev_")?;
        config
            .keys
            .insert(KeyHash::of(&key), TenantName::new("dev")?);
        println!("no API key configured: tenant \"dev\" has the key {key}");
    }
    let store = tierstack::StoreConfig::from_env()?;
    let backend = store.connect().await?;
    let listen = config.listen;
    let mut server = Server::new(config, backend)?;
    // On Redis, every instance counts rates and quotas there together.
    if let tierstack::StoreConfig::Redis(redis) = &store {
        let counting = tierstack::redis::RedisStore::connect(redis).await?;
        server = server.share_quotas(&counting)?.share_rate_limits(counting);
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "tierstack-server listening");
    let shutdown = async {
        stop_signal().await;
        tracing::info!("shutting down: finishing the requests in flight");
    };
    server.serve(listener, shutdown).await?;
    Ok(())
}

/// Ctrl-C, or SIGTERM (what `docker stop` and Kubernetes send).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
