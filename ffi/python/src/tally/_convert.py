"""Checks and conversions from Python values to C arguments, done before any call.

ctypes silently wraps integers (``c_uint64(-1)`` is 2^64 - 1), accepts bools as integers and
truncates nothing it should: every integer that crosses the boundary goes through ``u64`` or
``u32`` here first, so a negative, a bool, a float or an oversized value raises in Python and
never reaches C."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, ItemsView, Mapping
from typing import Protocol

from . import _native, errors
from .enums import AdjustmentDirection, Unit

Text = str | bytes


class Quantities(Protocol):
    """A mapping of unit (a ``Unit`` or its name) to amount: ``{"requests": 1}``,
    ``{Unit.TOKENS: 900}`` or a mix. Typed by what is read of it, as ``Mapping`` is invariant
    in its key: a union of ``Mapping[str, int]`` and ``Mapping[Unit, int]`` took each kind
    of dict, but a literal mixing the two was inferred as ``dict[object, int]`` and refused.
    At run time it must be a ``Mapping``."""

    def __len__(self) -> int: ...

    def items(self) -> ItemsView[Unit | str, int]: ...


# A size query never needs more rounds than this unless a report grows on every call.
_MAX_TEXT_ATTEMPTS = 8
_FIRST_BUFFER_BYTES = 4096


def integer(name: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must not be negative (got {value})")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum} (got {value})")
    return value


def u64(name: str, value: object) -> int:
    return integer(name, value, _native.U64_MAX)


def u32(name: str, value: object) -> int:
    return integer(name, value, _native.U32_MAX)


def at_ms(value: int | None) -> int:
    """A timestamp argument: None is the engine's clock (TALLY_NOW). 0, which C would read as
    TALLY_NOW, is refused: to Python it is 1970-01-01T00:00:00Z (as Go refuses that time)."""
    if value is None:
        return _native.NOW
    milliseconds = u64("at_ms", value)
    if milliseconds == _native.NOW:
        raise errors.BadTimestampError(
            errors.BadTimestampError.status_code,
            "at_ms: 0 is 1970-01-01T00:00:00Z, not after it; pass None for the engine's clock",
        )
    return milliseconds


def lease_ms(value: int | None) -> int:
    """A reservation's lease: None is the ``default_lease_ms`` option (C's 0). 0 is refused, as
    C would read it as the default lease (10 minutes unless set), not as no lease at all; one
    past ``MAX_LEASE_MS`` is the library's to refuse (``InvalidArgumentError``)."""
    if value is None:
        return 0
    milliseconds = u64("lease_ms", value)
    if milliseconds == 0:
        raise ValueError(
            "lease_ms: 0 is no lease; pass None for the default_lease_ms option, else 1 to "
            f"{_native.MAX_LEASE_MS} (a day)"
        )
    return milliseconds


def direction(value: object) -> AdjustmentDirection:
    """A ``tally.AdjustmentDirection`` or its name (``"add"``, ``"remove"``, any case)."""
    if isinstance(value, AdjustmentDirection):
        return value
    if isinstance(value, str):
        try:
            return AdjustmentDirection[value.upper()]
        except KeyError:
            raise ValueError(f"direction must be 'add' or 'remove', not {value!r}") from None
    raise TypeError(
        f"direction must be a tally.AdjustmentDirection or its name, not {type(value).__name__}"
    )


def text(name: str, value: object) -> bytes:
    """A string argument as UTF-8 bytes. bytes pass as they are (the library checks UTF-8);
    emptiness, NUL bytes and length are the library's to check, each with its own status. A
    str holding a lone surrogate, which has no UTF-8, is passed as the bytes Python's
    ``surrogatepass`` gives it (``"\\ud800"`` -> ``b"\\xed\\xa0\\x80"``), which are no
    UTF-8 either: the library refuses it as it refuses any invalid UTF-8
    (``InvalidUtf8Error``), in ``consume_many`` for its entry alone, as the Go wrapper passes
    a string that is no UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogatepass")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"{name} must be a str or bytes, not {type(value).__name__}")


def text_problem(value: bytes, maximum: int) -> tuple[int, str] | None:
    """The status and detail the library answers for a string argument it refuses, in the
    order it checks (``ffi/src/checks.rs``), or None if it takes it. For what the library
    cannot say itself: which entry of a batch, and which of its strings, it refused."""
    if not value:
        return errors.EmptyStringError.status_code, "must not be empty"
    if len(value) > maximum:
        return errors.StringTooLongError.status_code, f"is {len(value)} bytes; at most {maximum}"
    nul = value.find(b"\0")
    if nul >= 0:
        return errors.NulInStringError.status_code, f"holds a NUL byte at offset {nul}"
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as error:
        return errors.InvalidUtf8Error.status_code, f"is not valid UTF-8 (at byte {error.start})"
    return None


def batch_entry_detail(
    index: int,
    status: int,
    key: bytes,
    resource: bytes,
    request_id: bytes | None,
    message: str,
) -> str:
    """The message of a ``consume_many`` entry the library refused with ``status``: the entry,
    and the string at fault if a string was, else ``message``, what the library said of the
    entry (``tally_batch_entry_error``), naming its field as a single call's error does."""
    strings = [("key", key, _native.MAX_ID_BYTES), ("resource", resource, _native.MAX_NAME_BYTES)]
    if request_id is not None:
        strings.append(("request_id", request_id, _native.MAX_ID_BYTES))
    for name, value, maximum in strings:
        problem = text_problem(value, maximum)
        if problem is not None:
            if problem[0] == status:
                return f"requests[{index}].{name}: {problem[1]}"
            break
    if not message:
        return f"requests[{index}]: refused"
    field, separator, _ = message.partition(":")
    if separator and field.isidentifier():
        return f"requests[{index}].{message}"
    return f"requests[{index}]: {message}"


def optional_text(name: str, value: object) -> tuple[bytes | None, int]:
    if value is None:
        return None, 0
    encoded = text(name, value)
    return encoded, len(encoded)


def quantities(name: str, value: object) -> ctypes.Array[_native.Quantity]:
    """A mapping of unit to amount as a C array (``{"requests": 1}``, ``{Unit.TOKENS: 900}``).

    Zero amounts, too many entries and a unit twice are the library's to refuse
    (TALLY_BAD_QUANTITY)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of unit to amount, not {type(value).__name__}")
    array = (_native.Quantity * len(value))()
    for index, (unit, amount) in enumerate(value.items()):
        try:
            array[index].unit = Unit.parse(unit)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}: {error}") from None
        array[index].amount = u64(f"{name}[{unit!r}]", amount)
    return array


def read_text(call: Callable[[ctypes.Array[ctypes.c_char] | None, int, object], int]) -> str:
    """Runs a size-query call (``buf, buf_len, &needed``) until its text fits, and decodes it."""
    needed = ctypes.c_size_t(0)
    buffer = ctypes.create_string_buffer(_FIRST_BUFFER_BYTES)
    for _ in range(_MAX_TEXT_ATTEMPTS):
        status = call(buffer, len(buffer), ctypes.byref(needed))
        if status == _native.OK:
            return buffer.value.decode("utf-8")
        if status != _native.BUFFER_TOO_SMALL:
            errors.check(status)
        # A report can grow between two calls: leave it some room.
        buffer = ctypes.create_string_buffer(needed.value + needed.value // 8)
    raise errors.BufferTooSmallError(
        _native.BUFFER_TOO_SMALL, f"the report kept growing over {_MAX_TEXT_ATTEMPTS} calls"
    )
