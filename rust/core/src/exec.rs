//! Runs copy plans with a pool of threads, into memory owned by the caller.

use std::ptr;
use std::sync::{Arc, Condvar, Mutex};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::plan::{CopyOp, OP_BYTES};
use crate::shard::Shard;

/// How source bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Copy out of the memory map; first touches of a page cost a page fault.
    Map,
    /// `pread` long contiguous runs straight into the destination (no page faults); strided
    /// gathers use the map. Either way, a file cut short during a copy is an error.
    Read,
}

/// Contiguous runs at least this long are read with `pread` in [`ReadMode::Read`]; shorter
/// ones cost more in system calls than they save in page faults.
pub const MIN_READ_BYTES: usize = 64 << 10;

/// A pool of copy threads. The pool is (re)built lazily in the process that uses it, so a
/// forked child gets threads of its own instead of waiting forever on its parent's.
#[derive(Debug)]
pub struct Executor {
    threads: usize,
    mode: ReadMode,
    prefetch: bool,
    pool: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>>,
}

/// A destination pointer shared by the copy threads; each writes a disjoint range.
#[derive(Clone, Copy)]
struct Destination(*mut u8);
// SAFETY: the threads write disjoint byte ranges (operations tile the window without
// overlap) and `Executor::run` does not return before they finish.
unsafe impl Send for Destination {}
unsafe impl Sync for Destination {}

impl Destination {
    /// # Safety
    /// `offset` must lie inside the destination window.
    unsafe fn at(self, offset: usize) -> *mut u8 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

impl Executor {
    pub fn new(threads: usize, mode: ReadMode) -> Executor {
        Executor {
            threads: threads.max(1),
            mode,
            prefetch: false,
            pool: Mutex::new(None),
        }
    }

    /// Ask the kernel to start reading each window's source bytes from disk as the window
    /// begins (one `MADV_WILLNEED` per run of adjacent bytes), so that a cold load keeps the
    /// disk busy with large requests instead of waiting on one page fault at a time.
    pub fn with_prefetch(mut self, prefetch: bool) -> Executor {
        self.prefetch = prefetch;
        self
    }

