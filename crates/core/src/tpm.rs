//! TPM 2.0 attestation, the server side, in software (protocol digest §6.5): parsing the
//! `TPM2B_PUBLIC` keys a device sends, and building the activation blob (`authenticationKey`)
//! that hands the device an HMAC key only its TPM can open:
//!
//! 1. `TPM2_MakeCredential` against the endorsement key (EK): a credential blob and an
//!    RSA-OAEP-encrypted seed (label `IDENTITY\0`) protecting a fresh AES key (the inner wrap key).
//! 2. `TPM2_Duplicate` of the HMAC key to the storage root key (SRK): the sensitive area wrapped
//!    with that inner key, then with an outer wrap from a seed encrypted to the SRK (label
//!    `DUPLICATE\0`), and the HMAC key's public area.
//!
//! The device runs `ActivateCredential` (which only its TPM can do: the EK's private key never
//! leaves it) to get the inner key, `Import`s the HMAC key under its SRK and signs SAS tokens
//! with it inside the TPM. No I/O here; randomness comes from the injected [`Random`] (the
//! OAEP padding draws from aws-lc's own generator).
//!
//! Endorsement and storage keys: RSA (2048 to 4096 bits, seeds encrypted with RSA-OAEP) or ECC
//! NIST P-256 (seeds from an ephemeral ECDH exchange through KDFe), with AES-CFB symmetric
//! definitions; anything else is refused with [`TpmError::Unsupported`].

use crate::random::Random;
use aws_lc_rs::cipher::{
    DecryptingKey, DecryptionContext, EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128,
    AES_256,
};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// TPM algorithm ids (TPM 2.0 Part 2, `TPM_ALG_ID`).
pub mod alg {
    /// RSA.
    pub const RSA: u16 = 0x0001;
    /// HMAC signing scheme.
    pub const HMAC: u16 = 0x0005;
    /// AES.
    pub const AES: u16 = 0x0006;
    /// Keyed hash object.
    pub const KEYEDHASH: u16 = 0x0008;
    /// SHA-256.
    pub const SHA256: u16 = 0x000B;
    /// Null.
    pub const NULL: u16 = 0x0010;
    /// ECC.
    pub const ECC: u16 = 0x0023;
    /// ECDAA signing scheme (has a count after its hash).
    pub const ECDAA: u16 = 0x001A;
    /// TPM_ECC_NIST_P256 (a `TPM_ECC_CURVE`, not an algorithm).
    pub const NIST_P256: u16 = 0x0003;
    /// CFB mode.
    pub const CFB: u16 = 0x0043;
}

/// Object attributes of the HMAC key dps makes: sign, userWithAuth, noDA (not fixedTPM or
/// fixedParent, which `Import` forbids).
pub const ID_KEY_ATTRIBUTES: u32 = 0x0004_0440;

/// The authPolicy of the HMAC key: PolicyCommandCode(TPM_CC_Duplicate), as Microsoft's DPS
/// emulation (TSS.MSR) sets it.
pub const ID_KEY_POLICY: [u8; 32] = [
    0xbe, 0xf5, 0x6b, 0x8c, 0x1c, 0xc8, 0x4e, 0x11, 0xed, 0xd7, 0x17, 0x52, 0x8d, 0x2c, 0xd9, 0x93,
    0x56, 0xbd, 0x2b, 0xbf, 0x8f, 0x01, 0x52, 0x09, 0xc3, 0xf8, 0x4a, 0xee, 0xab, 0xa8, 0xe8, 0xa2,
];

/// Why a TPM key or blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The text is not base64.
    #[error("the {0} is not base64")]
    Base64(&'static str),
    /// The bytes are not a well-formed structure.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A well-formed key dps cannot use.
    #[error("unsupported key: {0}")]
    Unsupported(String),
    /// The cryptographic library failed (a key it refuses).
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

/// The symmetric algorithm of a storage key (`TPMT_SYM_DEF_OBJECT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymDef {
    /// Algorithm (AES).
    pub alg: u16,
    /// Key bits.
    pub key_bits: u16,
    /// Mode (CFB).
    pub mode: u16,
}

/// What kind of public key, and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublicDetail {
    /// An RSA key.
    Rsa {
        /// Symmetric algorithm of a storage key, `None` for TPM_ALG_NULL.
        symmetric: Option<SymDef>,
        /// Key bits.
        key_bits: u16,
        /// Public exponent (0 means 65537).
        exponent: u32,
        /// Modulus, big-endian.
        modulus: Vec<u8>,
    },
    /// An ECC key (NIST P-256 is the one dps can make activations for).
    Ecc {
        /// Symmetric algorithm of a storage key, `None` for TPM_ALG_NULL.
        symmetric: Option<SymDef>,
        /// `TPM_ECC_CURVE`.
        curve: u16,
        /// Public point x.
        x: Vec<u8>,
        /// Public point y.
        y: Vec<u8>,
    },
    /// A keyed-hash (HMAC) key.
    KeyedHash {
        /// Scheme (HMAC) and its hash, `None` for TPM_ALG_NULL.
        scheme: Option<(u16, u16)>,
        /// Unique (H(seed ‖ key)).
        unique: Vec<u8>,
    },
}

