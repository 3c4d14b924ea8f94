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

/// Format a time the way Azure does: RFC 3339 with 7 fractional digits and `Z`. Written digit
/// by digit (a registration stamps several times; `format!` with padding cost about ten times
/// as much). Years outside 0..=9999 are clamped into it (`time` allows ±9999 only with its
/// `large-dates` feature, and a stamp must stay 28 characters to sort as text).
pub fn azure_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let mut b = *b"0000-00-00T00:00:00.0000000Z";
    fn put(b: &mut [u8], mut v: u32) {
        for d in b.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(&mut b[0..4], t.year().clamp(0, 9999) as u32);
    put(&mut b[5..7], u32::from(u8::from(t.month())));
    put(&mut b[8..10], u32::from(t.day()));
    put(&mut b[11..13], u32::from(t.hour()));
    put(&mut b[14..16], u32::from(t.minute()));
    put(&mut b[17..19], u32::from(t.second()));
    put(&mut b[20..27], t.nanosecond() / 100);
    String::from_utf8(b.to_vec()).expect("ASCII digits")
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
        let t = time::macros::datetime!(2026-01-02 03:04:05 +02:00);
        assert_eq!(azure_timestamp(t), "2026-01-02T01:04:05.0000000Z");
    }

    proptest::proptest! {
        #[test]
        fn formats_as_the_padded_format_did(secs in 0i64..253_402_300_799, nanos in 0u32..1_000_000_000) {
            let t = OffsetDateTime::from_unix_timestamp(secs).unwrap()
                + time::Duration::nanoseconds(i64::from(nanos));
            let old = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.nanosecond() / 100
            );
            proptest::prop_assert_eq!(azure_timestamp(t), old);
        }
    }
}
