//! Typed access to the store: enrollments, groups, registration records, instances, hub
//! devices, CA certificates and the deny list, as JSON documents with indexed attributes.

use dps_core::model::{
    EnrollmentGroup, EnrollmentSettings, IndividualEnrollment, RegistrationRecord,
};
use dps_core::store::{Collection, Doc, DocIndex, Expect, Filter, Page, Store, StoreError};
use dps_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

/// Typed repository over a [`Store`].
#[derive(Clone)]
pub struct Repo {
    /// The store.
    pub store: Arc<dyn Store>,
}

fn decode<T: DeserializeOwned>(doc: &Doc) -> Result<T> {
    serde_json::from_str(&doc.body)
        .map_err(|e| Error::Store(StoreError::Corrupt(format!("{}: {e}", doc.id))))
}

fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("model types always serialize")
}

/// Index attributes of an individual enrollment or a group (from their shared settings).
pub fn settings_index(s: &EnrollmentSettings) -> DocIndex {
    DocIndex {
        status: Some(
            s.provisioning_status
                .unwrap_or_default()
                .as_str()
                .to_string(),
        ),
        kind: Some(s.attestation.kind.as_str().to_string()),
        group: None,
        hub: None,
    }
}

/// Index attributes of a registration record.
pub fn registration_index(r: &RegistrationRecord) -> DocIndex {
    DocIndex {
        status: r.state.status.map(|s| s.as_str().to_string()),
        // Not indexed: no query filters registrations by attestation type, and every index
        // attribute is an index entry written by every registration.
        kind: None,
        group: r
            .enrollment_group_id
            .as_ref()
            .map(|g| g.to_ascii_lowercase()),
        // An intent counts on the hub it is about to write (capacity reservations, see
        // `dps_core::store::Write::HubCapacity`).
        hub: match (&r.state.status, &r.pending) {
            (Some(dps_core::model::RegistrationStatus::Assigning), Some(p)) => {
                Some(p.hub.to_ascii_lowercase())
            }
            _ => r
                .state
                .assigned_hub
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
        },
    }
}

impl Repo {
    /// Wrap a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Repo { store }
    }

    /// Get and decode.
    pub async fn get<T: DeserializeOwned>(
        &self,
        c: Collection,
        scope: &str,
        id: &str,
    ) -> Result<Option<(T, String)>> {
        match self.store.get(c, scope, id).await? {
            Some(doc) => Ok(Some((decode(&doc)?, doc.etag))),
            None => Ok(None),
        }
    }

    /// Encode and put.
    /// The stored document of `v`, for a batch (`Write::Put`).
    pub fn doc<T: Serialize>(id: &str, etag: &str, v: &T, index: DocIndex) -> Doc {
        Doc {
            id: id.to_string(),
            etag: etag.to_string(),
            body: encode(v),
            index,
        }
    }

    pub async fn put<T: Serialize>(
        &self,
        c: Collection,
        scope: &str,
        id: &str,
        etag: &str,
        v: &T,
        index: DocIndex,
        expect: Expect,
    ) -> Result<(), StoreError> {
        self.store
            .put(
                c,
                scope,
                Doc {
                    id: id.to_string(),
                    etag: etag.to_string(),
                    body: encode(v),
                    index,
                },
                expect,
            )
            .await
    }

    /// Query and decode a page.
    pub async fn query<T: DeserializeOwned>(
        &self,
        c: Collection,
        scope: &str,
        filter: &Filter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(T, String)>, Option<String>)> {
        let Page { docs, next } = self.store.query(c, scope, filter, after, limit).await?;
        let mut out = Vec::with_capacity(docs.len());
        for d in &docs {
            out.push((decode(d)?, d.etag.clone()));
        }
        Ok((out, next))
    }

    /// All documents matching a filter (for small collections: groups, certificates).
    pub async fn all<T: DeserializeOwned>(
        &self,
        c: Collection,
        scope: &str,
        filter: &Filter,
    ) -> Result<Vec<(T, String)>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (items, next) = self
                .query::<T>(c, scope, filter, after.as_deref(), 500)
                .await?;
            out.extend(items);
            match next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// An individual enrollment with its etag.
    pub async fn enrollment(
        &self,
        instance: &str,
        id: &str,
    ) -> Result<Option<IndividualEnrollment>> {
        Ok(self
            .get::<IndividualEnrollment>(Collection::Enrollment, instance, id)
            .await?
            .map(|(mut e, etag)| {
                e.settings.etag = Some(etag);
                e
            }))
    }

    /// Does the instance have any individual enrollment?
    pub async fn any_individual_enrollment(&self, instance: &str) -> Result<bool> {
        let page = self
            .store
            .query(
                Collection::Enrollment,
                instance,
                &Filter::default(),
                None,
                1,
            )
            .await?;
        Ok(!page.docs.is_empty())
    }

    /// Groups of one attestation type.
    pub async fn groups_of_kind(&self, instance: &str, kind: &str) -> Result<Vec<EnrollmentGroup>> {
        let filter = Filter {
            kind: Some(kind.to_string()),
            ..Default::default()
        };
        Ok(self
            .all::<EnrollmentGroup>(Collection::Group, instance, &filter)
            .await?
            .into_iter()
            .map(|(mut g, etag)| {
                g.settings.etag = Some(etag);
                g
            })
            .collect())
    }

    /// A registration record with its etag.
    pub async fn registration(
        &self,
        instance: &str,
        id: &str,
    ) -> Result<Option<(RegistrationRecord, String)>> {
        self.get::<RegistrationRecord>(Collection::Registration, instance, id)
            .await
    }

    /// The stored document of a registration record with a new ETag (also set on `rec`), for
    /// a batch. The caller draws the ETag from its injected `Random`.
    pub fn registration_doc(rec: &mut RegistrationRecord, etag: String) -> Doc {
        rec.state.etag = Some(etag.clone());
        Doc {
            id: rec.state.registration_id.clone(),
            etag,
            body: encode(&*rec),
            index: registration_index(rec),
        }
    }

    /// Write a registration record with a new ETag under a condition (the engine's writes are
    /// compare-and-set on the version it read, so that nodes sharing the store serialize per
    /// device). The caller draws the ETag from its injected `Random`.
    pub async fn put_registration(
        &self,
        instance: &str,
        rec: &mut RegistrationRecord,
        etag: String,
        expect: Expect,
    ) -> Result<()> {
        rec.state.etag = Some(etag.clone());
        let id = rec.state.registration_id.clone();
        self.put(
            Collection::Registration,
            instance,
            &id,
            &etag,
            rec,
            registration_index(rec),
            expect,
        )
        .await?;
        Ok(())
    }
}
