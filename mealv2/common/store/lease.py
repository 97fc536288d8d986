"""One writer per store at a URL: a lease object, where object storage has no file lock.

A store on disk is guarded by a ``flock`` (locks.py), which the kernel drops when its holder dies.
Object stores have no locks; what they do have is conditional writes: a PUT with ``If-None-Match: *``
creates an object only where none exists, and a PUT or DELETE with ``If-Match: ETAG`` replaces or
deletes it only if it is unchanged since it was read, each decided atomically by the server. AWS S3
has them since late 2024, as do MinIO and moto (the tests' server); other S3-compatible servers may
not, and one that ignores either condition is refused when the lease is taken (probes that must get
412: a second ``If-None-Match`` PUT, a PUT and a DELETE with a wrong ``If-Match``), rather than let two
writers interleave.

The lease is the object ``STORE.lease`` beside the store's prefix (like ``STORE.lock``, so copying the
store's prefix to publish it never copies the lease). Its holder renews it every quarter of its
duration with a conditional PUT on its last ETag; another writer may take it over once the server's
own clock (the response's ``Date`` against the object's ``Last-Modified``) says it went unrenewed for
its duration. A writer that dies holding the lease therefore keeps the store for at most that duration
(``MEALV2_LEASE_SECONDS``, default 60 s), and nothing is left to clean up by hand.

What it guarantees, and how: fencing is by check-before-commit. The holder dates its hold from when
the last renewal that landed was *sent* (or, where its reply was lost, from the object's own
Last-Modified, never later), on a clock that counts a suspend (:func:`lease_clock`), and
:meth:`Lease.check`, called before each commit, refuses once less than one request deadline is left
of the duration: a commit that passes the check lands before a taker may see the lease expired, as
long as that commit's own request ends within the deadline. Each lease request has a deadline of a
quarter of the duration (at most 30 s) and no retries, so a renewal never trails its check. What it
cannot do: stop a data request already sent from landing later than its own timeout allows (that is
objects.py's request timeout). Clocks are checked rather than trusted: a server whose Date differs from
the holder's clock, or whose Last-Modified (read back from the lease just taken) differs from its Date, by
more than a quarter of the duration is refused.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import fsspec
from fsspec.asyn import sync

from ..errors import MealV2Error
from .objects import RemoteError, check_url, redact

SECONDS_VARIABLE = "MEALV2_LEASE_SECONDS"
DEFAULT_SECONDS = 60.0
# Below 10 s a renewal's request deadline (a quarter) is under 3 s, which a busy server or network misses and
# a live writer then stops; above an hour a writer that died holding a store locks it out for longer than a
# restart takes. Tests lower MIN_SECONDS (monkeypatched) to keep their expiries short.
MIN_SECONDS, MAX_SECONDS = 10.0, 3600.0
MAX_DEADLINE = 30.0   # seconds: the longest a lease request may take, however long the lease
# S3's Last-Modified and Date are whole seconds: an age read from them may be up to this much short.
CLOCK_RESOLUTION = 1.0
ATTEMPTS = 3          # tries to take a lease that changes under each (another writer starting at once)
# Error codes of a condition that did not hold: 412, and AWS's 409 for conditional writes racing.
CONFLICTS = {"PreconditionFailed", "ConditionalRequestConflict"}
ABSENT = {"NoSuchKey"}
CONDITIONS = {"PutObject": ("IfNoneMatch", "IfMatch"), "DeleteObject": ("IfMatch",)}   # S3 arguments used
WRONG_ETAG = '"00000000000000000000000000000000"'   # the probes' If-Match: no object has it


def lease_clock() -> float:
    """Seconds on the clock that dates a hold: CLOCK_BOOTTIME where there is one (Linux), which keeps
    counting while the machine is suspended; ``time.monotonic`` (which may not) elsewhere. A holder
    woken from a suspend longer than its lease must know its lease ran out meanwhile."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def request_deadline(seconds: float) -> float:
    """The longest one lease request may take: a quarter of the lease (at most MAX_DEADLINE), below half of
    it, so that a renewal retried by nobody never lands after a check that counted on it."""
    return min(seconds / 4, MAX_DEADLINE)


class LeaseError(MealV2Error):
    """A store's lease refused (another writer holds it) or lost (taken over, or not renewed)."""


