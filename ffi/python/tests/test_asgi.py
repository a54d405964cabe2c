"""QuotaMiddleware driven in-process with a fake upstream app: no server, no network."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import json
import logging
import time
import zlib
from typing import Any

import pytest

import tally
from conftest import (
    HOUR_MS,
    T,
    consume_and_checkpoint,
    oldest_segment_unreadable,
    seated,
    unbounded,
)
from tally import _native, errors
from tally.asgi import (
    DEFAULT_LEASE_MS,
    DEFAULT_PASS_THROUGH,
    MAX_EVENT_LINE_BYTES,
    MAX_JSON_NESTING,
    MAX_QUANTITY,
    MAX_REQUEST_BODY_BYTES,
    Api,
    Metering,
    QuotaMiddleware,
    Route,
    UsageReader,
    _credits,
    denial_message,
    lease_ended,
    rate_limit_headers,
    route_path,
)

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
SPEECH = "/v1/audio/speech"
IMAGES = "/v1/images/generations"


class Upstream:
    """A fake OpenAI/Anthropic upstream: answers each route with its usage, records calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        self.raise_error = False
        self.stream = False
        self.tokens = (10, 20)
        # The body's Content-Encoding: None, "gzip", "gzip-members" (sent as "gzip", in two
        # gzip members back to back, as a server compressing each flush on its own writes it),
        # "deflate", "deflate-raw" (sent as "deflate", without zlib's header) or "br" (sent as
        # is, unreadable).
        self.encoding: str | None = None

    async def __call__(self, scope, receive, send) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw or b"{}")
        self.calls.append(
            {
                "path": scope["path"],
                "raw_path": scope.get("raw_path"),
                "body": body,
                "accept_encoding": [
                    bytes(value).decode()
                    for name, value in scope.get("headers", [])
                    if bytes(name).lower() == b"accept-encoding"
                ],
            }
        )
        if self.raise_error:
            raise RuntimeError("upstream broke")
        prompt, completion = self.tokens
        if self.stream:
            await self._stream(scope["path"], send, prompt, completion)
            return
        if scope["path"] == MESSAGES:
            answer = {
                "type": "message",
                "usage": {"input_tokens": prompt, "output_tokens": completion},
            }
        else:
            answer = {
                "object": "chat.completion",
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        payload, encoding = self._encoded(json.dumps(answer).encode())
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json"), *encoding],
            }
        )
        # In two pieces, as a real proxy may send it.
        await send({"type": "http.response.body", "body": payload[:7], "more_body": True})
        await send({"type": "http.response.body", "body": payload[7:], "more_body": False})

    def _encoded(self, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """``body`` in ``self.encoding``, and its Content-Encoding header."""
        if self.encoding == "gzip":
            return gzip.compress(body), [(b"content-encoding", b"gzip")]
        if self.encoding == "gzip-members":
            # The usage in the second member (RFC 1952: a gzip file is a series of members).
            half = len(body) // 2
            members = gzip.compress(body[:half]) + gzip.compress(body[half:])
            return members, [(b"content-encoding", b"gzip")]
        if self.encoding == "deflate":
            return zlib.compress(body), [(b"content-encoding", b"deflate")]
        if self.encoding == "deflate-raw":
            raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            return raw.compress(body) + raw.flush(), [(b"content-encoding", b"deflate")]
        if self.encoding == "br":
            return body, [(b"content-encoding", b"br")]
        return body, []

    async def _stream(self, path: str, send, prompt: int, completion: int) -> None:
        if path == MESSAGES:
            events = [
                {
                    "type": "message_start",
                    "message": {"usage": {"input_tokens": prompt, "output_tokens": 1}},
                },
                {"type": "content_block_delta", "delta": {"text": "hi"}},
                {"type": "message_delta", "usage": {"output_tokens": completion}},
            ]
        else:
            events = [
                {"choices": [{"delta": {"content": "hi"}}], "usage": None},
                {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                },
            ]
        text = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        raw, encoding = self._encoded(text.encode())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), *encoding],
            }
        )
        for start in range(0, len(raw), 13):  # chunks that split lines
            await send(
                {"type": "http.response.body", "body": raw[start : start + 13], "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    app,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    key: str | None = "",
    header: str = "authorization",
    method: str = "POST",
    raw: bytes | None = None,
) -> Response:
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if key:
        value = f"Bearer {key}" if header == "authorization" else key
        headers.append((header.encode(), value.encode()))
    payload = raw if raw is not None else json.dumps(body or {}).encode()
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
    }
    pieces = [payload[: len(payload) // 2], payload[len(payload) // 2 :]]
    incoming = [
        {"type": "http.request", "body": piece, "more_body": i == 0}
        for i, piece in enumerate(pieces)
    ]
    return exchange(app, scope, incoming)


def exchange(app, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> Response:
    """Runs ``app`` on one request whose body arrives as ``incoming``; the client then stays
    connected. The response as sent."""
    sent: list[dict[str, Any]] = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    response_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    body_bytes = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Response(start["status"], response_headers, body_bytes)


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        self.now += 1
        return self.now


@pytest.fixture
def upstream():
    return Upstream()


@pytest.fixture
def clock():
    return Clock(T)


@pytest.fixture
def gateway(engine, upstream, clock):
    return QuotaMiddleware(upstream, engine, clock=clock)


def chat(model: str = "MiniMax-M2.7", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def test_exactly_the_starter_limit_is_admitted_then_429_with_retry_after(engine, gateway, upstream):
    key = seated(engine, "ada", "tp-ada-1", "Starter")
    statuses = [request(gateway, CHAT, chat(), key=key).status for _ in range(1510)]
    assert statuses.count(200) == 1500 and statuses.count(429) == 10
    assert statuses[:1500] == [200] * 1500
    assert len(upstream.calls) == 1500
    assert engine.usage(key, at_ms=T + 10_000).open_reservations == 0

    denied = request(gateway, CHAT, chat(), key=key)
    assert denied.status == 429
    retry_after = int(denied.headers["retry-after"])
    assert 0 < retry_after <= 5 * 3600 + 300
    assert denied.headers["x-ratelimit-limit-requests"] == "1500"
    assert denied.headers["x-ratelimit-remaining-requests"] == "0"
    assert denied.headers["x-ratelimit-reset-requests"].endswith("s")
    error = denied.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "m2.7:requests per rolling:5h" in error["message"]
    assert "resets at 2030-03-1" in error["message"] and "Starter" in error["message"]


def test_admitted_responses_carry_the_rate_limit_headers(engine, gateway):
    key = seated(engine, "bo", "tp-bo-1", "Plus")
    first = request(gateway, CHAT, chat(), key=key)
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "4500"
    assert first.headers["x-ratelimit-remaining-requests"] == "4499"
    assert first.headers["x-tally-plan"] == "Plus"
    assert first.headers["x-tally-charged-to"] == "plan_quota"
    assert first.json()["usage"]["total_tokens"] == 30  # the upstream's body, untouched


def test_the_anthropic_route_denies_in_anthropics_error_shape(engine, gateway):
    key = seated(engine, "cy", "tp-cy-1", "Starter")
    engine.consume(key, "m2.7", {"requests": 1500}, at_ms=T)
    denied = request(
        gateway,
        MESSAGES,
        {"model": "MiniMax-M2.7", "max_tokens": 100, "messages": []},
        key=key,
        header="x-api-key",
    )
    assert denied.status == 429
    assert int(denied.headers["retry-after"]) > 0
    body = denied.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "Quota exhausted" in body["error"]["message"] and "resets at" in body["error"]["message"]
    assert denied.headers["anthropic-ratelimit-requests-limit"] == "1500"
    assert denied.headers["anthropic-ratelimit-requests-remaining"] == "0"


def test_unknown_and_missing_keys_get_401_in_each_apis_shape(engine, gateway, upstream):
    openai = request(gateway, CHAT, chat(), key="sk-nobody")
    assert openai.status == 401
    assert openai.json()["error"]["code"] == "invalid_api_key"
    anthropic = request(gateway, MESSAGES, chat(), key=None)
    assert anthropic.status == 401
    assert anthropic.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": anthropic.json()["error"]["message"]},
    }
    assert request(gateway, CHAT, chat(), key="x" * 500).status == 401
    assert upstream.calls == []


def test_a_revoked_key_gets_401_on_every_route(engine, gateway, upstream):
    # As the Go gateway's test of the same name: metered or passed through, in the API's
    # shape, and the upstream never sees the call.
    key = seated(engine, "rv", "tp-rv-1", "Max")
    assert request(gateway, CHAT, chat(), key=key).status == 200
    assert engine.revoke_key(key, at_ms=T) is True
    served = len(upstream.calls)
    openai = request(gateway, CHAT, chat(), key=key)
    assert openai.status == 401, openai.body
    assert openai.json()["error"]["code"] == "invalid_api_key"
    assert "revoked" in openai.json()["error"]["message"]
    anthropic = request(gateway, MESSAGES, chat(), key=key)
    assert anthropic.status == 401
    assert anthropic.json()["error"]["type"] == "authentication_error"
    models = request(gateway, "/v1/models", None, key=key, method="GET")
    assert models.status == 401, models.body
    assert len(upstream.calls) == served


def test_an_unknown_or_revoked_key_gets_401_whatever_its_body(engine, gateway, upstream):
    # The credential is judged before the request: a key the engine does not know, or one
    # it revoked, learns nothing from a malformed body (400), a model not served (404) or a
    # body too large (413); it is 401, as the Go gateway answers. A known key still gets the
    # body's own answer.
    key = seated(engine, "rb", "tp-rb-1", "Max")
    revoked = seated(engine, "rc", "tp-rc-1", "Max")
    assert engine.revoke_key(revoked, at_ms=T) is True
    bodies = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"model": "no-such-model", "messages": []}).encode(), 404),
        (json.dumps({"model": "speech-2.8-hd", "messages": []}).encode(), 400),
        (b"x" * (MAX_REQUEST_BODY_BYTES + 1), 413),
    ]
    for raw, status in bodies:
        assert request(gateway, CHAT, raw=raw, key=key).status == status, raw[:20]
        for stranger in ["tp-nobody", revoked]:
            answer = request(gateway, CHAT, raw=raw, key=stranger)
            assert answer.status == 401, (stranger, raw[:20], answer.status, answer.body)
            assert answer.json()["error"]["code"] == "invalid_api_key"
    assert upstream.calls == []


@pytest.mark.parametrize("path", [CHAT, MESSAGES, SPEECH])
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_key_no_key_can_be_gets_401_like_an_unknown_key(engine, gateway, upstream, path, header):
    # Longer than any key, or holding a NUL or another control character (a tab, U+0085,
    # which the engine refuses as an argument, not as a key it does not know): not a valid
    # credential, answered as an unknown key is (as the Go gateway does), never 400 as if the
    # request were malformed nor 503 as if the engine had failed.
    seated(engine, "ada", "tp-ada-1", "Starter")
    body = {"model": "speech-2.8-hd", "input": "hello"} if path == SPEECH else chat()
    keys = ["k" * (_native.MAX_ID_BYTES + 1), "tp-ada-1\x00", "tp-ada-1\tx", "tp-ada-1\u0085x"]
    for key in [*keys, "k" * _native.MAX_ID_BYTES]:
        answer = request(gateway, path, body, key=key, header=header)
        assert answer.status == 401, (len(key), answer.status, answer.body)
    assert upstream.calls == []


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_key_is_the_bytes_sent_trimmed_of_spaces_and_tabs_only(engine, gateway, upstream, header):
    # HTTP lets spaces and tabs surround a header's value, and only those: a key followed or
    # led by another Unicode space (U+0085, U+00A0, U+2003, U+3000) is not the key, so no
    # quota is charged to tp-ada-1 for it (the Go gateway reads keys alike).
    seated(engine, "ada", "tp-ada-1", "Starter")
    for key in ["tp-ada-1\u0085", "tp-ada-1\u00a0", "\u2003tp-ada-1", "\u3000tp-ada-1"]:
        answer = request(gateway, CHAT, chat(), key=key, header=header)
        assert answer.status == 401, (key, answer.status, answer.body)
    assert upstream.calls == []
    assert all(limit.used == 0 for limit in engine.usage("tp-ada-1", at_ms=T).limits)
    answer = request(gateway, CHAT, chat(), key=" \ttp-ada-1\t ", header=header)
    assert answer.status == 200, (answer.status, answer.body)
    assert len(upstream.calls) == 1


def test_tokens_from_the_response_are_settled_through_a_reservation(engine, gateway, upstream):
    engine.create_user("di", "tp-di-1", at_ms=T)
    engine.create_payg_key("di", "pg-di-1", at_ms=T)
    upstream.tokens = (120, 380)
    assert request(gateway, CHAT, chat(max_tokens=1000), key="pg-di-1").status == 200
    assert (
        request(gateway, MESSAGES, chat(max_tokens=1000), key="pg-di-1", header="x-api-key").status
        == 200
    )
    usage = engine.usage("pg-di-1", at_ms=T + HOUR_MS)
    # 2 requests at 2,000 micros plus 2 x 500 tokens at 1 micro: the actual, not the estimate.
    assert usage.pay_as_you_go_micros == 2 * 2_000 + 2 * 500
    assert usage.open_reservations == 0


