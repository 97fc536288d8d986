"""The dataset index: which images, which class ids, and how big each image decodes.

Both stages address images by their position in this index, and the crop sampler
draws boxes from the image sizes, so the index must be deterministic (same files ->
same order, ids and sizes on every machine) and the sizes must be the ones DALI's
decoder produces. The fingerprint ties a label store to the exact index it was made
from.

Bad files are found here, from headers and file tails only, because a file DALI
cannot decode would otherwise stop a labelling or training run hours in.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MealV2Error

# torchvision.datasets.folder.IMG_EXTENSIONS (copied: importing torchvision costs seconds)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL format names of the containers DALI's image decoder reads (MPO is multi-picture JPEG).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})

_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)   # transpose / rotate 90 / transverse / rotate 270
_TAIL_BYTES = 4096                      # enough to see past sector padding after EOI/IEND
_PADDING = b"\x00 \t\r\n"
_PNG_IEND = b"IEND\xaeB`\x82"           # IEND chunk type + its fixed CRC
_MISSING = "file not found"
_CHUNK = 256                            # paths per thread-pool task: ~5k tasks for ImageNet
_MAX_LISTED = 20


class DatasetError(MealV2Error, ValueError):
    """Bad dataset input; the message names the file/folder, the value and what was expected."""


class BadImagesError(DatasetError):
    """Files DALI would fail on (or PIL refuses); raised together so one run finds them all."""

    def __init__(self, where: Path, bad: list[tuple[str, str]]):
        self.bad = bad
        lines = [f"  {rel}: {reason}" for rel, reason in bad[:_MAX_LISTED]]
        if len(bad) > _MAX_LISTED:
            lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
        super().__init__(
            f"{len(bad)} bad image file(s) in {where}:\n" + "\n".join(lines)
            + "\nFix or remove them, or pass --skip-bad to leave them out "
              "(they are then recorded in the index as skipped).")


@dataclass(frozen=True, eq=False)
class DatasetIndex:
    """Ordered images with class ids and decoded sizes (build_index makes the arrays read-only)."""

    root: Path                  # directory relpaths are relative to
    relpaths: tuple[str, ...]   # posix paths (absolute only where a CSV row gave one)
    labels: np.ndarray          # int64 (N,)
    classes: tuple[str, ...]
    sizes: np.ndarray           # int32 (N, 2): (height, width) after EXIF orientation
    skipped: tuple[tuple[str, str], ...] = ()   # (relpath, reason) left out by skip_bad

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, i: int) -> Path:
        return self.root / self.relpaths[i]

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over what a label store depends on; independent of where the data lives."""
        h = hashlib.sha256(b"mealv2-dataset-index-v1\0")
        h.update(json.dumps([list(self.classes), list(self.relpaths)]).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.sizes, dtype="<i4").tobytes())
        return h.hexdigest()


def build_index(data: str | Path, *, skip_bad: bool = False, workers: int = 8) -> DatasetIndex:
    """Index an ImageFolder directory or a ``path,label`` CSV file.

    Raises DatasetError for layout problems and BadImagesError (unless ``skip_bad``)
    for files that cannot be decoded.
    """
    if workers < 1:
        raise DatasetError(f"workers must be >= 1, got {workers}")
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"DATA {data} does not exist; expected an ImageFolder "
                           "directory (one subfolder per class) or a .csv file")
    if data.is_dir():
        root = data.absolute()
        classes, relpaths, labels, class_dirs = _scan_folder(root)
        row_lines = None
    elif data.suffix.lower() == ".csv":
        root = data.absolute().parent
        classes, relpaths, labels, row_lines = _read_csv(data.absolute())
        class_dirs = None
    else:
        raise DatasetError(f"DATA {data} is a file but not a .csv; expected an ImageFolder "
                           "directory or a CSV with header 'path,label'")

    probes = _probe_all([str(root / r) for r in relpaths], workers)

    if row_lines is not None:
        missing = [f"line {row_lines[i]}: {relpaths[i]}"
                   for i, (_, _, reason) in enumerate(probes) if reason == _MISSING]
        if missing:
            listed = "\n  ".join(missing[:_MAX_LISTED])
            more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise DatasetError(f"CSV {data}: {len(missing)} row(s) name a file that does not "
                               f"exist (paths are relative to {root}):\n  {listed}{more}")

    bad = [(relpaths[i], reason) for i, (_, _, reason) in enumerate(probes) if reason]
    if bad and not skip_bad:
        raise BadImagesError(data, bad)
    keep = [i for i, (_, _, reason) in enumerate(probes) if not reason]

    labels_kept = np.asarray([labels[i] for i in keep], dtype=np.int64)
    counts = np.bincount(labels_kept, minlength=len(classes))
    if (counts == 0).any():
        empty = [f"{classes[c]!r}" + (f" ({class_dirs[c]})" if class_dirs else "")
                 for c in np.flatnonzero(counts == 0)]
        raise DatasetError(f"class(es) {', '.join(empty)} of {data} have no usable image left "
                           "after skipping bad files; every class needs at least one image "
                           "because class ids must match the teachers'")

    sizes = np.asarray([probes[i][:2] for i in keep], dtype=np.int32).reshape(-1, 2)
    labels_kept.setflags(write=False)
    sizes.setflags(write=False)
    return DatasetIndex(root=root, relpaths=tuple(relpaths[i] for i in keep),
                        labels=labels_kept, classes=tuple(classes), sizes=sizes,
                        skipped=tuple(bad))