/// A parsed `TPMT_PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicArea {
    raw: Vec<u8>,
    /// TPM_ALG_RSA, TPM_ALG_KEYEDHASH, ...
    pub object_type: u16,
    /// Name algorithm.
    pub name_alg: u16,
    /// Object attributes.
    pub attributes: u32,
    /// Authorization policy digest.
    pub auth_policy: Vec<u8>,
    /// Type-specific parameters and unique.
    pub detail: PublicDetail,
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, why: &'static str) -> TpmError {
        TpmError::Malformed {
            what: self.what,
            why,
        }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        if self.b.len() < n {
            return Err(self.err("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    fn end(&self) -> Result<(), TpmError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

/// `u16 len ‖ bytes`.
pub fn tpm2b(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + data.len());
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

impl PublicArea {
    /// Parse a `TPM2B_PUBLIC` (the size prefix, then `TPMT_PUBLIC`, nothing after).
    pub fn from_tpm2b(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader {
            b: bytes,
            what: "TPM2B_PUBLIC",
        };
        let inner = r.tpm2b()?;
        r.end()?;
        Self::from_tpmt(inner)
    }

    /// Parse base64 `TPM2B_PUBLIC`, as devices send `endorsementKey` and `storageRootKey`.
    pub fn from_base64(text: &str, what: &'static str) -> Result<Self, TpmError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| TpmError::Base64(what))?;
        Self::from_tpm2b(&bytes)
    }

    /// Parse a `TPMT_PUBLIC` (no size prefix).
    pub fn from_tpmt(bytes: &[u8]) -> Result<Self, TpmError> {
        if bytes.len() > 1024 {
            return Err(TpmError::Malformed {
                what: "TPMT_PUBLIC",
                why: "longer than 1024 bytes",
            });
        }
        let mut r = Reader {
            b: bytes,
            what: "TPMT_PUBLIC",
        };
        let object_type = r.u16()?;
        let name_alg = r.u16()?;
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b()?.to_vec();
        let detail = match object_type {
            alg::RSA => {
                let sym_alg = r.u16()?;
                let symmetric = if sym_alg == alg::NULL {
                    None
                } else {
                    Some(SymDef {
                        alg: sym_alg,
                        key_bits: r.u16()?,
                        mode: r.u16()?,
                    })
                };
                let scheme = r.u16()?;
                if scheme != alg::NULL {
                    r.u16()?; // the scheme's hash
                }
                let key_bits = r.u16()?;
                let exponent = r.u32()?;
                let modulus = r.tpm2b()?.to_vec();
                PublicDetail::Rsa {
                    symmetric,
                    key_bits,
                    exponent,
                    modulus,
                }
            }
            alg::KEYEDHASH => {
                let scheme = r.u16()?;
                let scheme = match scheme {
                    alg::NULL => None,
                    alg::HMAC => Some((scheme, r.u16()?)),
                    _ => {
                        return Err(TpmError::Unsupported(format!(
                            "keyed-hash scheme 0x{scheme:04x}"
                        )))
                    }
                };
                let unique = r.tpm2b()?.to_vec();
                PublicDetail::KeyedHash { scheme, unique }
            }
            alg::ECC => {
                let sym_alg = r.u16()?;
                let symmetric = if sym_alg == alg::NULL {
                    None
                } else {
                    Some(SymDef {
                        alg: sym_alg,
                        key_bits: r.u16()?,
                        mode: r.u16()?,
                    })
                };
                let scheme = r.u16()?;
                if scheme == alg::ECDAA {
                    r.u16()?; // hash
                    r.u16()?; // count
                } else if scheme != alg::NULL {
                    r.u16()?; // hash
                }
                let curve = r.u16()?;
                let kdf = r.u16()?;
                if kdf != alg::NULL {
                    r.u16()?;
                }
                let x = r.tpm2b()?.to_vec();
                let y = r.tpm2b()?.to_vec();
                PublicDetail::Ecc {
                    symmetric,
                    curve,
                    x,
                    y,
                }
            }
            t => return Err(TpmError::Unsupported(format!("object type 0x{t:04x}"))),
        };
        r.end()?;
        Ok(PublicArea {
            raw: bytes.to_vec(),
            object_type,
            name_alg,
            attributes,
            auth_policy,
            detail,
        })
    }

    /// The marshalled `TPMT_PUBLIC`.
    pub fn tpmt(&self) -> &[u8] {
        &self.raw
    }

    /// The marshalled `TPM2B_PUBLIC`.
    pub fn to_tpm2b(&self) -> Vec<u8> {
        tpm2b(&self.raw)
    }

    /// The object's Name: `nameAlg ‖ H(TPMT_PUBLIC)` (SHA-256 only).
    pub fn name(&self) -> Result<Vec<u8>, TpmError> {
        if self.name_alg != alg::SHA256 {
            return Err(TpmError::Unsupported(format!(
                "name algorithm 0x{:04x} (only SHA-256)",
                self.name_alg
            )));
        }
        let mut n = alg::SHA256.to_be_bytes().to_vec();
        n.extend_from_slice(&Sha256::digest(&self.raw));
        Ok(n)
    }

    /// The RSA modulus, when this is an RSA key.
    pub fn rsa_modulus(&self) -> Option<&[u8]> {
        match &self.detail {
            PublicDetail::Rsa { modulus, .. } => Some(modulus),
            PublicDetail::Ecc { .. } | PublicDetail::KeyedHash { .. } => None,
        }
    }

    /// Is this the same key as `other` (same public area)? EKs are compared this way, not by
    /// their base64 text.
    pub fn same_key(&self, other: &PublicArea) -> bool {
        self.raw == other.raw
    }

    /// Can dps make an activation with this key (as the EK or the SRK)? `role` names it in the
    /// error.
    pub fn check_activation_key(&self, role: &'static str) -> Result<(), TpmError> {
        self.storage_key(role).map(|_| ())
    }

    /// Check that this key can protect an activation: RSA 2048 to 4096 bits or ECC NIST P-256,
    /// SHA-256 name, with an AES-CFB symmetric definition.
    fn storage_key(&self, role: &'static str) -> Result<StorageKey, TpmError> {
        let name = self.name()?;
        let check_sym = |symmetric: &Option<SymDef>| match symmetric {
            Some(s)
                if s.alg == alg::AES && s.mode == alg::CFB && matches!(s.key_bits, 128 | 256) =>
            {
                Ok(s.key_bits)
            }
            _ => Err(TpmError::Unsupported(format!(
                "the {role}'s symmetric algorithm must be AES-128-CFB or AES-256-CFB"
            ))),
        };
        match &self.detail {
            PublicDetail::Rsa {
                symmetric,
                key_bits,
                exponent,
                modulus,
            } => {
                if !(2048..=4096).contains(key_bits) || modulus.len() * 8 != *key_bits as usize {
                    return Err(TpmError::Unsupported(format!(
                        "the {role} has {} modulus bits (keyBits {key_bits}); 2048 to 4096 are supported",
                        modulus.len() * 8
                    )));
                }
                let sym_bits = check_sym(symmetric)?;
                let e = if *exponent == 0 { 65537 } else { *exponent };
                let spki = rsa_spki(modulus, e);
                let key = PublicEncryptingKey::from_der(&spki).map_err(|_| {
                    TpmError::Unsupported(format!("the {role}'s RSA key is refused"))
                })?;
                let oaep =
                    OaepPublicEncryptingKey::new(key).map_err(|_| TpmError::Crypto("OAEP key"))?;
                Ok(StorageKey {
                    kind: StorageKind::Rsa(oaep),
                    sym_bits,
                    name,
                })
            }
            PublicDetail::Ecc {
                symmetric,
                curve,
                x,
                y,
            } => {
                if *curve != alg::NIST_P256 || x.len() != 32 || y.len() != 32 {
                    return Err(TpmError::Unsupported(format!(
                        "the {role} is on ECC curve 0x{curve:04x}; only NIST P-256 is supported"
                    )));
                }
                let sym_bits = check_sym(symmetric)?;
                let mut point = vec![4u8];
                point.extend_from_slice(x);
                point.extend_from_slice(y);
                Ok(StorageKey {
                    kind: StorageKind::EccP256 { point },
                    sym_bits,
                    name,
                })
            }
            PublicDetail::KeyedHash { .. } => Err(TpmError::Unsupported(format!(
                "the {role} is not an RSA or ECC key"
            ))),
        }
    }
}

enum StorageKind {
    Rsa(OaepPublicEncryptingKey),
    /// Uncompressed point `04 ‖ x ‖ y`.
    EccP256 {
        point: Vec<u8>,
    },
}

struct StorageKey {
    kind: StorageKind,
    sym_bits: u16,
    name: Vec<u8>,
}

impl StorageKey {
    /// The seed protecting a credential or a duplicate, and its `TPM2B_ENCRYPTED_SECRET`
    /// content, for this key (TPM 2.0 Part 1, §24 "Secret sharing"): RSA encrypts
    /// `random_seed` with OAEP under `label`; ECC derives the seed with KDFe from an ephemeral
    /// ECDH exchange and sends the ephemeral point (`random_seed` is not used).
    fn secret(&self, random_seed: &[u8], label: &[u8]) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        match &self.kind {
            StorageKind::Rsa(oaep) => {
                let mut out = vec![0u8; oaep.ciphertext_size()];
                let n = oaep
                    .encrypt(&OAEP_SHA256_MGF1SHA256, random_seed, &mut out, Some(label))
                    .map_err(|_| TpmError::Crypto("RSA-OAEP encryption"))?
                    .len();
                out.truncate(n);
                Ok((random_seed.to_vec(), out))
            }
            StorageKind::EccP256 { point } => {
                use aws_lc_rs::agreement::{
                    agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256,
                };
                let rng = aws_lc_rs::rand::SystemRandom::new();
                let eph = EphemeralPrivateKey::generate(&ECDH_P256, &rng)
                    .map_err(|_| TpmError::Crypto("ECDH key generation"))?;
                let eph_pub = eph
                    .compute_public_key()
                    .map_err(|_| TpmError::Crypto("ECDH public key"))?;
                let eph_pub = eph_pub.as_ref();
                let (ex, ey) = (&eph_pub[1..33], &eph_pub[33..65]);
                let z = agree_ephemeral(
                    eph,
                    UnparsedPublicKey::new(&ECDH_P256, point.as_slice()),
                    TpmError::Unsupported("the ECC key is not a valid P-256 point".into()),
                    |z| Ok(z.to_vec()),
                )?;
                let seed = kdfe(&z, label, ex, &point[1..33], 256);
                let mut enc = tpm2b(ex);
                enc.extend_from_slice(&tpm2b(ey));
                Ok((seed, enc))
            }
        }
    }
}

/// KDFe (TPM 2.0 Part 1, §11.4.10.3) with SHA-256: the first `bits` of
/// `H(u32 i ‖ Z ‖ label ‖ partyU ‖ partyV)` for i = 1, 2, ...; `label` includes its NUL.
pub fn kdfe(z: &[u8], label: &[u8], party_u: &[u8], party_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut i: u32 = 1;
    while out.len() < bytes {
        out.extend_from_slice(
            &Sha256::new()
                .chain_update(i.to_be_bytes())
                .chain_update(z)
                .chain_update(label)
                .chain_update(party_u)
                .chain_update(party_v)
                .finalize(),
        );
        i += 1;
    }
    out.truncate(bytes);
    out
}

fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    der_len(content.len(), &mut v);
    v.extend_from_slice(content);
    v
}

fn der_uint(be: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = be.iter().copied().skip_while(|b| *b == 0).collect();
    let mut c = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        c.push(0);
    }
    c.extend_from_slice(&trimmed);
    der(0x02, &c)
}

