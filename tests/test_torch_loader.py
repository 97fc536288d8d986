"""The loader without DALI (loaders/torch.py) against DALI's CPU path, its device path's operations, its
no-DALI install, where it normalises, how --loader auto picks, and its default workers."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import timm
from PIL import Image
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms.v2 import functional as F

from conftest import make_image_dataset
from mealv2.common.data.loaders import torch as torch_loader
from mealv2.common.data.loaders.registry import available_cores
from mealv2.common.data.loaders.dali import iterate_crops
from mealv2.common.data.loaders.base import CropRequest, View
from mealv2.common.data.crops import CropParams, sample_crops
from mealv2.common.data.dataset import DatasetError, build_index
from mealv2.common.errors import MealV2Error
from mealv2.common.data.loaders.registry import describe, installed, iterate, resolve
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

    Tolerance: DALI resizes from the box's fractional corners; so does the device path, with DALI's
    filter (equal up to rounding: under 0.01/255 per crop here), while the threads resize from the
    whole pixels the corners round to, so pixels on sharp edges move by up to half a source pixel
    (single pixels differ by up to ~40/255 here) while the mean over a crop stays near 0.6/255 (at
    most 1.6/255 measured). A crop of another box, flip or image differs by tens of levels on
    average, so the per-crop bound (3/255) catches any of those."""
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


@pytest.fixture(scope="module")
def zone_plate(tmp_path_factory):
    """A 2000 x 2000 JPEG whose rings rise to 0.45 cycles per pixel at the corners: shrunk to 224 px
    without a low-pass filter, most of it comes out as strong false rings."""
    root = tmp_path_factory.mktemp("zone_plate")
    (root / "c").mkdir()
    y, x = np.mgrid[:2000, :2000] - 1000.0
    rings = 128 + 120 * np.cos(0.45 * np.pi / (1000 * np.sqrt(2)) * (x ** 2 + y ** 2))
    Image.fromarray(np.repeat(rings[..., None], 3, -1).astype(np.uint8)).save(root / "c" / "rings.jpg", quality=95)
    return build_index(root)


@pytest.mark.parametrize("decode_on", ["threads", "device"])
def test_a_2000_px_box_of_fine_rings_shrinks_to_dalis_antialiased_crop(zone_plate, decode_on):
    """The whole 2000 px image and a 1,560 x 1,370 px box of it, flipped, shrunk to 224 px: DALI's
    antialiased resize within the parity bound, far from a resize without antialiasing."""
    raw = [View(224, *RAW)]
    request = CropRequest(np.array([0]), np.array([[[0, 0, 1023, 1023], [100, 200, 800, 700]]], np.uint16),
                          np.array([[False, True]]))
    (dali,) = iterate_crops(zone_plate, [request], raw, 2, batch_size=1)
    (mine,) = iterate_crops_torch(zone_plate, [request], raw, 2, threads=1, decode_on=decode_on)
    per_crop = (dali.views[0] - mine.views[0]).abs().flatten(1).mean(1) * 255
    assert per_crop.max() < 3, per_crop
    image = torch_loader.decode_cpu(np.fromfile(zone_plate.path(0), np.uint8), "plain", "rings.jpg")
    aliased = F.resize(image, [224, 224], antialias=False).float() / 255
    assert (aliased - dali.views[0][0]).abs().mean() * 255 > 40   # what aliasing would cost


def test_a_wrong_flip_or_order_is_caught_by_the_parity_bound(varied):
    """The parity bound can fail: the same boxes unflipped, or the images in reverse order, exceed it."""
    index, requests = varied
    (d,) = iterate_crops(index, requests[:1], VIEWS[:1], CROPS, batch_size=7)
    req = requests[0]
    for wrong in (CropRequest(req.ids, req.boxes, ~req.flips),
                  CropRequest(req.ids[::-1].copy(), req.boxes[::-1].copy(), req.flips[::-1].copy())):
        (t,) = iterate_crops_torch(index, [wrong], VIEWS[:1], CROPS, threads=1, decode_on="device")
        assert ((d.views[0] - t.views[0]).abs().flatten(1).mean(1) * 255).max() > 3


