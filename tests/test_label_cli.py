"""`mealv2 label`, `inspect` and `verify` end to end on real JPEG/PNG files with tiny teachers.

The stores here are small (12 images x 3 rounds x 2 crops, shards of 3 images) but exercise
every rule users rely on: resumed-after-SIGKILL, appended and 2-rank stores are identical to
an uninterrupted single-process run; every mismatch is refused naming both values; verify
finds damage and names its place.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import crc32c
import numpy as np
import pytest
import timm
import torch
import zarr
from filelock import FileLock

from conftest import flip_chunk_byte, make_image_dataset, run_cli
from mealv2.common.data.crops import CropParams, sample_crops
from mealv2.common.data.dataset import build_index
from mealv2.common.store.label_store import RUNS_KEY, LabelStore, StoreError
from mealv2.common.data.targets import PROB_LEVELS, decode_probs
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label
from mealv2.stage1_label.report import verify_store

pytestmark = pytest.mark.slow

ROUNDS, CROPS, TOPK, SHARD, RES = 3, 2, 2, 3, 32
CROP = CropParams(res=RES)     # the CLI's defaults
ARRAYS = ("boxes", "flips", "ids", "probs", "done", "labels")
# Same CPU math in every process: one OpenMP thread (batches are the same in every run).
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("teachers")
    specs = []
    for i, (arch, suffix) in enumerate([("test_resnet", "@32"), ("test_efficientnet", "@48*2"),
                                        ("test_convnext", "@32")]):
        torch.manual_seed(i)
        path = d / f"{arch}.pth"
        torch.save(timm.create_model(arch, num_classes=3).state_dict(), path)
        specs.append(f"{arch}={path}{suffix}")
    return specs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("label_data") / "data")


def _args(data, teachers, out, **over) -> list[str]:
    opts = {"rounds": ROUNDS, "shard-size": SHARD, "res": RES, "crops-per-image": CROPS, "topk": TOPK,
            "batch-size": 4, "device": "cpu", "workers": 2, "seed": 0}
    opts.update({k.replace("_", "-"): v for k, v in over.items()})
    args = ["label", str(data), "-t", ",".join(teachers[:2]), "-o", str(out)]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


def _config(data, teachers, out, **over) -> LabelConfig:
    kw = dict(data=str(data), teachers=list(teachers), out=str(out), rounds=ROUNDS, crops_per_image=CROPS,
              res=RES, topk=TOPK, batch_size=4, seed=0, device="cpu", workers=2,
              shard_size=SHARD, progress=False)
    kw.update(over)
    return LabelConfig(**kw)


def _label(*args) -> subprocess.CompletedProcess:
    result = run_cli(*args, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ARRAYS:
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"{name} differs"
    without_runs = lambda attrs: {k: v for k, v in attrs.items() if k != RUNS_KEY}   # what each run took differs
    assert without_runs(ga.attrs.asdict()) == without_runs(gb.attrs.asdict())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, teachers) -> Path:
    """An uninterrupted single-process run: what every other way of making the store must equal."""
    out = tmp_path_factory.mktemp("reference") / "store"
    result = _label(*_args(data, teachers, out))
    assert "3/3 rounds complete" in result.stdout
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst


# ---- what the store holds ---------------------------------------------------------------------

def test_store_layout_and_attributes(reference, data, teachers):
    index = build_index(data)
    n, shards = len(index), -(-len(index) // SHARD)
    g = zarr.open_group(reference, mode="r")
    assert g["boxes"].shape == (ROUNDS, n, CROPS, 4) and g["boxes"].dtype == np.uint16
    assert g["flips"].shape == (ROUNDS, n, CROPS) and g["flips"].dtype == np.uint8
    assert g["ids"].shape == (ROUNDS, n, CROPS, TOPK) and g["ids"].dtype == np.uint16
    assert g["probs"].shape == (ROUNDS, n, CROPS, TOPK + 1) and g["probs"].dtype == np.uint8
    assert g["done"].shape == (ROUNDS, shards) and g["done"][:].all()
    for name in ("boxes", "flips", "ids", "probs"):
        assert g[name].chunks[:2] == (1, SHARD), name          # a shard is one chunk per array
        assert g[name].shards[:2] == (1, shards * SHARD), name   # in one object per round
    np.testing.assert_array_equal(g["labels"][:], index.labels)
    # packed: one object per array and round, nothing staged left (not arrays x shards x rounds files)
    files = sorted(str(f.relative_to(reference)) for f in reference.rglob("*")
                   if f.is_file() and f.name != "zarr.json")
    assert files == sorted([f"{name}/c/{r}/0/0/0" for name in ("boxes", "ids", "probs") for r in range(ROUNDS)]
                           + [f"flips/c/{r}/0/0" for r in range(ROUNDS)] + [f"done/c/{r}/0" for r in range(ROUNDS)]
                           + ["crc32c/c/0", "labels/c/0", "paths/c/0"]), files

    a = g.attrs["mealv2"]
    assert (a["format"], a["version"], a["rounds_planned"]) == ("mealv2-labels", 5, ROUNDS)
    assert a["teacher_precision"] == "fp32"
    # the CRC32C of every image's bytes, as labelled (stage 2 refuses an image changed since)
    np.testing.assert_array_equal(g["crc32c"][:], [crc32c.crc32c(index.path(i).read_bytes()) for i in range(n)])
    assert a["classes"] == list(index.classes) == ["class_0", "class_1", "class_2"]
    assert (a["topk"], a["temperature"], a["seed"], a["crops_per_image"], a["shard_size"]) == (TOPK, 1.0, 0, CROPS, SHARD)
    assert a["crop"] == CROP.to_attrs()
    assert a["dataset"] == {"num_images": n, "fingerprint": index.fingerprint, "skipped": []}
    assert [t["spec"] for t in a["teachers"]] == teachers[:2]
    assert [(t["arch"], t["res"], t["weight"]) for t in a["teachers"]] == [("test_resnet", 32, 1.0),
                                                                          ("test_efficientnet", 48, 2.0)]
    assert a["teachers"][1]["mean"] == [0.485, 0.456, 0.406]
    assert all(len(t["sha256"]) == 64 for t in a["teachers"])

    # boxes and flips are the sampler's, a pure function of (seed, round, image)
    for r in range(ROUNDS):
        boxes, flips = sample_crops(0, r, np.arange(n), index.sizes, CROPS, CROP)
        np.testing.assert_array_equal(g["boxes"][r], boxes)
        np.testing.assert_array_equal(g["flips"][r], flips.astype(np.uint8))
    # codes: 7-bit; the top-k ids are distinct classes in descending probability
    probs = g["probs"][:]
    assert probs.max() <= PROB_LEVELS
    top = decode_probs(torch.from_numpy(probs[..., :TOPK]))
    assert (top[..., 0] >= top[..., 1]).all()
    ids = g["ids"][:]
    assert (ids < 3).all() and (ids[..., 0] != ids[..., 1]).all()
    total = decode_probs(torch.from_numpy(probs)).sum(-1)
    assert torch.allclose(total, torch.ones_like(total), atol=0.03)


def test_stored_labels_are_the_weighted_ensemble_of_the_stored_crops(reference, data, teachers):
    from mealv2.common.data.loaders.base import CropRequest
    from mealv2.common.data.loaders.registry import iterate
    from mealv2.common.models.runtime import Runtime
    from mealv2.common.models.teachers import Ensemble, load_teacher

    index = build_index(data)
    store = LabelStore.open(reference)
    ts = [load_teacher(s, index.classes) for s in teachers[:2]]
    ens = Ensemble(ts, Runtime(torch.device("cpu")))
    assert len(ens.views) == 2                     # each teacher sees its own resolution
    r = 1
    rd = store.read_round(r)
    ids = np.arange(len(index))
    (batch,) = iterate("auto", index, [CropRequest(ids, rd.boxes, rd.flips.astype(bool))], ens.views, CROPS,
                       batch_size=len(ids), device="cpu", threads=2)   # the loader `label` ran
    logits = ens.logits(batch.views)
    p = (torch.softmax(logits[0], 1) + 2 * torch.softmax(logits[1], 1)) / 3
    stored = decode_probs(torch.from_numpy(rd.probs.reshape(-1, TOPK + 1)))
    stored_ids = torch.from_numpy(rd.ids.reshape(-1, TOPK).astype(np.int64))
    top_p = torch.cat([p.gather(1, stored_ids), 1 - p.gather(1, stored_ids).sum(1, keepdim=True)], 1)
    # a code is off by at most half a step in sqrt(p): |p_hat - p| <= sqrt(p) / L + (0.5 / L)^2
    bound = top_p.clamp_min(0).sqrt() / PROB_LEVELS + (0.5 / PROB_LEVELS) ** 2 + 1e-5
    assert ((stored - top_p).abs() <= bound).all(), float(((stored - top_p).abs() - bound).max())
    # ids are the top-k wherever the ranking is not a near tie
    top = p.topk(TOPK, 1)
    clear = (top.values[:, 0] - top.values[:, 1] > 1e-4) & (top.values[:, 1] - p.min(1).values > 1e-4)
    assert clear.sum() > len(clear) // 2
    assert torch.equal(top.indices[clear], stored_ids[clear])
    # the test can tell: the unweighted mean of the teachers breaks the bound somewhere
    unweighted = (torch.softmax(logits[0], 1) + torch.softmax(logits[1], 1)) / 2
    assert ((stored[:, :TOPK] - unweighted.gather(1, stored_ids)).abs() > bound[:, :TOPK]).any()


def test_inspect_json_and_text(reference, teachers, in_process):
    result = in_process("inspect", reference, "--json")
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["complete"] is True
    assert (s["rounds_complete"], s["rounds_planned"], s["num_images"], s["crops_per_image"], s["topk"],
            s["num_classes"]) == (ROUNDS, ROUNDS, 12, CROPS, TOPK, 3)
    store = LabelStore.open(reference)
    assert s["bytes_per_crop"] == round(store.data_bytes() / (ROUNDS * 12 * CROPS), 2)
    assert 0 < s["bytes_per_crop"] < 100
    assert 0 <= s["top1_agreement"] <= 1
    text = in_process("inspect", reference)
    assert text.returncode == 0
    assert teachers[0] in text.stdout and "rounds_complete: 3" in text.stdout


# ---- resume, append, ranks: all equal the uninterrupted run ---------------------------------------

def _done_count(out: Path) -> int:
    """Shards labelled so far (their staged done marks: rounds are packed at the end)."""
    d = out / "staged" / "done" / "c"
    return sum(len(files) for _, _, files in os.walk(d)) if d.is_dir() else 0


def _kill_mid_run(args: list[str], out: Path, total: int, at_least: int) -> int:
    """Start `mealv2 label`, SIGKILL it once more than ``at_least`` but not all shards are done; its exit code
    (0: it finished before a kill landed). No deadline of its own: on a loaded machine the first shard can take
    minutes, and a kill before it would test nothing (pytest's --timeout bounds a hang)."""
    proc = subprocess.Popen([sys.executable, "-m", "mealv2.cli", *args], env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if at_least < _done_count(out) < total:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:   # the test failed or was interrupted: leave no labeller behind
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def test_sigkilled_run_resumes_to_the_identical_store(tmp_path, data, teachers, reference, in_process):
    out = tmp_path / "store"
    args = _args(data, teachers, out)
    total = ROUNDS * 4
    kills = 0
    for _ in range(4):                      # kill it twice: once early, once after resuming
        rc = _kill_mid_run(args, out, total, at_least=kills * 4)
        if rc == -signal.SIGKILL:
            kills += 1
            store = LabelStore.open(out)
            assert not store.complete and 0 < store.done_mask().sum() < total
            if kills == 2:
                break
        else:
            assert rc == 0       # it finished before a kill landed: start over
            shutil.rmtree(out)
            kills = 0
    assert kills == 2, "could not kill the run mid-way"
    result = in_process(*args)   # the resume: the same code in this process
    assert result.returncode == 0, result.stderr
    assert "3/3 rounds complete" in result.stdout
    assert not list(out.rglob("*.partial"))
    _assert_same_store(out, reference)
    assert in_process("verify", out).returncode == 0


def test_appending_rounds_equals_a_direct_run(tmp_path, data, teachers, reference, in_process):
    """In-process runs: the store they make is compared with the reference process's."""
    out = tmp_path / "store"
    r = in_process(*_args(data, teachers, out, rounds=2))
    assert r.returncode == 0, r.stderr
    s = json.loads(in_process("inspect", out, "--json").stdout)
    assert (s["rounds_complete"], s["rounds_planned"], s["complete"]) == (2, 2, True)
    r = in_process(*_args(data, teachers, out, rounds=3))
    assert r.returncode == 0, r.stderr
    _assert_same_store(out, reference)
    # re-running a complete store changes nothing
    r = in_process(*_args(data, teachers, out))
    assert r.returncode == 0 and "nothing left to do" in r.stdout, r.stderr
    _assert_same_store(out, reference)


def test_two_ranks_write_the_same_store_as_one(tmp_path, data, teachers, reference):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mealv2.cli", *_args(data, teachers, out)]
    result = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on rank 0 of 2" in result.stdout
    _assert_same_store(out, reference)


# ---- refusals -------------------------------------------------------------------------------------

def test_cli_refusal_exits_2_naming_both_values(tmp_path, data, teachers, reference, in_process):
    out = _copy(reference, tmp_path)
    result = in_process(*_args(data, teachers, out, topk=3))
    assert result.returncode == 2
    assert "topk: store has 2, this run has 3" in result.stderr
    assert "Traceback" not in result.stderr
    _assert_same_store(out, reference)


@pytest.mark.parametrize("change,named", [
    (dict(teachers="other"), "teachers[1].spec: store has \"test_efficientnet="),
    (dict(teachers="more"), "teachers: store has 2 teacher(s) [test_resnet="),
    (dict(teachers="swapped_weights"), "teachers[0].sha256: store has"),
    (dict(res=48), "crop.res: store has 32, this run has 48"),
    (dict(scale=(0.25, 1.0)), "crop.scale: store has [0.08, 1.0], this run has [0.25, 1.0]"),
    (dict(topk=1), "topk: store has 2, this run has 1"),
    (dict(temperature=2.0), "temperature: store has 1.0, this run has 2.0"),
    (dict(seed=1), "seed: store has 0, this run has 1"),
    (dict(crops_per_image=3), "crops_per_image: store has 2, this run has 3"),
    (dict(rounds=2), "plans 3 rounds, --rounds 2 would drop some"),
])
def test_other_settings_are_refused(tmp_path, data, teachers, reference, change, named):
    out = _copy(reference, tmp_path)
    if change.get("teachers") == "other":
        change = dict(teachers=[teachers[0], teachers[2]])
    elif change.get("teachers") == "more":
        change = dict(teachers=teachers)
    elif change.get("teachers") == "swapped_weights":
        # same spec text, other weights behind it
        path = Path(teachers[0].split("=", 1)[1].split("@")[0])
        moved = tmp_path / path.name
        torch.manual_seed(99)
        torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), moved)
        change = dict(teachers=[f"test_resnet={moved}@32", teachers[1]])
        named = "teachers[0].sha256: store has"
    specs = change.pop("teachers", teachers[:2])
    with pytest.raises(StoreError) as e:
        run_label(_config(data, specs, out, **change))
    assert named in str(e.value), str(e.value)
    _assert_same_store(out, reference)
    # the refused run released its lock: the right command still works in this process
    run_label(_config(data, teachers[:2], out))


