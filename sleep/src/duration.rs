//! Go's `time.ParseDuration`, written to never panic: `[-+]?([0-9]*(\.[0-9]*)?unit)+` with
//! units `ns`, `us`, `µs` (U+00B5), `μs` (U+03BC), `ms`, `s`, `m`, `h`, or a bare `0`.
//! Uses nothing but `core`, so the sleep binary can stay free of the C library.

/// Why a string is not a Go duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurationError {
    /// Not of the form above (Go: "invalid duration").
    Invalid,
    /// A number without a unit (Go: "missing unit in duration").
    MissingUnit,
    /// A unit Go does not know, such as `d` (Go: "unknown unit").
    UnknownUnit,
    /// Outside Go's `Duration` (an `i64` of nanoseconds).
    Overflow,
}

impl DurationError {
    pub const fn as_str(self) -> &'static str {
        match self {
            DurationError::Invalid => "not a duration",
            DurationError::MissingUnit => "a number without a unit",
            DurationError::UnknownUnit => "an unknown unit (use ns, us, µs, ms, s, m or h)",
            DurationError::Overflow => "longer than 2562047h47m16.854775807s",
        }
    }
}

const NANOS_LIMIT: u64 = 1 << 63;

/// Parses `s` as Go does and returns nanoseconds (negative durations included, as in Go).
/// Bytes, not `str`: Go reads bytes, and a command-line argument need not be UTF-8.
pub fn parse(s: &[u8]) -> Result<i64, DurationError> {
    let mut rest = s;
    let negative = match rest.first() {
        Some(b'-') => {
            rest = &rest[1..];
            true
        }
        Some(b'+') => {
            rest = &rest[1..];
            false
        }
        _ => false,
    };
    if rest == b"0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(DurationError::Invalid);
    }
    // Go sums as an unsigned magnitude up to 2^63, which only a negative total may reach.
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let (part, after) = component(rest)?;
        total = total.checked_add(part).filter(|t| *t <= NANOS_LIMIT).ok_or(DurationError::Overflow)?;
        rest = after;
    }
    if negative {
        // 2^63 becomes i64::MIN; anything smaller negates in range.
        Ok(0i64.wrapping_sub_unsigned(total))
    } else {
        i64::try_from(total).map_err(|_| DurationError::Overflow)
    }
}

/// One `digits[.digits]unit` at the start of `s`: its nanoseconds and what follows it.
fn component(s: &[u8]) -> Result<(u64, &[u8]), DurationError> {
    if !s.first().is_some_and(|c| *c == b'.' || c.is_ascii_digit()) {
        return Err(DurationError::Invalid);
    }
    let (whole, int_digits, s) = leading_int(s)?;
    let (fraction, scale, frac_digits, s) = match s.split_first() {
        Some((b'.', after)) => leading_fraction(after),
        _ => (0, 1.0, 0, s),
    };
    if int_digits == 0 && frac_digits == 0 {
        return Err(DurationError::Invalid); // ".s", "-.s"
    }
    let unit_len = s.iter().position(|c| *c == b'.' || c.is_ascii_digit()).unwrap_or(s.len());
    if unit_len == 0 {
        return Err(DurationError::MissingUnit);
    }
    let (unit, rest) = s.split_at(unit_len);
    let unit = unit_nanos(unit).ok_or(DurationError::UnknownUnit)?;
    let mut nanos = whole.checked_mul(unit).filter(|n| *n <= NANOS_LIMIT).ok_or(DurationError::Overflow)?;
    if fraction > 0 {
        // As Go: float64 keeps fractions of an hour nanosecond-accurate; the product is at most
        // 3.6e12 (one hour in ns), so the conversion back cannot saturate.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let frac_nanos = (fraction as f64 * (unit as f64 / scale)) as u64;
        nanos = nanos.checked_add(frac_nanos).filter(|n| *n <= NANOS_LIMIT).ok_or(DurationError::Overflow)?;
    }
    Ok((nanos, rest))
}

