//! Fresh large buffers with their pages faulted in at once: one `madvise(MADV_POPULATE_WRITE)`
//! (Linux 5.14 and later) instead of a page fault per 4 KiB page as the buffer is first
//! written. Elsewhere, or when the kernel refuses, the pages fault in as usual. For buffers
//! about to be written whole: large frames queued for sending (the connection layer's spare
//! pool) and large payloads handed to the application ([`crate::api::RawCodec`]).

/// Buffers smaller than this are allocated as usual (a few pages fault in cheaply).
pub(crate) const MIN_LEN: usize = 64 * 1024;

/// An empty buffer with room for `len` bytes whose pages, when it is large (at least
/// [`MIN_LEN`]), are faulted in at once ([`prefault`]): for large buffers about to be
/// written whole (a frame, a payload handed to the application).
pub(crate) fn with_capacity(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    if len >= MIN_LEN {
        let _ = prefault(&mut v);
    }
    v
}

/// Asks the kernel to back the whole capacity of `v` with pages now, in one system call, so
/// that writing it does not take a page fault per page. A hint: without `MADV_POPULATE_WRITE`
/// nothing happens.
/// Returns whether the kernel did.
#[cfg(target_os = "linux")]
fn prefault(v: &mut Vec<u8>) -> bool {
    /// `MADV_POPULATE_WRITE` (Linux 5.14), spelled out: not every libc crate names it.
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    const PAGE: usize = 4096;
    let spare = v.spare_capacity_mut();
    let at = spare.as_mut_ptr() as usize;
    let start = at.next_multiple_of(PAGE);
    let end = (at + spare.len()) & !(PAGE - 1);
    // SAFETY: [start, end) lies inside the allocation `v` owns (its spare capacity, rounded
    // inward to whole pages); populating pages for writing changes no byte a program could
    // observe, and the call's failure (an older kernel: EINVAL) is harmless.
    end > start
        && unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) }
            == 0
}

#[cfg(not(target_os = "linux"))]
fn prefault(_v: &mut Vec<u8>) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of this process so far.
    #[cfg(target_os = "linux")]
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
        u.ru_minflt
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_prefaulted_buffer_is_written_without_a_fault_per_page() {
        let len = 8 << 20;
        let mut v: Vec<u8> = Vec::with_capacity(len);
        if !prefault(&mut v) {
            eprintln!("SKIPPED: this kernel has no MADV_POPULATE_WRITE");
            return;
        }
        let before = minor_faults();
        v.resize(len, 0xa5);
        let faults = minor_faults() - before;
        assert!(v.iter().all(|&b| b == 0xa5));
        // 2,048 pages were written; without the hint each would have faulted.
        assert!(
            faults < 64,
            "{faults} page faults writing a prefaulted 8 MiB buffer"
        );
    }
}
