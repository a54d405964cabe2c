"""``QuotaMiddleware``: quotas in front of OpenAI- and Anthropic-compatible endpoints, as plain
ASGI (no framework): wrap any ASGI app and serve it with uvicorn, hypercorn, granian, ...

Every HTTP request must carry a key the engine knows (else 401), on every route. Only the
metered routes and the routes that pass through reach the app (and through it the upstream, on
the operator's credentials). A route passes through, uncharged, when ``pass_through`` lists it;
by default (``DEFAULT_PASS_THROUGH``) ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST
/v1/messages/count_tokens``, which cost nothing and show nothing of other users; its answer
loses the app's rate-limit headers. Every other route (another path, or a metered path with a
method other than POST) is refused without calling the app, with 403 naming the route in the
API's shape (OpenAI's invalid_request_error, code route_not_served; Anthropic's
permission_error), and a websocket on it is closed before it is accepted (403 from the
server): passed on, it would spend the operator's account uncounted (message batches,
Anthropic's legacy ``/v1/complete``, OpenAI's batches and files, transcriptions, image edits,
moderations, fine-tuning, assistants' runs, realtime) or show other users' data (files,
batches). With ``health_path`` set, a GET or HEAD on that path needs no key and is answered
by the middleware itself, never by the app, with the engine's health for a load balancer: 200
while ``Engine.health`` reports nothing, 503 naming each failure it reports or saying that the
engine is closed (other methods: 405). For each request on a metered route it:

1. takes the key from ``Authorization: Bearer`` or ``x-api-key`` (none, unknown, one no key
   can be, longer than any or holding a NUL, or two different keys in the two headers: 401);
2. reads the JSON body (at most 32 MiB, else 413) and maps the route and its ``model`` to a
   resource of the policy (a model it has none for, or none can be: 404; a key the engine
   does not know, or revoked, is 401 rather than any of these answers), and the body to
   quantities: 1 request; for chat, completions, responses, embeddings and messages the
   tokens; for speech the characters of ``input``; for images ``n``; of these, only the units
   the resource meters (a model metered by calls alone holds 1 request; none of them: 400),
   read from the engine's policy, and read again after ``Engine.swap_policy``;
3. for routes billed by tokens, *reserves* 1 request plus an estimate of the tokens (the
   prompt's, about one per 4 bytes of body, and the most the model may write times ``n``, or
   a legacy completion's ``best_of`` if more; an embedding writes nothing, so only its input
   is held), calls the app, reads ``usage`` from the JSON (or server-sent events) response
   and *settles* the actual tokens (the app is passed the client's ``Accept-Encoding`` cut
   down to gzip and deflate, which are decoded for reading; an answer in another coding
   settles at the estimate, with a warning; one cut short, gzip without its end, is passed
   on as sent and charged the usage that arrived, else the estimate, as the Go gateway
   charges it); an error response, or an exception before the app answers, *voids* the
   reservation (one the app raises after answering 200, its answer broken off, is charged
   the usage that arrived, else the estimate, as the Go gateway charges it); a response
   that outlives the reservation's lease (``lease_ms``; the engine has no way to extend
   one) finds it expired, its hold given back, and its usage is then added as a usage
   correction at the reservation's time, once, and logged (``tally.asgi``,
   a warning; a hold on credits or pay-as-you-go, which a correction cannot charge, is
   logged as an error, not recorded); other routes reserve what they are counted in the same
   way, settle it when the app has answered and void it if the app answers an error, so
   every call in flight counts against the plan's calls at once (``max_open_reservations``),
   as in the Go gateway; an app that raises before answering (the upstream unreachable) gets
   the client a 502 in the API's shape, and the exception goes on to the server;
4. on a denial answers 429 with ``Retry-After`` (seconds, rounded up) and rate-limit headers,
   with a JSON body in the error shape of the API being proxied, whose message says which
   quota ran out and when it resets (OpenAI's ``type`` is the limit's unit, "requests",
   "tokens", ...); admitted responses carry the rate-limit headers too, in place of the
   app's own (the operator's account limits upstream are not the caller's), and every
   ``x-tally-*`` header of the app's is dropped from every answer, so none passes for the
   middleware's (which say where the call was charged). A denial waiting
   cannot help is no 429 to retry: larger than the whole limit, 400; no seat, a plan that
   does not cover the model, credits short: 429 insufficient_quota on OpenAI's routes (the
   API's own answer), 403 permission_error on Anthropic's. An engine that cannot decide
   (closed, storage, poisoned) is 503.

The Go gateway (``ffi/go/gateway``) answers every one of these alike.

Engine calls are synchronous and fast in memory; with ``Durability.SYNC`` they wait for an
fsync, so pass ``run_sync`` (e.g. ``asyncio.to_thread`` or ``anyio.to_thread.run_sync``) to
keep them off the event loop.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import json
import logging
import math
import operator
import posixpath
import re
import threading
import time
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import (
    Any,
    TypeGuard,
    TypeVar,
)

from . import _convert, _native, errors
from .engine import Engine
from .enums import ChargedTo, Denial
from .results import Decision, Health, Reservation

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
R = TypeVar("R")
A = TypeVar("A", Decision, Reservation)
RunSync = Callable[[Callable[[], Any]], Awaitable[Any]]

_log = logging.getLogger("tally.asgi")

#: Bounds on what the middleware buffers.
MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024  # the Go gateway's default; Anthropic's bound
MAX_RESPONSE_JSON_BYTES = 32 * 1024 * 1024
MAX_EVENT_LINE_BYTES = 1024 * 1024
#: A JSON document nested deeper than this many levels of brackets is not read, as in the Go
#: gateway: a request body is refused (400), an upstream's answer or event is read for no usage
#: (a usage is a few levels deep). Python's decoder recurses once per level, within the
#: interpreter's recursion limit (1,000 by default).
MAX_JSON_NESTING = 512
#: The engine's bound on a quantity (TALLY_BAD_QUANTITY past it): the wrapper's constant.
MAX_QUANTITY = _native.MAX_QUANTITY
#: The most tokens one estimate holds (the engine's bound on a quantity).
MAX_TOKEN_ESTIMATE = MAX_QUANTITY
#: How long a reservation holds by default (the Go gateway's Lease): longer than a streamed
#: response runs, since one whose lease ends before its settle is charged by a usage
#: correction instead (plan quota only), and its hold was free for others meanwhile.
DEFAULT_LEASE_MS = 30 * 60 * 1000


class Api(enum.Enum):
    """Which API a route speaks: decides the error shape and the rate-limit headers."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class Metering(enum.Enum):
    """What a route's request is counted in."""

    REQUESTS = "requests"  # 1 request
    TOKENS = "tokens"  # 1 request + tokens, reserved then settled from the response's usage
    INPUT_TOKENS = "input_tokens"  # TOKENS for a call that writes no output (embeddings)
    CHARACTERS = "characters"  # the characters of "input" (+ 1 request)
    IMAGES = "images"  # "n" images, default 1 (+ 1 request)


#: The meterings counted in tokens: held at an estimate, settled from the response's usage.
_BY_TOKENS = frozenset({Metering.TOKENS, Metering.INPUT_TOKENS})


@dataclass(frozen=True)
class Route:
    """A metered route: its API, how it is counted and, optionally, the model to assume when
    the body names none."""

    api: Api
    metering: Metering
    default_model: str | None = None


DEFAULT_ROUTES: Mapping[str, Route] = {
    "/v1/chat/completions": Route(Api.OPENAI, Metering.TOKENS),
    "/v1/completions": Route(Api.OPENAI, Metering.TOKENS),
    "/v1/responses": Route(Api.OPENAI, Metering.TOKENS),
    "/v1/embeddings": Route(Api.OPENAI, Metering.INPUT_TOKENS),
    "/v1/messages": Route(Api.ANTHROPIC, Metering.TOKENS),
    "/v1/audio/speech": Route(Api.OPENAI, Metering.CHARACTERS),
    "/v1/images/generations": Route(Api.OPENAI, Metering.IMAGES),
}

#: The routes passed through unmetered (for a key the engine knows) when ``pass_through`` is
#: None, the Go gateway's DefaultPassThrough: the model list, one model, and Anthropic's token
#: count, which cost nothing upstream and show nothing of other users. Everything else the
#: upstream serves either spends the operator's account (batches, files for batches,
#: Anthropic's legacy ``/v1/complete``, transcriptions, image edits, moderations, fine-tuning,
#: assistants' runs, realtime websockets) or shows what other users left there (files,
#: batches), so it is refused (403) unless an operator opens it.
DEFAULT_PASS_THROUGH: tuple[str, ...] = (
    "GET /v1/models",
    "GET /v1/models/*",
    "POST /v1/messages/count_tokens",
)

#: Anthropic's paths that extend no metered route: its legacy Text Completions.
_ANTHROPIC_PATHS = ("/v1/complete",)

#: Model names as clients send them -> resources of the shipped Token Plan policy. A model
#: that is itself the name of a resource needs no entry.
DEFAULT_MODELS: Mapping[str, str] = {
    "MiniMax-M2.7": "m2.7",
    "MiniMax-M2.7-highspeed": "m2.7-highspeed",
    "speech-2.8-hd": "speech-2.8",
    "speech-2.8-turbo": "speech-2.8",
}


