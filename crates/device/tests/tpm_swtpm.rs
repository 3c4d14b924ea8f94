//! dps's activation blob against a real TPM 2.0: `swtpm` (Debian package `swtpm`) driven with
//! `tpm2-tools`. The device side runs `tpm2_createek`/`tpm2_createprimary`,
//! `tpm2_activatecredential`, `tpm2_import`, `tpm2_load` and `tpm2_hmac`; the TPM's HMAC must
//! equal the one computed with the key dps put in the blob. This checks MakeCredential, the
//! duplication to the SRK, KDFa, the OAEP labels and the key import against an independent
//! implementation (the reference TPM inside swtpm).
//!
//! Skipped when swtpm or tpm2-tools are missing, except under `CI=true`, where that fails.

use dps_core::random::{Random, SystemRandom};
use dps_core::sas::hmac_sha256;
use dps_core::tpm::{activation_blob, ActivationRandomness, PublicArea};
use dps_device::tpm::{tools_available, Swtpm, Tpm2Tools};

fn tools_or_skip() -> bool {
    if tools_available() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "swtpm and tpm2-tools are required under CI=true (apt-get install swtpm swtpm-tools tpm2-tools)"
    );
    eprintln!("skipped: swtpm or tpm2-tools not installed");
    false
}

#[test]
fn a_tpm_opens_the_activation_blob_and_signs_with_the_key_dps_chose() {
    if !tools_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(dir.path().join("state")).unwrap();
    let tools = Tpm2Tools::new(Some(tpm.tcti()), dir.path().join("work"));
    let keys = tools.provision().unwrap();
    let ek = PublicArea::from_tpm2b(&keys.endorsement_key).unwrap();
    let srk = PublicArea::from_tpm2b(&keys.storage_root_key).unwrap();
    // The standard EK template, as the SDKs create it.
    assert_eq!(ek.attributes, 0x0003_00b2);

    let mut key = [0u8; 32];
    SystemRandom.fill(&mut key);
    let blob =
        activation_blob(&ek, &srk, &key, &ActivationRandomness::draw(&SystemRandom)).unwrap();
    tools.import_activation(&blob).unwrap();
    let data = b"0ne00000A0A%2Fregistrations%2Fdevice-1\n1700000000";
    assert_eq!(tools.hmac(data).unwrap().to_vec(), hmac_sha256(&key, data));

    // Provisioning again finds the persistent keys: the same EK and SRK.
    assert_eq!(tools.provision().unwrap(), keys);

    // A second activation (a new key) replaces the first one.
    let mut key2 = [0u8; 32];
    SystemRandom.fill(&mut key2);
    let blob2 =
        activation_blob(&ek, &srk, &key2, &ActivationRandomness::draw(&SystemRandom)).unwrap();
    tools.import_activation(&blob2).unwrap();
    assert_eq!(tools.hmac(data).unwrap().to_vec(), hmac_sha256(&key2, data));
}

#[test]
fn a_blob_made_for_another_tpm_does_not_open() {
    if !tools_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Swtpm::start(dir.path().join("a")).unwrap();
    let b = Swtpm::start(dir.path().join("b")).unwrap();
    let ta = Tpm2Tools::new(Some(a.tcti()), dir.path().join("wa"));
    let tb = Tpm2Tools::new(Some(b.tcti()), dir.path().join("wb"));
    let ka = ta.provision().unwrap();
    let kb = tb.provision().unwrap();
    assert_ne!(ka.endorsement_key, kb.endorsement_key, "two TPMs, two EKs");
    let ek_a = PublicArea::from_tpm2b(&ka.endorsement_key).unwrap();
    let srk_a = PublicArea::from_tpm2b(&ka.storage_root_key).unwrap();
    let blob = activation_blob(
        &ek_a,
        &srk_a,
        &[9; 32],
        &ActivationRandomness::draw(&SystemRandom),
    )
    .unwrap();
    let e = tb.import_activation(&blob).unwrap_err();
    assert!(e.to_string().contains("tpm2_activatecredential"), "{e}");
}

/// ECC endorsement and storage keys (NIST P-256): the seeds come from ECDH and KDFe.
#[test]
fn ecc_endorsement_and_storage_keys_work_too() {
    if !tools_or_skip() {
        return;
    }
    for (ecc_ek, ecc_srk) in [(true, false), (true, true), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let tpm = Swtpm::start(dir.path().join("state")).unwrap();
        let tools = Tpm2Tools::new(Some(tpm.tcti()), dir.path().join("work"))
            .with_ecc_keys(ecc_ek, ecc_srk);
        let keys = tools.provision().unwrap();
        let ek = PublicArea::from_tpm2b(&keys.endorsement_key).unwrap();
        let srk = PublicArea::from_tpm2b(&keys.storage_root_key).unwrap();
        assert_eq!(ek.object_type == dps_core::tpm::alg::ECC, ecc_ek);
        assert_eq!(srk.object_type == dps_core::tpm::alg::ECC, ecc_srk);
        let mut key = [0u8; 32];
        SystemRandom.fill(&mut key);
        let blob =
            activation_blob(&ek, &srk, &key, &ActivationRandomness::draw(&SystemRandom)).unwrap();
        tools
            .import_activation(&blob)
            .unwrap_or_else(|e| panic!("ecc ek {ecc_ek}, ecc srk {ecc_srk}: {e}"));
        let data = b"sr\n1700000000";
        assert_eq!(tools.hmac(data).unwrap().to_vec(), hmac_sha256(&key, data));
    }
}
