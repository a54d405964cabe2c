//! Where the key tables' and the keys' usage memory comes from: transparent huge pages.
//!
//! Over a million keys, an admission is a random access into the key tables (a few hundred
//! megabytes) and then into the key's usage (a gigabyte of small blocks), and with 4 KiB pages
//! each also misses the TLB and waits for a page walk (perf on these machines: the walks are a
//! large share of a lookup; `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` took 25-30% off). So both
//! sit on 2 MiB-aligned memory advised `MADV_HUGEPAGE` on Linux, which the kernel backs with
//! huge pages where it can (with `/sys/kernel/mm/transparent_hugepage/enabled` at `madvise` or
//! `always`; at `never` the advice is ignored and nothing else changes):
//!
//! - `TablePages`: a shard's table of at least half a huge page is aligned to one and rounded
//!   up to whole huge pages. A key table's sizes are powers of two times 113 bytes (a 112-byte
//!   entry and its control byte), so the rounding costs about 13% of the table (3.5 MiB -> 4 MiB
//!   per shard at 1,000,000 keys).
//! - `UsagePages`: a key's usage block (its counters), its rings and its name (when longer than
//!   the 22 bytes a table entry holds) are blocks of whole cache lines carved from huge-page
//!   chunks (`Slab`), freed blocks reused by later keys. The rounding to lines costs about 8%
//!   (a Plus key's windows: 1,072 bytes, 1,153 in blocks); chunks are never handed back.
//!
//! Measured side by side at 1,000,000 keys (`examples/hotloop.rs`, paired bursts, ratio to
//! governor): 3.72-3.99x before, 3.38-4.08x with the tables on huge pages, 3.14-3.50x with
//! the usage too. Every other allocation comes from the global allocator unchanged.

use std::alloc::Layout;
use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global};

/// A transparent huge page on x86-64 and most aarch64 kernels.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// The allocator of the key shards' hash tables (see the module comment).
#[derive(Clone, Copy, Debug, Default)]
pub struct TablePages;

impl TablePages {
    /// The layout a table of `layout` is really allocated with: from half a huge page up,
    /// aligned to one and rounded up to whole huge pages (the kernel backs only whole, aligned
    /// 2 MiB ranges with a huge page: a table of 3.4 MiB placed exactly got one huge page of
    /// its two). `allocate` and `deallocate` both go through here, so they always agree.
    fn placed(layout: Layout) -> Option<Layout> {
        if layout.size() < HUGE_PAGE_BYTES / 2 {
            return None;
        }
        let size = layout.size().checked_next_multiple_of(HUGE_PAGE_BYTES)?;
        Layout::from_size_align(size, layout.align().max(HUGE_PAGE_BYTES)).ok()
    }
}

// SAFETY: every block comes from the global allocator, either directly (`Global`) or through
// `std::alloc::alloc` with the layout `placed` gives; `deallocate` recomputes that same layout
// from the caller's, so each block is freed exactly as it was allocated. The advice changes
// how the kernel backs the pages, never their contents or validity.
unsafe impl Allocator for TablePages {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let Some(placed) = TablePages::placed(layout) else {
            return Global.allocate(layout);
        };
        // SAFETY: `placed` has a non-zero size (at least `HUGE_PAGE_BYTES`).
        let block = NonNull::new(unsafe { std::alloc::alloc(placed) }).ok_or(AllocError)?;
        advise_huge_pages(block, placed.size());
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    unsafe fn deallocate(&self, block: NonNull<u8>, layout: Layout) {
        match TablePages::placed(layout) {
            // SAFETY: `block` came from `allocate` with this `layout`, i.e. from
            // `std::alloc::alloc(placed)`.
            Some(placed) => unsafe { std::alloc::dealloc(block.as_ptr(), placed) },
            // SAFETY: as above, from `Global.allocate(layout)`.
            None => unsafe { Global.deallocate(block, layout) },
        }
    }
}

