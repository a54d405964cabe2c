"""The seed's Token Plan scenarios, through Python, on the shipped default policy."""

from __future__ import annotations

import json
import re

import pytest

import tally
from conftest import HOUR_MS, T, seated
from tally import ChargedTo, Denial, Unit


def test_a_starter_key_gets_exactly_its_5_hour_request_quota_then_a_retry_after(engine):
    key = seated(engine, "ada", "tp-ada-1", "Starter")
    admitted = sum(
        engine.consume(key, "m2.7", {"requests": 1}, at_ms=T + i).admitted for i in range(1600)
    )
    assert admitted == 1500

    denied = engine.consume(key, "m2.7", {"requests": 1}, at_ms=T + 2000)
    assert not denied.admitted
    assert denied.denial is Denial.QUOTA_EXHAUSTED
    assert denied.charged_to is ChargedTo.NONE
    assert denied.plan == "Starter"
    assert denied.limit_name is not None and "rolling:5h" in denied.limit_name
    assert denied.limit_amount == 1500 and denied.remaining == 0
    assert 0 < denied.retry_after_ms <= 5 * HOUR_MS + 5 * 60_000
    assert denied.retry_at_ms == T + 2000 + denied.retry_after_ms
    assert denied.retry_after_seconds * 1000 >= denied.retry_after_ms
    assert denied.upgrade_plan is not None  # a bigger plan would have room

    # The window rolls: once the first requests age out, the key is admitted again.
    later = engine.consume(key, "m2.7", {"requests": 1}, at_ms=denied.retry_at_ms)
    assert later.admitted and later.charged_to is ChargedTo.PLAN_QUOTA


def test_a_plus_key_has_three_times_the_starter_quota(engine):
    key = seated(engine, "bo", "tp-bo-1", "Plus")
    decision = engine.check(key, "m2.7", {"requests": 4500}, at_ms=T)
    assert decision.admitted
    assert not engine.check(key, "m2.7", {"requests": 4501}, at_ms=T).admitted


def test_a_daily_quota_is_used_up_and_resets_at_local_midnight(engine):
    key = seated(engine, "cy", "tp-cy-1", "Plus")
    assert engine.consume(key, "speech-2.8", {"characters": 4000}, at_ms=T).admitted
    denied = engine.consume(key, "speech-2.8", {Unit.CHARACTERS: 1}, at_ms=T)
    assert denied.denial is Denial.QUOTA_EXHAUSTED
    # T is 01:46:40 on 2030-03-18 in Asia/Shanghai: the next midnight is 16:00Z on the 18th.
    assert denied.reset_at_ms == 1_900_080_000_000
    assert denied.retry_at_ms == 1_900_080_000_000
    assert engine.consume(key, "speech-2.8", {"characters": 1}, at_ms=1_900_080_000_000).admitted


def test_credits_cover_usage_once_the_plans_quota_is_exhausted(engine):
    key = seated(engine, "di", "tp-di-1", "Plus")
    assert engine.consume(key, "speech-2.8", {"characters": 4000}, at_ms=T).admitted
    short = engine.consume(key, "speech-2.8", {"characters": 5}, at_ms=T)
    assert short.denial is Denial.QUOTA_EXHAUSTED
    assert short.credits_needed_micros == 500  # 100 micros per character

    assert engine.top_up("@di", 1_000, at_ms=T) == 1_000
    paid = engine.consume(key, "speech-2.8", {"characters": 5}, at_ms=T)
    assert paid.admitted and paid.charged_to is ChargedTo.CREDITS
    assert paid.charged_micros == 500
    assert paid.credits_balance_micros == 500
    assert engine.credits("@di") == 500
    usage = engine.usage(key, at_ms=T)
    assert usage.credits_charged_micros == 500 and usage.credits_balance_micros == 500


def test_a_key_exists_before_any_resources_and_is_denied_no_resources(engine):
    engine.create_user("ed", "tp-ed-1", at_ms=T)
    decision = engine.consume("tp-ed-1", "m2.7", {"requests": 1}, at_ms=T)
    assert not decision.admitted
    assert decision.denial is Denial.NO_RESOURCES
    assert decision.credits_needed_micros == 2_000
    # Credits alone make the same key usable.
    engine.top_up("@ed", 2_000, at_ms=T)
    assert (
        engine.consume("tp-ed-1", "m2.7", {"requests": 1}, at_ms=T).charged_to is ChargedTo.CREDITS
    )


