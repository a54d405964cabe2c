//! Checking what C hands in: strings as (pointer, length), arrays, out-pointers and output
//! buffers with the size-query convention. Every pointer is checked for NULL here; nothing
//! else in the crate dereferences a C pointer.

use std::ffi::c_char;
use std::ptr::NonNull;

use crate::status::{tally_status, Failure};

/// The longest key, user, team, request id or cursor name, in bytes. A user's Default Team,
/// `@` and the user's name, is the one name that may be a byte longer, and every call that names
/// an existing team takes it.
pub const TALLY_MAX_ID_BYTES: usize = 128;
/// The longest resource or plan name, in bytes.
pub const TALLY_MAX_NAME_BYTES: usize = 64;
/// The longest path or inline policy document, in bytes.
pub const TALLY_MAX_DOCUMENT_BYTES: usize = 1 << 20;

const _: () = assert!(TALLY_MAX_ID_BYTES == ::tally_engine::accounts::MAX_KEY_BYTES);
const _: () = assert!(TALLY_MAX_ID_BYTES == ::tally_engine::accounts::MAX_ID_BYTES);
const _: () = assert!(TALLY_MAX_NAME_BYTES == ::tally_engine::policy::MAX_NAME_BYTES);

/// Borrows `len` bytes at `ptr` as a string that must not be empty, longer than `max_bytes`,
/// hold a NUL or be invalid UTF-8; `field` names it in the error message.
pub(crate) fn text<'a>(
    field: &str,
    ptr: *const c_char,
    len: usize,
    max_bytes: usize,
) -> Result<&'a str, Failure> {
    optional_text(field, ptr, len, max_bytes)?.ok_or_else(|| {
        Failure::new(
            tally_status::TALLY_NULL_POINTER,
            format!("{field}: is NULL"),
        )
    })
}

/// Like `text`, but NULL with length 0 means "not given".
pub(crate) fn optional_text<'a>(
    field: &str,
    ptr: *const c_char,
    len: usize,
    max_bytes: usize,
) -> Result<Option<&'a str>, Failure> {
    // Checked before the bytes are borrowed: a length past the bound (a caller's wrong one
    // among them) is answered without making a slice longer than anything the caller holds.
    if !ptr.is_null() && len > max_bytes {
        return Err(Failure::new(
            tally_status::TALLY_STRING_TOO_LONG,
            format!("{field}: is {len} bytes; at most {max_bytes}"),
        ));
    }
    let Some(bytes) = optional_slice(field, ptr.cast::<u8>(), len)? else {
        return Ok(None);
    };
    if bytes.is_empty() {
        return Err(Failure::new(
            tally_status::TALLY_EMPTY_STRING,
            format!("{field}: must not be empty"),
        ));
    }
    if let Some(at) = bytes.iter().position(|byte| *byte == 0) {
        return Err(Failure::new(
            tally_status::TALLY_NUL_IN_STRING,
            format!("{field}: holds a NUL byte at offset {at}"),
        ));
    }
    std::str::from_utf8(bytes).map(Some).map_err(|error| {
        Failure::new(
            tally_status::TALLY_INVALID_UTF8,
            format!(
                "{field}: is not valid UTF-8 (at byte {})",
                error.valid_up_to()
            ),
        )
    })
}

/// Borrows `len` items at `ptr`, which must not be NULL unless `len` is 0 (then the slice is
/// empty). `None` when `ptr` is NULL and `len` 0.
pub(crate) fn optional_slice<'a, T>(
    field: &str,
    ptr: *const T,
    len: usize,
) -> Result<Option<&'a [T]>, Failure> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(None)
        } else {
            Err(Failure::new(
                tally_status::TALLY_NULL_POINTER,
                format!("{field}: is NULL with a length of {len}"),
            ))
        };
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Failure::new(
            tally_status::TALLY_INVALID_ARGUMENT,
            format!("{field}: a length of {len} cannot be right"),
        ));
    }
    // SAFETY: `ptr` is not NULL, and the caller promises (as the header says of every
    // pointer-and-length pair) that it points to `len` readable, initialised items that stay
    // unchanged for the duration of the call; the length fits in an isize.
    Ok(Some(unsafe { std::slice::from_raw_parts(ptr, len) }))
}

/// Borrows the one item at `ptr`, which must not be NULL.
pub(crate) fn reference<'a, T>(field: &str, ptr: *const T) -> Result<&'a T, Failure> {
    if ptr.is_null() {
        return Err(Failure::new(
            tally_status::TALLY_NULL_POINTER,
            format!("{field}: is NULL"),
        ));
    }
    // SAFETY: not NULL, and the caller promises (as the header says of every pointer) that
    // it points to a readable, initialised item that stays unchanged for the duration of the
    // call.
    Ok(unsafe { &*ptr })
}

