"""What is wrong with a label store, and its repair: labelling then redoes exactly the damaged shards.

Completeness comes from the done marks and the chunk files; integrity from each chunk's CRC32C
trailer (the ``crc32c`` codec's; in a packed round's object, found through the object's index,
itself under a CRC32C), checked on the raw bytes without decoding: damage changes the bytes, and
this reads ImageNet's store in seconds where decoding takes minutes. zarr checks the same CRC32C on
every read, so a chunk damaged later is still refused when its round is loaded. An array's
metadata is checked against the SHA-256 the store recorded when made (:func:`check_metadata`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .schema import (REQUIRED_ARRAYS, STAGED, StoreError, array_meta_digest, chunk_key, crc_matches,
                     inner_chunk, per_round, writable, write_paths)

_RESTORE = "restore the file from a copy of the store, or re-label into a new --out"


def array_meta(objects, name: str) -> dict:
    """The parsed ``zarr.json`` of array ``name`` (``objects``: objects.py's, of the store); a missing or
    damaged file is named."""
    file = objects.where(f"{name}/zarr.json")
    fix = f"the store cannot be read as made; {_RESTORE}"
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


def check_metadata(objects, digests: dict, rounds: int, layers: Sequence[str] = ()) -> None:
    """Every array's metadata as the store was made (``digests``: its recorded SHA-256s): an edited
    transpose order would replay permuted labels without a word, and a changed shape would fail epochs
    into a run. ``layers``: the per-teacher layers' arrays the store records."""
    for name in (*REQUIRED_ARRAYS, *(["paths"] if "paths" in digests else []), *layers):
        meta = array_meta(objects, name)
        file = objects.where(f"{name}/zarr.json")
        if digests.get(name) != array_meta_digest(name, meta):
            raise StoreError(f"{file}: array '{name}''s metadata (shape, chunks, codecs, transpose order, dtype) was "
                             f"changed after the store was made (SHA-256 does not match): its chunks would decode "
                             f"to other labels; {_RESTORE}")
        if per_round(name) and meta["shape"][0] < rounds:
            raise StoreError(f"{file}: array '{name}' holds {meta['shape'][0]} rounds, the store plans {rounds} "
                             f"(rounds_planned); {_RESTORE}")


class StoreIntegrity:
    """The checks and repairs of a :class:`~.label_store.LabelStore` (a mixin: it reads the store's
    ``objects``, ``group``, done marks and chunk keys)."""

    guard = None   # raises when this process may no longer commit: its lease was lost (lease.py)

    def _check_guard(self) -> None:
        """Called before each write that commits (or undoes a commit): a writer that lost the store stops."""
        if self.guard is not None:
            self.guard()

    def verify(self, shards: Sequence[int] | None = None, done: np.ndarray | None = None,
               threads: int = 8) -> list[str]:
        """Every problem found in ``shards`` (default: all), each naming its place; empty when sound.

        Ranks of a job each verify a share of the shards. ``done``: ``done_mask(shards)`` when
        already read.
        """
        shards = np.arange(self.num_shards) if shards is None else np.asarray(shards, dtype=np.int64)
        done = self.done_mask(shards) if done is None else done
        problems = [f"round {r} shard {shards[j]}: not complete ({STAGED}/done/c/{r}/{shards[j]} unset)"
                    for r, j in zip(*np.nonzero(~done))]
        if 0 in shards:   # a round labelled but not packed (a kill before its packing), said once
            problems += [f"round {r}: every shard labelled, not packed; re-run the store's `mealv2 label` command"
                         for r in np.flatnonzero(self.done_mask().all(axis=1) & ~self.packed())]
        return problems + [f"{key}: {bad[0]}" for key, bad in self._bad_chunks(shards, done, threads).items()]

    def missing_chunks(self, round_: int) -> list[str]:
        """The objects of packed round ``round_`` that are absent (zarr would read them as zeros)."""
        return [key for key in self._object_keys(round_) if not self.objects.exists(key)]

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

    def _check_chunk(self, key: str, inner: int | None = None) -> str | None:
        """What is wrong with chunk file ``key`` (or chunk ``inner`` of object ``key``), None if sound."""
        try:
            raw = self.objects.file(key).read_bytes() if inner is None else inner_chunk(
                self.objects.file(key), inner, self.num_shards)
        except FileNotFoundError:
            return "missing chunk file of a completed shard"
        except OSError as e:
            return f"unreadable chunk ({e.strerror or e})"
        except ValueError as e:
            return f"unreadable object ({e}: the file is damaged)"
        if not crc_matches(raw):
            return "unreadable chunk (its CRC32C does not match its bytes: the file is damaged)"
        return None

    # ---- repair ----------------------------------------------------------------------------
    def repair(self, labels: np.ndarray, relpaths: Sequence[str] | None = None) -> list[str]:
        """Undo the done marks of labelled shards whose chunks are missing or damaged (what
        :meth:`verify` finds), so labelling redoes exactly those shards, and rewrite damaged
        per-image labels and paths; returns one line per repair. A damaged done mark counts as unset.
        A packed round with a bad chunk is unpacked: its sound chunks are staged again. A shard's
        image CRC32Cs (one chunk for all rounds) are checked by every round, so their damage redoes
        the shard in every round. Call with the writer lock held (and ``guard`` set: each write checks it)."""
        self._check_guard()
        lines = [f"{key}: damaged done mark; its shard(s) will be labelled again" for key in self._drop_damaged_marks()]
        unpack: dict[int, set[int]] = {}   # packed round: its shards with a bad chunk
        packed = self.packed()
        for key, (_, array, round_, shard, _) in self._bad_chunks(np.arange(self.num_shards), self.done_mask()).items():
            if array == "labels":
                writable(self.group["labels"])[:] = labels
            elif array == "paths" and relpaths is not None:
                write_paths(self.group, relpaths)
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
                               inner_chunk(self.objects.file(chunk_key(name, ndim, round_, 0)), shard, self.num_shards),
                               self.fsync)

        if all_packed and rounds:
            for s in range(self.num_shards):
                if not self._check_chunk(chunk_key("crc32c", 1, 0, 0), s):
                    stage("crc32c", 0, s)
        for r, bad in rounds.items():
            marks = sorted(set(range(self.num_shards)) - bad)
            for s in marks:
                for name in self.data_arrays:
                    stage(name, r, s)
            if marks:
                writable(self.group[f"{STAGED}/done"]).set_orthogonal_selection((r, np.array(marks)), 1)
            self._check_guard()
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
            self._check_guard()
            self.objects.delete(key)
        return bad
