"""The managed engine: a ``tally_engine`` handle with ``with`` support, an idempotent
``close()`` and a finalizer that frees it."""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from . import _convert, _native, errors
from . import options as _options
from ._convert import Quantities, Text
from .enums import AdjustmentDirection, Durability, PolicySource
from .options import Options
from .results import (
    Adjustment,
    Decision,
    Event,
    Health,
    MemoryStats,
    Reservation,
    Usage,
    VerifyReport,
)

_EMPTY_QUANTITIES = (_native.Quantity * 0)()


@dataclass(frozen=True)
class Policy:
    """Where a policy comes from: the shipped Token Plan, a file, a TOML/JSON document, or
    (``Engine.open`` only) the policy the database last ran with.

    ``Engine.open`` and ``swap_policy`` also take a path (``os.PathLike``) for a file and a
    dict for a JSON document; a bare ``str`` is refused as ambiguous."""

    source: PolicySource
    document: bytes | None = None

    @classmethod
    def default(cls) -> Policy:
        return cls(PolicySource.DEFAULT)

    @classmethod
    def file(cls, path: str | os.PathLike[str]) -> Policy:
        return cls(PolicySource.FILE, os.fsencode(path))

    @classmethod
    def toml(cls, document: str) -> Policy:
        return cls(PolicySource.TOML, _convert.text("policy", document))

    @classmethod
    def json(cls, document: str | Mapping[str, Any]) -> Policy:
        """A JSON document, as text or as a mapping. Every number of a policy is an integer
        (0 to 2^64 - 1): a mapping holding a float (``1.5``, ``20.0``, NaN, an infinity) or
        a larger integer raises ``PolicyInvalidError`` naming its field, as the library
        names a field it refuses."""
        if isinstance(document, Mapping):
            # allow_nan=False: json.dumps would write NaN and Infinity, which are no JSON;
            # `_plain` has refused every float already, naming its field.
            document = json.dumps(_plain(document), allow_nan=False)
        return cls(PolicySource.JSON, _convert.text("policy", document))

    @classmethod
    def stored(cls) -> Policy:
        """For ``Engine.open`` only: an existing database keeps the policy it last ran with
        (nothing is swapped in or logged); a new one starts with the shipped Token Plan. For
        tools that look at or correct a gateway's database without changing its policy (with
        ``Options(use_recorded=True)`` to keep the database's options too).
        ``Engine.in_memory`` and ``swap_policy`` have no stored policy and raise
        ``InvalidArgumentError``."""
        return cls(PolicySource.STORED)


def _plain(value: object, path: tuple[object, ...] = ()) -> object:
    """``value`` with every ``Mapping`` in it a ``dict``: json.dumps takes only dicts, and a
    policy is typed (and accepted) as any mapping, e.g. a read-only view. A number no policy
    field takes is refused here, at ``path``: a float (json.dumps writes NaN and Infinity,
    which the library's parser refuses as "expected value at line 1 column 4433", a place in
    a text the caller never wrote) or an integer past 2^64 - 1 (which it reads as a float)."""
    if isinstance(value, Mapping):
        return {key: _plain(item, (*path, key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, (*path, _Index(index))) for index, item in enumerate(value)]
    if isinstance(value, float):
        raise errors.PolicyInvalidError(
            errors.PolicyInvalidError.status_code,
            f"policy: {_field_path(path)}: {value!r} is not an integer (a policy's numbers "
            "are whole, 0 to 2^64 - 1)",
        )
    if isinstance(value, int) and not isinstance(value, bool) and value > _native.U64_MAX:
        raise errors.PolicyInvalidError(
            errors.PolicyInvalidError.status_code,
            f"policy: {_field_path(path)}: {value} is out of range (a policy's numbers are "
            "0 to 2^64 - 1)",
        )
    return value


class _Index(int):
    """A list's index in a field's path (``limits[0]``), told apart from a mapping's key."""


def _field_path(path: tuple[object, ...]) -> str:
    """A field's path as the library's policy errors write it: ``plans."Plus".limits[0].amount``
    (the names a person chose, under resources, meters and plans, quoted; the schema's own
    keys bare; ``.`` for the whole document)."""
    text = ""
    for depth, segment in enumerate(path):
        if isinstance(segment, _Index):
            text += f"[{int(segment)}]"
            continue
        if depth > 0:
            text += "."
        if depth == 1 and path[0] in ("resources", "meters", "plans"):
            text += json.dumps(str(segment), ensure_ascii=False)
        else:
            text += str(segment)
    return text or "."


PolicyLike = Union[Policy, "os.PathLike[str]", Mapping[str, Any], None]


def _policy(policy: PolicyLike) -> tuple[int, bytes | None, int]:
    if policy is None:
        policy = Policy.default()
    elif isinstance(policy, os.PathLike):
        policy = Policy.file(policy)
    elif isinstance(policy, Mapping):
        policy = Policy.json(policy)
    elif not isinstance(policy, Policy):
        raise TypeError(
            "policy must be a tally.Policy (Policy.file, Policy.toml, Policy.json), a path "
            f"or a dict, not {type(policy).__name__}"
        )
    document = policy.document
    # A public dataclass: a document built by hand (a str, the TOML itself) would otherwise
    # reach ctypes, which raises its own ArgumentError, and `len` would count characters.
    if document is not None and not isinstance(document, bytes):
        raise TypeError(
            "Policy.document must be bytes or None (Policy.toml, Policy.json and Policy.file "
            f"encode it), not {type(document).__name__}"
        )
    return int(policy.source), document, 0 if document is None else len(document)


def _durability(value: Durability | str) -> Durability:
    if isinstance(value, Durability):
        return value
    if isinstance(value, str):
        try:
            return Durability[value.upper()]
        except KeyError:
            raise ValueError(f"unknown durability {value!r}: sync, interval or none") from None
    raise TypeError(f"durability must be a tally.Durability, not {type(value).__name__}")


@dataclass(frozen=True)
class Request:
    """One request of ``consume_many`` (the arguments of ``consume``)."""

    key: Text
    resource: Text
    quantities: Quantities
    at_ms: int | None = None
    request_id: Text | None = None


def _request(
    key: object,
    resource: object,
    quantities: object,
    at_ms: int | None,
    request_id: object,
) -> _native.Request:
    """A ``tally_request`` whose pointers stay alive as long as the struct (ctypes keeps the
    bytes and the quantity array in the struct's ``_objects``)."""
    key_bytes = _convert.text("key", key)
    resource_bytes = _convert.text("resource", resource)
    array = _convert.quantities("quantities", quantities)
    request_id_bytes, request_id_len = _convert.optional_text("request_id", request_id)
    request = _native.Request()
    request.key = key_bytes
    request.key_len = len(key_bytes)
    request.resource = resource_bytes
    request.resource_len = len(resource_bytes)
    request.quantities = ctypes.cast(array, ctypes.POINTER(_native.Quantity))
    request.quantities_len = len(array)
    request.at_ms = _convert.at_ms(at_ms)
    request.request_id = request_id_bytes
    request.request_id_len = request_id_len
    # The cast pointer does not own the array: keep it with the struct.
    request._tally_quantities = array
    return request


def _entry_detail(index: int, status: int, request: Request) -> str:
    """The message of a refused ``consume_many`` entry (see ``_convert.batch_entry_detail``)."""
    request_id, _ = _convert.optional_text("request_id", request.request_id)
    return _convert.batch_entry_detail(
        index,
        status,
        _convert.text("key", request.key),
        _convert.text("resource", request.resource),
        request_id,
        errors.batch_entry_error(index),
    )


def _reservation_id(reservation: int | Reservation) -> int:
    if isinstance(reservation, Reservation):
        if reservation.id is None:
            raise ValueError("the reservation was denied: there is nothing to settle or void")
        return reservation.id
    return _convert.u64("reservation", reservation)


def _not_copied(handle: object) -> TypeError:
    """Engines and submissions are shared, not copied: a copy would hold the library's handle
    without the finalizer's hold on it, and use it once the original freed it."""
    name = type(handle).__name__
    return TypeError(f"a tally.{name} cannot be copied or pickled: share the {name} itself")


# Engines still open, closed (not freed) at interpreter exit: daemon threads may still be
# calling them then, and a closed handle answers ``ClosedError`` where a freed one would be
# freed memory. The process's exit takes the memory back.
_open_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_open_engines):
        engine._close_native()  # any error is dropped: the process is exiting


