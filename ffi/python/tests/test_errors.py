"""Bad input: each gets its own exception, and Python values that would wrap or be
misread in C are refused before the call."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest

import tally
from conftest import UNBOUNDED, T, seated
from tally import errors

HEADER = Path(__file__).resolve().parents[2] / "include" / "tally.h"


@pytest.fixture
def key(engine):
    return seated(engine, "ada", "tp-ada-1", "Starter")


@pytest.mark.parametrize(
    "bad_key, error",
    [
        ("", tally.EmptyStringError),
        ("tp\x00ada", tally.NulInStringError),
        (b"\xff\xfe", tally.InvalidUtf8Error),
        ("tp\ud800ada", tally.InvalidUtf8Error),  # a lone surrogate has no UTF-8
        ("k" * 129, tally.StringTooLongError),
    ],
)
def test_each_bad_key_has_its_own_exception(engine, key, bad_key, error):
    with pytest.raises(error) as raised:
        engine.consume(bad_key, "m2.7", {"requests": 1}, at_ms=T)
    assert raised.value.status == error.status_code
    assert raised.value.name == tally.status_name(error.status_code)
    assert raised.value.message  # the library's detail, e.g. "key: must not be empty"
    assert isinstance(raised.value, ValueError)


def test_an_unknown_resource_is_an_error(engine, key):
    with pytest.raises(tally.UnknownResourceError, match="no-such-model"):
        engine.consume(key, "no-such-model", {"requests": 1}, at_ms=T)


def test_a_request_id_reused_with_other_quantities_conflicts(engine, key):
    engine.consume(key, "m2.7", {"requests": 1}, at_ms=T, request_id="req-1")
    with pytest.raises(tally.RequestIdConflictError):
        engine.consume(key, "m2.7", {"requests": 2}, at_ms=T, request_id="req-1")


@pytest.mark.parametrize(
    "quantities, error",
    [
        ({"requests": -1}, ValueError),  # would wrap to 2^64 - 1 in ctypes
        ({"requests": 2**64}, ValueError),  # would wrap to 0
        ({"requests": True}, TypeError),
        ({"requests": 1.0}, TypeError),
        ({"requests": "1"}, TypeError),
        ({"furlongs": 1}, ValueError),
        ({0: 1}, TypeError),  # a bare int is not a unit
        ([("requests", 1)], TypeError),
    ],
)
def test_python_values_that_c_would_misread_are_refused_before_the_call(
    engine, key, quantities, error
):
    with pytest.raises(error):
        engine.consume(key, "m2.7", quantities, at_ms=T)
    assert engine.usage(key, at_ms=T).limits[0].used == 0


@pytest.mark.parametrize(
    "quantities, error",
    [
        ({"requests": 0}, tally.BadQuantityError),
        ({"requests": 2**40 + 1}, tally.BadQuantityError),
        ({}, tally.BadQuantityError),
        ({"requests": 1, tally.Unit.REQUESTS: 1}, tally.BadQuantityError),
    ],
)
def test_quantities_the_library_refuses(engine, key, quantities, error):
    with pytest.raises(error):
        engine.consume(key, "m2.7", quantities, at_ms=T)


def test_bad_arguments_of_other_types(engine, key):
    with pytest.raises(ValueError):
        engine.consume(key, "m2.7", {"requests": 1}, at_ms=-5)
    with pytest.raises(TypeError):
        engine.consume(key, "m2.7", {"requests": 1}, at_ms=1.5)
    # bytes are taken too (the library checks their UTF-8): the message says so.
    with pytest.raises(TypeError, match=r"^key must be a str or bytes, not int$"):
        engine.consume(42, "m2.7", {"requests": 1})
    with pytest.raises(TypeError, match=r"^resource must be a str or bytes, not NoneType$"):
        engine.consume(key, None, {"requests": 1})
    with pytest.raises(ValueError):
        engine.top_up("@ada", -100, at_ms=T)
    with pytest.raises(TypeError):
        engine.top_up("@ada", False, at_ms=T)
    with pytest.raises(ValueError):
        engine.consume("\ud800", "m2.7", {"requests": 1})  # a lone surrogate has no UTF-8
    with pytest.raises(tally.BadTimestampError):
        engine.consume(key, "m2.7", {"requests": 1}, at_ms=4_102_444_800_000)  # 2100-01-01
    # 0 is 1970-01-01T00:00:00Z to Python but TALLY_NOW to C: refused (as Go refuses it),
    # not counted now; None is the engine's clock.
    with pytest.raises(tally.BadTimestampError, match="at_ms"):
        engine.consume(key, "m2.7", {"requests": 1}, at_ms=0)
    with pytest.raises(tally.BadTimestampError, match="at_ms"):
        engine.top_up("@ada", 1, at_ms=0)
    assert engine.usage(key).limits[0].used == 0  # nothing counted now either
    assert engine.credits("@ada") == 0
    with pytest.raises(TypeError):
        engine.swap_policy("plans.toml")  # ambiguous: Policy.file or Policy.toml?
    with pytest.raises(ValueError):
        tally.Engine.open("/nonexistent", durability="eventually", options=UNBOUNDED)


def test_a_settlement_that_is_no_mapping_is_refused_and_the_estimate_stays_held(engine):
    engine.create_user("jo", "tp-jo-1", at_ms=T)
    engine.top_up("@jo", 1_000_000, at_ms=T)
    held = 1_000_000 - 2_000 - 4_000
    reservation = engine.reserve("tp-jo-1", "m2.7", {"requests": 1, "tokens": 4_000}, at_ms=T)
    for not_quantities in (0, "", [], (), False):
        with pytest.raises(TypeError):
            engine.settle(reservation, not_quantities, at_ms=T + 1)
        assert engine.credits("@jo") == held
    assert engine.settle(reservation, {"requests": 1, "tokens": 1_500}, at_ms=T + 1).admitted
    assert engine.credits("@jo") == 1_000_000 - 2_000 - 1_500


def test_admin_errors(engine, key):
    with pytest.raises(tally.AlreadyExistsError):
        engine.create_user("ada", "tp-ada-2", at_ms=T)
    with pytest.raises(tally.UnknownTeamError):
        engine.top_up("no-team", 1, at_ms=T)
    with pytest.raises(tally.UnknownUserError):
        engine.create_payg_key("nobody", "pg-1", at_ms=T)
    with pytest.raises(tally.UnknownPlanError):
        engine.assign_seat("@ada", "ada", "Platinum", at_ms=T)
    with pytest.raises(tally.UnknownKeyError):
        engine.usage("no-such-key", at_ms=T)
    with pytest.raises(tally.UnknownReservationError):
        engine.void(12345, at_ms=T)
    with pytest.raises(tally.UnknownRequestError):
        engine.refund("never-used", at_ms=T)
    with pytest.raises(tally.InsufficientCreditsError):
        engine.withdraw_credits("@ada", 1, at_ms=T)
    with pytest.raises(tally.AmountOverflowError):
        engine.top_up("@ada", 2**64 - 1, at_ms=T)
        engine.top_up("@ada", 1, at_ms=T)
    with pytest.raises(tally.NotAMemberError):
        engine.create_team("acme", at_ms=T)
        engine.assign_seat("acme", "ada", "Plus", at_ms=T)
    with pytest.raises(tally.NotDurableError):
        engine.events_after(0)
    with pytest.raises(tally.PolicyInvalidError):
        engine.swap_policy(tally.Policy.toml("time_zone = 7"), at_ms=T)


def test_use_after_close_raises_closed_and_close_is_idempotent(key):
    engine = tally.Engine.in_memory(options=UNBOUNDED)
    engine.create_user("ada", "tp-ada-1", at_ms=T)
    engine.close()
    assert engine.closed
    engine.close()  # a second close does nothing
    with pytest.raises(tally.ClosedError):
        engine.consume("tp-ada-1", "m2.7", {"requests": 1}, at_ms=T)
    with pytest.raises(tally.ClosedError):
        engine.usage("tp-ada-1")
    with pytest.raises(tally.ClosedError):
        engine.create_team("acme")


def test_the_library_answers_a_second_close_with_closed():
    """What Engine.close hides: the C close is not idempotent, it answers TALLY_CLOSED."""
    from tally import _native

    engine = tally.Engine.in_memory(options=UNBOUNDED)
    assert _native.lib.tally_engine_close(engine._handle) == _native.OK
    assert _native.lib.tally_engine_close(engine._handle) == tally.ClosedError.status_code
    engine.close()


def test_with_closes_the_engine_and_the_finalizer_frees_it():
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        finalizer = engine._finalizer
        assert finalizer.alive
    assert engine.closed
    del engine
    import gc

    gc.collect()
    assert not finalizer.alive


def test_an_engine_cannot_be_built_from_nothing():
    with pytest.raises(TypeError):
        tally.Engine(None)  # type: ignore[arg-type]


def test_every_status_has_its_own_class_named_as_in_the_header():
    assert sorted(errors.ERRORS_BY_STATUS) == list(range(1, 37))
    assert len(set(errors.ERRORS_BY_STATUS.values())) == 36
    for status, cls in errors.ERRORS_BY_STATUS.items():
        assert issubclass(cls, tally.TallyError)
        assert cls.status_code == status
        assert getattr(tally, cls.__name__) is cls
        name = tally.status_name(status)
        assert name.startswith("TALLY_") and name != "TALLY_UNKNOWN_STATUS"
        error = errors.error_for(status, "detail")
        assert type(error) is cls and error.name == name and "detail" in str(error)
    assert tally.status_name(0) == "TALLY_OK"
    assert tally.status_name(37) == "TALLY_UNKNOWN_STATUS"
    assert type(errors.error_for(999, "")) is tally.TallyError


def test_the_last_error_is_per_thread_and_kept_after_a_failure(engine, key):
    with pytest.raises(tally.EmptyStringError):
        engine.consume("", "m2.7", {"requests": 1}, at_ms=T)
    assert "empty" in tally.last_error()


def test_bad_usage_corrections_raise_and_change_nothing(engine, key):
    engine.consume(key, "m2.7", {"requests": 10}, at_ms=T)

    def adjust(key=key, resource="m2.7", usage_at_ms=T, direction="add", at_ms=T):
        return engine.adjust_usage(
            key,
            resource,
            {"requests": 1},
            usage_at_ms=usage_at_ms,
            direction=direction,
            at_ms=at_ms,
        )

    with pytest.raises(tally.UnknownKeyError, match="no-such-key"):
        adjust(key="no-such-key")
    with pytest.raises(tally.UnknownResourceError):
        adjust(resource="no-such-model")
    with pytest.raises(ValueError, match="direction must be 'add' or 'remove'"):
        adjust(direction="subtract")  # refused before the call
    with pytest.raises(TypeError, match="direction"):
        adjust(direction=1)  # a bare int is not a direction
    with pytest.raises(tally.InvalidArgumentError, match="usage_at_ms"):
        adjust(usage_at_ms=T + 1, at_ms=T)  # after the correction's own time
    with pytest.raises(tally.BadTimestampError, match="usage_at_ms"):
        adjust(usage_at_ms=0)  # TALLY_NOW is not when usage happened
    with pytest.raises(tally.BadTimestampError, match="usage_at_ms"):
        adjust(usage_at_ms=4_102_444_800_000)  # 2100, past tally's time range
    with pytest.raises(ValueError, match="usage_at_ms"):
        adjust(usage_at_ms=-1)
    engine.create_user("bo", "tp-bo-1", at_ms=T)
    with pytest.raises(tally.InvalidArgumentError, match="no seat"):
        adjust(key="tp-bo-1")
    assert engine.usage(key, at_ms=T).limits[0].used == 10
    assert engine.memory_stats().keys_with_usage == 1


def test_a_settlements_bad_quantities_are_named_by_its_argument_actual(engine):
    seated(engine, "jo", "tp-jo-1", "Starter")
    reservation = engine.reserve("tp-jo-1", "m2.7", {"requests": 1}, at_ms=T)
    with pytest.raises(tally.BadQuantityError) as raised:
        engine.settle(reservation, {"requests": 0}, at_ms=T + 1)
    assert raised.value.message.startswith("actual: "), raised.value.message
    with pytest.raises(tally.BadQuantityError) as raised:
        engine.settle(reservation, {"requests": tally.MAX_QUANTITY + 1}, at_ms=T + 1)
    assert raised.value.message.startswith("actual: "), raised.value.message
    with pytest.raises(ValueError, match=r"^actual: unknown unit 'furlongs'"):
        engine.settle(reservation, {"furlongs": 1}, at_ms=T + 1)
    with pytest.raises(TypeError, match=r"^actual: a unit is"):
        engine.settle(reservation, {1: 1}, at_ms=T + 1)
    with pytest.raises(ValueError, match=r"^actual\['requests'\]"):
        engine.settle(reservation, {"requests": -1}, at_ms=T + 1)
    assert engine.settle(reservation, {"requests": 1}, at_ms=T + 1).admitted


def test_a_settle_after_the_lease_ended_is_expired_which_is_still_a_closed_reservation(engine):
    key = seated(engine, "ol", "tp-ol-1", "Starter")
    quantities = {"requests": 1, "tokens": 10}
    settled, voided, expired = (
        engine.reserve(key, "m2.7", quantities, at_ms=T, lease_ms=60_000) for _ in range(3)
    )
    engine.settle(settled, quantities, at_ms=T + 1)
    engine.void(voided, at_ms=T + 1)
    raised = []
    for reservation in (settled, voided, expired):
        with pytest.raises(tally.ReservationClosedError) as closed:
            engine.settle(reservation, {"requests": 1, "tokens": 5}, at_ms=T + 120_000)
        raised.append(type(closed.value))
    assert raised == [
        tally.ReservationClosedError,
        tally.ReservationClosedError,
        tally.ReservationExpiredError,
    ]
    with pytest.raises(tally.ReservationExpiredError) as again:
        engine.settle(expired, {"requests": 1}, at_ms=T + 120_000)
    assert again.value.status == tally.ReservationExpiredError.status_code == 36
    assert again.value.name == "TALLY_RESERVATION_EXPIRED"
    assert "expired" in again.value.message
    engine.void(expired, at_ms=T + 120_000)  # voiding an expired one is a no-op
    # Code that catches closed reservations keeps catching expired ones.
    assert issubclass(tally.ReservationExpiredError, tally.ReservationClosedError)
    assert errors.ReservationExpiredError is tally.ReservationExpiredError
    assert "ReservationExpiredError" in tally.__all__


def _header_statuses(text: str) -> dict[int, str]:
    """``{code: "TALLY_..."}`` of the header's ``enum tally_status``."""
    block = re.search(r"enum tally_status\b[^{]*\{(.*?)\};", text, re.S)
    assert block, "no enum tally_status in the header"
    return {
        int(code): name
        for name, code in re.findall(r"^\s*(TALLY_\w+) = (\d+),", block.group(1), re.M)
    }


