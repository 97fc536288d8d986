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

from .schema import (REQUIRED_ARRAYS, STAGED, StoreError, added_layer_arrays, array_meta_digest, chunk_key,
                     crc_matches, inner_chunk, layer_arrays, per_round, writable, write_paths)

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
               threads: int = 8, layers: Sequence[int] | None = None) -> list[str]:
        """Every problem found in ``shards`` (default: all), each naming its place; empty when sound.

        Ranks of a job each verify a share of the shards. ``done``: ``done_mask(shards)`` when
        already read. ``layers``: the added layers (``--add-teacher``, under their own done marks) to
        check too, default all; their problems begin with the layer (:meth:`layer_name`).
        """
        shards = np.arange(self.num_shards) if shards is None else np.asarray(shards, dtype=np.int64)
        done = self.done_mask(shards) if done is None else done
        problems = self._unfinished(shards, done, "done", "the store's `mealv2 label` command")
        bad = self._check_places(self._ensemble_places(shards, done), threads)
        problems += [f"{key}: {found[0]}" for key, found in bad.items()]
        for j in self.added_layers() if layers is None else layers:
            problems += [f"{self.layer_name(j)}: {p}" for p in self._layer_problems(j, shards, threads)]
        return problems

    def layer_name(self, layer: int) -> str:
        """Layer ``layer`` as users count it, by its --teacher-weights position (1, 2, ...; its arrays
        ``teachers/{layer}/`` count from 0), with its teacher."""
        return f"layer {layer + 1} ({self.layers[layer]['teacher']['spec']})"

    def repair_commands(self, problems: Sequence[str]) -> list[str]:
        """The commands that repair or finish what ``problems`` (:meth:`verify`'s) name: the store's `label`
        command for the ensemble's, each added layer's `--add-teacher` command for its own."""
        prefixes = {j: f"{self.layer_name(j)}: " for j in self.added_layers()}
        layers = [j for j, prefix in prefixes.items() if any(p.startswith(prefix) for p in problems)]
        ensemble = any(not p.startswith(tuple(prefixes.values())) for p in problems)
        return [*([self.label_command()] if ensemble else []), *(self.add_teacher_command(j) for j in layers)]

    def _layer_problems(self, layer: int, shards: np.ndarray, threads: int) -> list[str]:
        """The problems of added layer ``layer`` in ``shards``: its unlabelled shards and bad chunks."""
        *names, marks = added_layer_arrays(layer)
        done = self.done_mask(shards, marks)
        bad = self._check_places(self._round_places(names, shards, done, self.packed(marks)), threads)
        return (self._unfinished(shards, done, marks, "its `mealv2 label --add-teacher` command")
                + [f"{key}: {found[0]}" for key, found in bad.items()])

    def _unfinished(self, shards: np.ndarray, done: np.ndarray, marks: str, command: str) -> list[str]:
        """The shards among ``shards`` not labelled under ``marks``, and (said once, with shard 0) the rounds
        labelled in full but not packed (a kill before their packing), which ``command`` packs."""
        problems = [f"round {r} shard {shards[j]}: not complete ({STAGED}/{marks}/c/{r}/{shards[j]} unset)"
                    for r, j in zip(*np.nonzero(~done))]
        if 0 in shards:
            problems += [f"round {r}: every shard labelled, not packed; re-run {command}"
                         for r in np.flatnonzero(self.done_mask(marks=marks).all(axis=1) & ~self.packed(marks))]
        return problems

    def missing_chunks(self, round_: int, layers: Sequence[int] = ()) -> list[str]:
        """The objects of packed round ``round_`` that are absent (zarr would read them as zeros), the
        ensemble's and those of ``layers``."""
        names = [*self.data_arrays, *(name for j in layers if j not in self.layers_with_ensemble()
                                      for name in layer_arrays(j))]
        return [key for key in self._object_keys(round_, names) if not self.objects.exists(key)]

    def _round_places(self, names: Sequence[str], shards: np.ndarray, done: np.ndarray,
                      packed: np.ndarray) -> dict[str, tuple]:
        """{shown: (file key, index in its object or None, array, round, shard)}: the chunks of per-crop arrays
        ``names`` in the labelled (round, shard)s among ``shards``; a packed round's chunk is shown as its
        object's ``OBJECT[shard]``, another round's is a staged file."""
        ndims = {name: self.group[name].ndim for name in names}   # one read each
        places = {}
        for r, j in zip(*np.nonzero(done)):
            r, s = int(r), int(shards[j])
            for name, ndim in ndims.items():
                if packed[r]:
                    key = chunk_key(name, ndim, r, 0)
                    places[f"{key}[{s}]"] = (key, s, name, r, s)
                else:
                    key = chunk_key(f"{STAGED}/{name}", ndim, r, s)
                    places[key] = (key, None, name, r, s)
        return places

    def _ensemble_places(self, shards: np.ndarray, done: np.ndarray) -> dict[str, tuple]:
        """:meth:`_round_places` of the ensemble's arrays (and the layers kept with it), with the images'
        CRC32Cs (staged per shard, or packed with the first round) and, with shard 0, the one chunk of the
        per-image labels and of the paths."""
        packed = self.packed()
        places = self._round_places(self.data_arrays, shards, done, packed)
        if packed.any():
            key = chunk_key("crc32c", 1, 0, 0)
            places.update({f"{key}[{s}]": (key, int(s), "crc32c", None, int(s)) for s in shards})
        else:   # staged, one chunk per shard labelled in any round
            places.update({key: (key, None, "crc32c", None, int(s)) for s in shards[done.any(axis=0)]
                           for key in [chunk_key(f"{STAGED}/crc32c", 1, 0, int(s))]})
        if 0 in shards:
            places.update({key: (key, None, key.split("/")[0], None, 0)
                           for key in (chunk_key(name, 1, 0, 0) for name in ("labels", "paths") if name in self.group)})
        return places

    def _check_places(self, places: dict[str, tuple], threads: int = 8) -> dict[str, tuple]:
        """{shown: (problem, array, round, shard, packed)} of the ``places`` (:meth:`_round_places`') that are
        missing or damaged."""
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
        the shard in every round. The added layers are :meth:`repair_layer`'s (their command labels them).
        Call with the writer lock held (and ``guard`` set: each write checks it)."""
        self._check_guard()
        lines = [f"{key}: damaged done mark; its shard(s) will be labelled again"
                 for key in self._drop_damaged_marks("done")]
        unpack: dict[int, set[int]] = {}   # packed round: its shards with a bad chunk
        packed = self.packed()
        bad = self._check_places(self._ensemble_places(np.arange(self.num_shards), self.done_mask()))
        for key, (_, array, round_, shard, _) in bad.items():
            if array == "labels":
                writable(self.group["labels"])[:] = labels
            elif array == "paths" and relpaths is not None:
                write_paths(self.group, relpaths)
            if array in ("labels", "paths"):
                lines.append(f"{key}: damaged or missing; " + ("rewritten" if array == "labels" or relpaths
                                                                 else "left (no paths given)"))
                continue
            rounds = range(self.rounds_planned) if array == "crc32c" else [round_]
            self._unmark(shard, rounds, packed, "done", unpack)
            lines.append(f"{key}: damaged or missing; shard {shard} of round(s) "
                         f"{', '.join(map(str, rounds))} will be labelled again")
        if unpack and set(unpack) == set(np.flatnonzero(packed)):   # no packed round left: restage the CRC32Cs
            for s in range(self.num_shards):
                if not self._check_chunk(chunk_key("crc32c", 1, 0, 0), s):
                    self._restage("crc32c", 0, s)
        self._unpack(unpack, self.data_arrays, "done")
        return lines

    def repair_layer(self, layer: int) -> list[str]:
        """:meth:`repair` of added layer ``layer``: its damaged marks dropped and its shards with a missing or
        damaged chunk unmarked (a packed round unpacked), so its ``--add-teacher`` command labels exactly
        those again; one line per repair. Call with the writer lock held."""
        self._check_guard()
        *names, marks = added_layer_arrays(layer)
        lines = [f"{key}: damaged done mark; its shard(s) will be labelled again"
                 for key in self._drop_damaged_marks(marks)]
        packed, shards, unpack = self.packed(marks), np.arange(self.num_shards), {}
        places = self._round_places(names, shards, self.done_mask(marks=marks), packed)
        for key, (_, _, round_, shard, _) in self._check_places(places).items():
            self._unmark(shard, [round_], packed, marks, unpack)
            lines.append(f"{key}: damaged or missing; shard {shard} of round {round_} will be labelled again")
        self._unpack(unpack, names, marks)
        return lines

    def _unmark(self, shard: int, rounds, packed: np.ndarray, marks: str, unpack: dict[int, set[int]]) -> None:
        """Have ``shard`` of ``rounds`` labelled again: its staged mark in ``marks`` unset, or in a packed round
        the shard added to ``unpack`` (round: its bad shards), for :meth:`_unpack`."""
        for r in rounds:
            if packed[r]:
                unpack.setdefault(r, set()).add(shard)
            else:
                self.group[f"{STAGED}/{marks}"][r, shard] = 0

    def _restage(self, name: str, round_: int, shard: int) -> None:
        """Write chunk ``shard`` of packed array ``name``'s round ``round_`` object back to its staged file."""
        ndim = self.group[name].ndim
        self.objects.write(f"{STAGED}/{chunk_key(name, ndim, round_, shard)}",
                           inner_chunk(self.objects.file(chunk_key(name, ndim, round_, 0)), shard, self.num_shards),
                           self.fsync)

    def _unpack(self, rounds: dict[int, set[int]], names: Sequence[str], marks: str) -> None:
        """Stage again the sound chunks of arrays ``names`` in packed rounds ``rounds`` (round: its bad
        shards) with their marks in ``marks``, then uncommit each round (its row of ``marks``)."""
        for r, bad in rounds.items():
            sound = sorted(set(range(self.num_shards)) - bad)
            for s in sound:
                for name in names:
                    self._restage(name, r, s)
            if sound:
                writable(self.group[f"{STAGED}/{marks}"]).set_orthogonal_selection((r, np.array(sound)), 1)
            self._check_guard()
            self.objects.delete(chunk_key(marks, 2, r, 0))   # the round's commit undone

    def _drop_damaged_marks(self, marks: str) -> list[str]:
        """Delete the done marks of ``marks`` whose chunk file (or packed row) is damaged (a deleted mark
        reads as unset); their keys."""
        bad = [key for key in self.objects.keys(f"{STAGED}/{marks}/c") if self._check_chunk(key)]
        for r in range(self.group[marks].shape[0]):
            key = chunk_key(marks, 2, r, 0)
            if self.objects.exists(key) and any(self._check_chunk(key, s) for s in range(self.num_shards)):
                bad.append(key)
        for key in bad:
            self._check_guard()
            self.objects.delete(key)
        return bad
