"""`mealv2 label --out s3://...`: a store written straight into an object store (moto's S3 server
on localhost: real HTTP, botocore, s3fs) is the store written on disk, object for object; it
resumes after a kill, refuses a second writer through its lease, takes two ranks, and trains the
same student."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from conftest import BUCKET, SECRET, run_cli
from mealv2.common.errors import MealV2Error
from mealv2.common.store.lease import hold_lease
from mealv2.common.store.label_store import RUNS_KEY, LabelStore
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label

pytestmark = pytest.mark.slow
pytest.importorskip("s3fs")

URL = f"s3://{BUCKET}/labels.zarr"
# 12 images in shards of 4: 3 shards x 2 rounds
SETTINGS = dict(rounds=2, crops_per_image=2, res=32, topk=2, shard_size=4, batch_size=4,
                workers=1, device="cpu", teacher_check=False, progress=False)
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MEALV2_LEASE_SECONDS": "10"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    return f"test_resnet={path}@32"


@pytest.fixture(scope="module")
def on_disk(tiny_data, teacher, tmp_path_factory):
    """The store written on disk: what a store written into S3 must equal."""
    out = tmp_path_factory.mktemp("disk") / "labels.zarr"
    run_label(LabelConfig(data=str(tiny_data), teachers=[teacher], out=str(out), **SETTINGS))
    return out


def _args(data, teacher, out=URL) -> list[str]:
    s = SETTINGS
    return ["label", data, "-t", teacher, "-o", out, "--rounds", s["rounds"], "--crops-per-image", s["crops_per_image"],
            "--res", 32, "--topk", s["topk"], "--shard-size", s["shard_size"], "--batch-size", s["batch_size"],
            "--workers", 1, "--device", "cpu", "--no-teacher-check"]


def _objects(client, prefix: str = "labels.zarr") -> dict[str, bytes]:
    found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in found}


def _assert_equals_disk(client, on_disk) -> None:
    """Every object of the S3 store is the file of the disk store at its key, and nothing else is there
    (no staged shard left, no lease)."""
    objects = _objects(client)
    files = {f"labels.zarr/{f.relative_to(on_disk)}": f.read_bytes() for f in on_disk.rglob("*") if f.is_file()}
    assert sorted(objects) == sorted(files)
    root = "labels.zarr/zarr.json"   # its record of what each run took differs; the rest is the same
    assert [key for key in files if objects[key] != files[key] and key != root] == []
    without_runs = lambda raw: {k: v for k, v in json.loads(raw)["attributes"].items() if k != RUNS_KEY}
    assert without_runs(objects[root]) == without_runs(files[root])


def test_a_store_labelled_into_s3_is_the_store_labelled_on_disk(tiny_data, teacher, on_disk, moto_s3):
    store = run_label(LabelConfig(data=str(tiny_data), teachers=[teacher], out=URL, **SETTINGS))
    assert store.path == URL and store.complete
    _assert_equals_disk(moto_s3.client, on_disk)
    again = LabelStore.open(URL)
    assert again.digest == LabelStore.open(on_disk).digest and again.verify() == []
    # the credentials came from the environment: none is in an object or the cache
    cached = [f.read_bytes() for f in Path(moto_s3.env["MEALV2_CACHE"]).rglob("*") if f.is_file()]
    assert cached and not [b for b in [*_objects(moto_s3.client).values(), *cached] if SECRET.encode() in b]
    # labelling it again finds it complete: nothing is written
    moto_s3.requests.clear()
    run_label(LabelConfig(data=str(tiny_data), teachers=[teacher], out=URL, **SETTINGS))
    writes = [(m, p) for m, p in moto_s3.requests if m in ("PUT", "POST", "DELETE") and ".lease" not in p]
    assert writes == []


def test_a_killed_s3_label_run_keeps_its_lease_until_it_expires_then_resumes_to_the_same_store(
        tiny_data, teacher, on_disk, moto_s3, in_process, monkeypatch):
    # killed between a shard's data and its done mark (the 4th shard of 6), holding a 10 s lease
    r = run_cli(*_args(tiny_data, teacher), env={**ENV, "MEALV2_KILL_AT": "shard_mark:4"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert "labels.zarr.lease" in _objects(moto_s3.client, "labels.zarr.lease")
    # the dead writer's lease is still there: the next run is refused until it expires
    r = in_process(*_args(tiny_data, teacher))
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(rf"{URL} is being written by another `mealv2 label` process \(pid \d+ on ", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    time.sleep(int(re.search(r"its lease expires in (\d+) s: run the same command again then", r.stderr)[1]))
    # taken over; killed again while packing round 0 (its objects written, the round not committed)
    r = run_cli(*_args(tiny_data, teacher), env={**ENV, "MEALV2_KILL_AT": "pack:1"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert f"took over {URL} from pid" in r.stderr
    time.sleep(12)   # its 10 s lease expires (by Last-Modified and Date, whole seconds)
    monkeypatch.setenv("MEALV2_LEASE_SECONDS", "10")
    r = in_process(*_args(tiny_data, teacher))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2/2 rounds complete" in r.stdout
    _assert_equals_disk(moto_s3.client, on_disk)


def test_damaged_objects_of_an_s3_store_are_repaired_by_the_next_label_run(tiny_data, teacher, on_disk, moto_s3,
                                                                          capsys):
    config = LabelConfig(data=str(tiny_data), teachers=[teacher], out=URL, **SETTINGS)
    run_label(config)
    for key in ("labels.zarr/paths/c/0", "labels.zarr/probs/c/1/0/0/0"):   # the images' paths; round 1 of probs
        body = bytearray(moto_s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[5] ^= 0xFF
        moto_s3.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    capsys.readouterr()
    run_label(config)
    out = capsys.readouterr().out
    assert "repair: probs/c/1/0/0/0[0]: damaged or missing; shard 0 of round(s) 1 will be labelled again" in out
    assert "repair: paths/c/0: damaged or missing; rewritten" in out
    _assert_equals_disk(moto_s3.client, on_disk)


def test_a_second_writer_is_refused_while_the_lease_is_held_and_writes_nothing(tiny_data, teacher, moto_s3,
                                                                             in_process):
    with hold_lease(URL, "label", seconds=30):
        r = in_process(*_args(tiny_data, teacher))
        assert r.returncode == 2
        assert f"{URL} is being written by another `mealv2 label` process (pid {os.getpid()} on " in r.stderr
        assert list(_objects(moto_s3.client)) == ["labels.zarr.lease"]
    assert _objects(moto_s3.client) == {}   # released: the lease object is gone


def test_two_ranks_label_into_s3_as_one_process_does(tiny_data, teacher, on_disk, moto_s3):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mealv2.cli", *map(str, _args(tiny_data, teacher))]
    r = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on rank 0 of 2" in r.stdout
    _assert_equals_disk(moto_s3.client, on_disk)


def test_a_student_trained_from_the_store_made_in_s3_is_the_one_trained_from_disk(tiny_data, teacher, on_disk,
                                                                                 moto_s3, tmp_path, in_process):
    run_label(LabelConfig(data=str(tiny_data), teachers=[teacher], out=URL, **SETTINGS))
    weights, outputs = {}, []
    for name, labels in (("disk", on_disk), ("s3", URL)):
        r = in_process("train", tiny_data, "--labels", labels, "-o", tmp_path / name, "-a", "test_resnet", "--epochs", 1,
                       "--batch-size", 4, "--device", "cpu", "--workers", 1, "--seed", 3)
        assert r.returncode == 0, r.stderr[-2000:]
        outputs += [r.stdout, r.stderr]
        weights[name] = torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert weights["s3"].keys() == weights["disk"].keys()
    assert [k for k, v in weights["disk"].items() if not torch.equal(weights["s3"][k], v)] == []
    assert not [o for o in outputs if SECRET in o]


def test_label_out_urls_that_cannot_be_written_are_refused_naming_the_fix(tiny_data, teacher, moto_s3, in_process):
    for out, said in (("http://127.0.0.1:1/x.zarr", "stores are written to a local path or to s3:// URLs only, "
                                                    "not to 'http://' URLs"),
                      ("s3://no-such-bucket/x.zarr", "no-such-bucket"),
                      (f"s3://{BUCKET}/", f"s3://{BUCKET}/ names a bucket, not a store in it; give the store a "
                                          f"name: s3://{BUCKET}/NAME.zarr")):
        with pytest.raises(MealV2Error, match=re.escape(said)):
            run_label(LabelConfig(data=str(tiny_data), teachers=[teacher], out=out, **SETTINGS))
    r = in_process(*_args(tiny_data, teacher, "gs://bucket/x.zarr"))
    assert r.returncode == 2 and "not to 'gs://' URLs" in r.stderr and "Traceback" not in r.stderr


def test_label_out_naming_an_object_is_refused_as_such(tiny_data, teacher, moto_s3):
    """Once "not empty and not a label store (... it holds )": the object itself was listed as a key ''."""
    moto_s3.client.put_object(Bucket=BUCKET, Key="labels.zarr/zarr.json", Body=b"{}")
    with pytest.raises(MealV2Error, match=re.escape(f"{URL}/zarr.json is an object (a file), not a folder")):
        run_label(LabelConfig(data=str(tiny_data), teachers=[teacher], out=f"{URL}/zarr.json", **SETTINGS))
