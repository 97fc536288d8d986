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
import io
import json
import os
import re
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path, PurePath

import crc32c
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import MealV2Error
from ..store.files import cache_root, write_file
from ..store.mismatch import path_differences

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
_CACHE_VERSION = 1                      # of the cached index's content; a new version rebuilds it


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
    labels: np.ndarray          # int64 (N,); all -1 for unlabelled images
    classes: tuple[str, ...]    # empty for unlabelled images (their classes come from the teachers)
    sizes: np.ndarray           # int32 (N, 2): (height, width) after EXIF orientation
    skipped: tuple[tuple[str, str], ...] = ()   # (relpath, reason) left out by skip_bad

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, i: int) -> Path:
        return self.root / self.relpaths[i]

    @property
    def labelled(self) -> bool:
        """False for a folder of loose images or a CSV without a label column."""
        return bool(self.classes)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over what a label store depends on; independent of where the data lives."""
        h = hashlib.sha256(b"mealv2-dataset-index-v1\0")
        h.update(json.dumps([list(self.classes), list(self.relpaths)]).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.sizes, dtype="<i4").tobytes())
        return h.hexdigest()


def build_index(data: str | Path, *, skip_bad: bool = False, workers: int = 8, cache: bool = False,
                progress: bool = False) -> DatasetIndex:
    """Index an ImageFolder directory, a folder of unlabelled images, or a ``path[,label]`` CSV file.

    Raises DatasetError for layout problems and BadImagesError (unless ``skip_bad``)
    for files that cannot be decoded. ``cache``: reuse the index saved by an earlier build of
    the same listing (see :func:`cache_file`) instead of reading every header again;
    ``progress``: tqdm bars over the files.
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
                           "directory, a folder of images, or a CSV with header 'path,label' (or 'path')")

    paths = [os.path.join(root, r) for r in relpaths]   # not pathlib: 10x faster over 1.28 M rows
    key = None
    if cache:
        key = _listing_key(data, skip_bad, classes, relpaths, labels, _stat_all(paths, workers, progress))
        cached = _load_cache(cache_file(data, skip_bad), root, key)
        if cached is not None:
            return cached
    probes = probe_images(paths, workers, progress)

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
    counts = np.bincount(labels_kept, minlength=len(classes)) if classes else np.ones(1)
    if (counts == 0).any():
        empty = [f"{classes[c]!r}" + (f" ({class_dirs[c]})" if class_dirs else "")
                 for c in np.flatnonzero(counts == 0)]
        raise DatasetError(f"class(es) {', '.join(empty)} of {data} have no usable image left "
                           "after skipping bad files; every class needs at least one image "
                           "because class ids must match the teachers'")

    sizes = np.asarray([probes[i][:2] for i in keep], dtype=np.int32).reshape(-1, 2)
    labels_kept.setflags(write=False)
    sizes.setflags(write=False)
    index = DatasetIndex(root=root, relpaths=tuple(relpaths[i] for i in keep),
                         labels=labels_kept, classes=tuple(classes), sizes=sizes,
                         skipped=tuple(bad))
    if key is not None:
        _save_cache(cache_file(data, skip_bad), key, index)
    return index


def index_record(index: DatasetIndex) -> dict:
    """What a training run records of an index it trains or validates on, so that ``--resume`` tells other
    data from the same data moved or copied: the fingerprint (relative paths, classes, labels, sizes: no
    location), the image count, and the relative paths (zlib: a few MB for ImageNet) to name what changed."""
    return {"fingerprint": index.fingerprint, "num_images": len(index), "paths": zlib.compress(_join(index.relpaths))}


def index_changes(record: dict, index: DatasetIndex, name: str) -> str | None:
    """None when ``index`` is the index ``record`` (:func:`index_record`) was made from, wherever its files
    now are; else a line giving both fingerprints and naming the files ``name`` (the index) lacks and adds."""
    if record["fingerprint"] == index.fingerprint:
        return None
    paths = _split(zlib.decompress(record["paths"]), record["num_images"])
    return (f"fingerprint {index.fingerprint[:16]} ({len(index)} images), the run's {record['fingerprint'][:16]} "
            f"({record['num_images']} images); "
            + path_differences(paths, index.relpaths, name=name, since="the run started"))


