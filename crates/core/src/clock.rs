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

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn formats_seven_fraction_digits() {
        let t = time::macros::datetime!(2026-01-02 03:04:05.123456789 UTC);
        assert_eq!(azure_timestamp(t), "2026-01-02T03:04:05.1234567Z");
    }
}
