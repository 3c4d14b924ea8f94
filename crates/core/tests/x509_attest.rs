//! X.509 attestation decisions (`attest`), with generated RSA and ECDSA P-256 certificates.

mod x509_support;

use dps_core::error::AuthFailure;
use dps_core::model::{EnrollmentGroup, IndividualEnrollment, ProvisioningStatus};
use dps_core::x509::verify::{
    attest, CaCertificate, CertFailure, DenyList, X509Candidates, X509Match,
};
use rcgen::{ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
use time::Duration;
use x509_support::*;

const REG: &str = "device-01";

struct Env {
    individual: Option<IndividualEnrollment>,
    groups: Vec<EnrollmentGroup>,
    cas: Vec<CaCertificate>,
    deny: DenyList,
}

impl Env {
    fn new() -> Self {
        Self {
            individual: None,
            groups: Vec::new(),
            cas: Vec::new(),
            deny: DenyList::new(),
        }
    }
    fn run(&self, reg: &str, chain: &[Vec<u8>]) -> Result<X509Match<'_>, CertFailure> {
        let c = X509Candidates {
            individual: self.individual.as_ref(),
            groups: &self.groups,
            ca_certificates: &self.cas,
            deny: &self.deny,
        };
        attest(reg, chain, &c, now())
    }
}

fn group_id(m: &X509Match<'_>) -> String {
    match m {
        X509Match::Group { group, .. } => group.enrollment_group_id.clone(),
        X509Match::Individual(i) => {
            panic!("expected a group, got individual {}", i.registration_id)
        }
    }
}

fn individual_id(m: &X509Match<'_>) -> String {
    match m {
        X509Match::Individual(i) => i.registration_id.clone(),
        X509Match::Group { group, .. } => {
            panic!(
                "expected an individual, got group {}",
                group.enrollment_group_id
            )
        }
    }
}

// ---- individual enrollments ------------------------------------------------------------------

#[test]
fn individual_primary_self_signed_ecdsa() {
    let leaf = Spec::leaf(REG).self_signed();
    let mut env = Env::new();
    env.individual = Some(individual(REG, &leaf.der, None, true));
    let m = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap();
    assert_eq!(individual_id(&m), REG);
}

#[test]
fn individual_secondary_rsa() {
    let other = Spec::leaf(REG).alg(Alg::Rsa2048).self_signed();
    let leaf = Spec::leaf(REG).alg(Alg::Rsa2048).self_signed();
    let mut env = Env::new();
    env.individual = Some(individual(REG, &other.der, Some(&leaf.der), true));
    let m = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap();
    assert_eq!(individual_id(&m), REG);
}

#[test]
fn individual_ca_signed_leaf_matches_by_thumbprint_without_chain() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    env.individual = Some(individual(REG, &pki.leaf.der, None, true));
    let m = env.run(REG, std::slice::from_ref(&pki.leaf.der)).unwrap();
    assert_eq!(individual_id(&m), REG);
}

#[test]
fn individual_matches_by_info_thumbprint_only_any_case() {
    let leaf = Spec::leaf(REG).self_signed();
    let mut ind = individual(REG, &leaf.der, None, true);
    {
        let x = ind.settings.attestation.x509.as_mut().unwrap();
        let p = x
            .client_certificates
            .as_mut()
            .unwrap()
            .primary
            .as_mut()
            .unwrap();
        p.certificate = None;
        let info = p.info.as_mut().unwrap();
        info.sha1_thumbprint = info.sha1_thumbprint.to_lowercase();
        info.sha256_thumbprint = String::new();
    }
    let mut env = Env::new();
    env.individual = Some(ind);
    assert!(env.run(REG, std::slice::from_ref(&leaf.der)).is_ok());
}