def refuse_nested(data: str | Path, out: str | Path, flag: str) -> None:
    """Refuse an output folder inside a DATA folder, or DATA inside it: what a command writes inside
    DATA (curves.png, checkpoints, a store's chunk files) would become data the next command indexes
    (a stray image at DATA's root, a class folder of run files). A CSV's folder is not indexed."""
    if not Path(data).is_dir():
        return
    d, o = Path(data).resolve(), Path(out).resolve()
    if o == d or d in o.parents:
        raise DatasetError(f"{flag} {out} is inside DATA {data}: what it writes there would become part of "
                           f"the data the next command indexes; choose {flag} outside DATA")
    if o in d.parents:
        raise DatasetError(f"DATA {data} is inside {flag} {out}: outputs and the data they come from would share "
                           f"one folder tree (deleting the output deletes the data; indexing the output's folder "
                           f"takes the data in); choose {flag} outside DATA's folders")


def skipped_report(index: DatasetIndex) -> str | None:
    """What --skip-bad left out, by reason, for a command to print at every start (None: nothing):
    a left-out file is data the run silently lacks unless it is said."""
    if not index.skipped:
        return None
    by_reason: dict[str, list[str]] = {}
    for rel, reason in index.skipped:
        by_reason.setdefault(re.split(r"[:;(]", reason)[0].strip(), []).append(rel)
    return (f"--skip-bad: {len(index.skipped)} image file(s) of {index.root} left out:\n"
            + "\n".join(f"  {reason} ({len(rels)}): {_listed(rels)}" for reason, rels in by_reason.items()))


def in_classes(index: DatasetIndex, classes) -> DatasetIndex:
    """``index`` with its labels mapped by name into ``classes``, a superset of its own (the
    teachers' classes). Its fingerprint is not the data's: stores record the original index's."""
    position = {str(c): i for i, c in enumerate(classes)}
    unknown = [c for c in index.classes if c not in position]
    if unknown:
        raise DatasetError(f"class(es) {unknown[:5]} of {index.root} are not among the {len(position)} "
                           "classes they are to be mapped into")
    ids = np.asarray([position[c] for c in index.classes], dtype=np.int64)
    labels = ids[index.labels]
    labels.setflags(write=False)
    return replace(index, labels=labels, classes=tuple(map(str, classes)))


def class_sources(data: str | Path, index: DatasetIndex, extra: int, show: int = 5) -> str:
    """DATA's classes with their image counts, and where its ``extra`` rarest classes come from: a
    misspelt label in a CSV, or a stray folder, makes a class of its own, which a teacher with the
    intended classes then refuses as a class-count mismatch."""
    counts = np.bincount(index.labels, minlength=len(index.classes))
    listed = ", ".join(f"{c} ({n})" for c, n in list(zip(index.classes, counts))[:50])
    lines = [f"DATA {data} has {len(index.classes)} classes (images each): {listed}"
             + (", ..." if len(index.classes) > 50 else "")]
    rare = sorted(np.argsort(counts, kind="stable")[:max(extra, 0)])
    if not rare:
        return lines[0]
    if Path(data).suffix.lower() == ".csv":
        names, _, ids, rows = _read_csv(Path(data).absolute())
        for c in rare:
            at = [rows[i] for i, k in enumerate(ids) if names[k] == index.classes[c]]
            lines.append(f"class {index.classes[c]!r} comes from line(s) {', '.join(map(str, at[:show]))}"
                         f"{', ...' if len(at) > show else ''} of {data}")
    else:
        lines += [f"class {index.classes[c]!r} is the folder {index.root / index.classes[c]}" for c in rare]
    return "\n".join(lines) + f"\nif these {len(rare)} class(es) are not meant to be classes, fix or remove them"


