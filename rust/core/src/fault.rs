//! Survives a file that is cut short while a copy reads its mapping.
//!
//! Reading a page of a memory map that lies past the end of its file raises SIGBUS, which
//! kills the process. `check_intact` catches changes made before a copy starts; a truncation
//! *during* a copy is caught here instead: while a copy thread reads a source range under
//! [`guarded`], a SIGBUS at an address inside that range maps anonymous zero pages over the
//! rest of the range, marks the shard as cut short, and lets the copy run on. The caller then
//! sees the mark and fails the load with a typed error, so no process dies and no zeros pass
//! as data. Signals outside a guarded range go to the handler that was installed before.
//!
//! Only the executor's copies are guarded (on a copy thread, or on the caller's for a plan of
//! one task): zero-copy views handed to Python read the mapping directly, like any other
//! `mmap`.

use std::cell::Cell;
use std::ops::Range;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::OnceLock;

/// What the current thread is reading: the source range and the flag to raise if it vanishes.
struct Guard {
    start: Cell<usize>,
    end: Cell<usize>,
    cut_short: Cell<*const AtomicBool>,
}

thread_local! {
    // Const-initialised and without a destructor: a plain thread-local slot, safe to read
    // from a signal handler.
    static GUARD: Guard = const {
        Guard {
            start: Cell::new(0),
            end: Cell::new(0),
            cut_short: Cell::new(ptr::null()),
        }
    };
}

/// The SIGBUS disposition in place before ours, to forward signals we do not own to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Runs `read`, which reads the mapped bytes `source` and nothing else of any mapping; if the
/// file behind them is cut short meanwhile, the vanished pages read as zeros and `cut_short`
/// is set (before any zero is read).
pub(crate) fn guarded<R>(
    source: Range<usize>,
    cut_short: &AtomicBool,
    read: impl FnOnce() -> R,
) -> R {
    install();
    GUARD.with(|g| {
        g.cut_short.set(cut_short);
        g.end.set(source.end);
        g.start.set(source.start);
    });
    // The handler runs on this thread between these stores and loads: keep the compiler
    // from moving the copy's reads outside the guarded stretch.
    compiler_fence(Ordering::SeqCst);
    let result = read();
    compiler_fence(Ordering::SeqCst);
    GUARD.with(|g| {
        g.start.set(0);
        g.end.set(0);
        g.cut_short.set(ptr::null());
    });
    result
}

/// Installs the handler once per process, keeping the previous disposition to forward to.
fn install() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: a zeroed `sigaction` is a valid value; `sigaction` only reads `ours` and
        // writes `previous`. The handler has the signature SA_SIGINFO asks for.
        unsafe {
            let mut ours: libc::sigaction = std::mem::zeroed();
            ours.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut ours.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, &ours, &mut previous);
            previous
        }
    });
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO handler.
    let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let guard = GUARD.try_with(|g| (g.start.get(), g.end.get(), g.cut_short.get()));
    let Ok((start, end, cut_short)) = guard else {
        return forward(signal, info, context);
    };
    let guarding = !cut_short.is_null();
    if code <= 0 && guarding {
        // Sent, not raised by an access: another handler (Python's faulthandler) re-raising
        // a fault of ours. Returning repeats the access, whose fault then reaches us.
        return;
    }
    if !(guarding && (start..end).contains(&address)) {
        return forward(signal, info, context);
    }
    const PAGE: usize = 4096;
    let first = address / PAGE * PAGE;
    let last = end.next_multiple_of(PAGE);
    // SAFETY: `cut_short` points to the flag of the shard the guarded copy reads, alive for
    // the whole copy. The pages from `first` on lie past the file's new end (their access
    // faulted) and inside the shard's read-only mapping, which nothing writes: replacing them
    // with zero pages changes no data anyone can still read from the file.
    unsafe {
        (*cut_short).store(true, Ordering::SeqCst);
        let zeros = libc::mmap(
            first as *mut libc::c_void,
            last - first,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
        if zeros == libc::MAP_FAILED {
            forward(signal, info, context);
        }
    }
}

/// Hands a signal that is not ours to the previous disposition.
fn forward(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let handler = PREVIOUS.get().map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    let flags = PREVIOUS.get().map_or(0, |p| p.sa_flags);
    // SAFETY: a previous handler is called the way it was installed (with or without
    // SA_SIGINFO); restoring the default disposition is async-signal-safe.
    unsafe {
        let sent = (*info).si_code <= 0;
        if handler == libc::SIG_IGN && sent {
            // Ignored, as it was before us.
        } else if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // Take the default action (a fault cannot be ignored): returning repeats the
            // faulting access, which then ends the process as it would have without us; a
            // sent signal is sent again, to be delivered once this handler returns.
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &default, ptr::null_mut());
            if sent {
                libc::raise(signal);
            }
        } else if flags & libc::SA_SIGINFO != 0 {
            let previous: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            previous(signal, info, context);
        } else {
            let previous: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            previous(signal);
        }
    }
}