def test_a_resource_the_plan_does_not_cover_is_denied_without_credits(engine):
    key = seated(engine, "fa", "tp-fa-1", "Starter")
    decision = engine.consume(key, "image-01", {"images": 1}, at_ms=T)
    assert decision.denial is Denial.RESOURCE_NOT_COVERED
    assert decision.upgrade_plan is not None


def test_a_pay_as_you_go_key_is_admitted_and_billed_but_never_touches_quota(engine):
    engine.create_user("gu", "tp-gu-1", at_ms=T)
    engine.create_payg_key("gu", "pg-gu-1", at_ms=T)
    decision = engine.consume("pg-gu-1", "m2.7", {"requests": 1, "tokens": 100}, at_ms=T)
    assert decision.admitted and decision.charged_to is ChargedTo.PAY_AS_YOU_GO
    assert decision.charged_micros == 2_000 + 100
    usage = engine.usage("pg-gu-1", at_ms=T)
    assert usage.kind == "pay_as_you_go" and usage.pay_as_you_go_micros == 2_100
    assert engine.credits("@gu") == 0


def test_a_music_request_is_capped_at_one_song_of_five_minutes(engine):
    key = seated(engine, "ha", "tp-ha-1", "Starter")
    ok = engine.consume(key, "music-2.6", {Unit.SONGS: 1, Unit.SECONDS: 280}, at_ms=T)
    assert ok.admitted
    over = engine.consume(key, "music-2.6", {"songs": 1, "seconds": 301}, at_ms=T)
    assert over.denial is Denial.OVER_REQUEST_MAXIMUM
    assert over.unit is Unit.SECONDS and over.requested == 301 and over.maximum == 300


def test_an_unknown_key_is_a_denial_not_an_error(engine):
    assert engine.consume("nobody", "m2.7", {"requests": 1}, at_ms=T).denial is Denial.UNKNOWN_KEY


def test_a_repeated_request_id_is_replayed_and_counted_once(engine):
    key = seated(engine, "io", "tp-io-1", "Starter")
    first = engine.consume(key, "m2.7", {"requests": 1}, at_ms=T, request_id="req-1")
    again = engine.consume(key, "m2.7", {"requests": 1}, at_ms=T, request_id="req-1")
    assert first.admitted and not first.replayed
    assert again.admitted and again.replayed
    assert engine.usage(key, at_ms=T).limits[0].used == 1
    engine.refund("req-1", at_ms=T)
    assert engine.usage(key, at_ms=T).limits[0].used == 0


def test_a_reservation_holds_an_estimate_and_settles_the_actual_tokens(engine):
    engine.create_user("jo", "tp-jo-1", at_ms=T)
    engine.top_up("@jo", 1_000_000, at_ms=T)
    reservation = engine.reserve("tp-jo-1", "m2.7", {"requests": 1, "tokens": 4_000}, at_ms=T)
    assert reservation.admitted and reservation.id
    assert engine.credits("@jo") == 1_000_000 - 2_000 - 4_000
    settled = engine.settle(reservation, {"requests": 1, "tokens": 1_500}, at_ms=T + 1)
    assert settled.admitted
    assert engine.credits("@jo") == 1_000_000 - 2_000 - 1_500

    voided = engine.reserve("tp-jo-1", "m2.7", {"requests": 1, "tokens": 10}, at_ms=T + 2)
    engine.void(voided, at_ms=T + 3)
    engine.void(voided.id, at_ms=T + 3)  # again: a no-op
    assert engine.credits("@jo") == 1_000_000 - 2_000 - 1_500
    with_lease = engine.reserve("tp-jo-1", "m2.7", {"requests": 1}, at_ms=T + 4, lease_ms=1_000)
    assert with_lease.admitted
    assert engine.expire_reservations(at_ms=T + 10_000) == 1
    with __import__("pytest").raises(tally.ReservationClosedError):
        engine.settle(reservation, {"requests": 1, "tokens": 9}, at_ms=T + 20_000)


