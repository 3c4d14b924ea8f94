//! The certificate path of X.509 attestation: arbitrary bytes as a device chain (split into up
//! to three certificates) through parsing, info extraction, the deny list and the attestation
//! decision against an empty candidate set. Must never panic.
#![no_main]

use dps_core::x509::verify::{attest, DenyList, X509Candidates};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parts: Vec<Vec<u8>> = data.splitn(3, |b| *b == 0xff).map(<[u8]>::to_vec).collect();
    let _ = dps_core::x509::certificate_info(&parts[0]);
    let _ = dps_core::x509::common_name(&parts[0]);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dps_core::x509::decode_certificate(text);
        let _ = dps_core::x509::decode_chain(text);
    }
    let deny = DenyList::from_entries(["AB"], ["01"]);
    let _ = deny.is_revoked(&parts[0]);
    let c = X509Candidates { individual: None, groups: &[], ca_certificates: &[], deny: &deny };
    let _ = attest("device-1", &parts, &c, time::OffsetDateTime::UNIX_EPOCH);
});