/// `SubjectPublicKeyInfo` DER of an RSA public key.
fn rsa_spki(modulus: &[u8], exponent: u32) -> Vec<u8> {
    let rsa_key = der(
        0x30,
        &[der_uint(modulus), der_uint(&exponent.to_be_bytes())].concat(),
    );
    let alg_id = der(
        0x30,
        &[
            der(
                0x06,
                &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
            ),
            vec![0x05, 0x00],
        ]
        .concat(),
    );
    let mut bits = vec![0u8];
    bits.extend_from_slice(&rsa_key);
    der(0x30, &[alg_id, der(0x03, &bits)].concat())
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// KDFa (TPM 2.0 Part 1, §11.4.10.2) with HMAC-SHA256: the first `bits` of
/// `HMAC(key, u32 i ‖ label ‖ 00 ‖ context_u ‖ context_v ‖ u32 bits)` for i = 1, 2, ...
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut i: u32 = 1;
    while out.len() < bytes {
        out.extend_from_slice(&hmac(
            key,
            &[
                &i.to_be_bytes(),
                label.as_bytes(),
                &[0],
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        ));
        i += 1;
    }
    out.truncate(bytes);
    if !bits.is_multiple_of(8) {
        out[0] &= (1u8 << (bits % 8)) - 1;
    }
    out
}

fn aes_key(key: &[u8]) -> Result<UnboundCipherKey, TpmError> {
    let alg = match key.len() {
        16 => &AES_128,
        32 => &AES_256,
        _ => return Err(TpmError::Crypto("AES key length")),
    };
    UnboundCipherKey::new(alg, key).map_err(|_| TpmError::Crypto("AES key"))
}

/// AES-CFB with an all-zero IV (how TPM protects credentials and duplicated sensitive areas).
pub fn cfb_encrypt(key: &[u8], data: &mut [u8]) -> Result<(), TpmError> {
    let k = EncryptingKey::cfb128(aes_key(key)?).map_err(|_| TpmError::Crypto("AES-CFB"))?;
    k.less_safe_encrypt(data, EncryptionContext::Iv128(FixedLength::from([0u8; 16])))
        .map_err(|_| TpmError::Crypto("AES-CFB encryption"))?;
    Ok(())
}

/// The inverse of [`cfb_encrypt`].
pub fn cfb_decrypt(key: &[u8], data: &mut [u8]) -> Result<(), TpmError> {
    let k = DecryptingKey::cfb128(aes_key(key)?).map_err(|_| TpmError::Crypto("AES-CFB"))?;
    k.decrypt(data, DecryptionContext::Iv128(FixedLength::from([0u8; 16])))
        .map_err(|_| TpmError::Crypto("AES-CFB decryption"))?;
    Ok(())
}

/// The public area of the HMAC key dps makes for a device: keyed hash, HMAC-SHA256, sign,
/// userWithAuth, noDA, unique = H(obfuscation ‖ key).
pub fn id_key_public(obfuscation: &[u8; 32], key: &[u8; 32]) -> PublicArea {
    let mut p = Vec::with_capacity(80);
    p.extend_from_slice(&alg::KEYEDHASH.to_be_bytes());
    p.extend_from_slice(&alg::SHA256.to_be_bytes());
    p.extend_from_slice(&ID_KEY_ATTRIBUTES.to_be_bytes());
    p.extend_from_slice(&tpm2b(&ID_KEY_POLICY));
    p.extend_from_slice(&alg::HMAC.to_be_bytes());
    p.extend_from_slice(&alg::SHA256.to_be_bytes());
    let mut h = Sha256::new();
    h.update(obfuscation);
    h.update(key);
    p.extend_from_slice(&tpm2b(&h.finalize()));
    PublicArea::from_tpmt(&p).expect("well-formed by construction")
}

/// The random values of one activation blob (from [`Random`], or fixed in tests).
#[derive(Clone)]
pub struct ActivationRandomness {
    /// The HMAC key's obfuscation value (`seedValue`).
    pub obfuscation: [u8; 32],
    /// The inner wrap key (the credential MakeCredential protects), AES-128.
    pub inner_key: [u8; 16],
    /// MakeCredential's seed.
    pub credential_seed: [u8; 32],
    /// Duplication's (outer wrap) seed.
    pub duplication_seed: [u8; 32],
}

impl std::fmt::Debug for ActivationRandomness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActivationRandomness { <redacted> }")
    }
}