def test_streamed_usage_is_settled_for_both_apis(engine, gateway, upstream):
    engine.create_user("ed", "tp-ed-1", at_ms=T)
    engine.top_up("@ed", 1_000_000, at_ms=T)
    upstream.stream = True
    upstream.tokens = (50, 70)
    assert request(gateway, CHAT, chat(stream=True), key="tp-ed-1").status == 200
    assert request(gateway, MESSAGES, chat(stream=True), key="tp-ed-1").status == 200
    assert engine.credits("@ed") == 1_000_000 - 2 * (2_000 + 120)


@pytest.mark.parametrize("encoding", ["gzip", "gzip-members", "deflate", "deflate-raw"])
@pytest.mark.parametrize("stream", [False, True])
def test_tokens_in_a_compressed_answer_are_settled(engine, gateway, upstream, encoding, stream):
    # An app that passed the client's Accept-Encoding on gets a compressed answer: the usage is
    # read through it (the client gets the body as sent), not charged at the estimate. A gzip
    # body of several members is read to its end, as Go's gzip reader (the Go gateway's
    # transport) reads it: only its first member was, and the usage after it was lost.
    engine.create_user("ci", "tp-ci-1", at_ms=T)
    engine.top_up("@ci", 10_000_000, at_ms=T)
    upstream.encoding, upstream.stream, upstream.tokens = encoding, stream, (50, 70)
    for path, header in ((CHAT, "authorization"), (MESSAGES, "x-api-key")):
        response = request(gateway, path, chat(max_tokens=4000), key="tp-ci-1", header=header)
        assert response.status == 200
        assert response.headers["content-encoding"] == encoding.partition("-")[0]
    # 2 requests at 2,000 micros and 2 x 120 tokens at 1 micro, not the 4,000 estimated.
    assert engine.credits("@ci") == 10_000_000 - 2 * (2_000 + 120)
    assert engine.usage("tp-ci-1", at_ms=T + HOUR_MS).open_reservations == 0


def test_raw_deflate_whose_start_reads_as_a_zlib_header_is_read_from_its_first_byte(engine, clock):
    # "deflate" sent raw (without zlib's header) is read raw once zlib's reading fails. This
    # one starts with a stored block whose first two bytes, 78 01, are also a valid zlib
    # header, so zlib's reading fails only in a later piece: the raw reading must start again
    # from the body's first byte, not from the piece that failed (the usage went unread).
    body = json.dumps({"object": "chat.completion", "usage": {"total_tokens": 120}}).encode()
    deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    # A stored block, not the last, of 1 byte (LEN 0x0001, NLEN 0xfffe), its header's unused
    # bits set so its first byte is 0x78; then the rest of the body.
    sent = b"\x78\x01\x00\xfe\xff" + body[:1] + deflate.compress(body[1:]) + deflate.flush()
    assert zlib.decompress(sent, -zlib.MAX_WBITS) == body

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"deflate")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for start in range(0, len(sent), 3):
            piece = sent[start : start + 3]
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    gateway = QuotaMiddleware(app, engine, clock=clock)
    key = seated(engine, "rd", "tp-rd-1", "Bar-Plus")
    answer = request(gateway, CHAT, chat(max_tokens=4000), key=key)
    assert answer.status == 200 and answer.body == sent
    usage = engine.usage(key, at_ms=T + HOUR_MS)
    assert usage.limits[0].used == 2_000 + 120  # the usage, not the 4,000 estimated
    assert usage.open_reservations == 0


def test_an_answer_in_a_coding_the_gateway_cannot_read_settles_at_the_estimate(
    engine, gateway, upstream, caplog
):
    engine.create_user("cj", "tp-cj-1", at_ms=T)
    engine.top_up("@cj", 10_000_000, at_ms=T)
    upstream.encoding, upstream.tokens = "br", (50, 70)
    with caplog.at_level(logging.WARNING, logger="tally.asgi"):
        assert request(gateway, CHAT, chat(max_tokens=4000), key="tp-cj-1").status == 200
    assert "Content-Encoding 'br' cannot be read" in caplog.text
    held = engine.credits("@cj")
    assert held < 10_000_000 - (2_000 + 120), "charged more than the answer's own usage"
    assert engine.usage("tp-cj-1", at_ms=T + HOUR_MS).open_reservations == 0


@pytest.mark.parametrize(
    ("sent", "passed"),
    [
        (None, []),
        ("gzip, deflate, br, zstd", ["gzip, deflate"]),
        ("br;q=1.0, gzip;q=0.5", ["gzip;q=0.5"]),
        ("br", ["identity"]),
        ("identity", ["identity"]),
    ],
)
def test_a_metered_calls_accept_encoding_keeps_only_codings_the_gateway_reads(
    engine, gateway, upstream, sent, passed
):
    seated(engine, "ck", "tp-ck-1", "Plus")
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer tp-ck-1")]
    if sent is not None:
        headers.append((b"accept-encoding", sent.encode()))
    payload = json.dumps(chat(max_tokens=10)).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
    }
    response = exchange(gateway, scope, [{"type": "http.request", "body": payload}])
    assert response.status == 200
    assert upstream.calls[-1]["accept_encoding"] == passed


def test_tokens_past_the_largest_quantity_from_the_upstream_still_settle(engine, gateway, upstream):
    engine.create_user("fa", "tp-fa-1", at_ms=T)
    engine.top_up("@fa", 1_000_000, at_ms=T)
    # An upstream's usage the engine cannot take as one quantity (2^40), or ctypes as a
    # uint64_t: settled all the same (at most what was held), never left open for its lease.
    for prompt in (2**41, 2**70):
        upstream.tokens = (prompt, 1)
        assert request(gateway, CHAT, chat(max_tokens=1000), key="tp-fa-1").status == 200
        assert engine.usage("tp-fa-1", at_ms=T + HOUR_MS).open_reservations == 0


def outliving_the_lease(upstream: Upstream, clock: Clock):
    """The upstream, answering only after the gateway's lease has ended (a long stream)."""

    async def slow(scope, receive, send) -> None:
        clock.now += DEFAULT_LEASE_MS + 60_000
        await upstream(scope, receive, send)

    return slow


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_that_outlives_its_lease_is_still_charged_what_it_used(
    engine, upstream, clock, caplog, stream
):
    key = seated(engine, "lu", "tp-lu-1", "Bar-Plus")
    gateway = QuotaMiddleware(outliving_the_lease(upstream, clock), engine, clock=clock)
    upstream.stream = stream
    upstream.tokens = (100, 200)
    with caplog.at_level(logging.WARNING, logger="tally.asgi"):
        answer = request(gateway, CHAT, chat(max_tokens=1000, stream=stream), key=key)
    assert answer.status == 200
    usage = engine.usage(key, at_ms=clock.now)
    assert usage.open_reservations == 0
    # The settle found the reservation expired (its hold given back): the usage is recorded
    # as a correction at the reservation's time, once: 1 request at 2,000 micros and 300
    # tokens at 1 on both bars, not the estimate and not twice.
    assert [limit.used for limit in usage.limits] == [2_300, 2_300]
    assert "outlived its lease" in caplog.text


def test_a_late_settle_on_credits_is_logged_as_not_recorded(engine, upstream, clock, caplog):
    # A usage correction counts plan quota only: credits held by an expired reservation
    # cannot be charged after it, and the gateway says so rather than dropping it silently.
    engine.create_user("cr", "tp-cr-1", at_ms=T)
    engine.top_up("@cr", 1_000_000, at_ms=T)
    gateway = QuotaMiddleware(outliving_the_lease(upstream, clock), engine, clock=clock)
    with caplog.at_level(logging.WARNING, logger="tally.asgi"):
        assert request(gateway, CHAT, chat(max_tokens=1000), key="tp-cr-1").status == 200
    assert engine.credits("@cr") == 1_000_000
    assert "not recorded" in caplog.text


def test_only_an_ended_lease_makes_a_settle_late(engine):
    key = seated(engine, "ol", "tp-ol-1", "Starter")
    quantities = {"requests": 1, "tokens": 10}
    settled = engine.reserve(key, "m2.7", quantities, at_ms=T, lease_ms=60_000)
    engine.settle(settled, quantities, at_ms=T + 1)
    voided = engine.reserve(key, "m2.7", quantities, at_ms=T, lease_ms=60_000)
    engine.void(voided, at_ms=T + 1)
    expired = engine.reserve(key, "m2.7", quantities, at_ms=T, lease_ms=60_000)
    outcomes = []
    for reservation in (settled, voided, expired):
        with pytest.raises(errors.ReservationClosedError) as raised:
            engine.settle(reservation, {"requests": 1, "tokens": 5}, at_ms=T + 120_000)
        outcomes.append(lease_ended(raised.value))
    # A settle that already happened (retried with other amounts) or a void is no late usage.
    assert outcomes == [False, False, True]


def test_a_late_settle_is_told_by_its_status_not_by_the_messages_wording():
    # TALLY_RESERVATION_EXPIRED whatever its message says; TALLY_RESERVATION_CLOSED never,
    # even if its message ends in "expired".
    assert lease_ended(errors.error_for(36, "reservation 7: its lease is over"))
    assert lease_ended(errors.error_for(36, ""))
    assert not lease_ended(errors.error_for(26, "reservation 7 is already expired"))


def test_a_failed_upstream_call_voids_the_reservation_or_refunds_the_request(
    engine, gateway, upstream
):
    engine.create_user("fa", "tp-fa-1", at_ms=T)
    engine.top_up("@fa", 1_000_000, at_ms=T)
    upstream.status = 500
    assert request(gateway, CHAT, chat(), key="tp-fa-1").status == 500
    assert engine.credits("@fa") == 1_000_000
    upstream.status = 200
    upstream.raise_error = True
    with pytest.raises(RuntimeError):
        request(gateway, CHAT, chat(), key="tp-fa-1")
    with pytest.raises(RuntimeError):
        request(gateway, IMAGES, {"model": "image-01", "n": 2}, key="tp-fa-1")
    assert engine.credits("@fa") == 1_000_000
    assert engine.usage("tp-fa-1", at_ms=T + HOUR_MS).open_reservations == 0


def test_speech_is_counted_in_characters_of_its_input_against_the_daily_quota(engine, gateway):
    key = seated(engine, "gu", "tp-gu-1", "Plus")
    ok = request(gateway, SPEECH, {"model": "speech-2.8-hd", "input": "a" * 3000}, key=key)
    assert ok.status == 200
    assert ok.headers["x-ratelimit-remaining-characters"] == "1000"
    denied = request(gateway, SPEECH, {"model": "speech-2.8-hd", "input": "b" * 1500}, key=key)
    assert denied.status == 429
    assert denied.json()["error"]["type"] == "characters"
    assert "speech-2.8:characters per daily" in denied.json()["error"]["message"]
    # The next local midnight in Asia/Shanghai is 2030-03-18T16:00:00Z.
    assert "2030-03-18T16:00:00Z" in denied.json()["error"]["message"]
    assert request(gateway, SPEECH, {"model": "speech-2.8-hd", "input": ""}, key=key).status == 400


def test_a_seatless_keys_not_covered_denial_names_no_plan_of_its_own():
    # A key without a seat whose team holds credits, asking for a model credits cannot pay for
    # (no price), is denied "resource not covered": the message said "This key does not cover
    # free-model", as if the key were a plan. As the Go gateway words it.
    policy = """
time_zone = "UTC"
[resources.chat]
units = ["requests"]
price_micros = { requests = 1000 }
[resources.free-model]
units = ["requests"]
[plans.Covers]
limits = [{ resource = "free-model", unit = "requests", amount = 10, window = "rolling:5h" }]
"""
    engine = tally.Engine.in_memory(tally.Policy.toml(policy))
    engine.create_user("ada", "key-ada")
    engine.top_up("@ada", 1_000_000)
    decision = engine.consume("key-ada", "free-model", {"requests": 1})
    assert decision.denial is tally.Denial.RESOURCE_NOT_COVERED and decision.plan is None
    message = denial_message(decision, "free-model")
    assert message.startswith("This key has no plan that covers free-model."), message
    assert "Upgrade to Covers" in message