def test_a_moved_teacher_checkpoint_is_the_same_teacher(tmp_path, data, teachers, reference):
    """Teachers are matched by their weights' SHA-256, not by the path they were given by."""
    out = _copy(reference, tmp_path)
    path = Path(teachers[0].split("=", 1)[1].split("@")[0])
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(path, moved)
    run_label(_config(data, [f"test_resnet={moved}@32", teachers[1]], out, rounds=3))
    _assert_same_store(out, reference)


@pytest.mark.parametrize("edit", ["add_file", "resize_file", "rename_class"])
def test_another_dataset_is_refused(tmp_path, data, teachers, reference, edit):
    out = _copy(reference, tmp_path)
    other = tmp_path / "data"
    shutil.copytree(data, other)
    if edit == "add_file":
        shutil.copy(other / "class_1" / "img_03.jpg", other / "class_1" / "img_09.jpg")
        named = "dataset.num_images: store has 12, this run has 13"
    elif edit == "resize_file":
        from PIL import Image
        Image.new("RGB", (50, 70), (10, 20, 30)).save(other / "class_2" / "img_03.jpg")
        named = "dataset.fingerprint: store has"
    else:
        (other / "class_2").rename(other / "class_9")
        named = 'classes: store has ["class_0", "class_1", "class_2"], this run has ["class_0", "class_1", "class_9"]'
    with pytest.raises(StoreError) as e:
        run_label(_config(other, teachers[:2], out))
    assert named in str(e.value), str(e.value)
    _assert_same_store(out, reference)


