"""`mealv2 label --add-teacher` into a store at an s3:// URL (moto's S3 server on localhost: real HTTP, botocore,
s3fs): the store it grows is the store the same add grows on disk, object for object; a kill resumes to it once
the dead run's lease expires (or is broken); a second run at once is refused by the lease and writes nothing; two
ranks add it as one process does."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import test_add_teacher
from conftest import BUCKET, run_cli
from mealv2.common.store.label_store import LabelStore, StoreError
from test_add_teacher import ONE_THREAD, grown, label_args
from test_remote_write import ENV, URL, _assert_equals_disk, _objects

pytestmark = pytest.mark.slow
pytest.importorskip("s3fs")

setup = test_add_teacher.setup   # its fixture: the data, three teachers, a finished two-teacher store ("kept")
ROOT = "labels.zarr/zarr.json"   # the object whose layer records grow (and whose record of runs differs)
TRAIN = ["-a", "test_resnet", "--epochs", 1, "--batch-size", 8, "--workers", 1, "--device", "cpu", "--no-progress",
         "--seed", 3, "--teacher-weights", "1,1,1"]


def upload(setup, client) -> dict[str, bytes]:
    """The finished two-teacher store (kept layers) put at ``URL``, key for key; returns its objects."""
    kept = setup[3]["kept"]
    for f in sorted(kept.rglob("*")):
        if f.is_file():
            client.put_object(Bucket=BUCKET, Key=f"labels.zarr/{f.relative_to(kept)}", Body=f.read_bytes())
    return _objects(client)


def add_third(setup) -> list:
    """`mealv2 label DATA --add-teacher THIRD --out URL`."""
    _, data, teachers, _ = setup
    return label_args(data, URL, "--add-teacher", teachers[2])


def test_a_teacher_added_into_s3_is_the_one_added_on_disk_and_a_student_trains_from_it(setup, moto_s3, tmp_path,
                                                                                      in_process):
    _, data, teachers, _ = setup
    on_disk = grown(setup, tmp_path, in_process)
    before = upload(setup, moto_s3.client)
    digest = LabelStore.open(URL).digest
    r = in_process(*add_third(setup))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    _assert_equals_disk(moto_s3.client, on_disk)   # the layer's objects too, byte for byte; no staged file, no lease
    after = _objects(moto_s3.client)
    assert {k: after[k] for k in before if k != ROOT} == {k: v for k, v in before.items() if k != ROOT}
    assert [k for k in after if k not in before and not re.match(r"labels.zarr/(staged/)?teachers/2/", k)] == []
    store = LabelStore.open(URL)
    assert store.digest == digest and store.complete and store.layers[2]["teacher"]["spec"] == teachers[2]
    r = in_process("verify", URL)
    assert r.returncode == 0, r.stdout + r.stderr
    r = in_process("inspect", URL)
    assert r.returncode == 0 and teachers[2] in r.stdout, r.stdout + r.stderr
    # a student trained from the three layers read over S3 is the one trained from the disk store
    weights = {}
    for name, labels in (("disk", on_disk), ("s3", URL)):
        r = in_process("train", data, "--labels", labels, "-o", tmp_path / name, *TRAIN)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"1 x {teachers[2]}" in r.stdout
        weights[name] = torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert [k for k, v in weights["disk"].items() if not torch.equal(weights["s3"][k], v)] == []


def test_a_killed_add_teacher_into_s3_resumes_after_its_lease_expires_or_is_broken(setup, moto_s3, tmp_path,
                                                                                 in_process):
    on_disk = grown(setup, tmp_path, in_process)
    upload(setup, moto_s3.client)
    # killed between a shard's data and its done mark (the 4th of the layer's 12 shards), holding a 10 s lease
    r = run_cli(*add_third(setup), env={**ENV, "MEALV2_KILL_AT": "shard_mark:4"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _objects(moto_s3.client, "labels.zarr/staged/teachers/2/ids/c/")   # some of the layer's shards staged
    with pytest.raises(StoreError, match="(?s)layer 3 .* is not labelled for round 0.*--add-teacher"):
        LabelStore.open(URL).read_round(0, layers=[2])   # an unfinished layer is never replayed
    # the dead run's lease is still there: the same command is refused until it expires
    r = in_process(*add_third(setup))
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(rf"{URL} is being written by another `mealv2 label` process \(pid \d+ on ", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    time.sleep(int(re.search(r"its lease expires in (\d+) s: run the same command again then", r.stderr)[1]))
    # taken over; killed again while packing round 0 (its objects written, the round not committed)
    r = run_cli(*add_third(setup), env={**ENV, "MEALV2_KILL_AT": "pack:1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert f"took over {URL} from pid" in r.stderr
    # its lease broken as the refusal says (`aws s3 rm STORE.lease`), the same command finishes the layer
    moto_s3.client.delete_object(Bucket=BUCKET, Key="labels.zarr.lease")
    r = in_process(*add_third(setup))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"layer 3 ({setup[2][2]}) complete" in r.stdout
    _assert_equals_disk(moto_s3.client, on_disk)


def test_a_second_add_teacher_into_s3_while_one_runs_is_refused_by_the_lease_and_writes_nothing(
        setup, moto_s3, tmp_path, in_process):
    on_disk = grown(setup, tmp_path, in_process)
    upload(setup, moto_s3.client)
    first = subprocess.Popen([sys.executable, "-m", "mealv2.cli", *map(str, add_third(setup))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **ONE_THREAD})
    try:
        deadline = time.monotonic() + 120
        while not _objects(moto_s3.client, "labels.zarr.lease") and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)   # held mid-run, its lease (60 s) live: the second run starts now
        time.sleep(0.5)                     # the server done with (and logged) a request the first had sent
        moto_s3.requests.clear()
        r = in_process(*add_third(setup))
        writes = [(m, p) for m, p in moto_s3.requests if m in ("PUT", "POST", "DELETE") and ".lease" not in p]
    finally:
        first.send_signal(signal.SIGCONT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{URL} is being written by another `mealv2 label` process (pid {first.pid} on " in r.stderr
    assert "Traceback" not in r.stderr and writes == []
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    _assert_equals_disk(moto_s3.client, on_disk)


def test_two_ranks_add_a_teacher_into_s3_as_one_process_does(setup, moto_s3, tmp_path, in_process):
    """Rank 1 stages its shards into S3 under rank 0's lease, which it watches (as `label`'s ranks do)."""
    on_disk = grown(setup, tmp_path, in_process)
    upload(setup, moto_s3.client)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mealv2.cli", *map(str, add_third(setup))]
    r = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shown = r"--add-teacher: 24 crops in [0-9.]+s \([0-9]+ crops/s on rank 0 of 2\)"   # rank 0's half of the 48
    assert re.search(shown, r.stdout), r.stdout[-2000:]
    run = LabelStore.open(URL).runs()[-1]
    assert (run["ranks"], run["crops"], run["added_teacher"]) == (2, 48, setup[2][2])
    _assert_equals_disk(moto_s3.client, on_disk)
