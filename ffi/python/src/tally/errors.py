"""One exception class per ``tally_status`` (ffi/include/tally.h), under a common ``TallyError``.

Every error carries the status code, its name as spelled in the header, and the calling
thread's last-error message from the library. Errors about the caller's input are also
``ValueError``s, and errors naming something that does not exist are also ``LookupError``s, so
code that does not care about tally's taxonomy can catch the usual Python bases.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from . import _native


class TallyError(Exception):
    """A call the library could not carry out; it changed nothing (unless documented)."""

    #: The ``tally_status`` code of this class (the base class has none of its own).
    status_code: int = -1

    def __init__(self, status: int, message: str = "") -> None:
        self.status = status
        self.name = status_name(status)
        self.message = message
        super().__init__(f"{self.name} ({status}): {message}" if message else self.name)

    def __reduce__(self) -> tuple[type[TallyError], tuple[int, str]]:
        # BaseException rebuilds an exception from its `args`, here the formatted text, which
        # is no status: pickling (a process pool's worker raising) and copying would fail.
        return type(self), (self.status, self.message)


class NullPointerError(TallyError, ValueError):
    """TALLY_NULL_POINTER: a required pointer was NULL."""

    status_code = 1


class InvalidUtf8Error(TallyError, ValueError):
    """TALLY_INVALID_UTF8: a string argument was not valid UTF-8."""

    status_code = 2


class EmptyStringError(TallyError, ValueError):
    """TALLY_EMPTY_STRING: a string that must not be empty was empty."""

    status_code = 3


class StringTooLongError(TallyError, ValueError):
    """TALLY_STRING_TOO_LONG: a string was longer than its bound."""

    status_code = 4


class NulInStringError(TallyError, ValueError):
    """TALLY_NUL_IN_STRING: a string contained a NUL character."""

    status_code = 5


class InvalidArgumentError(TallyError, ValueError):
    """TALLY_INVALID_ARGUMENT: an argument was malformed (the message names it)."""

    status_code = 6


class BadEnumError(TallyError, ValueError):
    """TALLY_BAD_ENUM: an enum value was out of range."""

    status_code = 7


class BadQuantityError(TallyError, ValueError):
    """TALLY_BAD_QUANTITY: a quantity was 0 or above 2^40, a unit twice, none or too many; or
    the quantities do not fit the resource (a unit it does not meter, one it requires missing)
    or, for ``adjust_usage``, no limit of the key's plan counts their units."""

    status_code = 8


class AmountOverflowError(TallyError, ValueError):
    """TALLY_OVERFLOW: an amount, balance, count or weighted sum would pass the most it can
    hold: 64 bits, or a smaller bound the message names (a team's credits, a window's count)."""

    status_code = 9


class BadTimestampError(TallyError, ValueError):
    """TALLY_BAD_TIMESTAMP: a timestamp at or after 2100-01-01 or further ahead of the engine's
    clock than ``max_ahead_of_clock_ms`` allows, or a request id's request stamped longer ago
    than the idempotency horizon."""

    status_code = 10


class BufferTooSmallError(TallyError):
    """TALLY_BUFFER_TOO_SMALL: the wrapper retries these itself; seen only if a report keeps
    growing."""

    status_code = 11


class ClosedError(TallyError):
    """TALLY_CLOSED: the engine was closed."""

    status_code = 12


class PoisonedError(TallyError):
    """TALLY_POISONED: an earlier call panicked; only close works now."""

    status_code = 13


class PanicError(TallyError):
    """TALLY_PANIC: this call hit a bug inside the library; the engine is now poisoned."""

    status_code = 14


class UnknownKeyError(TallyError, LookupError):
    """TALLY_UNKNOWN_KEY (admin calls; consume and check deny an unknown key instead)."""

    status_code = 15


class UnknownTeamError(TallyError, LookupError):
    """TALLY_UNKNOWN_TEAM."""

    status_code = 16


class UnknownUserError(TallyError, LookupError):
    """TALLY_UNKNOWN_USER."""

    status_code = 17


class UnknownResourceError(TallyError, LookupError):
    """TALLY_UNKNOWN_RESOURCE: the policy has no such resource."""

    status_code = 18


class UnknownPlanError(TallyError, LookupError):
    """TALLY_UNKNOWN_PLAN."""

    status_code = 19


class UnknownReservationError(TallyError, LookupError):
    """TALLY_UNKNOWN_RESERVATION."""

    status_code = 20


class UnknownRequestError(TallyError, LookupError):
    """TALLY_UNKNOWN_REQUEST: no request used this id (within the horizon); a refund of one
    whose request was denied raises ``InvalidArgumentError``."""

    status_code = 21


class AlreadyExistsError(TallyError):
    """TALLY_ALREADY_EXISTS: the user, team, key or membership exists."""

    status_code = 22


class NotAMemberError(TallyError, LookupError):
    """TALLY_NOT_A_MEMBER."""

    status_code = 23


