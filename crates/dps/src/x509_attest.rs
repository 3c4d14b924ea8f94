//! X.509 attestation: gathers the candidates (individual enrollment, X.509 groups, the
//! instance's CA certificates and deny list) and applies `dps_core::x509::verify`.

use crate::engine::Engine;
use dps_core::error::AuthFailure;
use dps_core::ids::RegistrationId;
use dps_core::instance::Instance;
use dps_core::model::{EnrollmentGroup, IndividualEnrollment, X509RegistrationResult};
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
    _engine: &Engine,
    _inst: &Arc<Instance>,
    _rid: &RegistrationId,
    _chain: &[Vec<u8>],
) -> Result<X509Admission> {
    Err(AuthFailure::Certificate("X.509 attestation is not enabled in this build".into()).into())
}
