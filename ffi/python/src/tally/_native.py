"""The one place that touches the shared library: finding it, and the C types and signatures.

Mirrors ``ffi/include/tally.h`` (the authority). Everything here is private: the rest of the
package calls ``lib`` with values already checked, and turns statuses into exceptions.

The library is looked for, in order, at:

1. ``$TALLY_LIBRARY`` (a path to the shared library itself);
2. ``$CARGO_TARGET_DIR/{release,debug}/`` and, walking up from this file to the repository,
   ``target/{release,debug}/``: a build from a clone of the repository needs no manual step;
3. the system loader (``ctypes.util.find_library("tally")``, e.g. an installed ``libtally``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

# The header's constants (tally.h); the wrapper checks against these before calling.
VERSION_MAJOR = 0
VERSION_MINOR = 1
MAX_BATCH = 4096
MAX_ID_BYTES = 128
MAX_NAME_BYTES = 64
MAX_DOCUMENT_BYTES = 1 << 20
NOW = 0
NAME_CAPACITY = 128
MAX_DECISION_LIMITS = 4
MAX_QUANTITIES = 7
#: The largest amount of one quantity (TALLY_MAX_QUANTITY); more is BadQuantityError.
MAX_QUANTITY = 1 << 40
NO_INDEX = 0xFFFF_FFFF
MAX_EVENTS_PER_CALL = 65536
MAX_CURSORS = 1024
#: The longest lease of a reservation, a day (TALLY_MAX_LEASE_MS).
MAX_LEASE_MS = 86_400_000

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

# Statuses the wrapper itself branches on (the full list lives in errors.py).
OK = 0
BUFFER_TOO_SMALL = 11

ENV_LIBRARY = "TALLY_LIBRARY"


class LibraryNotFound(ImportError):
    """The shared library could not be found or loaded."""


class Quantity(Structure):
    """``tally_quantity``."""

    _fields_ = [("unit", c_uint32), ("amount", c_uint64)]


class Request(Structure):
    """``tally_request``."""

    _fields_ = [
        ("key", c_char_p),
        ("key_len", c_size_t),
        ("resource", c_char_p),
        ("resource_len", c_size_t),
        ("quantities", POINTER(Quantity)),
        ("quantities_len", c_size_t),
        ("at_ms", c_uint64),
        ("request_id", c_char_p),
        ("request_id_len", c_size_t),
    ]


class LimitStatus(Structure):
    """``tally_limit_status``."""

    _fields_ = [
        ("limit_index", c_uint32),
        ("used", c_uint64),
        ("amount", c_uint64),
        ("remaining", c_uint64),
        ("reset_at_ms", c_uint64),
    ]


class Decision(Structure):
    """``tally_decision``: field for field, in the header's order."""

    _fields_ = [
        ("admitted", c_bool),
        ("replayed", c_bool),
        ("has_credits_balance", c_bool),
        ("charged_to", c_uint32),
        ("denial", c_uint32),
        ("limit_index", c_uint32),
        ("unit", c_uint32),
        ("limit_count", c_uint32),
        ("limit_amount", c_uint64),
        ("limit_used", c_uint64),
        ("remaining", c_uint64),
        ("reset_at_ms", c_uint64),
        ("retry_after_ms", c_uint64),
        ("retry_at_ms", c_uint64),
        ("at_ms", c_uint64),
        ("charged_micros", c_uint64),
        ("credits_balance_micros", c_uint64),
        ("credits_needed_micros", c_uint64),
        ("requested", c_uint64),
        ("maximum", c_uint64),
        ("limits", LimitStatus * MAX_DECISION_LIMITS),
        ("plan", c_char * NAME_CAPACITY),
        ("limit_name", c_char * NAME_CAPACITY),
        ("upgrade_plan", c_char * NAME_CAPACITY),
    ]


class LimitAdjusted(Structure):
    """``tally_limit_adjusted``."""

    _fields_ = [
        ("limit_index", c_uint32),
        ("moved", c_uint64),
        ("name", c_char * NAME_CAPACITY),
    ]


class Adjustment(Structure):
    """``tally_adjustment``."""

    _fields_ = [
        ("limit_count", c_uint32),
        ("limits", LimitAdjusted * MAX_DECISION_LIMITS),
    ]


class MemoryStats(Structure):
    """``tally_memory_stats``."""

    _fields_ = [
        ("keys", c_uint64),
        ("keys_with_usage", c_uint64),
        ("usage_bytes", c_uint64),
        ("table_bytes", c_uint64),
    ]


# Every struct of the header, by its C name (the layout test compares each with gcc's).
STRUCTS = {
    "tally_quantity": Quantity,
    "tally_request": Request,
    "tally_limit_status": LimitStatus,
    "tally_decision": Decision,
    "tally_limit_adjusted": LimitAdjusted,
    "tally_adjustment": Adjustment,
    "tally_memory_stats": MemoryStats,
}