class RequestIdConflictError(TallyError):
    """TALLY_REQUEST_ID_CONFLICT: the id was used with another key, resource or quantities."""

    status_code = 24


class CapacityExceededError(TallyError):
    """TALLY_CAPACITY_EXCEEDED: a bounded table is full."""

    status_code = 25


class ReservationClosedError(TallyError):
    """TALLY_RESERVATION_CLOSED: already settled or voided; also the base of
    ``ReservationExpiredError``, so catching this catches any closed reservation."""

    status_code = 26


class InsufficientCreditsError(TallyError):
    """TALLY_INSUFFICIENT_CREDITS: a withdrawal asked for more than the team holds."""

    status_code = 27


class PolicyInvalidError(TallyError, ValueError):
    """TALLY_POLICY_INVALID: the policy is invalid (the message names the field)."""

    status_code = 28


class StorageError(TallyError):
    """TALLY_STORAGE: the database could not be read or written."""

    status_code = 29


class LogFailedError(TallyError):
    """TALLY_LOG_FAILED: the event log failed earlier; reopen the engine."""

    status_code = 30


class DatabaseLockedError(TallyError):
    """TALLY_DATABASE_LOCKED: the database is open in another engine."""

    status_code = 31


class DatabaseDamagedError(TallyError):
    """TALLY_DATABASE_DAMAGED."""

    status_code = 32


class DatabaseForeignError(TallyError):
    """TALLY_DATABASE_FOREIGN: the directory is not a tally database."""

    status_code = 33


class DatabaseNewerFormatError(TallyError):
    """TALLY_DATABASE_NEWER_FORMAT: written by a newer tally."""

    status_code = 34


class NotDurableError(TallyError):
    """TALLY_NOT_DURABLE: the call needs an event log; the engine is in memory."""

    status_code = 35


class ReservationExpiredError(ReservationClosedError):
    """TALLY_RESERVATION_EXPIRED: the reservation's lease ended before the settle (the engine
    expired it and gave its hold back; nothing was charged). A ``ReservationClosedError``
    too: the library answered TALLY_RESERVATION_CLOSED for it before this code existed."""

    status_code = 36


#: status code -> exception class, for every status but TALLY_OK.
ERRORS_BY_STATUS: dict[int, type[TallyError]] = {
    cls.status_code: cls
    for cls in [
        NullPointerError,
        InvalidUtf8Error,
        EmptyStringError,
        StringTooLongError,
        NulInStringError,
        InvalidArgumentError,
        BadEnumError,
        BadQuantityError,
        AmountOverflowError,
        BadTimestampError,
        BufferTooSmallError,
        ClosedError,
        PoisonedError,
        PanicError,
        UnknownKeyError,
        UnknownTeamError,
        UnknownUserError,
        UnknownResourceError,
        UnknownPlanError,
        UnknownReservationError,
        UnknownRequestError,
        AlreadyExistsError,
        NotAMemberError,
        RequestIdConflictError,
        CapacityExceededError,
        ReservationClosedError,
        InsufficientCreditsError,
        PolicyInvalidError,
        StorageError,
        LogFailedError,
        DatabaseLockedError,
        DatabaseDamagedError,
        DatabaseForeignError,
        DatabaseNewerFormatError,
        NotDurableError,
        ReservationExpiredError,
    ]
}


def status_name(status: int) -> str:
    """The status's name as spelled in the header (``"TALLY_CLOSED"``)."""
    if not 0 <= status <= _native.U32_MAX:
        return "TALLY_UNKNOWN_STATUS"
    name: bytes = _native.lib.tally_status_name(status)
    return name.decode("utf-8")


def last_error() -> str:
    """The calling thread's last error message from the library ("" if none)."""
    return _read_message(_native.lib.tally_last_error)


def batch_entry_error(index: int) -> str:
    """What the library said was wrong with entry ``index`` of this thread's last
    ``consume_many`` ("" if it was decided)."""
    return _read_message(lambda *out: _native.lib.tally_batch_entry_error(index, *out))


def _read_message(read: Callable[..., int]) -> str:
    """A message read with a size query (``tally_last_error``'s buffer protocol)."""
    needed = ctypes.c_size_t(0)
    buffer: ctypes.Array[ctypes.c_char] | None = None
    for _ in range(4):  # the message cannot change between our calls on this thread
        size = len(buffer) if buffer is not None else 0
        status = read(buffer, size, ctypes.byref(needed))
        if status == _native.OK and buffer is not None:
            return buffer.value.decode("utf-8", errors="replace")
        if status != _native.BUFFER_TOO_SMALL:
            return ""
        buffer = ctypes.create_string_buffer(needed.value)
    return ""


def error_for(status: int, message: str) -> TallyError:
    """The exception for a status (the base ``TallyError`` for a code this package does not
    know, from a newer library)."""
    cls = ERRORS_BY_STATUS.get(status, TallyError)
    return cls(status, message)


def check(status: int) -> None:
    """Raises the exception for a failed call's status, with this thread's last error."""
    if status != _native.OK:
        raise error_for(status, last_error())
