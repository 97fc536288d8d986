"""Issue 6, "Bad input" and "Damaged store": every case through the real `mealv2` command.

Each refusal must exit non-zero (2 for a user error), name the file or value and what was
expected, print no traceback, and leave nothing that looks complete (no store, or one whose
rounds are not complete; no RUN/last.pt). Files that only look odd (wrong extension, CMYK,
16-bit, palette, grayscale, EXIF-rotated) must simply work.

Most cases call ``mealv2.cli.main`` in this process (argv + captured stderr: the same code
path as the console script, without ~3 s of imports per case); the cases where DALI itself
fails, and the must-work formats, run as real subprocesses.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import flip_chunk_byte, make_image_dataset, run_cli
from mealv2.common.data.dataset import build_index
from mealv2.common.store.label_store import LabelStore

pytestmark = pytest.mark.slow

LABEL_FLAGS = ["--rounds", 1, "--crops-per-image", 2, "--res", 32, "--topk", 2, "--shard-size", 4,
               "--batch-size", 8, "--workers", 1, "--device", "cpu"]
TRAIN_FLAGS = ["-a", "test_resnet", "--epochs", 1, "--batch-size", 8, "--device", "cpu", "--workers", 1]


# ---- helpers ------------------------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def mealv2(in_process):
    """Run ``mealv2 ARGS`` in this process; returns its exit status, stdout and stderr."""
    def call(*args) -> Result:
        r = in_process(*args)
        return Result(r.returncode, r.stdout, r.stderr)
    return call


def refused(r, *named: str, code: int = 2) -> None:
    """A clean user error: exit ``code``, no traceback, every string in ``named`` on stderr."""
    assert r.code == code, f"exit {r.code}, expected {code}; stderr:\n{r.err}"
    assert "Traceback" not in r.err, r.err
    for s in named:
        assert s in r.err, f"{s!r} not named on stderr:\n{r.err}"


def labelled_ok(r) -> None:
    err = r.err if isinstance(r, Result) else r.stderr
    code = r.code if isinstance(r, Result) else r.returncode
    assert code == 0, err[-3000:]


def png16(path: Path, h: int, w: int, color: bool) -> None:
    """A 16-bit-per-sample PNG (RGB48 or 16-bit gray), written by hand: PIL cannot write RGB48."""
    rng = np.random.default_rng(h * w)
    px = rng.integers(0, 65536, (h, w, 3 if color else 1)).astype(">u2")
    raw = b"".join(b"\0" + px[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if color else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def save_teacher(path: Path, num_classes: int = 3, seed: int = 0, drop: str | None = None) -> Path:
    torch.manual_seed(seed)
    state = timm.create_model("test_resnet", num_classes=num_classes).state_dict()
    if drop:
        del state[drop]
    torch.save(state, path)
    return path


def plain_data(root: Path) -> Path:
    """3 classes x 1 plain JPEG, made fresh for a case to damage."""
    return make_image_dataset(root, num_classes=3, per_class=1, size_range=(40, 64))


def store_complete(out: Path) -> bool:
    return (out / "zarr.json").is_file() and LabelStore.open(out).complete


# ---- shared dataset, teacher and store ----------------------------------------------------------

ODD_FILES = {  # the files that look unusual but must work, beside make_image_dataset's
    "class_0/png_named.jpg": "PNG bytes under a .jpg name",
    "class_0/jpeg_named.png": "JPEG bytes under a .png name",
    "class_1/cmyk.jpg": "CMYK JPEG (Adobe APP14)",
    "class_1/palette.png": "palette (P mode) PNG",
    "class_2/rgb48.png": "16-bit RGB PNG",
    "class_2/gray16.png": "16-bit grayscale PNG",
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    # per_class=3: each class has an EXIF-rotated (orientation 6) JPEG, a grayscale JPEG and a PNG
    data = make_image_dataset(root / "data", num_classes=3, per_class=3, size_range=(40, 72))
    rgb = np.asarray(Image.open(data / "class_0" / "img_02.png").convert("RGB"))
    im = Image.fromarray(rgb)
    im.save(data / "class_0" / "png_named.jpg", format="PNG")
    im.save(data / "class_0" / "jpeg_named.png", format="JPEG", quality=90)
    im.convert("CMYK").save(data / "class_1" / "cmyk.jpg", quality=90)
    im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(data / "class_1" / "palette.png")
    png16(data / "class_2" / "rgb48.png", 45, 61, color=True)
    png16(data / "class_2" / "gray16.png", 52, 47, color=False)
    teacher = save_teacher(root / "teacher.pth")
    return root, data, f"test_resnet={teacher}@32"


@pytest.fixture(scope="module")
def labelled(work):
    """`mealv2 label` over the odd-but-valid files, as a real subprocess; (result, store)."""
    root, data, spec = work
    out = root / "store.zarr"
    return run_cli("label", data, "-t", spec, "-o", out, *LABEL_FLAGS), out


@pytest.fixture
def store_copy(labelled, tmp_path) -> Path:
    result, store = labelled
    labelled_ok(result)
    return Path(shutil.copytree(store, tmp_path / "store.zarr"))


# ---- files that must work -----------------------------------------------------------------------

def test_odd_but_valid_files_label_and_train(work, labelled, mealv2, tmp_path):
    """Wrong extension, CMYK, 16-bit and palette PNG, grayscale, EXIF-rotated: all labelled and trained."""
    _, data, _ = work
    result, store = labelled
    labelled_ok(result)
    index = build_index(data)
    assert len(index) == 9 + len(ODD_FILES) and not index.skipped
    assert set(ODD_FILES) <= set(index.relpaths)
    for rel in ODD_FILES:
        with Image.open(data / rel) as im:
            assert index.sizes[index.relpaths.index(rel)].tolist() == [im.height, im.width], ODD_FILES[rel]
    rotated = index.relpaths.index("class_0/img_00.jpg")
    with Image.open(data / "class_0" / "img_00.jpg") as im:
        assert index.sizes[rotated].tolist() == [im.width, im.height]   # EXIF 6: decoded turned

    summary = json.loads(run_cli("inspect", store, "--json").stdout)
    assert (summary["complete"], summary["num_images"], summary["skipped_images"]) == (True, len(index), 0)
    assert run_cli("verify", store).returncode == 0

    run = tmp_path / "run"
    r = mealv2("train", data, "--labels", store, "--out", run, *TRAIN_FLAGS)
    assert r.code == 0, r.err[-3000:]
    assert (run / "last.pt").is_file()


# ---- bad image files ----------------------------------------------------------------------------

def test_corrupt_jpeg_is_named_when_dali_cannot_decode_it(work, tmp_path, mealv2):
    """A JPEG with a valid header but garbled data mid-file (its start-of-scan marker): the index's
    header check passes it, DALI's decoder fails in the middle of the run."""
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    bad = data / "class_1" / "img_00.jpg"
    good = bad.read_bytes()
    raw = bytearray(good)
    sos = raw.find(b"\xff\xda")
    raw[sos:sos + 2] = b"\x00\x00"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "store.zarr"
    r = run_cli("label", data, "-t", spec, "-o", out, *LABEL_FLAGS, "--loader", "dali")   # auto is torch on a CPU
    refused(Result(r.returncode, r.stdout, r.stderr), str(bad), "expected a decodable image",
            "Replace it with a readable copy")
    assert not store_complete(out)
    # the advice works: the same file made readable again, the same command completes the store
    bad.write_bytes(good)
    labelled_ok(mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS))
    assert store_complete(out)


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "truncated JPEG: no end-of-image marker (FF D9)"),
    ("zero_byte", "zero-byte file"),
    ("not_an_image", "not an image (PIL cannot identify it)"),
])
def test_bad_image_file_is_named(work, tmp_path, mealv2, kind, reason):
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    bad = data / "class_2" / "bad.jpg"
    jpeg = (data / "class_2" / "img_00.jpg").read_bytes()
    bad.write_bytes({"truncated": jpeg[:len(jpeg) // 2], "zero_byte": b"",
                     "not_an_image": b"id,name\n1,this is a CSV file\n"}[kind])
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, f"class_2/bad.jpg: {reason}", "--skip-bad")
    assert not out.exists()


