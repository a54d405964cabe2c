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
//!   up to whole huge pages. A key table's sizes are powers of two times 105 bytes, so the
//!   rounding costs about 16% of the table (3.4 MiB -> 4 MiB per shard at 1,000,000 keys).
//! - `UsagePages`: a key's usage box, counters and rings are blocks of whole cache lines carved
//!   from huge-page chunks (`Slab`), freed blocks reused by later keys. The rounding to lines
//!   costs about 9% (a Plus key: 1,120 bytes, 1,216 in blocks); chunks are never handed back.
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

/// The allocator of keys' usage: the box, its list of counters and its rolling rings (a few
/// hundred bytes to a few KiB per key, allocated when a key is first used). Over a million
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
/// handed back, so the usage memory a process holds is its peak, as with most allocators'
/// small blocks. Allocation is cold (a key's first use, a policy swap, a restore), so one
/// mutex serves.
struct Slab {
    free: [*mut u8; CLASSES],
    /// The unused rest of the newest chunk.
    next: *mut u8,
    left: usize,
    /// Bytes of the blocks on the free lists.
    free_bytes: usize,
    /// Every chunk, so they stay reachable (leak checkers) and can be counted.
    chunks: Vec<NonNull<u8>>,
}

// SAFETY: the raw pointers are owned by the slab and touched only under its mutex.
unsafe impl Send for Slab {}

static SLAB: parking_lot::Mutex<Slab> = parking_lot::const_mutex(Slab {
    free: [std::ptr::null_mut(); CLASSES],
    next: std::ptr::null_mut(),
    left: 0,
    free_bytes: 0,
    chunks: Vec::new(),
});

/// The size class of a block for `layout`, if it is carved from a chunk: blocks of
/// `class * BLOCK_UNIT` bytes.
fn class_of(layout: Layout) -> Option<usize> {
    (layout.size() > 0 && layout.size() <= MAX_BLOCK_BYTES && layout.align() <= BLOCK_UNIT)
        .then(|| layout.size().div_ceil(BLOCK_UNIT))
}

/// The usage pages of the whole process (every engine in it), for memory figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsagePagesStats {
    /// Bytes of huge-page chunks held (never handed back).
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
// whole lines), inside a chunk that is never freed, and handed out once until `deallocate`
// puts it back on its class's list; `deallocate` derives the same class from the same layout.
// Other layouts go to and from `Global` unchanged.
unsafe impl Allocator for UsagePages {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let Some(class) = class_of(layout) else {
            return Global.allocate(layout);
        };
        let bytes = class * BLOCK_UNIT;
        let mut slab = SLAB.lock();
        let head = slab.free[class - 1];
        if let Some(block) = NonNull::new(head) {
            // SAFETY: a block on a free list holds the next block's address in its first word
            // (written by `deallocate`), and nobody else owns it.
            slab.free[class - 1] = unsafe { block.cast::<*mut u8>().read() };
            slab.free_bytes -= bytes;
            return Ok(NonNull::slice_from_raw_parts(block, layout.size()));
        }
        if slab.left < bytes {
            let chunk = Layout::from_size_align(HUGE_PAGE_BYTES, HUGE_PAGE_BYTES)
                .map_err(|_| AllocError)?;
            // SAFETY: a non-zero size.
            let chunk = NonNull::new(unsafe { std::alloc::alloc(chunk) }).ok_or(AllocError)?;
            advise_huge_pages(chunk, HUGE_PAGE_BYTES);
            slab.chunks.push(chunk);
            // The old chunk's rest (under one block) is left unused.
            slab.next = chunk.as_ptr();
            slab.left = HUGE_PAGE_BYTES;
        }
        let block = slab.next;
        // SAFETY: `bytes <= left`, so the block and the new `next` stay inside the chunk.
        slab.next = unsafe { block.add(bytes) };
        slab.left -= bytes;
        // SAFETY: `block` points into a live chunk.
        let block = unsafe { NonNull::new_unchecked(block) };
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    unsafe fn deallocate(&self, block: NonNull<u8>, layout: Layout) {
        let Some(class) = class_of(layout) else {
            // SAFETY: allocated by `Global` with this layout (see `allocate`).
            return unsafe { Global.deallocate(block, layout) };
        };
        let mut slab = SLAB.lock();
        // SAFETY: the block is ours again and at least one line long: its first word links it.
        unsafe { block.cast::<*mut u8>().write(slab.free[class - 1]) };
        slab.free[class - 1] = block.as_ptr();
        slab.free_bytes += class * BLOCK_UNIT;
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