def _status_table_problems(statuses: dict[int, str]) -> list[str]:
    """How ERRORS_BY_STATUS differs from the header's statuses (each class's docstring starts
    with the status it stands for)."""
    problems = []
    for code, name in sorted(statuses.items()):
        if code == 0:
            continue
        cls = errors.ERRORS_BY_STATUS.get(code)
        if cls is None:
            problems.append(f"{name} ({code}) has no exception class")
            continue
        if not re.match(rf"{name}\b", cls.__doc__ or ""):
            problems.append(f"{name} ({code}) maps to {cls.__name__}: {cls.__doc__!r}")
        if tally.status_name(code) != name:
            problems.append(
                f"{code} is {name} in the header, {tally.status_name(code)} in the library"
            )
    extra = set(errors.ERRORS_BY_STATUS) - set(statuses)
    problems += [
        f"{errors.ERRORS_BY_STATUS[code].__name__} ({code}) is no status" for code in extra
    ]
    return problems


def test_every_status_of_the_header_has_its_class_and_nothing_else_has_one():
    statuses = _header_statuses(HEADER.read_text())
    assert statuses[0] == "TALLY_OK"
    assert _status_table_problems(statuses) == []
    assert tally.status_name(max(statuses) + 1) == "TALLY_UNKNOWN_STATUS"