#[test]
fn registration_id_matches_cn_case_insensitively() {
    let leaf = Spec::leaf("Device-ABC").self_signed();
    let mut env = Env::new();
    env.individual = Some(individual("device-abc", &leaf.der, None, true));
    assert!(env
        .run("device-abc", std::slice::from_ref(&leaf.der))
        .is_ok());
}

#[test]
fn individual_mismatch_refuses_without_group_fallback() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let other = Spec::leaf(REG).self_signed();
    let mut env = Env::new();
    env.individual = Some(individual(REG, &other.der, None, true));
    env.groups = vec![group_signing("g", &pki.root.der, None, true)];
    let err = env.run(REG, &pki.chain()).unwrap_err();
    assert_eq!(
        err,
        CertFailure::CertificateMismatch {
            registration_id: REG.into()
        }
    );
    assert_eq!(err.code(), "certificateMismatch");
}

#[test]
fn individual_with_other_attestation_is_attestation_mismatch() {
    let leaf = Spec::leaf(REG).self_signed();
    let mut env = Env::new();
    env.individual = Some(individual_sas(REG));
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    assert!(matches!(err, CertFailure::AttestationMismatch { .. }));
    assert!(matches!(
        AuthFailure::from(err),
        AuthFailure::AttestationMismatch(_)
    ));
}

#[test]
fn disabled_individual_overrides_group() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.root.der, None, true)];
    // Without the individual enrollment the group takes the device.
    assert_eq!(group_id(&env.run(REG, &pki.chain()).unwrap()), "g");
    env.individual = Some(individual(REG, &pki.leaf.der, None, false));
    let m = env.run(REG, &pki.chain()).unwrap();
    match m {
        X509Match::Individual(i) => {
            assert_eq!(
                i.settings.provisioning_status,
                Some(ProvisioningStatus::Disabled)
            );
            assert!(!i.settings.enabled());
        }
        _ => panic!("individual must override the group"),
    }
}

#[test]
fn individual_with_signing_certificate_extension() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut ind = individual(REG, &pki.leaf.der, None, true);
    // Replace clientCertificates by signingCertificates (beyond Azure).
    let g = group_signing("unused", &pki.int.der, None, true);
    ind.settings.attestation = g.settings.attestation.clone();
    let mut env = Env::new();
    env.individual = Some(ind);
    assert_eq!(
        individual_id(&env.run(REG, std::slice::from_ref(&pki.leaf.der)).unwrap()),
        REG
    );
    // A leaf from another PKI does not chain.
    let other = Pki::new(REG, Alg::EcdsaP256);
    let err = env.run(REG, &other.chain()).unwrap_err();
    assert!(
        matches!(err, CertFailure::CertificateMismatch { .. }),
        "{err:?}"
    );
}

// ---- groups -----------------------------------------------------------------------------------

#[test]
fn group_root_signing_cert_with_intermediate_sent_rsa() {
    let pki = Pki::new(REG, Alg::Rsa2048);
    let mut env = Env::new();
    env.groups = vec![
        group_sas("sas"),
        group_signing("root-group", &pki.root.der, None, true),
    ];
    let m = env.run(REG, &pki.chain()).unwrap();
    match &m {
        X509Match::Group {
            group,
            signing_cert_der,
            ca_name,
        } => {
            assert_eq!(group.enrollment_group_id, "root-group");
            assert_eq!(signing_cert_der, &pki.root.der);
            assert_eq!(ca_name, &None);
        }
        _ => panic!(),
    }
}

#[test]
fn group_root_as_secondary_and_full_chain_sent() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let unrelated = Spec::ca("Other Root").self_signed();
    let mut env = Env::new();
    env.groups = vec![group_signing(
        "g",
        &unrelated.der,
        Some(&pki.root.der),
        true,
    )];
    let chain = vec![
        pki.leaf.der.clone(),
        pki.int.der.clone(),
        pki.root.der.clone(),
    ];
    let m = env.run(REG, &chain).unwrap();
    assert_eq!(group_id(&m), "g");
}