@pytest.mark.parametrize("decode_on, calls", [("device", 1), ("threads", 7)])
def test_crops_are_normalised_once_per_view_on_the_device_or_by_each_cpu_thread(varied, monkeypatch, decode_on, calls):
    """Rendered on the device, a request's crops are normalised once per view; rendered by the CPU
    threads for a CPU run, each thread normalises its own image's crops."""
    index, requests = varied
    seen = []
    normalise = torch_loader.normalise
    monkeypatch.setattr(torch_loader, "normalise", lambda crops, *a, **k: seen.append(len(crops)) or normalise(crops, *a, **k))
    (batch,) = iterate_crops_torch(index, requests[:1], VIEWS, CROPS, threads=2, decode_on=decode_on)
    assert seen == [7 * CROPS // calls] * (calls * len(VIEWS))
    assert all(v.dtype == torch.float32 for v in batch.views)


class CountOps(TorchDispatchMode):
    """The aten operations dispatched while active, views and reshapes (no work of their own) apart."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:   # a reshape, no copy
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_a_requests_device_operations_do_not_grow_with_its_crops(varied):
    """The device path (a GPU run's, run here on the CPU) decodes, cuts, resizes, mirrors and
    normalises a request's crops in the same operations at C = 1 and C = 8: a few per image and a
    few per batch, as CUDA would launch them."""
    index, _ = varied
    ids = np.arange(6)
    counted = []
    for crops in (1, 8):
        boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], crops, CropParams(res=64))
        assert flips.any() or crops == 1
        with CountOps() as counter:
            list(iterate_crops_torch(index, [CropRequest(ids, boxes, flips)], VIEWS, crops, threads=1,
                                     decode_on="device"))
        counted.append(counter.ops)
    assert len(counted[0]) == len(counted[1]), (len(counted[0]), len(counted[1]))
    assert sorted(map(str, counted[0])) == sorted(map(str, counted[1]))
    assert len(counted[1]) <= (3 + 2 * len(VIEWS)) * len(ids) + 16 * len(VIEWS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_a_gpu_runs_cpu_rendered_crops_travel_as_pinned_uint8():
    (buffer,) = torch_loader.batch_buffers(8, VIEWS[:1], torch.device("cuda"))
    assert buffer.dtype == torch.uint8 and buffer.is_pinned()


@pytest.mark.parametrize("decode_on", ["threads", "device"])
def test_a_corrupt_jpeg_is_named_by_the_torch_loader(tmp_path, decode_on):
    """Decoded on the producer thread, the error is raised in the thread that takes the batches,
    naming the file, with the fix; the producer stops."""
    root = make_image_dataset(tmp_path / "d", 2, 4)
    bad = root / "class_1" / "img_03.jpg"
    raw = bytearray(bad.read_bytes())
    sos = raw.find(b"\xff\xda")
    raw[sos:sos + 2] = b"\x00\x00"   # header intact, scan gone: the index accepts it
    bad.write_bytes(bytes(raw))
    index = build_index(root)
    ids = np.arange(len(index))
    boxes, flips = sample_crops(0, 0, ids, index.sizes[ids], 1, CropParams(res=16))
    with pytest.raises(DatasetError, match=f"cannot decode {bad}.*expected a decodable image. Replace it"):
        list(iterate("torch", index, [CropRequest(ids, boxes, flips)], [View(16, *RAW)], 1, batch_size=len(ids),
                     device="cpu", threads=2, decode_on=decode_on))
    assert not [t for t in threading.enumerate() if t.name == "mealv2-loader"]


def test_torch_cpu_is_the_torch_loader_decoding_on_the_threads(varied):
    index, requests = varied
    a, b = (list(iterate(name, index, requests, VIEWS, CROPS, batch_size=7, device="cpu", threads=2))
            for name in ("torch", "torch-cpu"))
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))


def test_auto_takes_torch_on_a_cpu_and_dali_on_a_gpu_where_installed(monkeypatch):
    """On a CPU the torch loader renders more crops per core (BENCHMARKS.md, "Loader"); on a GPU DALI's
    pipeline where installed, else torch. The printed line says why; a config's check keeps ``auto``."""
    assert (resolve("auto", "cpu"), resolve("auto", "cuda"), resolve("auto"), resolve("dali")) == ("torch", "dali",
                                                                                                  "auto", "dali")
    assert describe("auto", "cpu", 2) == ("loader: torch (torchvision/PIL decode and resize to uint8 on the CPU "
                                          "threads, 2 threads; auto takes it on a CPU: more crops per core than DALI)")
    assert describe("dali", "cuda", 2).endswith("2 threads; auto takes it on a GPU where installed)")
    assert describe("dali", "cpu", 2) == "loader: dali (DALI decodes and resizes on the CPU threads, 2 threads)"
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)   # as if DALI were not installed
    assert resolve("auto", "cuda") == "torch"
    assert describe("auto", "cuda", 2).endswith("2 threads; dali not installed)")
    with pytest.raises(MealV2Error, match="--loader dali: nvidia.dali is not installed; pip install"):
        resolve("dali")


def test_train_on_a_cpu_runs_the_torch_loader_where_dali_is_installed(tiny_data, tmp_path, in_process):
    assert installed("dali")
    r = in_process("train", tiny_data, "-o", tmp_path / "run", "-a", "test_resnet", "--hard-labels", "--device",
                   "cpu", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "  loader: torch (" in r.stdout and "auto takes it on a CPU" in r.stdout, r.stdout


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
            assert "loader: torch (" in r["stdout"], (args[0], r["stdout"])
        if args[0] == "label":
            assert "teacher check: test_resnet" in r["stdout"]
