//! How the process allocator treats the large buffers of tensor work.
//!
//! A LocalNet training step allocates and frees dozens of activations and gradients of
//! 30-130 MB each. glibc's `malloc` serves every block above its `mmap` threshold (at most
//! 32 MiB) with a fresh `mmap` and returns it with `munmap` on free, so each step page-faults
//! every such buffer back in, and the kernel zeroes it first: at 64^3 that was 2.7 million
//! minor faults and a fifth of a full-preset training step (BENCHMARKS.md, "Allocator").
//!
//! [`keep_freed_memory`] makes glibc serve large blocks from its heap instead and keep up
//! to [`TRIM_THRESHOLD`] of freed memory at the heap's top for the next step;
//! [`release_freed_memory`] hands what is free back to the kernel once a job ends, so an
//! idle worker still shrinks. Other C libraries keep their default behaviour.
//!
//! `MEDRAY_MALLOC=system` leaves glibc's defaults, to compare the two in one run.

use std::sync::atomic::{AtomicBool, Ordering};

/// Freed memory the heap keeps at its top before returning any to the kernel.
pub const TRIM_THRESHOLD: usize = 1 << 30;

static KEEPING: AtomicBool = AtomicBool::new(false);

/// Whether [`keep_freed_memory`] took effect in this process.
pub fn keeps_freed_memory() -> bool {
    KEEPING.load(Ordering::Relaxed)
}

/// Serves large allocations from the heap and keeps freed memory for reuse (see the module
/// docs). Call once, at the start of `main`, before other threads allocate. Returns whether
/// it took effect: false with `MEDRAY_MALLOC=system` and off glibc.
pub fn keep_freed_memory() -> bool {
    if std::env::var("MEDRAY_MALLOC").is_ok_and(|v| v.eq_ignore_ascii_case("system")) {
        return false;
    }
    let ok = set_glibc_options();
    KEEPING.store(ok, Ordering::Relaxed);
    ok
}

/// Returns the heap's free memory to the kernel (glibc `malloc_trim`): after a job, so that
/// an idle process does not hold its last step's buffers. A no-op when
/// [`keep_freed_memory`] did not take effect.
pub fn release_freed_memory() {
    if keeps_freed_memory() {
        trim();
    }
}

/// One line for benchmark headers.
pub fn describe() -> String {
    if keeps_freed_memory() {
        format!(
            "allocator: glibc, large blocks from the heap, freed memory kept (up to {} MiB) between steps",
            TRIM_THRESHOLD >> 20
        )
    } else {
        "allocator: system defaults (large blocks mmap'd and unmapped on free)".into()
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_glibc_options() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is called before the process
    // starts its worker threads, and a rejected value leaves the old one (return 0).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_glibc_options() -> bool {
    false
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_mode_leaves_the_allocator_alone_and_release_is_then_a_no_op() {
        // The test harness never calls keep_freed_memory, so this process has defaults.
        assert!(!keeps_freed_memory());
        release_freed_memory();
        assert!(describe().contains("system defaults"));
    }
}
