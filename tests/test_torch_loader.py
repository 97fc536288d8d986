"""The loader without DALI (common/torch_loader.py) against DALI's CPU path, its no-DALI install, its
uint8 crops and its default workers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from conftest import make_image_dataset
from mealv2.common.data.loaders import torch as torch_loader
from mealv2.common.data.loaders.registry import available_cores
from mealv2.common.data.loaders.dali import iterate_crops
from mealv2.common.data.loaders.base import CropRequest, View
from mealv2.common.data.crops import CropParams, sample_crops
from mealv2.common.data.dataset import DatasetError, build_index
from mealv2.common.errors import MealV2Error
from mealv2.common.data.loaders.registry import describe, iterate, resolve
from mealv2.common.data.loaders.torch import iterate_crops_torch

RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
VIEWS = [View(64, *RAW), View(24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
CROPS = 4


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """3 classes x 4 images of 40-300 px: each class has an EXIF-rotated JPEG, a grayscale JPEG and a
    PNG, so crops are both enlarged and shrunk and every decode route is taken."""
    index = build_index(make_image_dataset(tmp_path_factory.mktemp("varied"), 3, 4, size_range=(40, 300)))
    ids = np.arange(len(index))
    boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], CROPS, CropParams(res=64))
    return index, [CropRequest(ids[:7], boxes[:7], flips[:7]), CropRequest(ids[7:], boxes[7:], flips[7:])]


@pytest.mark.parametrize("decode_on", ["threads", "device"])
def test_torch_loader_renders_dalis_crops(varied, decode_on):
    """The same boxes, flips and image/crop order as DALI's CPU path, decoding on the CPU threads or
    (the GPU path, run here on the CPU) in one batched decode_jpeg call with the resize on the device.

    Tolerance: DALI resizes from the box's fractional corners, torch from the whole pixels they round
    to, so pixels on sharp edges move by up to half a source pixel (single pixels differ by up to
    ~40/255 here) while the mean over a crop stays near 0.6/255 (at most 1.6/255 measured). A crop
    of another box, flip or image differs by tens of levels on average, so the per-crop bound
    (3/255) catches any of those."""
    index, requests = varied
    dali = list(iterate_crops(index, requests, VIEWS, CROPS, batch_size=7))
    mine = list(iterate_crops_torch(index, requests, VIEWS, CROPS, threads=2, decode_on=decode_on))
    assert len(dali) == len(mine) == 2
    for d, t in zip(dali, mine):
        np.testing.assert_array_equal(d.ids, t.ids)
        np.testing.assert_array_equal(d.crcs, t.crcs)
        for a, b, view in zip(d.views, t.views, VIEWS):
            assert a.shape == b.shape == (len(d.ids) * CROPS, 3, view.res, view.res) and b.dtype == torch.float32
            per_crop = ((a - b).abs() * torch.tensor(view.std)[:, None, None]).flatten(1).mean(1) * 255
            assert per_crop.max() < 3, f"{view.res} px: crop {int(per_crop.argmax())} differs by {per_crop.max():.2f}/255"
            assert per_crop.mean() < 1


def test_a_wrong_flip_or_order_is_caught_by_the_parity_bound(varied):
    """The parity bound can fail: the same boxes unflipped, or the images in reverse order, exceed it."""
    index, requests = varied
    (d,) = iterate_crops(index, requests[:1], VIEWS[:1], CROPS, batch_size=7)
    req = requests[0]
    for wrong in (CropRequest(req.ids, req.boxes, ~req.flips),
                  CropRequest(req.ids[::-1].copy(), req.boxes[::-1].copy(), req.flips[::-1].copy())):
        (t,) = iterate_crops_torch(index, [wrong], VIEWS[:1], CROPS, threads=1, decode_on="device")
        assert ((d.views[0] - t.views[0]).abs().flatten(1).mean(1) * 255).max() > 3


@pytest.mark.parametrize("decode_on, dtype", [("device", torch.uint8), ("threads", torch.float32)])
def test_crops_are_normalised_once_on_the_device_or_by_the_cpu_threads(varied, monkeypatch, decode_on, dtype):
    """Rendered on the device, crops reach it as uint8 and are normalised there once per batch;
    rendered by the CPU threads for a CPU run, each thread has normalised its image's crops."""
    index, requests = varied
    seen = []
    on_device = torch_loader.on_device
    monkeypatch.setattr(torch_loader, "on_device", lambda crops, *a: seen.append(crops.dtype) or on_device(crops, *a))
    (batch,) = iterate_crops_torch(index, requests[:1], VIEWS, CROPS, threads=2, decode_on=decode_on)
    assert seen == [dtype] * len(VIEWS)
    assert all(v.dtype == torch.float32 for v in batch.views)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_a_gpu_runs_cpu_rendered_crops_travel_as_pinned_uint8():
    (buffer,) = torch_loader.batch_buffers(8, VIEWS[:1], torch.device("cuda"))
    assert buffer.dtype == torch.uint8 and buffer.is_pinned()


