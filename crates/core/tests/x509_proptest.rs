//! Certificate parsing on the attestation path never panics: arbitrary bytes and strings, and
//! mutated (bit-flipped, truncated, spliced) valid DER.

mod x509_support;

use std::sync::OnceLock;

use dps_core::x509::verify::{
    attest, verify_chain, verify_pop, CaCertificate, DenyList, X509Candidates,
};
use dps_core::x509::{certificate_info, common_name, decode_certificate, decode_chain};
use proptest::prelude::*;
use x509_support::*;

struct Fixture {
    pki: Pki,
    rsa: Pki,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        pki: Pki::new("dev", Alg::EcdsaP256),
        rsa: Pki::new("dev", Alg::Rsa2048),
    })
}

/// Run every parser and the whole attestation path on `chain`; only panics matter.
fn exercise(chain: &[Vec<u8>]) {
    let f = fixture();
    for der in chain {
        let _ = certificate_info(der);
        let _ = common_name(der);
        let _ = DenyList::from_entries(["00"], ["01"]).is_revoked(der);
        let _ = verify_pop(der, der, "dev", now());
        let _ = verify_pop(&f.pki.root.der, der, "dev", now());
    }
    let _ = verify_chain(chain, &f.pki.root.der, now());
    let _ = verify_chain(chain, &f.pki.int.der, now());
    if let Some(first) = chain.first() {
        let _ = verify_chain(&f.pki.chain(), first, now());
    }
    let groups = vec![
        group_signing("ec", &f.pki.root.der, None, true),
        group_signing("rsa", &f.rsa.int.der, None, true),
        group_ca("ca", "root", None),
    ];
    let cas = vec![CaCertificate {
        name: "root".into(),
        der: f.rsa.root.der.clone(),
        verified: true,
    }];
    let deny = DenyList::from_entries([f.pki.leaf.sha1()], ["7F"]);
    let ind = individual("dev", &f.pki.leaf.der, None, true);
    for individual in [None, Some(&ind)] {
        let c = X509Candidates {
            individual,
            groups: &groups,
            ca_certificates: &cas,
            deny: &deny,
        };
        let _ = attest("dev", chain, &c, now());
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

fn apply(der: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut d = der.to_vec();
    for m in muts {
        if d.is_empty() {
            break;
        }
        match *m {
            Mutation::Flip(i, x) => {
                let n = d.len();
                d[i % n] ^= x;
            }
            Mutation::Truncate(i) => d.truncate(i % d.len()),
            Mutation::Insert(i, b) => {
                let n = d.len();
                d.insert(i % (n + 1), b);
            }
            Mutation::Remove(i) => {
                let n = d.len();
                d.remove(i % n);
            }
        }
    }
    d
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(a in proptest::collection::vec(any::<u8>(), 0..600),
                                   b in proptest::collection::vec(any::<u8>(), 0..300)) {
        exercise(std::slice::from_ref(&a));
        exercise(&[a, b]);
    }

    #[test]
    fn arbitrary_text_never_panics(s in ".{0,400}") {
        let _ = decode_certificate(&s);
        let _ = decode_chain(&s);
        let pem = format!("-----BEGIN CERTIFICATE-----\n{s}\n-----END CERTIFICATE-----\n");
        let _ = decode_certificate(&pem);
        let _ = decode_chain(&pem);
    }

    #[test]
    fn mutated_leaf_never_panics(which in 0usize..4, muts in proptest::collection::vec(mutation(), 1..4)) {
        let f = fixture();
        let src = [&f.pki.leaf.der, &f.pki.int.der, &f.rsa.leaf.der, &f.rsa.root.der][which];
        let m = apply(src, &muts);
        exercise(&[m.clone(), f.pki.int.der.clone()]);
        exercise(&[f.pki.leaf.der.clone(), m.clone()]);
        // Through the text decoders too.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&m);
        if let Ok(der) = decode_certificate(&b64) {
            prop_assert!(certificate_info(&der).is_ok());
        }
    }

    #[test]
    fn mutated_chain_is_never_accepted_for_the_wrong_reason(i in any::<usize>(), x in 1u8..=255) {
        // A bit flip anywhere in the leaf either breaks parsing/verification or leaves a
        // certificate that still verifies (flips in unsigned outer fields are impossible:
        // everything but the signature is signed, and a changed signature fails).
        let f = fixture();
        let mut leaf = f.pki.leaf.der.clone();
        let n = leaf.len();
        leaf[i % n] ^= x;
        let chain = vec![leaf, f.pki.int.der.clone()];
        let ok = verify_chain(&chain, &f.pki.root.der, now()).is_ok();
        if ok {
            // Only DER-equivalent encodings could survive; the TBS must be unchanged.
            let orig = x509_parser::parse_x509_certificate(&f.pki.leaf.der).unwrap().1;
            let got = x509_parser::parse_x509_certificate(&chain[0]).unwrap().1;
            prop_assert_eq!(orig.tbs_certificate.as_ref(), got.tbs_certificate.as_ref());
        }
    }
}

#[test]
fn valid_fixture_is_accepted() {
    let f = fixture();
    let groups = vec![group_signing("ec", &f.pki.root.der, None, true)];
    let deny = DenyList::new();
    let c = X509Candidates {
        individual: None,
        groups: &groups,
        ca_certificates: &[],
        deny: &deny,
    };
    assert!(attest("dev", &f.pki.chain(), &c, now()).is_ok());
}
