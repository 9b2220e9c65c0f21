//! Durations as operators write them in flags and ConfigMaps: `90s`, `5m`, `1h30m`.

use std::time::Duration;

/// Parses a positive duration; zero is refused because every interval here must move time forward.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like 90s, 5m or 1h30m: {e}"))?;
    if d.is_zero() {
        return Err(format!("`{s}`: the duration must be greater than zero"));
    }
    Ok(d)
}

/// A parser for a duration between `min` and `max` that names `var` when it refuses one: an
/// unbounded interval either overflows where it meets an instant or makes every node busy-loop.
pub fn bounded(
    var: &'static str,
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| parse_within(s, min, max).map_err(|e| format!("{var}: {e}"))
}

/// A duration between `min` and `max`.
pub fn parse_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!(
            "`{s}` is out of range: between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// The bounds of the intervals and time limits every agent works with, wherever they are set
/// (the agent's flags, the coordinator's ConfigMap).
pub const CHECK_INTERVAL: (Duration, Duration) = (SECOND, DAY);
pub const REFRESH_INTERVAL: (Duration, Duration) = (SECOND, Duration::from_secs(30 * 86_400));
pub const PULL_TIMEOUT: (Duration, Duration) = (SECOND, DAY);
/// CACHING_INTERVAL_HOURS: at most 30 days, as the refresh interval.
pub const MAX_CACHING_INTERVAL_HOURS: u32 = 720;

pub const SECOND: Duration = Duration::from_secs(1);
pub const MINUTE: Duration = Duration::from_secs(60);
pub const HOUR: Duration = Duration::from_secs(3600);
pub const DAY: Duration = Duration::from_secs(86_400);

/// `instant + d`, or `instant + 100 years` where that would overflow: a deadline that far is
/// "never", and `Instant + Duration` panics on overflow.
pub fn after(instant: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    instant.checked_add(d).or_else(|| instant.checked_add(DAY * 36_500)).unwrap_or(instant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_durations_name_the_variable() {
        let check = bounded("KIP_CHECK_INTERVAL", SECOND, DAY);
        assert_eq!(check("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(check("1s"), Ok(SECOND));
        assert_eq!(check("1d"), Ok(DAY));
        assert_eq!(check("1ms").unwrap_err(), "KIP_CHECK_INTERVAL: `1ms` is out of range: between 1s and 1day");
        for huge in ["300000000000y", "2d", "99999999999999999999s"] {
            assert!(check(huge).unwrap_err().starts_with("KIP_CHECK_INTERVAL: "), "{huge}");
        }
        assert!(check("soon").unwrap_err().starts_with("KIP_CHECK_INTERVAL: `soon` is not a duration"));
    }

    #[test]
    fn an_instant_far_in_the_future_never_overflows() {
        let now = tokio::time::Instant::now();
        assert_eq!(after(now, SECOND), now + SECOND);
        assert!(after(now, Duration::MAX) > now + DAY * 365, "saturates far ahead instead of panicking");
    }

    #[test]
    fn durations_in_go_style() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("10").unwrap_err().contains("`10` is not a duration"));
        assert!(parse_duration("0s").unwrap_err().contains("greater than zero"));
        assert!(parse_duration("soon").is_err());
    }
}
