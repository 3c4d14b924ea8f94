//! Randomness, injected like [`crate::clock::Clock`]: the use cases draw ETags, generated keys,
//! operation ids and tracking ids from a [`Random`] they are given, so a test can give them a
//! seeded source and get the same ids on every run.

use crate::ids::{IdScope, OperationId};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::{RngCore, SeedableRng};
use std::sync::Mutex;

/// A source of random bytes.
pub trait Random: Send + Sync {
    /// Fill `out` with random bytes.
    fn fill(&self, out: &mut [u8]);
}

/// The operating system's generator (through `rand`'s thread-local CSPRNG).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRandom;

impl Random for SystemRandom {
    fn fill(&self, out: &mut [u8]) {
        rand::rng().fill_bytes(out);
    }
}

/// A seeded generator for tests: the same seed gives the same sequence.
#[derive(Debug)]
pub struct SeededRandom(Mutex<rand::rngs::StdRng>);

impl SeededRandom {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SeededRandom(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)))
    }
}

impl Random for SeededRandom {
    fn fill(&self, out: &mut [u8]) {
        // A poisoned lock only means another test thread panicked mid-draw; the state is still
        // a valid generator.
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.fill_bytes(out);
    }
}

fn uuid(r: &dyn Random) -> uuid::Uuid {
    let mut b = [0u8; 16];
    r.fill(&mut b);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// A fresh opaque ETag.
pub fn etag(r: &dyn Random) -> String {
    uuid(r).to_string()
}

/// A fresh tracking id (error bodies, `x-ms-request-id`).
pub fn tracking_id(r: &dyn Random) -> String {
    uuid(r).to_string()
}

/// A fresh 64-byte symmetric key, base64 (what Azure generates).
pub fn symmetric_key(r: &dyn Random) -> String {
    let mut b = [0u8; 64];
    r.fill(&mut b);
    B64.encode(b)
}

/// A fresh operation id in Azure's shape `{n}.{16 hex}.{uuid}`.
pub fn operation_id(r: &dyn Random) -> OperationId {
    let mut n = [0u8; 8];
    r.fill(&mut n);
    OperationId::parse(&format!("4.{:016x}.{}", u64::from_le_bytes(n), uuid(r)))
        .expect("the generated shape is a valid operation id")
}

/// A fresh ID scope in Azure's shape: `0ne` and 8 hex digits.
pub fn id_scope(r: &dyn Random) -> IdScope {
    let mut n = [0u8; 4];
    r.fill(&mut n);
    IdScope::parse(&format!("0ne{:08X}", u32::from_le_bytes(n)))
        .expect("the generated shape is a valid ID scope")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_ids() {
        let (a, b) = (SeededRandom::new(7), SeededRandom::new(7));
        assert_eq!(etag(&a), etag(&b));
        assert_eq!(operation_id(&a), operation_id(&b));
        assert_eq!(symmetric_key(&a), symmetric_key(&b));
        assert_eq!(id_scope(&a), id_scope(&b));
        assert_ne!(etag(&a), etag(&SeededRandom::new(8)));
    }

    #[test]
    fn generated_values_have_azure_shapes() {
        let r = SystemRandom;
        assert!(crate::sas::valid_key(&symmetric_key(&r)));
        assert!(operation_id(&r).as_str().starts_with("4."));
        assert_eq!(etag(&r).len(), 36);
        assert!(id_scope(&r).as_str().starts_with("0ne"));
        assert_eq!(id_scope(&r).as_str().len(), 11);
    }
}