def test_a_second_concurrent_writer_is_refused(tmp_path, data, teachers, reference):
    out = _copy(reference, tmp_path)
    with FileLock(str(out) + ".lock", timeout=0):
        result = run_cli(*_args(data, teachers, out, rounds=4), env=ENV)
        assert result.returncode == 2
        assert "is being written by another `mealv2 label` process" in result.stderr
        assert f"{out}.lock" in result.stderr
        with pytest.raises(StoreError, match="being written by another"):
            run_label(_config(data, teachers[:2], out, rounds=4))
    _assert_same_store(out, reference)


# ---- verify ---------------------------------------------------------------------------------------

def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(raw)


@pytest.mark.parametrize("damage,named", [
    ("flip", "probs/c/0/0/0/0[1]: unreadable chunk"),
    ("delete", "ids/c/2/0/0/0[3]: missing chunk file of a completed shard"),   # the object: all its shards
    ("incomplete", "round 1 shard 2: not complete (staged/done/c/1/2 unset)"),     # the round's commit undone
    ("attrs", "zarr.json: the 'mealv2' attributes were edited"),
    ("labels", "labels/c/0: unreadable chunk"),
])
def test_verify_names_each_problem(tmp_path, reference, damage, named):
    out = _copy(reference, tmp_path)
    if damage == "flip":
        flip_chunk_byte(out, "probs", 0, 1)
    elif damage == "delete":
        (out / "ids/c/2/0/0/0").unlink()
    elif damage == "incomplete":
        (out / "done/c/1/0").unlink()
    elif damage == "labels":
        _flip_byte(out / "labels/c/0")
    else:
        meta = json.loads((out / "zarr.json").read_text())
        meta["attributes"]["mealv2"]["seed"] = 1
        (out / "zarr.json").write_text(json.dumps(meta))
    problems = verify_store(out)
    shards = zarr.open_group(out, mode="r")["done"].shape[1]
    assert len(problems) == (shards if damage in ("delete", "incomplete") else 1), problems
    assert any(named in p for p in problems), problems