@pytest.mark.parametrize("decode_on", ["threads", "device"])
def test_a_corrupt_jpeg_is_named_by_the_torch_loader(tmp_path, decode_on):
    root = make_image_dataset(tmp_path / "d", 2, 4)
    bad = root / "class_1" / "img_03.jpg"
    raw = bytearray(bad.read_bytes())
    sos = raw.find(b"\xff\xda")
    raw[sos:sos + 2] = b"\x00\x00"   # header intact, scan gone: the index accepts it
    bad.write_bytes(bytes(raw))
    index = build_index(root)
    ids = np.arange(len(index))
    boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], 1, CropParams(res=16))
    with pytest.raises(DatasetError, match=f"cannot decode {bad}.*expected a decodable image"):
        list(iterate_crops_torch(index, [CropRequest(ids, boxes, flips)], [View(16, *RAW)], 1, decode_on=decode_on))


def test_torch_cpu_is_the_torch_loader_decoding_on_the_threads(varied):
    index, requests = varied
    a, b = (list(iterate(name, index, requests, VIEWS, CROPS, batch_size=7, device="cpu", threads=2))
            for name in ("torch", "torch-cpu"))
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))


def test_loader_names_resolve_by_what_is_installed(monkeypatch):
    assert resolve("auto") == "dali" and resolve("torch") == "torch"
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)   # as if DALI were not installed
    assert resolve("auto") == "torch"
    assert "dali not installed" in describe("torch", "cpu", 2)
    with pytest.raises(MealV2Error, match="--loader dali: nvidia.dali is not installed; pip install"):
        resolve("dali")


def test_workers_default_to_the_cores_this_process_may_use(tiny_data, tmp_path, in_process):
    """Not a fixed 4: on a machine (or taskset) of one core, `train` renders on one thread. Here this
    process is pinned to one core while the command runs, as taskset would."""
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        r = in_process("train", tiny_data, "-o", tmp_path / "run", "-a", "test_resnet", "--hard-labels", "--device",
                       "cpu", "--dry-run")
        assert available_cores() == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert r.returncode == 0, r.stderr
    assert "loader: " in r.stdout and ", 1 threads" in r.stdout, r.stdout
    assert available_cores() == len(cores)


# A Python without DALI: importing nvidia.dali fails as it does where the package is absent. It runs
# the commands of argv[1] (JSON) one after another, as `mealv2` would, and prints what each printed.
NO_DALI = """
import contextlib, io, json, sys
class NoDali:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoDali())
from mealv2.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["mealv2", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def no_dali(*commands) -> list[dict]:
    """Run ``commands`` (argument lists) in one Python without DALI (one interpreter start for all)."""
    r = subprocess.run([sys.executable, "-c", NO_DALI, json.dumps([list(map(str, c)) for c in commands])],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.slow
def test_every_command_runs_without_dali(tiny_data, tmp_path):
    """label (with its teacher check), train, eval and verify --recompute on a Python where
    nvidia.dali cannot be imported: each picks the torch loader and says so."""
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "t.pth")
    fast = ["--device", "cpu", "--workers", 2, "--batch-size", 8]
    store, run = tmp_path / "store", tmp_path / "run"
    steps = [("label", tiny_data, "-t", f"test_resnet={tmp_path / 't.pth'}@32", "-o", store, "--rounds", 1,
              "--res", 32, "--crops-per-image", 2, "--topk", 2, *fast),
             ("train", tiny_data, "--labels", store, "-o", run, "-a", "test_resnet", "--epochs", 1, *fast),
             ("eval", tiny_data, "--checkpoint", run / "last.pt", "--device", "cpu", "--workers", 1),
             ("verify", store, "--data", tiny_data, "--recompute", 4, "--device", "cpu")]
    results = no_dali(*steps)
    assert [r["returncode"] for r in results] == [0] * len(steps), [r["stderr"][-2000:] for r in results]
    for args, r in zip(steps, results):
        if args[0] != "eval":   # eval scores centre crops, no stored ones
            assert "loader: torch (" in r["stdout"] and "dali not installed" in r["stdout"], (args[0], r["stdout"])
        if args[0] == "label":
            assert "teacher check: test_resnet" in r["stdout"]
