"""Shared fixtures: small real image datasets (made here, no network) and a CLI runner."""
from __future__ import annotations

import colorsys
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from types import SimpleNamespace

# Tiny models on 2 shared cores: extra OpenMP threads only contend (measured ~100x slower per
# step under load). Set before torch is imported, so in-process and CLI subprocesses agree.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Dataset index caches of the test runs go to a folder of their own, not the user's ~/.cache.
os.environ.setdefault("MEALV2_CACHE", tempfile.mkdtemp(prefix="mealv2-test-cache-"))

import numpy as np
import pytest
import torch
from PIL import Image


def _class_image(c: int, num_classes: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Class c's look: its own hue, stripe period and direction, a contrasting square, noise."""
    base = np.array(colorsys.hsv_to_rgb(c / num_classes, 0.7, 0.85)) * 255
    period = 6 + 4 * (c % 5)
    yy, xx = np.mgrid[:h, :w]
    stripes = ((xx if c % 2 else yy) // (period // 2)) % 2
    img = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    side = max(1, min(h, w) // 3)
    y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    img[y0:y0 + side, x0:x0 + side] = 255 - base
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_dataset(root: Path, num_classes: int = 3, per_class: int = 4, seed: int = 0,
                       size_range: tuple[int, int] = (40, 96)) -> Path:
    """Write an ImageFolder dataset ``root/class_<c>/img_<j>.<ext>`` and return ``root``.

    Sizes (H and W each in ``size_range``) and content are deterministic from ``seed``.
    When ``per_class >= 3`` every class has, besides plain RGB JPEGs: ``img_00.jpg``
    with EXIF orientation 6 (pixels stored rotated, so it *decodes* to the drawn H x W,
    with H != W), ``img_01.jpg`` grayscale and ``img_02.png`` RGB PNG.
    """
    root = Path(root)
    lo, hi = size_range
    for c in range(num_classes):
        class_dir = root / f"class_{c}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            rng = np.random.default_rng([seed, c, j])
            h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            kind = ("exif6", "gray", "png")[j] if per_class >= 3 and j < 3 else "jpeg"
            if kind == "exif6" and h == w:
                w = h + 1 if h < hi else h - 1
            im = Image.fromarray(_class_image(c, num_classes, h, w, rng))
            stem = class_dir / f"img_{j:02d}"
            if kind == "png":
                im.save(stem.with_suffix(".png"))
            elif kind == "gray":
                im.convert("L").save(stem.with_suffix(".jpg"), quality=90)
            elif kind == "exif6":
                # orientation 6 = "rotate 90 clockwise to display": store it turned the other way
                ex = im.getexif()
                ex[0x0112] = 6
                im.transpose(Image.Transpose.ROTATE_90).save(
                    stem.with_suffix(".jpg"), quality=90, exif=ex.tobytes())
            else:
                im.save(stem.with_suffix(".jpg"), quality=90)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run as fast on one intra-op thread, and two collapse (10-100x) on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes x 4 images, shared by the whole session: copy it before changing it."""
    return make_image_dataset(tmp_path_factory.mktemp("tiny_data"), num_classes=3, per_class=4)


@pytest.fixture(scope="session")
def tiny_csv(tiny_data) -> Path:
    """``tiny_data/subset.csv``: images 01-03 of each class, classes interleaved, relative paths."""
    rows = [f"class_{c}/img_{j:02d}{'.png' if j == 2 else '.jpg'},class_{c}"
            for j in (1, 2, 3) for c in (2, 0, 1)]
    path = tiny_data / "subset.csv"
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return path


def record_fsyncs(monkeypatch, seen=lambda: None) -> list[tuple[str, object]]:
    """Make os.fsync record the path of each file or folder it syncs (its name at that moment, through
    /proc/self/fd), with ``seen()`` then."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), seen()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def partial_of(path) -> re.Pattern:
    """The names common/store/files.py writes ``path`` under before renaming it."""
    return re.compile(rf"{re.escape(str(path))}\.\d+\.\d+\.partial")


def flip_chunk_byte(store: Path, array: str, round_: int, shard: int, mask: int = 0x01) -> str:
    """Flip a bit in the middle of chunk (round, shard) of ``array`` inside its round's packed object
    (found through the object's index); returns the chunk's name as verify names it."""
    from mealv2.common.store.schema import chunk_key

    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["mealv2"]
    count = -(-attrs["dataset"]["num_images"] // attrs["shard_size"])
    ndim = len(json.loads((store / array / "zarr.json").read_text())["shape"])
    key = chunk_key(array, ndim, round_, 0)
    raw = bytearray((store / key).read_bytes())
    index = np.frombuffer(bytes(raw[len(raw) - 16 * count - 4:-4]), dtype="<u8").reshape(count, 2)
    offset, nbytes = (int(v) for v in index[shard])
    raw[offset + nbytes // 2] ^= mask
    (store / key).write_bytes(bytes(raw))
    return f"{key}[{shard}]"


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mealv2.cli ARGS``; ``env`` entries are added to the current environment."""
    return subprocess.run([sys.executable, "-m", "mealv2.cli", *map(str, args)],
                          capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="session")
def labelled(tiny_data, tmp_path_factory):
    """tiny_data labelled through the CLI: 2 rounds x 2 crops at 32 px by a random test_resnet;
    shared by the session: copy the store before changing it."""
    import timm

    work = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), work / "teacher.pth")
    teacher = f"test_resnet={work / 'teacher.pth'}@32"
    r = run_cli("label", tiny_data, "-t", teacher, "-o", work / "store", "--rounds", 2, "--res", 32,
                "--crops-per-image", 2, "--topk", 2, "--batch-size", 8, "--workers", 2, "--device", "cpu",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(data=tiny_data, store=work / "store", teacher=teacher, work=work)


def train_outside_mealv2(data: Path, out: Path, class_order: list[str], mean, std, arch: str = "test_resnet",
                         res: int = 32, epochs: int = 24, seed: int = 0) -> Path:
    """A teacher as users bring them: trained by a plain PyTorch + timm loop (torchvision's
    ImageFolder-style files, RandomResizedCrop, its own mean/std), with class ids in ``class_order``
    (not necessarily the folders' sorted order). Saves and returns a plain state dict.

    24 epochs, not fewer: at 12 the seed-0 teacher's BatchNorm statistics had not settled on
    torch 2.14, and it scored 58 % under its own mean/std and 96 % under 0.5/0.5, so the teacher
    check rightly refused the "correctly stated" teacher."""
    import timm
    import torch.nn.functional as F
    from torchvision import transforms as T

    torch.manual_seed(seed)
    tf = T.Compose([T.RandomResizedCrop(res, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean, std)])
    files = [(p, class_order.index(p.parent.name)) for p in sorted(Path(data).glob("*/*"))
             if p.suffix in (".jpg", ".png")]
    images = [Image.open(p).convert("RGB") for p, _ in files]
    labels = torch.tensor([y for _, y in files])
    model = timm.create_model(arch, num_classes=len(class_order))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(files)).split(16):
            x = torch.stack([tf(images[i]) for i in batch])
            loss = F.cross_entropy(model(x), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.state_dict(), out)
    return out


@pytest.fixture
def in_process(monkeypatch, capsys):
    """``run_cli`` without a new interpreter (seconds saved per call), for commands that are refused
    or do little; runs that are killed or need fault injection stay subprocesses."""
    from mealv2.cli import main

    def call(*args):
        capsys.readouterr()
        monkeypatch.setattr("sys.argv", ["mealv2", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return call


SECRET = "mealv2-fake-secret-7Hq2ZpX"   # the fake S3 secret of ``moto_s3``: must never appear in a run, a cache or a log
BUCKET = "stores"                       # the bucket ``moto_s3`` makes


class _Requests(logging.Handler):
    """Collects (method, path) of the requests werkzeug (moto's server) logs."""

    def __init__(self, into: list):
        super().__init__()
        self.into = into

    def emit(self, record):
        method, path = record.getMessage().split('"')[1].split()[:2]
        self.into.append((method, path))


@pytest.fixture
def moto_s3(tmp_path, monkeypatch):
    """moto's S3 server (real HTTP, botocore, s3fs) on localhost with an empty bucket ``BUCKET``.
    ``env`` holds the credentials (a fake secret), the endpoint and ``MEALV2_CACHE`` as a user's
    environment would, for the CLI; they are also set in this process, for in-process calls.
    ``requests`` lists the (method, path) the server received; ``client`` is boto3's."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem.clear_instance_cache()   # an earlier test's filesystem would talk to its server
    requests = []
    log, handler = logging.getLogger("werkzeug"), _Requests(requests)   # moto's server logs each request there
    level, propagate = log.level, log.propagate
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in one backend per process, shared by every server: empty it
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    env = {"AWS_ACCESS_KEY_ID": "mealv2-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "MEALV2_CACHE": str(tmp_path / "cache")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield SimpleNamespace(env=env, client=client, requests=requests, endpoint=env["AWS_ENDPOINT_URL_S3"])
    server.stop()
    log.removeHandler(handler)
    log.setLevel(level)
    log.propagate = propagate