def _scan_folder(root: Path) -> tuple[list[str], list[str], list[int], list[Path]]:
    """torchvision's find_classes + make_dataset order, minus hidden files and folders.

    A folder with subfolders is an ImageFolder (one subfolder per class); image files at its root
    are left out, as torchvision's ImageFolder leaves them, and named in one warning line (a stray
    ``preview.jpg`` must not turn a dataset unlabelled). A folder of image files and no subfolders
    is unambiguously unlabelled: its images are indexed without classes, labels -1.
    """
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except OSError as err:
        _raise_unreadable(err)
    loose = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes and loose:
        return [], loose, [-1] * len(loose), []
    if not classes:
        raise DatasetError(f"DATA folder {root} has no image files ({', '.join(IMG_EXTENSIONS)}) and no "
                           "class subfolders; expected images (unlabelled) or the ImageFolder layout "
                           "DATA/<class>/<image>")
    if loose:
        print(f"mealv2: warning: DATA {root}: {len(loose)} image file(s) at its root, outside the class folders, "
              f"are left out (as torchvision's ImageFolder leaves them): {_listed(loose)}; if DATA's images "
              f"have no classes, list them in a CSV with only a 'path' column", file=sys.stderr)

    relpaths, labels, class_dirs, empty = [], [], [], []
    seen = {os.path.realpath(root): "DATA itself"}
    for c, name in enumerate(classes):
        class_dir = root / name
        class_dirs.append(class_dir)
        found = _images_under(root, class_dir, seen)
        relpaths += found
        labels += [c] * len(found)
        if not found:
            empty.append(str(class_dir))
    if empty:
        raise DatasetError(f"class folder(s) with no image files ({', '.join(IMG_EXTENSIONS)}): "
                           f"{', '.join(empty)}; every class needs at least one image because "
                           "class ids must match the teachers'")
    return classes, relpaths, labels, class_dirs


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _images_under(root: Path, folder: Path, seen: dict[str, str]) -> list[str]:
    """Posix paths relative to ``root`` of the images in ``folder`` and below, sorted by folder then name.

    Symlinked folders are followed; ``seen`` (real path: where it was met) refuses one folder met
    twice: a loop (``class_0/loop -> ..``) would index the other classes' images again as this class."""
    walked = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise_unreadable, followlinks=True):
        real, rel = os.path.realpath(dirpath), PurePath(os.path.relpath(dirpath, root)).as_posix()
        if real in seen:
            raise DatasetError(f"DATA {root}: folder {rel} is {seen[real]} again (both are {real}): a symlink "
                               f"loop, or a second link to one folder, would index the same images again, under "
                               f"class {PurePath(rel).parts[0]!r}; remove the symlink")
        seen[real] = f"folder {rel}"
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        walked.append((dirpath, filenames))
    return [PurePath(os.path.relpath(dirpath, root), f).as_posix()
            for dirpath, filenames in sorted(walked) for f in sorted(filenames) if _is_image(f)]


def _raise_unreadable(err: OSError):
    raise DatasetError(f"cannot read folder {err.filename}: {err.strerror or err}") from err


