//! The one route table of the HTTPS front end, and the central authorization that uses it.
//!
//! Every route of the device API, the service API, the admin API (with its certificate and
//! deny-list routes) and the public endpoints is one [`Route`]: method, path pattern, family,
//! what access it needs and the operation the handlers run. The dispatcher
//! ([`crate::http::route`]) finds the route, then, for a service or admin route, verifies the
//! service SAS token and the route's [`Right`] *before the body is read*: a refused caller gets
//! Azure's 401 error body without the server reading its upload. Handlers receive the verified
//! [`Caller`] and dispatch on [`Op`]; none of them checks a right itself. What stays in the
//! admin handlers is the *target* check (a token acts on its own instance; a token of the admin
//! instance on every instance), which depends on the path's instance name, not on the right.
//!
//! Patterns: `/`-separated segments; `{name}` matches any one segment; literal segments match
//! ASCII-case-insensitively (paths are case-insensitive, §7.2). A request path is
//! percent-decoded per segment and may carry a trailing slash. Within a family, routes are tried
//! in table order; a literal route is listed before a wildcard route of the same shape.

use crate::app::App;
use crate::usecases::Caller;
use axum::http::{header, HeaderMap, Method};
use dps_core::error::AuthFailure;
use dps_core::instance::Right;
use dps_core::sas::SasToken;
use dps_core::Error;

/// Which API a route belongs to (the first path segment decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `/{idScope}/registrations/...`: devices, authenticated by the registration engine with
    /// the device's own credential (SAS token, X.509 certificate, TPM).
    Device,
    /// `/enrollments`, `/enrollmentGroups`, `/registrations`: the service API.
    Service,
    /// `/admin/...`: instances, linked hubs, access policies, hub devices, audit.
    Admin,
    /// `/admin/instances/{name}/certificates|denylist...`: CA certificates and the deny list.
    Certificates,
    /// `/healthz`, `/openapi.json`.
    Public,
    /// `/brokerAuth/{instance}/{hub}/...`: questions of MQTT brokers that delegate
    /// authentication and authorization to dps (linked hubs of kind `broker-auth`).
    BrokerAuth,
}

/// What a route requires of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing.
    Public,
    /// A device credential, checked by the registration engine (no service token is ever a
    /// device credential).
    Device,
    /// A service SAS token of the instance whose policy has this right.
    Right(Right),
    /// The broker secret of the broker-auth hub named in the path (checked by
    /// [`crate::broker_auth_api`] before the body is read).
    Broker,
}

/// The question a broker-auth route answers (see docs/linked-hubs.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum BrokerCheck {
    RabbitUser,
    RabbitVhost,
    RabbitResource,
    RabbitTopic,
    EmqxAuthn,
    EmqxAuthz,
    VerneRegister,
    VernePublish,
    VerneSubscribe,
    GoUser,
    GoSuperuser,
    GoAcl,
}

/// Enrollment kind of a service-API route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/enrollments`.
    Individual,
    /// `/enrollmentGroups`.
    Group,
}

/// The operation a route runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    DeviceRegister,
    DeviceOperationStatus,
    DeviceRegistrationStatus,
    EnrollmentBulk(Kind),
    EnrollmentQuery(Kind),
    EnrollmentGet(Kind),
    EnrollmentPut(Kind),
    EnrollmentDelete(Kind),
    EnrollmentAttestation(Kind),
    RegistrationGet,
    RegistrationDelete,
    RegistrationQuery,
    InstanceList,
    InstanceGet,
    InstancePut,
    InstanceDelete,
    InstanceStats,
    LinkedHubList,
    LinkedHubPut,
    LinkedHubDelete,
    AccessPolicyList,
    AccessPolicyPut,
    AccessPolicyDelete,
    HubDeviceList,
    HubDeviceGet,
    HubCleanupList,
    FaultList,
    FaultAdd,
    FaultDelete,
    AuditLog,
    EventsTail,
    CertificateList,
    CertificateGet,
    CertificatePut,
    CertificateDelete,
    CertificateVerificationCode,
    CertificateVerify,
    DenyList,
    DenyListPut,
    DenyListDelete,
    CredentialPolicyList,
    CredentialPolicyGet,
    CredentialPolicyCa,
    IssuedCertificateList,
    IssuedCertificateGet,
    IssuedCertificateRevoke,
    RegistrationRevokeCertificates,
    Crl,
    Health,
    OpenApi,
    BrokerAuth(BrokerCheck),
}