class _Conflict(Exception):
    """A conditional write or delete whose condition did not hold."""


class _Absent(Exception):
    """No lease object."""


class _Skewed(Exception):
    """The server's clock (its Date) and this machine's disagree by more than a quarter of the lease."""


@dataclass(frozen=True)
class _Seen:
    """The lease object as read: its ETag, its body (None when it is not a mealv2 lease) and its age
    by the server's clock."""
    etag: str
    body: dict | None
    age: float

    @property
    def expired(self) -> bool:
        return self.age >= self.body["seconds"] + CLOCK_RESOLUTION

    @property
    def holder(self) -> str:
        b = self.body
        return f"{b['holder']}, `mealv2 {b['command']}`, since {b['since']}"


def lease_seconds(seconds: float | None, error: type[MealV2Error]) -> float:
    """The lease duration: ``seconds``, else ``$MEALV2_LEASE_SECONDS``, else 60; finite, MIN_SECONDS to
    MAX_SECONDS. The one place the bounds are checked."""
    if seconds is None:
        raw = os.environ.get(SECONDS_VARIABLE, "")
        if not raw.strip():
            return DEFAULT_SECONDS
        where = f"{SECONDS_VARIABLE}={raw!r}"
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
    else:
        where = f"lease seconds = {seconds!r}"
    if not (math.isfinite(seconds) and MIN_SECONDS <= seconds <= MAX_SECONDS):
        raise error(f"{where} is not a lease duration; expected a number of seconds from {MIN_SECONDS:g} to "
                    f"{MAX_SECONDS:g}: a shorter lease gives its renewals too little time to land on a busy "
                    f"network, and a longer one keeps a store written by a writer that died locked for that long. "
                    f"Unset {SECONDS_VARIABLE} for the default, {DEFAULT_SECONDS:g}")
    return seconds


def _is_lease(body) -> bool:
    return (isinstance(body, dict) and {"holder", "command", "since", "seconds", "token"} <= body.keys()
            and isinstance(body["seconds"], (int, float)) and math.isfinite(body["seconds"]))