def test_decompression_bomb_is_named_with_its_size_and_the_limit(work, tmp_path, mealv2, monkeypatch):
    _, _, spec = work
    data = make_image_dataset(tmp_path / "d", num_classes=3, per_class=1, size_range=(20, 30))
    Image.new("RGB", (50, 50), (9, 9, 9)).save(data / "class_0" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)    # PIL refuses more than twice this
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, "class_0/huge.png: decompression bomb", "2500 pixels", "2000 pixels")
    assert not out.exists()


def test_skip_bad_leaves_out_and_records_the_bad_files(work, tmp_path, mealv2):
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    jpeg = (data / "class_0" / "img_00.jpg").read_bytes()
    (data / "class_0" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (data / "class_1" / "empty.jpg").write_bytes(b"")
    (data / "class_2" / "cut2.jpg").write_bytes(jpeg[:len(jpeg) // 3])
    out = tmp_path / "store.zarr"
    said = (f"--skip-bad: 3 image file(s) of {data} left out:\n  truncated JPEG (2): class_0/cut.jpg, "
            f"class_2/cut2.jpg\n  zero-byte file (1): class_1/empty.jpg\n")
    r = mealv2("label", data, "-t", spec, "-o", out, "--skip-bad", *LABEL_FLAGS)
    labelled_ok(r)
    assert said in r.out
    r = mealv2("inspect", out, "--json")
    summary = json.loads(r.out)
    assert (summary["complete"], summary["num_images"], summary["skipped_images"]) == (True, 3, 3)
    skipped = LabelStore.open(out).attrs["dataset"]["skipped"]
    assert [rel for rel, _ in skipped] == ["class_0/cut.jpg", "class_1/empty.jpg", "class_2/cut2.jpg"]
    assert "truncated JPEG" in skipped[0][1] and "zero-byte" in skipped[1][1]
    for args in (["label", data, "-t", spec, "-o", out, "--skip-bad", *LABEL_FLAGS],   # resumed: nothing to do
                 ["train", data, "--labels", out, "--out", tmp_path / "run", *TRAIN_FLAGS, "--dry-run"]):
        r = mealv2(*args)
        labelled_ok(r)
        assert said in r.out, args[0]
    r = mealv2("verify", out, "--data", data)   # the images the store left out are left out here too
    assert r.code == 0, r.err


def test_verify_names_an_image_of_data_gone_bad_since_labelling(work, store_copy, tmp_path, mealv2):
    """verify has no --skip-bad: it said to pass one, then refused it as no such option."""
    _, data, _ = work
    copy = shutil.copytree(data, tmp_path / "data")
    jpeg = (copy / "class_1" / "cmyk.jpg").read_bytes()
    (copy / "class_1" / "cmyk.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    r = mealv2("verify", store_copy, "--data", copy)
    assert r.code != 0 and "Traceback" not in r.err and "--skip-bad" not in r.err
    assert f"--data {copy}: 1 image(s) cannot be read, which the store was labelled from: class_1/cmyk.jpg (" in r.err


@pytest.mark.parametrize("command,where", [("label", "inside"), ("train", "inside"), ("train", "is"),
                                           ("label", "above"), ("train", "above")])
def test_out_inside_data_or_data_inside_out_is_refused(work, tmp_path, mealv2, command, where):
    """`train --out DATA` wrote curves.png at DATA's root, which then turned the dataset unlabelled."""
    _, _, spec = work
    data = plain_data(tmp_path / "top" / "d")
    out = {"inside": data / "class_0" / "out", "is": data, "above": tmp_path / "top"}[where]
    args = (["label", data, "-t", spec, "-o", out, *LABEL_FLAGS] if command == "label" else
            ["train", data, "--hard-labels", "--out", out, *TRAIN_FLAGS])
    r = mealv2(*args)
    if where == "above":
        refused(r, f"DATA {data} is inside --out {out}", "choose --out outside DATA's folders")
    else:
        refused(r, f"--out {out} is inside DATA {data}", "choose --out outside DATA")
    assert sorted(p.name for p in data.rglob("*")) == ["class_0", "class_1", "class_2", "img_00.jpg",
                                                        "img_00.jpg", "img_00.jpg"]


# ---- dataset layout and CSV ---------------------------------------------------------------------

def test_empty_class_folder_is_named(work, tmp_path, mealv2):
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    (data / "class_3").mkdir()
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, str(data / "class_3"), "no image files", "every class needs at least one image")
    assert not out.exists()


def test_unreadable_folder_is_named(work, tmp_path, mealv2, monkeypatch):
    # Tests run as root, where chmod does not stop reading: make the folder unreadable instead.
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    locked = data / "class_1"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, f"cannot read folder {locked}: Permission denied")
    assert not out.exists()


def test_csv_with_a_missing_path_is_named(work, tmp_path, mealv2):
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    csv = data / "list.csv"
    csv.write_text("path,label\nclass_0/img_00.jpg,a\nclass_1/gone.jpg,b\nclass_2/img_00.jpg,c\n")
    out = tmp_path / "store.zarr"
    r = mealv2("label", csv, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, str(csv), "line 3: class_1/gone.jpg", "does not exist")
    assert not out.exists()


def test_csv_with_an_empty_label_is_named(work, tmp_path, mealv2):
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    csv = data / "list.csv"
    csv.write_text("path,label\nclass_0/img_00.jpg,a\nclass_1/img_00.jpg,b\nclass_2/img_00.jpg,\n")
    out = tmp_path / "store.zarr"
    r = mealv2("label", csv, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, str(csv), "line 4: empty label for class_2/img_00.jpg", "expected a class name")
    assert not out.exists()


def test_csv_with_an_unclosed_quote_is_named_as_such(work, tmp_path, mealv2):
    _, _, spec = work
    data = plain_data(tmp_path / "d")
    csv = data / "list.csv"
    csv.write_text('path,label\nclass_0/img_00.jpg,a\n"class_1/img_00.jpg,b\nclass_2/img_00.jpg,c\n')
    r = mealv2("label", csv, "-t", spec, "-o", tmp_path / "store.zarr", *LABEL_FLAGS)
    refused(r, str(csv), 'line 3: a quote (") opened on this line is not closed', "lines 3-4")
    assert "empty label" not in r.err


def test_a_csv_label_typo_is_named_by_its_line_when_the_teacher_has_fewer_classes(work, tmp_path, mealv2):
    _, data, spec = work
    csv = tmp_path / "list.csv"
    rows = [f"{data / f'class_{c}' / f'img_0{j}.jpg'},class_{c}" for c in range(3) for j in (0, 1)]
    rows.insert(3, f"{data / 'class_1' / 'img_02.png'},clas_1")
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    r = mealv2("label", csv, "-t", spec, "-o", tmp_path / "store.zarr", *LABEL_FLAGS)
    refused(r, "'fc.weight' has shape (3, 96), the model expects (4, 96)",
            f"DATA {csv} has 4 classes (images each): clas_1 (1), class_0 (2), class_1 (2), class_2 (2)",
            f"class 'clas_1' comes from line(s) 5 of {csv}")


def test_eval_with_a_class_the_checkpoint_does_not_know_blames_the_data(tmp_path, mealv2):
    from mealv2.common.models.checkpoints import save_checkpoint

    data = plain_data(tmp_path / "val")
    shutil.copytree(data / "class_2", data / "class_9")
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, model=timm.create_model("test_resnet", num_classes=3), arch="test_resnet",
                    classes=["class_0", "class_1", "class_2"], res=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    r = mealv2("eval", data, "--checkpoint", ckpt, "--device", "cpu", "--workers", 1)
    refused(r, f"DATA {data} has class(es) ['class_9'] that the model does not know")
    assert f"{ckpt} has class" not in r.err


@pytest.mark.parametrize("flags,most", [([], 6710886), (["--topk", 1000, "--crops-per-image", 8], 33554)])
def test_a_shard_size_past_memory_is_refused_with_the_largest_that_fits(work, tmp_path, mealv2, flags, most):
    _, data, spec = work
    r = mealv2("label", data, "-t", spec, "-o", tmp_path / "store.zarr", "--shard-size", 10**9, *flags)
    refused(r, "--shard-size 1000000000: a shard's largest chunk would take", f"use at most {most} ")
    assert not (tmp_path / "store.zarr").exists()


def test_csv_with_a_label_the_store_does_not_know_is_refused_by_train(work, store_copy, tmp_path, mealv2):
    _, data, _ = work
    csv = tmp_path / "list.csv"
    rows = [f"{data / 'class_0' / 'img_01.jpg'},class_0", f"{data / 'class_1' / 'img_01.jpg'},class_1",
            f"{data / 'class_2' / 'img_01.jpg'},class_2", f"{data / 'class_2' / 'img_02.png'},class_9"]
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    r = mealv2("train", csv, "--labels", store_copy, "--out", run, *TRAIN_FLAGS)
    refused(r, str(store_copy), "has 3 classes ['class_0', 'class_1', 'class_2']",
            f"DATA {csv} has 4 classes ['class_0', 'class_1', 'class_2', 'class_9']")
    assert not (run / "last.pt").exists()


# ---- teachers -----------------------------------------------------------------------------------

def test_teacher_with_the_wrong_class_count_is_named(work, tmp_path, mealv2):
    root, data, _ = work
    ckpt = save_teacher(tmp_path / "five.pth", num_classes=5)
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", f"test_resnet={ckpt}@32", "-o", out, *LABEL_FLAGS)
    refused(r, str(ckpt), "'fc.weight' has shape (5, 96), the model expects (3, 96)", "dataset has 3 classes")
    assert not out.exists()


def test_teacher_checkpoint_with_a_missing_key_is_named(work, tmp_path, mealv2):
    _, data, _ = work
    ckpt = save_teacher(tmp_path / "nobias.pth", drop="fc.bias")
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", f"test_resnet={ckpt}@32", "-o", out, *LABEL_FLAGS)
    refused(r, str(ckpt), "missing keys ['fc.bias']", "does not fit the architecture")
    assert not out.exists()


def test_teacher_spec_without_a_timm_model_is_named(work, tmp_path, mealv2):
    root, data, _ = work
    spec = f"no_such_net_v9={root / 'teacher.pth'}@32"
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, f"teacher spec '{spec}'", "'no_such_net_v9' is not a timm model name")
    assert not out.exists()


def test_topk_larger_than_the_class_count_is_named(work, tmp_path, mealv2):
    _, data, spec = work
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS, "--topk", 5)
    refused(r, "--topk 5 is larger than the dataset's 3 classes")
    assert not out.exists()


