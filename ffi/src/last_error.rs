//! The calling thread's last error message: what went wrong in the most recent call on this
//! thread that returned a status other than `TALLY_OK` (a successful call leaves it as it was,
//! so the hot path never touches it).

use std::cell::RefCell;
use std::ffi::c_char;

use crate::checks::{write_text, OutBuffer};
use crate::panic::boundary;
use crate::status::tally_status;

/// The longest message kept; longer ones are cut at a character boundary.
const MAX_MESSAGE_BYTES: usize = 4_096;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
    /// The messages of the entries the calling thread's last `tally_engine_consume_many`
    /// refused, by index (in order; the entries decided are not listed).
    static ENTRY_ERRORS: RefCell<Vec<(usize, String)>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn set(message: String) {
    let message = bounded(message);
    // `try_with`: a call from a thread-exit destructor (a `pthread_key` one, a C++
    // `thread_local`'s) may come after this thread's storage is gone; `with` would panic
    // there, outside any `catch_unwind`, and abort the process. The message is then lost,
    // the status still returned.
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = message);
}

/// Replaces the calling thread's entry messages (`tally_batch_entry_error`) with `entries`:
/// `(index, message)` of each entry a batch refused, in index order. Each message is bounded
/// as the last error is.
pub(crate) fn set_entries(entries: Vec<(usize, String)>) {
    let entries = entries
        .into_iter()
        .map(|(index, message)| (index, bounded(message)))
        .collect();
    let _ = ENTRY_ERRORS.try_with(|kept| *kept.borrow_mut() = entries);
}

/// `message` as kept: its NULs written out as `\0`, then cut to `MAX_MESSAGE_BYTES`.
fn bounded(message: String) -> String {
    // A NUL would cut the C string short; none of ours contain one, but a key echoed in a
    // message could. Escaped before the cut, so the bound holds for the text as kept (each
    // NUL becomes two bytes), and the cut never splits an escape.
    let mut message = message.replace('\0', "\\0");
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        // Not between the backslash of an escape and its `0`.
        if message[..end].ends_with('\\') && message[end..].starts_with('0') {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

/// Copies the calling thread's last error message into `buf` as a NUL-terminated UTF-8
/// string ("" if no call on this thread has failed yet).
///
/// Size query: `*needed` is set to the message's length plus one (for the NUL). If `buf` is
/// NULL or `buf_len < *needed`, nothing is copied and `TALLY_BUFFER_TOO_SMALL` is returned;
/// call again with a buffer of `*needed` bytes. `needed` must not be NULL
/// (`TALLY_NULL_POINTER`). This function never changes the last error itself, not even when
/// it fails, so the size query does not clobber the message it asks about.
#[no_mangle]
pub extern "C" fn tally_last_error(
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    let saved = LAST_ERROR
        .try_with(|last| last.borrow().clone())
        .unwrap_or_default();
    let status = boundary(|| {
        let out = OutBuffer::new(buf, buf_len, needed)?;
        write_text(&saved, out)
    });
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = saved);
    status
}

/// Copies the message of entry `index` of the calling thread's last
/// `tally_engine_consume_many` into `buf` as a NUL-terminated UTF-8 string: what was wrong
/// with the entry, naming the field, as `tally_last_error` says it of a single call (for
/// example `quantities: ...` or `key: must not be empty`). `""` if that entry was decided
/// (its status `TALLY_OK`), if `index` is past the batch, or if no batch ran on this thread
/// (a batch call that itself failed, returning other than `TALLY_OK`, leaves no entry
/// messages: `tally_last_error` says why). The messages stay until the thread's next
/// `tally_engine_consume_many`.
///
/// Buffer and `needed` as `tally_last_error`'s (size query, `TALLY_BUFFER_TOO_SMALL`,
/// `needed` not NULL); it never changes the entry messages or the last error.
#[no_mangle]
pub extern "C" fn tally_batch_entry_error(
    index: usize,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> tally_status {
    let message = ENTRY_ERRORS
        .try_with(|kept| {
            let kept = kept.borrow();
            kept.binary_search_by_key(&index, |(entry, _)| *entry)
                .map(|found| kept[found].1.clone())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let saved = LAST_ERROR
        .try_with(|last| last.borrow().clone())
        .unwrap_or_default();
    let status = boundary(|| {
        let out = OutBuffer::new(buf, buf_len, needed)?;
        write_text(&message, out)
    });
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = saved);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> String {
        LAST_ERROR.with(|last| last.borrow().clone())
    }

    /// The bound holds for the message as kept, after its NULs are written out as `\0` (two
    /// bytes each): a message of NULs, or one ending in a NUL at the bound, stays within it
    /// and is cut where a whole escape ends.
    #[test]
    fn a_message_with_nul_bytes_is_kept_within_the_bound() {
        set("\0".repeat(MAX_MESSAGE_BYTES));
        let kept = stored();
        assert!(kept.len() <= MAX_MESSAGE_BYTES, "{} bytes kept", kept.len());
        assert_eq!(kept, "\\0".repeat(MAX_MESSAGE_BYTES / 2));
        set(format!("{}\0", "a".repeat(MAX_MESSAGE_BYTES - 1)));
        let kept = stored();
        assert!(kept.len() <= MAX_MESSAGE_BYTES, "{} bytes kept", kept.len());
        assert!(!kept.ends_with('\\'), "an escape cut in half");
        set(format!("key \"a\0b\": {}", "x".repeat(10)));
        assert_eq!(stored(), "key \"a\\0b\": xxxxxxxxxx");
    }
}
