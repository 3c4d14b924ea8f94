//! SASL mechanisms (protocol digest §5.1).
//!
//! * `PLAIN`: symmetric keys: authcid `{idScope}/registrations/{registrationId}`, password the
//!   device SAS token; checked with `DeviceService::authorize_connect` before the outcome.
//! * `EXTERNAL` and `ANONYMOUS`: X.509: the TLS client certificate is the credential (checked
//!   against the enrollments when the device registers, as over HTTPS and MQTT).
//!
//! **Extension point for TPM.** The TPM attestation uses a custom mechanism `TPM` with a
//! challenge (`sasl-challenge`) / `sasl-response` exchange carrying the endorsement and storage
//! root keys and the activation blob (§6.5.6). To add it: a `Mechanism::Tpm` variant here,
//! `"TPM"` in [`advertised`], and its exchange in `conn.rs` (`Driver::sasl`, the `Tpm` arm),
//! calling the engine's TPM use case. Java and C# pick their mechanism from the advertised
//! list, so `TPM` is advertised only once it is implemented.

/// A mechanism this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `PLAIN` with a SAS token.
    Plain,
    /// `EXTERNAL`: the TLS client certificate.
    External,
    /// `ANONYMOUS`: the TLS client certificate (Node's rhea may choose it).
    Anonymous,
}

impl Mechanism {
    /// The mechanism a `sasl-init` names (case-sensitive, as SASL names are).
    pub fn parse(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "EXTERNAL" => Some(Mechanism::External),
            "ANONYMOUS" => Some(Mechanism::Anonymous),
            _ => None,
        }
    }
}

/// The mechanisms announced in `sasl-mechanisms`, in order of preference.
pub fn advertised() -> &'static [&'static str] {
    &["PLAIN", "EXTERNAL", "ANONYMOUS"]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_advertised_mechanism_is_implemented() {
        for m in advertised() {
            assert!(Mechanism::parse(m).is_some(), "{m}");
        }
        assert_eq!(Mechanism::parse("plain"), None);
        assert_eq!(Mechanism::parse("TPM"), None);
        assert_eq!(Mechanism::parse("SCRAM-SHA-256"), None);
    }
}