impl ActivationRandomness {
    /// Draw fresh values.
    pub fn draw(random: &dyn Random) -> Self {
        let mut r = ActivationRandomness {
            obfuscation: [0; 32],
            inner_key: [0; 16],
            credential_seed: [0; 32],
            duplication_seed: [0; 32],
        };
        random.fill(&mut r.obfuscation);
        random.fill(&mut r.inner_key);
        random.fill(&mut r.credential_seed);
        random.fill(&mut r.duplication_seed);
        r
    }
}

/// MakeCredential: `(TPMS_ID_OBJECT bytes, encrypted seed)`, with `seed_encrypt` encrypting the
/// seed to the EK (label `IDENTITY\0`).
fn make_credential(
    ek_sym_bits: u16,
    object_name: &[u8],
    credential: &[u8],
    seed: &[u8],
) -> Result<Vec<u8>, TpmError> {
    let sym = kdfa(seed, "STORAGE", object_name, &[], u32::from(ek_sym_bits));
    let mut enc_identity = tpm2b(credential);
    cfb_encrypt(&sym, &mut enc_identity)?;
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256);
    let integrity = hmac(&hmac_key, &[&enc_identity, object_name]);
    let mut id_object = tpm2b(&integrity);
    id_object.extend_from_slice(&enc_identity);
    Ok(id_object)
}

