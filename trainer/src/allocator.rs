//! The allocator settings training needs. Every candle operation allocates its output afresh; with
//! glibc's defaults, buffers above 128 KiB are mmap'ed and unmapped on every free, so each step
//! page-faults its activations in again and again (a third of a CPU GAPG step, measured). Keeping
//! freed memory in the process removes that; the peak memory is the same.

/// Makes glibc keep freed memory for reuse: large buffers come from the heap (up to 32 MiB, glibc's
/// ceiling for this setting) and the heap is never trimmed. Call once, first thing in `main`.
/// Does nothing on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
