"""The label store's schema, format ``mealv2-labels`` v5: the one module that says what a store holds
and how its bytes are laid out. It imports no zarr (its codecs are written as zarr.json records them),
so common/data/targets.py takes the probability encoding from it for free. docs/STORE.md documents
the format for plain zarr readers.

A zarr v3 group on local disk or in S3, read from either or from any URL (objects.py)::

    labels      (N,)           int32   dataset class ids, for inspect's agreement figure
    crc32c      (N,)           uint32  CRC32C of each image file's bytes as labelled
    boxes       (R, N, C, 4)   uint16  crop (y, x, h, w) on a 1023-step relative grid
    flips       (R, N, C)      uint8   1 = mirrored
    ids         (R, N, C, k)   uint16  top-k class ids, descending probability
    probs       (R, N, C, k+1) uint8   round(127 * sqrt(p)) of those classes, then of the leftover mass
    done        (R, S)         uint8   1 once shard s of round r is fully written
    paths       (bytes,)       uint8   the images' relative paths, UTF-8, one per line (to name what
                                       changed when a dataset's fingerprint differs; optional)
    teachers/<j>/ids, teachers/<j>/probs   layer j: one teacher's own top-k over the same crops, encoded
                                       as ids/probs (optional: ``label --keep-teachers``; :data:`LAYERS_KEY`)

The round is the leading axis so a training epoch reads its round as one slab. Data
chunks are (1 round, ``shard_size`` images), each with its CRC32C. They are written twice:

* while labelled, in the ``staged/`` arrays (same chunks and codecs, one file per array, round and
  shard): writers on different shards never touch the same file, and ``staged/done`` has one chunk
  per (round, shard), written only after the shard's data. A kill loses at most the shards in flight.
* once every shard of a round is labelled, ``LabelStore.pack`` (one process, the lock holder)
  joins that round's staged chunk files, bytes unchanged, into one object per array: a shard of
  zarr's sharding codec spanning the whole round, inner chunks = the staged chunks
  (:func:`join_chunks`). Its row of the main ``done`` array (one object) is the commit; then the
  staged files go. A finished store is a few objects per round, not arrays x shards x rounds
  files, and zarr readers see plain arrays.

Every chunk of a completed shard exists (as a file or in its round's object), even one equal to
the fill value (:func:`writable`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import crc32c
import numpy as np

from ..errors import MealV2Error

FORMAT = "mealv2-labels"
# v5: a round of an array is one object (zarr's sharding codec), shards are staged under `staged/` while
# labelled and packed once their round is complete (the module docstring).
# v4: a SHA-256 of each array's metadata (its zarr.json: shape, chunks, codecs, transpose order, dtype),
# which v3 stores lack, so they cannot be verified. v3: CRC32C of every image's bytes (stage 2 refuses an
# image changed since labelling) and the teachers' precision. v2: 7-bit square-root codes plus a code for
# the leftover mass, per-array codecs. v1 (8-bit codes, no leftover code) was never released. Older
# stores are refused.
VERSION = 5
PROB_LEVELS = 127        # probs hold round(PROB_LEVELS * sqrt(p)); common/data/targets.py encodes and decodes
ATTR_KEY = "mealv2"
DIGEST_KEY = "mealv2_sha256"
ARRAYS_KEY = "mealv2_arrays_sha256"   # array name: SHA-256 of its metadata (array_meta_digest)
# In a published copy's attributes (sharing.py): {"from": its original's identity digest, "as": the digest of
# its other attributes as published}; see identity_digest.
PUBLISHED_KEY = "published"

# Keys that must agree between a store and a new labelling command for it to resume or append.
IDENTITY_KEYS = ("format", "version", "prob_levels", "classes", "topk", "temperature", "seed", "crops_per_image",
                 "shard_size", "crop", "teachers", "teacher_precision", "dataset")
SHARD_ARRAYS = ("boxes", "flips", "ids", "probs", "crc32c")   # written per (round, shard); crc32c per shard
ROUND_ARRAYS = ("boxes", "flips", "ids", "probs", "done")       # leading axis: rounds (grows on append)
STAGED = "staged"   # group of the arrays written per shard while labelled, packed per round
STAGED_ARRAYS = tuple(f"{STAGED}/{name}" for name in (*ROUND_ARRAYS, "crc32c"))
DATA_ARRAYS = ROUND_ARRAYS[:-1]   # per-crop arrays, whose bytes per crop are counted
ARRAYS = (*ROUND_ARRAYS, "labels", "crc32c", *STAGED_ARRAYS, "paths")   # paths: optional (index without paths)
REQUIRED_ARRAYS = ARRAYS[:-1]
INDEX_ENTRY = 16    # a sharding index entry: (offset, nbytes), two little-endian uint64s
# Per-teacher layers: layer j is the arrays LAYER_GROUP/j/ids and LAYER_GROUP/j/probs (and their staged twins),
# encoded, chunked and packed as the ensemble's. Which layers a store holds is the attribute LAYERS_KEY, a list
# of records {"teacher": the teacher's record as in `teachers`, "marks": "ensemble"} (its layer is written with
# the ensemble's shards, under their done marks), with its own SHA-256 LAYERS_DIGEST_KEY. It is outside the
# `mealv2` attributes and their digest (the store's identity): a layer added later appends a record and new
# arrays, so the ensemble's labels, the store's digest and every run trained from it stay as they were.
LAYER_GROUP = "teachers"
LAYER_DATA = ("ids", "probs")
LAYERS_KEY = "mealv2_layers"
LAYERS_DIGEST_KEY = "mealv2_layers_sha256"
# A layer's record's "marks": "ensemble" (written with the ensemble's shards, under their done marks, by
# `label --keep-teachers`) or ADDED_MARKS (added to a finished store by `label --add-teacher`: its own done
# marks LAYER_GROUP/j/done and their staged twin, as the ensemble's `done`).
ADDED_MARKS = "own"


class StoreError(MealV2Error):
    """A store that cannot be used as asked; the message names the store and the value."""


# ---- encoding: each array's keyword arguments of zarr's create_array -----------------------------
# Codecs as zarr.json records them (zarr builds the same codec objects from these).
_CRC32C = {"name": "crc32c"}
# bitshuffle + zstd turns the unused high bits of 10-bit boxes and 7-bit codes into almost nothing.
_BITSHUFFLE_ZSTD = [{"name": "blosc", "configuration": {"cname": "zstd", "clevel": 9, "shuffle": "bitshuffle"}},
                    _CRC32C]


def _zstd(level: int) -> list[dict]:
    return [{"name": "zstd", "configuration": {"level": level}}, _CRC32C]


def _transpose(*order: int) -> list[dict]:
    return [{"name": "transpose", "configuration": {"order": list(order)}}]


def _encoding(name: str, crops: int) -> dict:
    """Codecs of one per-crop array.

    Chosen on an ImageNet-like synthetic ensemble (1000 classes, k=5; `mealv2 bench label`,
    docs/STORE.md). ``ids`` are laid out (image, rank, crop) inside a chunk: with several crops
    per image, which mostly share their top classes, that makes runs zstd's matcher finds
    (4.6 B/crop at C=4 against 5.9 with bitshuffle); with one or two crops there are few runs
    and bitshuffle's dropping of the unused high bits wins. ``probs`` are laid out (rank, image,
    crop) so each rank's codes are compressed together. A transpose only changes the bytes
    on disk, never the array's shape; zarr.json records every codec.
    """
    if name == "ids":
        return {"filters": _transpose(0, 1, 3, 2), "compressors": _BITSHUFFLE_ZSTD if crops <= 2 else _zstd(19)}
    if name == "probs":
        return {"filters": _transpose(0, 3, 1, 2), "compressors": _BITSHUFFLE_ZSTD}
    return {"compressors": _BITSHUFFLE_ZSTD}


def layer_arrays(layer: int) -> tuple[str, ...]:
    """The per-crop arrays of layer ``layer`` (packed; their staged twins are under ``staged/``)."""
    return tuple(f"{LAYER_GROUP}/{layer}/{name}" for name in LAYER_DATA)


def added_layer_arrays(layer: int) -> tuple[str, ...]:
    """The arrays of a layer added by ``--add-teacher`` (packed; staged twins under ``staged/``): its data and
    its own done marks."""
    return (*layer_arrays(layer), f"{LAYER_GROUP}/{layer}/done")


def layer_specs(specs: dict[str, dict], layer: int, data: Sequence[str] = LAYER_DATA) -> dict[str, dict]:
    """The arrays of layer ``layer``, staged and packed: the ensemble's ``ids``/``probs`` specs of ``specs``
    (:func:`array_specs`) under the layer's names, so a layer is encoded, chunked and packed as they are;
    ``data``: which of the ensemble's arrays (an added layer's also ``done``)."""
    return {f"{where}{LAYER_GROUP}/{layer}/{name}": specs[f"{where}{name}"]
            for where in ("", f"{STAGED}/") for name in data}


def array_specs(*, images: int, crops: int, topk: int, classes: int, shard_size: int, rounds: int) -> dict[str, dict]:
    """The arrays of a new store (``paths`` aside: :func:`write_paths`), in the order they are made:
    name -> keyword arguments of zarr's ``create_array``. A main array's object spans its round
    (zarr's ``shards``), its inner chunks are the staged array's chunks."""
    shards = num_shards(images, shard_size)
    span = shards * shard_size
    id_dtype = "uint16" if classes <= 65536 else "int32"
    specs = {}
    for name, tail, dtype in (("boxes", (crops, 4), "uint16"), ("flips", (crops,), "uint8"),
                              ("ids", (crops, topk), id_dtype), ("probs", (crops, topk + 1), "uint8")):
        for where, packed in (("", (1, span, *tail)), (f"{STAGED}/", None)):
            specs[where + name] = {"shape": (rounds, images, *tail), "chunks": (1, shard_size, *tail),
                                   "shards": packed, "dtype": dtype, "fill_value": 0, **_encoding(name, crops)}
    for where, packed in (("", True), (f"{STAGED}/", False)):
        specs[f"{where}done"] = {"shape": (rounds, shards), "chunks": (1, 1), "shards": (1, shards) if packed else None,
                                 "dtype": "uint8", "fill_value": 0, "compressors": _BITSHUFFLE_ZSTD}
        specs[f"{where}crc32c"] = {"shape": (images,), "chunks": (shard_size,), "shards": (span,) if packed else None,
                                   "dtype": "uint32", "fill_value": 0, "compressors": _zstd(3)}
    specs["labels"] = {"shape": (images,), "chunks": (max(images, 1),), "dtype": "int32", "fill_value": 0,
                       "compressors": _BITSHUFFLE_ZSTD}
    return specs


def writable(arr):
    """zarr array ``arr`` with every chunk written, even one equal to the fill value (zarr skips those
    by default): a completed shard must have all its chunk files, or a deleted file would go unseen."""
    return arr.with_config({"write_empty_chunks": True})


def write_paths(group, relpaths: Sequence[str]) -> None:
    """The ``paths`` array of zarr group ``group``: every image's relative path, UTF-8, joined by
    newlines, in one chunk."""
    joined = np.frombuffer("\n".join(relpaths).encode(), dtype=np.uint8)
    writable(group.create_array("paths", shape=joined.shape, chunks=(max(len(joined), 1),), dtype="uint8",
                                fill_value=0, compressors=_zstd(9), overwrite=True))[:] = joined


# ---- digests ----------------------------------------------------------------------------------
def json_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def identity_digest(attrs: dict, digest: str) -> str:
    """What a store's labels are known by (``train`` records it, and its ``--resume`` compares it): ``digest``,
    the SHA-256 of its attributes ``attrs``; for a published copy whose attributes are still those it was
    published with, its original's: publishing strips the teachers' checkpoint folders, not one label.
    An attribute changed since (rounds appended) makes the copy a store of its own."""
    published = attrs.get(PUBLISHED_KEY)
    rest = {k: v for k, v in attrs.items() if k != PUBLISHED_KEY}
    return published["from"] if published and published.get("as") == json_digest(rest) else digest


def array_meta_digest(name: str, meta: dict) -> str:
    """SHA-256 of everything in an array's metadata (its parsed zarr.json) that decides what its chunks
    decode to: shape, chunk grid, key encoding, dtype, fill value, codecs (transpose order, compressor,
    checksum). The leading size of a per-round array is left out: an append grows it (before
    ``rounds_planned``, so a kill in between leaves it larger), and opening a store bounds it by
    ``rounds_planned``."""
    if per_round(name):
        meta = {**meta, "shape": [None, *meta["shape"][1:]]}
    return json_digest(meta)


def per_round(name: str) -> bool:
    return base_array(name) in ROUND_ARRAYS


def base_array(name: str) -> str:
    """The ensemble's array whose encoding array ``name`` has: ``staged/teachers/1/ids`` -> ``ids``."""
    parts = name.removeprefix(f"{STAGED}/").split("/")
    return parts[2] if parts[0] == LAYER_GROUP and len(parts) == 3 else parts[0]


# ---- where the bytes are ----------------------------------------------------------------------
def num_shards(num_images: int, shard_size: int) -> int:
    return max(1, -(-num_images // shard_size))


def chunk_key(array: str, ndim: int, round_: int, shard: int) -> str:
    """Relative path of the chunk holding (round, shard) under zarr v3's default key encoding
    (a 1-D per-image array has one chunk per shard, whatever the round)."""
    if ndim == 1:
        return f"{array}/c/{shard}"
    return "/".join([array, "c", str(round_), str(shard)] + ["0"] * (ndim - 2))


def crc_matches(raw: bytes) -> bool:
    """Whether ``raw`` ends with the CRC32C of the bytes before it (the ``crc32c`` codec's trailer)."""
    return len(raw) >= 4 and crc32c.crc32c(raw[:-4]) == int.from_bytes(raw[-4:], "little")


def join_chunks(parts: Sequence[bytes]) -> bytes:
    """A packed object of chunks ``parts`` (their bytes unchanged), in zarr's sharding format: the
    chunks, then their index of (offset, nbytes) little-endian uint64 pairs, then the index's CRC32C."""
    sizes = np.array([len(p) for p in parts], dtype="<u8")
    index = np.stack([np.cumsum(sizes) - sizes, sizes], axis=1).astype("<u8").tobytes()
    return b"".join([*parts, index, crc32c.crc32c(index).to_bytes(4, "little")])


def inner_chunk(file: Path, inner: int, count: int) -> bytes:
    """The bytes of chunk ``inner`` of a packed object of ``count`` chunks (:func:`join_chunks`), read
    without the rest of the object; ValueError when its index is damaged."""
    size_index = count * INDEX_ENTRY + 4
    with open(file, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < size_index:
            raise ValueError(f"{size} bytes, shorter than its index")
        f.seek(size - size_index)
        index = f.read(size_index)
        if not crc_matches(index):
            raise ValueError("its index's CRC32C does not match")
        offset, nbytes = (int(v) for v in np.frombuffer(index[:-4], dtype="<u8").reshape(count, 2)[inner])
        if offset + nbytes > size - size_index:
            raise ValueError(f"its index places chunk {inner} outside the data")
        f.seek(offset)
        return f.read(nbytes)
