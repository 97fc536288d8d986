import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image_dataset
from mealv2.common.data.dataset import IMG_EXTENSIONS, BadImagesError, DatasetError, build_index


def dali_decoded_hw(paths) -> list[tuple[int, int]]:
    """(H, W) of each file as DALI's CPU decoder returns it: the sizes crops are drawn on."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def decode():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    p = decode()
    p.build()
    p.feed_input("enc", [np.frombuffer(Path(x).read_bytes(), np.uint8) for x in paths])
    out, = p.run()
    return [tuple(np.array(out[i]).shape[:2]) for i in range(len(paths))]


def save(path: Path, h: int = 12, w: int = 20, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (200, 30, 30)).save(path, fmt, **kw)
    return path


def encoded(fmt: str, h: int = 12, w: int = 20, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 200, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


def test_folder_order_and_labels_match_torchvision(tmp_path):
    from torchvision.datasets.folder import find_classes, make_dataset

    for rel in ["b/1.jpg", "b/0.jpeg", "a/z.JPG", "a/y.png", "a/sub/x.jpg", "a/sub2/w.jpg",
                "a/m.jpg", "C/q.webp", "10/a.bmp", "9/b.tiff"]:
        save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    idx = build_index(tmp_path)
    classes, class_to_idx = find_classes(tmp_path)
    samples = make_dataset(tmp_path, class_to_idx, extensions=IMG_EXTENSIONS)
    assert idx.classes == tuple(classes) == ("10", "9", "C", "a", "b")
    assert [(str(idx.path(i)), int(idx.labels[i])) for i in range(len(idx))] == samples
    assert idx.labels.dtype == np.int64 and idx.sizes.dtype == np.int32
    assert idx.sizes.shape == (10, 2) and (idx.sizes == (12, 20)).all()

    # hidden files and folders (macOS '._x.jpg', '.ipynb_checkpoints') are not data
    save(tmp_path / ".ipynb_checkpoints" / "x.jpg")
    save(tmp_path / "a" / "._z.jpg")
    save(tmp_path / "a" / ".cache" / "v.jpg")
    again = build_index(tmp_path)
    assert again.relpaths == idx.relpaths and again.fingerprint == idx.fingerprint


def test_sizes_equal_what_dali_decodes(tiny_data):
    idx = build_index(tiny_data)
    assert idx.classes == ("class_0", "class_1", "class_2")
    assert idx.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [tuple(s) for s in idx.sizes.tolist()] == dali_decoded_hw(
        [idx.path(i) for i in range(len(idx))])

    rotated = idx.relpaths.index("class_0/img_00.jpg")
    with Image.open(idx.path(rotated)) as im:
        assert im.getexif()[0x0112] == 6
        w, h = im.size
    assert h != w and idx.sizes[rotated].tolist() == [w, h]
    for rel, fmt, mode in [("class_1/img_01.jpg", "JPEG", "L"), ("class_2/img_02.png", "PNG", "RGB")]:
        with Image.open(tiny_data / rel) as im:
            assert (im.format, im.mode) == (fmt, mode)
            assert idx.sizes[idx.relpaths.index(rel)].tolist() == [im.height, im.width]
    with pytest.raises(ValueError):
        idx.sizes[0, 0] = 1


def test_exif_orientation_per_format_matches_dali(tmp_path):
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
           b'02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
           b' tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    for fmt, ext in [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")]:
        for o in (1, 3, 5, 6, 8):
            ex = Image.Exif()
            ex[0x0112] = o
            save(tmp_path / "c" / f"{fmt}_{o}.{ext}", h=12, w=20, exif=ex.tobytes())
    save(tmp_path / "c" / "xmp_only.jpg", h=12, w=20, xmp=xmp)   # DALI ignores XMP orientation
    idx = build_index(tmp_path)
    got = [tuple(s) for s in idx.sizes.tolist()]
    assert got == dali_decoded_hw([idx.path(i) for i in range(len(idx))])
    expect = {rel: (20, 12) if rel.split("_")[-1][0] in "568" else (12, 20) for rel in idx.relpaths}
    assert dict(zip(idx.relpaths, got)) == expect


def test_fingerprint_tracks_names_and_sizes_only(tmp_path, tiny_data):
    a = shutil.copytree(tiny_data, tmp_path / "a")
    b = shutil.copytree(tiny_data, tmp_path / "b")
    fp = build_index(a).fingerprint
    assert len(fp) == 64 and build_index(a, workers=1).fingerprint == fp
    assert build_index(b).fingerprint == fp          # independent of where the data lives

    (a / "class_1" / "img_03.jpg").rename(a / "class_1" / "img_09.jpg")
    assert build_index(a).fingerprint != fp
    (a / "class_1" / "img_09.jpg").rename(a / "class_1" / "img_03.jpg")
    assert build_index(a).fingerprint == fp

    with Image.open(a / "class_2" / "img_03.jpg") as im:
        size = im.size
    save(a / "class_2" / "img_03.jpg", h=size[1] + 1, w=size[0])
    assert build_index(a).fingerprint != fp


def test_csv_index_keeps_row_order(tiny_csv, tiny_data):
    idx = build_index(tiny_csv)
    rows = [line.split(",") for line in tiny_csv.read_text().splitlines()[1:]]
    assert idx.root == tiny_data and idx.relpaths == tuple(r[0] for r in rows)
    assert idx.classes == ("class_0", "class_1", "class_2")
    assert [idx.classes[c] for c in idx.labels] == [r[1] for r in rows]
    folder = build_index(tiny_data)
    for rel, size in zip(idx.relpaths, idx.sizes.tolist()):
        assert size == folder.sizes[folder.relpaths.index(rel)].tolist()


def test_csv_integer_labels_sort_numerically_and_absolute_paths(tmp_path, tiny_data):
    csv = tmp_path / "list.csv"
    absolute = tiny_data / "class_1" / "img_03.jpg"
    shutil.copy(tiny_data / "class_0" / "img_03.jpg", tmp_path / "x.jpg")
    shutil.copy(tiny_data / "class_2" / "img_03.jpg", tmp_path / "y.jpg")
    csv.write_text(f"label,path\n10,x.jpg\n2,{absolute}\n1,y.jpg\n")
    idx = build_index(csv)
    assert idx.classes == ("1", "2", "10") and idx.labels.tolist() == [2, 1, 0]
    assert idx.path(0) == tmp_path / "x.jpg" and idx.path(1) == absolute


@pytest.mark.parametrize("body, expected", [
    ("file,class\nx.jpg,a\n", ["column 'path'", "['file', 'class']"]),
    ("path,label\nx.jpg,a\nx.jpg,\n", ["line 3", "empty label", "x.jpg"]),
    ("path,label\nx.jpg,a\nsub/missing.jpg,b\n", ["line 3", "sub/missing.jpg", "does not exist"]),
])
def test_csv_errors_name_the_row(tmp_path, tiny_data, body, expected):
    shutil.copy(tiny_data / "class_0" / "img_03.jpg", tmp_path / "x.jpg")
    (tmp_path / "list.csv").write_text(body)
    with pytest.raises(DatasetError) as err:
        build_index(tmp_path / "list.csv", skip_bad=True)
    assert all(s in str(err.value) for s in expected), str(err.value)


def test_layout_errors_name_the_folder(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="nope.*does not exist"):
        build_index(tmp_path / "nope")

    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(DatasetError, match="empty has no image files.*and no class subfolders"):
        build_index(tmp_path / "empty")

    save(tmp_path / "d" / "cat" / "a.jpg")
    (tmp_path / "d" / "dog").mkdir()
    (tmp_path / "d" / "dog" / "readme.txt").write_text("")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'd' / 'dog'}.*class ids") as err:
        build_index(tmp_path / "d")
    assert not isinstance(err.value, BadImagesError)

    save(tmp_path / "d" / "dog" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "dog":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match=f"cannot read folder {tmp_path / 'd' / 'dog'}: Permission"):
        build_index(tmp_path / "d")


def test_stray_images_at_an_imagefolder_root_are_left_out_and_named_in_one_line(tmp_path, tiny_data, capsys):
    """Once one preview.jpg (or the curves.png of `train --out DATA`) turned the whole dataset unlabelled."""
    clean = build_index(tiny_data)
    capsys.readouterr()
    data = Path(shutil.copytree(tiny_data, tmp_path / "d"))
    save(data / "preview.jpg")
    save(data / "curves.png")
    (data / "notes.txt").write_text("not an image")
    index = build_index(data)
    assert index.labelled and index.classes == clean.classes and index.relpaths == clean.relpaths
    assert index.fingerprint == clean.fingerprint
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1, warning
    assert warning.startswith(f"mealv2: warning: DATA {data}: 2 image file(s) at its root") and \
        "left out (as torchvision's ImageFolder leaves them): curves.png, preview.jpg" in warning

    flat = tmp_path / "flat"   # only images, no subfolder: unambiguously unlabelled, without a warning
    for name in ("b.jpg", "a.png"):
        save(flat / name)
    (flat / ".cache").mkdir()
    save(flat / ".cache" / "c.jpg")
    index = build_index(flat)
    assert not index.labelled and index.relpaths == ("a.png", "b.jpg") and capsys.readouterr().err == ""
    save(flat / "more" / "d.jpg")   # images beside a subfolder: an ImageFolder, as torchvision reads it
    index = build_index(flat)
    assert index.classes == ("more",) and index.relpaths == ("more/d.jpg",)
    assert "2 image file(s) at its root" in capsys.readouterr().err


@pytest.mark.parametrize("link,target,named", [
    ("class_0/loop", "..", "folder class_0/loop is DATA itself again"),
    ("class_0/self", ".", "folder class_0/self is folder class_0 again"),
    ("class_0/alias", "../class_1", "folder class_1 is folder class_0/alias again"),
])
def test_symlink_loops_and_folders_reached_twice_are_refused(tmp_path, tiny_data, link, target, named):
    """Once `class_0/loop -> ..` with --skip-bad labelled 528 copies of the other classes as class_0."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "d"))
    (data / link).symlink_to(target, target_is_directory=True)
    for skip_bad in (False, True):
        with pytest.raises(DatasetError, match=rf"DATA {data}: {named} \(both are .*\): a symlink loop.*remove "
                                               rf"the symlink"):
            build_index(data, skip_bad=skip_bad)
    (data / link).unlink()
    outside = Path(shutil.copytree(tiny_data / "class_2", tmp_path / "elsewhere"))
    (data / "class_0" / "extra").symlink_to(outside, target_is_directory=True)   # a link to new images is fine
    index = build_index(data)
    assert sum(r.startswith("class_0/extra/") for r in index.relpaths) == 4