def test_the_status_check_catches_a_status_added_in_c_without_a_class():
    statuses = _header_statuses(HEADER.read_text())
    statuses[max(statuses) + 1] = "TALLY_SOMETHING_NEW"
    assert any("TALLY_SOMETHING_NEW" in problem for problem in _status_table_problems(statuses))


@pytest.mark.parametrize("cls", list(errors.ERRORS_BY_STATUS.values()))
def test_every_error_survives_pickling_and_copying(cls):
    # A process pool pickles what its workers raise; copy.copy rebuilds it the same way.
    error = cls(cls.status_code, "key: holds a NUL byte at offset 2")
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(again) is cls
        assert (again.status, again.name, again.message) == (
            error.status,
            error.name,
            error.message,
        )
        assert str(again) == str(error)


def test_a_lease_of_0_is_refused_not_taken_for_the_default_lease(engine, key):
    # C reads 0 as "the default_lease_ms option" (10 minutes); in Python that is None, and a
    # lease of 0 ms asked for explicitly must not hold the estimate for 10 minutes.
    with pytest.raises(ValueError, match="lease_ms"):
        engine.reserve(key, "m2.7", {"requests": 1}, at_ms=T, lease_ms=0)
    assert engine.usage(key, at_ms=T).open_reservations == 0
    assert engine.reserve(key, "m2.7", {"requests": 1}, at_ms=T, lease_ms=None).admitted
    assert engine.reserve(key, "m2.7", {"requests": 1}, at_ms=T, lease_ms=1).admitted