/// One route.
#[derive(Debug)]
pub struct Route {
    /// Method.
    pub method: Method,
    /// Path pattern, e.g. `/enrollments/{registrationId}`.
    pub pattern: &'static str,
    /// API family.
    pub family: Family,
    /// What the caller needs.
    pub access: Access,
    /// What the handler runs.
    pub op: Op,
}

impl Route {
    /// `METHOD /pattern`: the route's name (unique in the table).
    pub fn name(&self) -> String {
        format!("{} {}", self.method, self.pattern)
    }

    /// Does the (lowercased, percent-decoded) path match this route's pattern?
    pub fn matches(&self, lower_segments: &[&str]) -> bool {
        let mut pat = self.pattern.split('/').filter(|s| !s.is_empty());
        let mut segs = lower_segments.iter();
        loop {
            match (pat.next(), segs.next()) {
                (None, None) => return true,
                (Some(p), Some(s)) => {
                    let wildcard = p.starts_with('{') && p.ends_with('}');
                    if !wildcard && !p.eq_ignore_ascii_case(s) {
                        return false;
                    }
                }
                _ => return false,
            }
        }
    }
}

macro_rules! r {
    ($m:ident $p:literal, $f:ident, $a:expr, $op:expr) => {
        Route {
            method: Method::$m,
            pattern: $p,
            family: Family::$f,
            access: $a,
            op: $op,
        }
    };
}

use Access::Right as R;
use Kind::{Group, Individual};
use Right::{
    EnrollmentRead as ER, EnrollmentWrite as EW, RegistrationStatusRead as RR,
    RegistrationStatusWrite as RW, ServiceConfig as SC,
};