#[test]
fn group_intermediate_signing_cert_leaf_only() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    env.groups = vec![group_signing("int-group", &pki.int.der, None, true)];
    let m = env.run(REG, std::slice::from_ref(&pki.leaf.der)).unwrap();
    match m {
        X509Match::Group {
            signing_cert_der, ..
        } => assert_eq!(signing_cert_der, pki.int.der),
        _ => panic!(),
    }
}

#[test]
fn first_certificate_up_the_chain_decides() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    // Root group listed first, intermediate group second: the intermediate is lower in the chain.
    env.groups = vec![
        group_signing("root-group", &pki.root.der, None, true),
        group_signing("int-group", &pki.int.der, None, false),
    ];
    let m = env.run(REG, &pki.chain()).unwrap();
    assert_eq!(group_id(&m), "int-group");
    // Disabled is reported back; the caller refuses.
    match m {
        X509Match::Group { group, .. } => assert!(!group.settings.enabled()),
        _ => panic!(),
    }
}

#[test]
fn ca_reference_verified_root_not_sent() {
    let pki = Pki::new(REG, Alg::Rsa2048);
    let mut env = Env::new();
    env.cas = vec![CaCertificate {
        name: "MyRoot".into(),
        der: pki.root.der.clone(),
        verified: true,
    }];
    env.groups = vec![group_ca("ca-group", "myroot", None)];
    let m = env.run(REG, &pki.chain()).unwrap();
    match m {
        X509Match::Group {
            group,
            signing_cert_der,
            ca_name,
        } => {
            assert_eq!(group.enrollment_group_id, "ca-group");
            assert_eq!(signing_cert_der, pki.root.der);
            assert_eq!(ca_name.as_deref(), Some("MyRoot"));
        }
        _ => panic!(),
    }
}

#[test]
fn ca_reference_verified_intermediate_in_chain() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    env.cas = vec![CaCertificate {
        name: "int".into(),
        der: pki.int.der.clone(),
        verified: true,
    }];
    env.groups = vec![group_ca("ca-group", "missing-ca", Some("int"))];
    assert_eq!(group_id(&env.run(REG, &pki.chain()).unwrap()), "ca-group");
}

#[test]
fn ca_reference_unverified() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    env.cas = vec![CaCertificate {
        name: "root".into(),
        der: pki.root.der.clone(),
        verified: false,
    }];
    env.groups = vec![group_ca("ca-group", "root", None)];
    let err = env.run(REG, &pki.chain()).unwrap_err();
    assert_eq!(
        err,
        CertFailure::CaNotVerified {
            name: "root".into()
        }
    );
    assert_eq!(err.to_string(), "CA certificate 'root' is not verified");
    // In the chain too.
    let chain = vec![
        pki.leaf.der.clone(),
        pki.int.der.clone(),
        pki.root.der.clone(),
    ];
    assert!(matches!(
        env.run(REG, &chain).unwrap_err(),
        CertFailure::CaNotVerified { .. }
    ));
    // A verified second path still wins.
    env.groups
        .push(group_signing("int-group", &pki.int.der, None, true));
    assert_eq!(group_id(&env.run(REG, &pki.chain()).unwrap()), "int-group");
}

#[test]
fn unknown_issuer_when_intermediate_missing() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.root.der, None, true)];
    let err = env
        .run(REG, std::slice::from_ref(&pki.leaf.der))
        .unwrap_err();
    match &err {
        CertFailure::UnknownIssuer { issuer } => {
            assert!(issuer.contains("Test Intermediate"), "{issuer}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.code(), "unknownIssuer");
}

#[test]
fn no_matching_enrollment_for_complete_chain() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let other = Spec::ca("Other Root").self_signed();
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &other.der, None, true)];
    let chain = vec![
        pki.leaf.der.clone(),
        pki.int.der.clone(),
        pki.root.der.clone(),
    ];
    assert_eq!(
        env.run(REG, &chain).unwrap_err(),
        CertFailure::NoMatchingEnrollment
    );
    let self_signed = Spec::leaf(REG).self_signed();
    assert_eq!(
        Env::new()
            .run(REG, std::slice::from_ref(&self_signed.der))
            .unwrap_err(),
        CertFailure::NoMatchingEnrollment
    );
}