def test_a_reservation_is_true_exactly_when_admitted_as_a_decision_is(engine):
    # `if engine.consume(...)` admits only what was admitted; `if engine.reserve(...)`, the
    # same idiom, must not let a denied reservation through.
    engine.create_user("jo", "tp-jo-1", at_ms=T)
    denied = engine.reserve("tp-jo-1", "m2.7", {"requests": 1, "tokens": 10}, at_ms=T)
    assert not denied.admitted and denied.id is None
    assert bool(denied) is False
    engine.top_up("@jo", 1_000_000, at_ms=T)
    admitted = engine.reserve("tp-jo-1", "m2.7", {"requests": 1, "tokens": 10}, at_ms=T)
    assert admitted.admitted and bool(admitted) is True


def test_teams_members_seats_and_withdrawals(engine):
    engine.create_user("ka", "tp-ka-1", at_ms=T)
    engine.create_team("acme", at_ms=T)
    engine.add_member("acme", "ka", "tp-ka-acme", at_ms=T)
    engine.assign_seat("acme", "ka", "Max", at_ms=T)
    assert engine.usage("tp-ka-acme", at_ms=T).plan == "Max"
    assert engine.consume("tp-ka-acme", "hailuo-2.3-768p-6s", {"videos": 1}, at_ms=T).admitted
    engine.unassign_seat("acme", "ka", at_ms=T)
    assert (
        engine.consume("tp-ka-acme", "m2.7", {"requests": 1}, at_ms=T).denial is Denial.NO_RESOURCES
    )
    assert engine.top_up("acme", 10_000, at_ms=T) == 10_000
    assert engine.withdraw_credits("acme", 4_000, at_ms=T) == 6_000


def test_a_revoked_key_is_denied_and_its_member_given_a_new_one(engine):
    # A leaked key: revoked, it is denied whatever its seat and its team's credits; the member
    # is given a new key in its place, with no seat.
    engine.create_user("kb", "tp-kb-1", at_ms=T)
    engine.create_team("acme", at_ms=T)
    engine.add_member("acme", "kb", "tp-kb-acme", at_ms=T)
    engine.assign_seat("acme", "kb", "Max", at_ms=T)
    engine.top_up("acme", 10_000_000, at_ms=T)
    assert engine.consume("tp-kb-acme", "m2.7", {"requests": 1}, at_ms=T).admitted
    with pytest.raises(tally.AlreadyExistsError):
        engine.add_member("acme", "kb", "tp-kb-acme-2", at_ms=T)
    assert engine.revoke_key("tp-kb-acme", at_ms=T) is True
    assert engine.revoke_key("tp-kb-acme", at_ms=T) is False
    denied = engine.consume("tp-kb-acme", "m2.7", {"requests": 1}, at_ms=T)
    assert denied.denial is Denial.KEY_REVOKED and not denied.admitted
    assert engine.check("tp-kb-acme", "m2.7", {"requests": 1}, at_ms=T).denial is Denial.KEY_REVOKED
    report = engine.usage("tp-kb-acme", at_ms=T)
    assert report.revoked and report.limits[0].used == 1
    engine.add_member("acme", "kb", "tp-kb-acme-2", at_ms=T)
    fresh = engine.usage("tp-kb-acme-2", at_ms=T)
    assert not fresh.revoked and fresh.plan is None
    # No seat, but the team's credits pay.
    paid = engine.consume("tp-kb-acme-2", "m2.7", {"requests": 1}, at_ms=T)
    assert paid.admitted and paid.charged_to is ChargedTo.CREDITS
    with pytest.raises(tally.UnknownKeyError):
        engine.revoke_key("tp-nobody", at_ms=T)


