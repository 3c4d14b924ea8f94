//! SASL mechanisms (protocol digest §5.1, §6.5.6).
//!
//! * `PLAIN`: symmetric keys: authcid `{idScope}/registrations/{registrationId}`, password the
//!   device SAS token; checked with `DeviceService::authorize_connect` before the outcome.
//! * `TPM`: TPM 2.0 attestation, the challenge/response exchange of Azure's SDKs ([`tpm`]):
//!   the device sends its endorsement key (EK) in `sasl-init` and its storage root key (SRK) in
//!   the first `sasl-response`; dps answers the activation blob
//!   (`DeviceService::tpm_challenge`) in segments of [`tpm::SEGMENT_SIZE`] bytes; the device's
//!   answer to the last segment is a SAS token signed inside the TPM with the key the blob
//!   carried, checked with `DeviceService::authorize_connect` before the outcome (`auth` when
//!   refused). The connection's register requests then carry that token as their credential.
//! * `EXTERNAL` and `ANONYMOUS`: X.509: the TLS client certificate is the credential (checked
//!   against the enrollments when the device registers, as over HTTPS and MQTT).
//!
//! Java and C# pick their mechanism from the advertised list ([`advertised`]), so every
//! mechanism listed there is implemented.

pub mod tpm;

/// A mechanism this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `PLAIN` with a SAS token.
    Plain,
    /// `TPM`: the TPM 2.0 challenge (§6.5.6).
    Tpm,
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
            "TPM" => Some(Mechanism::Tpm),
            "EXTERNAL" => Some(Mechanism::External),
            "ANONYMOUS" => Some(Mechanism::Anonymous),
            _ => None,
        }
    }
}

/// The mechanisms announced in `sasl-mechanisms`, in order of preference.
pub fn advertised() -> &'static [&'static str] {
    &["PLAIN", "TPM", "EXTERNAL", "ANONYMOUS"]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm_is_advertised_and_implemented() {
        assert!(advertised().contains(&"TPM"));
        assert_eq!(Mechanism::parse("TPM"), Some(Mechanism::Tpm));
        // PLAIN stays first (rhea and the C SDK send their mechanism regardless of order).
        assert_eq!(advertised()[0], "PLAIN");
    }

    #[test]
    fn every_advertised_mechanism_is_implemented() {
        for m in advertised() {
            assert!(Mechanism::parse(m).is_some(), "{m}");
        }
        assert_eq!(Mechanism::parse("plain"), None);
        assert_eq!(Mechanism::parse("tpm"), None);
        assert_eq!(Mechanism::parse("SCRAM-SHA-256"), None);
    }
}
