//! X.509 attestation: gathers the candidates (individual enrollment, X.509 groups, the
//! instance's CA certificates and deny list) and applies `dps_core::x509::verify::attest`.

use crate::engine::Engine;
use dps_core::error::AuthFailure;
use dps_core::ids::RegistrationId;
use dps_core::instance::Instance;
use dps_core::model::{EnrollmentGroup, IndividualEnrollment, X509RegistrationResult};
use dps_core::x509::verify::{attest as decide, X509Candidates, X509Match};
use dps_core::Result;
use std::sync::Arc;

/// Which enrollment admitted the device.
pub(crate) enum X509Source {
    Individual(Box<IndividualEnrollment>),
    Group(Box<EnrollmentGroup>),
}

/// A device admitted by its certificate.
pub(crate) struct X509Admission {
    pub source: X509Source,
    pub disabled_override: bool,
    pub leaf_sha256: String,
    pub result: X509RegistrationResult,
}

pub(crate) async fn attest(
    engine: &Engine,
    inst: &Arc<Instance>,
    rid: &RegistrationId,
    chain: &[Vec<u8>],
) -> Result<X509Admission> {
    let individual = engine.repo.enrollment(&inst.name, rid.as_str()).await?;
    let groups = engine.catalog().groups(&inst.name, "x509").await?;
    let material = engine.catalog().x509(&inst.name).await?;
    let candidates = X509Candidates {
        individual: individual.as_ref(),
        groups: &groups,
        ca_certificates: &material.cas,
        deny: &material.deny,
    };
    let now = engine.now();
    let m = decide(rid.as_str(), chain, &candidates, now).map_err(|f| {
        tracing::info!(registration_id = %rid, reason = %f, code = f.code(), "X.509 attestation refused");
        AuthFailure::from(f)
    })?;
    let leaf = &chain[0];
    let leaf_info = dps_core::x509::certificate_info(leaf).ok();
    let leaf_sha256 = dps_core::x509::sha256_thumbprint(leaf);
    Ok(match m {
        X509Match::Individual(e) => X509Admission {
            source: X509Source::Individual(Box::new(e.clone())),
            disabled_override: false,
            leaf_sha256,
            result: X509RegistrationResult {
                certificate_info: leaf_info,
                enrollment_group_id: None,
                signing_certificate_info: None,
            },
        },
        X509Match::Group {
            group,
            signing_cert_der,
            ..
        } => {
            let signing = dps_core::x509::certificate_info(&signing_cert_der).ok();
            X509Admission {
                source: X509Source::Group(Box::new(group.clone())),
                disabled_override: false,
                leaf_sha256,
                result: X509RegistrationResult {
                    certificate_info: leaf_info,
                    enrollment_group_id: Some(group.enrollment_group_id.clone()),
                    signing_certificate_info: signing,
                },
            }
        }
    })
}