# `const tally_engine *`: an opaque pointer, kept as an int-like c_void_p.
Engine = c_void_p
# `tally_submission *`: opaque, owned by the wrapper until completed or freed.
Submission = c_void_p
# `tally_options *`: opaque, made and freed around each open or verify.
Options = c_void_p
_status = c_uint32
_str = c_char_p  # (pointer, length) pairs: bytes objects passed with their length
_size_p = POINTER(c_size_t)
_u64_p = POINTER(c_uint64)
_text_out = [POINTER(c_char), c_size_t, _size_p]  # buf (written), buf_len, needed

# name: (restype, argtypes), for every function of the header.
SIGNATURES = {
    "tally_version": (c_char_p, []),
    "tally_status_name": (c_char_p, [c_uint32]),
    "tally_last_error": (_status, _text_out),
    "tally_batch_entry_error": (_status, [c_size_t, *_text_out]),
    "tally_engine_consume": (_status, [Engine, POINTER(Request), POINTER(Decision)]),
    "tally_engine_check": (_status, [Engine, POINTER(Request), POINTER(Decision)]),
    "tally_engine_consume_many": (
        _status,
        [Engine, POINTER(Request), c_size_t, POINTER(c_uint32), POINTER(Decision)],
    ),
    "tally_engine_submit": (_status, [Engine, POINTER(Request), POINTER(Submission)]),
    "tally_engine_submission_durable": (_status, [Engine, Submission, POINTER(c_bool)]),
    "tally_engine_complete": (_status, [Engine, Submission, POINTER(Decision)]),
    "tally_submission_free": (None, [Submission]),
    "tally_engine_reserve": (
        _status,
        [Engine, POINTER(Request), c_uint64, POINTER(Decision), _u64_p],
    ),
    "tally_engine_settle": (
        _status,
        [Engine, c_uint64, POINTER(Quantity), c_size_t, c_uint64, POINTER(Decision)],
    ),
    "tally_engine_void": (_status, [Engine, c_uint64, c_uint64]),
    "tally_engine_expire_reservations": (_status, [Engine, c_uint64, _u64_p]),
    "tally_engine_refund": (_status, [Engine, _str, c_size_t, c_uint64]),
    "tally_engine_adjust_usage": (
        _status,
        [
            Engine,
            _str,
            c_size_t,
            _str,
            c_size_t,
            POINTER(Quantity),
            c_size_t,
            c_uint64,
            c_uint32,
            c_uint64,
            POINTER(Adjustment),
        ],
    ),
    "tally_engine_open": (
        _status,
        [_str, c_size_t, c_uint32, _str, c_size_t, c_uint32, c_uint32, Options, POINTER(Engine)],
    ),
    "tally_engine_open_in_memory": (
        _status,
        [c_uint32, _str, c_size_t, Options, POINTER(Engine)],
    ),
    "tally_options_new": (_status, [POINTER(Options)]),
    "tally_options_free": (None, [Options]),
    "tally_options_set_max_keys": (_status, [Options, c_uint64]),
    "tally_options_set_max_teams": (_status, [Options, c_uint64]),
    "tally_options_set_max_users": (_status, [Options, c_uint64]),
    "tally_options_set_idempotency_capacity": (_status, [Options, c_uint64]),
    "tally_options_set_idempotency_horizon_ms": (_status, [Options, c_uint64]),
    "tally_options_set_max_open_reservations": (_status, [Options, c_uint64]),
    "tally_options_set_default_lease_ms": (_status, [Options, c_uint64]),
    "tally_options_set_max_policy_generations": (_status, [Options, c_uint64]),
    "tally_options_set_reclaim_idle_every_ms": (_status, [Options, c_uint64]),
    "tally_options_set_max_ahead_of_clock_ms": (_status, [Options, c_uint64]),
    "tally_options_set_manual_clock": (_status, [Options, c_uint64]),
    "tally_options_set_expire_leases_on_its_own": (_status, [Options, c_bool]),
    "tally_options_set_checkpoint_every_events": (_status, [Options, c_uint64]),
    "tally_options_set_retention_ms": (_status, [Options, c_uint64]),
    "tally_options_set_use_recorded": (_status, [Options, c_bool]),
    "tally_engine_close": (_status, [Engine]),
    "tally_engine_free": (None, [Engine]),
    "tally_engine_create_user": (_status, [Engine, _str, c_size_t, _str, c_size_t, c_uint64]),
    "tally_engine_create_team": (_status, [Engine, _str, c_size_t, c_uint64]),
    "tally_engine_add_member": (
        _status,
        [Engine, _str, c_size_t, _str, c_size_t, _str, c_size_t, c_uint64],
    ),
    "tally_engine_revoke_key": (
        _status,
        [Engine, _str, c_size_t, c_uint64, POINTER(c_bool)],
    ),
    "tally_engine_create_payg_key": (
        _status,
        [Engine, _str, c_size_t, _str, c_size_t, c_uint64],
    ),
    "tally_engine_assign_seat": (
        _status,
        [Engine, _str, c_size_t, _str, c_size_t, _str, c_size_t, c_uint64],
    ),
    "tally_engine_unassign_seat": (
        _status,
        [Engine, _str, c_size_t, _str, c_size_t, c_uint64],
    ),
    "tally_engine_top_up": (_status, [Engine, _str, c_size_t, c_uint64, c_uint64, _u64_p]),
    "tally_engine_withdraw_credits": (
        _status,
        [Engine, _str, c_size_t, c_uint64, c_uint64, _u64_p],
    ),
    "tally_engine_credits": (_status, [Engine, _str, c_size_t, _u64_p]),
    "tally_engine_swap_policy": (_status, [Engine, c_uint32, _str, c_size_t, c_uint64]),
    "tally_engine_usage": (_status, [Engine, _str, c_size_t, c_uint64, *_text_out]),
    "tally_engine_policy_json": (_status, [Engine, *_text_out]),
    "tally_engine_events_after": (_status, [Engine, c_uint64, c_uint32, *_text_out]),
    "tally_engine_cursor": (_status, [Engine, _str, c_size_t, _u64_p]),
    "tally_engine_save_cursor": (_status, [Engine, _str, c_size_t, c_uint64]),
    "tally_engine_delete_cursor": (_status, [Engine, _str, c_size_t, POINTER(c_bool)]),
    "tally_engine_cursors": (_status, [Engine, *_text_out]),
    "tally_engine_checkpoint": (_status, [Engine, _u64_p]),
    "tally_engine_sync": (_status, [Engine]),
    "tally_engine_compact": (_status, [Engine, c_uint64, _u64_p]),
    "tally_engine_memory_stats": (_status, [Engine, POINTER(MemoryStats)]),
    "tally_engine_health": (_status, [Engine, POINTER(c_bool), *_text_out]),
    "tally_engine_reclaim_idle": (_status, [Engine, c_uint64, _u64_p]),
    "tally_engine_set_clock": (_status, [Engine, c_uint64]),
    "tally_engine_clock": (_status, [Engine, _u64_p]),
    "tally_verify": (_status, [_str, c_size_t, Options, POINTER(c_bool), *_text_out]),
}


