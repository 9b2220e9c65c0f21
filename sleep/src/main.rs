//! `kip-sleep`: the only process of each container in kip's fallback DaemonSet. Sleeps for a
//! Go-syntax duration and exits 0 at once on SIGTERM/SIGINT (also as PID 1, where the kernel
//! would ignore them without a handler and every pod would wait out its grace period).
//! `--copy-to` copies the executable itself, so the initContainer needs no shell and the image
//! no base. No C library: origin starts the program, rustix makes the system calls, and what
//! is decided is decided in the library (`lib.rs`), so this file is only the system calls.

#![no_std]
#![no_main]

use core::ffi::{c_char, c_int, CStr};
use core::fmt::{self, Write as _};

use kip_sleep::{parse_args, write_copy_error, write_usage_error, Command, USAGE};
use origin::signal::{Sigaction, SigactionFlags, Signal};
use rustix::fd::BorrowedFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::thread::ClockId;

/// Enough for every valid command line (two arguments); more is a usage error either way.
const MAX_ARGS: usize = 3;

/// origin's program start calls this with the process's arguments; its result is the exit status.
#[unsafe(no_mangle)]
#[allow(unsafe_code)] // the arguments from the kernel, as raw pointers
unsafe fn origin_main(argc: usize, argv: *mut *mut u8, _envp: *mut *mut u8) -> i32 {
    exit_on_term_and_int();
    let mut args: [&CStr; MAX_ARGS] = [c""; MAX_ARGS];
    let count = argc.saturating_sub(1).min(MAX_ARGS);
    for (i, arg) in args.iter_mut().enumerate().take(count) {
        // SAFETY: the kernel passes `argc` pointers to NUL-terminated strings that live as long
        // as the process; index 0 is the program name.
        *arg = unsafe { CStr::from_ptr((*argv.add(i + 1)).cast::<c_char>()) };
    }
    let args = &args[..count];
    let mut bytes: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
    for (b, a) in bytes.iter_mut().zip(args) {
        *b = a.to_bytes();
    }
    match parse_args(&bytes[..count]) {
        Command::Sleep(nanos) => {
            sleep(nanos);
            0
        }
        Command::CopyTo(path) => match copy_self(args[1]) {
            Ok(()) => 0,
            Err(e) => {
                let _ = write_copy_error(&mut stdio(2), path, e.raw_os_error());
                1
            }
        },
        Command::Help => {
            let _ = stdio(1).write_str(USAGE);
            0
        }
        Command::Usage(problem) => {
            let _ = write_usage_error(&mut stdio(2), &problem);
            2
        }
    }
}

/// The handler of SIGTERM and SIGINT: exit 0 now.
extern "C" fn exit_now(_signal: c_int) {
    origin::program::immediate_exit(0)
}

/// Installs [`exit_now`] for SIGTERM and SIGINT. A handled signal is delivered to PID 1 too.
#[allow(unsafe_code)] // installing a signal handler
fn exit_on_term_and_int() {
    for signal in [Signal::TERM, Signal::INT] {
        let action = Sigaction {
            sa_handler_kernel: Some(exit_now),
            sa_flags: SigactionFlags::empty(),
            sa_restorer: None,
            sa_mask: Default::default(),
        };
        // SAFETY: the handler makes one system call (exit_group), which is async-signal-safe,
        // and touches no state of the interrupted code.
        let _ = unsafe { origin::signal::sigaction(signal, Some(action)) };
    }
}

/// Sleeps `nanos` on the monotonic clock until its end (an interruption by a stop and continue
/// sleeps the rest); the signal handler ends it early.
fn sleep(nanos: u64) {
    let now = rustix::time::clock_gettime(ClockId::Monotonic);
    let secs = i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX);
    let mut deadline = rustix::time::Timespec {
        tv_sec: now.tv_sec.saturating_add(secs),
        tv_nsec: now.tv_nsec + (nanos % 1_000_000_000) as i64,
    };
    if deadline.tv_nsec >= 1_000_000_000 {
        deadline.tv_sec = deadline.tv_sec.saturating_add(1);
        deadline.tv_nsec -= 1_000_000_000;
    }
    while let Err(Errno::INTR) = rustix::thread::clock_nanosleep_absolute(ClockId::Monotonic, &deadline) {}
}

/// Copies `/proc/self/exe` to `to` with mode 0755.
fn copy_self(to: &CStr) -> Result<(), Errno> {
    let from = rustix::fs::open(c"/proc/self/exe", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mode = Mode::from_raw_mode(0o755);
    let to = rustix::fs::open(to, OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC, mode)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = rustix::io::retry_on_intr(|| rustix::io::read(&from, &mut buf))?;
        if n == 0 {
            break;
        }
        write_all(rustix::fd::AsFd::as_fd(&to), &buf[..n])?;
    }
    // The umask may have taken bits away.
    rustix::fs::fchmod(&to, mode)
}

fn write_all(fd: BorrowedFd<'_>, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        let n = rustix::io::retry_on_intr(|| rustix::io::write(fd, bytes))?;
        if n == 0 {
            return Err(Errno::IO);
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Standard output (1) or error (2) as a `fmt::Write`.
struct Stdio(BorrowedFd<'static>);

#[allow(unsafe_code)] // borrowing a standard descriptor
fn stdio(fd: i32) -> Stdio {
    // SAFETY: descriptors 1 and 2 belong to the process for its whole life and are never closed
    // here; if the parent closed them, writes fail with EBADF and the message is lost, nothing else.
    Stdio(unsafe { BorrowedFd::borrow_raw(fd) })
}

impl fmt::Write for Stdio {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_all(self.0, s.as_bytes()).map_err(|_| fmt::Error)
    }
}