def test_consume_many_decides_each_request_on_its_own(engine):
    key = seated(engine, "la", "tp-la-1", "Starter")
    results = engine.consume_many(
        [
            tally.Request(key, "m2.7", {"requests": 1}, at_ms=T),
            tally.Request(key, "no-such-model", {"requests": 1}, at_ms=T),
            tally.Request("nobody", "m2.7", {"requests": 1}, at_ms=T),
            tally.Request(key, "m2.7", {"requests": 1499}, at_ms=T, request_id="big"),
            tally.Request(key, "m2.7", {"requests": 1}, at_ms=T),
        ]
    )
    assert isinstance(results[0], tally.Decision) and results[0].admitted
    assert isinstance(results[1], tally.UnknownResourceError)
    assert isinstance(results[2], tally.Decision) and results[2].denial is Denial.UNKNOWN_KEY
    assert results[3].admitted
    assert results[4].denial is Denial.QUOTA_EXHAUSTED


def test_the_policy_can_be_read_and_swapped_at_run_time(engine):
    key = seated(engine, "ma", "tp-ma-1", "Starter")
    engine.consume(key, "m2.7", {"requests": 10}, at_ms=T)
    policy = engine.policy()
    assert policy["plans"]["Starter"]["limits"][0]["amount"] == 1500
    policy["plans"]["Starter"]["limits"][0]["amount"] = 20
    engine.swap_policy(policy, at_ms=T)
    assert engine.usage(key, at_ms=T).limits[0].amount == 20
    assert engine.check(key, "m2.7", {"requests": 10}, at_ms=T).admitted
    assert not engine.check(key, "m2.7", {"requests": 11}, at_ms=T).admitted
    engine.swap_policy(tally.Policy.json(policy), at_ms=T)
    engine.swap_policy(tally.Policy.default(), at_ms=T)
    assert engine.usage(key, at_ms=T).limits[0].amount == 1500


def test_a_usage_correction_adds_and_removes_what_the_plan_counted(engine):
    key = seated(engine, "na", "tp-na-1", "Starter")
    engine.consume(key, "m2.7", {"requests": 10}, at_ms=T)
    limit = "m2.7:requests per rolling:5h"

    added = engine.adjust_usage(
        key, "m2.7", {"requests": 30}, usage_at_ms=T, direction="add", at_ms=T + 1
    )
    assert added == tally.Adjustment((tally.AdjustedLimit(0, limit, 30),))
    seen = engine.check(key, "m2.7", {"requests": 1}, at_ms=T + 1).limits[0]
    assert seen.used == 10 + 30 + 1 and seen.remaining == 1500 - 41  # the check counts itself

    # Only what still counts is given back: 40 of the 50.
    removed = engine.adjust_usage(
        key,
        "m2.7",
        {Unit.REQUESTS: 50},
        usage_at_ms=T,
        direction=tally.AdjustmentDirection.REMOVE,
        at_ms=T + 2,
    )
    assert removed.limits == (tally.AdjustedLimit(limit_index=0, name=limit, moved=40),)
    assert engine.usage(key, at_ms=T + 2).limits[0].used == 0
    assert engine.consume(key, "m2.7", {"requests": 1}, at_ms=T + 2).limits[0].used == 1


def test_idle_keys_windows_are_reclaimed_and_their_next_request_starts_empty(engine):
    key = seated(engine, "ob", "tp-ob-1", "Starter")
    idle = engine.memory_stats()
    assert idle.keys == 1 and idle.keys_with_usage == 0 and idle.usage_bytes == 0
    assert idle.table_bytes > 0

    engine.consume(key, "m2.7", {"requests": 10}, at_ms=T)
    counting = engine.memory_stats()
    assert counting.keys == 1 and counting.keys_with_usage == 1 and counting.usage_bytes > 0
    assert engine.reclaim_idle(at_ms=T + HOUR_MS) == 0  # the 10 requests still count
    assert engine.memory_stats() == counting

    later = T + 6 * HOUR_MS  # the rolling 5 hours have passed
    assert engine.reclaim_idle(at_ms=later) == 1
    reclaimed = engine.memory_stats()
    assert reclaimed.keys == 1 and reclaimed.keys_with_usage == 0 and reclaimed.usage_bytes == 0

    decision = engine.consume(key, "m2.7", {"requests": 1}, at_ms=later)
    assert decision.admitted and decision.limits[0].used == 1
    assert decision.limits[0].remaining == 1499
    assert engine.memory_stats().keys_with_usage == 1