#[test]
fn same_name_different_key_is_bad_signature() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    // A forged intermediate with the real one's name but another key signs the leaf.
    let forged = Spec::ca("Test Intermediate").signed_by(&pki.root);
    let leaf = Spec::leaf(REG).signed_by(&forged);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.root.der, None, true)];
    let err = env
        .run(REG, &[leaf.der.clone(), pki.int.der.clone()])
        .unwrap_err();
    assert_eq!(err, CertFailure::BadSignature);
    // Same forgery against an intermediate group, leaf only: the candidate fails.
    env.groups = vec![group_signing("g", &pki.int.der, None, true)];
    assert_eq!(
        env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err(),
        CertFailure::BadSignature
    );
}

// ---- common name ------------------------------------------------------------------------------

#[test]
fn cn_mismatch() {
    let leaf = Spec::leaf("someone-else").self_signed();
    let mut env = Env::new();
    env.individual = Some(individual(REG, &leaf.der, None, true));
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    assert_eq!(
        err,
        CertFailure::CnMismatch {
            cn: "someone-else".into(),
            registration_id: REG.into()
        }
    );
    assert_eq!(
        err.to_string(),
        "the certificate common name 'someone-else' does not match the registration id 'device-01'"
    );
    assert!(matches!(
        AuthFailure::from(err),
        AuthFailure::Certificate(_)
    ));
}

#[test]
fn cn_too_long() {
    let cn = "a".repeat(65);
    let leaf = Spec::leaf(&cn).self_signed();
    let err = Env::new()
        .run(&cn, std::slice::from_ref(&leaf.der))
        .unwrap_err();
    assert_eq!(err, CertFailure::CnTooLong { len: 65 });
    // 64 is fine.
    let cn = "b".repeat(64);
    let leaf = Spec::leaf(&cn).self_signed();
    let mut env = Env::new();
    env.individual = Some(individual(&cn, &leaf.der, None, true));
    assert!(env.run(&cn, std::slice::from_ref(&leaf.der)).is_ok());
}

#[test]
fn no_common_name() {
    let leaf = Spec::leaf("").self_signed();
    assert_eq!(
        Env::new()
            .run(REG, std::slice::from_ref(&leaf.der))
            .unwrap_err(),
        CertFailure::NoCommonName
    );
}

// ---- validity ---------------------------------------------------------------------------------

#[test]
fn expired_leaf() {
    let n = now();
    let leaf = Spec::leaf(REG)
        .valid(n - Duration::days(10), n - Duration::days(1))
        .self_signed();
    let mut env = Env::new();
    env.individual = Some(individual(REG, &leaf.der, None, true));
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    match &err {
        CertFailure::Expired { subject, not_after } => {
            assert!(subject.contains(REG));
            assert!(not_after.ends_with('Z'));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().starts_with("certificate '"), "{err}");
}

#[test]
fn not_yet_valid_leaf() {
    let n = now();
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let leaf = Spec::leaf(REG)
        .valid(n + Duration::days(1), n + Duration::days(10))
        .signed_by(&pki.int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.root.der, None, true)];
    let err = env
        .run(REG, &[leaf.der.clone(), pki.int.der.clone()])
        .unwrap_err();
    assert!(
        matches!(&err, CertFailure::NotYetValid { subject, .. } if subject.contains(REG)),
        "{err:?}"
    );
}