    pub fn prefetch(&self) -> bool {
        self.prefetch
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    fn pool(&self) -> Result<Arc<rayon::ThreadPool>> {
        let pid = std::process::id();
        let mut pool = self
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*pool {
            Some((owner, p)) if *owner == pid => Ok(p.clone()),
            _ => {
                let built = rayon::ThreadPoolBuilder::new()
                    .num_threads(self.threads)
                    .thread_name(|i| format!("fastmoe-copy-{i}"))
                    .build()
                    .map(Arc::new)
                    .map_err(|e| Error::io("<copy threads>", "start", std::io::Error::other(e)))?;
                *pool = Some((pid, built.clone()));
                Ok(built)
            }
        }
    }

    /// Runs `job` on the copy threads and returns at once; the ticket says when it is done.
    /// Queued jobs keep the threads busy back to back, with no gap for the caller to wake
    /// them up between two staging windows.
    pub fn spawn(&self, job: impl FnOnce() -> Result<()> + Send + 'static) -> Result<Ticket> {
        let ticket = Ticket::default();
        let done = ticket.clone();
        self.pool()?.spawn_fifo(move || done.finish(job()));
        Ok(ticket)
    }

    /// Copies `ops` into a window of the destination: the window holds destination bytes
    /// `[window_start, window_start + window_len)` and begins at `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `window_len` bytes for the duration of the call, and
    /// nothing else may access that memory meanwhile.
    pub unsafe fn run(
        &self,
        shards: &[Arc<Shard>],
        ops: &[CopyOp],
        dst: *mut u8,
        window_start: usize,
        window_len: usize,
    ) -> Result<()> {
        for op in ops {
            let extent = op.checked_extent();
            let in_window = extent.is_some_and(|(len, _)| {
                op.dst >= window_start
                    && op
                        .dst
                        .checked_add(len)
                        .is_some_and(|end| end <= window_start + window_len)
            });
            let shard = shards.get(op.shard);
            let in_shard = shard.is_some_and(|s| extent.is_some_and(|(_, end)| end <= s.len()));
            if !in_window || !in_shard || !gatherable(op) {
                return Err(Error::Checkpoint {
                    path: shard.map(|s| s.path().to_path_buf()).unwrap_or_default(),
                    reason: format!(
                        "copy {op:?} falls outside its window [{window_start}, +{window_len}) or \
                         its file, or has an unsupported element size; this is a bug"
                    ),
                });
            }
        }
        if self.prefetch {
            will_need(shards, ops);
        }
        let dst = Destination(dst);
        let mode = self.mode;
        let run_task = |task: &std::ops::Range<usize>| -> Result<()> {
            let ops = &ops[task.clone()];
            let (first, last) = (&ops[0], &ops[ops.len() - 1]);
            // SAFETY: checked above that every source lies inside its shard's mapping and
            // every destination inside the window the caller vouches for; operations of a
            // plan write disjoint ranges, and a task's operations the range they tile.
            unsafe {
                prefault(
                    dst.at(first.dst - window_start),
                    last.dst + last.len() - first.dst,
                );
                for op in ops {
                    let dst = dst.at(op.dst - window_start);
                    if mode == ReadMode::Read
                        && op.has_contiguous_rows()
                        && op.cols * op.elem >= MIN_READ_BYTES
                    {
                        read_rows(&shards[op.shard], dst, op)?;
                    } else {
                        let shard = &shards[op.shard];
                        let src = shard.as_ptr().add(op.src);
                        shard.read_mapped(op.src, op.src_end(), || copy(src, dst, op))?;
                    }
                }
            }
            stream_fence();
            Ok(())
        };
        let tasks = tasks(ops);
        if let [task] = &tasks[..] {
            // One task (a norm's weight, a scale): run here. Handing it to a copy thread
            // took 28 us where the copy of 4 KiB takes 3 (2-core EPYC).
            return run_task(task);
        }
        self.pool()?
            .install(|| tasks.par_iter().try_for_each(run_task))
    }
}

/// Consecutive operations gathered into tasks of about [`OP_BYTES`] each (one operation
/// where operations are that long already), the grain of work of the copy threads. Input-first
/// and interleaved plans are made of one operation per row, kilobytes each: spawning, mapping
/// the destination and fencing the streaming stores once per row ran GPTQ's input-first
/// plans at half the rate of bf16 ones.
fn tasks(ops: &[CopyOp]) -> Vec<std::ops::Range<usize>> {
    let mut tasks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, op) in ops.iter().enumerate() {
        bytes += op.len();
        let contiguous = ops
            .get(i + 1)
            .is_some_and(|next| next.dst == op.dst + op.len());
        if bytes >= OP_BYTES || !contiguous {
            tasks.push(start..i + 1);
            (start, bytes) = (i + 1, 0);
        }
    }
    tasks
}

/// Maps the destination pages of an operation in one system call. Fresh memory would
/// otherwise take one page fault per 4 KiB page in the middle of the copy; populating the
/// range first was measured 1.5 times faster on a 2-core EPYC machine. Memory mapped
/// already (pinned staging buffers, served parameters) is left alone: walking its pages cost
/// as much as a third of the copy, and skipping it copied a 131 MB tensor in 6.6 ms instead
/// of 14.6 (2-core EPYC). Whether the range is mapped is judged by its middle page: a range
/// mapped only in part then faults in its other pages during the copy. Data is never changed.
fn prefault(dst: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    let start = dst as usize / PAGE * PAGE;
    let end = (dst as usize + len).next_multiple_of(PAGE);
    if is_mapped((dst as usize + len / 2) / PAGE * PAGE) {
        return;
    }
    // SAFETY: MADV_POPULATE_WRITE only faults in the (already mapped, writable) pages of the
    // caller's destination, as a write to each would; it reads and writes no data. Kernels
    // before 5.14 reject it with EINVAL, which is ignored: the copy then faults as usual.
    unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            end - start,
            libc::MADV_POPULATE_WRITE,
        )
    };
}

