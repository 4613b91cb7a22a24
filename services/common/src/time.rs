//! Timestamps: RFC 3339 UTC with milliseconds (`2026-11-26T10:00:00.123Z`), as CONTRACT requires.

use jiff::Timestamp;

/// The current time as bulwark writes it.
pub fn now() -> String {
    format(Timestamp::now())
}

/// Formats `ts` as RFC 3339 UTC with exactly three fractional digits.
pub fn format(ts: Timestamp) -> String {
    format!("{ts:.3}")
}

/// Milliseconds since the Unix epoch, for deadlines stored in records.
pub fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

/// Formats milliseconds since the Unix epoch like [`now`].
pub fn format_ms(ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(format)
        .unwrap_or_else(|_| ms.to_string())
}

/// Parses an RFC 3339 timestamp into milliseconds since the epoch.
pub fn parse_ms(text: &str) -> Option<i64> {
    text.parse::<Timestamp>().ok().map(|ts| ts.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_millis_and_z() {
        let ts: Timestamp = "2026-11-26T10:00:00.123456Z".parse().expect("valid");
        assert_eq!(format(ts), "2026-11-26T10:00:00.123Z");
        let ts: Timestamp = "2026-11-26T10:00:00Z".parse().expect("valid");
        assert_eq!(format(ts), "2026-11-26T10:00:00.000Z");
        assert_eq!(
            parse_ms("2026-11-26T10:00:00.123Z"),
            Some(ts.as_millisecond() + 123)
        );
        assert_eq!(format_ms(ts.as_millisecond()), "2026-11-26T10:00:00.000Z");
        assert!(now().ends_with('Z'));
    }
}