def _close_unclaimed(handle: ctypes.c_void_p) -> None:
    """Closes an engine the library opened for an ``open`` that then raised before returning
    it (a ``KeyboardInterrupt`` landing as the call returned): the caller has no ``Engine``
    to close, and the database would stay locked until the process exits. Not freed: an
    ``Engine`` made for it meanwhile would free it when collected; if none was, the handle's
    few bytes are left (a second close is harmless, a second free is not)."""
    if handle.value:
        _native.lib.tally_engine_close(handle)


# Passed by the methods that just got a handle from the library (`Engine.open`,
# `Engine.in_memory`, `Engine.submit`) to the constructors, which refuse any other caller.
_LIBRARY = object()

_FORKED = (
    "engine: this process was forked from the one that opened it; a forked copy has none of "
    "the engine's threads and shares its files (and counts apart from it): open the database "
    "again in this process"
)


def _abandon_engines_in_child() -> None:
    """After a fork, in the child: every engine the parent had open is the parent's. Its copy
    here has none of the engine's threads (a call would wait forever for a flush) and shares
    the parent's files (a close, a free or the close at exit would write into the database
    the parent has open), so it is never called, closed or freed here: calls raise
    ``ClosedError``, ``close()`` does nothing."""
    for engine in list(_open_engines):
        engine._finalizer.detach()
        engine._native_handle = None
        engine._closed = True
        # A close a parent's thread was in at the fork would hold the copied lock for ever.
        engine._close_lock = threading.Lock()
        engine._policy_lock = threading.Lock()
    _open_engines.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_engines_in_child)


