"""How long a request to a store's URL may wait, and how often it is tried: a server that accepts a
connection and never answers must fail a command in about a minute, naming the URL, not hang it.

``MEALV2_REMOTE_TIMEOUT`` (seconds, default 10) bounds each wait for the server: connecting, and
each read of its reply (a large object downloading steadily never times out). ``MEALV2_REMOTE_RETRIES``
(default 2) is how many more times a request that timed out, lost its connection or got a
"slow down"/5xx reply is sent, after 0.5 s, 1 s, 2 s...: a request fails after at most
(retries + 1) x timeout plus the pauses, about 30 s by default (over HTTP an object's first look
is a HEAD, then a GET where the HEAD fails: twice that). Only :func:`with_retries` retries: the
protocols' own retry loops (botocore's, s3fs's) are set to one attempt, so the bound is this one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

from ..errors import MealV2Error

TIMEOUT_VARIABLE = "MEALV2_REMOTE_TIMEOUT"
RETRIES_VARIABLE = "MEALV2_REMOTE_RETRIES"
# (default, low, high): below a second a busy server's first byte times out; past 10 minutes a dead one
# hangs a command for an hour; more than 10 retries only delays the message.
TIMEOUT = (10.0, 0.1, 600.0)
RETRIES = (2, 0, 10)
# Exception classes (by name, anywhere in the chain and in each class's bases) that a retry may cure:
# the transports' (botocore's, aiohttp's) share no base class and are optional imports.
TRANSIENT = {"TimeoutError", "ConnectionError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
             "ConnectionClosedError", "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError",
             "IncompleteRead", "ResponseStreamingError"}
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}


class TransportError(MealV2Error):
    """A remote-request setting out of its bounds."""


def _setting(variable: str, bounds: tuple, kind: type):
    default, low, high = bounds
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        what = "an integer" if kind is int else "a number of seconds"
        raise TransportError(f"{variable}={raw!r} is refused; expected {what} in [{low:g}, {high:g}]; unset it for "
                             f"the default, {default:g} (README: Share a store, timeouts)")
    return value


def remote_timeout() -> float:
    """``$MEALV2_REMOTE_TIMEOUT``: seconds a request waits for the server (to connect, per read)."""
    return _setting(TIMEOUT_VARIABLE, TIMEOUT, float)


def remote_retries() -> int:
    """``$MEALV2_REMOTE_RETRIES``: how many more times a request that may succeed again is sent."""
    return _setting(RETRIES_VARIABLE, RETRIES, int)


def _s3(timeout: float) -> dict:
    return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                              "retries": {"max_attempts": 1, "mode": "standard"}}}


def _http(timeout: float) -> dict:
    import aiohttp   # optional (mealv2[remote]); fsspec's HTTP filesystem needs it

    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout)}}


@dataclasses.dataclass(frozen=True)
class Transport:
    """A protocol's fsspec options for ``timeout`` seconds per wait, and the attributes that turn its
    own retries off on the filesystem made."""

    options: Callable[[float], dict]
    single_attempt: dict = dataclasses.field(default_factory=dict)


# Protocols without an entry get their library's own timeouts and retries (README says which).
TRANSPORTS = {"s3": Transport(_s3, {"retries": 1}), "s3a": Transport(_s3, {"retries": 1}),
              "http": Transport(_http), "https": Transport(_http)}


def storage_options(protocol: str) -> dict:
    """fsspec options giving ``protocol``'s requests the timeout; empty where mealv2 sets none."""
    transport = TRANSPORTS.get(protocol)
    return transport.options(remote_timeout()) if transport else {}


def single_attempt(fs, protocol: str) -> None:
    """Turn ``fs``'s own retry loop off (s3fs retries a timed-out request 5 times with botocore's 5
    inside each): :func:`with_retries` is the one bound."""
    for name, value in TRANSPORTS[protocol].single_attempt.items() if protocol in TRANSPORTS else ():
        setattr(fs, name, value)


def transient(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) is a failure that sending the request again may cure."""
    for _ in range(8):   # a chain is short; bounded against a cycle
        if e is None:
            return False
        if TRANSIENT & {c.__name__ for c in type(e).__mro__}:
            return True
        response = getattr(e, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if str(code) in TRANSIENT_CODES or (getattr(e, "status", 0) or 0) >= 500:
            return True
        e = e.__cause__ or e.__context__
    return False


def with_retries(request: Callable, *args, retries: int | None = None, sleep=time.sleep):
    """``request(*args)``, sent again up to ``retries`` (default :func:`remote_retries`) more times
    while it fails transiently (:func:`transient`); the last failure is raised."""
    retries = remote_retries() if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return request(*args)
        except Exception as e:
            if attempt == retries or not transient(e):
                raise
        sleep(min(0.5 * 2 ** attempt, 8.0))