#[test]
fn expired_intermediate_is_named() {
    let n = now();
    let root = Spec::ca("Root").self_signed();
    let int = Spec::ca("Old Intermediate")
        .valid(n - Duration::days(100), n - Duration::days(2))
        .signed_by(&root);
    let leaf = Spec::leaf(REG).signed_by(&int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &root.der, None, true)];
    let err = env
        .run(REG, &[leaf.der.clone(), int.der.clone()])
        .unwrap_err();
    assert!(
        matches!(&err, CertFailure::Expired { subject, .. } if subject.contains("Old Intermediate")),
        "{err:?}"
    );
}

#[test]
fn expired_group_signing_certificate() {
    let n = now();
    let root = Spec::ca("Expired Root")
        .valid(n - Duration::days(100), n - Duration::days(2))
        .self_signed();
    let leaf = Spec::leaf(REG).signed_by(&root);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &root.der, None, true)];
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    assert!(
        matches!(&err, CertFailure::Expired { subject, .. } if subject.contains("Expired Root")),
        "{err:?}"
    );
}

// ---- deny list --------------------------------------------------------------------------------

#[test]
fn revoked_leaf_by_sha1_thumbprint() {
    let leaf = Spec::leaf(REG).self_signed();
    let mut env = Env::new();
    env.individual = Some(individual(REG, &leaf.der, None, true));
    env.deny = DenyList::from_entries([leaf.sha1().to_lowercase()], Vec::<String>::new());
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    match &err {
        CertFailure::Revoked { entry, .. } => assert!(entry.starts_with("SHA-1 thumbprint")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(AuthFailure::from(err), AuthFailure::Revoked(_)));
}

#[test]
fn revoked_leaf_by_sha256_thumbprint_with_colons() {
    let leaf = Spec::leaf(REG).self_signed();
    let colons = leaf
        .sha256()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_lowercase())
        .collect::<Vec<_>>()
        .join(":");
    let mut env = Env::new();
    env.individual = Some(individual(REG, &leaf.der, None, true));
    env.deny.add_thumbprint(&colons);
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    assert!(
        matches!(&err, CertFailure::Revoked { entry, .. } if entry.starts_with("SHA-256")),
        "{err:?}"
    );
}

#[test]
fn revoked_by_serial() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let leaf = Spec::leaf(REG)
        .serial(&[0x0a, 0xbc, 0xde, 0xf0])
        .signed_by(&pki.int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.root.der, None, true)];
    env.deny.add_serial("00:0A:bc:de:F0");
    let err = env
        .run(REG, &[leaf.der.clone(), pki.int.der.clone()])
        .unwrap_err();
    match err {
        CertFailure::Revoked { entry, subject } => {
            assert_eq!(entry, "serial ABCDEF0");
            assert!(subject.contains(REG));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn revoked_intermediate_and_revoked_unsent_root() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.root.der, None, true)];
    env.deny.add_thumbprint(&pki.int.sha256());
    assert!(matches!(
        env.run(REG, &pki.chain()).unwrap_err(),
        CertFailure::Revoked { subject, .. } if subject.contains("Intermediate")
    ));
    env.deny = DenyList::new();
    env.deny.add_thumbprint(&pki.root.sha1());
    assert!(matches!(
        env.run(REG, &pki.chain()).unwrap_err(),
        CertFailure::Revoked { subject, .. } if subject.contains("Root")
    ));
}

#[test]
fn deny_list_is_revoked_api() {
    let a = Spec::leaf("a").serial(&[1]).self_signed();
    let b = Spec::leaf("b").serial(&[2]).self_signed();
    let d = DenyList::from_entries(
        [a.sha256()],
        ["0x".trim_start_matches("0x").to_string() + "02"],
    );
    assert!(d.is_revoked(&a.der).unwrap().starts_with("SHA-256"));
    assert_eq!(d.is_revoked(&b.der).as_deref(), Some("serial 2"));
    assert!(DenyList::new().is_revoked(&a.der).is_none());
    assert!(d.is_revoked(b"garbage").is_none());
}