class Engine:
    """A tally engine: in memory (``Engine.in_memory``) or on a database directory
    (``Engine.open``). Safe to share between threads; calls release the GIL.

    ``close()`` closes the engine (it waits for calls in flight; later calls raise
    ``ClosedError``) and may be called any number of times; the handle's memory is freed when
    the object is collected, so a thread racing a close can never touch freed memory.

    An engine belongs to the process that opened it: in a process forked from that one
    (``gunicorn --preload``, a fork-started ``multiprocessing`` pool) its calls raise
    ``ClosedError`` and ``close()`` does nothing; open the database in each process instead
    (one at a time: a database is open in one engine at once)."""

    def __init__(self, handle: ctypes.c_void_p, _made_by: object = None) -> None:
        """Use ``Engine.open`` or ``Engine.in_memory``."""
        # Only a handle the library just gave back: any other pointer, passed on to the
        # library, would crash the process rather than raise.
        if _made_by is not _LIBRARY or not isinstance(handle, ctypes.c_void_p) or not handle.value:
            raise TypeError("use Engine.open or Engine.in_memory to create an engine")
        # None in a process forked from the one that opened it (`_abandon_engines_in_child`).
        self._native_handle: ctypes.c_void_p | None = handle
        self._closed = False
        # Held by a close for its whole call: the library answers a close racing another at
        # once, and a second close must not return while the first is still flushing.
        self._close_lock = threading.Lock()
        # Policies `swap_policy` swapped in (`policy_version`); counted under its lock.
        self._policy_version = 0
        self._policy_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _native.lib.tally_engine_free, handle)
        # Freed when collected, never at interpreter exit (`_close_open_engines` closes it).
        self._finalizer.atexit = False
        _open_engines.add(self)

    @property
    def _handle(self) -> ctypes.c_void_p:
        """The handle to pass the library; ``ClosedError`` in a forked child."""
        handle = self._native_handle
        if handle is None:
            raise errors.ClosedError(errors.ClosedError.status_code, _FORKED)
        return handle

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        policy: PolicyLike = None,
        *,
        durability: Durability | str = Durability.SYNC,
        interval_ms: int = 100,
        options: Options | None = None,
    ) -> Engine:
        """Opens (or creates) the database in directory ``path``. ``policy`` (``None``: the
        shipped Token Plan) is swapped in if an existing database has another, unless it is
        ``Policy.stored()``. ``interval_ms`` (1..=60,000) is read only for
        ``Durability.INTERVAL``. ``options`` (``tally.Options``; ``None``: the defaults) are the
        engine's and the database's; a value out of range raises ``InvalidArgumentError`` naming
        it, and nothing is created or changed."""
        # bytes as os.fsencode gives them (verify and Policy.file take them too); anything
        # else (None, a number) is refused here, naming the argument.
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"path must be a str, bytes or a path, not {type(path).__name__}")
        path_bytes = os.fsencode(path)
        source, document, document_len = _policy(policy)
        mode = _durability(durability)
        # Read only for INTERVAL, as documented (and as Go's Options read it): another mode
        # with a stray value opens all the same.
        interval = _convert.u32("interval_ms", interval_ms) if mode == Durability.INTERVAL else 0
        handle = ctypes.c_void_p()
        try:
            with _options.native(options) as native_options:
                errors.check(
                    _native.lib.tally_engine_open(
                        path_bytes,
                        len(path_bytes),
                        source,
                        document,
                        document_len,
                        int(mode),
                        interval,
                        native_options,
                        ctypes.byref(handle),
                    )
                )
            return cls(handle, _LIBRARY)
        except BaseException:
            _close_unclaimed(handle)
            raise

    @classmethod
    def in_memory(cls, policy: PolicyLike = None, *, options: Options | None = None) -> Engine:
        """An engine that keeps everything in memory (tests, simulations). ``options`` as for
        ``open`` (``checkpoint_every_events`` and ``retention_ms`` are not used)."""
        source, document, document_len = _policy(policy)
        handle = ctypes.c_void_p()
        try:
            with _options.native(options) as native_options:
                errors.check(
                    _native.lib.tally_engine_open_in_memory(
                        source, document, document_len, native_options, ctypes.byref(handle)
                    )
                )
            return cls(handle, _LIBRARY)
        except BaseException:
            _close_unclaimed(handle)
            raise

    def close(self) -> None:
        """Closes the engine (checkpoint, flush, release the database lock). Idempotent: a
        second close does nothing, once the first has returned (one racing another returns only
        when the database is closed).

        Raises a storage error if the final flush failed; the engine is closed even then."""
        errors.check(self._close_native())

    def _close_native(self) -> int:
        """Closes the handle (the first time); the status, TALLY_OK if it was closed already.
        The last error, if any, is this thread's."""
        with self._close_lock:
            self._closed = True
            if self._native_handle is None:
                return _native.OK  # a forked copy: the parent's to close
            status: int = _native.lib.tally_engine_close(self._native_handle)
        return _native.OK if status == errors.ClosedError.status_code else status

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __copy__(self) -> Engine:
        raise _not_copied(self)

    def __deepcopy__(self, memo: object) -> Engine:
        raise _not_copied(self)

    def __reduce__(self) -> str:
        raise _not_copied(self)

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._native_handle is None:
            return "<tally.Engine of the process this one was forked from>"
        state = "closed" if self._closed else "open"
        return f"<tally.Engine {state} at {self._native_handle.value:#x}>"

    # ---- admission -------------------------------------------------------------------------

    def consume(
        self,
        key: Text,
        resource: Text,
        quantities: Quantities,
        *,
        at_ms: int | None = None,
        request_id: Text | None = None,
    ) -> Decision:
        """Decides the request and, if admitted, counts it (all of it or nothing).

        A denial is a ``Decision`` with ``admitted`` False, not an exception. A ``request_id``
        seen again within the horizon answers its first decision (``replayed``) and counts
        nothing, unless that was a denial for want of a valid key (``UNKNOWN_KEY``,
        ``KEY_REVOKED``), which is not remembered: the id is decided anew, and denied so even
        where a new id would be refused (stamped before the horizon, the table full)."""
        request = _request(key, resource, quantities, at_ms, request_id)
        out = _native.Decision()
        errors.check(
            _native.lib.tally_engine_consume(self._handle, ctypes.byref(request), ctypes.byref(out))
        )
        return Decision.from_native(out)

    def check(
        self,
        key: Text,
        resource: Text,
        quantities: Quantities,
        *,
        at_ms: int | None = None,
        request_id: Text | None = None,
    ) -> Decision:
        """The decision ``consume`` would make now, counting nothing. A request id already used
        answers its first decision (``replayed``) once that decision is durable, as a repeated
        ``consume`` waits; a new one ``consume`` would refuse is refused alike."""
        request = _request(key, resource, quantities, at_ms, request_id)
        out = _native.Decision()
        errors.check(
            _native.lib.tally_engine_check(self._handle, ctypes.byref(request), ctypes.byref(out))
        )
        return Decision.from_native(out)

    def submit(
        self,
        key: Text,
        resource: Text,
        quantities: Quantities,
        *,
        at_ms: int | None = None,
        request_id: Text | None = None,
    ) -> Submission:
        """Decides the request as ``consume`` does and applies it at once, without waiting for
        its event to be durable: one thread keeps many requests in flight, and with
        ``Durability.SYNC`` one fsync makes them all durable. The decision stands only once
        ``Submission.complete()`` returns it. Bad input raises here, changing nothing."""
        request = _request(key, resource, quantities, at_ms, request_id)
        handle = ctypes.c_void_p()
        owned = [True]
        try:
            errors.check(
                _native.lib.tally_engine_submit(
                    self._handle, ctypes.byref(request), ctypes.byref(handle)
                )
            )
            return Submission(self, handle, _LIBRARY, _owned=owned)
        except BaseException:
            # Made, but raising instead of returning it (a KeyboardInterrupt landing as the
            # call returned): freed, as a submission collected uncompleted is, rather than
            # leaked; a Submission made for it meanwhile shares `owned`, so one frees it.
            if handle.value:
                _free_submission(handle, owned)
            raise

    def consume_many(self, requests: Sequence[Request]) -> list[Decision | errors.TallyError]:
        """Consumes up to ``MAX_BATCH`` requests with one wait for durability. Each entry is
        its decision, or the error (not raised) that kept that request from being decided,
        whose message names the entry (``requests[3]``) and, for a refused string, the
        argument (``requests[3].key: holds a NUL byte at offset 2``). A crash before the call
        returns may keep the events of the batch's first requests and lose the rest's: retry
        the batch with the same request ids and each request counts once (the kept ones
        return their decisions); without ids, a retry counts the kept ones again."""
        if not 1 <= len(requests) <= _native.MAX_BATCH:
            raise ValueError(f"consume_many takes 1..={_native.MAX_BATCH} requests")
        natives = (_native.Request * len(requests))()
        keep_alive = []
        for index, item in enumerate(requests):
            if not isinstance(item, Request):
                raise TypeError(f"requests[{index}] must be a tally.Request")
            try:
                native = _request(
                    item.key, item.resource, item.quantities, item.at_ms, item.request_id
                )
            except errors.TallyError as error:  # at_ms 0: named as the library names fields
                raise type(error)(error.status, f"requests[{index}].{error.message}") from None
            except (TypeError, ValueError) as error:
                raise type(error)(f"requests[{index}].{error}") from None
            keep_alive.append(native)  # the array copies the pointers, not what they own
            natives[index] = native
        statuses = (ctypes.c_uint32 * len(requests))()
        decisions = (_native.Decision * len(requests))()
        errors.check(
            _native.lib.tally_engine_consume_many(
                self._handle, natives, len(requests), statuses, decisions
            )
        )
        del keep_alive
        return [
            Decision.from_native(decisions[index])
            if status == _native.OK
            else errors.error_for(status, _entry_detail(index, status, requests[index]))
            for index, status in enumerate(statuses)
        ]

    # ---- reservations ----------------------------------------------------------------------

    def reserve(
        self,
        key: Text,
        resource: Text,
        estimate: Quantities,
        *,
        at_ms: int | None = None,
        lease_ms: int | None = None,
    ) -> Reservation:
        """Holds an estimate until settled, voided or the lease ends: ``lease_ms`` 1 to
        86,400,000 (a day), or None for the ``default_lease_ms`` option (10 minutes unless
        set). 0 raises ``ValueError`` (C's 0 is the default lease, not none)."""
        lease = _convert.lease_ms(lease_ms)
        request = _request(key, resource, estimate, at_ms, None)
        out = _native.Decision()
        reservation = ctypes.c_uint64(0)
        try:
            errors.check(
                _native.lib.tally_engine_reserve(
                    self._handle,
                    ctypes.byref(request),
                    lease,
                    ctypes.byref(out),
                    ctypes.byref(reservation),
                )
            )
            return Reservation(Decision.from_native(out), reservation.value or None)
        except BaseException:
            # Made, but raising instead of returning it (a KeyboardInterrupt landing as the
            # call returned): no one could settle or void it, and it would hold its estimate
            # until its lease ended.
            if reservation.value:
                _native.lib.tally_engine_void(self._handle, reservation.value, request.at_ms)
            raise

    def settle(
        self,
        reservation: int | Reservation,
        actual: Quantities | None = None,
        *,
        at_ms: int | None = None,
    ) -> Decision:
        """Charges what was actually used (None or {}: nothing). Not admitted: the part beyond
        the estimate did not fit and the reservation stays open."""
        reservation_id = _reservation_id(reservation)
        # Only None means "nothing": a falsy non-mapping (0, "", []) is refused, not settled.
        array = _EMPTY_QUANTITIES if actual is None else _convert.quantities("actual", actual)
        pointer = ctypes.cast(array, ctypes.POINTER(_native.Quantity)) if len(array) else None
        out = _native.Decision()
        errors.check(
            _native.lib.tally_engine_settle(
                self._handle,
                reservation_id,
                pointer,
                len(array),
                _convert.at_ms(at_ms),
                ctypes.byref(out),
            )
        )
        return Decision.from_native(out)

    def void(self, reservation: int | Reservation, *, at_ms: int | None = None) -> None:
        """Frees everything a reservation holds (again: no-op)."""
        reservation_id = _reservation_id(reservation)
        errors.check(
            _native.lib.tally_engine_void(self._handle, reservation_id, _convert.at_ms(at_ms))
        )

    def expire_reservations(self, *, at_ms: int | None = None) -> int:
        """Ends reservations whose lease ended; returns how many."""
        expired = ctypes.c_uint64(0)
        errors.check(
            _native.lib.tally_engine_expire_reservations(
                self._handle, _convert.at_ms(at_ms), ctypes.byref(expired)
            )
        )
        return expired.value

    def refund(self, request_id: Text, *, at_ms: int | None = None) -> None:
        """Refunds in full a request admitted under ``request_id``. Twice, or for an id whose
        request was denied, raises ``InvalidArgumentError``; for an id no request used within
        the horizon (after its request's timestamp, by the engine's clock, not ``at_ms``: past
        it the id is forgotten, the same whenever the table drops it and after a reopen),
        ``UnknownRequestError``."""
        encoded = _convert.text("request_id", request_id)
        errors.check(
            _native.lib.tally_engine_refund(
                self._handle, encoded, len(encoded), _convert.at_ms(at_ms)
            )
        )

    def adjust_usage(
        self,
        key: Text,
        resource: Text,
        quantities: Quantities,
        *,
        usage_at_ms: int,
        direction: AdjustmentDirection | str,
        at_ms: int | None = None,
    ) -> Adjustment:
        """Corrects the usage the key's plan counted at ``usage_at_ms`` (when it happened, not
        after ``at_ms``): ``"add"`` counts usage that was missed (whatever the limit),
        ``"remove"`` gives back usage counted by mistake where its window still counts it. An
        addition every window has moved past moves 0 and logs nothing. A key without a seat, or
        a resource its plan does not limit, raises ``InvalidArgumentError``; units none of the
        plan's limits on the resource count raise ``BadQuantityError``."""
        key_bytes = _convert.text("key", key)
        resource_bytes = _convert.text("resource", resource)
        array = _convert.quantities("quantities", quantities)
        pointer = ctypes.cast(array, ctypes.POINTER(_native.Quantity)) if len(array) else None
        usage_at = _convert.u64("usage_at_ms", usage_at_ms)
        way = _convert.direction(direction)
        out = _native.Adjustment()
        errors.check(
            _native.lib.tally_engine_adjust_usage(
                self._handle,
                key_bytes,
                len(key_bytes),
                resource_bytes,
                len(resource_bytes),
                pointer,
                len(array),
                usage_at,
                int(way),
                _convert.at_ms(at_ms),
                ctypes.byref(out),
            )
        )
        return Adjustment.from_native(out)

    # ---- teams, keys, seats, credits -------------------------------------------------------

    def create_user(self, user: Text, key: Text, *, at_ms: int | None = None) -> None:
        """Creates a user, their Default Team ``"@" + user`` and their plan key in it."""
        user_bytes, key_bytes = _convert.text("user", user), _convert.text("key", key)
        errors.check(
            _native.lib.tally_engine_create_user(
                self._handle,
                user_bytes,
                len(user_bytes),
                key_bytes,
                len(key_bytes),
                _convert.at_ms(at_ms),
            )
        )

    def create_team(self, team: Text, *, at_ms: int | None = None) -> None:
        team_bytes = _convert.text("team", team)
        errors.check(
            _native.lib.tally_engine_create_team(
                self._handle, team_bytes, len(team_bytes), _convert.at_ms(at_ms)
            )
        )

    def add_member(self, team: Text, user: Text, key: Text, *, at_ms: int | None = None) -> None:
        """Adds an existing user to a team with their plan key for that team. A member whose
        key was revoked is given ``key`` in its place, with no seat; otherwise a member
        already is ``AlreadyExistsError``."""
        team_bytes = _convert.text("team", team)
        user_bytes, key_bytes = _convert.text("user", user), _convert.text("key", key)
        errors.check(
            _native.lib.tally_engine_add_member(
                self._handle,
                team_bytes,
                len(team_bytes),
                user_bytes,
                len(user_bytes),
                key_bytes,
                len(key_bytes),
                _convert.at_ms(at_ms),
            )
        )

    def revoke_key(self, key: Text, *, at_ms: int | None = None) -> bool:
        """Revokes ``key`` (a plan or pay-as-you-go key, say one that leaked); returns whether
        it was revoked now (``False``: it already was, and nothing was logged). Every later
        request on it is denied ``Denial.KEY_REVOKED``, whatever its seat or its team's
        credits; a repeat of a request id admitted before still returns its first decision.
        What it used still counts, its open reservations still settle or void (a settle's
        extra beyond the hold is denied) and its requests still refund. Revoking is for good:
        give the member a new key with ``add_member``. An unknown key is ``UnknownKeyError``."""
        key_bytes = _convert.text("key", key)
        revoked = ctypes.c_bool(False)
        errors.check(
            _native.lib.tally_engine_revoke_key(
                self._handle,
                key_bytes,
                len(key_bytes),
                _convert.at_ms(at_ms),
                ctypes.byref(revoked),
            )
        )
        return revoked.value

    def create_payg_key(self, user: Text, key: Text, *, at_ms: int | None = None) -> None:
        """Issues a pay-as-you-go key to an existing user."""
        user_bytes, key_bytes = _convert.text("user", user), _convert.text("key", key)
        errors.check(
            _native.lib.tally_engine_create_payg_key(
                self._handle,
                user_bytes,
                len(user_bytes),
                key_bytes,
                len(key_bytes),
                _convert.at_ms(at_ms),
            )
        )

    def assign_seat(self, team: Text, user: Text, plan: Text, *, at_ms: int | None = None) -> None:
        """Seats the user's key in the team on ``plan`` (or changes its plan at once)."""
        team_bytes, user_bytes = _convert.text("team", team), _convert.text("user", user)
        plan_bytes = _convert.text("plan", plan)
        errors.check(
            _native.lib.tally_engine_assign_seat(
                self._handle,
                team_bytes,
                len(team_bytes),
                user_bytes,
                len(user_bytes),
                plan_bytes,
                len(plan_bytes),
                _convert.at_ms(at_ms),
            )
        )

    def unassign_seat(self, team: Text, user: Text, *, at_ms: int | None = None) -> None:
        team_bytes, user_bytes = _convert.text("team", team), _convert.text("user", user)
        errors.check(
            _native.lib.tally_engine_unassign_seat(
                self._handle,
                team_bytes,
                len(team_bytes),
                user_bytes,
                len(user_bytes),
                _convert.at_ms(at_ms),
            )
        )

    def top_up(self, team: Text, micros: int, *, at_ms: int | None = None) -> int:
        """Adds micro-credits to the team's balance; returns the new balance."""
        team_bytes = _convert.text("team", team)
        balance = ctypes.c_uint64(0)
        errors.check(
            _native.lib.tally_engine_top_up(
                self._handle,
                team_bytes,
                len(team_bytes),
                _convert.u64("micros", micros),
                _convert.at_ms(at_ms),
                ctypes.byref(balance),
            )
        )
        return balance.value

    def withdraw_credits(self, team: Text, micros: int, *, at_ms: int | None = None) -> int:
        """Takes micro-credits from the team's balance; returns the new balance."""
        team_bytes = _convert.text("team", team)
        balance = ctypes.c_uint64(0)
        errors.check(
            _native.lib.tally_engine_withdraw_credits(
                self._handle,
                team_bytes,
                len(team_bytes),
                _convert.u64("micros", micros),
                _convert.at_ms(at_ms),
                ctypes.byref(balance),
            )
        )
        return balance.value

    def credits(self, team: Text) -> int:
        """The team's credits balance in micro-credits."""
        team_bytes = _convert.text("team", team)
        balance = ctypes.c_uint64(0)
        errors.check(
            _native.lib.tally_engine_credits(
                self._handle, team_bytes, len(team_bytes), ctypes.byref(balance)
            )
        )
        return balance.value

    # ---- policy and reports ----------------------------------------------------------------

    def swap_policy(self, policy: PolicyLike, *, at_ms: int | None = None) -> None:
        """Replaces the policy at run time; usage carries over. ``None`` is the shipped
        Token Plan (as for ``Engine.open``).

        Refused, changing nothing: a swap that drops a plan someone is seated on
        (``InvalidArgumentError``), and one whose usage could not carry over as it means
        (``PolicyInvalidError`` naming the field): a meter kept by name that counts another
        unit or another weighted sum (other terms or weights; a usage bar may change its
        prices), a time zone changed under a calendar window that carries over (or the week's
        first day, ``week_start``, under a weekly one), or a plan's limit moved to another
        window (``rolling:5h`` to ``rolling:6h``, ``daily`` to ``weekly``: its count so far
        would be dropped).
        """
        source, document, document_len = _policy(policy)
        errors.check(
            _native.lib.tally_engine_swap_policy(
                self._handle, source, document, document_len, _convert.at_ms(at_ms)
            )
        )
        with self._policy_lock:
            self._policy_version += 1

    @property
    def policy_version(self) -> int:
        """Changes each time ``swap_policy`` swaps in a policy (0 after opening): a cache of
        what the policy says (``policy()``), as the ASGI middleware keeps each resource's units,
        is current while the version it was read at is. A swap refused leaves it as it was."""
        return self._policy_version

    def policy(self) -> dict[str, Any]:
        """The current policy document, parsed from its JSON."""
        document = _convert.read_text(
            lambda buf, size, needed: _native.lib.tally_engine_policy_json(
                self._handle, buf, size, needed
            )
        )
        parsed: dict[str, Any] = json.loads(document)
        return parsed

    def usage(self, key: Text, *, at_ms: int | None = None) -> Usage:
        """The key's usage report: its plan's limits (used, remaining, reset) and credits."""
        key_bytes = _convert.text("key", key)
        when = _convert.at_ms(at_ms)
        document = _convert.read_text(
            lambda buf, size, needed: _native.lib.tally_engine_usage(
                self._handle, key_bytes, len(key_bytes), when, buf, size, needed
            )
        )
        return Usage.from_json(json.loads(document))

    # ---- memory ----------------------------------------------------------------------------

    def memory_stats(self) -> MemoryStats:
        """What the engine's keys hold in memory."""
        out = _native.MemoryStats()
        errors.check(_native.lib.tally_engine_memory_stats(self._handle, ctypes.byref(out)))
        return MemoryStats(
            keys=out.keys,
            keys_with_usage=out.keys_with_usage,
            usage_bytes=out.usage_bytes,
            table_bytes=out.table_bytes,
        )

    def health(self) -> Health:
        """What has gone wrong where no call's answer reports it: the log's failure (its
        writer may fail after the calls returned, and only the next call that logs raises),
        the last periodic checkpoint's and the last automatic compaction's. For a monitor."""
        healthy = ctypes.c_bool(False)
        document = _convert.read_text(
            lambda buf, size, needed: _native.lib.tally_engine_health(
                self._handle, ctypes.byref(healthy), buf, size, needed
            )
        )
        found = json.loads(document)
        return Health(
            log_failure=found.get("log_failure"),
            checkpoint_failure=found.get("checkpoint_failure"),
            compaction_failure=found.get("compaction_failure"),
        )

    def reclaim_idle(self, *, at_ms: int | None = None) -> int:
        """Frees the window memory of keys with nothing counted as of ``at_ms`` and no open
        reservation; returns how many. Their next request starts from empty windows, as if
        kept. The engine also does this on its own, a bounded step at a time, in a round every
        10 minutes of its clock; call this to free memory at once."""
        reclaimed = ctypes.c_uint64(0)
        errors.check(
            _native.lib.tally_engine_reclaim_idle(
                self._handle, _convert.at_ms(at_ms), ctypes.byref(reclaimed)
            )
        )
        return reclaimed.value

    # ---- the clock ---------------------------------------------------------------------------

    def clock_ms(self) -> int:
        """The time the engine's clock reads now, in milliseconds since the Unix epoch (UTC):
        the system clock's, or the engine's own (``Options.manual_clock_ms``)."""
        now = ctypes.c_uint64(0)
        errors.check(_native.lib.tally_engine_clock(self._handle, ctypes.byref(now)))
        return now.value

    def set_clock(self, now_ms: int) -> None:
        """Moves the engine's own clock (``Options.manual_clock_ms``) to ``now_ms``, forward or
        back: from then on it is the time of a call without ``at_ms``, and "now" for the bound
        ahead of the clock, how long request ids are remembered, and when leases end and idle
        keys are freed. Usage already counted stays counted: a clock moved back releases no
        quota early. Raises ``InvalidArgumentError`` for an engine on the system clock, or a
        ``now_ms`` of 0 or at or after 2100, leaving the clock where it was."""
        errors.check(
            _native.lib.tally_engine_set_clock(self._handle, _convert.u64("now_ms", now_ms))
        )

    # ---- the event log (durable engines) ---------------------------------------------------

    def events_after(self, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        """Up to ``limit`` events after sequence number ``after_seq``, oldest first.

        After compaction, 0 reads from the oldest event kept; an older ``after_seq`` raises
        ``InvalidArgumentError`` naming the events compacted away (a cursor that fell behind the
        retention is told, never moved past them silently). An ``after_seq`` past the last event
        raises ``InvalidArgumentError`` too (a reader polling from there would skip the events
        that later take those numbers).
        """
        after = _convert.u64("after_seq", after_seq)
        count = _convert.u32("limit", limit)
        document = _convert.read_text(
            lambda buf, size, needed: _native.lib.tally_engine_events_after(
                self._handle, after, count, buf, size, needed
            )
        )
        return [
            Event(
                seq=item["seq"],
                at_ms=item["at_ms"],
                kind=item["kind"],
                body=item["body"],
                team=item.get("team"),
            )
            for item in json.loads(document)
        ]

    def cursor(self, name: Text) -> int:
        """The named export cursor's sequence number (0 if never saved)."""
        name_bytes = _convert.text("name", name)
        seq = ctypes.c_uint64(0)
        errors.check(
            _native.lib.tally_engine_cursor(
                self._handle, name_bytes, len(name_bytes), ctypes.byref(seq)
            )
        )
        return seq.value

    def save_cursor(self, name: Text, seq: int) -> None:
        """Saves the named export cursor at ``seq`` (at most the last event's). A name not
        saved yet raises ``CapacityExceededError`` once 1,024 are (``TALLY_MAX_CURSORS``); an
        existing one always saves."""
        name_bytes = _convert.text("name", name)
        errors.check(
            _native.lib.tally_engine_save_cursor(
                self._handle, name_bytes, len(name_bytes), _convert.u64("seq", seq)
            )
        )

    def cursors(self) -> dict[str, int]:
        """Every saved export cursor's sequence number, by name (in the names' byte order): the
        readers holding the database's places under ``TALLY_MAX_CURSORS``, and how far each
        has read."""
        document = _convert.read_text(
            lambda buf, size, needed: _native.lib.tally_engine_cursors(
                self._handle, buf, size, needed
            )
        )
        return {item["name"]: item["after"] for item in json.loads(document)}

    def delete_cursor(self, name: Text) -> bool:
        """Deletes the named export cursor (a reader that is gone for good), freeing its place
        under ``TALLY_MAX_CURSORS``; returns whether it was saved. Reading it afterwards
        gives 0."""
        name_bytes = _convert.text("name", name)
        existed = ctypes.c_bool(False)
        errors.check(
            _native.lib.tally_engine_delete_cursor(
                self._handle, name_bytes, len(name_bytes), ctypes.byref(existed)
            )
        )
        return existed.value

    def checkpoint(self) -> int:
        """Takes a checkpoint; returns the sequence number it covers."""
        seq = ctypes.c_uint64(0)
        errors.check(_native.lib.tally_engine_checkpoint(self._handle, ctypes.byref(seq)))
        return seq.value

    def sync(self) -> None:
        """Makes everything logged so far durable."""
        errors.check(_native.lib.tally_engine_sync(self._handle))

    def compact(self, *, at_ms: int | None = None) -> int:
        """Checkpoints and drops the events stamped more than the policy's longest window plus
        the ``retention_ms`` option (7 days by default) before ``at_ms`` and logged at least
        ``retention_ms`` before it on the engine's clock (a request delivered late stays that
        long after it was logged), before the snapshot before the latest; returns how many
        were removed."""
        removed = ctypes.c_uint64(0)
        errors.check(
            _native.lib.tally_engine_compact(
                self._handle, _convert.at_ms(at_ms), ctypes.byref(removed)
            )
        )
        return removed.value


class Submission:
    """A consume made by ``Engine.submit``: decided and applied, acknowledged by ``complete()``.

    ``complete()`` waits (the GIL released) until the request's event is durable and returns
    its ``Decision``; if the event never becomes durable, it raises the log's error and the
    request's effect is given back. Complete each submission once, from any thread. One that
    is collected uncompleted keeps its effect, unacknowledged (its memory is freed then).
    Keeps its engine alive.

    An interrupt (``KeyboardInterrupt``) in ``complete()`` before the library had the
    submission leaves ``completed`` False: call ``complete()`` again. Once ``completed`` is
    True the library completed it, and an interrupt that came after lost only its answer
    (with a request id, ``check`` with that id answers it once durable)."""

    def __init__(
        self,
        engine: Engine,
        handle: ctypes.c_void_p,
        _made_by: object = None,
        *,
        _owned: list[bool] | None = None,
    ) -> None:
        """Use ``Engine.submit``."""
        # As `Engine.__init__`: only a handle `Engine.submit` just got from the library.
        if _made_by is not _LIBRARY or not isinstance(engine, Engine):
            raise TypeError("use Engine.submit to make a submission")
        if not isinstance(handle, ctypes.c_void_p) or not handle.value:
            raise TypeError("use Engine.submit to make a submission")
        self._engine = engine
        self._handle = handle
        # `durable` and `complete` from two threads: the library frees the submission in
        # `complete`, so `durable` must not be inside the library then, nor start after.
        self._lock = threading.Lock()
        # Whether the submission is still this object's (not yet passed to the library's
        # complete), shared with the finalizer: one list store gives it up right before the
        # call, with nothing between them that could raise (see `complete`).
        self._owned = [True] if _owned is None else _owned
        self._finalizer = weakref.finalize(self, _free_submission, handle, self._owned)
        # Not at interpreter exit, where a daemon thread may still be completing it.
        self._finalizer.atexit = False

    @property
    def completed(self) -> bool:
        """Whether ``complete()`` passed it to the library (whatever that returned)."""
        return not self._owned[0]

    @property
    def durable(self) -> bool:
        """Whether ``complete()`` would return at once (the event is durable, or the log
        failed and it would raise)."""
        out = ctypes.c_bool()
        # Before the lock, as in `complete`: in a process forked while a thread here held it
        # (completing), the lock is held for ever, and this raises ClosedError instead.
        engine = self._engine._handle
        with self._lock:
            if not self._owned[0]:
                raise ValueError("the submission was completed already")
            status = _native.lib.tally_engine_submission_durable(
                engine, self._handle, ctypes.byref(out)
            )
        errors.check(status)
        return bool(out.value)

    def complete(self) -> Decision:
        """Waits until the event is durable as the durability mode says (fsynced with
        ``Durability.SYNC``; with the others it returns at once) and returns the decision
        (``replayed`` for a repeated request id). Raises the log's error (e.g.
        ``LogFailedError``) if it never will be: then the request was not admitted. After the
        engine's ``close()`` succeeded (it flushed the event), returns the decision too; after
        one that failed, ``ClosedError``. Once only: a second call raises ``ValueError``."""
        # Everything the call needs is made first: a KeyboardInterrupt (or any error) until
        # the submission is given up leaves it this object's, to complete again or free.
        out = _native.Decision()
        decision_out = ctypes.byref(out)
        engine = self._engine._handle
        handle = self._handle
        complete = _native.lib.tally_engine_complete
        # Of two threads completing at once, one gets it; a `durable` inside the library is
        # waited for, and one called meanwhile waits and finds it completed.
        with self._lock:
            if not self._owned[0]:
                raise ValueError("the submission was completed already")
            # Given up and passed on with no Python code run or signal handled in between (a
            # list store, then the foreign call): an interrupt comes before or after both.
            self._owned[0] = False
            # The library frees the submission whatever this returns.
            status = complete(engine, handle, decision_out)
        errors.check(status)
        return Decision.from_native(out)

    def __copy__(self) -> Submission:
        raise _not_copied(self)

    def __deepcopy__(self, memo: object) -> Submission:
        raise _not_copied(self)

    def __reduce__(self) -> str:
        raise _not_copied(self)

    def __repr__(self) -> str:
        state = "completed" if self.completed else "in flight"
        return f"<tally.Submission {state}>"


def _free_submission(handle: ctypes.c_void_p, owned: list[bool]) -> None:
    """The finalizer of a ``Submission``: frees it unless it was passed to the library's
    complete, which freed it."""
    if owned[0]:
        owned[0] = False
        _native.lib.tally_submission_free(handle)


def verify(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes], *, options: Options | None = None
) -> VerifyReport:
    """Checks a database directory that no engine has open. The log is replayed with the
    options the database was opened with, as the snapshot holds what their bounds allow (keys,
    request ids, open reservations) and a replay under smaller ones may refuse or not match it
    (the policy generations kept are compared on those the snapshot kept): ``None`` (the
    usual choice) reads those the database recorded when its owner last opened it (the
    defaults if it recorded none); a ``tally.Options`` is used as given (``Options()``: the
    defaults; ``use_recorded=True``: the recorded ones where there are any)."""
    path_bytes = os.fsencode(path)
    sound = ctypes.c_bool(False)
    with _options.native(options) as native_options:
        document = _convert.read_text(
            lambda buf, size, needed: _native.lib.tally_verify(
                path_bytes, len(path_bytes), native_options, ctypes.byref(sound), buf, size, needed
            )
        )
    return VerifyReport.from_json(bool(sound.value), json.loads(document))


def version() -> str:
    """The loaded library's version (``tally_version``)."""
    return _native.library_version
