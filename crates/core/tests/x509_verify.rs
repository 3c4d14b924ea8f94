//! `verify_chain` with run-time trust anchors, and CA proof of possession (`verify_pop`).

mod x509_support;

use dps_core::x509::verify::{verify_chain, verify_pop, CertFailure};
use time::Duration;
use x509_support::*;

#[test]
fn root_anchor_with_intermediate_sent() {
    for alg in [Alg::EcdsaP256, Alg::Rsa2048] {
        let pki = Pki::new("dev", alg);
        verify_chain(&pki.chain(), &pki.root.der, now()).unwrap();
    }
}

#[test]
fn intermediate_anchor_leaf_only() {
    let pki = Pki::new("dev", Alg::EcdsaP256);
    verify_chain(std::slice::from_ref(&pki.leaf.der), &pki.int.der, now()).unwrap();
    // Sending the anchor too is harmless.
    verify_chain(&pki.chain(), &pki.int.der, now()).unwrap();
}

#[test]
fn root_sent_along_is_harmless() {
    let pki = Pki::new("dev", Alg::EcdsaP256);
    let chain = vec![
        pki.leaf.der.clone(),
        pki.int.der.clone(),
        pki.root.der.clone(),
    ];
    verify_chain(&chain, &pki.root.der, now()).unwrap();
}

#[test]
fn missing_intermediate_is_unknown_issuer() {
    let pki = Pki::new("dev", Alg::EcdsaP256);
    let err = verify_chain(std::slice::from_ref(&pki.leaf.der), &pki.root.der, now()).unwrap_err();
    assert_eq!(
        err,
        CertFailure::UnknownIssuer {
            issuer: "O=dps tests, CN=Test Intermediate".into()
        }
    );
}

#[test]
fn wrong_root_is_unknown_issuer() {
    let pki = Pki::new("dev", Alg::EcdsaP256);
    let other = Spec::ca("Other").self_signed();
    assert!(matches!(
        verify_chain(&pki.chain(), &other.der, now()).unwrap_err(),
        CertFailure::UnknownIssuer { .. }
    ));
}

#[test]
fn self_signed_leaf_as_anchor_checks_validity_only() {
    let n = now();
    let leaf = Spec::leaf("dev").self_signed();
    verify_chain(std::slice::from_ref(&leaf.der), &leaf.der, n).unwrap();
    assert!(matches!(
        verify_chain(
            std::slice::from_ref(&leaf.der),
            &leaf.der,
            n + Duration::days(400)
        )
        .unwrap_err(),
        CertFailure::Expired { .. }
    ));
    assert!(matches!(
        verify_chain(
            std::slice::from_ref(&leaf.der),
            &leaf.der,
            n - Duration::days(2)
        )
        .unwrap_err(),
        CertFailure::NotYetValid { .. }
    ));
}

#[test]
fn clock_is_honoured() {
    let pki = Pki::new("dev", Alg::EcdsaP256);
    let later = now() + Duration::days(366);
    assert!(matches!(
        verify_chain(&pki.chain(), &pki.root.der, later).unwrap_err(),
        CertFailure::Expired { .. }
    ));
}