class Lease(ABC):
    """A held lease on the store at ``store_url``; renewed by a daemon thread until :meth:`release`.
    Subclasses give the object operations of one protocol (registry ``LEASES``).

    A lease built with ``token`` (another process's: rank 0's, for the other ranks of a job) is watched, not
    held: its thread reads the object every quarter of the lease, and :meth:`check` fails once the object is
    gone, another's, or not seen renewed for as long as a holder may go (every rank stops before its next
    commit when the job's lease is lost); :meth:`release` never deletes it."""

    def __init__(self, store_url: str, command: str, *, seconds: float, error: type[MealV2Error],
                 token: str | None = None):
        self.store = redact(store_url)
        self.url = f"{store_url}.lease"
        self.command, self.seconds, self.error = command, seconds, error
        self.deadline = request_deadline(seconds)
        self.watching = token is not None
        self.token = token or secrets.token_hex(16)
        self._since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.etag = ""
        self._beats = 0                # renewals written: each body differs, so each ETag does
        self._sends: dict[int, float] = {}   # lease_clock() when each of the last few beats was sent
        self._last_read: tuple[str, float] | None = None   # the ETag our last read saw, and when it was sent
        self._renewed = -math.inf      # lease_clock() no later than the last write that landed
        self._lost: str | None = None  # why the lease was lost, once it was
        self._last_error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"mealv2-lease {self.store}", daemon=True)
        self._released = False

    # -- object operations, per protocol --------------------------------------------------------------
    @abstractmethod
    def _create(self, body: bytes) -> str:
        """Write the lease object if none exists; its ETag. _Conflict if one exists."""

    @abstractmethod
    def _replace(self, body: bytes, etag: str) -> str:
        """Overwrite the lease object if its ETag is ``etag``; the new ETag. _Conflict, _Absent."""

    @abstractmethod
    def _read(self) -> _Seen:
        """The lease object now. _Absent."""

    @abstractmethod
    def _delete(self, etag: str) -> None:
        """Delete the lease object if its ETag is ``etag``. _Conflict, _Absent."""

    @abstractmethod
    def _server(self) -> str:
        """The server, as a user names it (its endpoint), for the refusal of one without conditions."""

    # -- the lease --------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        self._beats += 1
        self._sends = {b: t for b, t in self._sends.items() if b > self._beats - 4} | {self._beats: lease_clock()}
        return json.dumps({"holder": f"pid {os.getpid()} on {socket.gethostname()}", "command": self.command,
                           "since": self._since, "seconds": self.seconds, "token": self.token,
                           "beat": self._beats}).encode()

    def _acquire(self) -> None:
        try:
            if self.watching:
                self._watch()
            else:
                self._take()
                self._check_dates()
        except MealV2Error:
            raise
        except _Skewed as e:
            raise self.error(f"{self.store}: {e}") from None
        except Exception as e:   # s3fs's, botocore's and aiohttp's errors share no base class
            raise self._unwritable(e) from None
        if self.watching and self._lost is not None:
            self.check()
        self._thread.start()

    def _unwritable(self, e: Exception) -> MealV2Error:
        return self.error(f"{self.store}: its lease {redact(self.url)} cannot be written ({type(e).__name__}: {e}); "
                          f"check that the bucket exists, that the credentials (AWS_ACCESS_KEY_ID/"
                          f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws) may read, write and delete objects there, "
                          f"and that the endpoint (AWS_ENDPOINT_URL_S3 if set) is reachable")

    def _take(self) -> None:
        seen = None
        for _ in range(ATTEMPTS):
            sent = lease_clock()
            body = self._body()
            failed = None
            try:
                self.etag = self._create(body)
            except _Conflict:
                pass
            except (MealV2Error, _Skewed):
                raise
            except Exception as e:   # no reply: it may have landed; the read below tells (or fails, and says why)
                failed = e
            else:
                self._renewed = sent
                return self._probe(body)
            try:
                seen = self._read()
            except _Absent:   # released between our write and our read: try again; or our write failed
                if failed is not None:
                    raise self._unwritable(failed) from None
                continue
            if seen.body is None:
                raise self.error(f"{self.store} cannot be written: {redact(self.url)} exists but is not a mealv2 "
                                 f"lease; if no mealv2 command writes {self.store}, delete that object and run "
                                 f"again")
            if seen.body["token"] == self.token:   # our write landed; its reply was lost
                self.etag, self._renewed = seen.etag, sent
                return self._probe(body)
            if not seen.expired:
                raise self._refusal(seen)
            sent = lease_clock()
            try:
                self.etag = self._replace(self._body(), seen.etag)
            except (_Conflict, _Absent):   # another writer took it, or its holder renewed it: read again
                continue
            self._renewed = sent
            print(f"mealv2: took over {self.store} from {seen.holder}: its lease was not renewed for "
                  f"{seen.age:.0f} s (its duration: {seen.body['seconds']:g} s)", file=sys.stderr)
            return
        if seen is not None and seen.body is not None and not seen.expired:
            raise self._refusal(seen)
        raise self.error(f"{self.store}: its lease {redact(self.url)} changed under each of {ATTEMPTS} attempts to "
                         f"take it (other writers starting at once?); make sure only one `mealv2 "
                         f"{self.command}` writes {self.store}, then run again")

    def _probe(self, body: bytes) -> None:
        """Refuse a server that ignores If-None-Match or If-Match: it would let a second writer in, or an old
        holder overwrite or delete a taker's lease, silently. The PUT probes write the lease's own body, so
        where they are not refused the lease is unchanged (its ETag, the body's MD5, too)."""
        probes = (("a PUT with If-None-Match: *", lambda: self._create(body)),
                  ("a PUT with a wrong If-Match", lambda: self._replace(body, WRONG_ETAG)),
                  ("a DELETE with a wrong If-Match", lambda: self._delete(WRONG_ETAG)))
        for what, probe in probes:
            try:
                probe()
            except _Conflict:
                continue
            except _Absent:   # a DELETE If-Match on a missing object: it was deleted, unconditionally
                pass
            raise self._server_refusal(
                f"ignores conditional writes ({what} over the existing {redact(self.url)} succeeded where it must "
                f"get 412), so mealv2 cannot keep a second writer out of the store there. Write the store to a local "
                f"path and copy it to the bucket once labelled, or use a server with conditional writes (AWS S3, "
                f"MinIO)")

    def _check_dates(self) -> None:
        """Read the lease just taken back: its age by the server (Date against Last-Modified) must be about
        nil. A server whose Last-Modified comes from another clock than its Date (nodes of a cluster without
        NTP) would make a live lease look expired, or a dead one live: refused, as no writer can hold it."""
        seen = self._read()
        if seen.body is None or seen.body["token"] != self.token:   # taken over already: the heartbeat tells
            return
        if abs(seen.age) > self.seconds / 4 + CLOCK_RESOLUTION + self.deadline:
            raise self._server_refusal(
                f"dates objects by another clock than its replies: the lease {redact(self.url)}, just written, is "
                f"{seen.age:+.0f} s old by its Last-Modified and the reply's Date, more than a quarter of the "
                f"{self.seconds:g} s lease, so another writer could take over a live lease; sync the server's clocks "
                f"(NTP on each of its nodes) and run again")

    def _server_refusal(self, what: str) -> MealV2Error:
        """The lease just taken deleted, and the refusal of a server that cannot keep a lease: ``what`` it does."""
        self._delete_quietly()
        return self.error(f"{self.store}: the object store at {self._server()} {what}")

    def _refusal(self, seen: _Seen) -> MealV2Error:
        left = math.ceil(seen.body["seconds"] + CLOCK_RESOLUTION - seen.age)
        return self.error(f"{self.store} is being written by another `mealv2 {seen.body['command']}` process "
                          f"({seen.holder}; its lease {redact(self.url)} was renewed {seen.age:.0f} s ago); "
                          f"refusing to interleave writes. Wait for it to finish, or stop it, or use another URL; "
                          f"if that process is dead, its lease expires in {left} s: run the same command again then, "
                          f"or break the dead lease now by deleting it: {self._break_command()}")

    def _break_command(self) -> str:
        return f"`aws s3 rm {redact(self.url)}`"

    def _heartbeat(self) -> None:
        """Renew (or, watching, read) every quarter of the lease until released or lost. Any failure of this
        thread itself is a lost lease, so the writer stops at its next commit rather than write unguarded."""
        try:
            while not self._stop.wait(self.seconds / 4):
                self._watch() if self.watching else self._renew()
                if self._lost is None and lease_clock() - self._renewed >= self.seconds - self.deadline:
                    self._lost = self._unrenewed()
                if self._lost is not None:
                    return
        except BaseException as e:
            self._lost = f"its heartbeat thread failed ({type(e).__name__}: {e})"

    def _renew(self) -> None:
        sent = lease_clock()
        try:
            self.etag = self._replace(self._body(), self.etag)
            self._renewed = sent
        except _Absent:
            self._lost = f"its lease {redact(self.url)} was deleted by someone else"
        except _Conflict:   # taken over, or our last renewal landed and its reply was lost
            self._watch()
        except _Skewed as e:
            self._lost = str(e)
        except Exception as e:   # the network, the server: retried at the next beat
            self._last_error = e

    def _watch(self) -> None:
        """Read the lease: still ours (our token), it dates our hold from its Last-Modified (never later
        than the write that landed); otherwise the lease is lost."""
        sent = lease_clock()
        try:
            seen = self._read()
        except _Absent:
            self._lost = f"its lease {redact(self.url)} was deleted by someone else"
            return
        except _Skewed as e:
            self._lost = str(e)
            return
        except Exception as e:
            if not self.watching or self._renewed > -math.inf:
                self._last_error = e
                return
            raise
        if seen.body is not None and seen.body["token"] == self.token:
            # Lower bounds of when the object was written, the latest of which dates the hold: `age` s (whole
            # seconds) before the server's Date, which is after we sent the read; after its beat was sent, when
            # we sent it; after our last read was sent, if that read saw another ETag.
            bounds = [sent - max(seen.age, 0.0) - CLOCK_RESOLUTION, self._sends.get(seen.body.get("beat"), -math.inf)]
            if self._last_read is not None and self._last_read[0] != seen.etag:
                bounds.append(self._last_read[1])
            self.etag, self._last_read = seen.etag, (seen.etag, sent)
            self._renewed = max(self._renewed, *bounds)
        else:
            self._lost = (f"its lease {redact(self.url)} was taken over by "
                          f"{seen.holder if seen.body else 'an object that is not a mealv2 lease'}")

    @property
    def expires(self) -> float:
        """When, on :func:`lease_clock`, the holder believes its lease ends: never after the server's view
        (the last write that landed, plus the duration)."""
        return self._renewed + self.seconds

    def _unrenewed(self) -> str:
        why = f"; last error: {type(self._last_error).__name__}: {self._last_error}" if self._last_error else ""
        return (f"its lease {redact(self.url)} was not {'seen ' if self.watching else ''}renewed for "
                f"{self.seconds - self.deadline:g} s of its {self.seconds:g} s, too near its end to commit before "
                f"another writer may take it over{why}")

    def check(self) -> None:
        """Raise ``error`` if the lease is lost, or too near its end for a commit sent now to land within it
        (less than one request deadline left); the writer calls it before each commit and then stops."""
        lost = self._lost
        if lost is None and lease_clock() - self._renewed >= self.seconds - self.deadline:
            lost = self._unrenewed()
        if lost is not None:
            raise self.error(f"`mealv2 {self.command}` lost its hold on {self.store}: {lost}. Another writer may "
                             f"be writing it now, so this one stops; what it committed is kept. Make sure no other "
                             f"`mealv2 {self.command}` writes {self.store}, then run the same command again to "
                             f"resume")

    def release(self) -> None:
        """Stop renewing; delete the lease object if it is still ours (and held here, not watched)."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._lost is None and not self.watching:
            self._delete_quietly()

    def _delete_quietly(self) -> None:
        try:
            self._delete(self.etag)
        except (_Conflict, _Absent):   # no longer ours: another writer's now, or gone
            pass
        except Exception as e:   # it expires by itself; the next writer is told when
            print(f"mealv2: could not delete the lease {redact(self.url)} ({type(e).__name__}: {e}); the next "
                  f"writer of {self.store} waits until it expires, {self.seconds:g} s after its last renewal",
                  file=sys.stderr)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _code(e: BaseException) -> str | None:
    """The S3 error code behind ``e`` (s3fs raises OSErrors with botocore's ClientError as their cause)."""
    for _ in range(8):   # a chain is short; bounded against a cycle
        if e is None:
            return None
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        if isinstance(e, FileExistsError):   # s3fs's word for a failed If-None-Match
            return "PreconditionFailed"
        e = e.__cause__ or e.__context__
    return None


class S3Lease(Lease):
    """The lease object on S3 (or an S3-compatible server), through s3fs: credentials and endpoint come
    from where reading a store gets them (AWS_* variables, profiles, instance roles). Its requests go through
    a filesystem of its own, with the lease's deadline as connect and read timeouts and no retries (botocore's
    nor s3fs's), each request also cut at the deadline as a whole."""

    def __init__(self, store_url: str, command: str, **kw):
        super().__init__(store_url, command, **kw)
        timeouts = {"connect_timeout": self.deadline, "read_timeout": self.deadline,
                    "retries": {"total_max_attempts": 1}}
        try:
            self.fs, path = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, config_kwargs=timeouts)
            self.fs.retries = 1   # s3fs's own retry loop, around botocore's
            self.bucket, self.key, _ = self.fs.split_path(path)
            model = self.fs.s3.meta.service_model   # connects: a missing profile, a bad region... say so here
        except Exception as e:
            raise self._unwritable(e) from None
        import botocore   # optional (mealv2[remote]); s3fs, just loaded, brings it

        # s3fs drops the arguments its botocore does not know: the writes would go unconditional, silently.
        missing = [f"{op}({arg})" for op, args in CONDITIONS.items() for arg in args
                   if arg not in model.operation_model(op).input_shape.members]
        if missing:
            raise self.error(f"{self.store}: the installed botocore {botocore.__version__} (under s3fs) cannot send "
                             f"conditional writes ({', '.join(missing)}), which keep a second writer out of the "
                             f"store; `pip install -U s3fs` to get a newer aiobotocore and botocore")

    def _server(self) -> str:
        return redact(self.fs.s3.meta.endpoint_url)

    def _break_command(self) -> str:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f"`aws s3 rm {redact(self.url)}{f' --endpoint-url {redact(endpoint)}' if endpoint else ''}`"

    def _request(self, method: str, **kw) -> tuple[dict, bytes | None]:
        """One request, cut at the deadline; the response, and its body read for a GET. Its Date is checked
        against this machine's clock. _Conflict, _Absent, _Skewed."""
        async def call():
            response = await self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kw)
            if "Body" not in response:
                return response, None
            try:
                return response, await response["Body"].read()
            finally:
                response["Body"].close()

        async def within_deadline():
            return await asyncio.wait_for(call(), self.deadline)

        try:
            response, data = sync(self.fs.loop, within_deadline)
        except Exception as e:
            code = _code(e)
            if code in CONFLICTS:
                raise _Conflict(code) from None
            if code in ABSENT:
                raise _Absent(code) from None
            if isinstance(e, asyncio.TimeoutError):
                raise TimeoutError(f"no reply from {self._server()} within {self.deadline:g} s") from None
            raise
        self._check_clock(response)
        return response, data

    def _check_clock(self, response: dict) -> None:
        """Refuse a server whose Date differs from this machine's clock by more than a quarter of the lease
        (plus Date's whole second): the ages the lease is judged by would be off by that much."""
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return
        server, here = parsedate_to_datetime(date).timestamp(), time.time()
        if abs(server - here) > self.seconds / 4 + CLOCK_RESOLUTION:
            shown = [time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) for t in (server, here)]
            raise _Skewed(
                f"the clock of {self._server()} (its Date: {shown[0]}) and this machine's ({shown[1]}) differ by "
                f"{server - here:+.0f} s, more than a quarter of the {self.seconds:g} s lease, so another writer "
                f"could take over a live lease; sync the clocks (NTP: `timedatectl set-ntp true`, chrony) and run "
                f"again")

    def _create(self, body: bytes) -> str:
        return self._request("put_object", Body=body, IfNoneMatch="*")[0]["ETag"]

    def _replace(self, body: bytes, etag: str) -> str:
        return self._request("put_object", Body=body, IfMatch=etag)[0]["ETag"]

    def _delete(self, etag: str) -> None:
        self._request("delete_object", IfMatch=etag)

    def _read(self) -> _Seen:
        response, data = self._request("get_object")
        now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        return _Seen(etag=response["ETag"], body=body if _is_lease(body) else None,
                     age=(now - response["LastModified"]).total_seconds())


