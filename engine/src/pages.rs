//! Where the key tables' memory comes from: large tables on transparent huge pages.
//!
//! Over a million keys, finding a key is a random access into tables of a few hundred
//! megabytes, and with 4 KiB pages each access also misses the TLB and waits for a page walk
//! (perf on these machines: the walk is a large share of a lookup). A table of at least half a
//! huge page is therefore allocated aligned to a huge page and, on Linux, advised
//! `MADV_HUGEPAGE`, so the kernel backs it with 2 MiB pages where it can (with
//! `/sys/kernel/mm/transparent_hugepage/enabled` at `madvise` or `always`; at `never` the
//! advice is ignored and nothing else changes). Measured side by side at 1,000,000 keys (3
//! pairs of runs of `examples/hotloop.rs`): the ratio to governor went from 3.79–3.99x to
//! 3.38–3.53x.
//!
//! Smaller tables, and every other allocation, come from the global allocator unchanged. The
//! cost is memory: a table's size is rounded up to whole huge pages, and the kernel may back
//! the rounded-up tail too. A key table's sizes are powers of two times 105 bytes, so that is
//! about 16% of the table (at 1,000,000 keys each shard's table of 3.4 MiB takes 4 MiB), and
//! less than the table itself in any case.

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