def test_bad_files_are_reported_and_skippable(tmp_path):
    root = make_image_dataset(tmp_path / "d", num_classes=2, per_class=3)
    good_jpeg = (root / "class_0" / "img_01.jpg").read_bytes()
    png = (root / "class_0" / "img_02.png").read_bytes()
    bad_dir = root / "class_1"
    (bad_dir / "a_trunc.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (bad_dir / "b_zero.jpg").write_bytes(b"")
    (bad_dir / "c_text.jpg").write_text("id,name\n1,not an image\n")
    (bad_dir / "d_trunc.png").write_bytes(png[:-12])
    (bad_dir / "e_gif.png").write_bytes(encoded("GIF"))
    (bad_dir / "f_padded.jpg").write_bytes(good_jpeg + b"\0" * 100 + b"\n")  # fine
    (bad_dir / "g_png_named.jpg").write_bytes(png)                           # fine
    expected = [("class_1/a_trunc.jpg", "truncated JPEG"), ("class_1/b_zero.jpg", "zero-byte"),
                ("class_1/c_text.jpg", "not an image"), ("class_1/d_trunc.png", "truncated PNG"),
                ("class_1/e_gif.png", "format GIF is not decoded by DALI")]

    with pytest.raises(BadImagesError) as err:
        build_index(root)
    assert [rel for rel, _ in err.value.bad] == [rel for rel, _ in expected]
    for (rel, reason), (_, want) in zip(err.value.bad, expected):
        assert want in reason and f"{rel}: {reason}" in str(err.value)
    assert "--skip-bad" in str(err.value)

    idx = build_index(root, skip_bad=True)
    assert idx.skipped == tuple(err.value.bad)
    assert len(idx) == 2 * 3 + 2 and not set(idx.relpaths) & {rel for rel, _ in expected}
    i = idx.relpaths.index("class_1/g_png_named.jpg")
    with Image.open(idx.path(i)) as im:
        assert idx.sizes[i].tolist() == [im.height, im.width]


def test_decompression_bomb_names_pixels_and_limit(tmp_path, monkeypatch):
    save(tmp_path / "c" / "small.png", h=10, w=10)
    save(tmp_path / "c" / "huge.png", h=50, w=50)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # PIL refuses > 2 x this
    with pytest.raises(BadImagesError) as err:
        build_index(tmp_path)
    (rel, reason), = err.value.bad
    assert rel == "c/huge.png" and "decompression bomb" in reason
    assert "2500" in reason and "2000" in reason


def test_many_bad_files_are_summarised(tmp_path):
    save(tmp_path / "c" / "ok.jpg")
    for i in range(25):
        (tmp_path / "c" / f"z{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(BadImagesError) as err:
        build_index(tmp_path)
    assert len(err.value.bad) == 25 and "... and 5 more" in str(err.value)
    assert "c/z19.jpg" in str(err.value) and "c/z20.jpg" not in str(err.value)


def test_class_emptied_by_skipping_is_an_error(tmp_path):
    save(tmp_path / "cat" / "a.jpg")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="'dog'.*no usable image") as err:
        build_index(tmp_path, skip_bad=True)
    assert not isinstance(err.value, BadImagesError)


def test_csv_paths_are_normalised_as_pathlib_does():
    """The CSV reader's fast path gives PurePath's posix form for every spelling of a path."""
    from itertools import product
    from pathlib import PurePath

    from mealv2.common.data.dataset import _posix

    parts = ["a", ".", "", "..", "b.jpg"]
    for n in range(1, 5):
        for combo in product(parts, repeat=n):
            for path in ("/".join(combo), "/" + "/".join(combo)):
                assert _posix(path) == PurePath(path).as_posix(), path