/// Whether the page at `page` (page-aligned) is in memory: one `mincore` call; false where
/// the kernel cannot tell (then the range is populated, as a write would).
fn is_mapped(page: usize) -> bool {
    let mut resident = 0u8;
    // SAFETY: mincore reads the page tables of one page of the caller's destination and
    // writes one byte into `resident`.
    let rc = unsafe { libc::mincore(page as *mut libc::c_void, 4096, &mut resident) };
    rc == 0 && resident & 1 == 1
}

/// Starts readahead of the source bytes of `ops`, merging adjacent ranges of one shard.
fn will_need(shards: &[Arc<Shard>], ops: &[CopyOp]) {
    let mut run: Option<(usize, usize, usize)> = None; // (shard, start, end)
    for op in ops {
        match &mut run {
            Some((shard, _, end)) if *shard == op.shard && op.src <= *end => {
                *end = (*end).max(op.src_end());
            }
            _ => {
                if let Some((shard, start, end)) = run {
                    shards[shard].will_need(start, end);
                }
                run = Some((op.shard, op.src, op.src_end()));
            }
        }
    }
    if let Some((shard, start, end)) = run {
        shards[shard].will_need(start, end);
    }
}

/// The outcome of a spawned job, to wait for.
#[derive(Clone, Default)]
pub struct Ticket(Arc<(Mutex<Option<Result<()>>>, Condvar)>);

impl Ticket {
    fn finish(&self, result: Result<()>) {
        let (slot, done) = &*self.0;
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        done.notify_all();
    }

    pub fn is_done(&self) -> bool {
        self.0
             .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Blocks until the job has finished and returns its result.
    pub fn wait(self) -> Result<()> {
        let (slot, done) = &*self.0;
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match slot.take() {
                Some(result) => return result,
                None => slot = done.wait(slot).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("done", &self.is_done())
            .finish()
    }
}

/// # Safety
/// `dst` must cover the operation's destination bytes.
unsafe fn read_rows(shard: &Shard, dst: *mut u8, op: &CopyOp) -> Result<()> {
    let row_bytes = op.cols * op.elem;
    for r in 0..op.rows {
        // SAFETY: row r of the destination lies inside the operation's destination, which
        // nothing else writes meanwhile.
        let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * row_bytes), row_bytes) };
        shard.read_at(op.src + r * op.src_row_stride, row)?;
    }
    Ok(())
}

/// # Safety
/// `src` and `dst` must cover the operation's source and destination bytes.
unsafe fn copy(src: *const u8, dst: *mut u8, op: &CopyOp) {
    if op.has_contiguous_rows() {
        let row_bytes = op.cols * op.elem;
        // Short rows that end inside cache lines would share them between the streaming
        // stores of one row and the plain ones of the next: each row then costs a partial
        // write-combining flush (45-byte rows of mxfp4 scales ran at 0.19 GB/s so). Plain
        // stores fill those lines in the cache. Rows of whole lines share none, however short.
        let whole_lines = row_bytes.is_multiple_of(LINE) && (dst as usize).is_multiple_of(LINE);
        let copy_row = if row_bytes >= STREAM_MIN_ROW_BYTES || whole_lines {
            stream_copy
        } else {
            plain_copy
        };
        for r in 0..op.rows {
            // SAFETY: row r lies inside the operation's source and destination.
            unsafe {
                copy_row(
                    src.add(r * op.src_row_stride),
                    dst.add(r * row_bytes),
                    row_bytes,
                )
            };
        }
        return;
    }
    // SAFETY: forwarded from the caller; `run` admits only these element sizes.
    unsafe {
        match op.elem {
            1 => gather::<u8>(src, dst, op),
            2 => gather::<u16>(src, dst, op),
            4 => gather::<u32>(src, dst, op),
            _ => gather::<u64>(src, dst, op),
        }
    }
}

/// Rows shorter than this are copied with plain stores unless they are whole cache lines
/// (see [`copy`]).
const STREAM_MIN_ROW_BYTES: usize = 4096;