#[test]
fn expired_intermediate_via_webpki_is_named() {
    let n = now();
    let root = Spec::ca("Root").self_signed();
    let int = Spec::ca("Short Int")
        .valid(n - Duration::days(3), n - Duration::days(1))
        .signed_by(&root);
    let leaf = Spec::leaf("dev").signed_by(&int);
    let err = verify_chain(&[leaf.der.clone(), int.der.clone()], &root.der, n).unwrap_err();
    match err {
        CertFailure::Expired { subject, not_after } => {
            assert!(subject.contains("Short Int"));
            assert!(not_after.ends_with(".0000000Z"), "{not_after}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn not_yet_valid_intermediate() {
    let n = now();
    let root = Spec::ca("Root").self_signed();
    let int = Spec::ca("Future Int")
        .valid(n + Duration::days(1), n + Duration::days(3))
        .signed_by(&root);
    let leaf = Spec::leaf("dev").signed_by(&int);
    let err = verify_chain(&[leaf.der.clone(), int.der.clone()], &root.der, n).unwrap_err();
    assert!(
        matches!(&err, CertFailure::NotYetValid { subject, .. } if subject.contains("Future Int")),
        "{err:?}"
    );
}

#[test]
fn garbage_anchor_and_empty_chain() {
    let pki = Pki::new("dev", Alg::EcdsaP256);
    assert!(matches!(
        verify_chain(&pki.chain(), b"nope", now()).unwrap_err(),
        CertFailure::Parse(_)
    ));
    assert_eq!(
        verify_chain(&[], &pki.root.der, now()).unwrap_err(),
        CertFailure::NoCertificate
    );
}

// ---- proof of possession ----------------------------------------------------------------------

const CODE: &str = "4F1C2D3B5A6978F0A1B2C3D4E5F60718293A4B5C6D7E8F90";

#[test]
fn pop_success_ecdsa_and_rsa() {
    for alg in [Alg::EcdsaP256, Alg::Rsa2048] {
        let ca = Spec::ca("Uploaded CA").alg(alg).self_signed();
        let vc = Spec::leaf(CODE).signed_by(&ca);
        verify_pop(&ca.der, &vc.der, CODE, now()).unwrap();
        // Code comparison ignores ASCII case.
        verify_pop(&ca.der, &vc.der, &CODE.to_lowercase(), now()).unwrap();
    }
}

#[test]
fn pop_intermediate_ca_and_any_eku() {
    let root = Spec::ca("Root").self_signed();
    let int = Spec::ca("Int CA").signed_by(&root);
    let vc = Spec::leaf(CODE)
        .eku(vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth])
        .signed_by(&int);
    verify_pop(&int.der, &vc.der, CODE, now()).unwrap();
}

#[test]
fn pop_wrong_code() {
    let ca = Spec::ca("CA").self_signed();
    let vc = Spec::leaf("not-the-code").signed_by(&ca);
    assert_eq!(
        verify_pop(&ca.der, &vc.der, CODE, now()).unwrap_err(),
        CertFailure::PopCodeMismatch {
            cn: "not-the-code".into()
        }
    );
    let no_cn = Spec::leaf("").signed_by(&ca);
    assert_eq!(
        verify_pop(&ca.der, &no_cn.der, CODE, now()).unwrap_err(),
        CertFailure::NoCommonName
    );
    let vc = Spec::leaf(CODE).signed_by(&ca);
    assert!(matches!(
        verify_pop(&ca.der, &vc.der, "", now()).unwrap_err(),
        CertFailure::PopCodeMismatch { .. }
    ));
}

#[test]
fn pop_signed_by_another_key() {
    let ca = Spec::ca("CA").self_signed();
    // Same subject name, different key: the signature fails.
    let impostor = Spec::ca("CA").self_signed();
    let vc = Spec::leaf(CODE).signed_by(&impostor);
    assert_eq!(
        verify_pop(&ca.der, &vc.der, CODE, now()).unwrap_err(),
        CertFailure::BadSignature
    );
    // Another CA altogether.
    let other = Spec::ca("Other CA").self_signed();
    let vc = Spec::leaf(CODE).signed_by(&other);
    assert!(matches!(
        verify_pop(&ca.der, &vc.der, CODE, now()).unwrap_err(),
        CertFailure::UnknownIssuer { .. }
    ));
    // The verification certificate self-signed.
    let vc = Spec::leaf(CODE).self_signed();
    assert!(verify_pop(&ca.der, &vc.der, CODE, now()).is_err());
}

#[test]
fn pop_expired_verification_cert_or_ca() {
    let n = now();
    let ca = Spec::ca("CA").self_signed();
    let vc = Spec::leaf(CODE)
        .valid(n - Duration::days(5), n - Duration::days(1))
        .signed_by(&ca);
    assert!(matches!(
        verify_pop(&ca.der, &vc.der, CODE, n).unwrap_err(),
        CertFailure::Expired { .. }
    ));
    let old_ca = Spec::ca("Old CA")
        .valid(n - Duration::days(5), n - Duration::days(1))
        .self_signed();
    let vc = Spec::leaf(CODE).signed_by(&old_ca);
    assert!(matches!(
        verify_pop(&old_ca.der, &vc.der, CODE, n).unwrap_err(),
        CertFailure::Expired { subject, .. } if subject.contains("Old CA")
    ));
}

#[test]
fn pop_on_a_non_ca_certificate() {
    let not_ca = Spec::leaf("device").self_signed();
    let vc = Spec::leaf(CODE).signed_by(&not_ca);
    assert!(matches!(
        verify_pop(&not_ca.der, &vc.der, CODE, now()).unwrap_err(),
        CertFailure::NotACa { .. }
    ));
}

#[test]
fn pop_garbage() {
    let ca = Spec::ca("CA").self_signed();
    assert!(matches!(
        verify_pop(&ca.der, b"junk", CODE, now()).unwrap_err(),
        CertFailure::Parse(_)
    ));
    assert!(matches!(
        verify_pop(b"junk", &ca.der, CODE, now()).unwrap_err(),
        CertFailure::Parse(_)
    ));
}
