//! X.509 chain verification for attestation. (Filled in by the X.509 attestation work.)