def test_a_batch_entrys_error_names_the_request_and_the_argument_at_fault(engine, key):
    # The wrapper names the entry and, for a string the library refused, the argument, with
    # the words the library uses for it alone.
    bad = [
        tally.Request("tp\x00ada", "m2.7", {"requests": 1}, at_ms=T),
        tally.Request(key, b"m2.\xff", {"requests": 1}, at_ms=T),
        tally.Request(key, "", {"requests": 1}, at_ms=T),
        tally.Request(key, "m2.7", {"requests": 1}, at_ms=T, request_id="r" * 129),
        tally.Request(key, "m2.7", {"requests": 1}, at_ms=T, request_id="r\x00"),
        # A str with a lone surrogate is no UTF-8 either: its entry alone is refused, as
        # invalid UTF-8 is (and as Go's consume_many refuses such a string's entry), not the
        # whole batch with a plain ValueError.
        tally.Request("tp\ud800", "m2.7", {"requests": 1}, at_ms=T),
        tally.Request(key, "m2.\udcff", {"requests": 1}, at_ms=T),
        tally.Request(key, "m2.7", {"requests": 1}, at_ms=T, request_id="r\udc80"),
    ]
    results = engine.consume_many([tally.Request(key, "m2.7", {"requests": 1}, at_ms=T), *bad])
    for index, field in [(6, "key"), (7, "resource"), (8, "request_id")]:
        result = results[index]
        assert isinstance(result, tally.InvalidUtf8Error), result
        assert result.message.startswith(f"requests[{index}].{field}: is not valid UTF-8")
    assert isinstance(results[0], tally.Decision) and results[0].admitted
    for index, (request, result) in enumerate(zip(bad, results[1:], strict=True), start=1):
        with pytest.raises(tally.TallyError) as alone:
            engine.check(
                request.key,
                request.resource,
                request.quantities,
                at_ms=request.at_ms,
                request_id=request.request_id,
            )
        assert type(result) is type(alone.value)
        assert result.message == f"requests[{index}].{alone.value.message}"
    unknown = engine.consume_many([tally.Request(key, "gpt-9", {"requests": 1}, at_ms=T)])[0]
    assert isinstance(unknown, tally.UnknownResourceError)
    assert unknown.message.startswith("requests[0]")