/// The allocator of keys' usage and names: a key's name (a line, from its creation) and its
/// usage's block of counters and rolling rings (a few hundred bytes to a few KiB, allocated
/// when the key is first used). Over a million
/// keys these are a gigabyte of small blocks, and each admission touches a key's: with 4 KiB
/// pages that is one more page walk per request. Blocks are carved out of huge-page chunks
/// (see `Slab`); anything larger than `MAX_BLOCK_BYTES` or aligned beyond a cache line comes
/// from the global allocator as before.
#[derive(Clone, Copy, Debug, Default)]
pub struct UsagePages;

/// Blocks are whole cache lines: a block never shares a line with another key's.
const BLOCK_UNIT: usize = 64;
/// The largest block carved from a chunk (a ring of 2,048 wide slots).
pub const MAX_BLOCK_BYTES: usize = 16 * 1024;
const CLASSES: usize = MAX_BLOCK_BYTES / BLOCK_UNIT;

/// The process's usage blocks: 2 MiB chunks, each cut front to back into blocks of whole cache
/// lines, and one free list per block size. A freed block goes on its size's list (its first
/// word links to the next) and is reused by the next block of that size; chunks are never
/// handed back once cut, so the usage memory a process holds is its peak, as with most
/// allocators' small blocks. Allocation is cold (a key's first use, a policy swap, a restore),
/// so one mutex serves.
///
/// A chunk may also be made ready ahead of need, its pages already faulted in, by a `Warmer`
/// (an open warms what its snapshot's keys will take while the snapshot is decoded):
/// such chunks wait in `spare` and are cut before any new one; those no key took are handed
/// back when the warmer finishes.
struct Slab {
    free: [*mut u8; CLASSES],
    /// The unused rest of the chunk being cut.
    next: *mut u8,
    left: usize,
    /// Bytes of the blocks on the free lists.
    free_bytes: usize,
    /// Every chunk cut, so they stay reachable (leak checkers) and can be counted.
    chunks: Vec<NonNull<u8>>,
    /// Warmed chunks not cut yet.
    spare: Vec<NonNull<u8>>,
}

// SAFETY: the raw pointers are owned by the slab and touched only under its mutex.
unsafe impl Send for Slab {}

static SLAB: parking_lot::Mutex<Slab> = parking_lot::const_mutex(Slab::new());

/// The layout of one chunk.
const CHUNK: Layout = match Layout::from_size_align(HUGE_PAGE_BYTES, HUGE_PAGE_BYTES) {
    Ok(layout) => layout,
    Err(_) => panic!("a huge page is a valid layout"),
};