static ROUTES: [Route; 77] = [
    // Device API (§3).
    r!(PUT "/{idScope}/registrations/{registrationId}/register", Device, Access::Device, Op::DeviceRegister),
    r!(GET "/{idScope}/registrations/{registrationId}/operations/{operationId}", Device, Access::Device, Op::DeviceOperationStatus),
    r!(POST "/{idScope}/registrations/{registrationId}", Device, Access::Device, Op::DeviceRegistrationStatus),
    // Service API: individual enrollments (§7.2).
    r!(POST "/enrollments", Service, R(EW), Op::EnrollmentBulk(Individual)),
    r!(POST "/enrollments/query", Service, R(ER), Op::EnrollmentQuery(Individual)),
    r!(GET "/enrollments/{registrationId}", Service, R(ER), Op::EnrollmentGet(Individual)),
    r!(PUT "/enrollments/{registrationId}", Service, R(EW), Op::EnrollmentPut(Individual)),
    r!(DELETE "/enrollments/{registrationId}", Service, R(EW), Op::EnrollmentDelete(Individual)),
    r!(POST "/enrollments/{registrationId}/attestationMechanism", Service, R(ER), Op::EnrollmentAttestation(Individual)),
    // Service API: enrollment groups.
    r!(POST "/enrollmentGroups", Service, R(EW), Op::EnrollmentBulk(Group)),
    r!(POST "/enrollmentGroups/query", Service, R(ER), Op::EnrollmentQuery(Group)),
    r!(GET "/enrollmentGroups/{enrollmentGroupId}", Service, R(ER), Op::EnrollmentGet(Group)),
    r!(PUT "/enrollmentGroups/{enrollmentGroupId}", Service, R(EW), Op::EnrollmentPut(Group)),
    r!(DELETE "/enrollmentGroups/{enrollmentGroupId}", Service, R(EW), Op::EnrollmentDelete(Group)),
    r!(POST "/enrollmentGroups/{enrollmentGroupId}/attestationMechanism", Service, R(ER), Op::EnrollmentAttestation(Group)),
    // Service API: registration records.
    r!(GET "/registrations/{registrationId}", Service, R(RR), Op::RegistrationGet),
    r!(DELETE "/registrations/{registrationId}", Service, R(RW), Op::RegistrationDelete),
    r!(POST "/registrations/{enrollmentGroupId}/query", Service, R(RR), Op::RegistrationQuery),
    // Admin API.
    r!(GET "/admin/instances", Admin, R(SC), Op::InstanceList),
    r!(GET "/admin/instances/{instance}", Admin, R(SC), Op::InstanceGet),
    r!(PUT "/admin/instances/{instance}", Admin, R(SC), Op::InstancePut),
    r!(DELETE "/admin/instances/{instance}", Admin, R(SC), Op::InstanceDelete),
    r!(GET "/admin/instances/{instance}/stats", Admin, R(SC), Op::InstanceStats),
    r!(GET "/admin/instances/{instance}/linkedHubs", Admin, R(SC), Op::LinkedHubList),
    r!(PUT "/admin/instances/{instance}/linkedHubs/{hub}", Admin, R(SC), Op::LinkedHubPut),
    r!(DELETE "/admin/instances/{instance}/linkedHubs/{hub}", Admin, R(SC), Op::LinkedHubDelete),
    r!(GET "/admin/instances/{instance}/accessPolicies", Admin, R(SC), Op::AccessPolicyList),
    r!(PUT "/admin/instances/{instance}/accessPolicies/{policy}", Admin, R(SC), Op::AccessPolicyPut),
    r!(DELETE "/admin/instances/{instance}/accessPolicies/{policy}", Admin, R(SC), Op::AccessPolicyDelete),
    r!(GET "/admin/instances/{instance}/hubs/{hub}/devices", Admin, R(SC), Op::HubDeviceList),
    r!(GET "/admin/instances/{instance}/hubs/{hub}/devices/{deviceId}", Admin, R(SC), Op::HubDeviceGet),
    r!(GET "/admin/instances/{instance}/hubCleanup", Admin, R(SC), Op::HubCleanupList),
    r!(GET "/admin/instances/{instance}/faults", Admin, R(SC), Op::FaultList),
    r!(POST "/admin/instances/{instance}/faults", Admin, R(SC), Op::FaultAdd),
    r!(DELETE "/admin/instances/{instance}/faults/{fault}", Admin, R(SC), Op::FaultDelete),
    r!(GET "/admin/audit", Admin, R(SC), Op::AuditLog),
    r!(GET "/admin/events", Admin, R(SC), Op::EventsTail),
    // Admin API: CA certificates (proof of possession) and the deny list.
    r!(GET "/admin/instances/{instance}/certificates", Certificates, R(SC), Op::CertificateList),
    r!(GET "/admin/instances/{instance}/certificates/{ca}", Certificates, R(SC), Op::CertificateGet),
    r!(PUT "/admin/instances/{instance}/certificates/{ca}", Certificates, R(SC), Op::CertificatePut),
    r!(DELETE "/admin/instances/{instance}/certificates/{ca}", Certificates, R(SC), Op::CertificateDelete),
    r!(POST "/admin/instances/{instance}/certificates/{ca}/generateVerificationCode", Certificates, R(SC), Op::CertificateVerificationCode),
    r!(POST "/admin/instances/{instance}/certificates/{ca}/verify", Certificates, R(SC), Op::CertificateVerify),
    r!(GET "/admin/instances/{instance}/denylist", Certificates, R(SC), Op::DenyList),
    r!(PUT "/admin/instances/{instance}/denylist/{value}", Certificates, R(SC), Op::DenyListPut),
    r!(DELETE "/admin/instances/{instance}/denylist/{value}", Certificates, R(SC), Op::DenyListDelete),
    // Admin API: certificate issuance (credential policies, issued certificates, revocation).
    r!(GET "/admin/instances/{instance}/credentialPolicies", Certificates, R(SC), Op::CredentialPolicyList),
    r!(GET "/admin/instances/{instance}/credentialPolicies/{policy}", Certificates, R(SC), Op::CredentialPolicyGet),
    r!(GET "/admin/instances/{instance}/credentialPolicies/{policy}/ca", Certificates, R(SC), Op::CredentialPolicyCa),
    r!(GET "/admin/instances/{instance}/issuedCertificates", Certificates, R(SC), Op::IssuedCertificateList),
    r!(GET "/admin/instances/{instance}/issuedCertificates/{serial}", Certificates, R(SC), Op::IssuedCertificateGet),
    r!(POST "/admin/instances/{instance}/issuedCertificates/{serial}/revoke", Certificates, R(SC), Op::IssuedCertificateRevoke),
    r!(POST "/admin/instances/{instance}/registrations/{registrationId}/revokeCertificates", Certificates, R(SC), Op::RegistrationRevokeCertificates),
    // Public.
    r!(GET "/healthz", Public, Access::Public, Op::Health),
    r!(GET "/openapi.json", Public, Access::Public, Op::OpenApi),
    // The CRL of a credential policy's issuing CA (brokers and hubs fetch it).
    r!(GET "/crl/{instance}/{policy}", Public, Access::Public, Op::Crl),
    // Brokers that ask dps (broker-auth hubs), authenticated with the hub's broker secret.
    r!(GET "/brokerAuth/{instance}/{hub}/rabbitmq/user", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitUser)),
    r!(POST "/brokerAuth/{instance}/{hub}/rabbitmq/user", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitUser)),
    r!(GET "/brokerAuth/{instance}/{hub}/rabbitmq/vhost", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitVhost)),
    r!(POST "/brokerAuth/{instance}/{hub}/rabbitmq/vhost", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitVhost)),
    r!(GET "/brokerAuth/{instance}/{hub}/rabbitmq/resource", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitResource)),
    r!(POST "/brokerAuth/{instance}/{hub}/rabbitmq/resource", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitResource)),
    r!(GET "/brokerAuth/{instance}/{hub}/rabbitmq/topic", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitTopic)),
    r!(POST "/brokerAuth/{instance}/{hub}/rabbitmq/topic", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::RabbitTopic)),
    r!(GET "/brokerAuth/{instance}/{hub}/emqx/authn", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::EmqxAuthn)),
    r!(POST "/brokerAuth/{instance}/{hub}/emqx/authn", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::EmqxAuthn)),
    r!(GET "/brokerAuth/{instance}/{hub}/emqx/authz", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::EmqxAuthz)),
    r!(POST "/brokerAuth/{instance}/{hub}/emqx/authz", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::EmqxAuthz)),
    r!(POST "/brokerAuth/{instance}/{hub}/vernemq/auth_on_register", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::VerneRegister)),
    r!(POST "/brokerAuth/{instance}/{hub}/vernemq/auth_on_publish", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::VernePublish)),
    r!(POST "/brokerAuth/{instance}/{hub}/vernemq/auth_on_subscribe", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::VerneSubscribe)),
    r!(GET "/brokerAuth/{instance}/{hub}/goauth/user", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::GoUser)),
    r!(POST "/brokerAuth/{instance}/{hub}/goauth/user", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::GoUser)),
    r!(GET "/brokerAuth/{instance}/{hub}/goauth/superuser", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::GoSuperuser)),
    r!(POST "/brokerAuth/{instance}/{hub}/goauth/superuser", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::GoSuperuser)),
    r!(GET "/brokerAuth/{instance}/{hub}/goauth/acl", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::GoAcl)),
    r!(POST "/brokerAuth/{instance}/{hub}/goauth/acl", BrokerAuth, Access::Broker, Op::BrokerAuth(BrokerCheck::GoAcl)),
];