/// Duplicate: the `TPM2B_PRIVATE` content (`outerHMAC ‖ dupSensitive`) of the sensitive area
/// wrapped with `inner_key` and then with keys from `seed` (the SRK's symmetric size).
fn duplicate(
    srk_sym_bits: u16,
    object_name: &[u8],
    sensitive: &[u8],
    inner_key: &[u8],
    seed: &[u8],
) -> Result<Vec<u8>, TpmError> {
    let sens2b = tpm2b(sensitive);
    let inner_integrity = Sha256::new()
        .chain_update(&sens2b)
        .chain_update(object_name)
        .finalize();
    let mut enc_sens = tpm2b(&inner_integrity);
    enc_sens.extend_from_slice(&sens2b);
    cfb_encrypt(inner_key, &mut enc_sens)?;
    let sym = kdfa(seed, "STORAGE", object_name, &[], u32::from(srk_sym_bits));
    cfb_encrypt(&sym, &mut enc_sens)?;
    let hmac_key = kdfa(seed, "INTEGRITY", &[], &[], 256);
    let outer = hmac(&hmac_key, &[&enc_sens, object_name]);
    let mut private = tpm2b(&outer);
    private.extend_from_slice(&enc_sens);
    Ok(private)
}

/// The `TPMT_SENSITIVE` of the HMAC key: keyed hash, empty authValue, seedValue, key.
fn id_key_sensitive(obfuscation: &[u8; 32], key: &[u8; 32]) -> Vec<u8> {
    let mut s = Vec::with_capacity(72);
    s.extend_from_slice(&alg::KEYEDHASH.to_be_bytes());
    s.extend_from_slice(&tpm2b(&[]));
    s.extend_from_slice(&tpm2b(obfuscation));
    s.extend_from_slice(&tpm2b(key));
    s
}

