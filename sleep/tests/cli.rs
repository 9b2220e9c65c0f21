//! kip-sleep as a process: usage errors, sleeping, SIGTERM/SIGINT ending it at once, --copy-to.

#![allow(clippy::unwrap_used)] // a test: an unwrap that fails is a failed test

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kip-sleep");

#[test]
fn wrong_usage_prints_usage_and_exits_2() {
    for args in [vec![], vec!["1h", "2h"], vec!["forever"], vec!["--copy-to"], vec!["--bogus", "x"]] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("usage: kip-sleep DURATION"), "{args:?}: {err}");
    }
    let out = Command::new(BIN).arg("forever").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("kip-sleep: `forever` is not a duration"));
}

#[test]
fn any_go_duration_is_accepted_and_anything_else_is_a_usage_error_never_a_panic() {
    // U+00B5 and U+03BC: the parser used before panicked on both (exit 101).
    for ok in ["1µs", "1μs", "1ns", "+1ms", "-5s", "0", ".001s", "0h0m0.01s", "-1h2m3.5s"] {
        assert_eq!(Command::new(BIN).arg(ok).status().unwrap().code(), Some(0), "{ok}");
    }
    use std::os::unix::ffi::OsStrExt as _;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"1\xb5s");
    for bad in [std::ffi::OsStr::new("1d"), std::ffi::OsStr::new("3000000h"), std::ffi::OsStr::new("µs"), not_utf8] {
        let out = Command::new(BIN).arg(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage: kip-sleep DURATION"), "{bad:?}");
    }
}

#[test]
fn sleeps_for_the_duration() {
    let started = Instant::now();
    let status = Command::new(BIN).arg("300ms").status().unwrap();
    let elapsed = started.elapsed();
    assert!(status.success());
    // The lower bound is the claim; the upper one only catches "never woke up" (no timing test).
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(60), "{elapsed:?}");
}

/// Waits until the child handles SIGTERM and SIGINT (so a signal is received, not fatal): the
/// kernel lists caught signals in `SigCgt` of /proc/PID/status.
fn wait_until_waiting_for_signals(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let wanted = (1u64 << (libc::SIGTERM - 1)) | (1u64 << (libc::SIGINT - 1));
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        if caught & wanted == wanted {
            return;
        }
        assert!(Instant::now() < deadline, "kip-sleep never caught SIGTERM/SIGINT (SigCgt {caught:x})");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ends_at_once_on(signal: i32) {
    let mut child = Command::new(BIN).arg("720h").stdout(Stdio::null()).spawn().unwrap();
    wait_until_waiting_for_signals(child.id());
    let sent = Instant::now();
    // SAFETY: signalling our own child.
    #[allow(unsafe_code)]
    let sent_ok = unsafe { libc::kill(child.id() as i32, signal) } == 0;
    assert!(sent_ok);
    let status = child.wait().unwrap();
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "signal {signal}: {status:?}");
    // A 720h sleep that ended: the signal did it. The bound is loose on purpose (a busy CI
    // machine); how fast it exits is measured by the benchmark, not asserted here.
    assert!(took < Duration::from_secs(30), "signal {signal} took {took:?}");
}

#[test]
fn sigterm_ends_it_at_once_with_status_0() {
    ends_at_once_on(libc::SIGTERM);
}

#[test]
fn sigint_ends_it_at_once_with_status_0() {
    ends_at_once_on(libc::SIGINT);
}

#[test]
fn copy_to_copies_the_executable_with_mode_0755() {
    // No tempfile crate here: it would bring std into kip-sleep's own dependencies (see Cargo.toml).
    let dir = std::env::temp_dir().join(format!("kip-sleep-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("sleep");
    let status = Command::new(BIN).args(["--copy-to", target.to_str().unwrap()]).status().unwrap();
    assert!(status.success());
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(BIN).unwrap());
    assert!(Command::new(&target).arg("10ms").status().unwrap().success(), "the copy runs");
    let out = Command::new(BIN).args(["--copy-to", "/nonexistent/dir/sleep"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot copy itself to /nonexistent/dir/sleep"));
    std::fs::remove_dir_all(&dir).unwrap();
}