/// Every route, in matching order.
pub fn routes() -> &'static [Route] {
    &ROUTES
}

/// The family a path belongs to, by its first segment (lowercased); `None` for a path no family
/// claims.
pub fn family_of(lower_segments: &[&str]) -> Option<Family> {
    match lower_segments.first().copied() {
        Some("enrollments") | Some("enrollmentgroups") | Some("registrations") => {
            Some(Family::Service)
        }
        Some("admin") => Some(Family::Admin),
        Some("healthz") | Some("openapi.json") | Some("crl") => Some(Family::Public),
        Some("brokerauth") => Some(Family::BrokerAuth),
        Some(_) if lower_segments.get(1) == Some(&"registrations") => Some(Family::Device),
        _ => None,
    }
}

/// The route for `method` and the path (lowercased, percent-decoded segments) within `family`
/// (the admin family includes the certificate routes).
pub fn find(family: Family, method: &Method, lower_segments: &[&str]) -> Option<&'static Route> {
    ROUTES.iter().find(|r| {
        let same_family =
            r.family == family || (family == Family::Admin && r.family == Family::Certificates);
        same_family && r.method == *method && r.matches(lower_segments)
    })
}

/// Verify a service SAS token for a request to `path` (lowercased, percent-decoded segments):
/// the instance is the one answering to the host named by `sr`, `sr` must cover the request
/// ([`SasToken::audience_covers`]: host, then an optional segment prefix of the path), the
/// policy `skn` must exist, the token must not be expired nor outlive `max_lifetime_secs`
/// (0: no limit), the signature must match the policy's primary or secondary key, and the
/// policy must have `right`.
pub fn authorize(
    app: &App,
    headers: &HeaderMap,
    path: &[&str],
    right: Right,
) -> Result<Caller, Error> {
    let raw = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthFailure::MissingCredential)?;
    let tok = SasToken::parse(raw).map_err(AuthFailure::from)?;
    let host = tok.audience_host();
    let instance = app
        .instances
        .by_host(host)
        .ok_or_else(|| AuthFailure::UnknownInstance(host.to_string()))?;
    if !instance
        .hostnames
        .iter()
        .any(|h| tok.audience_covers(h, path))
    {
        return Err(AuthFailure::Sas(dps_core::sas::SasError::WrongAudience {
            audience: tok.sr.clone(),
            expected: format!("{host} or {host}/<a segment prefix of /{}>", path.join("/")),
        })
        .into());
    }
    let policy_name = tok.skn.clone().unwrap_or_default();
    let policy = instance
        .policy(&policy_name)
        .ok_or_else(|| AuthFailure::UnknownPolicy(policy_name.clone()))?;
    let now = app.clock.now().unix_timestamp();
    tok.check_expiry(now).map_err(AuthFailure::from)?;
    tok.check_lifetime(now, app.max_token_lifetime_secs)
        .map_err(AuthFailure::from)?;
    tok.verify_signature([policy.primary_key.as_str(), policy.secondary_key.as_str()])
        .map_err(AuthFailure::from)?;
    if !policy.has(right) {
        return Err(AuthFailure::MissingRight {
            policy: policy.name.clone(),
            right: right.as_str(),
        }
        .into());
    }
    let policy = policy.name.clone();
    Ok(Caller { instance, policy })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn segs(p: &str) -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_ascii_lowercase)
            .collect()
    }

    #[test]
    fn names_are_unique_and_every_route_finds_itself() {
        let mut seen = HashSet::new();
        for r in routes() {
            assert!(seen.insert(r.name()), "duplicate route {}", r.name());
            // Fill the wildcards with a sample value; the route found must be this one.
            let path: String = r
                .pattern
                .split('/')
                .map(|s| if s.starts_with('{') { "x1" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let lower = segs(&path);
            let l: Vec<&str> = lower.iter().map(String::as_str).collect();
            let fam = family_of(&l).unwrap_or(Family::Public);
            let found = find(fam, &r.method, &l).map(|f| f.name());
            assert_eq!(found, Some(r.name()), "{path}");
        }
    }

    #[test]
    fn service_and_admin_routes_need_a_right_and_device_routes_do_not() {
        for r in routes() {
            match r.family {
                Family::Service | Family::Admin | Family::Certificates => {
                    assert!(matches!(r.access, Access::Right(_)), "{}", r.name())
                }
                Family::Device => assert_eq!(r.access, Access::Device, "{}", r.name()),
                Family::Public => assert_eq!(r.access, Access::Public, "{}", r.name()),
                Family::BrokerAuth => assert_eq!(r.access, Access::Broker, "{}", r.name()),
            }
        }
    }

    #[test]
    fn matching_is_case_insensitive_and_exact_in_length() {
        let l = ["enrollmentgroups", "g1", "attestationmechanism"];
        let r = find(Family::Service, &Method::POST, &l).unwrap();
        assert_eq!(r.op, Op::EnrollmentAttestation(Kind::Group));
        assert!(find(Family::Service, &Method::POST, &["enrollments", "a", "b"]).is_none());
        assert!(find(Family::Service, &Method::PATCH, &["enrollments", "a"]).is_none());
        // The literal `query` wins over the id wildcard for POST.
        let r = find(Family::Service, &Method::POST, &["enrollments", "query"]).unwrap();
        assert_eq!(r.op, Op::EnrollmentQuery(Kind::Individual));
    }
}