def test_verify_cli_exit_status_and_places(tmp_path, reference, in_process):
    ok = in_process("verify", reference)
    assert ok.returncode == 0 and "OK" in ok.stdout
    out = _copy(reference, tmp_path)
    flip_chunk_byte(out, "probs", 0, 1)
    (out / "boxes/c/2/0/0/0").unlink()
    (out / "done/c/1/0").unlink()
    bad = in_process("verify", out)
    assert bad.returncode != 0
    for place in ("probs/c/0/0/0/0[1]", "boxes/c/2/0/0/0[0]", "round 1 shard 3"):
        assert place in bad.stderr, bad.stderr
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["mealv2"]["topk"] = 5
    (out / "zarr.json").write_text(json.dumps(meta))
    edited = in_process("verify", out)
    assert edited.returncode != 0 and f"{out}/zarr.json" in edited.stderr


def test_verify_with_data_recomputes_and_reports_the_deviation(tmp_path, data, reference, in_process):
    good = in_process("verify", reference, "--data", data, "--recompute", 6, "--device", "cpu")
    assert good.returncode == 0, good.stderr
    assert "recomputed 12 crops of round" in good.stdout
    deviation = float(good.stdout.split("probability ")[1].split()[0])
    assert deviation <= 1 / PROB_LEVELS
    # labels that checksum fine but are not the teachers': found and named
    out = _copy(reference, tmp_path)
    g = zarr.open_group(out, mode="r+")
    probs = g["probs"][:]
    probs[..., 0] = PROB_LEVELS            # every top-1 claims p = 1
    g["probs"].with_config({"write_empty_chunks": True})[:] = probs
    assert verify_store(out) == []
    problems = verify_store(out, data=data, recompute=12, device="cpu")
    assert len(problems) == 1 and "stored probabilities deviate by" in problems[0]
    assert "class_" in problems[0] and "crop" in problems[0]
    # and --data of another dataset is named
    other = make_image_dataset(tmp_path / "other", per_class=5)
    problems = verify_store(reference, data=other)
    assert problems and "dataset fingerprint" in problems[0]