# ---- a store for something else -----------------------------------------------------------------

def test_store_of_another_dataset_is_refused_by_train(store_copy, tmp_path, mealv2):
    other = make_image_dataset(tmp_path / "other", num_classes=3, per_class=3, seed=7)
    run = tmp_path / "run"
    r = mealv2("train", other, "--labels", store_copy, "--out", run, *TRAIN_FLAGS)
    refused(r, str(store_copy), "was labelled from a dataset with fingerprint", "(15 images)",
            f"DATA {other} has fingerprint", "(9 images)")
    assert not (run / "last.pt").exists()


def test_store_of_other_teachers_is_refused_by_label(work, store_copy, tmp_path, mealv2):
    _, data, _ = work
    before = LabelStore.open(store_copy).attrs
    other = save_teacher(tmp_path / "other.pth", seed=1)
    r = mealv2("label", data, "-t", f"test_resnet={other}@32", "-o", store_copy, *LABEL_FLAGS)
    refused(r, str(store_copy), "teachers[0].sha256: store has", "refusing to mix labels")
    assert LabelStore.open(store_copy).attrs == before and store_complete(store_copy)


# ---- counts in flags ----------------------------------------------------------------------------

@pytest.mark.parametrize("command,flag,value", [
    ("label", "--rounds", "0"), ("label", "--crops-per-image", "-1"), ("label", "--topk", "0"),
    ("label", "--batch-size", "0"), ("label", "--shard-size", "0"), ("label", "--workers", "0"),
    ("train", "--epochs", "0"), ("train", "--batch-size", "0"), ("train", "--crops-per-image", "-1"),
])
def test_zero_or_negative_counts_are_refused(work, labelled, tmp_path, mealv2, command, flag, value):
    _, data, spec = work
    out = tmp_path / "out"
    if command == "label":
        args = ["label", data, "-t", spec, "-o", out, *LABEL_FLAGS]
    else:
        args = ["train", data, "--labels", labelled[1], "--out", out, *TRAIN_FLAGS]
    r = mealv2(*args, flag, value)          # the last value of a repeated option wins
    refused(r, f"Invalid value for '{flag}': {value} is out of range; expected an integer >= 1")
    assert not out.exists()