def test_an_insufficient_credits_denial_says_the_amounts_in_credits_exactly():
    # Worded as the Go gateway words it: the price, the balance and what to top up, in credits
    # with six decimals, exactly (micro-credits divided as floats would round large balances).
    policy = """
time_zone = "UTC"
[resources.chat]
units = ["requests"]
price_micros = { requests = 2500000001 }
[plans.Plus]
limits = [{ resource = "chat", unit = "requests", amount = 1, window = "rolling:5h" }]
"""
    engine = tally.Engine.in_memory(tally.Policy.toml(policy))
    engine.create_user("ada", "key-ada")
    engine.top_up("@ada", 1)
    decision = engine.consume("key-ada", "chat", {"requests": 1})
    assert decision.denial is tally.Denial.INSUFFICIENT_CREDITS
    assert denial_message(decision, "chat") == (
        "The plan's quota for chat cannot take this request and the team's credits are short: "
        "it costs 2500.000001 credits, the balance is 0.000001. Upgrade to Plus for more. "
        "Or top up at least 2500.000000 credits to pay for it."
    )
    # The largest balance, far past 2^53 micro-credits where a float is no longer exact.
    assert _credits(2**64 - 1) == "18446744073709.551615"
    engine.create_user("cy", "key-cy")
    seatless = engine.consume("key-cy", "chat", {"requests": 1})
    assert seatless.denial is tally.Denial.NO_RESOURCES
    assert denial_message(seatless, "chat").endswith(
        "Assign a seat or top up credits (at least 2500.000001 for this request)."
    ), denial_message(seatless, "chat")


def test_images_are_counted_by_n_and_a_plan_without_them_is_insufficient_quota(engine, gateway):
    plus = seated(engine, "ha", "tp-ha-1", "Plus")
    assert request(gateway, IMAGES, {"model": "image-01", "n": 48}, key=plus).status == 200
    assert request(gateway, IMAGES, {"model": "image-01", "n": 3}, key=plus).status == 429
    assert request(gateway, IMAGES, {"model": "image-01", "n": 2}, key=plus).status == 200
    starter = seated(engine, "io", "tp-io-1", "Starter")
    denied = request(gateway, IMAGES, {"model": "image-01"}, key=starter)
    assert denied.status == 429 and "retry-after" not in denied.headers
    error = denied.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert "does not cover image-01" in error["message"]
    assert request(gateway, IMAGES, {"model": "image-01", "n": -1}, key=plus).status == 400
    # Past the largest quantity (2^40), and past what C's uint64_t holds: the client's error,
    # answered 400 like -1, not a 503 "quota service failed" nor an exception out of the app.
    for n in (2**40 + 1, 2**70):
        too_many = request(gateway, IMAGES, {"model": "image-01", "n": n}, key=plus)
        assert too_many.status == 400 and "n must be" in too_many.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (SPEECH, {"model": "speech-2.8-hd", "input": "hello"}),
        (IMAGES, {"model": "image-01", "n": 1}),
    ],
)
def test_speech_and_images_count_among_the_calls_in_flight(engine, gateway, upstream, path, body):
    # A speech or image call is in flight while the upstream makes it, as a chat call is: a key
    # with as many calls in flight as its plan allows is answered 429 for it too, as the Go
    # gateway's test of the same name.
    key = seated(engine, "fl", "tp-fl-1", "Bar-Plus")
    for _ in range(4):  # Bar-Plus allows 4 at once
        reservation = engine.reserve(key, "m2.7", {"requests": 1, "tokens": 10}, at_ms=T)
        assert reservation.decision.admitted
    answer = request(gateway, path, body, key=key)
    assert answer.status == 429, answer.body
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"]["type"] == "requests"
    # The key's plan, and the plan with more agents.
    message = answer.json()["error"]["message"]
    assert "plan Bar-Plus allows 4 at once" in message, message
    assert "Upgrade to Bar-Max" in message, message
    assert upstream.calls == []


def test_a_key_without_resources_is_told_to_get_a_seat_or_credits(engine, gateway):
    engine.create_user("jo", "tp-jo-1", at_ms=T)
    denied = request(gateway, CHAT, chat(), key="tp-jo-1")
    assert denied.status == 429
    assert denied.json()["error"]["type"] == "insufficient_quota"
    assert "no Token Plan seat" in denied.json()["error"]["message"]


def test_unknown_models_bad_bodies_and_other_routes(engine, gateway, upstream):
    key = seated(engine, "ka", "tp-ka-1", "Max")
    missing = request(gateway, CHAT, chat(model="gpt-99"), key=key)
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert (
        request(gateway, MESSAGES, chat(model="gpt-99"), key=key).json()["error"]["type"]
        == "not_found_error"
    )
    assert request(gateway, CHAT, raw=b"{not json", key=key).status == 400
    assert request(gateway, CHAT, {"messages": []}, key=key).status == 400
    assert request(gateway, CHAT, chat(model="m2.7-highspeed"), key=key).status == 429  # not on Max
    # A resource named directly, and a route that passes through, reach the upstream; a route
    # neither metered nor passed through does not.
    assert request(gateway, CHAT, chat(model="m2.7"), key=key).status == 200
    assert request(gateway, "/v1/models", method="GET", key=key).status == 200
    assert request(gateway, "/health", {}, key=key).status == 403
    assert [call["path"] for call in upstream.calls] == [CHAT, "/v1/models"]


@pytest.mark.parametrize(
    ("path", "passes"),
    [
        ("/v1/models", "GET"),
        ("/v1/models/MiniMax-M2.7", "GET"),
        ("/v1/messages/count_tokens", "POST"),
        ("/health", None),
    ],
)
def test_unmetered_routes_pass_only_for_a_known_key(engine, gateway, upstream, path, passes):
    # The app behind the middleware calls the upstream with the operator's credentials: an
    # unknown key must not reach it on any route, metered or not (as the Go gateway answers).
    # A known key reaches it unmetered on the routes that pass through (DEFAULT_PASS_THROUGH:
    # the model list, a model, the token count) only; any other method or path is 403.
    key = seated(engine, "ada", "tp-ada-1", "Starter")
    anthropic = path.startswith(MESSAGES)
    for method in ["GET", "POST"]:
        served = len(upstream.calls)
        for bad in [None, "tp-nobody", "k" * (_native.MAX_ID_BYTES + 1), "tp-ada-1\x00"]:
            answer = request(gateway, path, {}, key=bad, method=method)
            assert answer.status == 401, (method, bad, answer.status, answer.body)
            if anthropic:
                assert answer.json()["error"]["type"] == "authentication_error"
            else:
                assert answer.json()["error"]["code"] == "invalid_api_key"
        two = two_keys(gateway, path, key, "tp-nobody", {})
        assert two.status == 401
        assert len(upstream.calls) == served
        answer = request(gateway, path, {}, key=key, method=method)
        assert answer.status == (200 if method == passes else 403), (method, answer.body)
        assert len(upstream.calls) == served + (method == passes)
    assert engine.usage(key, at_ms=T + HOUR_MS).limits[0].used == 0  # passed, not charged


#: Routes neither metered nor passed through by default, each with whether its error is in
#: Anthropic's shape: routes that make the operator's account pay for tokens (batches,
#: Anthropic's legacy completions, transcriptions, image edits, moderations, fine-tuning,
#: assistants' runs), that show other users' data (files, batches), a metered path with
#: another method than POST (OpenAI's GET /v1/chat/completions lists stored completions),
#: paths the middleware does not know, and one that cleans to such a path. As in the Go
#: gateway's tests.
REFUSED_ROUTES = [
    ("POST", "/v1/messages/batches", True),
    ("GET", "/v1/messages/batches", True),
    ("POST", "/v1/complete", True),
    ("POST", "/v1/batches", False),
    ("GET", "/v1/batches", False),
    ("POST", "/v1/files", False),
    ("GET", "/v1/files", False),
    ("GET", "/v1/files/file-abc/content", False),
    ("POST", "/v1/audio/transcriptions", False),
    ("POST", "/v1/images/edits", False),
    ("POST", "/v1/moderations", False),
    ("POST", "/v1/fine_tuning/jobs", False),
    ("POST", "/v1/threads/runs", False),
    ("GET", CHAT, False),
    ("GET", MESSAGES, True),
    ("POST", "/v1/models", False),
    ("GET", "/v1/models/a/b", False),
    ("GET", "/health", False),
    ("GET", "//v1/files/", False),
    ("DELETE", "/v1/models/ft-mine", False),
]


@pytest.mark.parametrize(("method", "path", "anthropic"), REFUSED_ROUTES)
def test_routes_neither_metered_nor_free_are_refused_before_the_upstream(
    engine, gateway, upstream, method, path, anthropic
):
    # Before, every such route reached the upstream on the operator's credentials, unmetered,
    # for any known key, even one without a seat or credits. Now 403 in the API's shape,
    # naming the route, for a key with quota as for one without; an unknown key is still 401,
    # so it learns nothing about routes (as the Go gateway answers).
    seated(engine, "ro", "tp-ro-1", "Starter")
    engine.create_user("rn", "tp-rn-1", at_ms=T)  # no seat, no credits
    header = "x-api-key" if anthropic else "authorization"
    for key in ["tp-ro-1", "tp-rn-1"]:
        answer = request(gateway, path, chat(max_tokens=16), key=key, method=method, header=header)
        assert answer.status == 403, (key, answer.status, answer.body)
        error = answer.json()["error"]
        if anthropic:
            assert answer.json()["type"] == "error" and error["type"] == "permission_error"
        else:
            assert error["type"] == "invalid_request_error" and error["code"] == "route_not_served"
        named = f"{method} {route_path(path)}"
        assert named in error["message"] and "not metered" in error["message"], error
    unknown = request(gateway, path, chat(), key="tp-nobody", method=method, header=header)
    assert unknown.status == 401
    assert upstream.calls == []
    usage = engine.usage("tp-ro-1", at_ms=T + HOUR_MS)
    assert usage.limits[0].used == 0 and usage.open_reservations == 0


def test_pass_through_opens_the_routes_it_names_only(engine, upstream, clock):
    # An operator opens more routes they know cost nothing: "METHOD /path", a "*" segment
    # matching any one segment. The list replaces the default one; empty, nothing passes.
    gateway = QuotaMiddleware(
        upstream,
        engine,
        clock=clock,
        pass_through=[*DEFAULT_PASS_THROUGH, "POST /v1/moderations", "GET /v1/files/*/content"],
    )
    key = seated(engine, "op", "tp-op-1", "Starter")
    for method, path, status in [
        ("POST", "/v1/moderations", 200),
        ("GET", "/v1/files/file-abc/content", 200),
        ("GET", "/v1/files//file-abc/content/", 200),  # passed on cleaned
        ("GET", "/v1/models", 200),
        ("GET", "/v1/moderations", 403),
        ("GET", "/v1/files/content", 403),
        ("GET", "/v1/files/a/b/content", 403),
        ("GET", "/v1/files", 403),
    ]:
        answer = request(gateway, path, {"input": "hi"}, key=key, method=method)
        assert answer.status == status, (method, path, answer.status, answer.body)
    assert [call["path"] for call in upstream.calls] == [
        "/v1/moderations",
        "/v1/files/file-abc/content",
        "/v1/files/file-abc/content",
        "/v1/models",
    ]
    assert upstream.calls[2]["raw_path"] == b"/v1/files/file-abc/content"
    closed = QuotaMiddleware(upstream, engine, clock=clock, pass_through=[])
    assert request(closed, "/v1/models", key=key, method="GET").status == 403
    assert request(closed, CHAT, chat(), key=key).status == 200


@pytest.mark.parametrize(
    "entry",
    [
        "POST /v1/messages",
        "POST /v1/chat/completions",
        "POST /v1/*",
        "POST /v1/images/*",
        "GET",
        "/v1/models",
        "GET v1/models",
        "GET /v1/models/",
        "GET /v1//models",
        "GET /v1/./models",
        "GET /v1/models/../files",
        "GET /v1/mod*",
        "get /v1/models",
        "GET /v1/models?limit=1",
        "GET /v1/models extra",
        "",
        "GET /v1/a%2Fb",
    ],
)
def test_a_bad_pass_through_entry_fails_the_middleware_at_once(engine, upstream, entry):
    # No route, or a metered one (it would be metered and free at once): refused here, naming
    # the entry, as the Go gateway's New refuses it.
    with pytest.raises(ValueError, match="pass_through") as refused:
        QuotaMiddleware(upstream, engine, pass_through=[*DEFAULT_PASS_THROUGH, entry])
    assert repr(entry) in str(refused.value)


def test_pass_through_is_checked_against_the_routes_metered(engine, upstream):
    for entry in ["GET /v1/files/*", "GET /v1/chat/completions", "DELETE /v1/models/*", "GET /"]:
        QuotaMiddleware(upstream, engine, pass_through=[entry])
    routes = {"/anthropic/v1/messages": Route(Api.ANTHROPIC, Metering.REQUESTS, "m2.7")}
    QuotaMiddleware(upstream, engine, routes=routes, pass_through=["POST /v1/messages"])
    with pytest.raises(ValueError, match="/anthropic/v1/messages"):
        QuotaMiddleware(upstream, engine, routes=routes, pass_through=["POST /anthropic/v1/*"])
    with pytest.raises(TypeError, match="pass_through"):
        QuotaMiddleware(upstream, engine, pass_through="GET /v1/files")


