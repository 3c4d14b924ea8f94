//! Typed identifiers, parsed once at the edge.
//!
//! Each type has one constructor (`parse`), `as_str()` and `Display`. Registration ids and group
//! ids are case-insensitive in DPS: [`RegistrationId::key`] gives the lowercase form used as a
//! storage key while the original spelling is kept for display.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} '{value}': {reason}")]
pub struct IdError {
    /// Which kind of identifier.
    pub kind: &'static str,
    /// The offending value (truncated to 140 characters).
    pub value: String,
    /// What rule it broke.
    pub reason: &'static str,
}

fn err(kind: &'static str, value: &str, reason: &'static str) -> IdError {
    IdError {
        kind,
        value: value.chars().take(140).collect(),
        reason,
    }
}

fn check_dps_id(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(err(kind, s, "must not be empty"));
    }
    if s.len() > max {
        return Err(err(kind, s, "is too long"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(err(kind, s, "may contain only letters, digits and - . _ :"));
    }
    let first = s.chars().next().expect("non-empty");
    let last = s.chars().last().expect("non-empty");
    if !first.is_ascii_alphanumeric() {
        return Err(err(kind, s, "must start with a letter or digit"));
    }
    if !(last.is_ascii_alphanumeric() || last == '-') {
        return Err(err(kind, s, "must end with a letter, digit or -"));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident, $kind:expr, $check:expr) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parse and validate.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                let check: fn(&str) -> Result<(), IdError> = $check;
                check(s)?;
                Ok(Self(s.to_string()))
            }
            /// The identifier as given.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// The case-folded storage key.
            pub fn key(&self) -> String {
                self.0.to_ascii_lowercase()
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", $kind, self.0)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

string_id!(
    /// A device's registration id: at most 128 characters of letters, digits and `-._:`.
    RegistrationId, "registration id", |s| check_dps_id("registration id", s, 128)
);
string_id!(
    /// An enrollment group id (same rules as a registration id).
    EnrollmentGroupId, "enrollment group id", |s| check_dps_id("enrollment group id", s, 128)
);
string_id!(
    /// The device id on the hub: at most 128 characters, no control characters or `/`.
    DeviceId, "device id", |s| {
        if s.is_empty() || s.len() > 128 {
            return Err(err("device id", s, "must be 1 to 128 characters"));
        }
        if s.chars().any(|c| c.is_control() || c == '/' || !c.is_ascii()) {
            return Err(err("device id", s, "may contain only printable ASCII without /"));
        }
        Ok(())
    }
);
string_id!(
    /// An ID scope (`0ne` followed by hex digits in Azure; treated as opaque, matched
    /// case-insensitively).
    IdScope, "ID scope", |s| {
        if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(err("ID scope", s, "must be 1 to 64 letters or digits"));
        }
        Ok(())
    }
);
string_id!(
    /// An operation id: only `[0-9A-Za-z.-]`, because SDKs put it raw into topics and URLs.
    OperationId, "operation id", |s| {
        if s.is_empty() || s.len() > 128 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
            return Err(err("operation id", s, "may contain only letters, digits, . and -"));
        }
        Ok(())
    }
);
string_id!(
    /// A linked hub's host name (what devices are told as `assignedHub`).
    HubHost, "hub host name", |s| {
        if s.is_empty() || s.len() > 253 || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_')) {
            return Err(err("hub host name", s, "must be a host name"));
        }
        Ok(())
    }
);
string_id!(
    /// A provisioning instance's name.
    InstanceName, "instance name", |s| check_dps_id("instance name", s, 64)
);

impl OperationId {
    /// A fresh operation id in Azure's shape `{n}.{16 hex}.{uuid}`.
    pub fn generate() -> Self {
        let r: u64 = rand::random();
        Self(format!("4.{:016x}.{}", r, uuid::Uuid::new_v4()))
    }
}

impl HubHost {
    /// Hub host names compare case-insensitively.
    pub fn eq_ignore_case(&self, other: &HubHost) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl IdScope {
    /// Generate an Azure-shaped scope: `0ne` and 8 hex digits.
    pub fn generate() -> Self {
        let r: u32 = rand::random();
        Self(format!("0ne{:08X}", r))
    }
}

/// Feed `s` to a hasher ASCII-lowercased, without allocating: in chunks, one `write` each.
/// Equal after ASCII lowercasing means equal input to the hasher (the chunks fall alike), so
/// keys compared ASCII-case-insensitively hash alike.
pub fn hash_ascii_lowercase(h: &mut impl std::hash::Hasher, s: &str) {
    let mut buf = [0u8; 64];
    for chunk in s.as_bytes().chunks(buf.len()) {
        let b = &mut buf[..chunk.len()];
        b.copy_from_slice(chunk);
        b.make_ascii_lowercase();
        h.write(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registration_ids_follow_azure_rules() {
        assert!(RegistrationId::parse("sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6").is_ok());
        assert!(RegistrationId::parse("dev:1.a_b").is_ok());
        assert!(RegistrationId::parse("").is_err());
        assert!(RegistrationId::parse("-dev").is_err());
        assert!(RegistrationId::parse("dev.").is_err());
        assert!(RegistrationId::parse("dev-").is_ok());
        assert!(RegistrationId::parse("dev/1").is_err());
        assert!(RegistrationId::parse(&"a".repeat(129)).is_err());
        assert_eq!(RegistrationId::parse("Dev1").unwrap().key(), "dev1");
    }

    #[test]
    fn generated_operation_ids_are_valid() {
        let op = OperationId::generate();
        assert!(OperationId::parse(op.as_str()).is_ok());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = RegistrationId::parse(&s);
            let _ = DeviceId::parse(&s);
            let _ = IdScope::parse(&s);
            let _ = OperationId::parse(&s);
        }
        #[test]
        fn valid_ids_round_trip(s in "[a-z0-9][a-z0-9._:-]{0,100}[a-z0-9]") {
            let id = RegistrationId::parse(&s).unwrap();
            prop_assert_eq!(id.as_str(), s.as_str());
        }
    }
}