def _library_file_name() -> str:
    if sys.platform == "darwin":
        return "libtally.dylib"
    if sys.platform == "win32":
        return "tally.dll"
    return "libtally.so"


def _repository_target_dirs() -> list[Path]:
    """``target/`` of the repository this file sits in (ffi/python/src/tally/_native.py)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "ffi" / "include" / "tally.h").is_file():
            return [parent / "target"]
    return []


def candidate_paths() -> list[Path]:
    """Where the library may be, best first (not counting the system loader)."""
    override = os.environ.get(ENV_LIBRARY)
    if override:
        return [Path(override)]
    target_dirs: list[Path] = []
    cargo_target = os.environ.get("CARGO_TARGET_DIR")
    if cargo_target:
        target_dirs.append(Path(cargo_target))
    target_dirs.extend(_repository_target_dirs())
    name = _library_file_name()
    return [d / profile / name for d in target_dirs for profile in ("release", "debug")]


def _load() -> ctypes.CDLL:
    override = os.environ.get(ENV_LIBRARY)
    for path in candidate_paths():
        if path.is_file() or override:
            try:
                return ctypes.CDLL(str(path))
            except OSError as error:
                raise LibraryNotFound(f"cannot load the tally library {path}: {error}") from error
    system = ctypes.util.find_library("tally")
    if system is not None:
        return ctypes.CDLL(system)
    searched = ", ".join(str(p) for p in candidate_paths()) or "(no repository found)"
    raise LibraryNotFound(
        "cannot find the tally shared library: build it with `cargo build -p tally-ffi "
        f"--release` or set {ENV_LIBRARY}; searched {searched} and the system loader"
    )


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            function = getattr(library, name)
        except AttributeError:
            # An older build (functions were added within a version) or another libtally:
            # an ImportError, as for a library not found, not an AttributeError from import.
            raise LibraryNotFound(
                f"the tally library {library._name} has no {name}: it is older than this "
                f"package or not tally's (set {ENV_LIBRARY} to a matching build)"
            ) from None
        function.restype = restype
        function.argtypes = argtypes
    return library


def _check_version(library: ctypes.CDLL) -> str:
    version = str(library.tally_version().decode("utf-8"))
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) != (VERSION_MAJOR, VERSION_MINOR):
        raise LibraryNotFound(
            f"the tally library is version {version}; this package speaks "
            f"{VERSION_MAJOR}.{VERSION_MINOR}.x (set {ENV_LIBRARY} to a matching build)"
        )
    return version


lib = _declare(_load())
library_version = _check_version(lib)
library_path: str | None = getattr(lib, "_name", None)
