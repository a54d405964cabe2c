"""The units the middleware reads from the engine's policy, read again after a swap."""

from __future__ import annotations

from test_asgi import CALLS_ONLY_POLICY, CHAT, Clock, Upstream, chat, request

import tally
from conftest import T, seated
from tally.asgi import QuotaMiddleware


def test_a_closed_engine_after_a_swap_is_503_not_an_exception():
    # The units are read again on the first call after a swap (policy_version); the engine
    # closed meanwhile, that read fails with the engine's ClosedError, which must be answered
    # 503 as every other call on a closed engine is (as the Go gateway answers it), not raised
    # out of the middleware to the server.
    with tally.Engine.in_memory(
        options=tally.Options(max_ahead_of_clock_ms=0, manual_clock_ms=T)
    ) as engine:
        gateway = QuotaMiddleware(Upstream(), engine, clock=Clock(T))
        key = seated(engine, "sw", "tp-sw-1", "Plus")
        engine.unassign_seat("@sw", "sw", at_ms=T)
        engine.swap_policy(tally.Policy.toml(CALLS_ONLY_POLICY), at_ms=T)
        engine.assign_seat("@sw", "sw", "Starter", at_ms=T)
        engine.close()
        answer = request(gateway, CHAT, chat(model="m2.7", max_tokens=16), key=key)
        assert answer.status == 503, answer.body


def test_a_closed_engine_without_a_swap_is_503():
    # The same call with no swap before the close (the units read at the start): 503.
    with tally.Engine.in_memory(
        options=tally.Options(max_ahead_of_clock_ms=0, manual_clock_ms=T)
    ) as engine:
        gateway = QuotaMiddleware(Upstream(), engine, clock=Clock(T))
        key = seated(engine, "sw", "tp-sw-1", "Plus")
        engine.close()
        answer = request(gateway, CHAT, chat(max_tokens=16), key=key)
        assert answer.status == 503, answer.body