impl Slab {
    const fn new() -> Slab {
        Slab {
            free: [std::ptr::null_mut(); CLASSES],
            next: std::ptr::null_mut(),
            left: 0,
            free_bytes: 0,
            chunks: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// A block of `class * BLOCK_UNIT` bytes: a freed one of that size, else the next one cut
    /// from the current chunk, else from a spare chunk, else from a new one.
    fn take(&mut self, class: usize) -> Result<NonNull<u8>, AllocError> {
        let bytes = class * BLOCK_UNIT;
        if let Some(block) = NonNull::new(self.free[class - 1]) {
            // SAFETY: a block on a free list holds the next block's address in its first word
            // (written by `give_back`), and nobody else owns it.
            self.free[class - 1] = unsafe { block.cast::<*mut u8>().read() };
            self.free_bytes -= bytes;
            return Ok(block);
        }
        if self.left < bytes {
            let chunk = match self.spare.pop() {
                Some(chunk) => chunk,
                None => new_chunk()?,
            };
            self.chunks.push(chunk);
            // The old chunk's rest (under one block) is left unused.
            self.next = chunk.as_ptr();
            self.left = HUGE_PAGE_BYTES;
        }
        let block = self.next;
        // SAFETY: `bytes <= left`, so the block and the new `next` stay inside the chunk.
        self.next = unsafe { block.add(bytes) };
        self.left -= bytes;
        // SAFETY: `block` points into a live chunk.
        Ok(unsafe { NonNull::new_unchecked(block) })
    }

    /// Puts a block taken with `class` on its free list.
    ///
    /// # Safety
    /// `block` came from `take(class)` on this slab and is not used after.
    unsafe fn give_back(&mut self, block: NonNull<u8>, class: usize) {
        // SAFETY: the block is ours again and at least one line long: its first word links it.
        unsafe { block.cast::<*mut u8>().write(self.free[class - 1]) };
        self.free[class - 1] = block.as_ptr();
        self.free_bytes += class * BLOCK_UNIT;
    }

    /// Hands the spare chunks back to the global allocator.
    fn release_spare(&mut self) {
        for chunk in self.spare.drain(..) {
            // SAFETY: allocated by `new_chunk` with `CHUNK`, never cut, so no block points in.
            unsafe { std::alloc::dealloc(chunk.as_ptr(), CHUNK) };
        }
    }
}

/// A new chunk, advised onto a huge page, its pages not yet touched.
fn new_chunk() -> Result<NonNull<u8>, AllocError> {
    // SAFETY: a non-zero size.
    let chunk = NonNull::new(unsafe { std::alloc::alloc(CHUNK) }).ok_or(AllocError)?;
    advise_huge_pages(chunk, HUGE_PAGE_BYTES);
    Ok(chunk)
}

/// A new chunk with every page faulted in: what the kernel takes to find and clear a page is
/// paid here, not by the key that is given the chunk. In a fresh process (a restart) that is
/// most of restoring a key's usage: 240-450 ms of a 100,000-key restore measured cold, 160-190
/// with the chunks warmed beforehand.
fn warm_chunk() -> Result<NonNull<u8>, AllocError> {
    let chunk = new_chunk()?;
    // One write per ordinary page faults each in (the whole huge page at the first write,
    // where the kernel gives one).
    for offset in (0..HUGE_PAGE_BYTES).step_by(4096) {
        // SAFETY: inside the chunk just allocated, which nobody else has seen.
        unsafe { chunk.as_ptr().add(offset).write_volatile(0) };
    }
    Ok(chunk)
}

/// A thread that makes usage chunks ready ahead of need, from `Warmer::start` until
/// `Warmer::finish` (or a drop), which also hands back the chunks no key took. An open starts
/// one, sized by its snapshot's hint, while the snapshot is decoded on one core and
/// the other would idle, and finishes it once the keys are restored.
pub(crate) struct Warmer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Warmer {
    /// Warms chunks until the slab holds `bytes` ready to hand out (in whole chunks), counting
    /// what it already has: freed blocks (an engine closed earlier in the process leaves its
    /// keys' blocks for the next one's), the rest of the chunk being cut, spare chunks.
    /// Nothing if that is enough already or no thread can be started: it is a head start.
    pub(crate) fn start(bytes: usize) -> Warmer {
        let ready = {
            let slab = SLAB.lock();
            slab.free_bytes + slab.left + slab.spare.len() * HUGE_PAGE_BYTES
        };
        Warmer::warming(chunks_to_warm(bytes, ready))
    }

    /// A thread warming `wanted` chunks (none if 0).
    fn warming(wanted: usize) -> Warmer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = (wanted > 0)
            .then(|| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::Builder::new()
                    .name("tally-warm".into())
                    .spawn(move || {
                        let mut warmed = 0;
                        // Relaxed: the flag only ends the loop early; nothing is published by it.
                        while warmed < wanted && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let Ok(chunk) = warm_chunk() else { break };
                            SLAB.lock().spare.push(chunk);
                            warmed += 1;
                        }
                        warmed
                    })
                    .ok()
            })
            .flatten();
        Warmer { stop, thread }
    }

    /// Stops warming, hands back the spare chunks and returns the bytes warmed.
    pub(crate) fn finish(mut self) -> usize {
        self.stop_and_release()
    }

    fn stop_and_release(&mut self) -> usize {
        let Some(thread) = self.thread.take() else {
            return 0;
        };
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let warmed = thread.join().unwrap_or(0);
        SLAB.lock().release_spare();
        warmed * HUGE_PAGE_BYTES
    }
}

impl Drop for Warmer {
    fn drop(&mut self) {
        self.stop_and_release();
    }
}

