//! kip-sleep's decisions, apart from its system calls (`main.rs`): the command line, Go
//! durations and every message. `core` only, so the binary links no C library.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod duration;

use core::fmt::{self, Write};

pub const USAGE: &str = "usage: kip-sleep DURATION         sleep for DURATION (Go syntax: 720h, 1h30m, 1.5h, 300ms);
                                  SIGTERM or SIGINT end it at once with status 0
       kip-sleep --copy-to PATH   copy this executable to PATH with mode 0755
";

/// What the command line asks for. Arguments are bytes: one that is not UTF-8 is a usage error,
/// never a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Sleep this many nanoseconds (a negative Go duration sleeps not at all, as `time.Sleep`).
    Sleep(u64),
    /// Copy the executable to the second argument.
    CopyTo(&'a [u8]),
    Help,
    /// Exit 2 after saying why and how.
    Usage(Problem<'a>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem<'a> {
    WrongArguments,
    NotADuration(&'a [u8], duration::DurationError),
}

/// Pure: the command for the arguments after the program name.
pub fn parse_args<'a>(args: &[&'a [u8]]) -> Command<'a> {
    match args {
        [b"--copy-to", path] => Command::CopyTo(path),
        [b"-h" | b"--help"] => Command::Help,
        [b"--copy-to"] => Command::Usage(Problem::WrongArguments),
        [arg] => match duration::parse(arg) {
            Ok(nanos) => Command::Sleep(nanos.max(0).unsigned_abs()),
            Err(e) => Command::Usage(Problem::NotADuration(arg, e)),
        },
        _ => Command::Usage(Problem::WrongArguments),
    }
}

/// `kip-sleep: <why>` and the usage.
pub fn write_usage_error(w: &mut impl Write, problem: &Problem<'_>) -> fmt::Result {
    w.write_str("kip-sleep: ")?;
    match problem {
        Problem::WrongArguments => w.write_str("wrong arguments")?,
        Problem::NotADuration(arg, e) => {
            w.write_char('`')?;
            write_lossy_escaped(w, arg)?;
            write!(w, "` is {} (Go syntax: 720h, 1h30m, 1.5h, 300ms)", e.as_str())?;
        }
    }
    w.write_char('\n')?;
    w.write_str(USAGE)
}

/// `kip-sleep: cannot copy itself to <path>: <why>`.
pub fn write_copy_error(w: &mut impl Write, path: &[u8], errno: i32) -> fmt::Result {
    w.write_str("kip-sleep: cannot copy itself to ")?;
    write_lossy_escaped(w, path)?;
    match errno_text(errno) {
        Some(text) => writeln!(w, ": {text} (os error {errno})"),
        None => writeln!(w, ": os error {errno}"),
    }
}

/// Bytes as text: invalid UTF-8 as U+FFFD, control characters escaped (a message stays one line).
fn write_lossy_escaped(w: &mut impl Write, bytes: &[u8]) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            write!(w, "{}", c.escape_debug())?;
        }
        if !chunk.invalid().is_empty() {
            w.write_char(char::REPLACEMENT_CHARACTER)?;
        }
    }
    Ok(())
}

/// What the errors `--copy-to` meets mean (without libc there is no `strerror`).
pub fn errno_text(errno: i32) -> Option<&'static str> {
    Some(match errno {
        1 => "Operation not permitted",
        2 => "No such file or directory",
        5 => "Input/output error",
        13 => "Permission denied",
        17 => "File exists",
        20 => "Not a directory",
        21 => "Is a directory",
        26 => "Text file busy",
        28 => "No space left on device",
        30 => "Read-only file system",
        36 => "File name too long",
        122 => "Disk quota exceeded",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_error(args: &[&[u8]]) -> String {
        let Command::Usage(p) = parse_args(args) else { panic!("{args:?} is not a usage error") };
        let mut s = String::new();
        write_usage_error(&mut s, &p).unwrap();
        s
    }

    #[test]
    fn sleeps_go_durations_and_negative_ones_not_at_all() {
        assert_eq!(parse_args(&[b"720h"]), Command::Sleep(720 * 3600 * 1_000_000_000));
        assert_eq!(parse_args(&["1μs".as_bytes()]), Command::Sleep(1_000));
        assert_eq!(parse_args(&[b"-5s"]), Command::Sleep(0), "negative sleeps not at all, as in Go");
        assert_eq!(parse_args(&[b"--copy-to", b"/kip/sleep"]), Command::CopyTo(b"/kip/sleep"));
        assert_eq!(parse_args(&[b"--help"]), Command::Help);
    }

    #[test]
    fn errors_quote_the_input_say_why_and_show_the_usage() {
        assert_eq!(
            usage_error(&[b"1d"]),
            format!("kip-sleep: `1d` is an unknown unit (use ns, us, µs, ms, s, m or h) (Go syntax: 720h, 1h30m, 1.5h, 300ms)\n{USAGE}")
        );
        assert!(usage_error(&[b"\xff\n"]).starts_with("kip-sleep: `\u{fffd}\\n` is not a duration"));
        for args in [&[][..], &[&b"1h"[..], b"2h"], &[b"--copy-to"], &[b"--bogus", b"x"], &[b"a", b"b", b"c"]] {
            assert_eq!(usage_error(args), format!("kip-sleep: wrong arguments\n{USAGE}"), "{args:?}");
        }
    }

    #[test]
    fn copy_errors_name_the_path_and_the_reason() {
        let mut s = String::new();
        write_copy_error(&mut s, b"/nonexistent/dir/sleep", 2).unwrap();
        assert_eq!(
            s,
            "kip-sleep: cannot copy itself to /nonexistent/dir/sleep: No such file or directory (os error 2)\n"
        );
        s.clear();
        write_copy_error(&mut s, b"/x", 9999).unwrap();
        assert_eq!(s, "kip-sleep: cannot copy itself to /x: os error 9999\n");
    }
}