LEASES: dict[str, type[Lease]] = {"s3": S3Lease}


def hold_lease(url: str, command: str, *, error: type[MealV2Error] = LeaseError,
               seconds: float | None = None) -> Lease:
    """Take the lease of the store at ``url`` for ``mealv2 COMMAND``, or raise ``error`` naming its holder
    and when it expires. Renewed in the background until :meth:`Lease.release` (or the ``with`` block's end)."""
    url = writable_url(url, error)
    lease = LEASES[urlsplit(url).scheme](url, command, seconds=lease_seconds(seconds, error), error=error)
    lease._acquire()
    return lease


def watch_lease(url: str, command: str, token: str, *, seconds: float,
                error: type[MealV2Error] = LeaseError) -> Lease:
    """Watch the lease another process holds (``token``, ``seconds``: its :attr:`Lease.token` and
    :attr:`Lease.seconds`), so that this one stops at its next commit once that lease is lost; raises ``error``
    at once if it is not held by ``token`` now."""
    url = writable_url(url, error)
    lease = LEASES[urlsplit(url).scheme](url, command, seconds=lease_seconds(seconds, error), error=error,
                                         token=token)
    lease._acquire()
    return lease


def writable_url(url: str, error: type[MealV2Error] = LeaseError) -> str:
    """``url`` checked as a store to write: a protocol with a lease (and its package), no credentials."""
    scheme = urlsplit(url).scheme
    if scheme not in LEASES:
        raise error(f"{redact(url)}: stores are written to a local path or to "
                    f"{', '.join(f'{p}://' for p in LEASES)} URLs only, not to '{scheme}://' URLs (mealv2 cannot keep "
                    f"a second writer out there); write the store to a local path and copy it there once labelled")
    if not urlsplit(url).path.strip("/"):   # the lease lives beside the store: a store needs a name in its bucket
        raise error(f"{redact(url)} names a bucket, not a store in it; give the store a name: "
                    f"{redact(url).rstrip('/')}/NAME.zarr")
    try:
        return check_url(url)
    except RemoteError as e:
        raise error(str(e)) from None
