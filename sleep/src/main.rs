//! `kip-sleep`: the only process of each container in kip's fallback DaemonSet. Sleeps for a
//! Go-syntax duration and exits 0 at once on SIGTERM/SIGINT (also as PID 1, where the kernel
//! would otherwise ignore them and every pod would wait out its grace period). `--copy-to`
//! copies the executable itself, so the initContainer needs no shell and the image no base.

mod duration;

use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: kip-sleep DURATION         sleep for DURATION (Go syntax: 720h, 1h30m, 1.5h, 300ms);
                                  SIGTERM or SIGINT end it at once with status 0
       kip-sleep --copy-to PATH   copy this executable to PATH with mode 0755
";

fn main() -> ExitCode {
    // Raw bytes: an argument that is not UTF-8 is a usage error, never a panic.
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    match args.as_slice() {
        [b"--copy-to", path] => {
            let path = Path::new(std::ffi::OsStr::from_bytes(path));
            match copy_self(path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kip-sleep: cannot copy itself to {}: {e}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        [b"-h" | b"--help"] => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        [duration] => match parse_go_duration(duration) {
            Ok(d) => {
                sleep_until_signal(d);
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(&e),
        },
        _ => usage_error("wrong arguments"),
    }
}

fn usage_error(reason: &str) -> ExitCode {
    let _ = write!(std::io::stderr(), "kip-sleep: {reason}\n{USAGE}");
    ExitCode::from(2)
}

/// Go's `time.ParseDuration` syntax. A negative duration sleeps not at all, as Go's `time.Sleep`.
fn parse_go_duration(s: &[u8]) -> Result<Duration, String> {
    let nanos = duration::parse(s).map_err(|e| {
        format!(
            "`{}` is {} (Go syntax: 720h, 1h30m, 1.5h, 300ms)",
            String::from_utf8_lossy(s).escape_debug(),
            e.as_str()
        )
    })?;
    Ok(Duration::from_nanos(nanos.max(0).unsigned_abs()))
}

/// Blocks SIGTERM and SIGINT and waits for one of them or the end of `d`, whichever comes first.
#[allow(unsafe_code)] // sigtimedwait has no safe wrapper in a well-kept crate; this is the only unsafe code
fn sleep_until_signal(d: Duration) {
    let deadline = Instant::now().checked_add(d);
    // SAFETY: plain libc calls on a sigset_t we own; the process is single-threaded.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            let remaining = match deadline {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(i64::MAX as u64 / 2),
            };
            if remaining.is_zero() {
                return;
            }
            let ts = libc::timespec {
                tv_sec: remaining.as_secs() as libc::time_t,
                tv_nsec: remaining.subsec_nanos() as libc::c_long,
            };
            let sig = libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
            if sig == libc::SIGTERM || sig == libc::SIGINT {
                return;
            }
            // EAGAIN: the time is up; EINTR (e.g. after SIGSTOP/SIGCONT): wait for the rest.
            if sig == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                return;
            }
        }
    }
}

fn copy_self(to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let me = std::env::current_exe()?;
    std::fs::copy(me, to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_go_durations_and_negative_ones_not_at_all() {
        assert_eq!(parse_go_duration(b"720h"), Ok(Duration::from_secs(720 * 3600)));
        assert_eq!(parse_go_duration("1μs".as_bytes()), Ok(Duration::from_micros(1)));
        assert_eq!(parse_go_duration(b"-5s"), Ok(Duration::ZERO), "negative sleeps not at all, as in Go");
    }

    #[test]
    fn errors_quote_the_input_and_say_why() {
        assert_eq!(
            parse_go_duration(b"1d").unwrap_err(),
            "`1d` is an unknown unit (use ns, us, µs, ms, s, m or h) (Go syntax: 720h, 1h30m, 1.5h, 300ms)"
        );
        assert!(parse_go_duration(b"\xff\n").unwrap_err().starts_with("`\u{fffd}\\n` is not a duration"));
    }
}
