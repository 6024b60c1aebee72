//! RFC 3339 timestamps in UTC with nanoseconds, without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub const TIMESTAMP_LEN: usize = 30;

/// Nanoseconds since the Unix epoch (0 for times before it).
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    unix_nanos(SystemTime::now())
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Formats `nanos` (since the epoch, UTC) as `2016-10-06T00:17:09.669794202Z`:
/// always nine fractional digits, so lines sort as text.
pub fn format_rfc3339_nanos(nanos: i64, out: &mut [u8; TIMESTAMP_LEN]) {
    let secs = nanos.div_euclid(1_000_000_000);
    let frac = nanos.rem_euclid(1_000_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    let y = y.clamp(0, 9999) as u32;
    fn put(out: &mut [u8], mut v: u32) {
        for b in out.iter_mut().rev() {
            *b = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(&mut out[0..4], y);
    out[4] = b'-';
    put(&mut out[5..7], m);
    out[7] = b'-';
    put(&mut out[8..10], d);
    out[10] = b'T';
    put(&mut out[11..13], sod / 3600);
    out[13] = b':';
    put(&mut out[14..16], sod / 60 % 60);
    out[16] = b':';
    put(&mut out[17..19], sod % 60);
    out[19] = b'.';
    put(&mut out[20..29], frac);
    out[29] = b'Z';
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(n: i64) -> String {
        let mut b = [0u8; TIMESTAMP_LEN];
        format_rfc3339_nanos(n, &mut b);
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(fmt(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            fmt(1_475_713_029_669_794_202),
            "2016-10-06T00:17:09.669794202Z"
        );
        // Leap day, end of a century leap year.
        assert_eq!(
            fmt(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            fmt(4_102_444_799_999_999_999),
            "2099-12-31T23:59:59.999999999Z"
        );
    }

    #[test]
    fn civil_from_days_round_trips_a_range() {
        // Walk day by day across several centuries, checking monotone dates.
        let mut prev = civil_from_days(-800_000);
        for days in -799_999..800_000 {
            let cur = civil_from_days(days);
            assert!(cur > prev, "{days}: {cur:?} after {prev:?}");
            prev = cur;
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_000), (2022, 1, 8));
    }
}