# ---- numbers that are not numbers ----------------------------------------------------------------

@pytest.mark.parametrize("command,flag,value", [
    ("label", "--temperature", "nan"), ("label", "--temperature", "inf"),
    ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--momentum", "nan"), ("train", "--wd", "inf"),
    ("train", "--d-lr", "nan"), ("train", "--temperature", "nan"), ("train", "--cutmix-prob", "nan"),
    ("train", "--cutmix-alpha", "inf"), ("train", "--mixup", "nan"), ("verify", "--tolerance", "nan"),
    ("export", "--tolerance", "inf"),
])
def test_nan_and_inf_are_refused_when_parsed(work, labelled, tmp_path, mealv2, command, flag, value):
    """click's float takes nan and inf, and nan passes every range: label wrote an all-zero store."""
    _, data, spec = work
    out = tmp_path / "out"
    args = {"label": ["label", data, "-t", spec, "-o", out, *LABEL_FLAGS],
            "train": ["train", data, "--labels", labelled[1], "--out", out, *TRAIN_FLAGS],
            "verify": ["verify", labelled[1]],
            "export": ["export", spec.split("=")[1].split("@")[0], "--format", "safetensors", "-a", "test_resnet",
                       "-o", out]}[command]
    r = mealv2(*args, flag, value)
    refused(r, f"Invalid value for '{flag}': {value} is not a finite number")
    assert not out.exists()


