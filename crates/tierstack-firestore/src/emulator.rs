//! The credentials of a store that talks to an emulator named in its configuration: the
//! emulator's admin token on every request, and no credential lookup.

use firestore::gcloud_sdk::google_cloud_auth::credentials::{
    CacheableResource, CredentialsProvider, EntityTag,
};
use firestore::gcloud_sdk::google_cloud_auth::errors::CredentialsError;
use firestore::gcloud_sdk::tonic::codegen::http::header::AUTHORIZATION;
use firestore::gcloud_sdk::tonic::codegen::http::{Extensions, HeaderMap, HeaderValue};

/// The emulator's admin credential: security rules do not apply to its requests.
const EMULATOR_AUTHORIZATION: &str = "Bearer owner";

/// Serves the emulator's admin token, always the same (so the client caches it).
#[derive(Debug)]
pub(crate) struct EmulatorCredentials {
    tag: EntityTag,
}

impl EmulatorCredentials {
    pub(crate) fn new() -> Self {
        Self {
            tag: EntityTag::new(),
        }
    }
}

impl CredentialsProvider for EmulatorCredentials {
    async fn headers(
        &self,
        extensions: Extensions,
    ) -> Result<CacheableResource<HeaderMap>, CredentialsError> {
        if extensions.get::<EntityTag>() == Some(&self.tag) {
            return Ok(CacheableResource::NotModified);
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_static(EMULATOR_AUTHORIZATION),
        );
        Ok(CacheableResource::New {
            entity_tag: self.tag.clone(),
            data: headers,
        })
    }

    async fn universe_domain(&self) -> Option<String> {
        None
    }
}
