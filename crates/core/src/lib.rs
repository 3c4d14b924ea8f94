//! dps-core: the domain of the dps Device Provisioning Service.
//!
//! This crate owns the typed identifiers, the Azure-compatible JSON models, SAS-token
//! verification, allocation policies, reprovisioning rules, X.509 attestation checks and the
//! error catalogue (with its one mapping to DPS wire errors). It declares the ports that the
//! outer crates implement: [`store::Store`] and [`hub::HubAdapter`].
//!
//! It performs no I/O: no sockets, no files, no clock reads except through [`clock::Clock`].
//! Storage backends, hub adapters and protocol front ends depend on it, never the reverse.

pub mod allocation;
pub mod clock;
pub mod device;
pub mod error;
pub mod fault;
pub mod hub;
pub mod ids;
pub mod instance;
pub mod issuance;
pub mod model;
pub mod random;
pub mod redact;
pub mod reprovision;
pub mod sas;
pub mod store;
pub mod tpm;
pub mod wire;
pub mod x509;

pub use error::{Error, Result};