/// The chunks to warm so that `bytes` are ready, with `ready` bytes ready already.
fn chunks_to_warm(bytes: usize, ready: usize) -> usize {
    bytes.saturating_sub(ready).div_ceil(HUGE_PAGE_BYTES)
}

/// The size class of a block for `layout`, if it is carved from a chunk: blocks of
/// `class * BLOCK_UNIT` bytes.
fn class_of(layout: Layout) -> Option<usize> {
    (layout.size() > 0 && layout.size() <= MAX_BLOCK_BYTES && layout.align() <= BLOCK_UNIT)
        .then(|| layout.size().div_ceil(BLOCK_UNIT))
}

/// The bytes a block for `bytes` takes on the usage pages (whole cache lines).
pub(crate) fn block_bytes(bytes: usize) -> usize {
    bytes.div_ceil(BLOCK_UNIT) * BLOCK_UNIT
}

/// What a key usage of `bytes` in `allocations` blocks takes from the slab at most: each block
/// rounded up to whole lines. For the warm-up hint a snapshot carries.
pub(crate) fn usage_block_bytes(bytes: usize, allocations: usize) -> usize {
    bytes + allocations * (BLOCK_UNIT - 1)
}

/// The usage pages of the whole process (every engine in it), for memory figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsagePagesStats {
    /// Bytes of huge-page chunks cut into blocks (never handed back).
    pub chunk_bytes: usize,
    /// Bytes of freed blocks waiting on the free lists for the next keys.
    pub free_bytes: usize,
}

pub fn usage_pages_stats() -> UsagePagesStats {
    let slab = SLAB.lock();
    UsagePagesStats {
        chunk_bytes: slab.chunks.len() * HUGE_PAGE_BYTES,
        free_bytes: slab.free_bytes,
    }
}

// SAFETY: a carved block is `class * BLOCK_UNIT` bytes (at least the layout's size), aligned
// to `BLOCK_UNIT` (at least the layout's alignment: chunks are huge-page aligned and blocks
// whole lines), inside a chunk that is never freed once cut, and handed out once until
// `deallocate` puts it back on its class's list; `deallocate` derives the same class from the
// same layout. Other layouts go to and from `Global` unchanged.
unsafe impl Allocator for UsagePages {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let Some(class) = class_of(layout) else {
            return Global.allocate(layout);
        };
        let block = SLAB.lock().take(class)?;
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    unsafe fn deallocate(&self, block: NonNull<u8>, layout: Layout) {
        let Some(class) = class_of(layout) else {
            // SAFETY: allocated by `Global` with this layout (see `allocate`).
            return unsafe { Global.deallocate(block, layout) };
        };
        // SAFETY: taken by `allocate` with the class of this same layout.
        unsafe { SLAB.lock().give_back(block, class) };
    }
}

/// `count` fresh items in a boxed slice from `allocator` (the usage rings, the key hints).
pub(crate) fn boxed_slice_in<T, A: Allocator>(
    count: usize,
    allocator: A,
    fresh: impl FnMut() -> T,
) -> allocator_api2::boxed::Box<[T], A> {
    let mut items = allocator_api2::vec::Vec::with_capacity_in(count, allocator);
    items.resize_with(count, fresh);
    items.into_boxed_slice()
}