/// `[0-9]*` as an integer; more than 2^63 is an overflow. Returns (value, digits, rest).
fn leading_int(s: &[u8]) -> Result<(u64, usize, &[u8]), DurationError> {
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut value: u64 = 0;
    for c in &s[..digits] {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .filter(|v| *v <= NANOS_LIMIT)
            .ok_or(DurationError::Overflow)?;
    }
    Ok((value, digits, &s[digits..]))
}

/// `[0-9]*` after the point: digits past 2^63 only lose precision, as in Go.
/// Returns (value, scale with value/scale the fraction, digits, rest).
fn leading_fraction(s: &[u8]) -> (u64, f64, usize, &[u8]) {
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let (mut value, mut scale) = (0u64, 1.0f64);
    for c in &s[..digits] {
        if value > (NANOS_LIMIT - 1) / 10 {
            break;
        }
        // At most 922337203685477580 * 10 + 9: no u64 overflow.
        let next = value * 10 + u64::from(c - b'0');
        if next > NANOS_LIMIT {
            break;
        }
        value = next;
        scale *= 10.0;
    }
    (value, scale, digits, &s[digits..])
}

/// `µs` with U+00B5 (micro sign) and with U+03BC (Greek mu), as UTF-8.
const MICRO_SIGN_S: &[u8] = "\u{b5}s".as_bytes();
const GREEK_MU_S: &[u8] = "\u{3bc}s".as_bytes();