def _read_csv(csv_path: Path) -> tuple[list[str], list[str], list[int], list[int]]:
    """Rows in file order; classes sorted, numerically when every label is an integer.

    Without a 'label' column the images are unlabelled: no classes, labels -1."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if "path" not in header:
                raise DatasetError(f"CSV {csv_path}: header must have a column 'path' (and 'label' for "
                                   f"labelled images), found {header}")
            ip, il = header.index("path"), header.index("label") if "label" in header else None
            paths, names, lines = [], [], []
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if any("\n" in cell or "\r" in cell for cell in row):   # no path or class name spans lines
                    raise DatasetError(f"CSV {csv_path} line {start}: a quote (\") opened on this line is not "
                                       f"closed, so the field runs on over lines {start}-{end}; close or remove "
                                       f"the quote")
                if not any(cell.strip() for cell in row):
                    continue
                cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
                if not cells[ip]:
                    raise DatasetError(f"CSV {csv_path} line {reader.line_num}: empty path")
                if il is not None and not cells[il]:
                    raise DatasetError(f"CSV {csv_path} line {reader.line_num}: empty label "
                                       f"for {cells[ip]}; expected a class name (for unlabelled "
                                       f"images leave out the 'label' column)")
                paths.append(_posix(cells[ip]))
                names.append(cells[il] if il is not None else None)
                lines.append(reader.line_num)
    except OSError as err:
        raise DatasetError(f"cannot read CSV {csv_path}: {err.strerror or err}") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"CSV {csv_path} is not a readable UTF-8 CSV: {err}") from err
    if not paths:
        raise DatasetError(f"CSV {csv_path} has a header but no rows")
    _refuse_repeated_rows(csv_path, paths, names, lines)
    if il is None:
        return [], paths, [-1] * len(paths), lines

    unique = set(names)
    try:
        classes = sorted(unique, key=lambda s: (int(s), s))
    except ValueError:
        classes = sorted(unique)
    class_id = {name: c for c, name in enumerate(classes)}
    return classes, paths, [class_id[n] for n in names], lines


def _refuse_repeated_rows(csv_path: Path, paths: list[str], names: list, lines: list[int]) -> None:
    """A file listed twice is seen twice per pass, or under two labels: refused, naming the lines."""
    rows: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        rows.setdefault(path, []).append(i)
    repeated = [(path, at) for path, at in rows.items() if len(at) > 1]
    if not repeated:
        return
    shown = [f"{path}: lines {', '.join(str(lines[i]) for i in at[:5])}"
             + (f" (labels {', '.join(names[i] for i in at[:5])})" if names[at[0]] is not None else "")
             + (f" and {len(at) - 5} more rows" if len(at) > 5 else "")
             for path, at in repeated[:10]]
    more = f"\n  ... and {len(repeated) - 10} more" if len(repeated) > 10 else ""
    raise DatasetError(f"CSV {csv_path} lists {len(repeated)} file(s) on more than one row:\n  " + "\n  ".join(shown)
                       + more + "\nKeep one row per file, with its one label")


def _posix(path: str) -> str:
    """``PurePath(path).as_posix()``, without building a PurePath for a path that is already in that
    form: the cost of a warm start on a 1.28 M-row CSV was mostly PurePath."""
    if not path or "//" in path or "/./" in path or path.startswith("./") or path.endswith(("/", "/.")) or path == ".":
        return PurePath(path).as_posix()
    return path


def probe_images(paths: list[str], workers: int = 8, progress: bool = False) -> list[tuple[int, int, str | None]]:
    """``_probe`` of every path, in order, on ``workers`` threads: the pass an uncached index makes."""
    return _map_files(_probe, paths, workers, progress, "image headers")


def image_crcs(index: DatasetIndex, workers: int = 8, progress: bool = False) -> np.ndarray:
    """(N,) uint32: CRC32C of every image file's bytes, as the loaders compute them while reading."""
    paths = [str(index.path(i)) for i in range(len(index))]
    return np.asarray(_map_files(_file_crc, paths, workers, progress, "image checksums"), dtype=np.uint32)


def _file_crc(path: str) -> int:
    with open(path, "rb") as f:
        return crc32c.crc32c(f.read())


def _stat_all(paths: list[str], workers: int, progress: bool) -> np.ndarray:
    """(N, 2) int64: each file's (size, mtime_ns); (-1, -1) where it cannot be stat-ed."""
    return np.asarray(_map_files(_size_and_mtime, paths, workers, progress, "file sizes and times"),
                      dtype=np.int64).reshape(-1, 2)


def _size_and_mtime(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _map_files(fn, paths: list[str], workers: int, progress: bool, what: str) -> list:
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    out = []
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(paths), desc=f"dataset index: {what}", unit="file", disable=not progress) as bar:
        for done in pool.map(lambda ps: [fn(p) for p in ps], chunks):
            out += done
            bar.update(len(done))
    return out


# ---- index cache --------------------------------------------------------------------------------
# A built index is saved under the cache folder, one file per (DATA path, skip_bad), keyed by the
# listing it was built from: scan result (classes, relpaths, labels) and every file's size and
# mtime_ns. Any change rebuilds it; a file that fails its SHA-256 is rebuilt, never trusted.

def cache_dir() -> Path:
    """``$MEALV2_CACHE/index``, by default ``~/.cache/mealv2/index`` (never inside the data)."""
    return cache_root() / "index"


def cache_file(data: str | Path, skip_bad: bool) -> Path:
    """Where the index of ``data`` is cached: named by a hash of its absolute path."""
    name = hashlib.sha256(f"{Path(data).absolute()}\0skip_bad={skip_bad}".encode()).hexdigest()[:32]
    return cache_dir() / f"{name}.index"