class _Refusal(Exception):
    """An answer the middleware gives instead of the app's (400, 401, 403, 404, 413, 429, 500,
    502, 503)."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        code: str | None = None,
        openai_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.openai_type = openai_type  # instead of the kind's (a 429's: the limit's unit)
        # "authentication", "invalid_request", "not_found", "too_large", "unavailable",
        # "internal", "upstream", "rate_limit", "insufficient_quota", "permission",
        # "forbidden"
        self.kind = kind
        self.message = message
        self.code = code


# ---- error bodies in each API's shape -------------------------------------------------------

_OPENAI_TYPES = {
    "authentication": "invalid_request_error",
    "invalid_request": "invalid_request_error",
    "not_found": "invalid_request_error",
    "too_large": "invalid_request_error",
    "unavailable": "server_error",
    "internal": "server_error",
    "upstream": "server_error",
    "rate_limit": "rate_limit_error",
    "insufficient_quota": "insufficient_quota",
    "permission": "insufficient_quota",
    "forbidden": "invalid_request_error",
}
_ANTHROPIC_TYPES = {
    "authentication": "authentication_error",
    "invalid_request": "invalid_request_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "unavailable": "api_error",
    "internal": "api_error",
    "upstream": "api_error",
    "rate_limit": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "permission": "permission_error",
    "forbidden": "permission_error",
}


def error_body(
    api: Api, kind: str, message: str, code: str | None, openai_type: str | None = None
) -> dict[str, Any]:
    """The JSON error of ``api``: OpenAI ``{"error": {"message", "type", "param", "code"}}``
    (``type`` the kind's, or ``openai_type``), Anthropic ``{"type": "error", "error": {"type",
    "message"}}``."""
    if api is Api.ANTHROPIC:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}}
    kind_type = openai_type or _OPENAI_TYPES[kind]
    return {"error": {"message": message, "type": kind_type, "param": None, "code": code}}


# ---- what a denial says ---------------------------------------------------------------------


def _iso(ms: int | None) -> str:
    if not ms:
        return "unknown"
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(ms: int) -> str:
    """OpenAI's reset format: ``"4h59m3s"``, ``"12s"`` (seconds rounded up)."""
    seconds = max(0, math.ceil(ms / 1000))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{text}{seconds}s"


def _credits(micros: int) -> str:
    """Micro-credits as credits with six decimals, exactly: ``2500000001`` is ``"2500.000001"``
    (a float would round balances above 2^53 micro-credits). The Go gateway writes the same."""
    whole, fraction = divmod(micros, 1_000_000)
    return f"{whole}.{fraction:06d}"


def denial_message(decision: Decision, resource: str) -> str:
    """Which quota ran out and when it resets, or why waiting cannot help."""
    plan = f"plan {decision.plan}" if decision.plan else "this key"
    upgrade = f" Upgrade to {decision.upgrade_plan} for more." if decision.upgrade_plan else ""
    needed = decision.credits_needed_micros
    credits = f" Or top up at least {_credits(needed)} credits to pay for it." if needed else ""
    denial = decision.denial
    if denial is Denial.QUOTA_EXHAUSTED:
        retry_at = (
            ""
            if decision.retry_at_ms == decision.reset_at_ms
            else f" ({_iso(decision.retry_at_ms)})"
        )
        return (
            f"Quota exhausted: {decision.limit_name} on {plan} "
            f"({decision.limit_used}/{decision.limit_amount} used). It resets at "
            f"{_iso(decision.reset_at_ms)}; retry after {decision.retry_after_seconds} s"
            f"{retry_at}.{upgrade}{credits}"
        )
    if denial is Denial.NO_RESOURCES:
        at_least = f" (at least {_credits(needed)} for this request)" if needed else ""
        return (
            "This key has no usable resources: it has no Token Plan seat and its team has no "
            f"credits. Assign a seat or top up credits{at_least}."
        )
    if denial is Denial.RESOURCE_NOT_COVERED:
        if not decision.plan:  # a key without a seat (its team's credits cannot pay for it)
            return f"This key has no plan that covers {resource}.{upgrade}{credits}"
        return f"Plan {decision.plan} does not cover {resource}.{upgrade}{credits}"
    if denial is Denial.EXCEEDS_LIMIT:
        return (
            f"The request ({decision.requested}) is larger than the whole limit "
            f"{decision.limit_name} ({decision.maximum}) on {plan}: waiting cannot help.{upgrade}"
        )
    if denial is Denial.INSUFFICIENT_CREDITS:
        # Worded as the Go gateway words it, in credits (`requested` is the price, in micros).
        balance = decision.credits_balance_micros or 0
        return (
            f"The plan's quota for {resource} cannot take this request and the team's credits "
            f"are short: it costs {_credits(decision.requested)} credits, the balance is "
            f"{_credits(balance)}.{upgrade}{credits}"
        )
    if denial is Denial.OVER_REQUEST_MAXIMUM:
        unit = decision.unit.name.lower() if decision.unit is not None else "units"
        return (
            f"At most {decision.maximum} {unit} per request on {resource} "
            f"(asked {decision.requested})."
        )
    if denial is Denial.TOO_MANY_RESERVATIONS:
        return (
            f"This key has {decision.requested} requests in flight; {plan} allows "
            f"{decision.maximum} at once. Retry when one finishes.{upgrade}"
        )
    if denial is Denial.KEY_REVOKED:
        return _REVOKED
    return "Invalid API key."


def _denial_answer(decision: Decision, api: Api) -> tuple[int, str, str | None]:
    """(HTTP status, error kind, OpenAI code) for a denial, as the Go gateway answers it: 429
    only when waiting helps, or for OpenAI's insufficient_quota (its API's own answer, which
    its clients know). A request larger than the whole limit is the request's fault (400, as
    one over the per-request maximum is); on Anthropic's routes a key whose plan and credits
    cannot serve the request is 403 permission_error, not a 429 its SDK would retry."""
    denial = decision.denial
    if denial in (Denial.UNKNOWN_KEY, Denial.KEY_REVOKED):
        return 401, "authentication", "invalid_api_key"
    if denial in (Denial.OVER_REQUEST_MAXIMUM, Denial.EXCEEDS_LIMIT):
        return 400, "invalid_request", "request_too_large"
    if denial in (Denial.QUOTA_EXHAUSTED, Denial.TOO_MANY_RESERVATIONS):
        return 429, "rate_limit", "rate_limit_exceeded"
    if api is Api.ANTHROPIC:
        return 403, "permission", None
    return 429, "insufficient_quota", "insufficient_quota"


def _denied_unit(decision: Decision) -> str:
    """What the limit that denied counts, as its ``x-ratelimit-*-<unit>`` headers name it: a
    429's OpenAI type ("requests", "tokens", as OpenAI's API says; "usage" for a shared bar)."""
    if decision.limit_index is None or decision.limit_name is None:
        return "requests"
    return _limit_unit(decision.limit_name)


def rate_limit_headers(api: Api, decision: Decision, now_ms: int | None) -> Headers:
    """``x-ratelimit-{limit,remaining,reset}-<unit>`` for the limit the decision names
    (``-requests`` for request quotas), Anthropic's ``anthropic-ratelimit-*`` on its routes,
    and ``x-tally-*`` saying where the request was charged."""
    headers: Headers = []
    if decision.plan:
        headers.append((b"x-tally-plan", decision.plan.encode()))
    if decision.admitted:
        headers.append((b"x-tally-charged-to", decision.charged_to.name.lower().encode()))
    if decision.limit_index is None or decision.limit_name is None:
        return headers
    unit = _limit_unit(decision.limit_name)
    # Without a clock of the middleware's, the engine's is the wall clock. (A denial's
    # ``at_ms`` is 0: taken as now, it made a reset 57 years away.)
    now = now_ms if now_ms is not None else (decision.at_ms or int(time.time() * 1000))
    reset_in = max(0, (decision.reset_at_ms or now) - now)
    headers += [
        (b"x-tally-limit", decision.limit_name.encode()),
        (f"x-ratelimit-limit-{unit}".encode(), str(decision.limit_amount).encode()),
        (f"x-ratelimit-remaining-{unit}".encode(), str(decision.remaining).encode()),
        (f"x-ratelimit-reset-{unit}".encode(), _duration(reset_in).encode()),
    ]
    if api is Api.ANTHROPIC:
        headers += [
            (f"anthropic-ratelimit-{unit}-limit".encode(), str(decision.limit_amount).encode()),
            (f"anthropic-ratelimit-{unit}-remaining".encode(), str(decision.remaining).encode()),
            # Nothing counted in the window: the limit is whole now (a time, as the Go gateway
            # says it, not "unknown", which a client parsing the header cannot read).
            (
                f"anthropic-ratelimit-{unit}-reset".encode(),
                _iso(decision.reset_at_ms or now).encode(),
            ),
        ]
    return headers


def _limit_unit(limit_name: str) -> str:
    """``"m2.7:requests per rolling:5h"`` -> ``"requests"``; a shared bar -> ``"usage"``."""
    meter = limit_name.split(" per ", 1)[0]
    unit = meter.rsplit(":", 1)[1] if ":" in meter else "usage"
    return "".join(c if c.isalnum() or c == "-" else "-" for c in unit) or "usage"