def _scan_folder(root: Path) -> tuple[list[str], list[str], list[int], list[Path]]:
    """torchvision's find_classes + make_dataset order, minus hidden files and folders."""
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except OSError as err:
        _raise_unreadable(err)
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = sum(e.name.lower().endswith(IMG_EXTENSIONS) for e in entries if e.is_file())
        hint = f" (it holds {loose} image file(s) directly)" if loose else ""
        raise DatasetError(f"DATA folder {root} has no class subfolders{hint}; expected "
                           "the ImageFolder layout DATA/<class>/<image>")

    relpaths, labels, class_dirs, empty = [], [], [], []
    for c, name in enumerate(classes):
        class_dir = root / name
        class_dirs.append(class_dir)
        walked = []
        for dirpath, dirnames, filenames in os.walk(class_dir, onerror=_raise_unreadable,
                                                    followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            walked.append((dirpath, filenames))
        n_before = len(relpaths)
        for dirpath, filenames in sorted(walked):
            rel_dir = PurePath(os.path.relpath(dirpath, root)).as_posix()
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS):
                    relpaths.append(f"{rel_dir}/{f}")
                    labels.append(c)
        if len(relpaths) == n_before:
            empty.append(str(class_dir))
    if empty:
        raise DatasetError(f"class folder(s) with no image files ({', '.join(IMG_EXTENSIONS)}): "
                           f"{', '.join(empty)}; every class needs at least one image because "
                           "class ids must match the teachers'")
    return classes, relpaths, labels, class_dirs


def _raise_unreadable(err: OSError):
    raise DatasetError(f"cannot read folder {err.filename}: {err.strerror or err}") from err


def _read_csv(csv_path: Path) -> tuple[list[str], list[str], list[int], list[int]]:
    """Rows in file order; classes sorted, numerically when every label is an integer."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "path" not in header or "label" not in header:
                raise DatasetError(f"CSV {csv_path}: header must have columns 'path' and "
                                   f"'label', found {header}")
            ip, il = header.index("path"), header.index("label")
            paths, names, lines = [], [], []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
                if not cells[ip]:
                    raise DatasetError(f"CSV {csv_path} line {reader.line_num}: empty path")
                if not cells[il]:
                    raise DatasetError(f"CSV {csv_path} line {reader.line_num}: empty label "
                                       f"for {cells[ip]}; expected a class name")
                paths.append(PurePath(cells[ip]).as_posix())
                names.append(cells[il])
                lines.append(reader.line_num)
    except OSError as err:
        raise DatasetError(f"cannot read CSV {csv_path}: {err.strerror or err}") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"CSV {csv_path} is not a readable UTF-8 CSV: {err}") from err
    if not paths:
        raise DatasetError(f"CSV {csv_path} has a header but no rows")

    unique = set(names)
    try:
        classes = sorted(unique, key=lambda s: (int(s), s))
    except ValueError:
        classes = sorted(unique)
    class_id = {name: c for c, name in enumerate(classes)}
    return classes, paths, [class_id[n] for n in names], lines


def _probe_all(paths: list[str], workers: int) -> list[tuple[int, int, str | None]]:
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    with ThreadPoolExecutor(workers) as pool:
        return [r for chunk in pool.map(lambda ps: [_probe(p) for p in ps], chunks) for r in chunk]


def _probe(path: str) -> tuple[int, int, str | None]:
    """(height, width, None) as DALI decodes it, or (0, 0, why the file is bad)."""
    try:
        with open(path, "rb") as f:
            n = f.seek(0, os.SEEK_END)
            if n == 0:
                return 0, 0, "zero-byte file"
            f.seek(max(0, n - _TAIL_BYTES))
            tail = f.read().rstrip(_PADDING)
            f.seek(0)
            try:
                with Image.open(f) as im:
                    fmt = im.format
                    w, h, orientation = _raw_size_and_orientation(im)
            except Image.DecompressionBombError as err:
                return 0, 0, f"decompression bomb: {err}"
            except UnidentifiedImageError:
                return 0, 0, "not an image (PIL cannot identify it)"
            except Exception as err:   # any header parse failure makes the file unusable
                return 0, 0, f"unreadable image header ({type(err).__name__}: {err})"
    except FileNotFoundError:
        return 0, 0, _MISSING
    except OSError as err:
        return 0, 0, f"cannot read: {err.strerror or err}"

    if fmt not in DALI_FORMATS:
        return 0, 0, (f"format {fmt} is not decoded by DALI; expected one of "
                      f"{', '.join(sorted(DALI_FORMATS))}")
    if fmt in ("JPEG", "MPO") and not tail.endswith(b"\xff\xd9"):
        return 0, 0, "truncated JPEG: no end-of-image marker (FF D9) at the end of the file"
    if fmt == "PNG" and not tail.endswith(_PNG_IEND):
        return 0, 0, "truncated PNG: no IEND chunk at the end of the file"
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return h, w, None


def _raw_size_and_orientation(im: Image.Image) -> tuple[int, int, int | None]:
    """Stored (width, height) and EXIF orientation, without decoding pixels.

    Only the EXIF tag counts (not PIL's XMP fallback): DALI ignores XMP orientation.
    TIFF is read from its tags because newer Pillow already reports TIFF sizes rotated.
    """
    if im.format == "TIFF":
        return int(im.tag_v2[256]), int(im.tag_v2[257]), im.tag_v2.get(_ORIENTATION)
    w, h = im.size
    raw = im.info.get("exif")   # PNG's getexif() would decode the whole image to find it
    if not raw:
        return w, h, None
    try:
        exif = Image.Exif()
        exif.load(raw)
        return w, h, exif.get(_ORIENTATION)
    except Exception:   # unparsable EXIF: treated as no orientation tag
        return w, h, None
