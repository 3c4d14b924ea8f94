//! X.509 attestation with enrollments present, so that chain verification is reached: an
//! individual enrollment, a group with a signing certificate, a group with a CA reference and a
//! deny list, all from a generated root → intermediate → leaf hierarchy. The first byte picks how
//! the input becomes the device's chain:
//! - 0: arbitrary bytes, split into up to three certificates at 0xff;
//! - 1: the valid leaf with the input XOR-ed over it, plus the valid intermediate;
//! - 2: the valid leaf plus the intermediate with the input XOR-ed over it;
//! - 3: the input as the leaf, plus the valid intermediate.
//!
//! Modes 1–3 keep most of the chain parseable, so mutations land in signature, name, validity
//! and extension checks rather than in the DER parser. Must never panic.
#![no_main]

#[path = "../../crates/core/tests/x509_support/mod.rs"]
#[allow(dead_code)]
mod x509_support;

use dps_core::model::{EnrollmentGroup, IndividualEnrollment};
use dps_core::x509::verify::{attest, CaCertificate, DenyList, X509Candidates};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use x509_support::{group_ca, group_signing, individual, now, Alg, Pki};

struct Env {
    pki: Pki,
    individual: IndividualEnrollment,
    groups: Vec<EnrollmentGroup>,
    cas: Vec<CaCertificate>,
    deny: DenyList,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let pki = Pki::new("device-1", Alg::EcdsaP256);
        let other = Pki::new("other", Alg::EcdsaP256);
        Env {
            individual: individual("device-1", &pki.leaf.der, None, true),
            groups: vec![
                group_signing("signing", &other.int.der, Some(&pki.int.der), true),
                group_ca("by-ca", "root", None),
            ],
            cas: vec![CaCertificate {
                name: "root".into(),
                der: pki.root.der.clone(),
                verified: true,
            }],
            deny: DenyList::from_entries(["AB"], ["01"]),
            pki,
        }
    })
}

fn xor(base: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    // Pairs of (position, mask): sparse mutations keep the rest of the DER intact.
    for pair in data.chunks(3) {
        if let [hi, lo, mask] = *pair {
            let i = (usize::from(hi) << 8 | usize::from(lo)) % out.len();
            out[i] ^= mask;
        } else if let [len_cut] = *pair {
            out.truncate(out.len().saturating_sub(usize::from(len_cut)));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let e = env();
    let chain: Vec<Vec<u8>> = match mode % 4 {
        0 => rest.splitn(3, |b| *b == 0xff).map(<[u8]>::to_vec).collect(),
        1 => vec![xor(&e.pki.leaf.der, rest), e.pki.int.der.clone()],
        2 => vec![e.pki.leaf.der.clone(), xor(&e.pki.int.der, rest)],
        _ => vec![rest.to_vec(), e.pki.int.der.clone()],
    };
    if let Some(leaf) = chain.first() {
        let _ = dps_core::x509::certificate_info(leaf);
        let _ = dps_core::x509::common_name(leaf);
        let _ = e.deny.is_revoked(leaf);
    }
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = dps_core::x509::decode_certificate(text);
        let _ = dps_core::x509::decode_chain(text);
    }
    let c = X509Candidates {
        individual: (mode & 0x10 != 0).then_some(&e.individual),
        groups: &e.groups,
        ca_certificates: &e.cas,
        deny: &e.deny,
    };
    let reg = if mode & 0x20 != 0 { "other" } else { "device-1" };
    let _ = attest(reg, &chain, &c, now());
});