/// The activation blob (`authenticationKey`, §6.5.3) giving `hmac_key` to the TPM that holds
/// `ek`, imported under `srk`: `TPM2B_ID_OBJECT ‖ TPM2B_ENCRYPTED_SECRET ‖ TPM2B_PRIVATE ‖
/// TPM2B_ENCRYPTED_SECRET ‖ TPM2B_PUBLIC ‖ 00 00`.
pub fn activation_blob(
    ek: &PublicArea,
    srk: &PublicArea,
    hmac_key: &[u8; 32],
    rnd: &ActivationRandomness,
) -> Result<Vec<u8>, TpmError> {
    let ek_key = ek.storage_key("endorsement key")?;
    let srk_key = srk.storage_key("storage root key")?;
    let id_pub = id_key_public(&rnd.obfuscation, hmac_key);
    let id_name = id_pub.name()?;
    let (credential_seed, enc_secret) = ek_key.secret(&rnd.credential_seed, b"IDENTITY\0")?;
    let id_object = make_credential(
        ek_key.sym_bits,
        &srk_key.name,
        &rnd.inner_key,
        &credential_seed,
    )?;
    let (duplication_seed, enc_seed) = srk_key.secret(&rnd.duplication_seed, b"DUPLICATE\0")?;
    let private = duplicate(
        srk_key.sym_bits,
        &id_name,
        &id_key_sensitive(&rnd.obfuscation, hmac_key),
        &rnd.inner_key,
        &duplication_seed,
    )?;
    let mut blob = Vec::with_capacity(1200);
    for part in [
        &id_object[..],
        &enc_secret,
        &private,
        &enc_seed,
        id_pub.tpmt(),
        &[],
    ] {
        blob.extend_from_slice(&tpm2b(part));
    }
    Ok(blob)
}

/// An activation blob split into its six fields (what the device side feeds its TPM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationParts {
    /// `TPMS_ID_OBJECT` (integrity HMAC ‖ encIdentity), without the outer size.
    pub id_object: Vec<u8>,
    /// The seed encrypted to the EK.
    pub encrypted_secret: Vec<u8>,
    /// The `TPM2B_PRIVATE` content (outer HMAC ‖ dupSensitive).
    pub private: Vec<u8>,
    /// The seed encrypted to the SRK.
    pub encrypted_seed: Vec<u8>,
    /// The HMAC key's `TPMT_PUBLIC`.
    pub public: Vec<u8>,
    /// Optional data (empty from dps).
    pub uri_data: Vec<u8>,
}

impl ActivationParts {
    /// Split a blob; every field must be present and nothing may follow.
    pub fn parse(blob: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader {
            b: blob,
            what: "activation blob",
        };
        let p = ActivationParts {
            id_object: r.tpm2b()?.to_vec(),
            encrypted_secret: r.tpm2b()?.to_vec(),
            private: r.tpm2b()?.to_vec(),
            encrypted_seed: r.tpm2b()?.to_vec(),
            public: r.tpm2b()?.to_vec(),
            uri_data: r.tpm2b()?.to_vec(),
        };
        r.end()?;
        Ok(p)
    }
}

