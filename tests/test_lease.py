"""The writer's lease on a store at an S3 URL, against moto's S3 server (real HTTP, botocore, s3fs;
conditional PUT and DELETE as on AWS). Durations of 2 s (below the users' 10 s minimum, allowed by the
``s3`` fixture) keep the expiries short."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from conftest import BUCKET

from mealv2.common.store import lease as lease_module
from mealv2.common.errors import MealV2Error
from mealv2.common.store.lease import LeaseError, hold_lease

pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")

ME = f"pid {os.getpid()} on {socket.gethostname()}"


@pytest.fixture
def s3(moto_s3, request, monkeypatch):
    """``moto_s3`` and a store URL of this test's own: moto's objects outlive its server, within a process.
    Leases as short as 1 s are allowed (users' start at 10 s), to keep the expiries short."""
    monkeypatch.setattr(lease_module, "MIN_SECONDS", 1.0)
    moto_s3.store = f"s3://{BUCKET}/{request.node.name}.zarr"
    moto_s3.key = f"{request.node.name}.zarr.lease"
    return moto_s3


def _lease_body(s3) -> dict:
    return json.loads(s3.client.get_object(Bucket=BUCKET, Key=s3.key)["Body"].read())


def _put_other(s3, *, seconds=2):
    """The lease object as another (dead or live) holder wrote it."""
    s3.client.put_object(Bucket=BUCKET, Key=s3.key, Body=json.dumps(
        {"holder": "pid 4242 on otherhost", "command": "label", "since": "2026-01-01 00:00:00 UTC",
         "seconds": seconds, "token": "someone-else"}).encode())


def _wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def test_second_writer_is_refused_while_the_first_renews_past_its_duration(s3):
    with hold_lease(s3.store, "label", seconds=2) as first:
        assert first.url == f"{s3.store}.lease"
        time.sleep(3)   # past the duration: only the heartbeats keep it
        with pytest.raises(LeaseError) as refused:
            hold_lease(s3.store, "label", seconds=2)
        first.check()
        assert _lease_body(s3)["token"] == first.token and _lease_body(s3)["beat"] >= 4   # renewed each 0.5 s
    message = str(refused.value)
    assert s3.store in message and f"{s3.store}.lease" in message and ME in message and "`mealv2 label`" in message
    assert "expires in" in message and "run the same command again then" in message
    # and how to break it, should its holder be dead
    assert (f"break the dead lease now by deleting it: `aws s3 rm {s3.store}.lease --endpoint-url "
            f"{s3.endpoint}`") in message
    # released: the object is gone and the next writer gets it at once
    assert s3.client.list_objects_v2(Bucket=BUCKET, Prefix=s3.key)["KeyCount"] == 0
    with hold_lease(s3.store, "label", seconds=2) as second:
        assert _lease_body(s3)["token"] == second.token


def test_a_dead_holders_lease_is_taken_over_after_it_expires_not_before_by_one_of_two_takers(s3, monkeypatch,
                                                                                             capsys):
    """After expiry both takers read the expired lease before either writes; the server's If-Match lets one
    through. (Their PUTs are sent one after the other: moto checks the condition and writes without a lock,
    where AWS decides atomically; what is tested is the takers' handling of the outcome.)"""
    _put_other(s3, seconds=2)
    with pytest.raises(LeaseError, match="pid 4242 on otherhost.*expires in [1-3] s"):
        hold_lease(s3.store, "label", seconds=2)
    time.sleep(3.2)   # 2 s + the servers' whole-second clock
    both_read, one_put = threading.Barrier(2, timeout=30), threading.Lock()
    read, replace = lease_module.S3Lease._read, lease_module.S3Lease._replace
    first_reads = set()

    def read_then_wait(self):
        seen = read(self)
        if self.token not in first_reads:
            first_reads.add(self.token)
            both_read.wait()
        return seen

    def replace_in_turn(self, body, etag):
        with one_put:
            return replace(self, body, etag)

    monkeypatch.setattr(lease_module.S3Lease, "_read", read_then_wait)
    monkeypatch.setattr(lease_module.S3Lease, "_replace", replace_in_turn)
    outcomes = []

    def take():
        try:
            outcomes.append(hold_lease(s3.store, "label", seconds=2))
        except LeaseError as e:
            outcomes.append(e)

    takers = [threading.Thread(target=take) for _ in range(2)]
    for t in takers:
        t.start()
    for t in takers:
        t.join(60)
    won = [o for o in outcomes if not isinstance(o, Exception)]
    lost = [o for o in outcomes if isinstance(o, Exception)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert "is being written by another `mealv2 label` process" in str(lost[0]) and ME in str(lost[0])
    assert _lease_body(s3)["token"] == won[0].token
    won[0].check()
    won[0].release()
    assert capsys.readouterr().err.count(f"took over {s3.store} from pid 4242 on otherhost") == 1


def test_a_lease_overwritten_by_someone_else_is_lost_and_never_deleted_by_its_old_holder(s3):
    lease = hold_lease(s3.store, "label", seconds=2)
    _put_other(s3)
    assert _wait_until(lambda: lease._lost is not None, timeout=3)   # the next heartbeat (every 0.5 s) sees it
    with pytest.raises(LeaseError) as lost:
        lease.check()
    assert "taken over by pid 4242 on otherhost" in str(lost.value) and "run the same command again" in str(lost.value)
    lease.release()
    assert _lease_body(s3)["token"] == "someone-else"


def test_release_never_deletes_a_lease_replaced_since_its_last_renewal(s3):
    lease = hold_lease(s3.store, "label", seconds=60)   # no heartbeat before the release
    _put_other(s3)
    lease.release()
    assert _lease_body(s3)["token"] == "someone-else"


def test_a_deleted_lease_is_lost(s3):
    lease = hold_lease(s3.store, "label", seconds=2)
    s3.client.delete_object(Bucket=BUCKET, Key=s3.key)
    assert _wait_until(lambda: lease._lost is not None, timeout=3)
    with pytest.raises(LeaseError, match="was deleted by someone else"):
        lease.check()
    lease.release()


def test_a_lease_not_renewed_for_its_duration_less_a_request_deadline_is_lost(s3, monkeypatch):
    """Lost once less than one request deadline (a quarter: 0.5 s) is left of its duration since the last write
    that succeeded (sent between ``before`` and ``after``), by the holder's own clock: a commit sent after its
    check then still lands within the lease."""
    before = lease_module.lease_clock()
    lease = hold_lease(s3.store, "label", seconds=2)
    after = lease_module.lease_clock()

    def unreachable(self, body, etag):
        raise ConnectionError("the endpoint is unreachable")

    monkeypatch.setattr(lease_module.S3Lease, "_replace", unreachable)   # before the first heartbeat, 0.5 s on
    time.sleep(max(0.0, before + 1.2 - lease_module.lease_clock()))
    lease.check()   # renewals fail, but more than a deadline is left of the lease
    time.sleep(max(0.0, after + 1.6 - lease_module.lease_clock()))
    with pytest.raises(LeaseError, match="was not renewed for 1.5 s of its 2 s.*the endpoint is unreachable"):
        lease.check()
    lease.release()


def test_a_failed_heartbeat_thread_stops_the_writer_at_its_next_commit(s3, monkeypatch):
    """Its thread dead (as 1e12 s once killed it, with a traceback), a holder that went on would write unguarded."""
    def broken(self):
        raise RuntimeError("a bug in the heartbeat")

    monkeypatch.setattr(lease_module.S3Lease, "_renew", broken)
    lease = hold_lease(s3.store, "label", seconds=2)
    assert _wait_until(lambda: not lease._thread.is_alive(), timeout=3)
    with pytest.raises(LeaseError, match=r"its heartbeat thread failed \(RuntimeError: a bug in the heartbeat\)"):
        lease.check()
    lease.release()


def test_the_holders_clock_counts_a_suspend(s3, monkeypatch):
    """A machine suspended longer than the lease wakes with its lease gone: the clock is CLOCK_BOOTTIME (Linux),
    not time.monotonic, which stops during a suspend."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        assert abs(lease_module.lease_clock() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 0.01
    asleep = [0.0]
    clock = lease_module.lease_clock
    monkeypatch.setattr(lease_module, "lease_clock", lambda: clock() + asleep[0])
    lease = hold_lease(s3.store, "label", seconds=60)   # no heartbeat before the check
    lease.check()
    asleep[0] = 60.0   # suspended for a minute
    with pytest.raises(LeaseError, match="was not renewed for 45 s of its 60 s"):
        lease.check()
    lease.release()


@pytest.mark.parametrize("value", ["nan", "0", "1.5", "9.9", "-1", "abc", "inf", "3601", "1e9", "1e12"])
def test_a_lease_duration_out_of_bounds_is_refused_naming_it_and_why(value, monkeypatch):
    """1e9 locked a store for 31 years after a kill; 1e12 killed the heartbeat with a traceback."""
    monkeypatch.setenv("MEALV2_LEASE_SECONDS", value)
    with pytest.raises(LeaseError, match=f"MEALV2_LEASE_SECONDS='{value}' is not a lease duration; expected a number "
                                         f"of seconds from 10 to 3600: a shorter lease .* a longer one keeps a store "
                                         f"written by a writer that died locked"):
        hold_lease(f"s3://{BUCKET}/x.zarr", "label")


def test_the_lease_duration_comes_from_the_environment(s3, monkeypatch):
    monkeypatch.setenv("MEALV2_LEASE_SECONDS", "7.5")
    with hold_lease(s3.store, "label") as lease:
        assert lease.seconds == 7.5 and _lease_body(s3)["seconds"] == 7.5


@pytest.mark.parametrize("url", ["memory://x.zarr", "https://example.org/x.zarr"])
def test_an_unsupported_protocol_is_refused(url):
    with pytest.raises(LeaseError, match="written to a local path or to s3:// URLs only"):
        hold_lease(url, "label")


def test_the_callers_error_type_is_raised(s3):
    class LabelError(MealV2Error):
        pass

    with hold_lease(s3.store, "label", seconds=2), pytest.raises(LabelError, match="is being written by another"):
        hold_lease(s3.store, "label", error=LabelError, seconds=2)


def test_a_missing_bucket_is_named_with_the_fix(s3):
    with pytest.raises(LeaseError, match="s3://no-such-bucket/x.zarr.lease cannot be written.*bucket exists"):
        hold_lease("s3://no-such-bucket/x.zarr", "label", seconds=2)


def test_a_server_ignoring_conditional_writes_is_refused(s3, monkeypatch):
    """A server without If-None-Match would let a second writer overwrite the lease silently."""
    call = lease_module.S3Lease._request

    def unconditional(self, method, **kw):
        kw.pop("IfNoneMatch", None)
        return call(self, method, **kw)

    monkeypatch.setattr(lease_module.S3Lease, "_request", unconditional)
    with pytest.raises(LeaseError, match=r"ignores conditional writes \(a PUT with If-None-Match: \* over"):
        hold_lease(s3.store, "label", seconds=2)
    assert s3.client.list_objects_v2(Bucket=BUCKET, Prefix=s3.key)["KeyCount"] == 0


def test_a_botocore_without_conditional_writes_is_refused(s3, monkeypatch):
    """s3fs drops arguments its botocore does not know (an old one lacks IfMatch...): the writes would go
    unconditional."""
    monkeypatch.setitem(lease_module.CONDITIONS, "PutObject", ("IfNoneMatch", "IfMatch", "IfNotYetInvented"))
    with pytest.raises(LeaseError, match=r"cannot send conditional writes \(PutObject\(IfNotYetInvented\)\)"):
        hold_lease(s3.store, "label", seconds=2)


def test_a_missing_aws_profile_is_named(s3, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(LeaseError, match=r"lease cannot be written \(ProfileNotFound.*no-such-profile.*AWS_PROFILE"):
        hold_lease(s3.store, "label", seconds=2)