// ---- chain structure --------------------------------------------------------------------------

#[test]
fn issuer_without_ca_flag_is_not_a_ca() {
    let root = Spec::ca("Root").self_signed();
    let fake_int = Spec::ca("Not A CA")
        .basic_constraints(IsCa::ExplicitNoCa)
        .signed_by(&root);
    let leaf = Spec::leaf(REG).signed_by(&fake_int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &root.der, None, true)];
    let err = env
        .run(REG, &[leaf.der.clone(), fake_int.der.clone()])
        .unwrap_err();
    assert_eq!(
        err,
        CertFailure::NotACa {
            subject: "O=dps tests, CN=Not A CA".into()
        }
    );
}

#[test]
fn issuer_without_key_cert_sign_is_not_a_ca() {
    let root = Spec::ca("Root").self_signed();
    let int = Spec::ca("No KeyCertSign")
        .key_usages(vec![KeyUsagePurpose::DigitalSignature])
        .signed_by(&root);
    let leaf = Spec::leaf(REG).signed_by(&int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &root.der, None, true)];
    let err = env
        .run(REG, &[leaf.der.clone(), int.der.clone()])
        .unwrap_err();
    assert!(
        matches!(&err, CertFailure::NotACa { subject } if subject.contains("No KeyCertSign")),
        "{err:?}"
    );
}

#[test]
fn group_signing_cert_that_is_not_a_ca() {
    let issuer = Spec::leaf("Plain Leaf Issuer").self_signed();
    let leaf = Spec::leaf(REG).signed_by(&issuer);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &issuer.der, None, true)];
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    assert!(matches!(err, CertFailure::NotACa { .. }), "{err:?}");
}

#[test]
fn leaf_that_is_a_ca() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let leaf = Spec::ca(REG).signed_by(&pki.int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.int.der, None, true)];
    assert_eq!(
        env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err(),
        CertFailure::LeafIsCa
    );
}

#[test]
fn path_len_of_anchor_exceeded() {
    let root = Spec::ca("Root pathlen 0").path_len(0).self_signed();
    let int = Spec::ca("Int").signed_by(&root);
    let leaf = Spec::leaf(REG).signed_by(&int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &root.der, None, true)];
    assert_eq!(
        env.run(REG, &[leaf.der.clone(), int.der.clone()])
            .unwrap_err(),
        CertFailure::PathLenExceeded
    );
    // pathlen 0 on the root is fine for a leaf it signs directly.
    let direct = Spec::leaf(REG).signed_by(&root);
    assert!(env.run(REG, std::slice::from_ref(&direct.der)).is_ok());
}

#[test]
fn path_len_of_intermediate_exceeded() {
    let root = Spec::ca("Root").self_signed();
    let int1 = Spec::ca("Int1 pathlen 0").path_len(0).signed_by(&root);
    let int2 = Spec::ca("Int2").signed_by(&int1);
    let leaf = Spec::leaf(REG).signed_by(&int2);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &root.der, None, true)];
    let chain = vec![leaf.der.clone(), int2.der.clone(), int1.der.clone()];
    assert_eq!(
        env.run(REG, &chain).unwrap_err(),
        CertFailure::PathLenExceeded
    );
}

#[test]
fn eku_server_auth_only() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let leaf = Spec::leaf(REG)
        .eku(vec![ExtendedKeyUsagePurpose::ServerAuth])
        .signed_by(&pki.int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.int.der, None, true)];
    assert_eq!(
        env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err(),
        CertFailure::EkuNotClientAuth
    );
    // No EKU at all is accepted.
    let leaf = Spec::leaf(REG).eku(vec![]).signed_by(&pki.int);
    assert!(env.run(REG, std::slice::from_ref(&leaf.der)).is_ok());
}