/// The default registration id of a TPM device: SHA-256 of the EK's `TPM2B_PUBLIC` bytes,
/// RFC 4648 base32, lowercase, without padding (C SDK `load_registration_id`, Node `tpm.ts`).
pub fn registration_id_from_ek(ek_tpm2b: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = Sha256::digest(ek_tpm2b);
    let mut out = String::with_capacity(52);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in digest {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The EK of the Azure SDK samples (protocol digest §6.5.1), a standard RSA-2048 EK.
    const SAMPLE_EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAopqgkUBwtpr1sCgVJcEZxsJtpmtOAt9K7SjGFe4hsp6DJ/dd2E5UFzBC+Jp8Fzqf5ukRBkqrAgIuAvHRsruIedk1uarJSLhbDpFLHxFd7iDNcYfrvdgVNT2T9zrvkh2y04WuRQg2D5qf0tZF82jeTjR/YJK7uWhaRwWOwZ3b1XD9l6wFOrwK/Ic0PEsjneFXQzL0n9uKyuHmHNz+wHppmOiMAabvnXXEin9ou7/iowY/+YhFm3j7atsVvxMI5HEM3Mq+W4imUuzPxVX7fZH+oWPKP5ofpWBTf+MdttGby1AjGnv8JE69JriOYoZG2/4qbsfv9M7a7NFrBlaW7Rt36w==";

    fn sample_ek() -> PublicArea {
        PublicArea::from_base64(SAMPLE_EK, "endorsement key").unwrap()
    }

    #[test]
    fn the_sample_ek_parses_as_the_standard_ek_template() {
        let ek = sample_ek();
        assert_eq!(ek.object_type, alg::RSA);
        assert_eq!(ek.name_alg, alg::SHA256);
        assert_eq!(ek.attributes, 0x0003_00b2);
        assert_eq!(
            hex::encode(&ek.auth_policy),
            "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
        );
        match &ek.detail {
            PublicDetail::Rsa {
                symmetric,
                key_bits,
                exponent,
                modulus,
            } => {
                assert_eq!(
                    *symmetric,
                    Some(SymDef {
                        alg: alg::AES,
                        key_bits: 128,
                        mode: alg::CFB
                    })
                );
                assert_eq!((*key_bits, *exponent, modulus.len()), (2048, 0, 256));
            }
            other => panic!("{other:?}"),
        }
        // Round trip, and the key is usable for an activation.
        let b = base64::engine::general_purpose::STANDARD
            .decode(SAMPLE_EK)
            .unwrap();
        assert_eq!(ek.to_tpm2b(), b);
        assert!(ek.storage_key("endorsement key").is_ok());
        assert_eq!(ek.name().unwrap().len(), 34);
    }

    #[test]
    fn malformed_keys_are_refused_not_panicked_on() {
        let b = base64::engine::general_purpose::STANDARD
            .decode(SAMPLE_EK)
            .unwrap();
        for cut in 0..b.len() {
            assert!(PublicArea::from_tpm2b(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            PublicArea::from_tpm2b(&longer),
            Err(TpmError::Malformed { .. })
        ));
        assert_eq!(
            PublicArea::from_base64("not base64!", "endorsement key"),
            Err(TpmError::Base64("endorsement key"))
        );
        // An RSA area relabelled as ECC is refused (malformed, or not a usable P-256 key).
        let mut ecc = b[2..].to_vec();
        ecc[0..2].copy_from_slice(&alg::ECC.to_be_bytes());
        assert!(PublicArea::from_tpmt(&ecc)
            .and_then(|k| k.check_activation_key("endorsement key"))
            .is_err());
    }

    #[test]
    fn kdfe_matches_an_independent_implementation() {
        // Python: sha256(u32 1 ‖ Z ‖ "IDENTITY\0" ‖ U ‖ V).
        let k = kdfe(&[0x33; 32], b"IDENTITY\0", &[0x44; 32], &[0x55; 32], 256);
        assert_eq!(
            hex::encode(k),
            "57c122429eebbf361046122bef2fb0aa1e5089a55a48b5026f800a080478b5a7"
        );
    }

    #[test]
    fn kdfa_matches_an_independent_implementation() {
        // Computed with Python (hmac, cryptography) from the KDFa definition.
        let k = kdfa(&[0x11; 32], "STORAGE", b"name", b"", 128);
        assert_eq!(hex::encode(k), KDFA_STORAGE_128);
        let k = kdfa(&[0x11; 32], "INTEGRITY", b"", b"", 256);
        assert_eq!(hex::encode(k), KDFA_INTEGRITY_256);
        let k = kdfa(&[0x22; 16], "X", b"u", b"v", 520);
        assert_eq!(hex::encode(k), KDFA_X_520);
    }

    const KDFA_STORAGE_128: &str = "5ecd417a5e27b593fec5a588242e73da";
    const KDFA_INTEGRITY_256: &str =
        "94789f5bdf2e06996955def207b39ac5450e89e24dd1474bd9efc38901e2fd81";
    const KDFA_X_520: &str = "6f3104eb12b9e06837757f6d8cc1cfe6ad7c3dca28f9211a792d60f70013cd35e4029cd00bcab021cceecbc725c68d5a7e70861981e9feac188ba12b65b5868dd2";

    #[test]
    fn the_default_registration_id_is_base32_of_the_ek_hash() {
        let b = base64::engine::general_purpose::STANDARD
            .decode(SAMPLE_EK)
            .unwrap();
        assert_eq!(registration_id_from_ek(&b), SAMPLE_EK_REGISTRATION_ID);
    }

    /// The registration id the C SDK used for this EK (azure-iot-sdk-c issue #271).
    const SAMPLE_EK_REGISTRATION_ID: &str = "6rek5qncnygnkzflohxz4u6zlfly6ktm4klsc7xrbgvesqyllnfa";

    /// What a TPM does with the blob, in software, given the seeds (the RSA decryption is the
    /// one step left out: the swtpm tests do it for real).
    fn software_activate(
        blob_parts: &ActivationParts,
        srk_name: &[u8],
        rnd: &ActivationRandomness,
    ) -> Result<[u8; 32], &'static str> {
        // ActivateCredential.
        let mut r = Reader {
            b: &blob_parts.id_object,
            what: "id object",
        };
        let integrity = r.tpm2b().unwrap().to_vec();
        let mut enc_identity = r.b.to_vec();
        let hk = kdfa(&rnd.credential_seed, "INTEGRITY", &[], &[], 256);
        if hmac(&hk, &[&enc_identity, srk_name]).to_vec() != integrity {
            return Err("credential integrity");
        }
        let sym = kdfa(&rnd.credential_seed, "STORAGE", srk_name, &[], 128);
        cfb_decrypt(&sym, &mut enc_identity).unwrap();
        let inner_key = Reader {
            b: &enc_identity,
            what: "",
        }
        .tpm2b()
        .unwrap()
        .to_vec();
        // Import.
        let public = PublicArea::from_tpmt(&blob_parts.public).unwrap();
        let name = public.name().unwrap();
        let mut r = Reader {
            b: &blob_parts.private,
            what: "private",
        };
        let outer = r.tpm2b().unwrap().to_vec();
        let mut dup = r.b.to_vec();
        let hk = kdfa(&rnd.duplication_seed, "INTEGRITY", &[], &[], 256);
        if hmac(&hk, &[&dup, &name]).to_vec() != outer {
            return Err("outer integrity");
        }
        let sym = kdfa(&rnd.duplication_seed, "STORAGE", &name, &[], 128);
        cfb_decrypt(&sym, &mut dup).unwrap();
        cfb_decrypt(&inner_key, &mut dup).unwrap();
        let mut r = Reader {
            b: &dup,
            what: "inner",
        };
        let inner_integrity = r.tpm2b().unwrap().to_vec();
        let sens2b = r.b.to_vec();
        if Sha256::new()
            .chain_update(&sens2b)
            .chain_update(&name)
            .finalize()
            .to_vec()
            != inner_integrity
        {
            return Err("inner integrity");
        }
        let mut r = Reader {
            b: &sens2b,
            what: "sensitive",
        };
        let sens = r.tpm2b().unwrap();
        let mut r = Reader {
            b: sens,
            what: "sensitive",
        };
        assert_eq!(r.u16().unwrap(), alg::KEYEDHASH);
        assert!(r.tpm2b().unwrap().is_empty());
        let seed = r.tpm2b().unwrap().to_vec();
        let key: [u8; 32] = r.tpm2b().unwrap().try_into().unwrap();
        r.end().unwrap();
        // The public area commits to the key.
        let PublicDetail::KeyedHash { unique, scheme } = &public.detail else {
            return Err("not keyed hash");
        };
        assert_eq!(*scheme, Some((alg::HMAC, alg::SHA256)));
        assert_eq!(
            unique.as_slice(),
            Sha256::new()
                .chain_update(&seed)
                .chain_update(key)
                .finalize()
                .as_slice()
        );
        Ok(key)
    }

    fn fixed_randomness() -> ActivationRandomness {
        ActivationRandomness {
            obfuscation: [1; 32],
            inner_key: [2; 16],
            credential_seed: [3; 32],
            duplication_seed: [4; 32],
        }
    }

    #[test]
    fn a_blob_carries_the_key_to_the_tpm_that_holds_the_seeds() {
        let ek = sample_ek();
        let srk = sample_ek(); // any RSA storage key will do for the software side
        let key = [7u8; 32];
        let rnd = fixed_randomness();
        let blob = activation_blob(&ek, &srk, &key, &rnd).unwrap();
        let parts = ActivationParts::parse(&blob).unwrap();
        assert_eq!(parts.encrypted_secret.len(), 256);
        assert_eq!(parts.encrypted_seed.len(), 256);
        assert!(parts.uri_data.is_empty());
        assert_eq!(blob[blob.len() - 2..], [0, 0]);
        let srk_name = srk.name().unwrap();
        assert_eq!(software_activate(&parts, &srk_name, &rnd), Ok(key));
        // Bound to the SRK: another object name fails the credential's integrity check.
        let mut other = srk_name.clone();
        other[5] ^= 1;
        assert_eq!(
            software_activate(&parts, &other, &rnd),
            Err("credential integrity")
        );
        // Tampering with the duplicate is detected.
        let mut p = parts.clone();
        let last = p.private.len() - 1;
        p.private[last] ^= 1;
        assert_eq!(
            software_activate(&p, &srk_name, &rnd),
            Err("outer integrity")
        );
    }

    #[test]
    fn the_symmetric_parts_have_known_answers() {
        // Everything but the RSA-OAEP fields is deterministic given the randomness; the
        // expected values come from an independent Python implementation of §6.5.4.
        let srk = sample_ek();
        let rnd = fixed_randomness();
        let id = make_credential(
            128,
            &srk.name().unwrap(),
            &rnd.inner_key,
            &rnd.credential_seed,
        )
        .unwrap();
        let id_pub = id_key_public(&rnd.obfuscation, &[7; 32]);
        let dup = duplicate(
            128,
            &id_pub.name().unwrap(),
            &id_key_sensitive(&rnd.obfuscation, &[7; 32]),
            &rnd.inner_key,
            &rnd.duplication_seed,
        )
        .unwrap();
        assert_eq!(hex::encode(&id), KNOWN_ID_OBJECT);
        assert_eq!(hex::encode(&dup), KNOWN_DUPLICATE);
        assert_eq!(hex::encode(id_pub.tpmt()), KNOWN_ID_PUBLIC);
    }

    const KNOWN_ID_OBJECT: &str = "0020f722da009fc4bf65c85d805b780665241f9fe0d76b94796ab018f67d7db11facb9af081cb0c258d58884b9a7a4bb9e71ef76";
    const KNOWN_DUPLICATE: &str = "0020846c714ac9ff0327cb2910d9ef8e42e8b9c05ceefc20e61385934c847e6ae8583502b7d6b0473a2fd9085a14532d6289e616e8addf1dc4ef6750d029b783a062e25b176aa66d022fccbd5536010e48c8e39a74091e1d9731742fdbdf0fe369765ebe6a7c87eca884e04f987dcfa2815fa8a8651be761289d3765bb3ce5905ebaac84c5132f1b069f34e29994";
    const KNOWN_ID_PUBLIC: &str = "0008000b000404400020bef56b8c1cc84e11edd717528d2cd99356bd2bbf8f015209c3f84aeeaba8e8a20005000b0020ba47109d355c6ab7f19a1d0af188a42ce051ba66a3018c725dde5e3fc0159625";

    #[test]
    fn unsuitable_keys_are_refused_with_a_reason() {
        let ek = sample_ek();
        let hmac_pub = id_key_public(&[0; 32], &[0; 32]);
        let e = activation_blob(&ek, &hmac_pub, &[0; 32], &fixed_randomness()).unwrap_err();
        assert!(e.to_string().contains("storage root key"), "{e}");
    }
}