def test_verify_while_a_label_run_writes_the_store_says_so_instead_of_damage(tmp_path, reference, in_process):
    """Shards labelled but not packed yet read as problems, with a repair command, while the run is going."""
    out = _copy(reference, tmp_path)
    lock = FileLock(f"{out}.lock", timeout=0)
    lock.acquire()
    Path(f"{out}.lock").write_text("pid 4242 on host, since now\n")
    try:
        r = in_process("verify", out)
        assert r.returncode != 0 and "is being written by a `mealv2 label` process now (pid 4242 on host" in r.stderr
        assert "verify it once that command has ended" in r.stderr and "repair" not in r.stderr
    finally:
        lock.release()
    assert in_process("verify", out).returncode == 0


def test_verify_names_the_images_of_data_that_differ_at_the_same_paths(tmp_path, data, reference):
    """Other images under the store's paths: the fingerprint differs, and the stored CRC32Cs say which files."""
    copy = shutil.copytree(data, tmp_path / "data")
    first = sorted((copy / "class_0").iterdir())
    first[0].write_bytes(first[1].read_bytes())   # another image under the first one's name
    (problem,) = verify_store(reference, data=copy)
    assert "dataset fingerprint" in problem and "1 image(s) changed since earlier rounds were labelled: " \
        f"class_0/{first[0].name} (CRC32C" in problem
    assert "label into a new --out" not in problem and "pass --data the dataset it was labelled from" in problem