@pytest.mark.parametrize("suffix,named", [
    ("%nan:0.4:0.4/0.2", "normalisation '%nan:0.4:0.4/0.2'"), ("%0.5/inf", "normalisation '%0.5/inf'"),
    ("@abc", "suffix '@abc'"), ("@0", "suffix '@0'"), ("@100000", "suffix '@100000'"), ("*-1", "suffix '*-1'"),
    ("*inf", "suffix '*inf'"),
])
def test_bad_teacher_spec_suffix_is_named(work, tmp_path, mealv2, suffix, named):
    """Once a missing file ('@abc'), a DALI bad_alloc ('@100000'), a silent fallback, or an all-zero store."""
    root, data, _ = work
    spec = f"test_resnet={root / 'teacher.pth'}{suffix}"
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", spec, "-o", out, *LABEL_FLAGS)
    refused(r, f"teacher spec '{spec}'", named)
    assert not out.exists()


def test_a_teacher_with_non_finite_outputs_writes_no_labels(work, tmp_path, mealv2):
    """Once label encoded nan probabilities as some top-k and exited 0."""
    _, data, _ = work
    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=3).state_dict()
    state["fc.bias"][1] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    out = tmp_path / "store.zarr"
    r = mealv2("label", data, "-t", f"test_resnet={tmp_path / 'nan.pth'}@32", "-o", out, *LABEL_FLAGS,
               "--no-teacher-check")
    refused(r, "the teachers' probabilities for round 0, shard 0 (images 0-3) are not finite",
            "the shard was not written")
    assert not store_complete(out) and not LabelStore.open(out).done_mask().any()


