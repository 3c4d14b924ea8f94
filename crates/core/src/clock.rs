//! Time, injected so that the domain can be tested without reading the system clock.

use time::OffsetDateTime;

/// A source of the current time.
pub trait Clock: Send + Sync {
    /// Now, in UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Format a time the way Azure does: RFC 3339 with 7 fractional digits and `Z`.
pub fn azure_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 100
    )
}

/// Parses a time given by a person or a script (RFC 3339 with any number of fraction digits and
/// any offset, or a date `YYYY-MM-DD` meaning its midnight UTC) into the stored form of
/// [`azure_timestamp`], so that comparisons on stored text are comparisons of instants:
/// `10:42:13Z` must sort before `10:42:13.5070000Z`, which as text it does not.
pub fn normalize_timestamp(s: &str) -> Option<String> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(azure_timestamp(t));
    }
    let date =
        time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    Some(azure_timestamp(date.midnight().assume_utc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_timestamps_to_the_stored_form() {
        assert_eq!(
            normalize_timestamp("2026-12-03T10:42:13Z").as_deref(),
            Some("2026-12-03T10:42:13.0000000Z")
        );
        assert_eq!(
            normalize_timestamp("2026-12-03T11:42:13.25+01:00").as_deref(),
            Some("2026-12-03T10:42:13.2500000Z")
        );
        assert_eq!(
            normalize_timestamp("2026-12-03").as_deref(),
            Some("2026-12-03T00:00:00.0000000Z")
        );
        // As stored text, a whole second sorts before the same second with a fraction.
        assert!(
            normalize_timestamp("2026-12-03T10:42:13Z").unwrap()
                <= azure_timestamp(time::macros::datetime!(2026-12-03 10:42:13.507 UTC))
        );
        assert_eq!(normalize_timestamp("yesterday"), None);
        assert_eq!(normalize_timestamp("2026-13-01"), None);
    }

    #[test]
    fn formats_seven_fraction_digits() {
        let t = time::macros::datetime!(2026-01-02 03:04:05.123456789 UTC);
        assert_eq!(azure_timestamp(t), "2026-01-02T03:04:05.1234567Z");
    }
}
