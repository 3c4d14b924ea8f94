//! What trying one symmetric-key enrollment group costs an attestation: the device's token is
//! checked against every group of the instance (the token does not name its group), and a
//! refused token tries them all. Compares the per-group work before the keys were prepared
//! (derive the device key as base64 text, then verify the token against it, for the primary and
//! the secondary key) with the prepared path the engine uses now ([`GroupKey`] and
//! [`SignatureCheck`]).
//!
//!   cargo bench -p dps-core --bench sas_groups -- [--groups N] [--rounds R]
//!
//! Prints nanoseconds per group for a refused token (the worst case: every group, both keys).

use dps_core::sas::{derive_device_key, sign_token, GroupKey, SasToken};
use std::hint::black_box;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Group key number `i` (distinct for every `i` below 2^16).
fn key(i: usize) -> String {
    use base64::Engine as _;
    let mut k = [0u8; 32];
    k[..2].copy_from_slice(&(i as u16).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(k)
}

fn main() {
    let groups = arg("--groups", 100).min(usize::from(u16::MAX) / 2);
    let rounds = arg("--rounds", 2000);
    let rid = "meter-000123";
    let scope = "0ne00000042";
    let keys: Vec<(String, String)> = (0..groups).map(|i| (key(i), key(i + 1))).collect();
    let prepared: Vec<[Option<GroupKey>; 2]> = keys
        .iter()
        .map(|(p, s)| [GroupKey::new(p), GroupKey::new(s)])
        .collect();
    // Signed by a key of no group: every group is tried, both keys.
    let stranger = derive_device_key(&key(usize::from(u16::MAX)), rid).unwrap();
    let tok = sign_token(
        &format!("{scope}/registrations/{rid}"),
        &stranger,
        Some("registration"),
        4_000_000_000,
    )
    .unwrap();
    let tok = SasToken::parse(&tok).unwrap();
    let now = 1_800_000_000;

    let t = Instant::now();
    let mut hits = 0usize;
    for _ in 0..rounds {
        for (p, s) in &keys {
            let derived: Vec<String> = [p.as_str(), s.as_str()]
                .into_iter()
                .filter_map(|k| derive_device_key(k, rid))
                .collect();
            if tok
                .verify_device(scope, rid, derived.iter().map(String::as_str), now)
                .is_ok()
            {
                hits += 1;
            }
        }
    }
    let before = t.elapsed().as_nanos() as f64 / (rounds * groups) as f64;

    let t = Instant::now();
    for _ in 0..rounds {
        let check = tok.device_signature_check(scope, rid, now).unwrap();
        for [p, s] in &prepared {
            let signed = [p, s]
                .into_iter()
                .flatten()
                .any(|k| check.signed_by(&k.derive(black_box(rid))));
            hits += usize::from(signed);
        }
    }
    let after = t.elapsed().as_nanos() as f64 / (rounds * groups) as f64;
    assert_eq!(hits, 0, "no group signed the stranger's token");
    println!(
        "{groups} groups, {rounds} refused tokens: {before:.0} ns per group before (derive as text, verify), {after:.0} ns prepared"
    );
}