def _listing_key(data: Path, skip_bad: bool, classes, relpaths, labels, stats: np.ndarray) -> str:
    h = hashlib.sha256(f"mealv2-index-cache-v{_CACHE_VERSION}\0{data.absolute()}\0{skip_bad}\0".encode())
    h.update(json.dumps(list(classes)).encode())
    h.update(_join(relpaths))
    h.update(np.asarray(labels, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(stats, dtype="<i8").tobytes())
    return h.hexdigest()


def _join(relpaths) -> bytes:
    return "\0".join(relpaths).encode("utf-8", "surrogateescape")


def _split(blob: bytes, count: int) -> tuple[str, ...]:
    """The ``count`` paths :func:`_join` joined into ``blob``."""
    return tuple(blob.decode("utf-8", "surrogateescape").split("\0")) if count else ()


def _save_cache(path: Path, key: str, index: DatasetIndex) -> None:
    """Checksummed file, written whole and durably (common/store/files.py): readers see all of it or none."""
    meta = {"key": key, "fingerprint": index.fingerprint, "classes": list(index.classes),
            "skipped": [list(s) for s in index.skipped]}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), labels=index.labels, sizes=index.sizes,
             relpaths=np.frombuffer(_join(index.relpaths), np.uint8))
    body = buf.getvalue()
    try:
        write_file(path, hashlib.sha256(body).digest() + body)
    except OSError as err:   # a read-only or full cache folder costs the next start time, not this run
        print(f"mealv2: warning: cannot write the dataset index cache {path} ({err.strerror or err}); "
              "the next start reads every image header again (set MEALV2_CACHE to a writable folder)",
              file=sys.stderr)


def _load_cache(path: Path, root: Path, key: str | None) -> DatasetIndex | None:
    """The cached index if ``path`` is intact and (when ``key`` is given) was built from that listing."""
    try:
        raw = path.read_bytes()
        body = raw[32:]
        if hashlib.sha256(body).digest() != raw[:32]:
            return None
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if key is not None and meta["key"] != key:
                return None
            labels, sizes, blob = z["labels"], z["sizes"], z["relpaths"].tobytes()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):   # missing, damaged or not ours
        return None
    relpaths = _split(blob, len(labels))
    labels.setflags(write=False)
    sizes.setflags(write=False)
    index = DatasetIndex(root=root, relpaths=relpaths, labels=labels, classes=tuple(meta["classes"]),
                         sizes=sizes, skipped=tuple(tuple(s) for s in meta["skipped"]))
    index.__dict__["fingerprint"] = meta["fingerprint"]   # cached_property's slot: sha256 of the content above
    return index


def build_index_shared(data: str | Path, info, *, skip_bad: bool = False, workers: int = 8,
                       progress: bool = False) -> DatasetIndex:
    """``build_index(cache=True)`` for every rank of a torchrun job at the cost of one.

    Rank 0 builds the index (or loads it from the cache) while the others wait; they then
    load rank 0's cache file, and take it only if its fingerprint is rank 0's. A rank that
    cannot read it (a node-local cache on another node, an unwritable cache folder) builds
    the index itself, and the ranks then compare fingerprints: a rank that sees other files
    (another copy of DATA on its node) would train on other images or hang DDP, so every rank
    refuses with one message. ``info``: a ``distributed.DistInfo``; errors are raised on every rank.
    """
    index = error = outcome = None
    if info.is_main:
        try:
            index = build_index(data, skip_bad=skip_bad, workers=workers, cache=True, progress=progress)
            outcome = (index.fingerprint, None)
        except MealV2Error as err:
            error, outcome = err, (None, str(err))   # a message: BadImagesError cannot be unpickled
    fingerprint, failure = info.broadcast_object(outcome)
    if error is not None:
        raise error
    if failure is not None:
        raise DatasetError(failure)
    if index is None:
        path = Path(data)
        root = path.absolute() if path.is_dir() else path.absolute().parent
        index = _load_cache(cache_file(path, skip_bad), root, None)
        if index is None or index.fingerprint != fingerprint:
            try:
                index = build_index(path, skip_bad=skip_bad, workers=workers, cache=True)
            except MealV2Error as err:
                index = err
    seen = info.gather_object(str(index) if isinstance(index, MealV2Error) else (index.fingerprint, len(index)))
    failed = [(r, s) for r, s in enumerate(seen) if isinstance(s, str)]
    if failed:
        raise DatasetError(f"DATA {data}: rank {failed[0][0]} cannot index it: {failed[0][1]}")
    other = [f"rank {r}: {n} images, fingerprint {fp[:16]}" for r, (fp, n) in enumerate(seen) if fp != fingerprint]
    if other:
        raise DatasetError(f"DATA {data} differs between ranks: rank 0 has {seen[0][1]} images, fingerprint "
                           f"{fingerprint[:16]}; " + "; ".join(other) + ". Every rank must see the same files "
                           "(the same DATA on a shared filesystem, or identical copies)")
    return index


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