/// A cache line (x86_64).
const LINE: usize = 64;

/// # Safety
/// As for [`stream_copy`].
unsafe fn plain_copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { ptr::copy_nonoverlapping(src, dst, len) }
}

/// Copies `len` bytes with non-temporal (streaming) stores. The destination is written once
/// and read much later (or by DMA), so bypassing the cache saves the read-for-ownership of
/// every destination line: a third of the memory traffic of a plain `memcpy`, measured as
/// twice the copy rate on a 2-core EPYC machine. Call [`stream_fence`] before the data is
/// handed to anyone else.
///
/// # Safety
/// `src` and `dst` must be valid for `len` bytes and must not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    // SAFETY: every access below stays inside `[0, len)` of both buffers; streaming stores
    // go to 16-byte aligned addresses, as `_mm_stream_si128` requires (SSE2 is part of the
    // x86_64 baseline).
    unsafe {
        let head = dst.align_offset(16).min(len);
        ptr::copy_nonoverlapping(src, dst, head);
        let mut at = head;
        while at + 64 <= len {
            let lanes = [0, 16, 32, 48].map(|k| _mm_loadu_si128(src.add(at + k).cast::<__m128i>()));
            for (k, lane) in [0, 16, 32, 48].into_iter().zip(lanes) {
                _mm_stream_si128(dst.add(at + k).cast::<__m128i>(), lane);
            }
            at += 64;
        }
        while at + 16 <= len {
            _mm_stream_si128(
                dst.add(at).cast::<__m128i>(),
                _mm_loadu_si128(src.add(at).cast::<__m128i>()),
            );
            at += 16;
        }
        ptr::copy_nonoverlapping(src.add(at), dst.add(at), len - at);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn stream_copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { ptr::copy_nonoverlapping(src, dst, len) }
}

/// Orders the streaming stores of this thread before its later stores (among them the one
/// that tells the pool the work is done).
fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no preconditions.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Element sizes `gather` handles: those of every safetensors dtype that is sliceable.
fn gatherable(op: &CopyOp) -> bool {
    op.has_contiguous_rows() || matches!(op.elem, 1 | 2 | 4 | 8)
}

/// Rows of destination elements gathered from strided source elements.
///
/// # Safety
/// As for [`copy`].
unsafe fn gather<T: Copy + Default>(src: *const u8, dst: *mut u8, op: &CopyOp) {
    let (rows, cols) = (op.rows, op.cols);
    let (rs, cs) = (op.src_row_stride, op.src_col_stride);
    let dst = dst.cast::<T>();
    // SAFETY: every (r, c) is inside the operation, so both addresses are covered; reads and
    // writes are unaligned because file offsets and staging windows need not be aligned.
    let read =
        |r: usize, c: usize| unsafe { src.add(r * rs + c * cs).cast::<T>().read_unaligned() };
    let write =
        |r: usize, c: usize, value: T| unsafe { dst.add(r * cols + c).write_unaligned(value) };
    if rs < cs {
        // A transpose: consecutive destination rows are neighbours in the source. Go through
        // TILE x TILE blocks held in a small buffer: read each source run of the block (a
        // cache line), then write whole pieces of destination rows. Writing one element to
        // each of TILE destination rows in turn instead makes every store miss when the rows
        // are a power of two apart (they share a cache set): measured 1 GB/s on 2 cores.
        const TILE: usize = 32;
        let mut block = [[T::default(); TILE]; TILE];
        for r0 in (0..rows).step_by(TILE) {
            let r1 = (r0 + TILE).min(rows);
            for c0 in (0..cols).step_by(TILE) {
                let c1 = (c0 + TILE).min(cols);
                for c in c0..c1 {
                    for r in r0..r1 {
                        block[c - c0][r - r0] = read(r, c);
                    }
                }
                for r in r0..r1 {
                    for c in c0..c1 {
                        write(r, c, block[c - c0][r - r0]);
                    }
                }
            }
        }
    } else {
        for r in 0..rows {
            for c in 0..cols {
                write(r, c, read(r, c));
            }
        }
    }
}
