"""The label store: the one module that knows its schema (format ``mealv2-labels`` v5).

A zarr v3 group on local disk or in S3, read from either or from any URL; every file or object
is read and written through common/remote.py's objects (docs/STORE.md documents the format for
plain zarr readers)::

    labels      (N,)           int32   dataset class ids, for inspect's agreement figure
    crc32c      (N,)           uint32  CRC32C of each image file's bytes as labelled
    boxes       (R, N, C, 4)   uint16  crop (y, x, h, w) on a 1023-step relative grid
    flips       (R, N, C)      uint8   1 = mirrored
    ids         (R, N, C, k)   uint16  top-k class ids, descending probability
    probs       (R, N, C, k+1) uint8   round(127 * sqrt(p)) of those classes, then of the leftover mass
    done        (R, S)         uint8   1 once shard s of round r is fully written
    paths       (bytes,)       uint8   the images' relative paths, UTF-8, one per line (to name what
                                       changed when a dataset's fingerprint differs; optional)

The round is the leading axis so a training epoch reads its round as one slab. Data
chunks are (1 round, ``shard_size`` images), each with its CRC32C. They are written twice:

* while labelled, in the ``staged/`` arrays (same chunks and codecs, one file per array, round and
  shard): writers on different shards never touch the same file, and ``staged/done`` has one chunk
  per (round, shard), written only after the shard's data. A kill loses at most the shards in flight.
* once every shard of a round is labelled, :meth:`LabelStore.pack` (one process, the lock holder)
  joins that round's staged chunk files, bytes unchanged, into one object per array: a shard of
  zarr's sharding codec spanning the whole round, inner chunks = the staged chunks. Its row of the
  main ``done`` array (one object) is the commit; then the staged files go. A finished store is
  a few objects per round, not arrays x shards x rounds files, and zarr readers see plain arrays.

Every chunk of a completed shard exists (as a file or in its round's object), even one equal to
the fill value.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import zarr
from filelock import FileLock
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from ..errors import MealV2Error
from .faults import fault_point
from .locks import hold_lock, lock_path_beside
from .lease import Lease, hold_lease
from .objects import LocalObjects, is_url, open_objects

FORMAT = "mealv2-labels"
# v5: a round of an array is one object (zarr's sharding codec), shards are staged under `staged/` while
# labelled and packed once their round is complete (the module docstring).
# v4: a SHA-256 of each array's metadata (its zarr.json: shape, chunks, codecs, transpose order, dtype),
# which v3 stores lack, so they cannot be verified. v3: CRC32C of every image's bytes (stage 2 refuses an
# image changed since labelling) and the teachers' precision. v2: 7-bit square-root codes plus a code for
# the leftover mass, per-array codecs. v1 (8-bit codes, no leftover code) was never released. Older
# stores are refused.
VERSION = 5
PROB_LEVELS = 127        # probs hold round(PROB_LEVELS * sqrt(p)); common/targets.py encodes and decodes
ATTR_KEY = "mealv2"
DIGEST_KEY = "mealv2_sha256"
ARRAYS_KEY = "mealv2_arrays_sha256"   # array name: SHA-256 of its metadata (_array_meta_digest)
RUNS_KEY = "mealv2_runs"   # what each labelling command took (record_run): history, outside the digest

# Keys that must agree between a store and a new labelling command for it to resume or append.
_IDENTITY_KEYS = ("format", "version", "prob_levels", "classes", "topk", "temperature", "seed", "crops_per_image",
                  "shard_size", "crop", "teachers", "teacher_precision", "dataset")
SHARD_ARRAYS = ("boxes", "flips", "ids", "probs", "crc32c")   # written per (round, shard); crc32c per shard
ROUND_ARRAYS = ("boxes", "flips", "ids", "probs", "done")       # leading axis: rounds (grows on append)
STAGED = "staged"   # group of the arrays written per shard while labelled, packed per round
STAGED_ARRAYS = tuple(f"{STAGED}/{name}" for name in (*ROUND_ARRAYS, "crc32c"))
DATA_ARRAYS = ROUND_ARRAYS[:-1]   # per-crop arrays, whose bytes per crop are counted
ARRAYS = (*ROUND_ARRAYS, "labels", "crc32c", *STAGED_ARRAYS, "paths")   # paths: optional (index without paths)
REQUIRED_ARRAYS = ARRAYS[:-1]
INDEX_ENTRY = 16    # a sharding index entry: (offset, nbytes), two little-endian uint64s


class StoreError(MealV2Error):
    """A store that cannot be used as asked; the message names the store and the value."""


@dataclass
class RoundData:
    """One label round in RAM: everything stage 2 needs for an epoch."""

    boxes: np.ndarray   # (N, C, 4) uint16
    flips: np.ndarray   # (N, C) uint8
    ids: np.ndarray     # (N, C, k) uint16
    probs: np.ndarray   # (N, C, k + 1) uint8: top-k codes, then the leftover mass's (common/targets.py)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.boxes, self.flips, self.ids, self.probs))


def _codecs():
    # bitshuffle + zstd turns the unused high bits of 10-bit boxes and 7-bit codes into almost nothing.
    return [BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle"), Crc32cCodec()]


def _encoding(name: str, crops: int) -> dict:
    """Codecs of one per-crop array (keyword arguments of ``zarr.Group.create_array``).

    Chosen on an ImageNet-like synthetic ensemble (1000 classes, k=5; `mealv2 bench label`,
    docs/STORE.md). ``ids`` are laid out (image, rank, crop) inside a chunk: with several crops
    per image, which mostly share their top classes, that makes runs zstd's matcher finds
    (4.6 B/crop at C=4 against 5.9 with bitshuffle); with one or two crops there are few runs
    and bitshuffle's dropping of the unused high bits wins. ``probs`` are laid out (rank, image,
    crop) so each rank's codes are compressed together. A transpose only changes the bytes
    on disk, never the array's shape; zarr.json records every codec.
    """
    if name == "ids":
        compressors = _codecs() if crops <= 2 else [ZstdCodec(level=19), Crc32cCodec()]
        return {"filters": [TransposeCodec(order=(0, 1, 3, 2))], "compressors": compressors}
    if name == "probs":
        return {"filters": [TransposeCodec(order=(0, 3, 1, 2))], "compressors": _codecs()}
    return {"compressors": _codecs()}


def _writable(arr: zarr.Array) -> zarr.Array:
    """The array with every chunk written, even one equal to the fill value (zarr skips those by
    default): a completed shard must have all its chunk files, or a deleted file would go unseen."""
    return arr.with_config({"write_empty_chunks": True})


def _digest(attrs: dict) -> str:
    return hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()


def _array_meta(objects, name: str) -> dict:
    """The parsed ``zarr.json`` of array ``name`` (``objects``: common/remote.py's, of the store); a
    missing or damaged file is named."""
    file = objects.where(f"{name}/zarr.json")
    fix = "the store cannot be read as made; restore the file from a copy of the store, or re-label into a new --out"
    try:
        meta = json.loads(objects.file(f"{name}/zarr.json").read_bytes())
    except FileNotFoundError:
        raise StoreError(f"{file} is missing: array '{name}' has no metadata; {fix}") from None
    except OSError as e:
        raise StoreError(f"{file} cannot be read ({e.strerror or e}); {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{file} is damaged (not JSON: {e}); {fix}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list) or not meta["shape"]:
        raise StoreError(f"{file} is damaged (no array shape in it); {fix}")
    return meta


def _array_meta_digest(name: str, meta: dict) -> str:
    """SHA-256 of everything in an array's metadata that decides what its chunks decode to: shape,
    chunk grid, key encoding, dtype, fill value, codecs (transpose order, compressor, checksum). The
    leading size of a per-round array is left out: an append grows it (before ``rounds_planned``,
    so a kill in between leaves it larger), and :meth:`LabelStore.open` bounds it by ``rounds_planned``."""
    if _per_round(name):
        meta = {**meta, "shape": [None, *meta["shape"][1:]]}
    return _digest(meta)


def _per_round(name: str) -> bool:
    return name.removeprefix(f"{STAGED}/") in ROUND_ARRAYS


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two attribute dicts, one line per leaf."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif _dict_list(a) and _dict_list(b) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                out += _diff(x, y, f"{prefix}{key}[{i}].")
        elif a != b:
            out.append(f"{prefix}{key}: store has {_short(a)}, this run has {_short(b)}")
    return out


def _ignore_moved_teachers(problems: list[str]) -> list[str]:
    """A teacher is its weights (SHA-256), not the path it was given by: drop a teacher's spec
    line when nothing else about it differs (a moved checkpoint), keep it to name one that does."""
    fields = [re.match(r"teachers\[(\d+)\]\.(\w+):", p) for p in problems]
    changed = {m[1] for m in fields if m and m[2] != "spec"}
    return [p for p, m in zip(problems, fields) if not (m and m[2] == "spec" and m[1] not in changed)]


def _dict_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _short(v) -> str:
    if _dict_list(v) and all("spec" in x for x in v):  # teachers: name them, not their whole record
        return f"{len(v)} teacher(s) [{', '.join(x['spec'] for x in v)}]"
    s = json.dumps(v)
    return s if len(s) <= 160 else s[:150] + "...]"


class LabelStore:
    """Open store; use :meth:`create_or_resume` to write and :meth:`open` to read."""

    fsync = True   # make each shard durable before its done mark; False only to measure what that costs
    repairs: list[str] = []   # what create_or_resume repaired
    guard = None              # raises when this process may no longer commit: its lease was lost (common/lease.py)

    def __init__(self, path: Path, group: zarr.Group, objects=None):
        self.objects = objects or LocalObjects(path)   # the store's files, or a URL's objects (common/remote.py)
        self.path = self.objects.location              # Path, or the URL
        self.name = self.objects.name
        self.group = group
        self.attrs: dict = dict(group.attrs[ATTR_KEY])

    # ---- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "LabelStore":
        objects = open_objects(path)   # a URL is read through the local cache
        path = objects.location
        if not objects.exists("zarr.json"):
            raise StoreError(f"{path}: not a label store (no zarr.json); make one with `mealv2 label`")
        try:
            group = zarr.open_group(objects.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
            attrs = group.attrs[ATTR_KEY]
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable label store metadata ({e})") from e
        if attrs.get("format") != FORMAT or attrs.get("version") != VERSION:
            raise StoreError(f"{path}: format {attrs.get('format')} v{attrs.get('version')}, "
                             f"this mealv2 reads {FORMAT} v{VERSION}; re-label the data with this mealv2's "
                             f"`mealv2 label` into a new --out (docs/STORE.md lists what each version changed)")
        if group.attrs.get(DIGEST_KEY) != _digest(attrs):
            raise StoreError(f"{path}/zarr.json: the '{ATTR_KEY}' attributes were edited after the "
                             f"store was made (SHA-256 does not match); the store cannot be trusted")
        _check_arrays(objects, group.attrs.get(ARRAYS_KEY) or {}, attrs["rounds_planned"])
        return cls(path, group, objects)

    @classmethod
    def create_or_resume(cls, path: str | Path, attrs: dict, rounds: int, labels: np.ndarray,
                         before_growing=None, relpaths: Sequence[str] | None = None) -> "LabelStore":
        """Make a new store, or reopen one made by the same teachers, data and crop settings.

        ``rounds`` larger than the store's plan appends rounds, once ``before_growing(store)``
        (the caller's last checks) has returned: a refused command leaves the store as it was.
        Smaller shrinks the plan back, down to the rounds already complete, never below. Call
        on one process only (rank 0); the others :meth:`open` it afterwards in mode ``r+``.
        ``relpaths``: the dataset's image paths, kept to name the files of a changed dataset.
        A resumed store is repaired first (:meth:`repair`; ``repairs`` says what was), then its
        labelled rounds are packed (:meth:`pack`).
        """
        objects = open_objects(path)
        path = objects.location
        attrs = {"format": FORMAT, "version": VERSION, "prob_levels": PROB_LEVELS, **attrs}
        if objects.exists("zarr.json"):
            store = cls.open(path, mode="r+")
            problems = _diff({k: store.attrs.get(k) for k in _IDENTITY_KEYS},
                             {k: attrs.get(k) for k in _IDENTITY_KEYS})
            problems = _ignore_moved_teachers(problems)
            if any(p.startswith("dataset.") for p in problems) and relpaths is not None:
                problems.append(store.dataset_changes(relpaths))
            if problems:
                raise StoreError(f"{path} was made with other settings; refusing to mix labels:\n  "
                                 + "\n  ".join(problems)
                                 + "\nUse a new --out, or the settings the store was made with.")
            store.repairs = store.repair(labels, relpaths)   # before anything reads the done marks
            store.pack()   # rounds a killed run labelled in full but did not pack
            planned, complete = store.rounds_planned, store.rounds_complete()
            if rounds < complete:
                raise StoreError(f"{path}: store plans {planned} rounds, --rounds {rounds} would drop some of its "
                                 f"{complete} complete rounds; pass --rounds {complete} (or more, to append)")
            if rounds > planned and before_growing is not None:
                before_growing(store)
            if rounds != planned or store.group[f"{STAGED}/done"].shape[0] != planned:   # or a resize was cut short
                store._resize(rounds)
            return store
        return cls._create(objects, attrs, rounds, labels, relpaths)

    @classmethod
    def _create(cls, objects, attrs: dict, rounds: int, labels: np.ndarray,
                relpaths: Sequence[str] | None) -> "LabelStore":
        n, c, k = attrs["dataset"]["num_images"], attrs["crops_per_image"], attrs["topk"]
        s = attrs["shard_size"]
        attrs = {**attrs, "rounds_planned": rounds}
        tmp = objects.build_folder()
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w")
        staged = group.create_group(STAGED)
        id_dtype = "uint16" if len(attrs["classes"]) <= 65536 else "int32"
        shards, span = num_shards(n, s), num_shards(n, s) * s   # a packed object spans the round
        for name, tail, dtype in (("boxes", (c, 4), "uint16"), ("flips", (c,), "uint8"),
                                  ("ids", (c, k), id_dtype), ("probs", (c, k + 1), "uint8")):
            for where, packed in ((group, (1, span, *tail)), (staged, None)):
                where.create_array(name, shape=(rounds, n, *tail), chunks=(1, s, *tail), shards=packed,
                                   dtype=dtype, fill_value=0, **_encoding(name, c))
        for where, packed in ((group, (1, shards)), (staged, None)):
            where.create_array("done", shape=(rounds, shards), chunks=(1, 1), shards=packed, dtype="uint8",
                               fill_value=0, compressors=_codecs())
            where.create_array("crc32c", shape=(n,), chunks=(s,), shards=packed and (span,), dtype="uint32",
                               fill_value=0, compressors=[ZstdCodec(level=3), Crc32cCodec()])
        _writable(group.create_array("labels", shape=(n,), chunks=(max(n, 1),), dtype="int32", fill_value=0,
                                     compressors=_codecs()))[:] = labels
        if relpaths is not None:
            _write_paths(group, relpaths)
        arrays = {name: _array_meta_digest(name, _array_meta(LocalObjects(tmp), name)) for name in ARRAYS
                  if name in group}
        group.attrs.update({ATTR_KEY: attrs, DIGEST_KEY: _digest(attrs), ARRAYS_KEY: arrays})
        try:
            objects.publish(tmp)   # the store appears under its name only once its metadata is complete
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(objects.location, mode="r+")

    def _resize(self, rounds: int) -> None:
        """Plan ``rounds`` rounds. Growing resizes the arrays, then records the plan; shrinking
        records the plan, then drops the rounds past it. Either way a kill in between leaves a
        store whose plan its arrays hold, completed by the next command (a round's labels are a
        pure function of the seed, so chunks left of a dropped round are still its labels)."""
        def arrays():
            for name in (*ROUND_ARRAYS, *(n for n in STAGED_ARRAYS if _per_round(n))):
                arr = self.group[name]
                arr.resize((rounds, *arr.shape[1:]))
                fault_point("append")

        def plan():
            self.attrs["rounds_planned"] = rounds
            self.group.attrs.update({ATTR_KEY: self.attrs, DIGEST_KEY: _digest(self.attrs)})

        for step in (arrays, plan) if rounds > self.rounds_planned else (plan, arrays):
            step()

    @property
    def digest(self) -> str:
        """SHA-256 of the store's attributes: what it was made from and how."""
        return self.group.attrs[DIGEST_KEY]

    def record_run(self, run: dict) -> None:
        """Add ``run`` (what a labelling command took: crops, seconds, device) to the attribute
        ``mealv2_runs``. It is history, not what the labels are, so it stays outside the digest: a resumed
        store keeps an uninterrupted one's digest, and runs trained from it their resume check."""
        self.group.attrs.update({RUNS_KEY: [*self.runs(), run]})

    def runs(self) -> list[dict]:
        """The labelling runs recorded, oldest first; none in a store made before they were."""
        return list(self.group.attrs.get(RUNS_KEY, []))

    # ---- geometry ----------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self.attrs["dataset"]["num_images"]

    @property
    def shard_size(self) -> int:
        return self.attrs["shard_size"]

    @property
    def num_shards(self) -> int:
        return num_shards(self.num_images, self.shard_size)

    @property
    def rounds_planned(self) -> int:
        return self.attrs["rounds_planned"]

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    # ---- writing -----------------------------------------------------------------------
    def done_mask(self, shards: Sequence[int] | None = None) -> np.ndarray:
        """(R, S) bool: which shards are labelled, staged or packed; (R, len(shards)) for ``shards`` only.
        Staged marks are read for the rounds not packed only (a finished store has none to read)."""
        done = self._marks("done", shards)
        rows = np.flatnonzero(~done.all(axis=1))
        if len(rows):
            done[rows] |= self._marks(f"{STAGED}/done", shards, rows)
        return done

    def packed(self) -> np.ndarray:
        """(R,) bool: the rounds packed into one object per array (their row of the main ``done``)."""
        return self._marks("done").all(axis=1)

    def _marks(self, name: str, shards: Sequence[int] | None = None, rows=None) -> np.ndarray:
        done = self.group[name]
        rows = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        shards = slice(None) if shards is None else np.asarray(shards, dtype=np.int64)
        try:
            return done.get_orthogonal_selection((rows, shards)).astype(bool)
        except Exception as e:   # zarr reports a checksum mismatch or a bad codec stream this way
            raise StoreError(f"{self.path}: the shards' done marks (array `{name}`) cannot be read "
                             f"({type(e).__name__}: {e}); the store is damaged: re-run the store's `mealv2 label` "
                             f"command, which drops damaged marks and labels their shards again:\n  "
                             f"{self.label_command()}") from e

    @property
    def id_dtype(self) -> np.dtype:
        return self.group["ids"].dtype

    def write_shard(self, round_: int, shard: int, boxes, flips, ids, probs, crcs, names=None) -> None:
        """Write one shard's data into the staged arrays, then mark it labelled (never the other way round).

        ``crcs`` are the CRC32C of the images' bytes as this round read them; a shard that
        another round already completed must have read the same bytes (``names``: the images'
        paths, to name a changed one)."""
        a, b = self.shard_range(shard)
        crcs = np.asarray(crcs, dtype=np.uint32)
        keys = self._chunk_keys(round_, [shard])
        if self.done_mask([shard]).any():     # R marks, not the whole array
            changed = np.flatnonzero(self._crc_array()[a:b] != crcs)
            if len(changed):
                raise self.images_changed(a + changed, crcs[changed], names)
            keys = [key for key in keys if not key.startswith(f"{STAGED}/crc32c/")]   # kept as they are
        else:
            _writable(self.group[f"{STAGED}/crc32c"])[a:b] = crcs
        folders = self.objects.folders_to_sync(keys)
        writing = self.path
        try:
            for i, (name, values) in enumerate((("boxes", boxes), ("flips", flips), ("ids", ids), ("probs", probs))):
                writing = self.objects.where(f"{STAGED}/{name}")
                if i:
                    fault_point("chunk_write")     # some of the shard's arrays written, not all
                _writable(self.group[f"{STAGED}/{name}"])[round_, a:b] = values
            writing = self.path
            if self.fsync:   # as a database before its commit record: a shard marked done has its data
                self.objects.sync(keys, folders)
        except OSError as e:   # zarr's and fsync's errors often name no file
            raise StoreError(f"{e.filename or writing}: cannot write round {round_} shard {shard} of {self.path} "
                             f"({e.strerror or e}; {self.objects.free_space()}); "
                             f"free some space and re-run the same command: it resumes with this shard") from e
        fault_point("shard_mark")              # data written, shard not yet marked done
        self._check_guard()
        _writable(self.group[f"{STAGED}/done"])[round_, shard] = 1   # not synced: a lost mark only redoes the shard

    def pack(self) -> list[int]:
        """Pack every round whose shards are all labelled and staged: join each array's staged chunk
        files, bytes unchanged, into the round's object (zarr's sharding format), make them durable,
        commit by writing the round's row of the main ``done``, then delete the staged files. A kill
        anywhere leaves the round staged (packed again next time) or committed (its staged leftovers
        go next time). One process, holding the writer lock; returns the rounds packed."""
        self.objects.refresh()   # the shards other ranks wrote
        packed, labelled = self.packed(), self.done_mask().all(axis=1)
        rounds = [r for r in range(len(packed)) if labelled[r] and not packed[r]]
        for r in rounds:   # the images' CRC32Cs are packed with the first round (all shards then have them)
            for name in (*DATA_ARRAYS, *([] if packed.any() else ["crc32c"])):
                self._pack_object(name, r)
            fault_point("pack")                # objects written, round not committed
            self._check_guard()
            _writable(self.group["done"])[r] = 1
            if self.fsync:                     # the staged files are deleted next
                self.objects.sync([chunk_key("done", 2, r, 0)])
            packed[r] = True
        # The staged chunks of packed rounds, found in one listing (at a URL, one request per 1,000 keys
        # instead of one per array and round): the folders `STAGED/ARRAY/c/ROUND` and `STAGED/crc32c/c`.
        staged = {"/".join(key.split("/")[:depth]) for key in self.objects.keys(STAGED) for depth in (3, 4)}
        leftovers = [f"{STAGED}/{name}/c/{r}" for r in np.flatnonzero(packed) for name in ROUND_ARRAYS]
        for prefix in [*leftovers, *([f"{STAGED}/crc32c/c"] if packed.any() else [])]:
            if prefix in staged:
                self.objects.delete_tree(prefix)
        return rounds

    def _pack_object(self, name: str, round_: int, threads: int = 16) -> None:
        ndim = self.group[name].ndim
        keys = [chunk_key(f"{STAGED}/{name}", ndim, round_, s) for s in range(self.num_shards)]
        with ThreadPoolExecutor(threads) as pool:   # at a URL, the other ranks' chunks are downloaded at once
            problems = list(pool.map(self._check_chunk, keys))
        for key, problem in zip(keys, problems):
            if problem:
                raise StoreError(f"{self.objects.where(key)}: {problem}; round {round_} cannot be packed. Re-run the "
                                 f"store's `mealv2 label` command, which labels such shards again:\n  "
                                 f"{self.label_command()}")
        parts = [self.objects.file(key).read_bytes() for key in keys]
        sizes = np.array([len(p) for p in parts], dtype="<u8")
        index = np.stack([np.cumsum(sizes) - sizes, sizes], axis=1).astype("<u8").tobytes()
        target = chunk_key(name, ndim, round_, 0)
        try:
            self.objects.write(target, b"".join([*parts, index, crc32c.crc32c(index).to_bytes(4, "little")]),
                               self.fsync)
        except OSError as e:
            raise StoreError(f"{self.objects.where(target)}: cannot pack round {round_} of {self.path} "
                             f"({e.strerror or e}; {self.objects.free_space()}, the object takes "
                             f"{sum(len(p) for p in parts) / 2**20:.1f} MiB); its shards are kept: free some space "
                             f"and re-run the same command, which packs it") from e

    def _check_guard(self) -> None:
        if self.guard is not None:
            self.guard()

    def _crc_array(self) -> zarr.Array:
        """The images' CRC32Cs: packed with the first packed round, staged until then."""
        return self.group["crc32c" if self.packed().any() else f"{STAGED}/crc32c"]

    # ---- reading -----------------------------------------------------------------------
    def rounds_complete(self) -> int:
        """Number of leading rounds that are complete: every shard labelled and the round packed."""
        full = self.packed()
        return int(np.argmin(full)) if not full.all() else len(full)

    @property
    def complete(self) -> bool:
        return self.rounds_complete() == self.rounds_planned

    def read_round(self, round_: int) -> RoundData:
        """Load one complete round into RAM in one read per array (one object each)."""
        if not self._marks("done")[round_].all():
            raise StoreError(f"{self.path}: round {round_} is not complete; finish it by re-running "
                             f"the same `mealv2 label` command")
        missing = self.missing_chunks(round_)
        if missing:
            raise StoreError(f"{self.path}: chunk files missing although marked done: {missing[:5]}")
        g = self.group
        return RoundData(boxes=g["boxes"][round_], flips=g["flips"][round_],
                         ids=g["ids"][round_], probs=g["probs"][round_])

    def labels(self) -> np.ndarray:
        return self.group["labels"][:]

    def relpaths(self) -> list[str] | None:
        """The labelled images' relative paths, None for a store made before they were kept (or
        whose copy is damaged: `verify` names it, `label` rewrites it)."""
        try:
            joined = self.group["paths"][:].tobytes().decode()
        except Exception:   # absent (older store), or a damaged chunk
            return None
        return joined.split("\n") if self.num_images else []

    def dataset_changes(self, relpaths: Sequence[str], show: int = 5) -> str:
        """What differs between the images the store was labelled from and ``relpaths``, by path."""
        stored = self.relpaths()
        if stored is None:
            return "(this store has no readable copy of its images' paths: the files that changed cannot be named)"
        old, new = set(stored), set(relpaths)
        gone, added = [p for p in stored if p not in new], [p for p in relpaths if p not in old]
        lines = [f"{what} {len(found)} image(s): {', '.join(found[:show])}{', ...' if len(found) > show else ''}"
                 for what, found in (("DATA lacks", gone), ("DATA adds", added)) if found]
        if not lines:
            moved = next((i for i, (a, b) in enumerate(zip(stored, relpaths)) if a != b), None)
            lines.append(f"the same {len(stored)} paths, " + (f"in another order (first at #{moved}: {relpaths[moved]})"
                         if moved is not None else "so their labels (classes) or image sizes differ"))
        return "dataset changes since labelling: " + "; ".join(lines)

    def crcs(self) -> np.ndarray:
        """(N,) uint32: CRC32C of each image's bytes when it was labelled."""
        return self._crc_array()[:]

    def changed_images(self, crcs: np.ndarray) -> np.ndarray:
        """Ids of the images whose bytes (``crcs``: every image's CRC32C) differ from those a completed
        round labelled."""
        labelled = np.repeat(self.done_mask().any(axis=0), self.shard_size)[:self.num_images]
        return np.flatnonzero(labelled & (self.crcs() != np.asarray(crcs, dtype=np.uint32)))

    def images_changed(self, ids: np.ndarray, crcs: np.ndarray, names=None) -> StoreError:
        """The refusal of images ``ids`` (now ``crcs``) changed since labelled, by path when ``names``."""
        stored = self._crc_array().get_coordinate_selection(np.asarray(ids, dtype=np.int64))
        first = [f"{names[i] if names is not None else f'image {i}'} (CRC32C {crc:08x}, the store has {old:08x})"
                 for i, crc, old in list(zip(ids, crcs, stored))[:5]]
        return StoreError(f"{self.path}: {len(ids)} image(s) changed since earlier rounds were labelled: "
                          + ", ".join(first) + (", ..." if len(ids) > 5 else "")
                          + "; labels of one image must describe one set of pixels. Restore the images, or "
                            "label into a new --out")

    def missing_chunks(self, round_: int) -> list[str]:
        """The objects of packed round ``round_`` that are absent (zarr would read them as zeros)."""
        return [key for key in self._object_keys(round_) if not self.objects.exists(key)]

    def _object_keys(self, round_: int, names=DATA_ARRAYS) -> list[str]:
        return [chunk_key(name, self.group[name].ndim, round_, 0) for name in names]

    def _chunk_keys(self, round_: int, shards) -> list[str]:
        """The staged chunk files of (round, shard) for ``shards``, array by array."""
        ndims = {name: len(self.group[name].shape) for name in SHARD_ARRAYS}   # one metadata read per array
        return [chunk_key(f"{STAGED}/{name}", ndims[name], round_, int(s)) for name in SHARD_ARRAYS for s in shards]

    def bytes_on_disk(self) -> int | None:
        """The store's bytes; None for a URL whose host cannot list its objects."""
        return self.objects.size()

    def data_bytes(self) -> int | None:
        """Bytes of the objects and staged chunk files of the per-crop arrays (what bytes-per-crop
        figures divide); the arrays' few-hundred-byte zarr.json metadata files are not counted. None as
        bytes_on_disk."""
        sizes = [self.objects.size(f"{where}{name}/c") for name in DATA_ARRAYS for where in ("", f"{STAGED}/")]
        return None if None in sizes else sum(sizes)

    def verify(self, shards: Sequence[int] | None = None, done: np.ndarray | None = None,
               threads: int = 8) -> list[str]:
        """Every problem found in ``shards`` (default: all), each naming its place; empty when sound.

        Ranks of a job each verify a share of the shards. Completeness comes from the done marks
        (``done``: ``done_mask(shards)`` when already read) and the chunk files; integrity from
        each chunk's CRC32C trailer (the ``crc32c`` codec's; in a packed round's object, found
        through the object's index, itself under a CRC32C), checked on the raw bytes without
        decoding: damage changes the bytes, and this reads ImageNet's store in seconds where
        decoding takes minutes. zarr checks the same CRC32C on every read, so a chunk damaged
        later is still refused when its round is loaded.
        """
        shards = np.arange(self.num_shards) if shards is None else np.asarray(shards, dtype=np.int64)
        done = self.done_mask(shards) if done is None else done
        problems = [f"round {r} shard {shards[j]}: not complete ({STAGED}/done/c/{r}/{shards[j]} unset)"
                    for r, j in zip(*np.nonzero(~done))]
        if 0 in shards:   # a round labelled but not packed (a kill before its packing), said once
            problems += [f"round {r}: every shard labelled, not packed; re-run the store's `mealv2 label` command"
                         for r in np.flatnonzero(self.done_mask().all(axis=1) & ~self.packed())]
        return problems + [f"{key}: {bad[0]}" for key, bad in self._bad_chunks(shards, done, threads).items()]

    def _bad_chunks(self, shards: np.ndarray, done: np.ndarray, threads: int = 8) -> dict[str, tuple]:
        """{chunk: (problem, array, round, shard, packed)} over the data chunks of the labelled shards
        among ``shards``; a chunk of a packed round's object is named ``OBJECT[shard]``."""
        packed = self.packed()
        places = {}   # name shown: (file key, index in its object or None, array, round, shard)
        for r in range(done.shape[0]):
            for s in shards[done[r]]:
                s = int(s)
                if packed[r]:
                    places.update({f"{key}[{s}]": (key, s, key.split("/")[0], r, s) for key in self._object_keys(r)})
                else:
                    places.update({key: (key, None, key.split("/")[1], r, s) for key in self._chunk_keys(r, [s])
                                   if not (packed.any() and key.startswith(f"{STAGED}/crc32c/"))})
        if packed.any():
            key = chunk_key("crc32c", 1, 0, 0)
            places.update({f"{key}[{s}]": (key, int(s), "crc32c", None, int(s)) for s in shards})
        if 0 in shards:   # the one chunk of the per-image labels (and of the paths) goes with shard 0
            places.update({key: (key, None, key.split("/")[0], None, 0)
                           for key in (chunk_key(name, 1, 0, 0) for name in ("labels", "paths") if name in self.group)})
        with ThreadPoolExecutor(threads) as pool:
            found = pool.map(lambda p: self._check_chunk(p[0], p[1]), places.values())
            return {shown: (problem, *place[2:], place[1] is not None)
                    for (shown, place), problem in zip(places.items(), found) if problem}

    def repair(self, labels: np.ndarray, relpaths: Sequence[str] | None = None) -> list[str]:
        """Undo the done marks of labelled shards whose chunks are missing or damaged (what
        :meth:`verify` finds), so labelling redoes exactly those shards, and rewrite damaged
        per-image labels and paths; returns one line per repair. A damaged done mark counts as unset.
        A packed round with a bad chunk is unpacked: its sound chunks are staged again. A shard's
        image CRC32Cs (one chunk for all rounds) are checked by every round, so their damage redoes
        the shard in every round. Call with the writer lock held."""
        lines = [f"{key}: damaged done mark; its shard(s) will be labelled again" for key in self._drop_damaged_marks()]
        unpack: dict[int, set[int]] = {}   # packed round: its shards with a bad chunk
        packed = self.packed()
        for key, (_, array, round_, shard, _) in self._bad_chunks(np.arange(self.num_shards), self.done_mask()).items():
            if array == "labels":
                _writable(self.group["labels"])[:] = labels
            elif array == "paths" and relpaths is not None:
                _write_paths(self.group, relpaths)
            if array in ("labels", "paths"):
                lines.append(f"{key}: damaged or missing; " + ("rewritten" if array == "labels" or relpaths
                                                                 else "left (no paths given)"))
                continue
            rounds = range(self.rounds_planned) if array == "crc32c" else [round_]
            for r in rounds:
                if packed[r]:
                    unpack.setdefault(r, set()).add(shard)
                else:
                    self.group[f"{STAGED}/done"][r, shard] = 0
            lines.append(f"{key}: damaged or missing; shard {shard} of round(s) "
                         f"{', '.join(map(str, rounds))} will be labelled again")
        self._unpack(unpack, all_packed=set(unpack) == set(np.flatnonzero(packed)))
        return lines

    def _unpack(self, rounds: dict[int, set[int]], all_packed: bool) -> None:
        """Stage again the sound chunks of packed rounds ``rounds`` (round: its bad shards), then
        uncommit each round; ``all_packed``: no packed round remains, so the images' sound CRC32Cs are
        staged again first."""
        def stage(name: str, round_: int, shard: int) -> None:
            ndim = self.group[name].ndim
            self.objects.write(f"{STAGED}/{chunk_key(name, ndim, round_, shard)}",
                               _inner_chunk(self.objects.file(chunk_key(name, ndim, round_, 0)), shard, self.num_shards),
                               self.fsync)

        if all_packed and rounds:
            for s in range(self.num_shards):
                if not self._check_chunk(chunk_key("crc32c", 1, 0, 0), s):
                    stage("crc32c", 0, s)
        for r, bad in rounds.items():
            marks = sorted(set(range(self.num_shards)) - bad)
            for s in marks:
                for name in DATA_ARRAYS:
                    stage(name, r, s)
            if marks:
                _writable(self.group[f"{STAGED}/done"]).set_orthogonal_selection((r, np.array(marks)), 1)
            self.objects.delete(chunk_key("done", 2, r, 0))   # the round's commit undone

    def _drop_damaged_marks(self) -> list[str]:
        """Delete the done marks whose chunk file (or packed row) is damaged (a deleted mark reads as
        unset); their keys."""
        bad = [key for key in self.objects.keys(f"{STAGED}/done/c") if self._check_chunk(key)]
        for r in range(self.group["done"].shape[0]):
            key = chunk_key("done", 2, r, 0)
            if self.objects.exists(key) and any(self._check_chunk(key, s) for s in range(self.num_shards)):
                bad.append(key)
        for key in bad:
            self.objects.delete(key)
        return bad

    def _check_chunk(self, key: str, inner: int | None = None) -> str | None:
        """What is wrong with chunk file ``key`` (or chunk ``inner`` of object ``key``), None if sound."""
        try:
            raw = self.objects.file(key).read_bytes() if inner is None else _inner_chunk(
                self.objects.file(key), inner, self.num_shards)
        except FileNotFoundError:
            return "missing chunk file of a completed shard"
        except OSError as e:
            return f"unreadable chunk ({e.strerror or e})"
        except ValueError as e:
            return f"unreadable object ({e}: the file is damaged)"
        if len(raw) < 4 or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            return "unreadable chunk (its CRC32C does not match its bytes: the file is damaged)"
        return None

    def label_command(self) -> str:
        """The `mealv2 label` command that makes this store as it is, from its attributes (DATA left to
        fill): what repairs or completes it."""
        a = self.attrs
        crop = a["crop"]
        flags = {"-t": ",".join(t["spec"] for t in a["teachers"]), "-o": str(self.path),
                 "--rounds": a["rounds_planned"],
                 "--res": crop["res"], "--scale": ",".join(map(repr, crop["scale"])),
                 "--ratio": ",".join(map(repr, crop["ratio"])), "--crops-per-image": a["crops_per_image"],
                 "--topk": a["topk"], "--temperature": a["temperature"], "--seed": a["seed"],
                 "--shard-size": a["shard_size"], "--teacher-precision": a["teacher_precision"]}
        words = ["mealv2", "label", "DATA"] + [w for flag, value in flags.items()
                                               for w in (flag, shlex.quote(str(value)))]
        if any("=" in t["spec"] and t["output_classes"] not in (None, a["classes"]) for t in a["teachers"]):
            words += ["--classes", "FILE"]
        if a["dataset"]["skipped"]:
            words.append("--skip-bad")
        return " ".join(words)

    def remove_partial_writes(self) -> int:
        """Delete temp files a killed writer left behind (zarr writes chunks via temp + rename)."""
        return self.objects.remove_partials()


def _check_arrays(objects, digests: dict, rounds: int) -> None:
    """Every array's metadata as the store was made: an edited transpose order would replay permuted
    labels without a word, and a changed shape would fail epochs into a run."""
    for name in (*REQUIRED_ARRAYS, *(["paths"] if "paths" in digests else [])):
        meta = _array_meta(objects, name)
        if digests.get(name) != _array_meta_digest(name, meta):
            raise StoreError(f"{objects.where(f'{name}/zarr.json')}: array '{name}''s metadata (shape, chunks, codecs, "
                             f"transpose order, dtype) was changed after the store was made (SHA-256 does not "
                             f"match): its chunks would decode to other labels; restore the file from a copy of "
                             f"the store, or re-label into a new --out")
        if _per_round(name) and meta["shape"][0] < rounds:
            raise StoreError(f"{objects.where(f'{name}/zarr.json')}: array '{name}' holds {meta['shape'][0]} "
                             f"rounds, the store plans {rounds} (rounds_planned); restore the file from a copy of the store, "
                             f"or re-label into a new --out")


def acquire_writer_lock(path: str | Path) -> FileLock | Lease:
    """Exclusive lock ``STORE.lock`` beside the store's real path for the one writing job
    (common/locks.py): not inside it, since a new store is made elsewhere and renamed into place.
    A store at a URL has its lease ``STORE.lease`` instead (common/lease.py), whose ``check`` is
    then the store's guard."""
    if is_url(path):
        return hold_lease(path, "label", error=StoreError)
    return hold_lock(lock_path_beside(path), path, "label", StoreError)


def _write_paths(group: zarr.Group, relpaths: Sequence[str]) -> None:
    """The ``paths`` array: every image's relative path, UTF-8, joined by newlines, in one chunk."""
    joined = np.frombuffer("\n".join(relpaths).encode(), dtype=np.uint8)
    _writable(group.create_array("paths", shape=joined.shape, chunks=(max(len(joined), 1),), dtype="uint8",
                                 fill_value=0, compressors=[ZstdCodec(level=9), Crc32cCodec()],
                                 overwrite=True))[:] = joined


def _inner_chunk(file: Path, inner: int, count: int) -> bytes:
    """The bytes of chunk ``inner`` of a packed object of ``count`` chunks (zarr's sharding format: the
    chunks, then their index of (offset, nbytes) little-endian uint64 pairs, then the index's CRC32C),
    read without the rest of the object."""
    size_index = count * INDEX_ENTRY + 4
    with open(file, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < size_index:
            raise ValueError(f"{size} bytes, shorter than its index")
        f.seek(size - size_index)
        index = f.read(size_index)
        if crc32c.crc32c(index[:-4]) != int.from_bytes(index[-4:], "little"):
            raise ValueError("its index's CRC32C does not match")
        offset, nbytes = (int(v) for v in np.frombuffer(index[:-4], dtype="<u8").reshape(count, 2)[inner])
        if offset + nbytes > size - size_index:
            raise ValueError(f"its index places chunk {inner} outside the data")
        f.seek(offset)
        return f.read(nbytes)


def num_shards(num_images: int, shard_size: int) -> int:
    return max(1, -(-num_images // shard_size))


def chunk_key(array: str, ndim: int, round_: int, shard: int) -> str:
    """Relative path of the chunk holding (round, shard) under zarr v3's default key encoding
    (a 1-D per-image array has one chunk per shard, whatever the round)."""
    if ndim == 1:
        return f"{array}/c/{shard}"
    return "/".join([array, "c", str(round_), str(shard)] + ["0"] * (ndim - 2))