def answering_json_with_headers(headers):
    """An upstream app that reads the request and answers 200 ``{}`` with ``headers``."""

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    return app


def test_a_pass_through_answer_drops_the_upstreams_rate_limit_headers(engine, clock):
    # They are the operator's account limits (a metered answer carries the key's in their
    # place), as in the Go gateway.
    app = answering_json_with_headers(
        [
            (b"content-type", b"application/json"),
            (b"x-ratelimit-limit-requests", b"99999"),
            (b"X-RateLimit-Remaining-Tokens", b"99998"),
            (b"anthropic-ratelimit-tokens-limit", b"2000000"),
            (b"x-request-id", b"req-1"),
        ]
    )

    key = seated(engine, "pr", "tp-pr-1", "Starter")
    gateway = QuotaMiddleware(app, engine, clock=clock)
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/messages/count_tokens")]:
        answer = request(gateway, path, {}, key=key, method=method)
        assert answer.status == 200 and answer.headers["x-request-id"] == "req-1"
        assert not [name for name in answer.headers if "ratelimit" in name], answer.headers


def test_no_x_tally_header_of_the_upstreams_reaches_the_client(engine, clock):
    # x-tally-* say where the gateway charged the call: the upstream's own would pass for the
    # gateway's where the decision sets none (a pay-as-you-go key has no plan, a denial no
    # charge), so every one the upstream sent is dropped, on a metered answer and a
    # pass-through one alike, as in the Go gateway.
    app = answering_json_with_headers(
        [
            (b"content-type", b"application/json"),
            (b"X-Tally-Plan", b"Max"),
            (b"x-tally-limit", b"forged"),
            (b"x-tally-charged-to", b"nothing"),
            (b"x-tally-note", b"upstream"),
            (b"x-request-id", b"req-1"),
        ]
    )

    engine.create_user("sp", "tp-sp-1", at_ms=T)
    engine.create_payg_key("sp", "pg-sp-1", at_ms=T)
    gateway = QuotaMiddleware(app, engine, clock=clock)
    metered = request(gateway, CHAT, chat(max_tokens=16), key="pg-sp-1")
    assert metered.status == 200 and metered.headers["x-request-id"] == "req-1"
    tally_headers = {k: v for k, v in metered.headers.items() if k.startswith("x-tally-")}
    assert tally_headers == {"x-tally-charged-to": "pay_as_you_go"}
    passed = request(gateway, "/v1/models", {}, key="pg-sp-1", method="GET")
    assert passed.status == 200 and passed.headers["x-request-id"] == "req-1"
    assert not [k for k in passed.headers if k.startswith("x-tally-")], passed.headers


# 0 too: it would hold none of what the model writes, and the Go gateway cannot take it (its
# Config reads EstimateTokens 0 as its default, 4096; its command refuses -estimate-tokens 0).
@pytest.mark.parametrize("default_max_tokens", [MAX_QUANTITY, MAX_QUANTITY + 1, 2**63, -1, 0])
def test_an_estimate_the_engine_cannot_hold_fails_the_middleware_at_once(
    engine, upstream, default_max_tokens
):
    # As the Go gateway's New refuses it: the prompt's tokens (at least one) are added to it,
    # and one past the largest quantity would fail every call that names no maximum (400).
    with pytest.raises(ValueError, match="default_max_tokens"):
        QuotaMiddleware(upstream, engine, default_max_tokens=default_max_tokens)
    QuotaMiddleware(upstream, engine, default_max_tokens=MAX_QUANTITY - 1)


def test_routes_and_models_are_configurable(engine, upstream, clock):
    gateway = QuotaMiddleware(
        upstream,
        engine,
        clock=clock,
        routes={"/anthropic/v1/messages": Route(Api.ANTHROPIC, Metering.REQUESTS, "m2.7")},
        models={"claude-sonnet-4-5": "m2.7"},
    )
    key = seated(engine, "la", "tp-la-1", "Starter")
    assert request(gateway, "/anthropic/v1/messages", {"messages": []}, key=key).status == 200
    assert (
        request(gateway, "/anthropic/v1/messages", chat(model="claude-sonnet-4-5"), key=key).status
        == 200
    )
    assert engine.usage(key, at_ms=T + 1_000).limits[0].used == 2
    # No longer metered, nor passed through: refused, not served free of charge.
    assert request(gateway, CHAT, chat(), key=key).status == 403
    assert engine.usage(key, at_ms=T + 1_000).limits[0].used == 2


def test_engine_calls_can_run_off_the_event_loop(engine, upstream, clock):
    gateway = QuotaMiddleware(upstream, engine, clock=clock, run_sync=asyncio.to_thread)
    key = seated(engine, "ma", "tp-ma-1", "Starter")
    assert request(gateway, CHAT, chat(), key=key).status == 200
    assert engine.usage(key, at_ms=T + 1_000).limits[0].used == 1


def test_the_usage_reader_finds_tokens_in_json_and_events():
    reader = UsageReader("application/json")
    reader.feed(b'{"usage": {"input_tokens": 3, "output_tokens": 4}}')
    assert reader.tokens() == 7
    reader = UsageReader("application/json")
    reader.feed(b"not json")
    assert reader.tokens() is None
    reader = UsageReader("text/event-stream; charset=utf-8")
    reader.feed(b'data: {"usage": {"total_tokens": 9}}')  # no final newline
    assert reader.tokens() == 9


#: Answers and the tokens they report (None: no usage read, settled at the estimate), the same
#: table as the Go gateway's TestTheUsageCountsWhatEachAPIReports: both gateways must settle
#: the same answer alike.
USAGE_CASES = [
    # Anthropic's input_tokens leaves out the tokens read from or written to its prompt cache
    # (cache_read_input_tokens, cache_creation_input_tokens), which the upstream processed and
    # bills: a coding agent's prompt is mostly cached.
    (
        "application/json",
        b'{"type":"message","usage":{"input_tokens":5,"cache_creation_input_tokens":100,'
        b'"cache_read_input_tokens":1000,"output_tokens":20}}',
        1125,
    ),
    (
        "text/event-stream",
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":5,'
        b'"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":20}}\n\n',
        1125,
    ),
    (
        "text/event-stream",
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":5,'
        b'"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":1}}}\n\n'
        b'data: {"type":"message_delta","usage":{"input_tokens":5,'
        b'"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":20}}\n\n',
        1125,
    ),
    # Reports are cumulative: a later 0 (an Anthropic-compatible upstream's message_delta) does
    # not take back the input tokens message_start reported.
    (
        "text/event-stream",
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1}}}'
        b'\n\ndata: {"type":"message_delta","usage":{"input_tokens":0,"output_tokens":7}}\n\n',
        17,
    ),
    # Usage split across events is added up, not the last event's part alone.
    (
        "text/event-stream",
        b'data: {"usage":{"prompt_tokens":10}}\n\ndata: {"usage":{"completion_tokens":5}}\n\n'
        b"data: [DONE]\n\n",
        15,
    ),
    # OpenAI's cached tokens are part of prompt_tokens (and the Responses API's of
    # input_tokens): not counted twice.
    (
        "application/json",
        b'{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,'
        b'"prompt_tokens_details":{"cached_tokens":8}}}',
        15,
    ),
    (
        "application/json",
        b'{"usage":{"input_tokens":10,"output_tokens":5,"total_tokens":15,'
        b'"input_tokens_details":{"cached_tokens":8}}}',
        15,
    ),
    (
        "text/event-stream",
        b'data: {"type":"response.created","response":{"usage":null}}\n\n'
        b'data: {"type":"response.completed","response":{"usage":{"input_tokens":10,'
        b'"output_tokens":5,"total_tokens":15}}}\n\n',
        15,
    ),
    (
        "text/event-stream",
        b'data: {"choices":[],"usage":null}\n\ndata: {"choices":[],"usage":{"prompt_tokens":12,'
        b'"completion_tokens":18,"total_tokens":30}}\n\ndata: [DONE]\n\n',
        30,
    ),
    # An event line too long to be usage (a large content or tool-call delta) is skipped, and
    # the usage after it still read.
    (
        "text/event-stream",
        b'data: {"choices":[{"delta":{"content":"'
        + b"x" * (2 * MAX_EVENT_LINE_BYTES)
        + b'"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":18,'
        b'"total_tokens":30}}\n\ndata: [DONE]\n\n',
        30,
    ),
    # Each count is read by its exact name and on its own: a field of another type leaves the
    # rest read, and a "Usage" beside "usage" is not the usage.
    (
        "application/json",
        b'{"message":"done","usage":{"prompt_tokens":10,"completion_tokens":5,'
        b'"total_tokens":"15","input_tokens":-1}}',
        15,
    ),
    ("application/json", b'{"usage":{"total_tokens":15},"Usage":{"total_tokens":99}}', 15),
    (
        "text/event-stream",
        b'data: {"type":"message_start","message":"start"}\n\n'
        b'data: {"usage":{"output_tokens":7,"input_tokens":3.0}}\n\n',
        7,
    ),
    # A document that is no JSON by RFC 8259 is not read, as Go's encoding/json reads none:
    # NaN or Infinity anywhere in it, a byte order mark, UTF-16. Nor is one nested past
    # MAX_JSON_NESTING levels (the object itself is one; deeper than the interpreter's
    # recursion limit, Python's decoder raised RecursionError, no ValueError). Bytes that are
    # not UTF-8 inside a string are no reason to drop the usage beside them: Go reads them as
    # U+FFFD.
    ("application/json", b'{"usage":{"total_tokens":15},"logprob":NaN}', None),
    ("text/event-stream", b'data: {"usage":{"total_tokens":15},"x":-Infinity}\n\n', None),
    ("application/json", b'\xef\xbb\xbf{"usage":{"total_tokens":15}}', None),
    ("application/json", '{"usage":{"total_tokens":15}}'.encode("utf-16"), None),
    (
        "application/json",
        b'{"usage":{"total_tokens":15},"deep":' + b"[" * 511 + b"]" * 511 + b"}",
        15,
    ),
    (
        "application/json",
        b'{"usage":{"total_tokens":15},"deep":' + b"[" * 512 + b"]" * 512 + b"}",
        None,
    ),
    (
        "application/json",
        b'{"usage":{"total_tokens":15},"deep":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        None,
    ),
    (
        "application/json",
        b'{"usage":{"total_tokens":15},"text":"' + b'[{\\"' * 600 + b'"}',
        15,
    ),
    ("application/json", b'{"usage":{"total_tokens":15},"text":"\xff\xfe"}', 15),
    ("text/event-stream", b'data: {"text":"\xc3","usage":{"total_tokens":15}}\n\n', 15),
    # An event line is trimmed of Unicode spaces as Go's bytes.TrimSpace trims them (a no-break
    # space, U+0085, an ideographic space), not of other control characters.
    ("text/event-stream", b'data: {"usage":{"total_tokens":15}}\xc2\xa0\n\n', 15),
    ("text/event-stream", b'\xc2\x85data:\xe3\x80\x80{"usage":{"total_tokens":15}}\n\n', 15),
    ("text/event-stream", b'data: {"usage":{"total_tokens":15}}\x1c\n\n', None),
    # A name written with JSON escapes is the same name: both gateways read it.
    ("text/event-stream", b'data: {"\\u0075sage":{"total_tokens":15}}\n\n', 15),
    ("text/event-stream", b'data: {"usage":{"total\\u005ftokens":15}}\n\n', 15),
    # Nothing used is no report a successful answer can make: settled at the estimate.
    (
        "application/json",
        b'{"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}',
        None,
    ),
    ("application/json", b'{"choices":[]}', None),
    ("text/event-stream", b'data: {"choices":[]}\n\ndata: [DONE]\n\n', None),
]


@pytest.mark.parametrize(("content_type", "body", "tokens"), USAGE_CASES)
def test_the_usage_reader_counts_what_each_api_reports(content_type, body, tokens):
    reader = UsageReader(content_type)
    for start in range(0, len(body), 1 << 16):  # in pieces of 64 KiB, as a stream arrives
        reader.feed(body[start : start + (1 << 16)])
    assert reader.tokens() == tokens


def test_an_event_line_too_long_is_skipped_whole_however_it_arrives():
    # A line longer than MAX_EVENT_LINE_BYTES is content, not usage: skipped to its end, as
    # the Go gateway skips it, also when the whole line comes in one piece (an app sending
    # its answer in one message). Read then, it reported 15 tokens where Go charges the
    # estimate, and the bound held only for lines split over pieces.
    line = (
        b'data: {"usage":{"total_tokens":15},"text":"'
        + b"x" * MAX_EVENT_LINE_BYTES
        + b'"}\n\ndata: {"choices":[]}\n\n'
    )
    for pieces in ([line], [line[:100], line[100:]]):
        reader = UsageReader("text/event-stream")
        for piece in pieces:
            reader.feed(piece)
        assert reader.tokens() is None, [len(piece) for piece in pieces]
    # The usage after it is still read.
    reader = UsageReader("text/event-stream")
    reader.feed(line + b'data: {"usage":{"total_tokens":30}}\n\n')
    assert reader.tokens() == 30