#[test]
fn key_usage_without_digital_signature() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let leaf = Spec::leaf(REG)
        .key_usages(vec![KeyUsagePurpose::KeyEncipherment])
        .signed_by(&pki.int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.int.der, None, true)];
    assert_eq!(
        env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err(),
        CertFailure::KeyUsageNotDigitalSignature
    );
}

#[test]
fn unknown_critical_extension_is_invalid() {
    let pki = Pki::new(REG, Alg::EcdsaP256);
    let leaf = Spec::leaf(REG)
        .unknown_critical_extension()
        .signed_by(&pki.int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &pki.int.der, None, true)];
    let err = env.run(REG, std::slice::from_ref(&leaf.der)).unwrap_err();
    assert!(matches!(err, CertFailure::Invalid(_)), "{err:?}");
}

#[test]
fn mixed_algorithms_rsa_root_ecdsa_leaf() {
    let root = Spec::ca("RSA Root").alg(Alg::Rsa2048).self_signed();
    let int = Spec::ca("EC Int").signed_by(&root);
    let leaf = Spec::leaf(REG).alg(Alg::Rsa2048).signed_by(&int);
    let mut env = Env::new();
    env.groups = vec![group_signing("g", &root.der, None, true)];
    assert!(env.run(REG, &[leaf.der.clone(), int.der.clone()]).is_ok());
}

// ---- malformed input --------------------------------------------------------------------------

#[test]
fn no_certificate_parse_and_chain_too_long() {
    let env = Env::new();
    assert_eq!(env.run(REG, &[]).unwrap_err(), CertFailure::NoCertificate);
    assert!(matches!(
        AuthFailure::from(CertFailure::NoCertificate),
        AuthFailure::MissingCredential
    ));
    assert!(matches!(
        env.run(REG, &[b"not a certificate".to_vec()]).unwrap_err(),
        CertFailure::Parse(_)
    ));
    let leaf = Spec::leaf(REG).self_signed();
    let chain = vec![leaf.der.clone(); 11];
    assert_eq!(env.run(REG, &chain).unwrap_err(), CertFailure::ChainTooLong);
    // Garbage after a valid leaf.
    assert!(matches!(
        env.run(REG, &[leaf.der.clone(), vec![0x30, 0x03, 1, 2, 3]])
            .unwrap_err(),
        CertFailure::Parse(_)
    ));
}

#[test]
fn every_code_is_distinct() {
    let all = [
        CertFailure::NoCertificate,
        CertFailure::ChainTooLong,
        CertFailure::Parse(String::new()),
        CertFailure::NoCommonName,
        CertFailure::CnTooLong { len: 0 },
        CertFailure::CnMismatch {
            cn: String::new(),
            registration_id: String::new(),
        },
        CertFailure::Revoked {
            subject: String::new(),
            entry: String::new(),
        },
        CertFailure::Expired {
            subject: String::new(),
            not_after: String::new(),
        },
        CertFailure::NotYetValid {
            subject: String::new(),
            not_before: String::new(),
        },
        CertFailure::UnknownIssuer {
            issuer: String::new(),
        },
        CertFailure::BadSignature,
        CertFailure::UnsupportedAlgorithm(String::new()),
        CertFailure::NotACa {
            subject: String::new(),
        },
        CertFailure::LeafIsCa,
        CertFailure::PathLenExceeded,
        CertFailure::EkuNotClientAuth,
        CertFailure::KeyUsageNotDigitalSignature,
        CertFailure::CaNotVerified {
            name: String::new(),
        },
        CertFailure::CertificateMismatch {
            registration_id: String::new(),
        },
        CertFailure::AttestationMismatch {
            registration_id: String::new(),
        },
        CertFailure::NoMatchingEnrollment,
        CertFailure::PopCodeMismatch { cn: String::new() },
        CertFailure::Invalid(String::new()),
    ];
    let codes: std::collections::HashSet<_> = all.iter().map(CertFailure::code).collect();
    assert_eq!(codes.len(), all.len());
}