/// Asks the kernel to back `[block, block + bytes)` with huge pages. Only a hint: a refusal
/// (an old kernel, THP off) leaves ordinary pages, which is what there was before.
#[cfg(target_os = "linux")]
fn advise_huge_pages(block: NonNull<u8>, bytes: usize) {
    // SAFETY: the range is one live allocation of `bytes` bytes, aligned to a huge page
    // (so to the page size madvise requires); MADV_HUGEPAGE does not change its contents.
    let _ = unsafe { libc::madvise(block.as_ptr().cast(), bytes, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_block: NonNull<u8>, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_below_half_a_huge_page_is_an_ordinary_allocation() {
        let layout = Layout::from_size_align(HUGE_PAGE_BYTES / 2 - 16, 16).expect("layout");
        assert_eq!(TablePages::placed(layout), None);
        let block = TablePages.allocate(layout).expect("memory");
        assert_eq!(block.len(), layout.size());
        // SAFETY: just allocated with `layout`.
        unsafe { TablePages.deallocate(block.cast(), layout) };
    }

    #[test]
    fn a_large_table_is_huge_page_aligned_usable_and_freed_with_its_own_layout() {
        for size in [
            HUGE_PAGE_BYTES / 2,
            HUGE_PAGE_BYTES,
            3 * HUGE_PAGE_BYTES + 40,
        ] {
            let layout = Layout::from_size_align(size, 16).expect("layout");
            let block = TablePages.allocate(layout).expect("memory");
            assert_eq!(block.len(), size);
            let start = block.cast::<u8>();
            assert_eq!(start.as_ptr() as usize % HUGE_PAGE_BYTES, 0);
            // Every byte is writable and keeps what was written.
            // SAFETY: `block` is `size` writable bytes.
            unsafe {
                std::ptr::write_bytes(start.as_ptr(), 0xA5, size);
                assert_eq!(*start.as_ptr().add(size - 1), 0xA5);
            }
            // SAFETY: allocated above with `layout`.
            unsafe { TablePages.deallocate(start, layout) };
        }
    }

    #[test]
    fn usage_blocks_are_whole_lines_reused_after_freeing_and_never_overlap() {
        let sizes = [1usize, 24, 64, 65, 804, 1608, MAX_BLOCK_BYTES];
        let mut live: Vec<(NonNull<u8>, Layout)> = Vec::new();
        for round in 0..3u8 {
            for &size in &sizes {
                let layout = Layout::from_size_align(size, 8).expect("layout");
                let block = UsagePages.allocate(layout).expect("memory").cast::<u8>();
                assert_eq!(block.as_ptr() as usize % BLOCK_UNIT, 0);
                // SAFETY: `size` writable bytes, just allocated.
                unsafe { std::ptr::write_bytes(block.as_ptr(), round, size) };
                live.push((block, layout));
            }
        }
        // No two live blocks overlap, and each kept what was written to it.
        let mut spans: Vec<(usize, usize)> = live
            .iter()
            .map(|(block, layout)| (block.as_ptr() as usize, layout.size()))
            .collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:?} overlap");
        }
        for (index, (block, layout)) in live.iter().enumerate() {
            let round = (index / sizes.len()) as u8;
            // SAFETY: live, `layout.size()` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(block.as_ptr(), layout.size()) };
            assert!(bytes.iter().all(|byte| *byte == round));
        }
        // A freed block of a size is what the next block of that size gets (the list is per
        // size, last in first out; other threads' tests may take one in between).
        let (block, layout) = live.pop().expect("a block");
        // SAFETY: allocated above with `layout`, not used after.
        unsafe { UsagePages.deallocate(block, layout) };
        let again = UsagePages.allocate(layout).expect("memory").cast::<u8>();
        live.push((again, layout));
        for (block, layout) in live {
            // SAFETY: each allocated above with its layout and freed once.
            unsafe { UsagePages.deallocate(block, layout) };
        }
        let stats = usage_pages_stats();
        assert!(stats.chunk_bytes >= HUGE_PAGE_BYTES);
        assert!(stats.free_bytes <= stats.chunk_bytes);
    }

    #[test]
    fn warmed_chunks_are_cut_before_new_ones_and_the_rest_handed_back() {
        let mut slab = Slab::new();
        let warmed = [warm_chunk().expect("memory"), warm_chunk().expect("memory")];
        slab.spare.extend(warmed);
        // A block of each of two sizes: both from the last spare chunk, which is now cut.
        let first = slab.take(3).expect("a block");
        let second = slab.take(20).expect("a block");
        assert_eq!(slab.chunks, vec![warmed[1]]);
        assert_eq!(slab.spare, vec![warmed[0]]);
        let start = warmed[1].as_ptr() as usize;
        assert_eq!(first.as_ptr() as usize, start);
        assert_eq!(second.as_ptr() as usize, start + 3 * BLOCK_UNIT);
        // Past the cut chunk's end: the other spare, then a new chunk.
        let per_chunk = HUGE_PAGE_BYTES / (CLASSES * BLOCK_UNIT);
        for _ in 0..per_chunk {
            slab.take(CLASSES).expect("a block");
        }
        assert_eq!(
            slab.chunks,
            warmed.iter().rev().copied().collect::<Vec<_>>()
        );
        assert!(slab.spare.is_empty());
        for _ in 0..per_chunk {
            slab.take(CLASSES).expect("a block");
        }
        assert_eq!(slab.chunks.len(), 3);
        // A spare chunk no key took is handed back; cut ones stay.
        slab.spare.push(warm_chunk().expect("memory"));
        slab.release_spare();
        assert!(slab.spare.is_empty());
        assert_eq!(slab.chunks.len(), 3);
        for chunk in slab.chunks.drain(..) {
            // SAFETY: from `new_chunk`; this test's blocks are not used after.
            unsafe { std::alloc::dealloc(chunk.as_ptr(), CHUNK) };
        }
    }

    #[test]
    fn a_warmer_warms_what_it_was_asked_unless_stopped() {
        let warmer = Warmer::warming(3);
        let thread = warmer.thread.as_ref().expect("a warming thread");
        while !thread.is_finished() {
            std::thread::yield_now();
        }
        assert_eq!(warmer.finish(), 3 * HUGE_PAGE_BYTES);
        // Stopped, it warms at most the chunk it was on. The slab's lock is held from the
        // start until the flag is set: the thread can hand over at most one chunk before it
        // waits for the lock, and looks at the flag after that. (Timed instead, a machine
        // busy enough to hold this thread back let it warm several: CI failed so once.)
        let slab = SLAB.lock();
        let warmer = Warmer::warming(64);
        warmer
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        drop(slab);
        assert!(warmer.finish() <= HUGE_PAGE_BYTES);
        assert!(Warmer::warming(0).thread.is_none());
    }

    #[test]
    fn a_warmer_counts_what_the_slab_has_ready() {
        let unit = HUGE_PAGE_BYTES;
        assert_eq!(chunks_to_warm(2 * unit + 1, 0), 3);
        // Freed blocks of a closed engine, the chunk being cut, spare chunks: all ready.
        assert_eq!(chunks_to_warm(2 * unit + 1, unit), 2);
        assert_eq!(chunks_to_warm(2 * unit + 1, 2 * unit + 1), 0);
        assert_eq!(chunks_to_warm(unit, 5 * unit), 0);
        assert_eq!(chunks_to_warm(0, 0), 0);
    }

    #[test]
    fn large_or_over_aligned_usage_blocks_come_from_the_global_allocator() {
        for layout in [
            Layout::from_size_align(MAX_BLOCK_BYTES + 1, 8).expect("layout"),
            Layout::from_size_align(256, 128).expect("layout"),
        ] {
            assert_eq!(class_of(layout), None);
            let block = UsagePages.allocate(layout).expect("memory").cast::<u8>();
            assert_eq!(block.as_ptr() as usize % layout.align(), 0);
            // SAFETY: allocated just above with `layout`.
            unsafe { UsagePages.deallocate(block, layout) };
        }
    }

    #[test]
    fn a_key_table_grown_past_a_huge_page_keeps_every_key() {
        // 40,000 entries of 104 bytes: past 2 MiB after a few growths, each a new table
        // (small ones ordinary, the last ones huge-page placed) with the old one freed.
        let mut table: hashbrown::HashTable<(u64, [u64; 12]), TablePages> =
            hashbrown::HashTable::new_in(TablePages);
        let hash = |key: u64| key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for key in 0..40_000u64 {
            table.insert_unique(hash(key), (key, [key; 12]), |entry| hash(entry.0));
        }
        let bytes = table.capacity() * std::mem::size_of::<(u64, [u64; 12])>();
        assert!(bytes >= HUGE_PAGE_BYTES, "{bytes} bytes");
        for key in 0..40_000u64 {
            let found = table.find(hash(key), |entry| entry.0 == key);
            assert_eq!(found.map(|entry| entry.1[11]), Some(key));
        }
        table.clear();
        table.shrink_to_fit(|entry| hash(entry.0));
        assert_eq!(table.len(), 0);
    }
}