def test_a_batch_entry_the_engine_refuses_says_what_the_call_alone_says(engine, key):
    # Refused by the engine, not for a string (a zero quantity, a unit the model does not
    # meter, an unknown model): the library's own words for the entry
    # (tally_batch_entry_error), as the same request alone is refused with, naming the entry.
    bad = [
        tally.Request(key, "m2.7", {"requests": 0}, at_ms=T),
        tally.Request(key, "m2.7", {"requests": 1, "images": 1}, at_ms=T),
        tally.Request(key, "gpt-9", {"requests": 1}, at_ms=T),
    ]
    results = engine.consume_many([tally.Request(key, "m2.7", {"requests": 1}, at_ms=T), *bad])
    assert isinstance(results[0], tally.Decision) and results[0].admitted
    for index, (request, result) in enumerate(zip(bad, results[1:], strict=True), start=1):
        with pytest.raises(tally.TallyError) as alone:
            engine.check(request.key, request.resource, request.quantities, at_ms=request.at_ms)
        assert type(result) is type(alone.value), (index, result)
        field, separator, _ = alone.value.message.partition(":")
        named = "." if separator and field.isidentifier() else ": "
        assert result.message == f"requests[{index}]{named}{alone.value.message}", index
    assert "quantities" in results[1].message and "gpt-9" in results[3].message


def test_a_batch_refused_before_the_call_names_the_request_at_fault(engine, key):
    good = tally.Request(key, "m2.7", {"requests": 1}, at_ms=T)
    for bad, error, message in [
        (tally.Request(42, "m2.7", {"requests": 1}), TypeError, "requests[1].key must be a str"),
        (tally.Request(key, "m2.7", {"furlongs": 1}), ValueError, "requests[1].quantities: "),
        (tally.Request(key, "m2.7", {"requests": -1}), ValueError, "requests[1].quantities["),
        (tally.Request(key, "m2.7", {"requests": 1}, at_ms=0), tally.BadTimestampError, None),
    ]:
        with pytest.raises(error) as raised:
            engine.consume_many([good, bad])
        text = raised.value.message if message is None else str(raised.value)
        assert text.startswith(message or "requests[1].at_ms: "), text
    assert engine.usage(key, at_ms=T).limits[0].used == 0  # nothing of either batch ran