fn unit_nanos(unit: &[u8]) -> Option<u64> {
    Some(match unit {
        b"ns" => 1,
        b"us" | MICRO_SIGN_S | GREEK_MU_S => 1_000,
        b"ms" => 1_000_000,
        b"s" => 1_000_000_000,
        b"m" => 60_000_000_000,
        b"h" => 3_600_000_000_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NS: i64 = 1;
    const US: i64 = 1_000;
    const MS: i64 = 1_000_000;
    const S: i64 = 1_000_000_000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;

    /// Go's own table of accepted durations (`parseDurationTests` in Go's `time_test.go`).
    const GO_ACCEPTS: &[(&str, i64)] = &[
        ("0", 0),
        ("5s", 5 * S),
        ("30s", 30 * S),
        ("1478s", 1478 * S),
        ("-5s", -5 * S),
        ("+5s", 5 * S),
        ("-0", 0),
        ("+0", 0),
        ("5.0s", 5 * S),
        ("5.6s", 5 * S + 600 * MS),
        ("5.s", 5 * S),
        (".5s", 500 * MS),
        ("1.0s", S),
        ("1.00s", S),
        ("1.004s", S + 4 * MS),
        ("1.0040s", S + 4 * MS),
        ("100.00100s", 100 * S + MS),
        ("10ns", 10 * NS),
        ("11us", 11 * US),
        ("12µs", 12 * US),
        ("12μs", 12 * US),
        ("13ms", 13 * MS),
        ("14s", 14 * S),
        ("15m", 15 * M),
        ("16h", 16 * H),
        ("3h30m", 3 * H + 30 * M),
        ("10.5s4m", 4 * M + 10 * S + 500 * MS),
        ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
        ("1h2m3s4ms5us6ns", H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
        ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
        ("52763797000ns", 52_763_797_000),
        ("0.3333333333333333333h", 20 * M),
        ("9007199254740993ns", (1 << 53) + 1),
        ("9223372036854775807ns", i64::MAX),
        ("9223372036854775.807us", i64::MAX),
        ("9223372036s854ms775us807ns", i64::MAX),
        ("-9223372036854775808ns", i64::MIN),
        ("-9223372036854775.808us", i64::MIN),
        ("-9223372036s854ms775us808ns", i64::MIN),
        ("-2562047h47m16.854775808s", i64::MIN),
        ("0.100000000000000000000h", 6 * M),
        ("0.830103483285477580700h", 49 * M + 48 * S + 372_539_827),
        // Beyond Go's table: what the fallback DaemonSet and users write.
        ("720h", 720 * H),
        ("1µs", US),
        ("1μs", US),
        ("1h2m3.5s", H + 2 * M + 3 * S + 500 * MS),
        ("+1.5h", 90 * M),
    ];

    /// Go's own table of rejected input (`parseDurationErrorTests`), with the error Go gives.
    const GO_REJECTS: &[(&[u8], DurationError)] = &[
        (b"", DurationError::Invalid),
        (b"3", DurationError::MissingUnit),
        (b"-", DurationError::Invalid),
        (b"s", DurationError::Invalid),
        (b".", DurationError::Invalid),
        (b"-.", DurationError::Invalid),
        (b".s", DurationError::Invalid),
        (b"+.s", DurationError::Invalid),
        (b"1d", DurationError::UnknownUnit),
        (b"\x85\x85", DurationError::Invalid),
        (b"\xffff", DurationError::Invalid),
        (b"hello \xffff world", DurationError::Invalid),
        ("\u{FFFD}".as_bytes(), DurationError::Invalid),
        ("\u{FFFD} hello \u{FFFD} world".as_bytes(), DurationError::Invalid),
        (b"9223372036854775810ns", DurationError::Overflow),
        (b"9223372036854775808ns", DurationError::Overflow),
        (b"-9223372036854775809ns", DurationError::Overflow),
        (b"9223372036854776us", DurationError::Overflow),
        (b"3000000h", DurationError::Overflow),
        (b"9223372036854775.808us", DurationError::Overflow),
        (b"9223372036854ms775us808ns", DurationError::Overflow),
        // Beyond Go's table.
        (b"1h30", DurationError::MissingUnit),
        (b"10", DurationError::MissingUnit),
        (b"forever", DurationError::Invalid),
        (b"1 h", DurationError::UnknownUnit),
        (b"--1s", DurationError::Invalid),
        (b"1..5s", DurationError::MissingUnit),
        (b"1\xb5s", DurationError::UnknownUnit),
    ];

    #[test]
    fn accepts_what_go_accepts() {
        for (input, nanos) in GO_ACCEPTS {
            assert_eq!(parse(input.as_bytes()), Ok(*nanos), "{input}");
        }
    }

    #[test]
    fn rejects_what_go_rejects_with_go_s_reason() {
        for (input, error) in GO_REJECTS {
            assert_eq!(parse(input), Err(*error), "{}", String::from_utf8_lossy(input));
        }
    }

    /// Formats nanoseconds in one of the many ways Go accepts: split over units, in any order.
    fn spelled(parts: &[(u64, usize)]) -> (String, u128) {
        const UNITS: [(&str, u128); 8] = [
            ("ns", 1),
            ("us", 1_000),
            ("µs", 1_000),
            ("μs", 1_000),
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
        ];
        let mut text = String::new();
        let mut total = 0u128;
        for (value, unit) in parts {
            let (name, nanos) = UNITS[unit % UNITS.len()];
            text.push_str(&format!("{value}{name}"));
            total += u128::from(*value) * nanos;
        }
        (text, total)
    }

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(input in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse(&input);
        }

        #[test]
        fn never_panics_on_near_misses(input in "[-+]?[0-9.]{0,25}(ns|us|µs|μs|ms|s|m|h|d|\\.|)([0-9.]{0,25}(h|m|s|ms|x|))*") {
            let _ = parse(input.as_bytes());
        }

        #[test]
        fn whole_components_sum_exactly(parts in proptest::collection::vec((0u64..10_000_000, 0usize..8), 1..6), negative in any::<bool>()) {
            let (text, total) = spelled(&parts);
            let text = if negative { format!("-{text}") } else { text };
            let got = parse(text.as_bytes());
            if total <= i64::MAX as u128 {
                let total = total as i64;
                prop_assert_eq!(got, Ok(if negative { -total } else { total }), "{}", text);
            } else {
                prop_assert_eq!(got, Err(DurationError::Overflow), "{}", text);
            }
        }
    }
}