# ---- reading requests and responses ---------------------------------------------------------


def _header(scope: Scope, name: bytes, encoding: str = "latin-1") -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode(encoding, errors="replace")
    return None


# What HTTP lets surround a header's value: spaces and tabs (RFC 9110's OWS), nothing else.
_OWS = " \t"


class ConflictingKeys(ValueError):
    """A request carried two different keys, one in each header."""


def api_key(scope: Scope) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``x-api-key`` (None if neither has
    one). A request carrying two different keys raises ``ConflictingKeys``: whichever header
    won would decide whose quota pays, and a client that sends two credentials has mixed up
    its configuration (an SDK's key and a proxy's header) — refused with 401, as the Go
    gateway does, rather than charged to a key it may not mean. The same key in both is one."""
    # Read as UTF-8, as the engine holds keys and as the Go gateway reads them (bytes that are
    # no UTF-8 become U+FFFD, a key the engine does not know: 401, as the Go gateway answers).
    # Only spaces and tabs are trimmed (RFC 9110's optional whitespace), as the Go gateway
    # trims: str.strip() trimmed every Unicode space, so "tp-ada-1" followed by U+0085 or
    # U+00A0 was taken for the key tp-ada-1, a credential that is not the key matching it.
    bearer = None
    authorization = _header(scope, b"authorization", "utf-8")
    if authorization:
        scheme, _, credentials = authorization.strip(_OWS).partition(" ")
        if scheme.lower() == "bearer" and credentials.strip(_OWS):
            bearer = credentials.strip(_OWS)
    header = _header(scope, b"x-api-key", "utf-8")
    x_api_key = header.strip(_OWS) if header and header.strip(_OWS) else None
    if bearer is not None and x_api_key is not None and bearer != x_api_key:
        raise ConflictingKeys("two different API keys: Authorization: Bearer and x-api-key")
    return bearer or x_api_key


class _NestedTooDeep(ValueError):
    """A JSON document nested deeper than ``MAX_JSON_NESTING`` levels."""


def _json_body(body: bytes) -> Any:
    """A request body read as JSON by RFC 8259, as the Go gateway reads it: UTF-8 without a byte
    order mark, and no ``NaN`` or ``Infinity`` (``json.loads`` alone takes UTF-16 and UTF-32, a
    byte order mark and those constants), nested at most ``MAX_JSON_NESTING`` levels. Raises
    ``ValueError`` for anything else (``_NestedTooDeep`` for too deep)."""
    return _json_text(body.decode("utf-8"))


def _json_text(text: str) -> Any:
    if _nesting_deeper_than(text, MAX_JSON_NESTING):
        raise _NestedTooDeep(f"nested deeper than {MAX_JSON_NESTING} levels")
    return json.loads(text, parse_constant=_not_a_json_number)


def _not_a_json_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _upstream_json(document: bytes) -> Any:
    """An upstream's answer or event read as JSON the way the Go gateway reads it: no byte
    order mark, no UTF-16 or UTF-32, no ``NaN`` or ``Infinity``, bytes that are not UTF-8 read
    as U+FFFD (Python's decoder refused them, Go's ``encoding/json`` takes them), and at most
    ``MAX_JSON_NESTING`` levels of brackets (deeper, Python's decoder raised
    ``RecursionError``, which is no ``ValueError``). Raises ``ValueError`` for a document that
    is not read."""
    return _json_text(document.decode("utf-8", errors="replace"))


#: A JSON string as the Go gateway's bracket count reads one: from its quote to the next
#: unescaped one (or the text's end), ``\\`` escaping whatever follows it.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S]?[^"\\]*)*"?')
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
#: An opening bracket 2, a closing one 0: after k brackets the depth is their sum less k.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def _nesting_deeper_than(text: str, bound: int) -> bool:
    """Whether the brackets of the JSON ``text`` (outside its strings) open past ``bound``
    levels: a cheap look when the text has fewer brackets than that at all. Runs on the event
    loop for every body and answer so bracketed (an embeddings answer is), so it is worked out
    by the regex engine and C iterators: walked a character at a time in Python it took
    about 2.5 times ``json.loads``'s own time on the same text."""
    if text.count("[") + text.count("{") <= bound:
        return False
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    steps = brackets.encode("ascii").translate(_BRACKET_STEPS)
    depths = map(operator.sub, itertools.accumulate(steps), itertools.count(1))
    return max(depths, default=0) > bound


def _positive_int(body: Mapping[str, Any], name: str, default: int) -> int:
    """A count from the body, 1 to the engine's largest quantity (a larger one is the client's
    error, not the engine's: refused here rather than by the engine or ctypes)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_QUANTITY:
        message = f"{name} must be a positive integer, at most {MAX_QUANTITY}"
        raise _Refusal(400, "invalid_request", message, None)
    return value


def estimate_tokens(body: Mapping[str, Any], body_bytes: int, default_max_tokens: int) -> int:
    """Tokens to hold for a chat call: about one per 4 bytes of the request, plus one, plus the
    most the model may write (the first of ``max_tokens``, ``max_completion_tokens`` and
    ``max_output_tokens`` the body names, or the default) times the completions the model
    writes (``n``, chat completions' choices, or a legacy completion's ``best_of``, the
    candidates it writes and bills whatever ``n`` returns: the larger), as the Go gateway
    estimates. A maximum, an ``n`` or a ``best_of`` that is no positive integer is passed
    over: the upstream judges the body. Past ``MAX_TOKEN_ESTIMATE`` the middleware refuses the
    call (400) when the model's resource meters tokens (else none are held)."""

    def positive(value: Any) -> TypeGuard[int]:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    output = default_max_tokens
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if positive(value):
            output = value
            break
    choices = [value for value in (body.get("n"), body.get("best_of")) if positive(value)]
    if choices:
        output *= max(choices)
    return body_bytes // 4 + 1 + output