def test_a_diverged_run_stops_naming_step_lr_and_last_good_checkpoint(work, tmp_path, mealv2):
    """--lr 1e6 once trained at loss nan, exited 0 and saved best.pt, which eval scored 33.33 %."""
    _, data, _ = work
    run = tmp_path / "run"
    r = mealv2("train", data, "--hard-labels", "--out", run, *TRAIN_FLAGS, "--res", 32, "--lr", "1e6",
               "--epochs", 3, "--val", data)
    refused(r, "training diverged: the loss is not finite", "at lr 1e+06", "--resume would repeat the same steps")
    saved = sorted(p.name for p in run.glob("*.pt")) if run.exists() else []
    if "the last good checkpoint is" in r.err:
        epoch = int(r.err.split("(after epoch ")[1].split(")")[0])
        assert f"{run / 'last.pt'}" in r.err and saved == ["best.pt", "last.pt"]
        for name in saved:
            ckpt = torch.load(run / name, weights_only=False)
            assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), name
        assert torch.load(run / "last.pt", weights_only=False)["epoch"] == epoch + 1
    else:
        assert "no epoch finished before it, so nothing was saved" in r.err and saved == []


# ---- where things run and live ------------------------------------------------------------------

@pytest.mark.parametrize("args,named", [
    (["label", "gs://bucket/train", "-t", "{spec}", "-o", "{out}"], "'DATA': gs://bucket/train"),
    (["train", "{data}", "--hard-labels", "-o", "https://host/run"], "'--out' / '-o': https://host/run"),
    (["eval", "s3://bucket/val", "--checkpoint", "{spec_file}"], "'DATA': s3://bucket/val"),
    (["verify", "{data}", "--data", "s3://bucket/train"], "'--data': s3://bucket/train"),
])
def test_urls_are_refused_not_taken_as_local_folders(work, tmp_path, mealv2, args, named):
    """Except as label stores (tests/test_remote.py, tests/test_remote_write.py)."""
    _, data, spec = work
    out = tmp_path / "out"
    values = {"data": data, "spec": spec, "out": out, "spec_file": spec.split("=")[1].split("@")[0]}
    r = mealv2(*(a.format(**values) for a in args), *(TRAIN_FLAGS if args[0] == "train" else []))
    refused(r, named, "is a URL; here mealv2 takes a local path: URLs are taken only as label stores")
    assert not out.exists() and not Path("s3:").exists() and not Path("https:").exists()