/// An out-pointer, checked for NULL up front and written only when the call succeeds.
pub(crate) struct Out<T>(NonNull<T>);

impl<T> Out<T> {
    pub fn new(field: &str, ptr: *mut T) -> Result<Out<T>, Failure> {
        NonNull::new(ptr).map(Out).ok_or_else(|| {
            Failure::new(
                tally_status::TALLY_NULL_POINTER,
                format!("{field}: the output pointer is NULL"),
            )
        })
    }

    pub fn set(self, value: T) {
        // SAFETY: not NULL (checked in `new`); the caller promises it points to writable,
        // suitably aligned memory for a `T`. `write` does not read or drop the old contents,
        // which may be uninitialised.
        unsafe { self.0.as_ptr().write(value) }
    }
}

/// An out-array of `len` items, checked for NULL up front; items are written one by one.
pub(crate) struct OutSlice<T> {
    start: NonNull<T>,
    len: usize,
}

impl<T> OutSlice<T> {
    pub fn new(field: &str, ptr: *mut T, len: usize) -> Result<OutSlice<T>, Failure> {
        let start = Out::new(field, ptr)?.0;
        Ok(OutSlice { start, len })
    }

    /// Writes item `index`; an index past the end is ignored.
    pub fn set(&self, index: usize, value: T) {
        if index < self.len {
            // SAFETY: not NULL (checked in `new`); the caller promises `len` writable, aligned
            // items there and `index < len`; `write` does not read the old contents.
            unsafe { self.start.as_ptr().add(index).write(value) }
        }
    }
}

/// A caller-owned output buffer with the size-query convention: `needed` receives the bytes
/// the text needs including its NUL, whether or not `buf` was large enough.
pub(crate) struct OutBuffer {
    buf: *mut c_char,
    buf_len: usize,
    needed: Out<usize>,
}

impl OutBuffer {
    pub fn new(buf: *mut c_char, buf_len: usize, needed: *mut usize) -> Result<OutBuffer, Failure> {
        Ok(OutBuffer {
            buf,
            buf_len,
            needed: Out::new("needed", needed)?,
        })
    }
}

/// Copies `text` and a NUL into the buffer, or answers `TALLY_BUFFER_TOO_SMALL`; either way
/// `*needed` is `text.len() + 1`.
pub(crate) fn write_text(text: &str, out: OutBuffer) -> Result<(), Failure> {
    let needed = text.len() + 1;
    out.needed.set(needed);
    if out.buf.is_null() || out.buf_len < needed {
        return Err(Failure::new(
            tally_status::TALLY_BUFFER_TOO_SMALL,
            format!(
                "buf: {needed} bytes are needed, {} given; call again with a buffer of *needed bytes",
                if out.buf.is_null() { 0 } else { out.buf_len }
            ),
        ));
    }
    // SAFETY: `buf` is not NULL and the caller promises `buf_len` writable bytes there, which
    // is at least `needed`; the source is a Rust string, so the regions cannot overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), out.buf.cast::<u8>(), text.len());
        out.buf.add(text.len()).write(0);
    }
    Ok(())
}

/// Copies `text` into a fixed-size C char array, NUL-terminated, cut at a character boundary
/// if it does not fit. No allocation: for the decision on the hot path.
pub(crate) fn copy_name<const N: usize>(text: &str, into: &mut [c_char; N]) {
    let mut len = text.len().min(N.saturating_sub(1));
    while !text.is_char_boundary(len) {
        len -= 1;
    }
    for (slot, byte) in into.iter_mut().zip(&text.as_bytes()[..len]) {
        *slot = *byte as c_char;
    }
    if let Some(end) = into.get_mut(len) {
        *end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length past the bound is refused by its value alone, before anything at the pointer
    /// is borrowed: here three real bytes with a length a caller could get wrong.
    #[test]
    fn a_string_longer_than_its_bound_is_refused_before_it_is_read() {
        let bytes = b"ada";
        for len in [65, 1 << 40, isize::MAX as usize, usize::MAX] {
            let Err(failure) = text("key", bytes.as_ptr().cast(), len, 64) else {
                panic!("a length of {len} taken");
            };
            assert_eq!(failure.status, tally_status::TALLY_STRING_TOO_LONG, "{len}");
            assert_eq!(failure.message, format!("key: is {len} bytes; at most 64"));
        }
        assert_eq!(text("key", bytes.as_ptr().cast(), 3, 64).ok(), Some("ada"));
        let Err(null) = text("key", std::ptr::null(), 1 << 40, 64) else {
            panic!("NULL taken");
        };
        assert_eq!(null.status, tally_status::TALLY_NULL_POINTER);
    }
}