def test_without_a_clock_a_denials_reset_is_hours_away_not_decades(engine):
    # The default middleware has no clock: the engine's is the wall clock. A denial carries no
    # time of its own (at_ms 0), and the reset was counted from 1970.
    now = int(time.time() * 1000)
    key = seated(engine, "di", "tp-di-1", "Starter")
    engine.consume(key, "m2.7", {"requests": 1500}, at_ms=now)
    denied = engine.consume(key, "m2.7", {"requests": 1}, at_ms=now)
    assert not denied.admitted and denied.at_ms == 0
    headers = dict(rate_limit_headers(Api.OPENAI, denied, None))
    reset = headers[b"x-ratelimit-reset-requests"].decode()
    hours = int(reset.split("h")[0]) if "h" in reset else 0
    assert reset.endswith("s") and hours <= 5, reset  # the 5-hour window, give or take


def two_keys(app, path: str, bearer: str, x_api_key: str, body: dict[str, Any]) -> Response:
    """A request carrying a key in both headers (``request`` sends one)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {bearer}".encode()),
        (b"x-api-key", x_api_key.encode()),
    ]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    incoming = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    return exchange(app, scope, incoming)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_two_different_keys_are_401_and_charge_neither(engine, gateway, upstream, path):
    # Which header wins would decide whose quota pays; the Go gateway and this middleware once
    # chose differently. A request with two different credentials is refused, as the Go
    # gateway refuses it; the same key in both headers is one key.
    ada = seated(engine, "ada", "tp-ada-1", "Starter")
    bo = seated(engine, "bo", "tp-bo-1", "Starter")
    for bearer, x_api_key in [(ada, bo), (bo, ada), (ada, "tp-nobody")]:
        answer = two_keys(gateway, path, bearer, x_api_key, chat(max_tokens=16))
        assert answer.status == 401, (bearer, x_api_key, answer.status, answer.body)
        assert "two different API keys" in answer.body.decode()
    assert upstream.calls == []
    assert two_keys(gateway, path, ada, ada, chat(max_tokens=16)).status == 200
    assert engine.usage(ada, at_ms=T + HOUR_MS).limits[0].used == 1
    assert engine.usage(bo, at_ms=T + HOUR_MS).limits[0].used == 0


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_an_unknown_model_and_one_no_model_can_be_are_404(engine, gateway, upstream, path):
    # As the upstream answers a model it does not have, and as the Go gateway answers: the
    # client can only pick another model. A name too long for any resource, or holding a NUL,
    # is such a model too (not a 400, nor a 401 as if the key were at fault).
    key = seated(engine, "ada", "tp-ada-1", "Starter")
    header = "x-api-key" if path == MESSAGES else "authorization"
    for model in ["gpt-99", "minimax-m2.7", "m" * (_native.MAX_NAME_BYTES + 1), "m2.7\x00"]:
        answer = request(gateway, path, chat(model=model), key=key, header=header)
        assert answer.status == 404, (model, answer.status, answer.body)
        if path == MESSAGES:
            assert answer.json()["error"]["type"] == "not_found_error"
        else:
            assert answer.json()["error"]["code"] == "model_not_found"
    assert upstream.calls == []


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (errors.StringTooLongError(4, "key: is 300 bytes; at most 256"), 401, "invalid_api_key"),
        (errors.NulInStringError(5, "key: contains a NUL at byte 3"), 401, "invalid_api_key"),
        (errors.StringTooLongError(4, "resource: is 65 bytes; at most 64"), 404, "model_not_found"),
        (errors.InvalidUtf8Error(2, "resource: is not valid UTF-8"), 404, "model_not_found"),
        (errors.StringTooLongError(4, "request_id: is 300 bytes; at most 256"), 500, None),
        (errors.NulInStringError(5, "request_id: contains a NUL at byte 0"), 500, None),
    ],
)
@pytest.mark.parametrize("path", [CHAT, IMAGES])
def test_a_string_error_is_answered_for_the_argument_it_names(
    engine, gateway, upstream, monkeypatch, error, status, kind, path
):
    # Only the key's own errors make a 401; a model name no resource can have is an unknown
    # model (404); any other string is the middleware's own (its request id): 500, its fault,
    # not the client's credential.
    key = seated(engine, "ada", "tp-ada-1", "Plus")

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(engine, "reserve", fail)
    monkeypatch.setattr(engine, "consume", fail)
    body = {"model": "image-01", "n": 1} if path == IMAGES else chat()
    answer = request(gateway, path, body, key=key)
    assert answer.status == status, (answer.status, answer.body)
    assert answer.json()["error"]["code"] == (kind or "internal_error")
    assert upstream.calls == []


def test_a_denial_waiting_cannot_help_is_not_a_429_to_retry(engine, gateway, upstream):
    # As the Go gateway answers: a request larger than the whole limit is the request's fault
    # (400, like one over the per-request maximum), and on Anthropic's routes a key whose plan
    # cannot serve the model is refused 403 permission_error, not a 429 its SDK retries.
    plus = seated(engine, "ha", "tp-ha-1", "Plus")
    too_big = request(gateway, IMAGES, {"model": "image-01", "n": 51}, key=plus)
    assert too_big.status == 400 and "retry-after" not in too_big.headers
    error = too_big.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert "waiting cannot help" in error["message"]
    engine.create_user("jo", "tp-jo-1", at_ms=T)
    for key, message in [("tp-jo-1", "no Token Plan seat"), (plus, "does not cover")]:
        body = chat(model="MiniMax-M2.7" if key == "tp-jo-1" else "m2.7-highspeed")
        denied = request(gateway, MESSAGES, body, key=key, header="x-api-key")
        assert denied.status == 403 and "retry-after" not in denied.headers, denied.body
        assert denied.json()["error"]["type"] == "permission_error"
        assert message in denied.json()["error"]["message"]
        # OpenAI's clients know 429 insufficient_quota (the API's own answer): unchanged.
        assert request(gateway, CHAT, body, key=key).status == 429
    assert upstream.calls == []


def test_an_openai_429s_type_is_the_unit_of_the_limit_that_denied(engine, gateway):
    # OpenAI's API says "requests" or "tokens": the unit the x-ratelimit-*-<unit> headers name,
    # as the Go gateway answers (a shared usage bar: "usage").
    starter = seated(engine, "ad", "tp-ad-1", "Starter")
    engine.consume(starter, "m2.7", {"requests": 1500}, at_ms=T)
    denied = request(gateway, CHAT, chat(), key=starter)
    assert denied.status == 429 and denied.json()["error"]["type"] == "requests"
    assert denied.json()["error"]["code"] == "rate_limit_exceeded"
    bar = seated(engine, "bu", "tp-bu-1", "Bar-Plus")
    engine.consume(bar, "m2.7", {"requests": 1, "tokens": 1_997_000}, at_ms=T)
    denied = request(gateway, CHAT, chat(max_tokens=256), key=bar)
    assert denied.status == 429 and denied.json()["error"]["type"] == "usage", denied.body
    assert "x-ratelimit-limit-usage" in denied.headers


def test_reset_headers_say_when_the_limit_is_whole_and_x_tally_says_where(engine, gateway):
    # As the Go gateway answers: the reset is when the limit is whole again, Retry-After when
    # this call would fit; x-tally-* name the plan, the limit and (admitted) the charge.
    engine.create_user("re", "tp-re-1", at_ms=T - 2 * HOUR_MS)
    engine.assign_seat("@re", "re", "Starter", at_ms=T - 2 * HOUR_MS)
    engine.consume("tp-re-1", "m2.7", {"requests": 1400}, at_ms=T - HOUR_MS)
    engine.consume("tp-re-1", "m2.7", {"requests": 99}, at_ms=T)
    body = chat(max_tokens=16)
    admitted = request(gateway, MESSAGES, body, key="tp-re-1", header="x-api-key")
    assert admitted.status == 200
    assert admitted.headers["x-tally-plan"] == "Starter"
    assert admitted.headers["x-tally-charged-to"] == "plan_quota"
    assert admitted.headers["x-tally-limit"] == "m2.7:requests per rolling:5h"
    denied = request(gateway, MESSAGES, body, key="tp-re-1", header="x-api-key")
    check = engine.check("tp-re-1", "m2.7", {"requests": 1}, at_ms=T + 100)
    assert check.retry_at_ms is not None and check.reset_at_ms is not None
    assert check.retry_at_ms < check.reset_at_ms
    assert denied.status == 429
    assert int(denied.headers["retry-after"]) == (check.retry_at_ms - T) // 1000
    reset_s = (check.reset_at_ms - T) // 1000
    hours, rest = divmod(reset_s, 3600)
    assert denied.headers["x-ratelimit-reset-requests"] == f"{hours}h{rest // 60}m{rest % 60}s"
    reset_at = datetime.datetime.fromtimestamp(check.reset_at_ms / 1000, tz=datetime.timezone.utc)
    assert denied.headers["anthropic-ratelimit-requests-reset"] == reset_at.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert (
        denied.headers["x-tally-plan"] == "Starter" and "x-tally-charged-to" not in denied.headers
    )


@pytest.mark.parametrize(
    "error",
    [
        errors.ClosedError(errors.ClosedError.status_code, "the engine is closed"),
        errors.StorageError(errors.StorageError.status_code, "the database failed"),
        errors.PoisonedError(errors.PoisonedError.status_code, "an earlier call panicked"),
    ],
)
@pytest.mark.parametrize("path", [CHAT, MESSAGES, "/v1/models"])
def test_an_engine_that_cannot_decide_is_503(engine, gateway, upstream, monkeypatch, error, path):
    # The quota service could not decide: 503, which a client may retry later, in each API's
    # shape (OpenAI's server_error, Anthropic's api_error), as the Go gateway answers.
    key = seated(engine, "ada", "tp-ada-1", "Starter")

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    for name in ("reserve", "consume", "usage"):
        monkeypatch.setattr(engine, name, fail)
    method = "GET" if path == "/v1/models" else "POST"
    answer = request(gateway, path, chat(), key=key, method=method)
    assert answer.status == 503, answer.body
    if path == MESSAGES:
        assert answer.json()["error"]["type"] == "api_error"
    else:
        assert answer.json()["error"]["type"] == "server_error"
        assert answer.json()["error"]["code"] == "service_unavailable"
    assert upstream.calls == []


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions/", "//v1/chat/completions", "/v1/./chat/completions"]
)
def test_a_metered_routes_path_spelled_otherwise_is_still_metered(engine, gateway, upstream, path):
    # An upstream may serve these as the route itself: metered, and passed on as the route they
    # clean to, not proxied free of charge (as in the Go gateway).
    key = seated(engine, "pa", "tp-pa-1", "Starter")
    assert request(gateway, path, chat(max_tokens=16), key=key).status == 200
    assert engine.usage(key, at_ms=T + HOUR_MS).limits[0].used == 1
    assert [call["path"] for call in upstream.calls] == [CHAT]


def test_responses_and_embeddings_are_metered_in_tokens(engine, upstream, clock):
    # As the Go gateway meters them: these routes passed through free of charge. The Responses
    # API streams its usage inside "response" (response.completed).
    async def responses_stream(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        upstream.calls.append({"path": scope["path"], "body": {}})
        completed = {
            "type": "response.completed",
            "response": {"usage": {"input_tokens": 40, "output_tokens": 60, "total_tokens": 100}},
        }
        events = [{"type": "response.output_text.delta", "delta": "hi"}, completed]
        text = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": text.encode(), "more_body": False})

    engine.create_user("re", "tp-re-1", at_ms=T)
    engine.top_up("@re", 1_000_000, at_ms=T)
    gateway = QuotaMiddleware(upstream, engine, clock=clock)
    upstream.tokens = (120, 380)
    for path in ["/v1/responses", "/v1/embeddings"]:
        assert request(gateway, path, chat(max_tokens=1000), key="tp-re-1").status == 200
    # 2 requests at 2,000 micros plus 2 x 500 tokens at 1 micro: the actual, not the estimate.
    assert engine.credits("@re") == 1_000_000 - 2 * (2_000 + 500)
    streaming = QuotaMiddleware(responses_stream, engine, clock=clock)
    body = chat(max_tokens=1000, stream=True)
    assert request(streaming, "/v1/responses", body, key="tp-re-1").status == 200
    assert engine.credits("@re") == 1_000_000 - 2 * (2_000 + 500) - (2_000 + 100)
    assert engine.usage("tp-re-1", at_ms=T + HOUR_MS).open_reservations == 0


def test_the_gateways_rate_limit_headers_replace_the_upstreams(engine, clock):
    # The client is limited by the key's quota, not by the operator's account upstream (whose
    # limits would also leak): tally's headers replace the app's rate-limit headers, all of
    # them, once each, as in the Go gateway.
    app = answering_json_with_headers(
        [
            (b"content-type", b"application/json"),
            (b"x-ratelimit-limit-requests", b"99999"),
            (b"X-RateLimit-Remaining-Requests", b"99998"),
            (b"x-ratelimit-limit-tokens", b"2000000"),
            (b"anthropic-ratelimit-tokens-limit", b"2000000"),
            (b"x-request-id", b"req-1"),
        ]
    )

    key = seated(engine, "up", "tp-up-1", "Starter")
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    incoming = [{"type": "http.request", "body": json.dumps(chat()).encode()}]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(QuotaMiddleware(app, engine, clock=clock)(scope, receive, send))
    headers = [(bytes(k).lower(), bytes(v)) for k, v in sent[0]["headers"]]
    assert [v for k, v in headers if k == b"x-ratelimit-limit-requests"] == [b"1500"]
    assert [v for k, v in headers if k == b"x-ratelimit-remaining-requests"] == [b"1499"]
    assert (b"x-request-id", b"req-1") in headers
    assert not [k for k, _ in headers if k.endswith(b"-tokens") or b"tokens-" in k]


def test_the_estimate_takes_the_first_maximum_and_refuses_one_past_the_largest(engine, gateway):
    # As the Go gateway estimates: the first maximum the body names, a token per 4 bytes of
    # body, plus one. A maximum the engine cannot hold is the client's error (400), not one
    # quietly cut down to the largest quantity and sent upstream.
    key = seated(engine, "es", "tp-es-1", "Bar-Plus")
    body = chat(max_tokens=10, max_completion_tokens=5000)
    admitted = request(gateway, CHAT, body, key=key)
    estimate = len(json.dumps(body).encode()) // 4 + 1 + 10
    assert admitted.status == 200
    assert admitted.headers["x-ratelimit-remaining-usage"] == str(2_000_000 - 2_000 - estimate)
    for max_tokens in (2**41, 2**64 - 1, 2**70):
        too_many = request(gateway, CHAT, chat(max_tokens=max_tokens), key=key)
        assert too_many.status == 400, (max_tokens, too_many.status, too_many.body)
        assert too_many.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "n, output", [(3, 30), (1, 10), (-2, 10), ("3", 10), (2.0, 10), (None, 10), (True, 10)]
)
def test_a_chat_call_for_n_completions_holds_n_times_its_maximum(engine, gateway, n, output):
    # As the Go gateway's test of the same name: n completions may write n times the maximum,
    # so the hold is that; an n that is no positive integer is passed over. Held at one
    # maximum, a call with n = 8 whose output beyond the hold did not fit was charged an eighth.
    key = seated(engine, "nn", "tp-nn-1", "Bar-Plus")
    body = chat(max_tokens=10, n=n)
    admitted = request(gateway, CHAT, body, key=key)
    estimate = len(json.dumps(body).encode()) // 4 + 1 + output
    assert admitted.status == 200, admitted.body
    assert admitted.headers["x-ratelimit-remaining-usage"] == str(2_000_000 - 2_000 - estimate)
    # An n whose hold the engine cannot take is the client's error, not an outage.
    too_many = request(gateway, CHAT, chat(max_tokens=10, n=2**40), key=key)
    assert too_many.status == 400, too_many.body


@pytest.mark.parametrize(
    "extra, output",
    [
        ({"best_of": 4}, 40),
        ({"best_of": 4, "n": 2}, 40),
        ({"best_of": 1, "n": 3}, 30),
        ({"best_of": "4"}, 10),
        ({"best_of": 0}, 10),
    ],
)
def test_a_completion_with_best_of_holds_best_of_times_its_maximum(engine, gateway, extra, output):
    # As the Go gateway's test of the same name: a legacy completion with best_of has the
    # model write best_of candidates (billed, whatever n returns), so the hold is the maximum
    # times the larger of n and best_of. Held at one maximum, the output beyond the hold that
    # did not fit was charged at the estimate, a quarter of what was written for best_of 4.
    key = seated(engine, "bo", "tp-bo-1", "Bar-Plus")
    body = {"model": "MiniMax-M2.7", "prompt": "hello", "max_tokens": 10, **extra}
    admitted = request(gateway, "/v1/completions", body, key=key)
    estimate = len(json.dumps(body).encode()) // 4 + 1 + output
    assert admitted.status == 200, admitted.body
    assert admitted.headers["x-ratelimit-remaining-usage"] == str(2_000_000 - 2_000 - estimate)


def test_an_embedding_holds_its_input_alone(engine, gateway):
    # As the Go gateway's test of the same name: an embedding writes no output, so its hold is
    # the input's estimate alone, not default_max_tokens more, which turned a key with room
    # for the embedding away (429) near its limit.
    key = seated(engine, "em", "tp-em-1", "Bar-Plus")
    body = {"model": "MiniMax-M2.7", "input": "the quick brown fox", "max_tokens": 10}
    admitted = request(gateway, "/v1/embeddings", body, key=key)
    estimate = len(json.dumps(body).encode()) // 4 + 1
    assert admitted.status == 200, admitted.body
    assert admitted.headers["x-ratelimit-remaining-usage"] == str(2_000_000 - 2_000 - estimate)


def test_the_bodys_fields_are_read_by_their_exact_names(engine, gateway):
    # As the upstream reads them, and as the Go gateway's test of the same name: a "Model" or
    # "MAX_TOKENS" beside "model" and "max_tokens" must not choose what is metered (a cheaper
    # model than the one served, a smaller hold).
    key = seated(engine, "ex", "tp-ex-1", "Bar-Plus")
    raw = (
        b'{"model":"MiniMax-M2.7-highspeed","Model":"MiniMax-M2.7","max_tokens":10,'
        b'"MAX_TOKENS":1,"messages":[]}'
    )
    answer = request(gateway, CHAT, key=key, raw=raw)
    estimate = len(raw) // 4 + 1 + 10
    assert answer.status == 200, answer.body
    assert answer.headers["x-ratelimit-remaining-usage"] == str(2_000_000 - 4_000 - 2 * estimate)


CALLS_ONLY_POLICY = """
time_zone = "UTC"
[resources."m2.7"]
units = ["requests"]
required = ["requests"]
price_micros = { requests = 1 }
[plans.Starter]
limits = [{ resource = "m2.7", unit = "requests", amount = 7, window = "rolling:5h" }]
"""


def test_the_middleware_meters_what_a_swapped_in_policy_says(engine, gateway, upstream):
    # The units a resource meters are read again after a swap on the engine
    # (Engine.policy_version), as the Go gateway reads them: a model the new policy meters by
    # calls alone is charged one request, and one it dropped is not served, without a new
    # middleware or a call to refresh_policy.
    key = seated(engine, "sw", "tp-sw-1", "Plus")
    assert request(gateway, CHAT, chat(max_tokens=16), key=key).status == 200
    before = engine.policy_version
    with pytest.raises(tally.InvalidArgumentError):
        engine.swap_policy(tally.Policy.toml(CALLS_ONLY_POLICY), at_ms=T)  # Plus has a seat
    assert engine.policy_version == before
    engine.unassign_seat("@sw", "sw", at_ms=T)
    engine.swap_policy(tally.Policy.toml(CALLS_ONLY_POLICY), at_ms=T)
    assert engine.policy_version == before + 1
    engine.assign_seat("@sw", "sw", "Starter", at_ms=T)
    # The request before the swap carries over (the same meter, on the same window).
    assert [limit.used for limit in engine.usage(key, at_ms=T + 1).limits] == [1]
    answer = request(gateway, CHAT, chat(model="m2.7", max_tokens=16), key=key)
    assert answer.status == 200, answer.body
    assert [limit.used for limit in engine.usage(key, at_ms=T + 1).limits] == [2]
    answer = request(gateway, SPEECH, {"model": "speech-2.8-hd", "input": "hi"}, key=key)
    assert answer.status == 404, answer.body


def test_a_model_metered_by_calls_alone_holds_no_token_estimate_to_refuse(engine, upstream, clock):
    # Its tokens are not held, so no estimate of them is too large: a max_tokens past the
    # engine's largest quantity is the upstream's to judge, and the call is charged one
    # request, as the Go gateway charges it. It was 400 ("may use ... tokens"), refused for
    # tokens the resource does not meter.
    engine.swap_policy(tally.Policy.toml(CALLS_ONLY_POLICY), at_ms=T)
    key = seated(engine, "ct", "tp-ct-1", "Starter")
    gateway = QuotaMiddleware(upstream, engine, clock=clock)
    for path in (CHAT, MESSAGES):
        answer = request(gateway, path, chat(model="m2.7", max_tokens=MAX_QUANTITY), key=key)
        assert answer.status == 200, answer.body
    assert [limit.used for limit in engine.usage(key, at_ms=T + 1).limits] == [2]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"MiniMax-M2.7","max_tokens":NaN,"messages":[]}',
        b'{"model":"MiniMax-M2.7","max_tokens":Infinity,"messages":[]}',
        b'{"model":"MiniMax-M2.7","max_tokens":16,"messages":[{"role":"user","content":"\xff"}]}',
        b'\xef\xbb\xbf{"model":"MiniMax-M2.7","max_tokens":16,"messages":[]}',
        '{"model":"MiniMax-M2.7","max_tokens":16,"messages":[]}'.encode("utf-16"),
    ],
)
def test_a_body_that_is_not_json_is_400(engine, gateway, upstream, raw):
    # NaN and Infinity are no JSON numbers, and JSON is UTF-8 without a byte order mark (RFC
    # 8259), as the Go gateway reads a body: json.loads alone takes all of these, and the call
    # was metered and passed on.
    key = seated(engine, "nj", "tp-nj-1", "Plus")
    answer = request(gateway, CHAT, key=key, raw=raw)
    assert answer.status == 400, answer.body
    assert answer.json()["error"]["message"] == "The request body is not valid JSON."
    assert upstream.calls == []


@pytest.mark.parametrize("depth", [600, 5_000, 20_000])
def test_a_body_nested_too_deep_is_400(engine, gateway, upstream, depth):
    # A body nested past the decoder's recursion limit raised RecursionError (no ValueError)
    # out of the middleware: a 500 for the client's own malformed call. Bodies nested past
    # MAX_JSON_NESTING levels are refused, neither metered nor passed on, as the Go gateway
    # refuses them (encoding/json alone read up to 10,000 levels and passed them on).
    key = seated(engine, "dn", "tp-dn-1", "Plus")
    content = b"[" * depth + b"]" * depth
    raw = b'{"model":"MiniMax-M2.7","max_tokens":16,"messages":' + content + b"}"
    answer = request(gateway, CHAT, key=key, raw=raw)
    assert answer.status == 400, answer.body
    assert answer.json()["error"]["message"] == (
        f"The request body is nested deeper than {MAX_JSON_NESTING} levels."
    )
    assert upstream.calls == []
    assert engine.usage(key, at_ms=T + 1).limits[0].used == 0
    # At the bound, the body is read, metered and passed on.
    shallow = b"[" * (MAX_JSON_NESTING - 1) + b"]" * (MAX_JSON_NESTING - 1)
    raw = b'{"model":"MiniMax-M2.7","max_tokens":16,"messages":' + shallow + b"}"
    assert request(gateway, CHAT, key=key, raw=raw).status == 200


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_a_model_that_cannot_take_the_call_is_400_not_an_outage(engine, gateway, upstream, path):
    # A chat call on a model whose resource cannot take what the call is counted in (a speech
    # model, which must carry characters) is the request's fault: 400 in the API's shape, not a
    # 503 outage a client would retry, as the Go gateway answers it.
    key = seated(engine, "sp", "tp-sp-1", "Bar-Plus")
    answer = request(gateway, path, chat(model="speech-2.8-hd", max_tokens=16), key=key)
    assert answer.status == 400, answer.body
    assert answer.json()["error"]["type"] == "invalid_request_error"
    if path == CHAT:
        assert answer.json()["error"]["code"] is None
    assert upstream.calls == []


def test_a_json_answer_broken_off_is_charged_its_estimate(engine, clock):
    # An answer the app began with 200 and broke off was served upstream: the call is charged
    # its estimate, as a stream broken off is charged what it reported, and as the Go gateway's
    # test of the same name charges it, not voided as if the upstream had failed.
    async def broken(scope, receive, send):
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = b'{"object":"chat.completion","choices":[{"message":{"content":"hi'
        await send({"type": "http.response.body", "body": body, "more_body": True})
        raise RuntimeError("the upstream went away")

    gateway = QuotaMiddleware(broken, engine, clock=clock)
    key = seated(engine, "bk", "tp-bk-1", "Bar-Plus")
    raw = b'{"model":"MiniMax-M2.7","max_tokens":100,"messages":[]}'
    with pytest.raises(RuntimeError):
        request(gateway, CHAT, key=key, raw=raw)
    usage = engine.usage(key, at_ms=T + HOUR_MS)
    assert usage.limits[0].used == 2_000 + len(raw) // 4 + 1 + 100
    assert usage.open_reservations == 0


ANSWER = (
    b'{"object":"chat.completion","choices":[{"message":{"content":"'
    + b"hi " * 200
    + b'"}}],"usage":{"prompt_tokens":12,"completion_tokens":18,"total_tokens":30}}'
)


@pytest.mark.parametrize(
    ("sent", "tokens"),
    [
        (gzip.compress(ANSWER)[:-8], 30),  # no trailer: the usage arrived
        (gzip.compress(ANSWER)[: len(gzip.compress(ANSWER)) // 2], None),  # it did not
    ],
)
def test_a_truncated_gzip_answer_is_passed_on_and_charged_what_arrived(engine, clock, sent, tokens):
    # A gzip answer the upstream sent whole, 200, but cut short inside was served upstream:
    # the client gets it as sent (its decoder sees where it breaks off), and the call is charged
    # the usage that arrived, or its estimate when the usage went with the rest, as the Go
    # gateway's test of the same name charges it.
    async def cut(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": sent[:9], "more_body": True})
        await send({"type": "http.response.body", "body": sent[9:]})

    gateway = QuotaMiddleware(cut, engine, clock=clock)
    key = seated(engine, "tg", "tp-tg-1", "Bar-Plus")
    raw = b'{"model":"MiniMax-M2.7","max_tokens":100,"messages":[]}'
    answer = request(gateway, CHAT, key=key, raw=raw)
    assert answer.status == 200 and answer.body == sent
    charged = tokens if tokens is not None else len(raw) // 4 + 1 + 100
    usage = engine.usage(key, at_ms=T + HOUR_MS)
    assert usage.limits[0].used == 2_000 + charged
    assert usage.open_reservations == 0


def test_an_answer_nested_too_deep_is_served_and_charged_its_estimate(engine, clock):
    # An answer nested past the decoder's recursion limit raised RecursionError (no
    # ValueError) out of the usage reader and the middleware, before the call was settled. It
    # is served, and charged its estimate, as an answer without a usage is (and as the Go
    # gateway settles it).
    body = b'{"usage":{"total_tokens":15},"deep":' + b"[" * 5_000 + b"]" * 5_000 + b"}"

    async def deep(scope, receive, send):
        await receive()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    gateway = QuotaMiddleware(deep, engine, clock=clock)
    key = seated(engine, "dp", "tp-dp-1", "Bar-Plus")
    raw = b'{"model":"MiniMax-M2.7","max_tokens":100,"messages":[]}'
    answer = request(gateway, CHAT, key=key, raw=raw)
    assert answer.status == 200
    assert answer.body == body
    usage = engine.usage(key, at_ms=T + HOUR_MS)
    assert usage.limits[0].used == 2_000 + len(raw) // 4 + 1 + 100
    assert usage.open_reservations == 0


@pytest.mark.parametrize(("path", "header"), [(CHAT, "authorization"), (MESSAGES, "x-api-key")])
def test_a_key_beyond_ascii_is_read_as_utf8(engine, gateway, path, header):
    # A key the engine holds is UTF-8, and so is a header carrying one that is not ASCII: the
    # key as created is admitted, as the Go gateway reads it (not its bytes taken as Latin-1).
    key = seated(engine, "ut", "tp-clé-ü", "Starter")
    answer = request(gateway, path, chat(max_tokens=16), key=key, header=header)
    assert answer.status == 200, answer.body


@pytest.mark.parametrize(
    ("maximums", "output"),
    [
        (b'"max_tokens":-1', 4096),
        (b'"max_tokens":"100"', 4096),
        (b'"max_tokens":100.0', 4096),
        (b'"max_tokens":true', 4096),
        (b'"max_tokens":"100","max_completion_tokens":10', 10),
        (b'"max_tokens":null,"max_output_tokens":12.5', 4096),
    ],
)
def test_a_maximum_that_is_no_positive_integer_is_passed_over(engine, gateway, maximums, output):
    # As the Go gateway's test of the same name: the estimate takes the next maximum the body
    # names, or the default, and the upstream judges the body.
    key = seated(engine, "mx", "tp-mx-1", "Bar-Plus")
    raw = b'{"model":"MiniMax-M2.7",' + maximums + b',"messages":[]}'
    answer = request(gateway, CHAT, key=key, raw=raw)
    estimate = len(raw) // 4 + 1 + output
    assert answer.status == 200, answer.body
    assert answer.headers["x-ratelimit-remaining-usage"] == str(2_000_000 - 2_000 - estimate)


def test_an_anthropic_reset_is_a_time_when_nothing_is_counted(engine, gateway):
    # A limit with nothing counted in its window is whole now: Anthropic's reset header says so
    # as a time (RFC 3339, as Anthropic's clients parse it), on a denial too, as the Go gateway
    # says it; not "unknown".
    key = seated(engine, "rz", "tp-rz-1", "Bar-Plus")
    answer = request(gateway, MESSAGES, chat(max_tokens=5_000_000), key=key, header="x-api-key")
    assert answer.status == 400, answer.body
    assert answer.headers["anthropic-ratelimit-usage-reset"] == "2030-03-17T17:46:40Z"


def test_a_stream_ended_before_its_final_usage_is_charged_its_estimate(engine, clock):
    # An Anthropic stream reports its output tokens in message_delta, at its end;
    # message_start's usage (the input, 1 output token) is not the call's. A stream that ends
    # without it (broken off, or a client that read the text and left before message_delta) is
    # charged its estimate, not its input and 1 token, as in the Go gateway's test of the same
    # name.
    async def cut(scope, receive, send):
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        events = (
            b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
            b'{"input_tokens":10,"output_tokens":1}}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":'
            b'{"text":"the whole answer"}}\n\n'
        )
        await send({"type": "http.response.body", "body": events, "more_body": False})

    gateway = QuotaMiddleware(cut, engine, clock=clock)
    key = seated(engine, "cu", "tp-cu-1", "Bar-Plus")
    raw = b'{"model":"MiniMax-M2.7","max_tokens":100,"stream":true,"messages":[]}'
    assert request(gateway, MESSAGES, key=key, raw=raw, header="x-api-key").status == 200
    usage = engine.usage(key, at_ms=T + HOUR_MS)
    assert usage.limits[0].used == 2_000 + len(raw) // 4 + 1 + 100
    assert usage.open_reservations == 0


def test_a_malformed_requests_openai_error_has_a_null_code(engine, gateway):
    # As OpenAI's API and the Go gateway answer: the code names a known condition only.
    key = seated(engine, "nc", "tp-nc-1", "Plus")
    for path, raw in [
        (CHAT, b"{not json"),
        (SPEECH, b'{"model": "speech-2.8-hd", "input": ""}'),
        (IMAGES, b'{"model": "image-01", "n": 0}'),
    ]:
        answer = request(gateway, path, key=key, raw=raw)
        assert answer.status == 400, (path, answer.body)
        error = answer.json()["error"]
        assert error["code"] is None and error["type"] == "invalid_request_error", path


def test_a_body_is_bounded_at_32_mib_as_in_the_go_gateway(engine, gateway, upstream):
    # Anthropic's Messages API takes bodies up to 32 MB (long contexts, images): the Go
    # gateway's default bound, and the middleware's.
    key = seated(engine, "lb", "tp-lb-1", "Starter")
    big = chat(messages=[{"role": "user", "content": "x" * (20 << 20)}])
    assert request(gateway, CHAT, big, key=key).status == 200
    huge = chat(messages=[{"role": "user", "content": "x" * (33 << 20)}])
    too_large = request(gateway, CHAT, huge, key=key)
    assert too_large.status == 413
    assert too_large.json()["error"]["code"] == "request_too_large"
    assert len(upstream.calls) == 1


def test_a_reservation_outlives_a_twenty_minute_response(engine, clock):
    # A long generation streams for many minutes: the reservation's lease must outlast it, or
    # the settle finds it gone and the actual tokens are not what is charged. 30 minutes by
    # default, as in the Go gateway (the engine's own default is 10).
    upstream = Upstream()
    upstream.tokens = (120, 380)

    async def slow(scope, receive, send) -> None:
        clock.now += 20 * 60_000
        await upstream(scope, receive, send)

    engine.create_user("lo", "tp-lo-1", at_ms=T)
    engine.top_up("@lo", 1_000_000, at_ms=T)
    gateway = QuotaMiddleware(slow, engine, clock=clock)
    assert request(gateway, CHAT, chat(max_tokens=1000), key="tp-lo-1").status == 200
    assert engine.credits("@lo") == 1_000_000 - (2_000 + 500)
    assert engine.usage("tp-lo-1", at_ms=clock.now + 1).open_reservations == 0


@pytest.mark.parametrize("path", [CHAT, MESSAGES, IMAGES])
def test_an_app_that_fails_before_answering_is_502_in_the_apis_shape(engine, clock, path):
    # As the Go gateway answers an upstream it could not reach: 502 in the API's shape (not
    # the server's bare 500), without the failure's detail (an upstream address), and nothing
    # charged; the exception still reaches the server to log.
    async def broken(scope, receive, send) -> None:
        raise ConnectionError("connect to 10.0.0.7:443 refused")

    engine.create_user("br", "tp-br-1", at_ms=T)
    engine.top_up("@br", 1_000_000, at_ms=T)
    gateway = QuotaMiddleware(broken, engine, clock=clock)
    body = {"model": "image-01", "n": 1} if path == IMAGES else chat()
    headers = [(b"authorization", b"Bearer tp-br-1")]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    incoming = [{"type": "http.request", "body": json.dumps(body).encode()}]
    sent: list[dict[str, Any]] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    with pytest.raises(ConnectionError):
        asyncio.run(gateway(scope, receive, send))
    assert sent[0]["status"] == 502
    error = json.loads(sent[1]["body"])["error"]
    if path == MESSAGES:
        assert error["type"] == "api_error"
    else:
        assert error["type"] == "server_error" and error["code"] == "upstream_error"
    assert "10.0.0.7" not in error["message"]
    assert engine.credits("@br") == 1_000_000


def test_a_websocket_needs_a_known_key_and_a_route_that_passes_through(engine, upstream):
    # The Go gateway checks the key of every request, a websocket upgrade too, and refuses a
    # route that is not metered and does not pass through; here such a websocket is closed
    # before it is accepted (the server answers the handshake 403, as the Go gateway answers
    # it). Its handshake is a GET: it passes where "GET /path" does.
    key = seated(engine, "ws", "tp-ws-1", "Starter")
    opened: list[str] = []

    async def app(scope, receive, send) -> None:
        opened.append(scope["path"])

    default = QuotaMiddleware(app, engine)
    realtime = QuotaMiddleware(
        app, engine, pass_through=[*DEFAULT_PASS_THROUGH, "GET /v1/realtime"]
    )
    for middleware, bad, expected in [
        (realtime, None, False),
        (realtime, "tp-nobody", False),
        (realtime, key, True),
        (default, key, False),
        (default, None, False),
    ]:
        headers = [(b"authorization", f"Bearer {bad}".encode())] if bad else []
        scope = {"type": "websocket", "path": "/v1/realtime", "headers": headers}
        sent: list[dict[str, Any]] = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message, sent=sent):
            sent.append(message)

        opened.clear()
        asyncio.run(middleware(scope, receive, send))
        assert bool(opened) is expected, bad
        if not expected:
            assert sent == [{"type": "websocket.close", "code": 1008}]
    lifespan: list[str] = []

    async def lifespan_app(scope, receive, send) -> None:
        lifespan.append(scope["type"])

    asyncio.run(QuotaMiddleware(lifespan_app, engine)({"type": "lifespan"}, receive, send))
    assert lifespan == ["lifespan"]


def test_a_websockets_accept_loses_the_upstreams_rate_limit_and_x_tally_headers(engine):
    # As every answer passed through does, and as the Go gateway's modifyResponse drops them
    # from the upgrade's 101: the operator's account limits, and x-tally-* that would pass for
    # the middleware's own.
    key = seated(engine, "wa", "tp-wa-1", "Starter")

    async def app(scope, receive, send) -> None:
        await receive()
        headers = [
            (b"x-tally-plan", b"Max"),
            (b"X-RateLimit-Limit-Requests", b"99999"),
            (b"anthropic-ratelimit-tokens-limit", b"2000000"),
            (b"x-request-id", b"req-1"),
        ]
        await send({"type": "websocket.accept", "headers": headers})

    realtime = QuotaMiddleware(
        app, engine, pass_through=[*DEFAULT_PASS_THROUGH, "GET /v1/realtime"]
    )
    scope = {
        "type": "websocket",
        "path": "/v1/realtime",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    sent: list[dict[str, Any]] = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    asyncio.run(realtime(scope, receive, send))
    assert [m["type"] for m in sent] == ["websocket.accept"]
    assert sent[0]["headers"] == [(b"x-request-id", b"req-1")]


def test_a_call_without_a_key_is_401_before_its_body_is_read(engine, gateway, upstream):
    # As the Go gateway answers: a missing or doubled key is refused before the body is read,
    # so a keyless client learns what is wrong (not 413) and costs no buffering.
    huge = chat(messages=[{"role": "user", "content": "x" * (33 << 20)}])
    assert request(gateway, CHAT, huge, key=None).status == 401
    assert two_keys(gateway, CHAT, "tp-a", "tp-b", huge).status == 401
    assert upstream.calls == []


@pytest.mark.parametrize("lease_ms", [0, -1, 86_400_001, 1.5])
def test_a_lease_the_engine_would_refuse_fails_the_middleware_at_once_not_every_request(
    engine, upstream, lease_ms
):
    with pytest.raises((ValueError, TypeError), match="lease_ms"):
        QuotaMiddleware(upstream, engine, lease_ms=lease_ms)


@pytest.mark.parametrize("reserved_first", [True, False])
def test_a_request_cancelled_while_its_reserve_runs_off_the_loop_holds_nothing(
    engine, upstream, clock, reserved_first
):
    # The request's task is cancelled (the client gone, a timeout) while `run_sync` still runs
    # the reserve in a worker thread: the thread's reservation reached no one, and held the
    # estimate and a call in flight until its 30-minute lease ended. The reserve is made
    # before the cancel (the thread is slow to hand it back), or after it.
    import threading

    entered = threading.Event()
    go_on = threading.Event()
    finished = threading.Event()  # the worker thread's call returned (it voided, if it had to)

    async def slow_worker(function):
        def call():
            entered.set()
            try:
                if reserved_first:
                    result = function()
                    go_on.wait(60)
                    return result
                go_on.wait(60)
                return function()
            finally:
                finished.set()

        return await asyncio.to_thread(call)

    gateway = QuotaMiddleware(upstream, engine, clock=clock, run_sync=slow_worker)
    key = seated(engine, "na", "tp-na-1", "Starter")
    body = json.dumps(chat()).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "headers": [(b"authorization", f"Bearer {key}".encode())],
        "query_string": b"",
    }

    async def main() -> None:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if incoming:
                return incoming.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            pass

        task = asyncio.ensure_future(gateway(scope, receive, send))
        while not entered.is_set() or (
            reserved_first and engine.usage(key, at_ms=T).open_reservations != 1
        ):
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        go_on.set()
        # The worker thread's call returns (it voids the reservation there when the request
        # was cancelled first): waited for. A second of polling stood for it, and ran out when
        # the worker was late; the check after asyncio.run held then only because asyncio.run
        # joins its default executor, which a run_sync on another executor does not share.
        assert finished.wait(60), "the worker thread never returned"
        assert engine.usage(key, at_ms=T).open_reservations == 0

    asyncio.run(main())
    assert upstream.calls == []
    assert engine.usage(key, at_ms=T).open_reservations == 0


@pytest.mark.parametrize("answered", [False, True])
def test_a_reservation_is_closed_when_cancellation_is_delivered_at_every_await(
    engine, upstream, clock, answered
):
    # anyio's cancel scopes and trio cancel at every await of a cancelled task, not once as
    # asyncio does: the settle or void that `run_sync` should run after the app was then
    # cancelled before it ran, and the reservation held its estimate and a call in flight
    # until its 30-minute lease ended. The task is cancelled while the app runs (before it
    # answers), or once it has answered (the client gone as the stream ends).
    import threading

    cancelled = threading.Event()

    async def level_triggered(function):
        if cancelled.is_set():
            raise asyncio.CancelledError
        return await asyncio.to_thread(function)

    async def app(scope, receive, send):
        if not answered:
            cancelled.set()
            raise asyncio.CancelledError
        await upstream(scope, receive, send)
        cancelled.set()

    upstream.tokens = (120, 380)
    gateway = QuotaMiddleware(app, engine, clock=clock, run_sync=level_triggered)
    engine.create_user("lv", "tp-lv-1", at_ms=T)
    engine.top_up("@lv", 1_000_000, at_ms=T)
    with pytest.raises(asyncio.CancelledError):
        request(gateway, CHAT, chat(max_tokens=1000), key="tp-lv-1")
    assert engine.usage("tp-lv-1", at_ms=T + HOUR_MS).open_reservations == 0
    # Answered: the actual tokens settled (2,000 micros a request, 1 a token); not answered:
    # the hold given back.
    assert engine.credits("@lv") == 1_000_000 - (2_000 + 500 if answered else 0)


# ---- the health path ---------------------------------------------------------------------------

#: The health path's answers, byte for byte, as the Go gateway's tests expect them too.
HEALTHY = b'{"healthy":true,"failures":[],"error":null}\n'
COMPACTION_FAILED = b'{"healthy":false,"failures":["compaction_failure"],"error":null}\n'
CLOSED = b'{"healthy":false,"failures":[],"error":"the engine is closed (TALLY_CLOSED)"}\n'


def check_health_answer(answer: Response, status: int, body: bytes) -> None:
    """A health answer: its status and body, in JSON, never cached."""
    assert (answer.status, answer.body) == (status, body)
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"


@pytest.fixture
def probed(engine, upstream, clock):
    return QuotaMiddleware(upstream, engine, clock=clock, health_path="/healthz")


def test_the_health_path_answers_a_probe_without_a_key_and_never_reaches_the_upstream(
    engine, probed, upstream
):
    # A load balancer's probe needs no key, and the middleware answers it itself: GET or HEAD
    # on the health path (cleaned as a route is) is 200 while the engine reports nothing
    # wrong, and the app never sees it. Before, no path told a monitor the engine had failed.
    seated(engine, "hp", "tp-hp-1", "Starter")
    for path in ["/healthz", "//healthz/", "/v1/../healthz"]:
        for key in [None, "tp-nobody", "tp-hp-1"]:
            answer = request(probed, path, key=key, method="GET", raw=b"")
            check_health_answer(answer, 200, HEALTHY)
    head = request(probed, "/healthz", key=None, method="HEAD", raw=b"")
    check_health_answer(head, 200, b"")
    assert head.headers["content-length"] == str(len(HEALTHY))
    assert upstream.calls == []
    # Only that path: one below it is an ordinary route (a key first).
    assert request(probed, "/healthz/deeper", key=None, method="GET").status == 401


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_another_method_on_the_health_path_is_405_with_allow(engine, probed, upstream, method):
    # As the Go gateway answers it: in the API's shape, and the app never sees it.
    key = seated(engine, "hm", "tp-hm-1", "Starter")
    answer = request(probed, "/healthz", chat(), key=key, method=method)
    assert answer.status == 405, answer.body
    assert answer.headers["allow"] == "GET, HEAD"
    assert answer.headers["cache-control"] == "no-store"
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "method_not_allowed"
    assert f"{method} /healthz" in error["message"]
    assert upstream.calls == []


def test_the_health_path_is_503_once_the_engine_is_closed(engine, probed):
    engine.close()
    check_health_answer(request(probed, "/healthz", key=None, method="GET"), 503, CLOSED)


def test_a_health_call_that_fails_is_503_naming_its_status_not_its_detail(
    engine, probed, monkeypatch
):
    def fail() -> Any:
        raise errors.PoisonedError(errors.PoisonedError.status_code, "panicked at /db/secret")

    monkeypatch.setattr(engine, "health", fail)
    answer = request(probed, "/healthz", key=None, method="GET")
    check_health_answer(
        answer,
        503,
        b'{"healthy":false,"failures":[],'
        b'"error":"the engine\'s health could not be read (TALLY_POISONED)"}\n',
    )


def test_every_failure_health_reports_is_named_in_order_without_its_detail(
    engine, probed, monkeypatch
):
    monkeypatch.setattr(
        engine, "health", lambda: tally.Health("write /db/events/1.seg: no space", "x", "y")
    )
    answer = request(probed, "/healthz", key=None, method="GET")
    check_health_answer(
        answer,
        503,
        b'{"healthy":false,"failures":["log_failure","checkpoint_failure",'
        b'"compaction_failure"],"error":null}\n',
    )


def test_the_health_path_is_503_naming_a_failure_in_the_background(tmp_path, upstream, caplog):
    # A compaction that fails in the background (each periodic checkpoint compacts what the
    # retention lets go) reaches no call's answer: the health path is 503 naming it, its
    # detail (a path, an OS error) goes to the log once, not to the caller, and the path is
    # 200 again once a compaction succeeds. As in the Go gateway.
    caplog.set_level(logging.INFO, logger="tally.asgi")
    day = 24 * 3_600_000
    path = tmp_path / "db"
    options = unbounded(retention_ms=1_000, checkpoint_every_events=4)
    with tally.Engine.open(path, durability="sync", options=options) as engine:
        probed = QuotaMiddleware(upstream, engine, health_path="/healthz")
        key = seated(engine, "hf", "tp-hf-1", "Max")
        consume_and_checkpoint(engine, key, T)
        check_health_answer(request(probed, "/healthz", key=None, method="GET"), 200, HEALTHY)
        later = T + 40 * day  # past the longest window (a month) and the retention
        with oldest_segment_unreadable(path):
            engine.set_clock(later)
            consume_and_checkpoint(engine, key, later)
            failure = engine.health().compaction_failure
            assert failure is not None
            for _ in range(3):
                answer = request(probed, "/healthz", key=None, method="GET")
                check_health_answer(answer, 503, COMPACTION_FAILED)
            assert sum(failure in record.getMessage() for record in caplog.records) == 1
        consume_and_checkpoint(engine, key, later + 100)
        check_health_answer(request(probed, "/healthz", key=None, method="GET"), 200, HEALTHY)
        assert "healthy again" in caplog.text
    assert upstream.calls == []


@pytest.mark.parametrize(
    ("health_path", "pass_through", "why"),
    [
        ("healthz", None, "clean"),
        ("/healthz/", None, "clean"),
        ("//healthz", None, "clean"),
        ("/a/../healthz", None, "clean"),
        ("/healthz?x=1", None, "clean"),
        ("/healthz#x", None, "clean"),
        ("/health%7A", None, "clean"),
        ("", None, "clean"),
        ("/v1/chat/completions", None, "metered route POST /v1/chat/completions"),
        ("/v1/messages", None, "metered route POST /v1/messages"),
        ("/v1/models", None, "GET /v1/models"),
        ("/v1/models/health", None, "GET /v1/models/*"),
        ("/v1/messages/count_tokens", None, "POST /v1/messages/count_tokens"),
        ("/status", ["DELETE /status"], "DELETE /status"),
    ],
)
def test_a_health_path_that_is_no_path_or_hides_a_route_fails_the_middleware(
    engine, upstream, health_path, pass_through, why
):
    # The probe would hide the route from its callers; refused naming the option, as the Go
    # gateway's New refuses it.
    with pytest.raises(ValueError, match="health_path") as refused:
        QuotaMiddleware(upstream, engine, pass_through=pass_through, health_path=health_path)
    assert repr(health_path) in str(refused.value) and why in str(refused.value)


def test_the_health_path_is_checked_against_the_routes_and_its_type(engine, upstream):
    routes = {"/anthropic/v1/messages": Route(Api.ANTHROPIC, Metering.REQUESTS, "m2.7")}
    with pytest.raises(ValueError, match="/anthropic/v1/messages"):
        QuotaMiddleware(upstream, engine, routes=routes, health_path="/anthropic/v1/messages")
    QuotaMiddleware(upstream, engine, routes=routes, health_path="/v1/messages")
    # A route no list passes through is free to take.
    QuotaMiddleware(upstream, engine, pass_through=[], health_path="/v1/models")
    with pytest.raises(TypeError, match="health_path"):
        QuotaMiddleware(upstream, engine, health_path=b"/healthz")  # type: ignore[arg-type]


def test_without_a_health_path_no_path_is_answered_without_a_key(engine, gateway, upstream):
    # The default: /healthz is an ordinary route, refused without a key as before and with one
    # as not served, so no route of the app is hidden unless the operator names it.
    key = seated(engine, "hd", "tp-hd-1", "Starter")
    assert request(gateway, "/healthz", key=None, method="GET").status == 401
    assert request(gateway, "/healthz", key=key, method="GET").status == 403
    assert upstream.calls == []


@pytest.mark.parametrize(
    ("text", "deeper"),
    [
        ('["' + "[" * 600 + '"]', False),  # brackets in a string
        ('["\\"' + "[" * 600 + '"]', False),  # after an escaped quote, still in the string
        ('["\\\\"' + "[" * 600 + "]" * 600 + "]", True),  # an escaped backslash ends it
        ('"' + "[" * 600, False),  # an unterminated string holds the rest
        ('"\\' + "[" * 600, False),  # an escape at the string's end, as the Go gateway reads it
        ("[" * 512 + "]" * 512, False),
        ("[" * 513 + "]" * 513, True),
        ("[]" * 600, False),
        ('{"a":' * 300 + '"x\\n[{"' + "[" * 300, True),
    ],
)
def test_the_nesting_check_counts_brackets_outside_strings(text, deeper):
    from tally.asgi import _nesting_deeper_than

    assert _nesting_deeper_than(text, MAX_JSON_NESTING) is deeper