def test_a_mistyped_store_url_is_refused_not_published_to_a_local_folder(store_copy, tmp_path, mealv2,
                                                                        monkeypatch):
    """'s3:/bucket/x' (one slash) was a local folder 's3:' that publish reported as published."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    r = mealv2("publish", store_copy, "s3:/bucket/x")
    refused(r, "'DEST': s3:/bucket/x", "likely a mistyped URL; write s3://bucket/x for the URL")
    assert list((tmp_path / "here").iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["label", "train", "eval"])
def test_device_cuda_without_a_gpu_is_a_clear_error(work, tmp_path, mealv2, command):
    _, data, spec = work
    out = tmp_path / "out"
    args = {"label": ["label", data, "-t", spec, "-o", out, *LABEL_FLAGS],
            "train": ["train", data, "--hard-labels", "-o", out, *TRAIN_FLAGS],
            "eval": ["eval", data, "--checkpoint", spec.split("=")[1].split("@")[0], "-a", "test_resnet",
                     "--res", 32]}[command]
    r = mealv2(*args, "--device", "cuda")
    refused(r, "--device cuda: torch sees no CUDA device", "use --device cpu")
    assert not out.exists()


# ---- a damaged store ----------------------------------------------------------------------------

def _edit_attrs(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["mealv2"]["topk"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,place,train_says", [
    ("flip", "probs/c/0/0/0/0[1]: unreadable chunk", "probs/c/0/0/0/0[1]: unreadable chunk"),
    ("delete", "ids/c/0/0/0/0[2]: missing chunk file of a completed shard", "ids/c/0/0/0/0[0]: missing chunk file"),
    ("attrs", "zarr.json: the 'mealv2' attributes were edited", "attributes were edited"),
    ("transpose", "probs/zarr.json: array 'probs''s metadata", "transpose order, dtype) was changed"),
    ("shape", "boxes/zarr.json: array 'boxes''s metadata", "boxes/zarr.json: array 'boxes''s metadata"),
    ("no_meta", "ids/zarr.json is missing: array 'ids' has no metadata", "ids/zarr.json is missing"),
    ("half_written", "round 0 shard 1: not complete (staged/done/c/0/1 unset)", "only 0/1 label rounds are complete"),
])
def test_damaged_store_is_named_by_verify_and_refused_by_train(work, store_copy, tmp_path, mealv2,
                                                                damage, place, train_says):
    _, data, _ = work
    if damage == "flip":
        flip_chunk_byte(store_copy, "probs", 0, 1)
    elif damage == "delete":   # a packed round's object
        (store_copy / "ids/c/0/0/0/0").unlink()
    elif damage == "attrs":
        _edit_attrs(store_copy)
    elif damage in ("transpose", "shape"):   # once: verify OK, train replayed permuted labels / failed at epoch 4
        file = store_copy / ("probs" if damage == "transpose" else "boxes") / "zarr.json"
        meta = json.loads(file.read_text())
        if damage == "transpose":
            meta["codecs"][0]["configuration"]["order"] = [0, 3, 2, 1]
        else:
            meta["shape"][1] += 8
        file.write_text(json.dumps(meta))
    elif damage == "no_meta":   # once a raw KeyError / JSONDecodeError
        (store_copy / "ids/zarr.json").unlink()
    else:   # the round's objects written, its commit not: what a kill between the two leaves
        (store_copy / "done/c/0/0").unlink()
    refused(mealv2("verify", store_copy), place, code=1)
    run = tmp_path / "run"
    r = mealv2("train", data, "--labels", store_copy, "--out", run, *TRAIN_FLAGS)
    refused(r, str(store_copy), train_says)
    assert not (run / "last.pt").exists()


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


@pytest.mark.parametrize("damage,place", [   # once a ~106-line zarr traceback
    (lambda store: flip_chunk_byte(store, "ids", 0, 1), "ids/c/0/0/0/0[1]: unreadable chunk"),
    (lambda store: _truncate(store / "ids/c/0/0/0/0"), "ids/c/0/0/0/0[0]: unreadable object"),
    (lambda store: _truncate(store / "labels/c/0"), "labels/c/0: unreadable chunk"),
], ids=["flipped_bit", "truncated_object", "truncated_labels"])
def test_inspect_names_the_damaged_object_and_the_repair(store_copy, mealv2, damage, place):
    damage(store_copy)
    r = mealv2("inspect", store_copy)
    refused(r, f"{store_copy} is damaged", place, f"`mealv2 verify {store_copy}`", "mealv2 label DATA")
    assert len(r.err.splitlines()) < 10, r.err


def test_a_damaged_done_mark_is_named_with_the_fix(work, store_copy, tmp_path, mealv2):
    _, data, _ = work
    flip_chunk_byte(store_copy, "done", 0, 1)
    for r in (mealv2("verify", store_copy),
              mealv2("train", data, "--labels", store_copy, "--out", tmp_path / "run", *TRAIN_FLAGS)):
        refused(r, str(store_copy), "done marks (array `done`) cannot be read", "re-run the store's `mealv2 label`")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_damage_in_a_later_round_is_refused_before_the_first_step(work, tmp_path, mealv2):
    _, data, spec = work
    store = tmp_path / "store.zarr"
    labelled_ok(mealv2("label", data, "-t", spec, "-o", store, *LABEL_FLAGS, "--rounds", 2))
    flip_chunk_byte(store, "probs", 1, 1)
    run = tmp_path / "run"
    r = mealv2("train", data, "--labels", store, "--out", run, *TRAIN_FLAGS, "--epochs", 2)
    refused(r, str(store), "probs/c/1/0/0/0[1]: unreadable chunk")
    assert not (run / "last.pt").exists(), "epoch 0 was trained on a store known to be damaged"


# ---- a damaged run ------------------------------------------------------------------------------

def test_a_truncated_run_config_resumes_from_last_pt_or_says_what_works(work, labelled, tmp_path, mealv2):
    """Once refused both ways: `--resume` as "not a mealv2 run config ... repeat the run's flags with --out
    RUN", and that as "already holds a run (last.pt); pass --resume"."""
    _, data, _ = work
    _, store = labelled
    run, config = tmp_path / "run", tmp_path / "run" / "config.json"
    labelled_ok(mealv2("train", data, "--labels", store, "--out", run, *TRAIN_FLAGS))
    config.write_text(config.read_text()[:300])
    r = mealv2("train", "--resume", run, "--epochs", 2)
    labelled_ok(r)
    assert f"{config} is not a mealv2 run config (JSONDecodeError" in r.err and f"{run / 'last.pt'} records" in r.err
    assert json.loads(config.read_text())["settings"]["epochs"] == 2   # written again
    assert "resuming" in r.out and (run / "metrics.csv").read_text().count("\n") == 3
    # killed before its first epoch was saved: nothing to resume, and the advice given works
    (run / "last.pt").unlink()
    config.write_text(config.read_text()[:300])
    refused(mealv2("train", "--resume", run), f"{config} is not a mealv2 run config", "holds no last.pt",
            "start the run again without --resume")
    labelled_ok(mealv2("train", data, "--labels", store, "--out", run, *TRAIN_FLAGS))


@pytest.mark.parametrize("flags, said", [
    (["--num_crops", "4"], "No such option: --num_crops. In mealv2: --crops-per-image (FKD's num_crops)"),
    (["--softlabel_path", "x"], "In mealv2: --labels STORE"),
    (["--mode", "fkd_save"], "is `mealv2 label DATA -t TEACHERS -o STORE`"),
    (["-j", "4"], "No such option: -j. In mealv2: --workers"),
    (["--multiprocessing-distributed"], "torchrun --nproc_per_node N -m mealv2.cli train"),
    (["--lr-x", "3"], "(Did you mean one of: '--d-lr', '--lr', '--lr-step'?)"),   # others: click's guess
])
def test_flags_copied_from_fkd_and_meal_v2_are_named_as_mealv2_calls_them(work, mealv2, flags, said):
    """Click's guess by spelling sent FKD's --num_crops to --cos."""
    _, data, _ = work
    refused(mealv2("train", data, *flags), said)