@pytest.mark.parametrize("document", ["[plans]", bytearray(b"[plans]"), 42])
def test_a_policy_made_with_a_document_that_is_not_bytes_raises_a_type_error(engine, document):
    # Policy is a public dataclass: a str document (the TOML itself) reached ctypes, which
    # raised its own ctypes.ArgumentError, neither a TypeError nor a ValueError.
    policy = tally.Policy(tally.PolicySource.TOML, document)
    with pytest.raises(TypeError, match="document"):
        engine.swap_policy(policy, at_ms=T)
    with pytest.raises(TypeError, match="document"):
        tally.Engine.in_memory(policy)
    assert engine.policy_version == 0


def test_a_policy_given_as_any_mapping_is_swapped_in_as_a_dict_is(engine):
    # Typed `Mapping[str, Any]` (and accepted as one by swap_policy and Engine.open), but
    # json.dumps takes only dicts: a read-only view of the policy raised "Object of type
    # mappingproxy is not JSON serializable".
    from types import MappingProxyType

    policy = engine.policy()
    policy["plans"]["Starter"]["limits"][0]["amount"] = 20
    policy["plans"] = MappingProxyType(policy["plans"])
    engine.swap_policy(MappingProxyType(policy), at_ms=T)
    assert engine.policy()["plans"]["Starter"]["limits"][0]["amount"] == 20
    assert engine.policy_version == 1
    with pytest.raises(TypeError, match="not JSON serializable"):
        tally.Policy.json({"plans": object()})


@pytest.mark.parametrize(
    "amount", [float("nan"), float("inf"), float("-inf"), 1.5, 1e30, 20.0, 2**64]
)
def test_a_policy_number_that_is_no_integer_is_refused_naming_its_field(engine, amount):
    # json.dumps writes NaN and Infinity by default, which are no JSON: the library refused
    # them as "expected value at line 1 column 4433", a place in a text the caller never
    # wrote, and 2**64 as "floating point `1.8446744073709552e+19`". Policy.json refuses
    # every float (a policy's numbers are all integers) and every integer past 2^64 - 1
    # itself, naming the field and the value as given.
    policy = engine.policy()
    policy["plans"]["Starter"]["limits"][0]["amount"] = amount
    field = 'plans."Starter".limits[0].amount: ' + repr(amount)
    with pytest.raises(tally.PolicyInvalidError, match=re.escape(field)) as refused:
        tally.Policy.json(policy)
    assert "line 1" not in str(refused.value)
    with pytest.raises(tally.PolicyInvalidError, match=re.escape(field)):
        engine.swap_policy(policy, at_ms=T)
    assert engine.policy_version == 0


def test_a_nan_anywhere_in_a_policy_mapping_is_refused_at_its_path(engine):
    policy = engine.policy()
    policy["resources"]["m2.7"]["units"] = ("requests", float("nan"))
    with pytest.raises(tally.PolicyInvalidError, match=re.escape('resources."m2.7".units[1]: nan')):
        tally.Policy.json(policy)
    with pytest.raises(tally.PolicyInvalidError, match=re.escape("time_zone: inf")):
        tally.Policy.json({"time_zone": float("inf")})
    # A key is no number: json.dumps writes an integer key as text, a name like any other.
    assert b'"7"' in (tally.Policy.json({"plans": {7: {}}}).document or b"")


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-Infinity", "1.5", "1e30", "20.0"])
def test_a_json_document_whose_number_is_no_integer_is_refused_naming_its_field(engine, amount):
    # The same numbers written in a JSON document by hand reach the library's parser as written.
    policy = engine.policy()
    policy["plans"]["Starter"]["limits"][0]["amount"] = 987654321
    document = json.dumps(policy).replace("987654321", amount)
    assert amount in document
    field = 'plans."Starter".limits[0].amount'
    with pytest.raises(tally.PolicyInvalidError, match=re.escape(field)):
        engine.swap_policy(tally.Policy.json(document), at_ms=T)
    assert engine.policy_version == 0