#: The counts a ``usage`` object reports, each kept at its largest across a stream's events.
_USAGE_FIELDS = (
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _count(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tokens_from_usage(usage: Any) -> int | None:
    """Total tokens of an OpenAI ``usage`` (``total_tokens`` or prompt + completion) or an
    Anthropic one (input + cache creation + cache read + output: Anthropic's ``input_tokens``
    leaves out the tokens read from or written to its prompt cache, which the upstream
    processed; OpenAI's cached tokens are part of ``prompt_tokens``, and not added again).
    None when it reports nothing but zeros (a successful answer used something: it is charged
    its estimate). As the Go gateway counts them."""
    if not isinstance(usage, Mapping):
        return None
    if _count(usage, "total_tokens"):
        return _count(usage, "total_tokens")
    total = _count(usage, "prompt_tokens") + _count(usage, "completion_tokens")
    total = total or sum(
        _count(usage, name)
        for name in (
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
        )
    )
    return total or None


#: The characters Go's ``bytes.TrimSpace`` trims beyond ASCII's (``unicode.IsSpace``): an event
#: line is trimmed of them as the Go gateway trims it. ``bytes.strip`` trims ASCII's alone, and
#: ``str.strip`` trims U+001C to U+001F too, which Go does not.
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)


def _trim_space(data: bytes) -> bytes:
    """``data`` without the leading and trailing spaces Go's ``bytes.TrimSpace`` takes off:
    ASCII's, and Unicode's encoded in UTF-8 (bytes that are not UTF-8 stop the trim, as in Go)."""
    data = data.strip()
    if data[:1] < b"\x80" and data[-1:] < b"\x80":
        return data  # no Unicode space at either end
    text = data.decode("utf-8", errors="surrogateescape").strip(_GO_SPACE)
    return text.encode("utf-8", errors="surrogateescape")


class UsageReader:
    """Finds the token usage in a response body as it streams past, without holding it up:
    a JSON body is kept (bounded) and parsed at the end; server-sent events are parsed line by
    line (OpenAI's last chunk carries ``usage``, the Responses API's ``response.completed``
    ``response.usage``; Anthropic's ``message_start`` ``message.usage`` and ``message_delta``
    the running usage). Reports are cumulative, so each count keeps the largest reported: a
    later event's 0 takes nothing back, and counts reported in different events add up, as
    the Go gateway reads them."""

    def __init__(self, content_type: str) -> None:
        self.streaming = "text/event-stream" in content_type
        self._buffer = bytearray()
        self._overflowed = False
        self._counts: dict[str, int] = {}
        #: Whether a report of the whole call was seen: a ``usage`` at the top of the answer or
        #: event (OpenAI's last chunk, Anthropic's ``message_delta``, a JSON answer) or the
        #: Responses API's ``response.usage``. Anthropic's ``message_start``
        #: (``message.usage``) is not: it carries the input and 1 output token, the output
        #: coming at the stream's end.
        self.final = False

    def feed(self, chunk: bytes) -> None:
        if self.streaming:
            self._feed_events(chunk)
            return
        if self._overflowed:
            return
        self._buffer += chunk
        if len(self._buffer) > MAX_RESPONSE_JSON_BYTES:
            self._overflowed = True
            self._buffer = bytearray()

    def _feed_events(self, chunk: bytes) -> None:
        """Reads the event lines ``chunk`` ends. A line longer than ``MAX_EVENT_LINE_BYTES``
        (content, not usage) is skipped to its end, and the lines after it read on, as the Go
        gateway reads them: the usage that follows it is not lost. So is one that ends in the
        chunk it began in (or its last): the bound is the line's, not the piece's."""
        *ended, rest = chunk.split(b"\n")
        for piece in ended:
            if self._overflowed:
                self._overflowed = False  # the long line ends here
            elif len(self._buffer) + len(piece) <= MAX_EVENT_LINE_BYTES:
                self._event_line(_trim_space(bytes(self._buffer) + piece))
            self._buffer = bytearray()
        if not self._overflowed:
            self._buffer += rest
            if len(self._buffer) > MAX_EVENT_LINE_BYTES:
                self._overflowed = True  # skipped until its end
                self._buffer = bytearray()

    def _event_line(self, line: bytes) -> None:
        # Only a line naming ``usage`` is parsed: literally, or through a JSON escape
        # (``"\u0075sage"`` is the same name, and the Go gateway reads it too).
        if not line.startswith(b"data:") or (b"usage" not in line and b"\\u" not in line):
            return
        try:
            self._observe(_upstream_json(_trim_space(line[5:])))
        except ValueError:
            return

    def _observe(self, document: Any) -> None:
        """Keeps the counts of the ``usage``, ``message.usage`` and ``response.usage`` of one
        JSON document (an answer, or one event)."""
        if not isinstance(document, Mapping):
            return
        usages = [document.get("usage")]
        for holder in (document.get("message"), document.get("response")):
            if isinstance(holder, Mapping):
                usages.append(holder.get("usage"))
        response = document.get("response")
        if isinstance(document.get("usage"), Mapping) or (
            isinstance(response, Mapping) and isinstance(response.get("usage"), Mapping)
        ):
            self.final = True
        for usage in usages:
            if not isinstance(usage, Mapping):
                continue
            for name in _USAGE_FIELDS:
                self._counts[name] = max(self._counts.get(name, 0), _count(usage, name))

    def tokens(self) -> int | None:
        """The tokens the response reported, or None if it reported none we could read."""
        if self.streaming:
            if self._buffer and not self._overflowed:
                self._event_line(_trim_space(bytes(self._buffer)))
                self._buffer = bytearray()
        elif not self._overflowed:
            try:
                self._observe(_upstream_json(bytes(self._buffer)))
            except ValueError:
                pass
            self._buffer = bytearray()
        return tokens_from_usage(self._counts)


# ---- the middleware -------------------------------------------------------------------------


@dataclass
class _Metered:
    """What one request will be charged: resolved before the app is called."""

    route: Route
    key: str
    resource: str
    quantities: dict[str, int]


class _Held:
    """The reservation of one request, made by the engine call ``run_sync`` runs off the
    event loop. The request's task may be cancelled (the client gone, a timeout) while that
    call runs: the reservation then reaches no one, and would hold its estimate and a call in
    flight until its lease ends. Whichever of the call and the cancelled request comes second
    voids it."""

    def __init__(self, engine: Engine, now: Callable[[], int | None]) -> None:
        self._engine = engine
        self._now = now
        self._lock = threading.Lock()
        self._abandoned = False
        self._reservation: Reservation | None = None

    def keep(self, reservation: Reservation) -> Reservation:
        """Right after the reserve, where it ran: kept for the request, or voided if the
        request is gone."""
        with self._lock:
            if not self._abandoned:
                self._reservation = reservation
                return reservation
        self._void(reservation)
        return reservation

    def abandon(self) -> None:
        """In the request, cancelled before the reservation reached it: voids the one kept
        (on the event loop: the task is cancelled, and another ``run_sync`` may be cancelled
        too), or has the call void it when it comes."""
        with self._lock:
            self._abandoned = True
            reservation, self._reservation = self._reservation, None
        if reservation is not None:
            self._void(reservation)

    def _void(self, reservation: Reservation) -> None:
        if reservation.id is None:
            return  # denied: nothing held
        try:
            self._engine.void(reservation, at_ms=self._now())
        except errors.TallyError:
            _log.exception("tally: voiding the reservation of a cancelled request failed")


class _Once:
    """A call run at most once: by ``run_sync``'s worker, or on the event loop when the task
    was cancelled before the worker started it."""

    def __init__(self, function: Callable[[], None]) -> None:
        self._function = function
        self._lock = threading.Lock()
        self._started = False

    def __call__(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self._function()


class QuotaMiddleware:
    """Enforces tally quotas on an ASGI app. HTTP requests on routes that are not metered pass
    through unmetered only where ``pass_through`` lists their route, and only with a key the
    engine knows (401 otherwise): the app reaches the upstream on the operator's credentials,
    which an unknown key must not borrow. Any other route is 403 with a known key, and the app
    is not called. A websocket passes unmetered with a known key on a route that passes
    through (its handshake is a GET: listed as ``"GET /path"``), its accept losing the app's
    rate-limit and ``x-tally-*`` headers as any answer passed through does, and is closed
    before it is accepted (403) otherwise; lifespan scopes pass through untouched.

    - ``routes``: path -> ``Route`` (default ``DEFAULT_ROUTES``), metered on POST;
    - ``pass_through``: the routes passed through unmetered, as ``"METHOD /path"`` entries
      (default ``DEFAULT_PASS_THROUGH``; a list replaces it, so add to it with
      ``[*DEFAULT_PASS_THROUGH, "GET /v1/files/*"]``; empty, nothing passes through): the
      method in upper case, the path clean (no doubled or trailing slash, no dot segment, no
      "?", "#" or "%"), a segment ``*`` standing for any one segment. A request matches by its
      method and its path cleaned, and is passed on with that path. An entry that is no such
      route, or that matches a metered route (``"POST /v1/messages"``, ``"POST /v1/*"``),
      is a ``ValueError`` here. List only routes that cost nothing upstream and show nothing
      of other users;
    - ``health_path``: a path answered here, for a load balancer or an orchestrator, without a
      key and without calling the app (default None: none, so no route of the app is
      hidden). A GET or HEAD on it (its path cleaned as a route's) is 200 with
      ``{"healthy":true,"failures":[],"error":null}`` while ``Engine.health`` reports nothing,
      and 503 otherwise: ``failures`` names each it reports (``"log_failure"``,
      ``"checkpoint_failure"``, ``"compaction_failure"``), ``error`` says when the engine is
      closed or its health could not be read. The failures' detail (a path, an OS error) is
      logged (``tally.asgi``) each time it changes, not answered to a caller who needs no
      key. Another method is 405 with ``Allow: GET, HEAD`` (the Go gateway's fields, not its
      bytes, as every refusal); every answer has ``Cache-Control: no-store``, and a 200 or 503
      is the Go gateway's (``Config.HealthPath``) byte for byte. The path is clean as a
      ``pass_through`` entry's is, and neither a metered route's path nor one a route passing
      through matches with any method, else ``ValueError`` here;
    - ``models``: model name -> resource (default ``DEFAULT_MODELS``); a model that is a
      resource of the engine's policy maps to itself, any other is a 404;
    - ``clock``: milliseconds since the epoch for every engine call (default: the engine's);
    - ``default_max_tokens``: the output tokens to hold when the request names no maximum
      (default 4096; at least 1 and less than ``MAX_TOKEN_ESTIMATE``, else ``ValueError``
      here: 0 would hold none of what the model writes, and the Go gateway has no way to say
      it (its ``EstimateTokens`` 0 is its default, 4096; its command refuses
      ``-estimate-tokens 0``); the prompt's tokens are added to it, and one the engine cannot
      hold would fail every such request);
    - ``lease_ms``: how long a reservation holds if the gateway dies before settling it
      (default 30 minutes, as in the Go gateway; 1 ms to a day, else ``ValueError`` here;
      None: the engine's default lease). The engine cannot extend a lease: a response that
      outlives it finds the reservation expired and its hold given back; its usage is then
      added as a usage correction (``adjust_usage``, "add") at the reservation's time and
      logged, or, held on credits or pay-as-you-go (which a correction cannot charge), logged
      as not recorded. Set it above the longest stream the upstream serves;
    - ``refund_on_error``: give back what a call not counted in tokens (speech, images, a
      route counted in requests) held when the app answers >= 400 or raises (a token call's
      reservation is voided then either way); False: it is charged what it held;
    - ``run_sync``: runs each engine call (e.g. ``asyncio.to_thread``); default inline.
    """

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        *,
        routes: Mapping[str, Route] | None = None,
        models: Mapping[str, str] | None = None,
        clock: Callable[[], int] | None = None,
        default_max_tokens: int = 4096,
        lease_ms: int | None = DEFAULT_LEASE_MS,
        refund_on_error: bool = True,
        run_sync: RunSync | None = None,
        pass_through: Iterable[str] | None = None,
        health_path: str | None = None,
    ) -> None:
        self.app = app
        self.engine = engine
        self.routes = dict(DEFAULT_ROUTES if routes is None else routes)
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.clock = clock
        # Checked here, as the lease is: the prompt's tokens (at least one) are added to it, and
        # an estimate past the engine's largest quantity would fail every call that names no
        # maximum (400); 0 is refused as the Go command refuses it.
        if (
            isinstance(default_max_tokens, bool)
            or not isinstance(default_max_tokens, int)
            or not 1 <= default_max_tokens < MAX_TOKEN_ESTIMATE
        ):
            raise ValueError(
                f"default_max_tokens: {default_max_tokens!r}: want at least 1 (0 would hold "
                f"none of what the model writes) and less than {MAX_TOKEN_ESTIMATE}, the "
                "engine's largest quantity"
            )
        self.default_max_tokens = default_max_tokens
        if isinstance(pass_through, str):
            raise TypeError("pass_through: a list of 'METHOD /path' entries, not one string")
        self._pass_routes = [
            _PassRoute.parse(entry, self.routes)
            for entry in (DEFAULT_PASS_THROUGH if pass_through is None else pass_through)
        ]
        self.health_path = _health_path(health_path, self.routes, self._pass_routes)
        self._health_logged = ""  # what the health path last found wrong ("": nothing)
        # Checked here, so a lease the engine would refuse fails the gateway's start, not
        # every request it reserves for.
        if lease_ms is not None and _convert.lease_ms(lease_ms) > _native.MAX_LEASE_MS:
            raise ValueError(f"lease_ms: {lease_ms} is over a day ({_native.MAX_LEASE_MS})")
        self.lease_ms = lease_ms
        self.refund_on_error = refund_on_error
        self._run_sync = run_sync
        self._resource_units: dict[str, set[str]] = {}
        self._units_version = -1
        self.refresh_policy()

    def refresh_policy(self) -> None:
        """Re-reads the resources and their units. Done on its own after ``swap_policy`` on
        this engine (``Engine.policy_version``), as the Go gateway does."""
        # The version before the document: a swap in between only makes the next call read
        # again.
        version = self.engine.policy_version
        resources = self.engine.policy().get("resources", {})
        self._resource_units = {
            name: set(spec.get("units", [])) for name, spec in resources.items()
        }
        self._units_version = version

    async def _units_current(self) -> None:
        """Reads the units again if a swap changed the policy since they were read
        (``Engine.policy_version``): through ``run_sync`` as every engine call, and an engine
        that cannot answer (closed) is 503, as the Go gateway answers it."""
        if self._units_version == self.engine.policy_version:
            return
        try:
            await self._call(self.refresh_policy)
        except errors.TallyError as error:
            _log.error("tally: reading the policy failed: %s", error)
            raise _unavailable(error) from None

    def _now(self) -> int | None:
        return self.clock() if self.clock is not None else None

    async def _call(self, function: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        if self._run_sync is None:
            return function(*args, **kwargs)
        result: R = await self._run_sync(lambda: function(*args, **kwargs))
        return result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        # "/v1/chat/completions/" and "//v1/chat/completions" are the metered route too (an
        # upstream may serve them): metered, and passed on, as the route they clean to; so is
        # a route that passes through.
        path = route_path(scope.get("path", ""))
        if scope.get("type") == "websocket":
            # A known key and a route that passes through (its handshake is a GET), as the Go
            # gateway checks an upgrade; else closed before it is accepted, which the server
            # answers 403.
            if await self._known_key(scope) is not None or not self._passes("GET", path):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(_cleaned(scope, path), receive, _without_dropped_headers(send))
            return
        method = str(scope.get("method", "GET")).upper()
        if path == self.health_path:
            await self._health(send, method, path)  # before the key: a probe has none
            return
        route = self.routes.get(path) if method == "POST" else None
        if route is None:
            await self._pass_through(scope, receive, send, method, path)
            return
        scope = _cleaned(scope, path)
        try:
            key = _key(scope)  # before the body, as the Go gateway: 401, not 413
            body = await _read_body(receive)
            if body is None:
                return  # the client went away
            await self._units_current()
            metered = self._metered(key, route, body)
        except _Refusal as refusal:
            if refusal.status != 401:
                # The credential is judged before the request: a key the engine does not
                # know, or revoked, is 401 whatever its body (as the Go gateway answers), and
                # learns nothing of the routes' models or bounds. Looked up only here, off
                # the path of a well-formed request, whose reservation judges its key.
                refusal = await self._known_key(scope) or refusal
            await _send_json(send, route.api, refusal, [])
            return
        # Every metered call holds a reservation while the app makes it, as in the Go gateway:
        # a speech or image call is in flight too, and counts against the plan's calls at once.
        await self._reserve_and_settle(scope, _replaying(body, receive), send, metered)

    async def _pass_through(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str
    ) -> None:
        """A request on a route that is not metered: passed on unmetered, on its cleaned path,
        when it passes through (``pass_through``) and its key is known; else refused. The key
        is checked first (401, or 503 when the engine fails), so an unknown key learns nothing
        about routes: the app calls the upstream with the operator's credentials, which an
        unknown key must not borrow on any route. A known key on a route that does not pass
        through is 403 (``_route_refused``), without calling the app: it would serve the
        route on the operator's account and charge nothing. The answer loses the app's
        rate-limit headers, the operator's account limits (as in the Go gateway)."""
        api = self._api_of(path)
        refusal = await self._known_key(scope)
        if refusal is None and not self._passes(method, path):
            refusal = _route_refused(method, path)
        if refusal is not None:
            await _send_json(send, api, refusal, [])
            return
        watcher = _ResponseWatcher(send, [])
        await self.app(_cleaned(scope, path), receive, watcher.send)

    async def _health(self, send: Send, method: str, path: str) -> None:
        """A request on the health path, answered here without a key: GET and HEAD with the
        engine's health (``_health_answer``), any other method 405."""
        if method not in ("GET", "HEAD"):
            message = f"{method} {path} is the gateway's health path: it answers GET and HEAD only."
            refusal = _Refusal(405, "invalid_request", message, "method_not_allowed")
            headers = [(b"allow", b"GET, HEAD"), (b"cache-control", b"no-store")]
            await _send_json(send, self._api_of(path), refusal, headers)
            return
        health: Health | None = None
        failed: errors.TallyError | None = None
        try:
            health = await self._call(self.engine.health)
        except errors.TallyError as error:
            failed = error
        self._log_health(health, failed)
        status, body = _health_answer(health, failed)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        payload = b"" if method == "HEAD" else body
        await send({"type": "http.response.body", "body": payload, "more_body": False})

    def _log_health(self, health: Health | None, failed: errors.TallyError | None) -> None:
        """Logs what the health path found each time it changes (a probe comes every few
        seconds; the same failure is logged once), with the detail its answer leaves out."""
        if failed is not None:
            found = str(failed)
        else:
            found = "; ".join(f"{name}: {detail}" for name, detail in _health_failures(health))
        if found == self._health_logged:
            return
        if found:
            _log.error("tally: health: unhealthy: %s", found)
        else:
            _log.info("tally: health: healthy again")
        self._health_logged = found

    def _passes(self, method: str, path: str) -> bool:
        return any(route.matches(method, path) for route in self._pass_routes)

    def _api_of(self, path: str) -> Api:
        """The API of an unmetered path, for its error's shape: that of a metered route the
        path extends (``/v1/messages/count_tokens``), Anthropic's for its legacy
        ``/v1/complete``, else OpenAI's."""
        if path in _ANTHROPIC_PATHS:
            return Api.ANTHROPIC
        for prefix, route in self.routes.items():
            if path.startswith(prefix):
                return route.api
        return Api.OPENAI

    async def _known_key(self, scope: Scope) -> _Refusal | None:
        """None when the request carries a key the engine knows; else the 401 (or, when the
        engine fails, the 503) to answer."""
        try:
            key = _key(scope)
        except _Refusal as refusal:
            return refusal
        return await self._key_refused(key)

    async def _key_refused(self, key: str) -> _Refusal | None:
        """None when the engine knows ``key`` and has not revoked it; else the 401 (or, when
        the engine fails, the 503) to answer."""
        try:
            usage = await self._call(self.engine.usage, key, at_ms=self._now())
            if usage.revoked:
                return _Refusal(401, "authentication", _REVOKED, "invalid_api_key")
        except _Refusal as refusal:
            return refusal
        except errors.UnknownKeyError:
            return _invalid_key()
        except _STRING_ERRORS as error:
            return _string_refusal(error)
        except errors.TallyError as error:
            if _refuses_the_key(error):
                return _invalid_key()
            _log.error("tally: key lookup failed: %s", error)
            return _unavailable(error)
        return None

    def _metered(self, key: str, route: Route, body: bytes) -> _Metered:
        try:
            document = _json_body(body) if body else {}
        except _NestedTooDeep:
            raise _Refusal(
                400,
                "invalid_request",
                f"The request body is nested deeper than {MAX_JSON_NESTING} levels.",
            ) from None
        except ValueError:
            raise _Refusal(400, "invalid_request", "The request body is not valid JSON.") from None
        if not isinstance(document, Mapping):
            raise _Refusal(400, "invalid_request", "The request body must be a JSON object.")
        resource = self._resource(route, document)
        quantities = self._quantities(route, document, len(body))
        units = self._resource_units.get(resource, set())
        counted = {unit: amount for unit, amount in quantities.items() if unit in units}
        if not counted:
            raise _Refusal(
                400,
                "invalid_request",
                f"The model maps to {resource}, which this route cannot meter.",
            )
        tokens = counted.get("tokens", 0)
        if tokens > MAX_TOKEN_ESTIMATE:
            # Not cut down to what the engine holds and sent upstream: the client's error, as
            # in the Go gateway. Only for tokens held: a model metered by calls alone holds
            # none, and the upstream judges its body.
            message = f"The request may use {tokens} tokens; at most {MAX_TOKEN_ESTIMATE}."
            raise _Refusal(400, "invalid_request", message, None)
        return _Metered(route, key, resource, counted)

    def _resource(self, route: Route, document: Mapping[str, Any]) -> str:
        model = document.get("model") or route.default_model
        if not isinstance(model, str) or not model:
            raise _Refusal(400, "invalid_request", "The request names no model.")
        resource = self.models.get(model, model)
        if resource not in self._resource_units:
            raise _Refusal(
                404,
                "not_found",
                f"The model {model!r} does not exist or is not metered here.",
                "model_not_found",
            )
        return resource

    def _quantities(self, route: Route, document: Mapping[str, Any], size: int) -> dict[str, int]:
        if route.metering is Metering.INPUT_TOKENS:
            # No output to hold: the input's estimate alone, as the Go gateway holds it.
            return {"requests": 1, "tokens": size // 4 + 1}
        if route.metering is Metering.TOKENS:
            tokens = estimate_tokens(document, size, self.default_max_tokens)
            return {"requests": 1, "tokens": tokens}
        if route.metering is Metering.CHARACTERS:
            text = document.get("input")
            if not isinstance(text, str) or not text:
                raise _Refusal(400, "invalid_request", "input must be a non-empty string.")
            return {"characters": len(text), "requests": 1}
        if route.metering is Metering.IMAGES:
            return {"images": _positive_int(document, "n", 1), "requests": 1}
        return {"requests": 1}

    async def _reserve_and_settle(
        self, scope: Scope, receive: Receive, send: Send, metered: _Metered
    ) -> None:
        now = self._now()
        held = _Held(self.engine, self._now)
        try:
            reservation = await self._admit(
                send,
                metered,
                lambda: held.keep(
                    self.engine.reserve(
                        metered.key,
                        metered.resource,
                        metered.quantities,
                        at_ms=now,
                        lease_ms=self.lease_ms,
                    )
                ),
            )
        except BaseException:
            held.abandon()
            raise
        if reservation is None:
            return
        headers = rate_limit_headers(metered.route.api, reservation.decision, now)
        by_tokens = metered.route.metering in _BY_TOKENS
        watcher = _ResponseWatcher(send, headers, read_usage=by_tokens)
        try:
            await self._call_app(
                _readable_accept_encoding(scope) if by_tokens else scope,
                receive,
                send,
                watcher,
                metered.route.api,
            )
        finally:
            await self._finish(reservation, metered, watcher)

    async def _call_app(
        self, scope: Scope, receive: Receive, send: Send, watcher: _ResponseWatcher, api: Api
    ) -> None:
        """Calls the app. If it raises before answering (the upstream unreachable), the client
        gets 502 in the API's shape, as from the Go gateway, rather than the server's bare
        500, without the detail (an upstream address: the server logs it); the exception
        goes on to the server."""
        try:
            await self.app(scope, receive, watcher.send)
        except Exception:
            if watcher.status is None:
                message = "The upstream could not be reached or failed."
                await _send_json(
                    send, api, _Refusal(502, "upstream", message, "upstream_error"), []
                )
            raise

    async def _finish(
        self, reservation: Reservation, metered: _Metered, watcher: _ResponseWatcher
    ) -> None:
        """Closes the reservation once the app ran (``_close``), through ``run_sync`` as every
        engine call. If the task is cancelled there before the call started (anyio's cancel
        scopes and trio cancel at every await of a cancelled task, so this ``finally``'s await
        never runs it), it runs here on the loop instead: left open, the reservation would
        hold its estimate and a call in flight until its lease ends. One already started in a
        worker thread finishes there; it never runs twice (a usage correction is no repeat)."""
        close = _Once(lambda: self._close(reservation, metered, watcher, self._now()))
        try:
            await self._call(close)
        except BaseException as error:
            if not isinstance(error, Exception):
                close()
            raise

    def _close(
        self,
        reservation: Reservation,
        metered: _Metered,
        watcher: _ResponseWatcher,
        at_ms: int | None,
    ) -> None:
        """Settles the tokens the response reported (the estimate if a successful response
        reported none), or what a call not counted in tokens held; voids the reservation when
        the app failed without reporting any (a call not counted in tokens: only with
        ``refund_on_error``, else it is charged what it held). An engine error is logged, not
        raised, so it never hides the app's own outcome."""
        tokens = watcher.tokens()
        refund = self.refund_on_error or metered.route.metering in _BY_TOKENS
        if tokens is None and watcher.failed and refund:
            try:
                self.engine.void(reservation, at_ms=at_ms)
            except errors.TallyError:
                _log.exception("tally: void failed after the response")
            return
        actual = dict(metered.quantities)
        if tokens is not None and "tokens" in actual:
            if not watcher.usage_final:
                # A stream that ended before its report of the whole call (broken off, or a
                # client gone before Anthropic's message_delta, having read the text) used
                # more than its input: charged at least its estimate, as in the Go gateway.
                tokens = max(tokens, metered.quantities["tokens"])
            # An upstream's count past the engine's bound on a quantity would fail the settle
            # and leave the reservation open until its lease ends.
            actual["tokens"] = min(tokens, MAX_QUANTITY)
        # One time for both settles, as in the Go gateway: the fallback must not find the
        # lease ended where the first settle did not.
        try:
            settled = self.engine.settle(reservation, actual, at_ms=at_ms)
            if not settled.admitted:
                # More than the estimate, and the rest does not fit (credits short): charge
                # what was held rather than leave the reservation open until its lease ends.
                self.engine.settle(reservation, metered.quantities, at_ms=at_ms)
        except errors.ReservationExpiredError:
            # Its lease ended before this settle (TALLY_RESERVATION_EXPIRED): the hold was
            # given back, so the usage is counted nowhere yet. Settled or voided already
            # (TALLY_RESERVATION_CLOSED) is no late usage, and is logged below.
            self._record_late(reservation, metered, actual, at_ms)
        except errors.TallyError:
            _log.exception("tally: settle failed after the response")

    def _record_late(
        self,
        reservation: Reservation,
        metered: _Metered,
        actual: dict[str, int],
        at_ms: int | None,
    ) -> None:
        """Records the usage of a call whose reservation's lease ended before its settle (a
        stream longer than the lease): the engine expired it and gave its hold back, so the
        usage is added as a usage correction at the reservation's time, where a settle would
        have counted it, whatever the limit now (it really happened), as the Go gateway does.
        Only the engine's expired answer leads here, and only once per call: a settle that
        went through (retried with other amounts) or a void is no late usage. A correction
        counts plan quota only: a hold on credits or pay-as-you-go cannot be charged after
        it, and is logged as not recorded for the operator."""
        decision = reservation.decision
        where = decision.charged_to.name.lower()
        if decision.charged_to is not ChargedTo.PLAN_QUOTA:
            _log.error(
                "tally: reservation %s outlived its lease; its usage %s on %s, held on %s, was "
                "not recorded (a usage correction counts plan quota only)",
                reservation.id,
                actual,
                metered.resource,
                where,
            )
            return
        # An admitted reservation carries its time; were it missing, now (the Go gateway's
        # wall clock), not 1970, whose windows have all aged out.
        reserved_at_ms = decision.at_ms or (at_ms if at_ms is not None else int(time.time() * 1000))
        try:
            self.engine.adjust_usage(
                metered.key,
                metered.resource,
                actual,
                usage_at_ms=reserved_at_ms,
                direction="add",
                at_ms=at_ms,
            )
        except errors.TallyError:
            _log.exception(
                "tally: reservation %s outlived its lease; recording its usage %s on %s failed",
                reservation.id,
                actual,
                metered.resource,
            )
            return
        _log.warning(
            "tally: reservation %s outlived its lease; its usage %s on %s was recorded as a "
            "usage correction at %s",
            reservation.id,
            actual,
            metered.resource,
            _iso(reserved_at_ms),
        )

    async def _admit(self, send: Send, metered: _Metered, call: Callable[[], A]) -> A | None:
        """Runs the admission call (a reserve). On a denial or an error it answers
        for the app and returns None."""
        api = metered.route.api
        try:
            result = await self._call(call)
        except (errors.UnknownResourceError, errors.BadQuantityError, *_STRING_ERRORS) as error:
            if isinstance(error, errors.UnknownResourceError):
                refusal = _Refusal(404, "not_found", error.message, "model_not_found")
            elif isinstance(error, errors.BadQuantityError):
                # Quantities the resource cannot take (a chat call on a speech model, which
                # must carry characters): the request's fault, 400 as in the Go gateway.
                refusal = _Refusal(400, "invalid_request", error.message)
            else:
                refusal = _string_refusal(error)
            if refusal.status != 401:
                # The engine judges the request before the key: answered only to a key that
                # may call, as a malformed body is (``__call__``).
                refusal = await self._key_refused(metered.key) or refusal
            await _send_json(send, api, refusal, [])
            return None
        except errors.TallyError as error:
            if _refuses_the_key(error):
                refusal = _invalid_key()
            else:
                _log.error("tally: admission failed: %s", error)
                refusal = _unavailable(error)
            await _send_json(send, api, refusal, [])
            return None
        decision = result.decision if isinstance(result, Reservation) else result
        if decision.admitted:
            return result
        status, kind, code = _denial_answer(decision, api)
        headers = rate_limit_headers(api, decision, self._now())
        if decision.denial is Denial.QUOTA_EXHAUSTED:
            headers.append((b"retry-after", str(max(1, decision.retry_after_seconds)).encode()))
        elif decision.denial is Denial.TOO_MANY_RESERVATIONS:
            headers.append((b"retry-after", b"1"))
        openai_type = _denied_unit(decision) if kind == "rate_limit" else None
        message = denial_message(decision, metered.resource)
        refusal = _Refusal(status, kind, message, code, openai_type)
        await _send_json(send, api, refusal, headers)
        return None


def route_path(path: str) -> str:
    """``path`` cleaned as a route (as Go's ``path.Clean``): no doubled or trailing slashes,
    no dot segments."""
    return "/" + posixpath.normpath("/" + path).lstrip("/")


@dataclass(frozen=True)
class _PassRoute:
    """One entry of ``pass_through``: ``"METHOD /path"``, the method in upper case, the path
    clean (as ``route_path`` gives it: no doubled or trailing slash, no dot segment; no "?",
    "#" or "%"), a segment ``*`` matching any one segment (``"GET /v1/models/*"`` is GET
    /v1/models/m2.7, not GET /v1/models nor GET /v1/models/a/b). A request matches by its
    method (in upper case) and its path cleaned, which is the path passed on: the app serves
    exactly the route the entry names. As the Go gateway's PassThrough."""

    method: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, entry: str, routes: Mapping[str, Route]) -> _PassRoute:
        """The entry's route; ``ValueError`` naming it for one that is no route as said above,
        or that would match a metered route (POST on a metered path): that request would be
        metered and free at once."""

        def bad(why: str) -> ValueError:
            return ValueError(f"pass_through: {entry!r}: {why}")

        if not isinstance(entry, str):
            raise TypeError(f"pass_through: {entry!r}: want a string 'METHOD /path'")
        fields = entry.split()
        if len(fields) != 2:
            raise bad("want 'METHOD /path', e.g. 'GET /v1/models'")
        method, path = fields
        if not method.isascii() or not method.isalpha() or not method.isupper():
            raise bad("the method must be in upper case letters, e.g. GET")
        if not path.startswith("/") or route_path(path) != path or any(c in path for c in "?#%"):
            raise bad(
                "the path must start with / and be clean: no doubled or trailing slash, "
                "no . or .. segment, no ?, # or %"
            )
        segments = tuple(path[1:].split("/"))
        if any("*" in segment and segment != "*" for segment in segments):
            raise bad("'*' stands for a whole segment only")
        route = cls(method, segments)
        for metered in routes:
            if route.matches("POST", metered):
                raise bad(
                    f"it matches the metered route POST {metered}, which cannot also pass "
                    "through unmetered"
                )
        return route

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with ``method`` on ``path`` (cleaned) is this route."""
        if method != self.method or not path.startswith("/"):
            return False
        segments = path[1:].split("/")
        return len(segments) == len(self.segments) and all(
            segment == want or (want == "*" and segment != "")
            for segment, want in zip(segments, self.segments, strict=True)
        )


def _health_path(
    path: object, routes: Mapping[str, Route], pass_routes: Iterable[_PassRoute]
) -> str | None:
    """``health_path`` checked: None, or a clean path (as a ``pass_through`` entry's path) that
    is neither a metered route's path nor one a route passing through matches with any
    method, which the health path would hide; else ``ValueError`` (``TypeError`` for no
    string), naming it, as the Go gateway's New refuses its HealthPath."""
    if path is None:
        return None
    if not isinstance(path, str):
        raise TypeError(f"health_path: {path!r}: want a path such as '/healthz', or None")

    def bad(why: str) -> ValueError:
        return ValueError(f"health_path: {path!r}: {why}")

    if not path.startswith("/") or route_path(path) != path or any(c in path for c in "?#%"):
        raise bad(
            "the path must start with / and be clean: no doubled or trailing slash, "
            "no . or .. segment, no ?, # or %"
        )
    if path in routes:
        raise bad(f"it is the metered route POST {path}, which the health path would hide")
    for route in pass_routes:
        if route.matches(route.method, path):
            raise bad(
                f"the route {route.method} /{'/'.join(route.segments)} passes through there "
                "(pass_through), which the health path would hide"
            )
    return path


def _health_failures(health: Health | None) -> list[tuple[str, str]]:
    """The failures ``health`` reports, in its fields' order: each field's name and detail."""
    if health is None:
        return []
    fields = [
        ("log_failure", health.log_failure),
        ("checkpoint_failure", health.checkpoint_failure),
        ("compaction_failure", health.compaction_failure),
    ]
    return [(name, detail) for name, detail in fields if detail is not None]


def _health_answer(health: Health | None, failed: errors.TallyError | None) -> tuple[int, bytes]:
    """The status and body answering what ``Engine.health`` returned (or raised), byte for byte
    as the Go gateway writes them: 200 when it reports nothing; 503 naming each failure it
    reports (not its detail: a path, an OS error, for a caller who needs no key), or saying
    why it could not be read."""
    error = None
    if isinstance(failed, errors.ClosedError):
        error = f"the engine is closed ({failed.name})"
    elif failed is not None:
        error = f"the engine's health could not be read ({failed.name})"
    failures = [name for name, _ in _health_failures(health)]
    healthy = failed is None and not failures
    document = {"healthy": healthy, "failures": failures, "error": error}
    body = json.dumps(document, separators=(",", ":")).encode() + b"\n"
    return (200 if healthy else 503), body


def _cleaned(scope: Scope, path: str) -> Scope:
    """``scope`` on ``path`` (its path cleaned), to pass on: unchanged if it was clean."""
    if path == scope.get("path"):
        return scope
    # Escaped as Go's URL.EscapedPath escapes a path (":" and "@" stay, as in "ft:gpt-4o:org").
    raw_path = urllib.parse.quote(path, safe="/:@!$&'()*+,;=")
    return dict(scope, path=path, raw_path=raw_path.encode("ascii"))


def _route_refused(method: str, path: str) -> _Refusal:
    """A route the middleware neither meters nor passes through: 403, a request this caller may
    not make here (Anthropic's permission_error; OpenAI's 403s are invalid_request_error, here
    with code route_not_served), rather than the 404 the upstreams give a route they do not
    have: the route may well exist upstream (batches, files), and it is this gateway that does
    not serve it, whatever the key's quota, which no retry or other model changes. A websocket
    refused before it is accepted is 403 too (as the server answers the close), so every
    refused route, websocket or not, is answered alike, as in the Go gateway."""
    message = (
        f"{method} {path} is not served by this gateway: the route is not metered, and only "
        "metered routes and the routes an operator lets pass through (costing nothing) reach "
        "the upstream."
    )
    return _Refusal(403, "forbidden", message, "route_not_served")


def _key(scope: Scope) -> str:
    """The request's key, or the 401 refusal for none or two different ones."""
    try:
        key = api_key(scope)
    except ConflictingKeys:
        raise _Refusal(
            401,
            "authentication",
            "The request carries two different API keys (Authorization: Bearer and "
            "x-api-key): send one.",
            "invalid_api_key",
        ) from None
    if key is None:
        raise _Refusal(
            401,
            "authentication",
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'.",
            "invalid_api_key",
        )
    return key


def _unavailable(error: errors.TallyError) -> _Refusal:
    """The engine could not decide (closed, storage, its log, poisoned): 503, which a client
    may retry later, as the Go gateway answers."""
    message = f"The quota service failed ({error.name})."
    return _Refusal(503, "unavailable", message, "service_unavailable")


def lease_ended(error: errors.TallyError) -> bool:
    """Whether a settle found its reservation closed because its lease ended (the engine
    expired it and gave its hold back), not because it was already settled or voided: only
    then is the call's usage not counted anywhere. Told by the status
    (TALLY_RESERVATION_EXPIRED, ``ReservationExpiredError``), not by the message's wording."""
    return isinstance(error, errors.ReservationExpiredError)


#: The message for a revoked key, on every route, as the Go gateway words it.
_REVOKED = "This API key was revoked."


def _invalid_key() -> _Refusal:
    return _Refusal(401, "authentication", "Invalid API key.", "invalid_api_key")


#: The engine's errors about a string argument; its message names the argument first
#: ("key: is 300 bytes; at most 256").
_STRING_ERRORS = (
    errors.EmptyStringError,
    errors.StringTooLongError,
    errors.NulInStringError,
    errors.InvalidUtf8Error,
)


def _field(error: errors.TallyError) -> str | None:
    """The argument an engine error names: ``"key"`` for ``"key: is 300 bytes; ..."``."""
    field, separator, _ = error.message.partition(": ")
    return field if separator and field.isidentifier() else None


def _refuses_the_key(error: errors.TallyError) -> bool:
    """Whether the engine refused the request's key for characters no key may hold (a control
    character: a tab or U+0085, which a header can carry), an ``InvalidArgumentError`` naming
    ``key``: a credential no key can be, 401 as an unknown key is, not the engine failing
    (503), as the Go gateway answers it."""
    return isinstance(error, errors.InvalidArgumentError) and _field(error) == "key"


def _string_refusal(error: errors.TallyError) -> _Refusal:
    """The answer to a string the engine refused, by the argument it names: the key's is 401
    (a credential no key can be, as an unknown key is); the resource's 404 (a model name no
    resource can have is an unknown model); any other string is the middleware's own (a
    request id), so its fault: 500."""
    field = _field(error)
    if field == "key":
        return _invalid_key()
    if field == "resource":
        return _Refusal(
            404,
            "not_found",
            "The model does not exist or is not metered here.",
            "model_not_found",
        )
    _log.error("tally: the engine refused the middleware's own %s: %s", field, error)
    return _Refusal(500, "internal", f"The gateway failed ({error.name}).", "internal_error")


#: The upstream's headers dropped from every answer: its rate-limit headers (the operator's
#: account limits), which the gateway's replace on metered routes, and every ``x-tally-*``,
#: the gateway's own names, which an upstream's would forge where the decision sets none (a
#: pay-as-you-go key's ``x-tally-plan``), as the Go gateway drops them.
_DROPPED_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-", b"x-tally-")


def _without_dropped_headers(send: Send) -> Send:
    """``send`` for a websocket passed through: its accept (or refusal) loses the app's
    headers named by ``_DROPPED_PREFIXES``, as every HTTP answer does, and as the Go gateway
    drops them from the upgrade's 101."""

    async def filtered(message: Message) -> None:
        if message.get("type") in ("websocket.accept", "websocket.http.response.start"):
            headers = [
                (name, value)
                for name, value in message.get("headers", [])
                if not bytes(name).lower().startswith(_DROPPED_PREFIXES)
            ]
            message = dict(message, headers=headers)
        await send(message)

    return filtered


class _Decoded:
    """Feeds a response body to a ``UsageReader`` as the client receives it, decoded first when
    it is compressed (``Content-Encoding: gzip``, ``x-gzip`` or ``deflate``): an upstream that
    compressed its answer (a proxying app that passed the client's ``Accept-Encoding`` on)
    would otherwise have its tokens charged at the estimate. At most ``_DECODED_STEP_BYTES``
    are decoded at a time, so a small body that inflates hugely is read, not held. A body in
    another coding cannot be read (``readable`` False): the reservation settles at the
    estimate, and a warning says why."""

    _DECODED_STEP_BYTES = 1 << 16
    #: The most bytes of a "deflate" body kept while zlib's reading has decoded nothing: a raw
    #: reading, should zlib's fail, starts again from the body's first byte.
    _RAW_RETRY_BYTES = 1 << 16

    def __init__(self, reader: UsageReader, content_encoding: str) -> None:
        self._reader = reader
        self._inflater: Any = None
        # "deflate" is tried with zlib's header first, and raw, from the body's first byte, if
        # zlib's reading fails before it has decoded anything (within `_RAW_RETRY_BYTES`).
        self._raw_deflate_may_follow = content_encoding.strip().lower() == "deflate"
        # What was fed while zlib's reading decoded nothing: a raw stream whose first two bytes
        # form a valid zlib header (78 01) fails zlib's reading only in a later piece, and the
        # raw reading must have the pieces before it too.
        self._fed = bytearray()
        self.readable = True
        coding = content_encoding.strip().lower()
        # A gzip body is a series of members (RFC 1952), each read to its end in turn, as Go's
        # gzip reader reads them: zlib's stops at the first member's end.
        self._gzip = coding in ("gzip", "x-gzip")
        if self._gzip:
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._inflater = zlib.decompressobj()
        elif coding not in ("", "identity"):
            self.readable = False

    def feed(self, chunk: bytes) -> None:
        if not self.readable or not chunk:
            return
        if self._inflater is None:
            self._reader.feed(chunk)
            return
        if self._raw_deflate_may_follow:
            self._fed += chunk
            if len(self._fed) > self._RAW_RETRY_BYTES:
                self._raw_deflate_may_follow = False  # zlib's, as far as can be told
                self._fed = bytearray()
        data = chunk
        try:
            while data:
                decoded = self._inflater.decompress(data, self._DECODED_STEP_BYTES)
                if decoded:
                    self._raw_deflate_may_follow = False
                    self._fed = bytearray()
                self._reader.feed(decoded)
                data = self._inflater.unconsumed_tail
                if not data and self._gzip and self._inflater.eof:
                    data = self._inflater.unused_data  # the next member, if any
                    if data:
                        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        except zlib.error:
            if self._raw_deflate_may_follow:
                # "deflate" as many servers send it: the raw stream, without zlib's header,
                # read from its first byte (every piece fed so far, this one included).
                self._raw_deflate_may_follow = False
                fed, self._fed = bytes(self._fed), bytearray()
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                self.feed(fed)
                return
            self.readable = False


#: The codings ``_Decoded`` reads: what a metered call's ``Accept-Encoding`` is cut down to.
_READABLE_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})


def _readable_accept_encoding(scope: Scope) -> Scope:
    """``scope`` with its ``Accept-Encoding`` cut down to the codings the middleware can read
    the usage through (``_Decoded``): a client listing ``br`` or ``zstd`` would otherwise let
    an upstream answer in one, and its tokens be charged at the estimate. A client that sent
    none keeps none; one that accepts none of them is sent ``identity``."""
    headers = list(scope.get("headers", []))
    if not any(bytes(name).lower() == b"accept-encoding" for name, _ in headers):
        return scope
    accepted: list[str] = []
    for name, value in headers:
        if bytes(name).lower() != b"accept-encoding":
            continue
        for item in bytes(value).decode("latin-1").split(","):
            coding = item.split(";", 1)[0].strip().lower()
            if coding in _READABLE_CODINGS and item.strip() not in accepted:
                accepted.append(item.strip())
    kept = [(name, value) for name, value in headers if bytes(name).lower() != b"accept-encoding"]
    kept.append((b"accept-encoding", (", ".join(accepted) or "identity").encode("latin-1")))
    return dict(scope, headers=kept)


class _ResponseWatcher:
    """Wraps ``send``: puts the rate-limit headers on the response start (in place of the app's
    own rate-limit headers), notes the status and (for token routes) reads the usage as the body
    streams past (decoded if compressed: ``_Decoded``)."""

    def __init__(self, send: Send, headers: Headers, read_usage: bool = False) -> None:
        self._send = send
        self._headers = headers
        self._read_usage = read_usage
        self._reader: UsageReader | None = None
        self._decoded: _Decoded | None = None
        self.status: int | None = None

    @property
    def failed(self) -> bool:
        return self.status is None or self.status >= 400

    async def send(self, message: Message) -> None:
        if message.get("type") == "http.response.start":
            self.status = int(message.get("status", 200))
            # The gateway's headers replace the app's rate-limit headers, all of them: the
            # client is limited by its key's quota, not by the operator's account upstream
            # (whose limits would leak), as in the Go gateway. The app's x-tally-* go too,
            # whichever the gateway sets: they would pass for its own.
            ours = {name for name, _ in self._headers}
            headers = [
                (name, value)
                for name, value in message.get("headers", [])
                if bytes(name).lower() not in ours
                and not bytes(name).lower().startswith(_DROPPED_PREFIXES)
            ]
            headers += self._headers
            message = dict(message, headers=headers)
            if self._read_usage and self.status < 400:
                by_name = dict((bytes(k).lower(), bytes(v)) for k, v in headers)
                content_type = by_name.get(b"content-type", b"")
                coding = by_name.get(b"content-encoding", b"").decode("latin-1")
                self._reader = UsageReader(content_type.decode("latin-1").lower())
                self._decoded = _Decoded(self._reader, coding)
                if not self._decoded.readable:
                    _log.warning(
                        "tally: a response in Content-Encoding %r cannot be read for its "
                        "usage; the reservation settles at its estimate",
                        coding,
                    )
        elif message.get("type") == "http.response.body" and self._decoded is not None:
            self._decoded.feed(bytes(message.get("body", b"")))
        await self._send(message)

    def tokens(self) -> int | None:
        if self._reader is None or self._decoded is None or not self._decoded.readable:
            return None
        return self._reader.tokens()

    @property
    def usage_final(self) -> bool:
        """Whether the usage read reports the whole call (``UsageReader.final``)."""
        return self._reader is not None and self._reader.final


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (bounded), or None if the client disconnected."""
    chunks = bytearray()
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return None
        chunks += message.get("body", b"")
        if len(chunks) > MAX_REQUEST_BODY_BYTES:
            raise _Refusal(413, "too_large", "The request body is too large.", "request_too_large")
        if not message.get("more_body", False):
            return bytes(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then the client's messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(
    send: Send, api: Api, refusal: _Refusal, headers: Iterable[tuple[bytes, bytes]]
) -> None:
    error = error_body(api, refusal.kind, refusal.message, refusal.code, refusal.openai_type)
    body = json.dumps(error).encode()
    all_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
