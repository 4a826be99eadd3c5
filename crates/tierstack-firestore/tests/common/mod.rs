//! The Firestore emulator of the test run: the one `cargo xtask ci` started, or one this test
//! process starts for itself.
#![allow(dead_code, unreachable_pub)]

use tierstack_firestore::FirestoreConfig;

/// A store configuration on the emulator of the run, in `collection`.
pub fn config(collection: &str) -> FirestoreConfig {
    let (host, project) = tierstack_test_support::firestore::emulator();
    FirestoreConfig::new(&project)
        .emulator_host(&host)
        .collection(collection)
}

/// The store's own emulator credentials, for a raw client.
#[path = "../../src/emulator.rs"]
mod emulator;

/// A raw Firestore client of the run's emulator, for a test that writes documents behind the
/// store's back.
///
/// # Panics
///
/// If it cannot connect.
pub async fn raw_client() -> firestore::FirestoreDb {
    use firestore::gcloud_sdk::google_cloud_auth::credentials::Credentials;
    let (host, project) = tierstack_test_support::firestore::emulator();
    let options =
        firestore::FirestoreDbOptions::new(project).with_firebase_api_url(format!("http://{host}"));
    let credentials = Credentials::from(emulator::EmulatorCredentials::new());
    firestore::FirestoreDb::with_options_auth(options, credentials)
        .await
        .unwrap_or_else(|error| panic!("no raw client of the emulator: {error}"))
}
