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

#[cfg(test)]
mod tests {
    use super::*;

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
